//! The understanding component: every utterance on the speech bus goes through its call's
//! `CallUnderstanding` (PII masking, intent, sentiment + prosody → emotion, rules), and
//! events are logged with structured fields and published on the event bus (the MQTT link
//! will subscribe there).
//!
//! Once a second it ticks every call (required rules with a deadline) and ends the calls
//! the call registry no longer has. Times are seconds from the call's start in the
//! registry; utterance times are from their leg's start, which for live inputs is the
//! call's start within the legs' opening gap. The rule file is re-read when the running
//! configuration changes; an invalid one is logged and the rules in use are kept.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::call::{CallEvent, CallUnderstanding, UtteranceFacts, DEFAULT_RULES};
use super::intent::TextClassifier;
use super::pii;
use super::rules::RuleSet;
use crate::audio::Leg;
use crate::calls::CallRegistry;
use crate::control::protocol::HealthState;
use crate::control::server::RunningConfig;
use crate::health::{HealthBoard, ShutdownSignal};
use crate::speech::live::UtteranceEvent;
use crate::speech::{ModelSet, SpeechError};

const COMPONENT: &str = "understanding";
/// Events buffered for each subscriber; a slower one loses the oldest.
const EVENT_BUS_CAPACITY: usize = 1024;

/// An event of a live call, as published.
#[derive(Debug, Clone, Serialize)]
pub struct LiveEvent {
    pub call: String,
    #[serde(flatten)]
    pub event: CallEvent,
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
}

/// Reads the configured rule file, or the shipped rules.
pub fn load_rules(file: Option<&PathBuf>) -> Result<RuleSet, Vec<String>> {
    let text = match file {
        None => DEFAULT_RULES.to_owned(),
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?
        }
    };
    RuleSet::parse(&text)
}

struct LiveCall {
    understanding: CallUnderstanding,
    /// When the call started, from the registry (or the first utterance if already gone).
    started: SystemTime,
}

pub struct Understanding {
    models: UnderstandingModels,
    rules: Arc<RuleSet>,
    calls: HashMap<String, LiveCall>,
    events: broadcast::Sender<Arc<LiveEvent>>,
}

impl Understanding {
    pub fn new(models: UnderstandingModels, rules: RuleSet) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        Self { models, rules: Arc::new(rules), calls: HashMap::new(), events }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.events.subscribe()
    }

    fn utterance(&mut self, u: &UtteranceEvent, registry: &CallRegistry) {
        let masked = pii::mask(&u.utterance.text).0;
        let intent = match u.leg {
            Leg::Customer => self.models.intent.classify(&masked).ok(),
            Leg::Agent => None,
        };
        let sentiment =
            self.models.sentiment.classify(&masked).ok().and_then(|c| c.top3.first().map(|s| s.label.clone()));
        let facts = UtteranceFacts { intent, sentiment, prosody: Some(u.utterance.prosody.clone()) };
        let rules = self.rules.clone();
        let call = self.calls.entry(u.call.clone()).or_insert_with(|| LiveCall {
            understanding: CallUnderstanding::new(rules),
            started: started_at(registry, &u.call).unwrap_or_else(SystemTime::now),
        });
        let (start, end) = (u.utterance.start_secs, u.utterance.end_secs);
        let mut events = call.understanding.tick(start);
        events.extend(call.understanding.utterance(u.leg, start, end, &u.utterance.text, facts));
        if let Some(view) = call.understanding.utterances.last() {
            let intent = view.intent.as_ref().map(|c| c.label.as_str()).unwrap_or("-");
            let emotion = view.emotion.map(|e| e.name()).unwrap_or("-");
            log::info!(component = COMPONENT, call_id = u.call.as_str(), leg = u.leg.name();
                "{} utterance {}: intent {intent}, emotion {emotion}{}", u.leg.name(), view.index,
                if view.rules.is_empty() { String::new() } else { format!(", rules {}", view.rules.join(", ")) });
        }
        self.publish(&u.call, events);
    }

    /// Ticks live calls and ends the ones the registry no longer has.
    fn tick(&mut self, registry: &CallRegistry, now: SystemTime) {
        let mut ended = Vec::new();
        let mut out = Vec::new();
        for (id, call) in &mut self.calls {
            let secs = now.duration_since(call.started).unwrap_or(Duration::ZERO).as_secs_f64();
            if registry.summary(id).is_some() {
                out.push((id.clone(), call.understanding.tick(secs)));
            } else {
                out.push((id.clone(), call.understanding.end(secs)));
                ended.push(id.clone());
            }
        }
        for (id, events) in out {
            self.publish(&id, events);
        }
        for id in ended {
            if let Some(call) = self.calls.remove(&id) {
                let u = &call.understanding;
                log::info!(component = COMPONENT, call_id = id.as_str();
                    "call understood: {} utterances, {} rule hits, {} events", u.utterances.len(), u.hits.len(), u.events.len());
            }
        }
    }

    fn publish(&self, call: &str, events: Vec<CallEvent>) {
        for event in events {
            log::warn!(component = COMPONENT, call_id = call, event = event.kind.as_str(), rule = event.rule.as_str();
                "EVENT {} at {:.1} s: {} (utterances {:?})", event.kind, event.at_secs, event.reason, event.utterances);
            // Nobody subscribed yet is fine: the headquarters link will.
            let _ = self.events.send(Arc::new(LiveEvent { call: call.to_owned(), event }));
        }
    }
}

fn started_at(registry: &CallRegistry, call: &str) -> Option<SystemTime> {
    registry.summary(call).map(|s| SystemTime::UNIX_EPOCH + Duration::from_millis(s.started_at_unix_ms))
}

/// Runs until shutdown: utterances in, events out, a tick a second.
pub async fn run(
    mut understanding: Understanding,
    mut utterances: broadcast::Receiver<Arc<UtteranceEvent>>,
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
            received = utterances.recv() => match received {
                Ok(u) => understanding.utterance(&u, &registry),
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
                match load_rules(wanted.as_ref()) {
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
            understanding.publish(&id, events);
        }
    }
    health.set(COMPONENT, HealthState::Stopped, "stopped");
    Ok(())
}
