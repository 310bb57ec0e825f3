//! Live call understanding, sans-IO: every call in progress, fed utterances (with the
//! facts the text models found, computed by the shell), the end of each leg's speech and
//! ticks with the registry's live calls, each with the monotonic time; it returns what to
//! publish and store. No IO, no clock, no runtime: the shell (`live`) reads the clock,
//! runs the models and the store, and publishes.
//!
//! A call is finished when the registry no longer has it and every leg it had has said
//! its speech ended (the last utterance of a leg can come a second or two after hang-up,
//! when ASR finishes), or [`FINISH_GRACE`] after it left the registry, whichever is first.
//! Call times are seconds from the call's start on the monotonic clock: a branch box
//! steps its wall clock at NTP sync, and that must not move a rule's deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::call::{CallEvent, CallUnderstanding, UtteranceFacts, UtteranceView};
use super::rules::{RuleHit, RuleSet};
use super::state::{Phase, Tag};
use crate::audio::Leg;

/// Longest wait for a leg's last utterance after its call left the registry.
pub const FINISH_GRACE: Duration = Duration::from_secs(30);

/// One finished utterance as the speech path gave it, with the models' facts.
#[derive(Debug, Clone)]
pub struct HeardUtterance {
    pub call: String,
    pub leg: Leg,
    /// Seconds from the call's start.
    pub start_secs: f64,
    pub end_secs: f64,
    /// The raw transcript: masked here before anything keeps it.
    pub text: String,
    pub facts: UtteranceFacts,
    /// When the call started, if the registry still has it.
    pub call_started: Option<Instant>,
}

/// A call's end, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedCall {
    pub call: String,
    pub utterances: usize,
    pub rule_hits: usize,
    pub events: usize,
    pub phase: Phase,
    /// The customer's tags from this call.
    pub tags: Vec<Tag>,
}

/// What the shell does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A call is seen for the first time (before any other action of it): `age` is how
    /// long ago it started. Keep its record from here on.
    Began { call: String, age: Duration },
    /// An understood utterance (masked): log it and publish it.
    Utterance { call: String, view: UtteranceView },
    /// A real-time event: log it and publish it.
    Event { call: String, event: CallEvent },
    /// Tags the call raised just now: keep them (and so the customer's, once linked).
    StoreTags { call: String, tags: Vec<Tag> },
    /// Rules that fired (with or without an event), at `at_secs` into the call: keep them.
    Hits { call: String, hits: Vec<RuleHit>, at_secs: f64 },
    /// The call is finished: look up its customer, log and publish the end.
    Finished(FinishedCall),
}

struct LiveCall {
    understanding: CallUnderstanding,
    /// When the call started (the registry's, or the first utterance's if already gone).
    started: Instant,
    /// Legs the call had (from the registry and the utterances) and legs whose speech ended.
    legs: BTreeSet<Leg>,
    ended_legs: BTreeSet<Leg>,
    /// When the registry was first seen without the call.
    gone_since: Option<Instant>,
    /// Whether `Began` was returned for it.
    announced: bool,
}

impl LiveCall {
    fn secs(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// `Began` the first time the call shows in the actions.
    fn announce(&mut self, id: &str, now: Instant, actions: &mut Vec<Action>) {
        if !self.announced {
            self.announced = true;
            actions.push(Action::Began { call: id.to_owned(), age: now.saturating_duration_since(self.started) });
        }
    }

    /// The hits recorded since the call had `before` of them.
    fn hits_since(&self, id: &str, before: usize, at_secs: f64, actions: &mut Vec<Action>) {
        let hits = self.understanding.hits.get(before..).unwrap_or_default();
        if !hits.is_empty() {
            actions.push(Action::Hits { call: id.to_owned(), hits: hits.to_vec(), at_secs });
        }
    }
}

pub struct UnderstandingCore {
    rules: Arc<RuleSet>,
    calls: HashMap<String, LiveCall>,
}

impl UnderstandingCore {
    pub fn new(rules: RuleSet) -> Self {
        Self { rules: Arc::new(rules), calls: HashMap::new() }
    }

    /// New calls use these rules; calls in progress keep theirs.
    pub fn set_rules(&mut self, rules: RuleSet) {
        self.rules = Arc::new(rules);
    }

