//! One call's understanding, sans-IO: utterances in (in time order, with the intent the
//! caller classified), masked utterances, rule hits and events out.
//!
//! Text is PII-masked first, and only masked text is kept or passed on. Rules see the
//! masked text, the leg, the timing and the intent. Events come from rules that name one
//! (`supervisor_alert`, `dnc_request`, `transfer_to_human`, `high_value_lead`, …), each
//! with its reason and the utterances behind it.

use std::sync::Arc;

use serde::Serialize;

use super::emotion::{self, Emotion, SpeakerBaseline};
use super::intent::{Classification, Intent};
#[cfg(test)]
use super::rules::DEFAULT_RULES;
use super::rules::{CallRules, RuleHit, RuleInput, RuleSet};
use super::state::{CallState, Phase};
use crate::audio::Leg;
use crate::pii::{self, PiiKind};
use crate::speech::prosody::Prosody;

/// Consecutive negative customer utterances that raise a supervisor alert.
pub const NEGATIVE_STREAK: usize = 3;
/// Times the customer asks the same question, each after the agent has spoken, before the
/// call goes to a human: the answers are not landing.
pub const REPEATED_QUESTION: usize = 3;
/// The intents that are questions the agent should answer.
const QUESTION_INTENTS: [Intent; 2] = [Intent::PriceInquiry, Intent::ProductQuestion];

