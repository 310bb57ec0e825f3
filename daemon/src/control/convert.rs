//! The one boundary where the daemon's internal types become the control protocol's own
//! wire types. A field renamed in a core stops the build here instead of silently
//! changing protocol v1; `protocol`'s round-trip tests pin the wire side.

use serde::Serialize;

use super::protocol as wire;
use crate::calls;
use crate::config;
use crate::customers;
use crate::health;
use crate::understanding::call::{CallEvent, UtteranceView};
use crate::understanding::live::{Monitor, UtteranceLatency};

/// The serde name of a unit enum value (`Leg::Customer` → "customer"), the same name the
/// core's own `Serialize` gives it; "-" if it is not a plain name.
fn name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "-".to_owned(),
    }
}

impl From<health::HealthState> for wire::HealthState {
    fn from(state: health::HealthState) -> Self {
        match state {
            health::HealthState::Starting => Self::Starting,
            health::HealthState::Ok => Self::Ok,
            health::HealthState::Degraded => Self::Degraded,
            health::HealthState::Failed => Self::Failed,
            health::HealthState::Stopped => Self::Stopped,
        }
    }
}

impl From<health::ComponentHealth> for wire::ComponentHealth {
    fn from(c: health::ComponentHealth) -> Self {
        Self { name: c.name, state: c.state.into(), detail: c.detail, since: crate::logging::utc_timestamp(c.since) }
    }
}

impl From<config::ConfigSource> for wire::ConfigSource {
    fn from(source: config::ConfigSource) -> Self {
        match source {
            config::ConfigSource::File { path } => Self::File { path },
            config::ConfigSource::Defaults { path, reason } => Self::Defaults { path, reason },
        }
    }
}

impl From<config::ReloadReport> for wire::ReloadReport {
    fn from(r: config::ReloadReport) -> Self {
        Self {
            at: r.at,
            ok: r.ok,
            generation: r.generation,
            problems: r.problems,
            restart_required: r.restart_required,
        }
    }
}

impl From<calls::CallsReport> for wire::CallsReport {
    fn from(r: calls::CallsReport) -> Self {
        Self {
            active: r.active.into_iter().map(Into::into).collect(),
            total_started: r.total_started,
            total_refused: r.total_refused,
            refused_at_capacity: r.refused_at_capacity,
            max_calls: r.max_calls,
            limit_source: r.limit_source,
            limit_warning: r.limit_warning,
        }
    }
}

impl From<calls::CallSummary> for wire::CallSummary {
    fn from(s: calls::CallSummary) -> Self {
        let legs = s
            .legs
            .into_iter()
            .map(|l| wire::LegSummary {
                leg: l.leg.name().to_owned(),
                source: l.source,
                open: l.open,
                audio_ms: l.audio_ms,
                dtmf: l.dtmf,
                closed_because: l.closed_because,
            })
            .collect();
        Self { call: s.call, started_at_unix_ms: s.started_at_unix_ms, legs }
    }
}

impl From<customers::CustomerRecord> for wire::CustomerRecord {
    fn from(c: customers::CustomerRecord) -> Self {
        let tags = c
            .tags
            .into_iter()
            .map(|t| wire::TagRecord {
                tag: t.tag,
                first_unix_ms: t.first_unix_ms,
                last_unix_ms: t.last_unix_ms,
                calls: t.calls,
            })
            .collect();
        Self {
            customer: c.customer,
            first_unix_ms: c.first_unix_ms,
            last_unix_ms: c.last_unix_ms,
            calls: c.calls,
            tags,
        }
    }
}

/// An understood utterance of `call`, as watchers see it (also `analyze`'s output), with
/// where its time went when it comes from a live call.
pub fn utterance_item(call: &str, u: &UtteranceView, latency: Option<&UtteranceLatency>) -> wire::UtteranceItem {
    wire::UtteranceItem {
        call: call.to_owned(),
        index: u.index,
        leg: u.leg.name().to_owned(),
        start_secs: u.start_secs,
        end_secs: u.end_secs,
        text: u.text.clone(),
        pii: u.pii.iter().map(name_of).collect(),
        intent: u.intent.as_ref().map(|c| wire::IntentItem {
            label: c.label.clone(),
            confidence: c.confidence,
            top3: c.top3.iter().map(|s| wire::ScoredLabel { label: s.label.clone(), p: s.p }).collect(),
            labels: c.labels.clone(),
        }),
        emotion: u.emotion.map(|e| e.name().to_owned()),
        phase: name_of(&u.phase),
        rules: u.rules.clone(),
        latency: latency.map(|l| wire::LatencyItem {
            hangover_ms: l.hangover_ms,
            after_close_ms: l.after_close_ms,
            asr_queue_ms: l.asr_queue_ms,
            asr_worker_ms: l.asr_worker_ms,
            encoder_ms: l.encoder_ms,
            understanding_ms: l.understanding_ms,
        }),
    }
}

/// A call's event, as watchers see it.
pub fn event_item(call: &str, e: &CallEvent) -> wire::EventItem {
    wire::EventItem {
        call: call.to_owned(),
        kind: e.kind.clone(),
        rule: e.rule.clone(),
        reason: e.reason.clone(),
        at_secs: e.at_secs,
        utterances: e.utterances.clone(),
    }
}

