//! The understanding component, the shell around [`UnderstandingCore`]: it takes every
//! utterance from the speech bus, runs the text models on a blocking thread (never on an
//! async worker), feeds the core with the monotonic time, and performs the core's actions:
//! events and utterances logged with structured fields and published on the monitor bus
//! (`watch`, the demo, and the headquarters link next), tags and call ends sent to the
//! customer store's own thread, in order.
//!
//! Once a second it ticks the core with the registry's live calls (deadlines, the end of
//! calls). The speech path puts utterances on the call's time base (a leg that opens later
//! is offset by when its first audio came). The rule file is re-read when the running
//! configuration changes; an invalid one is logged and the rules in use are kept.
//!
//! Shutdown: this component stops in its own stage, after the speech service has joined
//! every leg's worker, so the bus holds every last utterance; it drains the bus, finishes
//! every call, and only then returns (the store closes after it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::call::{CallEvent, UtteranceFacts, UtteranceView};
use super::core::{Action, FinishedCall, HeardUtterance, UnderstandingCore};
use super::intent::TextClassifier;
use super::lexicon::{is_latin_script, SentimentLexicon};
use super::rules::{load_rules, RuleSet};
use super::state::{Phase, Tag};
use crate::audio::Leg;
use crate::calls::registry::CallRegistry;
use crate::config::RunningConfig;
use crate::customers::{CustomerRecord, Customers};
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::pii;
use crate::speech::live::{SpeechEvent, UtteranceEvent};
use crate::speech::pipeline::Utterance;
use crate::speech::prosody::Prosody;
use crate::speech::{ModelSet, SpeechError};
use crate::store::live::CallVault;
use crate::store::now_ms;
use crate::store::{CallEnd, CallInfo, CallStart, StoreOp, StoredHit, StoredUtterance};

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

/// Where an utterance's time went between the end of its words and its publication, ms:
/// the parts of the latency budget `bench capacity` and `bench soak` break down.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UtteranceLatency {
    /// Audio the VAD heard after the words before it closed the utterance.
    pub hangover_ms: f64,
    /// From the VAD's close to the publication: the ASR queue, the ASR, the text models
    /// and every hand-off between them.
    pub after_close_ms: f64,
    pub asr_queue_ms: f64,
    /// In an ASR worker (its own encoder and decoder steps, and the encoders of utterances
    /// that joined its batch meanwhile), and of that its own encoder.
    pub asr_worker_ms: f64,
    pub encoder_ms: f64,
    /// The text models (intent, sentiment).
    pub understanding_ms: f64,
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
        /// Where its time went after the last word (live calls: not replays).
        #[serde(skip_serializing_if = "Option::is_none")]
        latency: Option<UtteranceLatency>,
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
    /// Chinese text sentiment (a model trained on Chinese).
    pub sentiment: TextClassifier,
    /// English text sentiment (VADER's lexicon).
    pub sentiment_en: SentimentLexicon,
}

impl UnderstandingModels {
    pub fn load(dir: &std::path::Path) -> Result<Self, SpeechError> {
        let set = ModelSet::open(dir)?;
        Ok(Self {
            intent: TextClassifier::load(&set)?,
            sentiment: TextClassifier::load_sentiment(&set)?,
            sentiment_en: SentimentLexicon::load(&set)?,
        })
    }

    /// The models' view of one utterance: intent (customers only, read after the agent's
    /// last line `agent_line`) and text sentiment, both from the masked text, as it is stored.
    pub fn facts(
        &self,
        leg: Leg,
        text: &str,
        agent_line: &str,
        prosody: Option<Prosody>,
    ) -> Result<UtteranceFacts, SpeechError> {
        let masked = pii::mask(text).0;
        let intent = match leg {
            Leg::Customer => Some(self.intent.classify_in_context(&masked, agent_line)?),
            Leg::Agent => None,
        };
        let sentiment = if is_latin_script(&masked) {
            Some(self.sentiment_en.label(&masked).to_owned())
        } else {
            self.sentiment.classify(&masked)?.top3.first().map(|s| s.label.clone())
        };
        Ok(UtteranceFacts { intent, sentiment, prosody })
    }
}

/// The component's state: the core, the models, the buses and the store.
pub struct Understanding {
    core: UnderstandingCore,
    models: Arc<UnderstandingModels>,
    bus: broadcast::Sender<Arc<Monitor>>,
    /// Customer tags across calls; None where no store is kept.
    customers: Option<Customers>,
    /// The encrypted call store; None when `store.enabled` is off.
    vault: Option<CallVault>,
}

