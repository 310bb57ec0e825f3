//! The understanding component: every utterance on the speech bus goes through its call's
//! `CallUnderstanding` (PII masking, intent, sentiment + prosody → emotion, rules), and
//! events are logged with structured fields and published on the event bus (the MQTT link
//! will subscribe there).
//!
//! Once a second it ticks every call (required rules with a deadline). A call is finished
//! when the registry no longer has it and every leg it had has said its speech ended (the
//! last utterance of a leg can come a second or two after hang-up, when ASR finishes), or
//! [`FINISH_GRACE`] after it left the registry, whichever is first. Times are seconds from
//! the call's start in the registry; the speech path puts utterances on the same time base
//! (a leg that opens later is offset by when its first audio came). The rule file is re-read when the running
//! configuration changes; an invalid one is logged and the rules in use are kept.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::call::{CallEvent, CallUnderstanding, UtteranceFacts, UtteranceView, DEFAULT_RULES};
use super::intent::TextClassifier;
use super::pii;
use super::rules::{RuleSet, MAX_RULES_BYTES};
use super::state::{Phase, Tag};
use crate::audio::Leg;
use crate::calls::CallRegistry;
use crate::control::protocol::HealthState;
use crate::control::server::RunningConfig;
use crate::customers::{CustomerRecord, Customers};
use crate::health::{HealthBoard, ShutdownSignal};
use crate::speech::live::{SpeechEvent, UtteranceEvent};
use crate::speech::prosody::Prosody;
use crate::speech::{ModelSet, SpeechError};

const COMPONENT: &str = "understanding";
/// Events buffered for each subscriber; a slower one loses the oldest.
const EVENT_BUS_CAPACITY: usize = 1024;
/// Longest wait for a leg's last utterance after its call left the registry.
pub const FINISH_GRACE: Duration = Duration::from_secs(30);

/// An event of a live call, as published.
#[derive(Debug, Clone, Serialize)]
pub struct LiveEvent {
    pub call: String,
    #[serde(flatten)]
    pub event: CallEvent,
}

/// What the component publishes on its bus: every understood utterance (masked), every
/// event, and each call's end. `callbox watch` and the demo follow it through the control
/// socket; the headquarters link will take the events and the call ends from it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Monitor {
    Utterance {
        call: String,
        #[serde(flatten)]
        utterance: UtteranceView,
    },
    Event(LiveEvent),
    CallFinished {
        call: String,
        utterances: usize,
        rule_hits: usize,
        events: usize,
        phase: Phase,
        /// The customer's tags from this call.
        tags: Vec<Tag>,
        /// The customer across calls, when the call has a caller number.
        #[serde(skip_serializing_if = "Option::is_none")]
        customer: Option<CustomerRecord>,
    },
}

/// The models the component needs, loaded at start-up beside the speech models.
pub struct UnderstandingModels {
    pub intent: TextClassifier,
    pub sentiment: TextClassifier,
}

impl UnderstandingModels {
    pub fn load(dir: &std::path::Path) -> Result<Self, SpeechError> {
        let set = ModelSet::open(dir)?;
        Ok(Self { intent: TextClassifier::load(&set)?, sentiment: TextClassifier::load_sentiment(&set)? })
    }

    /// The models' view of one utterance: intent (customers only) and text sentiment, both
    /// read from the masked text, as it is stored.
    pub fn facts(&self, leg: Leg, text: &str, prosody: Option<Prosody>) -> Result<UtteranceFacts, SpeechError> {
        let masked = pii::mask(text).0;
        let intent = match leg {
            Leg::Customer => Some(self.intent.classify(&masked)?),
            Leg::Agent => None,
        };
        let sentiment = self.sentiment.classify(&masked)?.top3.first().map(|s| s.label.clone());
        Ok(UtteranceFacts { intent, sentiment, prosody })
    }
}

/// Reads a rule file (size-bounded before it is read), or the shipped rules when `None`.
/// Every problem comes back at once, each naming its rule.
pub fn load_rules(file: Option<&Path>) -> Result<RuleSet, Vec<String>> {
    let Some(path) = file else { return RuleSet::parse(DEFAULT_RULES) };
    let cannot = |e: std::io::Error| vec![format!("cannot read {}: {e}", path.display())];
    let size = std::fs::metadata(path).map_err(cannot)?.len();
    if size > MAX_RULES_BYTES as u64 {
        return Err(vec![format!(
            "{}: {size} bytes, more than the {MAX_RULES_BYTES} a rule file may have",
            path.display()
        )]);
    }
    RuleSet::parse(&std::fs::read_to_string(path).map_err(cannot)?)
}