impl From<&Monitor> for wire::MonitorItem {
    fn from(item: &Monitor) -> Self {
        match item {
            Monitor::Utterance { call, utterance, latency } => {
                Self::Utterance(utterance_item(call, utterance, latency.as_ref()))
            }
            Monitor::Event(live) => Self::Event(event_item(&live.call, &live.event)),
            Monitor::CallFinished { call, utterances, rule_hits, events, phase, tags, customer } => {
                Self::CallFinished(wire::CallFinishedItem {
                    call: call.clone(),
                    utterances: *utterances,
                    rule_hits: *rule_hits,
                    events: *events,
                    phase: name_of(phase),
                    tags: tags.iter().map(|t| t.name().to_owned()).collect(),
                    customer: customer.clone().map(Into::into),
                })
            }
        }
    }
}

impl From<crate::store::StoredHit> for wire::StoredHitItem {
    fn from(h: crate::store::StoredHit) -> Self {
        Self {
            rule: h.rule,
            severity: h.severity,
            event: h.event,
            reason: h.reason,
            at_secs: h.at_secs,
            utterances: h.utterances,
        }
    }
}

impl From<crate::store::CallSummary> for wire::StoredCallItem {
    fn from(c: crate::store::CallSummary) -> Self {
        Self {
            call: c.id,
            source: c.source,
            line: c.line,
            started_unix_ms: c.started_unix_ms,
            ended_unix_ms: c.ended_unix_ms,
            status: c.status,
            agent: c.agent,
            campaign: c.campaign,
            script: c.script,
            customer: c.customer,
            utterances: c.utterances,
            phase: c.phase,
            tags: c.tags,
            converted: c.converted,
            intents: c.intents,
            rule_hits: c.rule_hits.into_iter().map(Into::into).collect(),
            shredded: c.shredded,
            audio_secs: c.audio_secs,
        }
    }
}

impl From<crate::store::CallTranscript> for wire::StoredCallReply {
    fn from(t: crate::store::CallTranscript) -> Self {
        let mut unmasked: std::collections::BTreeMap<u64, String> = t.unmasked.into_iter().collect();
        let utterances = t
            .utterances
            .into_iter()
            .map(|u| wire::StoredUtteranceItem {
                unmasked: unmasked.remove(&u.index),
                index: u.index,
                leg: u.leg,
                start_secs: u.start_secs,
                end_secs: u.end_secs,
                text: u.text,
                intents: u.intents,
                emotion: u.emotion,
                phase: u.phase,
            })
            .collect();
        Self { call: t.call.into(), utterances }
    }
}

impl From<crate::store::audit::AuditEntry> for wire::AuditItem {
    fn from(e: crate::store::audit::AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at_unix_ms: e.event.at_unix_ms,
            uid: e.event.uid,
            role: e.event.role,
            action: e.event.action,
            object: e.event.object,
            outcome: e.event.outcome,
            hash: e.hash,
        }
    }
}

/// The store's own figures and the store thread's counters.
pub fn store_stats(s: crate::store::StoreStats, c: crate::store::live::VaultCounters) -> wire::StoreStatsReply {
    let (last_sweep_unix_ms, last_sweep) = match c.last_sweep {
        Some((at, what)) => (Some(at), Some(what)),
        None => (None, None),
    };
    wire::StoreStatsReply {
        calls: s.calls,
        open: s.open,
        finished: s.finished,
        interrupted: s.interrupted,
        forgotten: s.forgotten,
        utterances: s.utterances,
        oldest_call_unix_ms: s.oldest_call_unix_ms,
        class_keys: s.class_keys,
        tombstones: s.tombstones,
        audit_entries: s.audit_entries,
        bytes: s.bytes,
        master_key: s.master_key,
        writes: c.written,
        writes_refused: c.failed,
        writes_waiting: c.waiting,
        audio_dropped: c.audio_dropped,
        audio_paused: c.audio_paused,
        last_sweep_unix_ms,
        last_sweep,
    }
}

/// The uplink's view as the wire has it.
pub fn hq_status(s: crate::uplink::link::UplinkStatus) -> wire::HqStatusReply {
    wire::HqStatusReply {
        connected: s.session.connected,
        broker: s.broker,
        last_error: s.last_error,
        last_ack_unix_ms: s.last_ack_unix_ms,
        in_flight: s.session.in_flight as u64,
        published: s.session.published,
        acked: s.session.acked,
        resent: s.session.resent,
        bad_acks: s.session.bad_acks,
        shed: s.shed,
        lanes: s
            .backlog
            .into_iter()
            .map(|l| wire::HqLane {
                lane: l.lane.name().into(),
                rows: l.rows,
                bytes: l.bytes,
                oldest_created_unix_ms: l.oldest_created_ms,
                next_seq: l.next_seq,
            })
            .collect(),
    }
}

pub fn hq_outbox(entries: Vec<crate::store::OutboxEntry>) -> wire::HqOutboxReply {
    wire::HqOutboxReply {
        entries: entries
            .into_iter()
            .map(|e| wire::HqOutboxEntry {
                id: e.id,
                lane: e.lane.name().into(),
                seq: e.seq,
                kind: e.kind,
                bytes: e.bytes,
                created_unix_ms: e.created_ms,
            })
            .collect(),
    }
}