impl Understanding {
    pub fn new(
        models: UnderstandingModels,
        rules: RuleSet,
        customers: Option<Customers>,
        vault: Option<CallVault>,
    ) -> Self {
        let (bus, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        Self { core: UnderstandingCore::new(rules), models: Arc::new(models), bus, customers, vault }
    }

    /// The bus, for subscribers that come and go (control-socket watchers).
    pub fn bus(&self) -> broadcast::Sender<Arc<Monitor>> {
        self.bus.clone()
    }

    fn describe(&self) -> String {
        format!("{} rules; {} calls in progress", self.core.rules(), self.core.calls_in_progress())
    }

    /// One finished utterance: the text models off the async workers, then the core.
    async fn utterance(&mut self, u: &UtteranceEvent, registry: &CallRegistry) {
        let models = self.models.clone();
        let (leg, text, prosody) = (u.leg, u.utterance.text.clone(), Some(u.utterance.prosody.clone()));
        // Only a customer's reply is read in context; the agent's own lines need none.
        let agent_line = match leg {
            Leg::Customer => self.core.agent_line_before(&u.call, u.utterance.start_secs),
            Leg::Agent => String::new(),
        };
        let started = Instant::now();
        let computed = tokio::task::spawn_blocking(move || models.facts(leg, &text, &agent_line, prosody)).await;
        let understanding_ms = started.elapsed().as_secs_f64() * 1000.0;
        let facts = computed.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
        let facts = facts.unwrap_or_else(|why| {
            // The rules still run on the text; only intent and emotion are missing.
            log::error!(component = COMPONENT, call_id = u.call.as_str(); "text models failed: {why}");
            UtteranceFacts { prosody: Some(u.utterance.prosody.clone()), ..Default::default() }
        });
        let heard = HeardUtterance {
            call: u.call.clone(),
            leg: u.leg,
            start_secs: u.utterance.start_secs,
            end_secs: u.utterance.end_secs,
            text: u.utterance.text.clone(),
            facts,
            call_started: registry.started(&u.call),
        };
        let actions = self.core.utterance(heard, Instant::now());
        // The raw text goes to the store only to be sealed, and only when configured.
        let extras = StoreExtras {
            unmasked: self.vault.as_ref().filter(|v| v.keep_unmasked()).map(|_| u.utterance.text.as_str()),
            understanding_ms: Some(understanding_ms),
            heard: Some(&u.utterance),
        };
        self.perform(actions, registry, &extras).await;
    }

    async fn tick(&mut self, registry: &CallRegistry) {
        let live: BTreeMap<String, Vec<Leg>> = registry
            .snapshot()
            .active
            .into_iter()
            .map(|c| (c.call, c.legs.into_iter().map(|l| l.leg).collect()))
            .collect();
        let actions = self.core.tick(&live, Instant::now());
        self.perform(actions, registry, &StoreExtras::default()).await;
    }

    /// Queues a write for the call store (waiting while its queue is full); a store that
    /// is closed is logged and the call goes on.
    async fn store(&self, op: StoreOp) {
        let Some(vault) = &self.vault else { return };
        let call = op.call().to_owned();
        if let Err(e) = vault.write(op).await {
            log::error!(component = COMPONENT, call_id = call.as_str(); "not stored: {e}");
        }
    }

    /// `unmasked`: the raw text of the utterance these actions come from, when kept.
    async fn perform(&self, actions: Vec<Action>, registry: &CallRegistry, extras: &StoreExtras<'_>) {
        for action in actions {
            match action {
                Action::Began { call, age } => {
                    if self.vault.is_some() {
                        self.store(StoreOp::Begin(call_start(&call, age, registry))).await;
                    }
                }
                Action::Hits { call, hits, at_secs } => {
                    let hits = hits
                        .into_iter()
                        .map(|h| StoredHit {
                            rule: h.rule,
                            severity: name_of(&h.severity),
                            event: h.event,
                            reason: h.reason,
                            at_secs,
                            utterances: h.utterances,
                        })
                        .collect();
                    self.store(StoreOp::Hits { call, hits }).await;
                }
                Action::Utterance { call, view } => {
                    if self.vault.is_some() {
                        let stored = stored_utterance(&view, extras);
                        self.store(StoreOp::Append { call: call.clone(), utterances: vec![stored] }).await;
                    }
                    let intent = view.intent.as_ref().map(|c| c.label.as_str()).unwrap_or("-");
                    let emotion = view.emotion.map(|e| e.name()).unwrap_or("-");
                    log::info!(component = COMPONENT, call_id = call.as_str(), leg = view.leg.name();
                        "{} utterance {}: intent {intent}, emotion {emotion}{}", view.leg.name(), view.index,
                        if view.rules.is_empty() { String::new() } else { format!(", rules {}", view.rules.join(", ")) });
                    let latency = extras.heard.map(|heard| UtteranceLatency {
                        hangover_ms: heard.hangover_ms,
                        after_close_ms: heard.closed.elapsed().as_secs_f64() * 1000.0,
                        asr_queue_ms: heard.asr_queue_ms,
                        asr_worker_ms: heard.asr_worker_ms,
                        encoder_ms: heard.asr.encoder_ms,
                        understanding_ms: extras.understanding_ms.unwrap_or(0.0),
                    });
                    let _ = self.bus.send(Arc::new(Monitor::Utterance { call, utterance: view, latency }));
                }
                Action::Event { call, event } => {
                    log::warn!(component = COMPONENT, call_id = call.as_str(), event = event.kind.as_str(), rule = event.rule.as_str();
                        "EVENT {} at {:.1} s: {} (utterances {:?})", event.kind, event.at_secs, event.reason, event.utterances);
                    // Nobody subscribed yet is fine: the headquarters link will.
                    let _ = self.bus.send(Arc::new(Monitor::Event(LiveEvent { call, event })));
                }
                Action::StoreTags { call, tags } => {
                    let Some(customers) = &self.customers else { continue };
                    let names: Vec<&'static str> = tags.iter().map(|t| t.name()).collect();
                    // A store that cannot write is logged; the call goes on.
                    if let Err(e) = customers.add_call_tags(&call, &names).await {
                        log::error!(component = COMPONENT, call_id = call.as_str(); "customer tags {names:?} not kept: {e}");
                    }
                }
                Action::Finished(finished) => self.finished(finished).await,
            }
        }
    }

    async fn finished(&self, f: FinishedCall) {
        let customer = match &self.customers {
            Some(c) => c
                .of_call(&f.call)
                .await
                .map_err(
                    |e| log::error!(component = COMPONENT, call_id = f.call.as_str(); "customer lookup failed: {e}"),
                )
                .ok()
                .flatten(),
            None => None,
        };
        let tags: Vec<&str> = f.tags.iter().map(|t| t.name()).collect();
        if self.vault.is_some() {
            if let Some(c) = &customer {
                let info = CallInfo { customer: Some(c.customer.clone()), ..Default::default() };
                self.store(StoreOp::Describe { call: f.call.clone(), info }).await;
            }
            let end = CallEnd {
                ended_unix_ms: now_ms(),
                phase: name_of(&f.phase),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                converted: false,
                rules_version: Some(self.core.rules_version().to_owned()),
            };
            self.store(StoreOp::Finish { call: f.call.clone(), end }).await;
        }
        log::info!(component = COMPONENT, call_id = f.call.as_str();
            "call understood: {} utterances, {} rule hits, {} events; phase {:?}; customer tags [{}]{}",
            f.utterances, f.rule_hits, f.events, f.phase, tags.join(", "),
            customer.as_ref().map_or(String::new(), |c| format!("; customer {} on call {}", c.customer, c.calls)));
        let _ = self.bus.send(Arc::new(Monitor::CallFinished {
            call: f.call,
            utterances: f.utterances,
            rule_hits: f.rule_hits,
            events: f.events,
            phase: f.phase,
            tags: f.tags,
            customer,
        }));
    }

    async fn speech_event(&mut self, event: &SpeechEvent, registry: &CallRegistry) {
        match event {
            SpeechEvent::Utterance(u) => self.utterance(u, registry).await,
            SpeechEvent::LegEnded { call, leg } => self.core.leg_ended(call, *leg, Instant::now()),
        }
    }
}

/// A serde enum's snake_case name.
fn name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "-".to_owned(),
    }
}