    pub fn rules_version(&self) -> &str {
        self.rules.version()
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    pub fn calls_in_progress(&self) -> usize {
        self.calls.len()
    }

    /// The agent's last utterance (masked) that began before `before_secs` in `call`: the
    /// context a customer's reply is read in ("" when the agent has not spoken).
    pub fn agent_line_before(&self, call: &str, before_secs: f64) -> String {
        self.calls.get(call).map(|c| c.understanding.agent_line_before(before_secs)).unwrap_or_default()
    }

    /// One finished utterance, in the leg's time order.
    pub fn utterance(&mut self, u: HeardUtterance, now: Instant) -> Vec<Action> {
        let call = self.live_call(&u.call, u.call_started.unwrap_or(now));
        let mut actions = Vec::new();
        call.announce(&u.call, now, &mut actions);
        call.legs.insert(u.leg);
        let tags_before = call.understanding.state.tags.clone();
        let hits_before = call.understanding.hits.len();
        let events = call.understanding.utterance(u.leg, u.start_secs, u.end_secs, &u.text, u.facts);
        let new_tags: Vec<Tag> = call.understanding.state.tags.difference(&tags_before).copied().collect();
        if let Some(view) = call.understanding.utterances.last() {
            actions.push(Action::Utterance { call: u.call.clone(), view: view.clone() });
        }
        call.hits_since(&u.call, hits_before, u.end_secs, &mut actions);
        if !new_tags.is_empty() {
            actions.push(Action::StoreTags { call: u.call.clone(), tags: new_tags });
        }
        actions.extend(events.into_iter().map(|event| Action::Event { call: u.call.clone(), event }));
        actions
    }

    /// A leg's speech is complete (its last utterance came before this).
    /// A leg's speech is complete. A call known only from this (no utterance, gone from
    /// the registry before a tick saw it) is taken in, so that it still finishes: a call's
    /// end must not depend on anyone having spoken.
    pub fn leg_ended(&mut self, call: &str, leg: Leg, now: Instant) {
        let c = self.live_call(call, now);
        c.legs.insert(leg);
        c.ended_legs.insert(leg);
    }

    fn live_call(&mut self, call: &str, started: Instant) -> &mut LiveCall {
        let rules = self.rules.clone();
        self.calls.entry(call.to_owned()).or_insert_with(|| LiveCall {
            understanding: CallUnderstanding::new(rules),
            started,
            legs: BTreeSet::new(),
            ended_legs: BTreeSet::new(),
            gone_since: None,
            announced: false,
        })
    }

    /// Ticks every call: deadlines of calls still live (`live`: the registry's calls and
    /// their legs), and the end of calls that left it whose speech is complete.
    pub fn tick(&mut self, live: &BTreeMap<String, Vec<Leg>>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut ended = Vec::new();
        // Calls in the registry are understood from the start, words or none.
        for (id, legs) in live {
            self.live_call(id, now).legs.extend(legs.iter().copied());
        }
        let mut ids: Vec<String> = self.calls.keys().cloned().collect();
        ids.sort();
        for id in ids {
            let Some(call) = self.calls.get_mut(&id) else { continue };
            call.announce(&id, now, &mut actions);
            let secs = call.secs(now);
            let hits_before = call.understanding.hits.len();
            let events = match live.get(&id) {
                Some(legs) => {
                    call.legs.extend(legs.iter().copied());
                    call.gone_since = None;
                    call.understanding.tick(secs)
                }
                None => {
                    let gone = *call.gone_since.get_or_insert(now);
                    let speech_done = call.legs.is_subset(&call.ended_legs);
                    if speech_done || now.saturating_duration_since(gone) >= FINISH_GRACE {
                        ended.push(id.clone());
                        call.understanding.end(secs)
                    } else {
                        Vec::new()
                    }
                }
            };
            call.hits_since(&id, hits_before, secs, &mut actions);
            actions.extend(events.into_iter().map(|event| Action::Event { call: id.clone(), event }));
        }
        for id in ended {
            if let Some(call) = self.calls.remove(&id) {
                actions.push(Action::Finished(finished(&id, &call.understanding)));
            }
        }
        actions
    }

    /// Shutdown, after the speech path has flushed: every call still open is ended, so
    /// its required rules are judged and its end is reported.
    pub fn finish_all(&mut self, now: Instant) -> Vec<Action> {
        let mut ids: Vec<String> = self.calls.keys().cloned().collect();
        ids.sort();
        let mut actions = Vec::new();
        for id in ids {
            if let Some(mut call) = self.calls.remove(&id) {
                call.announce(&id, now, &mut actions);
                let secs = call.secs(now);
                let hits_before = call.understanding.hits.len();
                let events = call.understanding.end(secs);
                call.hits_since(&id, hits_before, secs, &mut actions);
                actions.extend(events.into_iter().map(|event| Action::Event { call: id.clone(), event }));
                actions.push(Action::Finished(finished(&id, &call.understanding)));
            }
        }
        actions
    }
}

fn finished(id: &str, u: &CallUnderstanding) -> FinishedCall {
    FinishedCall {
        call: id.to_owned(),
        utterances: u.utterances.len(),
        rule_hits: u.hits.len(),
        events: u.events.len(),
        phase: u.state.phase,
        tags: u.state.tags.iter().copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::understanding::intent::Classification;
    use crate::understanding::rules::DEFAULT_RULES;

    fn core() -> UnderstandingCore {
        UnderstandingCore::new(RuleSet::parse(DEFAULT_RULES).unwrap())
    }

    fn heard(call: &str, leg: Leg, at: f64, text: &str, started: Option<Instant>) -> HeardUtterance {
        let intent = (leg == Leg::Customer).then(|| Classification {
            label: "other".into(),
            confidence: 0.9,
            top3: vec![],
            labels: vec!["other".into()],
        });
        HeardUtterance {
            call: call.into(),
            leg,
            start_secs: at,
            end_secs: at + 1.0,
            text: text.into(),
            facts: UtteranceFacts { intent, sentiment: Some("neutral".into()), prosody: None },
            call_started: started,
        }
    }

    fn live(calls: &[(&str, &[Leg])]) -> BTreeMap<String, Vec<Leg>> {
        calls.iter().map(|(c, legs)| ((*c).to_owned(), legs.to_vec())).collect()
    }

    fn finished_calls(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Finished(f) => Some(f.call.clone()),
                _ => None,
            })
            .collect()
    }