/// What the caller knows about an utterance besides its text: the models' outputs (run
/// outside this pure core) and the prosody.
#[derive(Debug, Clone, Default)]
pub struct UtteranceFacts {
    /// Customer utterances: the intent.
    pub intent: Option<Classification>,
    /// The text sentiment label (negative / neutral / positive).
    pub sentiment: Option<String>,
    pub prosody: Option<Prosody>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UtteranceView {
    pub index: usize,
    pub leg: Leg,
    pub start_secs: f64,
    pub end_secs: f64,
    /// The transcript with personal data masked.
    pub text: String,
    pub pii: Vec<PiiKind>,
    /// Customer utterances only: what the customer wants.
    pub intent: Option<Classification>,
    pub emotion: Option<Emotion>,
    /// The call's phase after this utterance.
    pub phase: Phase,
    /// Ids of the rules that fired on this utterance.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallEvent {
    pub kind: String,
    pub rule: String,
    pub reason: String,
    /// Seconds from the call's start when the event was raised.
    pub at_secs: f64,
    pub utterances: Vec<usize>,
}

pub struct CallUnderstanding {
    rules: CallRules,
    pub utterances: Vec<UtteranceView>,
    pub hits: Vec<RuleHit>,
    pub events: Vec<CallEvent>,
    /// Phase, context memory and the customer's tags.
    pub state: CallState,
    baselines: [SpeakerBaseline; 2],
    /// The customer's latest run of negative utterances (indices).
    negative_run: Vec<usize>,
    streak_alerted: bool,
    /// Per question intent: the turns it was asked in, and whether the agent spoke since.
    questions: std::collections::BTreeMap<Intent, (Vec<usize>, bool)>,
    repeat_alerted: bool,
}

impl CallUnderstanding {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            rules: CallRules::new(rules),
            utterances: Vec::new(),
            hits: Vec::new(),
            events: Vec::new(),
            state: CallState::default(),
            baselines: Default::default(),
            negative_run: Vec::new(),
            streak_alerted: false,
            questions: std::collections::BTreeMap::new(),
            repeat_alerted: false,
        }
    }

    /// The agent's last utterance (masked) that began before `before_secs`: the context a
    /// customer's reply is read in ("" when the agent has not spoken yet).
    pub fn agent_line_before(&self, before_secs: f64) -> String {
        self.utterances
            .iter()
            .rev()
            .find(|u| u.leg == Leg::Agent && u.start_secs < before_secs)
            .map(|u| u.text.clone())
            .unwrap_or_default()
    }

    /// One utterance, in time order. Returns the events it raised.
    pub fn utterance(
        &mut self,
        leg: Leg,
        start_secs: f64,
        end_secs: f64,
        text: &str,
        facts: UtteranceFacts,
    ) -> Vec<CallEvent> {
        let (masked, pii) = pii::mask(text);
        let index = self.utterances.len();
        let intent = facts.intent;
        let baseline = &mut self.baselines[usize::from(leg == Leg::Customer)];
        let aroused = facts.prosody.as_ref().is_some_and(|p| baseline.aroused_then_add(p));
        let emotion = facts.sentiment.as_deref().map(|s| {
            let pauses = facts.prosody.as_ref().map_or(0, |p| p.pauses);
            emotion::judge(s, intent.as_ref().map(Classification::intent), aroused, pauses)
        });
        let input = RuleInput {
            index,
            leg,
            start_secs,
            end_secs,
            text: masked.clone(),
            intents: intent.as_ref().map(|c| c.labels.clone()).unwrap_or_default(),
            emotion: emotion.map(|e| e.name().to_owned()),
        };
        let mut hits = self.rules.utterance(&input);
        if leg == Leg::Customer {
            hits.extend(self.negative_streak(index, emotion));
        }
        let intent_id = intent.as_ref().map(Classification::intent);
        hits.extend(self.repeated_question(index, leg, intent_id));
        let intents = intent.as_ref().map(Classification::intents).unwrap_or_default();
        self.state.utterance(index, leg, start_secs, &masked, &intents, emotion);
        let fired_here: Vec<String> =
            hits.iter().filter(|h| h.utterances.contains(&index)).map(|h| h.rule.clone()).collect();
        self.utterances.push(UtteranceView {
            index,
            leg,
            start_secs,
            end_secs,
            text: masked,
            pii,
            intent,
            emotion,
            phase: self.state.phase,
            rules: fired_here,
        });
        self.record(hits, end_secs)
    }

    /// Three negative customer utterances in a row: a supervisor should listen in (once).
    fn negative_streak(&mut self, index: usize, emotion: Option<Emotion>) -> Option<RuleHit> {
        if emotion != Some(Emotion::Negative) {
            self.negative_run.clear();
            return None;
        }
        self.negative_run.push(index);
        if self.negative_run.len() < NEGATIVE_STREAK || self.streak_alerted {
            return None;
        }
        self.streak_alerted = true;
        Some(RuleHit {
            rule: "customer_negative_streak".into(),
            severity: super::rules::Severity::Critical,
            event: Some("supervisor_alert".into()),
            reason: format!("{} negative customer utterances in a row", self.negative_run.len()),
            utterances: self.negative_run.clone(),
        })
    }

    /// The customer asks the same question again after the agent answered, a third time:
    /// transfer to a human (once). Asks within one customer turn count once.
    fn repeated_question(&mut self, index: usize, leg: Leg, intent: Option<Intent>) -> Option<RuleHit> {
        if leg == Leg::Agent {
            self.questions.values_mut().for_each(|(_, agent_spoke)| *agent_spoke = true);
            return None;
        }
        let intent = intent.filter(|i| QUESTION_INTENTS.contains(i))?;
        let (turns, agent_spoke) = self.questions.entry(intent).or_insert((Vec::new(), true));
        if !*agent_spoke {
            return None;
        }
        turns.push(index);
        *agent_spoke = false;
        if turns.len() < REPEATED_QUESTION || self.repeat_alerted {
            return None;
        }
        self.repeat_alerted = true;
        Some(RuleHit {
            rule: "customer_repeats_question".into(),
            severity: super::rules::Severity::Warning,
            event: Some("transfer_to_human".into()),
            reason: format!(
                "customer asked the same question ({}) {} times after the agent's answers",
                intent.name(),
                turns.len()
            ),
            utterances: turns.clone(),
        })
    }

    /// Time passes without speech (seconds from the call's start).
    pub fn tick(&mut self, now_secs: f64) -> Vec<CallEvent> {
        let hits = self.rules.tick(now_secs);
        self.record(hits, now_secs)
    }

    /// The call ended.
    pub fn end(&mut self, at_secs: f64) -> Vec<CallEvent> {
        let hits = self.rules.end();
        self.record(hits, at_secs)
    }

    fn record(&mut self, hits: Vec<RuleHit>, at_secs: f64) -> Vec<CallEvent> {
        let events: Vec<CallEvent> = hits
            .iter()
            .filter_map(|h| {
                h.event.as_ref().map(|kind| CallEvent {
                    kind: kind.clone(),
                    rule: h.rule.clone(),
                    reason: h.reason.clone(),
                    at_secs,
                    utterances: h.utterances.clone(),
                })
            })
            .collect();
        self.hits.extend(hits);
        self.events.extend(events.iter().cloned());
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(label: &str) -> UtteranceFacts {
        UtteranceFacts {
            intent: Some(Classification {
                label: label.into(),
                confidence: 0.9,
                top3: vec![],
                labels: vec![label.into()],
            }),
            ..Default::default()
        }
    }

    fn none() -> UtteranceFacts {
        UtteranceFacts::default()
    }

    #[test]
    fn three_negative_customer_utterances_in_a_row_alert_a_supervisor_once() {
        let mut call = CallUnderstanding::new(Arc::new(RuleSet::parse("").unwrap()));
        let negative = || UtteranceFacts { sentiment: Some("negative".into()), ..classified("complaint") };
        let say = |call: &mut CallUnderstanding, leg, at: f64, facts| call.utterance(leg, at, at + 1.0, "…", facts);
        assert!(say(&mut call, Leg::Customer, 0.0, negative()).is_empty());
        assert!(say(&mut call, Leg::Customer, 2.0, negative()).is_empty());
        assert!(say(&mut call, Leg::Agent, 3.0, none()).is_empty(), "the agent does not break the run");
        assert!(say(&mut call, Leg::Customer, 4.0, classified("price_inquiry")).is_empty(), "no sentiment: breaks it");
        assert!(say(&mut call, Leg::Customer, 6.0, negative()).is_empty());
        assert!(say(&mut call, Leg::Customer, 8.0, negative()).is_empty());
        let alert = say(&mut call, Leg::Customer, 10.0, negative());
        assert_eq!(alert.len(), 1);
        assert_eq!((alert[0].kind.as_str(), alert[0].utterances.as_slice()), ("supervisor_alert", &[4, 5, 6][..]));
        assert!(say(&mut call, Leg::Customer, 12.0, negative()).is_empty(), "once per call");
        assert_eq!(call.utterances[6].emotion, Some(Emotion::Negative));
    }

    #[test]
    fn a_question_asked_again_after_three_answers_goes_to_a_human() {
        let mut call = CallUnderstanding::new(Arc::new(RuleSet::parse("").unwrap()));
        let mut say = |leg, facts| call.utterance(leg, 0.0, 1.0, "…", facts);
        assert!(say(Leg::Customer, classified("price_inquiry")).is_empty());
        assert!(say(Leg::Customer, classified("price_inquiry")).is_empty(), "same turn: one ask");
        assert!(say(Leg::Agent, none()).is_empty());
        assert!(say(Leg::Customer, classified("product_question")).is_empty(), "another question");
        assert!(say(Leg::Customer, classified("price_inquiry")).is_empty());
        assert!(say(Leg::Agent, none()).is_empty());
        let transfer = say(Leg::Customer, classified("price_inquiry"));
        assert_eq!(transfer.len(), 1);
        assert_eq!(
            (transfer[0].kind.as_str(), transfer[0].rule.as_str(), transfer[0].utterances.as_slice()),
            ("transfer_to_human", "customer_repeats_question", &[0, 4, 6][..])
        );
        assert!(say(Leg::Agent, none()).is_empty());
        assert!(say(Leg::Customer, classified("price_inquiry")).is_empty(), "once per call");
    }

    #[test]
    fn a_call_raises_events_with_reasons_and_keeps_only_masked_text() {
        let rules = Arc::new(RuleSet::parse(DEFAULT_RULES).unwrap());
        let mut call = CallUnderstanding::new(rules);
        assert!(call.utterance(Leg::Agent, 0.5, 3.0, "您好，本次通话将被录音", none()).is_empty());
        let promise = call.utterance(Leg::Agent, 3.5, 7.0, "这款理财保本，零风险", none());
        assert_eq!(promise.len(), 1);
        assert_eq!((promise[0].kind.as_str(), promise[0].utterances.as_slice()), ("supervisor_alert", &[1][..]));
        let human = call.utterance(Leg::Customer, 8.0, 9.0, "你是机器人吗", classified("human_request"));
        assert_eq!(human[0].kind, "transfer_to_human");
        let dnc = call.utterance(
            Leg::Customer,
            10.0,
            12.0,
            "我的号码13812345678你们怎么有的 别再打了",
            classified("do_not_call"),
        );
        assert_eq!(dnc[0].kind, "dnc_request");
        assert!(call.end(13.0).is_empty(), "the notice was given in time");
        let stored = &call.utterances[3];
        assert!(stored.text.contains("[手机号]") && !stored.text.contains("138"), "{}", stored.text);
        assert_eq!(stored.pii, vec![PiiKind::Mobile]);
        assert_eq!(call.utterances[1].rules, ["agent_forbidden_promise"]);
        assert_eq!(call.events.len(), 3);
    }

    #[test]
    fn a_missing_recording_notice_is_a_hit_at_the_deadline_but_no_event() {
        let mut call = CallUnderstanding::new(Arc::new(RuleSet::parse(DEFAULT_RULES).unwrap()));
        call.utterance(Leg::Agent, 0.5, 3.0, "您好", none());
        assert!(call.tick(31.0).is_empty(), "the shipped rule has no event");
        assert_eq!(call.hits.iter().map(|h| h.rule.as_str()).collect::<Vec<_>>(), ["agent_recording_notice"]);
    }
}