/// A call's record as it begins: where it came from (the input kind and line, never a
/// file name, which may carry a caller number) and when it started.
fn call_start(call: &str, age: Duration, registry: &CallRegistry) -> CallStart {
    let summary = registry.summary(call);
    let started_unix_ms = summary
        .as_ref()
        .map(|s| i64::try_from(s.started_at_unix_ms).unwrap_or(i64::MAX))
        .unwrap_or_else(|| now_ms() - i64::try_from(age.as_millis()).unwrap_or(0));
    let source = summary.as_ref().and_then(|s| s.legs.first()).map(|l| l.source.as_str()).unwrap_or("");
    let (source, line) = source_and_line(source);
    CallStart { id: call.to_owned(), source, line, started_unix_ms, ..Default::default() }
}

/// The registry's leg source ("alsa hw:1,0 line sales-3", "spool NAME", "10.0.0.5:40112")
/// as the store keeps it: the input kind, and the line or the peer's address.
fn source_and_line(source: &str) -> (String, String) {
    if let Some(rest) = source.strip_prefix("alsa ") {
        let line = rest.rsplit_once(" line ").map(|(_, l)| l).unwrap_or("");
        ("alsa".into(), line.into())
    } else if source.starts_with("spool") {
        ("spool".into(), String::new())
    } else if let Ok(peer) = source.parse::<std::net::SocketAddr>() {
        ("audiosocket".into(), peer.ip().to_string())
    } else {
        // Gone from the registry already (a spooled call says so itself, see CallInfo).
        ("unknown".into(), String::new())
    }
}