    fn events(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event { event, .. } => Some(event.kind.clone()),
                _ => None,
            })
            .collect()
    }

    /// (time after start in seconds, what happens, what must come out)
    #[test]
    fn a_call_is_finished_when_it_left_the_registry_and_every_leg_said_its_speech_ended() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = core();
        let both: &[Leg] = &[Leg::Agent, Leg::Customer];
        c.utterance(heard("c1", Leg::Agent, 0.5, "您好，这里是客服中心", Some(t0)), at(2));
        assert!(finished_calls(&c.tick(&live(&[("c1", both)]), at(3))).is_empty(), "live calls go on");
        // Hung up: gone from the registry, but the customer's leg has not flushed yet.
        c.leg_ended("c1", Leg::Agent, t0);
        assert!(finished_calls(&c.tick(&live(&[]), at(10))).is_empty(), "the customer leg may still speak");
        let a = c.utterance(heard("c1", Leg::Customer, 8.0, "不需要了谢谢", None), at(11));
        assert!(matches!(&a[0], Action::Utterance { view, .. } if view.index == 1 && view.leg == Leg::Customer));
        c.leg_ended("c1", Leg::Customer, t0);
        assert_eq!(finished_calls(&c.tick(&live(&[]), at(12))), ["c1"]);
        assert_eq!(c.calls_in_progress(), 0);
    }

    #[test]
    fn a_call_in_which_nobody_spoke_still_finishes() {
        let t0 = Instant::now();
        let mut c = core();
        let both: &[Leg] = &[Leg::Agent, Leg::Customer];
        // Seen live, silent, hung up: both legs' speech ends with nothing said.
        assert!(finished_calls(&c.tick(&live(&[("quiet", both)]), t0)).is_empty());
        c.leg_ended("quiet", Leg::Agent, t0);
        c.leg_ended("quiet", Leg::Customer, t0);
        let a = c.tick(&live(&[]), t0 + Duration::from_secs(1));
        assert_eq!(finished_calls(&a), ["quiet"]);
        assert!(matches!(&a.last(), Some(Action::Finished(f)) if f.utterances == 0));
        // A spooled call that came and went between two ticks: known only by its legs' ends.
        c.leg_ended("brief", Leg::Customer, t0);
        assert_eq!(finished_calls(&c.tick(&live(&[]), t0 + Duration::from_secs(2))), ["brief"]);
    }

    #[test]
    fn a_leg_that_never_reports_its_end_is_given_the_grace_period() {
        let t0 = Instant::now();
        let mut c = core();
        c.utterance(heard("c2", Leg::Customer, 0.0, "喂", Some(t0)), t0);
        c.tick(&live(&[("c2", &[Leg::Customer, Leg::Agent])]), t0 + Duration::from_secs(1));
        c.leg_ended("c2", Leg::Customer, t0);
        let gone = t0 + Duration::from_secs(5);
        assert!(finished_calls(&c.tick(&live(&[]), gone)).is_empty(), "the agent leg has not ended");
        assert!(finished_calls(&c.tick(&live(&[]), gone + FINISH_GRACE - Duration::from_secs(1))).is_empty());
        assert_eq!(finished_calls(&c.tick(&live(&[]), gone + FINISH_GRACE)), ["c2"]);
    }

    #[test]
    fn utterances_mask_first_and_raise_events_and_tags() {
        let t0 = Instant::now();
        let mut c = core();
        let a =
            c.utterance(heard("c3", Leg::Customer, 1.0, "我的手机号是13800138000，以后别再给我打电话了", Some(t0)), t0);
        // The call's record begins before anything else of it.
        assert!(matches!(&a[0], Action::Began { call, .. } if call == "c3"), "{a:?}");
        let Action::Utterance { view, .. } = &a[1] else { panic!("{a:?}") };
        assert!(!view.text.contains("13800138000") && view.text.contains("[手机号]"), "{}", view.text);
        assert!(events(&a).contains(&"dnc_request".to_owned()), "{a:?}");
        // Every rule that fired is handed over to be kept, with its severity and evidence.
        let kept: Vec<&str> = a
            .iter()
            .filter_map(|x| match x {
                Action::Hits { hits, .. } => Some(hits.iter().map(|h| h.rule.as_str())),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            !kept.is_empty()
                && a.iter().any(|x| matches!(x, Action::Hits { hits, at_secs, .. }
            if hits.iter().all(|h| h.utterances == [0]) && *at_secs == 2.0)),
            "{a:?}"
        );
        let d = c.utterance(heard("c3", Leg::Customer, 3.0, "太贵了，我的预算不够", None), t0);
        assert!(!d.iter().any(|x| matches!(x, Action::Began { .. })), "Began comes once: {d:?}");
        assert!(
            d.iter().any(|x| matches!(x, Action::StoreTags { tags, .. } if tags.contains(&Tag::PriceSensitive))),
            "{d:?}"
        );
    }

    #[test]
    fn call_times_run_on_the_monotonic_clock_from_the_calls_start() {
        // A call that started 100 s before its first utterance is 100 s old at that moment,
        // whatever the wall clock says; finishing reports it from that base.
        let t0 = Instant::now();
        let mut c = core();
        c.utterance(heard("c4", Leg::Agent, 99.0, "您好", Some(t0)), t0 + Duration::from_secs(100));
        assert_eq!(c.calls.get("c4").map(|call| call.secs(t0 + Duration::from_secs(100))), Some(100.0));
        let started_later = Instant::now() + Duration::from_secs(3600);
        c.utterance(heard("c5", Leg::Agent, 0.0, "您好", None), started_later);
        assert_eq!(c.calls.get("c5").map(|call| call.secs(started_later)), Some(0.0));
    }

    #[test]
    fn shutdown_finishes_every_open_call() {
        let t0 = Instant::now();
        let mut c = core();
        c.utterance(heard("a", Leg::Agent, 0.0, "您好", Some(t0)), t0);
        c.utterance(heard("b", Leg::Customer, 0.0, "喂", Some(t0)), t0);
        assert_eq!(finished_calls(&c.finish_all(t0 + Duration::from_secs(5))), ["a", "b"]);
        assert_eq!(c.calls_in_progress(), 0);
    }
}