struct LiveCall {
    understanding: CallUnderstanding,
    /// When the call started, from the registry (or the first utterance if already gone).
    started: SystemTime,
    /// Legs the call had (from the registry and the utterances) and legs whose speech ended.
    legs: BTreeSet<Leg>,
    ended_legs: BTreeSet<Leg>,
    /// When the registry was first seen without the call.
    gone_since: Option<SystemTime>,
}

pub struct Understanding {
    models: UnderstandingModels,
    rules: Arc<RuleSet>,
    calls: HashMap<String, LiveCall>,
    bus: broadcast::Sender<Arc<Monitor>>,
    /// Customer tags across calls; None in offline tools.
    customers: Option<Customers>,
}

impl Understanding {
    pub fn new(models: UnderstandingModels, rules: RuleSet, customers: Option<Customers>) -> Self {
        let (bus, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        Self { models, rules: Arc::new(rules), calls: HashMap::new(), bus, customers }
    }

    /// The bus, for subscribers that come and go (control-socket watchers).
    pub fn bus(&self) -> broadcast::Sender<Arc<Monitor>> {
        self.bus.clone()
    }

    /// One finished utterance; returns the events it raised (also logged and published).
    pub fn utterance(&mut self, u: &UtteranceEvent, registry: &CallRegistry) -> Vec<CallEvent> {
        let prosody = Some(u.utterance.prosody.clone());
        let facts = self.models.facts(u.leg, &u.utterance.text, prosody.clone()).unwrap_or_else(|e| {
            // The rules still run on the text; only intent and emotion are missing.
            log::error!(component = COMPONENT, call_id = u.call.as_str(); "text models failed: {e}");
            UtteranceFacts { prosody, ..Default::default() }
        });
        let rules = self.rules.clone();
        let call = self.calls.entry(u.call.clone()).or_insert_with(|| LiveCall {
            understanding: CallUnderstanding::new(rules),
            started: started_at(registry, &u.call).unwrap_or_else(SystemTime::now),
            legs: BTreeSet::new(),
            ended_legs: BTreeSet::new(),
            gone_since: None,
        });
        call.legs.insert(u.leg);
        let (start, end) = (u.utterance.start_secs, u.utterance.end_secs);
        let tags_before = call.understanding.state.tags.clone();
        let events = call.understanding.utterance(u.leg, start, end, &u.utterance.text, facts);
        let new_tags: Vec<Tag> = call.understanding.state.tags.difference(&tags_before).copied().collect();
        if let Some(view) = call.understanding.utterances.last() {
            let intent = view.intent.as_ref().map(|c| c.label.as_str()).unwrap_or("-");
            let emotion = view.emotion.map(|e| e.name()).unwrap_or("-");
            log::info!(component = COMPONENT, call_id = u.call.as_str(), leg = u.leg.name();
                "{} utterance {}: intent {intent}, emotion {emotion}{}", u.leg.name(), view.index,
                if view.rules.is_empty() { String::new() } else { format!(", rules {}", view.rules.join(", ")) });
            let _ = self.bus.send(Arc::new(Monitor::Utterance { call: u.call.clone(), utterance: view.clone() }));
        }
        self.record_tags(&u.call, &new_tags);
        self.publish(&u.call, &events);
        events
    }

    /// Keeps the tags a call raised (and so its customer's, once the caller is known). A
    /// store that cannot write is logged; the call goes on.
    fn record_tags(&self, call: &str, tags: &[Tag]) {
        let Some(customers) = &self.customers else { return };
        if tags.is_empty() {
            return;
        }
        let names: Vec<&str> = tags.iter().map(|t| t.name()).collect();
        if let Err(e) = customers.add_call_tags(call, &names) {
            log::error!(component = COMPONENT, call_id = call; "customer tags {names:?} not kept: {e}");
        }
    }

    /// A leg's speech is complete (its last utterance came before this).
    pub fn leg_ended(&mut self, call: &str, leg: Leg) {
        if let Some(c) = self.calls.get_mut(call) {
            c.ended_legs.insert(leg);
        }
    }

    /// Ticks live calls and finishes the ones whose speech is complete; returns those.
    pub fn tick(&mut self, registry: &CallRegistry, now: SystemTime) -> Vec<String> {
        let mut ended = Vec::new();
        let mut out = Vec::new();
        for (id, call) in &mut self.calls {
            let secs = now.duration_since(call.started).unwrap_or(Duration::ZERO).as_secs_f64();
            match registry.summary(id) {
                Some(summary) => {
                    call.legs.extend(summary.legs.iter().map(|l| l.leg));
                    out.push((id.clone(), call.understanding.tick(secs)));
                }
                None => {
                    let gone = *call.gone_since.get_or_insert(now);
                    let speech_done = call.legs.is_subset(&call.ended_legs);
                    if speech_done || now.duration_since(gone).unwrap_or(Duration::ZERO) >= FINISH_GRACE {
                        out.push((id.clone(), call.understanding.end(secs)));
                        ended.push(id.clone());
                    }
                }
            }
        }
        for (id, events) in out {
            self.publish(&id, &events);
        }
        for id in &ended {
            if let Some(call) = self.calls.remove(id) {
                self.finished(id, &call.understanding);
            }
        }
        ended
    }

    fn finished(&self, id: &str, u: &CallUnderstanding) {
        let tags: Vec<&str> = u.state.tags.iter().map(|t| t.name()).collect();
        let customer = self.customers.as_ref().and_then(|c| {
            c.of_call(id)
                .map_err(|e| log::error!(component = COMPONENT, call_id = id; "customer lookup failed: {e}"))
                .ok()
                .flatten()
        });
        log::info!(component = COMPONENT, call_id = id;
            "call understood: {} utterances, {} rule hits, {} events; phase {:?}; customer tags [{}]{}",
            u.utterances.len(), u.hits.len(), u.events.len(), u.state.phase, tags.join(", "),
            customer.as_ref().map_or(String::new(), |c| format!("; customer {} on call {}", c.customer, c.calls)));
        let _ = self.bus.send(Arc::new(Monitor::CallFinished {
            call: id.to_owned(),
            utterances: u.utterances.len(),
            rule_hits: u.hits.len(),
            events: u.events.len(),
            phase: u.state.phase,
            tags: u.state.tags.iter().copied().collect(),
            customer,
        }));
    }

    fn publish(&self, call: &str, events: &[CallEvent]) {
        for event in events.iter().cloned() {
            log::warn!(component = COMPONENT, call_id = call, event = event.kind.as_str(), rule = event.rule.as_str();
                "EVENT {} at {:.1} s: {} (utterances {:?})", event.kind, event.at_secs, event.reason, event.utterances);
            // Nobody subscribed yet is fine: the headquarters link will.
            let _ = self.bus.send(Arc::new(Monitor::Event(LiveEvent { call: call.to_owned(), event })));
        }
    }
}

fn started_at(registry: &CallRegistry, call: &str) -> Option<SystemTime> {
    registry.summary(call).map(|s| SystemTime::UNIX_EPOCH + Duration::from_millis(s.started_at_unix_ms))
}

/// Runs until shutdown: utterances in, events out, a tick a second.
pub async fn run(
    mut understanding: Understanding,
    mut speech: broadcast::Receiver<Arc<SpeechEvent>>,
    mut config: watch::Receiver<Arc<RunningConfig>>,
    registry: CallRegistry,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), std::io::Error> {
    let describe = |u: &Understanding| format!("{} rules; {} calls in progress", u.rules.len(), u.calls.len());
    health.set(COMPONENT, HealthState::Ok, describe(&understanding));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut rules_file = config.borrow().config.understanding.rules_file.clone();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            received = speech.recv() => match received {
                Ok(event) => match event.as_ref() {
                    SpeechEvent::Utterance(u) => {
                        understanding.utterance(u, &registry);
                    }
                    SpeechEvent::LegEnded { call, leg } => understanding.leg_ended(call, *leg),
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    log::error!(component = COMPONENT; "fell behind the speech path: {n} utterances not analysed");
                    health.set(COMPONENT, HealthState::Degraded, format!("{n} utterances not analysed (fell behind)"));
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = ticker.tick() => {
                understanding.tick(&registry, SystemTime::now());
                health.set(COMPONENT, HealthState::Ok, describe(&understanding));
            }
            Ok(()) = config.changed() => {
                let wanted = config.borrow().config.understanding.rules_file.clone();
                match load_rules(wanted.as_deref()) {
                    Ok(rules) => {
                        log::info!(component = COMPONENT; "rules reloaded: {} rules (new calls use them)", rules.len());
                        understanding.rules = Arc::new(rules);
                        rules_file = wanted;
                    }
                    Err(problems) => {
                        for p in &problems {
                            log::error!(component = COMPONENT; "rules not reloaded: {p}");
                        }
                        log::error!(component = COMPONENT; "keeping the rules from {}", rules_file.as_ref().map_or("the shipped set".into(), |f| f.display().to_string()));
                    }
                }
            }
        }
    }
    // Calls still open at shutdown are ended so their required rules are judged.
    let ids: Vec<String> = understanding.calls.keys().cloned().collect();
    for id in ids {
        if let Some(mut call) = understanding.calls.remove(&id) {
            let secs = SystemTime::now().duration_since(call.started).unwrap_or(Duration::ZERO).as_secs_f64();
            let events = call.understanding.end(secs);
            understanding.publish(&id, &events);
            understanding.finished(&id, &call.understanding);
        }
    }
    health.set(COMPONENT, HealthState::Stopped, "stopped");
    Ok(())
}