/// What the store keeps of an utterance beyond the core's view: the raw text (sealed,
/// only when configured) and the latencies (HQ's metrics).
#[derive(Default)]
struct StoreExtras<'a> {
    unmasked: Option<&'a str>,
    understanding_ms: Option<f64>,
    /// The speech path's utterance these actions come from (its ASR time and the
    /// latency's parts).
    heard: Option<&'a Utterance>,
}

fn stored_utterance(view: &UtteranceView, extras: &StoreExtras<'_>) -> StoredUtterance {
    let intents = view.intent.as_ref().map(|c| c.labels.clone()).unwrap_or_default();
    let confidence = view.intent.as_ref().map(|c| c.confidence);
    StoredUtterance {
        index: view.index as u64,
        leg: view.leg.name().to_owned(),
        start_secs: view.start_secs,
        end_secs: view.end_secs,
        text: view.text.clone(),
        unmasked: extras.unmasked.map(str::to_owned),
        asr_ms: extras.heard.map(|u| ((u.asr.encoder_ms + u.asr.decoder_ms) * 10.0).round() / 10.0),
        understanding_ms: extras.understanding_ms.map(|ms| (ms * 10.0).round() / 10.0),
        intents,
        emotion: view.emotion.map(|e| e.name().to_owned()),
        phase: Some(name_of(&view.phase)),
        facts: Some(serde_json::json!({
            "pii": view.pii.iter().map(name_of).collect::<Vec<_>>(),
            "rules": view.rules,
            "confidence": confidence,
        })),
    }
}

/// Runs until its shutdown stage: utterances in, events out, a tick a second; then drains
/// the bus and finishes every call.
pub async fn run(
    mut understanding: Understanding,
    mut speech: broadcast::Receiver<Arc<SpeechEvent>>,
    mut config: watch::Receiver<Arc<RunningConfig>>,
    registry: CallRegistry,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), std::io::Error> {
    health.set(COMPONENT, HealthState::Ok, understanding.describe());
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut rules_file = config.borrow().config.understanding.rules_file.clone();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            received = speech.recv() => match received {
                Ok(event) => understanding.speech_event(&event, &registry).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    log::error!(component = COMPONENT; "fell behind the speech path: {n} utterances not analysed");
                    health.set(COMPONENT, HealthState::Degraded, format!("{n} utterances not analysed (fell behind)"));
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = ticker.tick() => {
                understanding.tick(&registry).await;
                health.set(COMPONENT, HealthState::Ok, understanding.describe());
            }
            Ok(()) = config.changed() => {
                let wanted = config.borrow().config.understanding.rules_file.clone();
                match load_rules(wanted.as_deref()) {
                    Ok(rules) => {
                        log::info!(component = COMPONENT; "rules reloaded: {} rules (new calls use them)", rules.len());
                        understanding.core.set_rules(rules);
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
    // The speech stage has ended: every worker has published its last utterance. Take
    // what is still on the bus, then end every call so its required rules are judged.
    let mut drained = 0usize;
    loop {
        match speech.try_recv() {
            Ok(event) => {
                understanding.speech_event(&event, &registry).await;
                drained += 1;
            }
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                log::error!(component = COMPONENT; "fell behind the speech path at shutdown: {n} utterances not analysed");
            }
            Err(_) => break,
        }
    }
    let open = understanding.core.calls_in_progress();
    log::info!(component = COMPONENT; "stopping: {drained} speech events drained, {open} calls finished at shutdown");
    let actions = understanding.core.finish_all(Instant::now());
    understanding.perform(actions, &registry, &StoreExtras::default()).await;
    health.set(COMPONENT, HealthState::Stopped, "stopped");
    Ok(())
}
