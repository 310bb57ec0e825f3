//! Live calls: legs from any input paired into calls by call id, sans-IO.
//!
//! Inputs report leg events; the table decides admission (a cap on concurrent
//! calls, one stream per leg), pairs legs, and says when a call starts and
//! ends. It holds counters only, no audio: the speech pipeline attaches per
//! leg beside it. `registry` is the shared, locked handle inputs use (the shell).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::audio::Leg;

pub mod capacity;
pub mod registry;

/// Longest call id accepted from outside (a sidecar, the control socket).
pub const MAX_CALL_ID_CHARS: usize = 128;

/// The one rule for call ids from outside: 1–128 characters, none of them a control
/// or bidi character (an id is logged and shown to technicians).
pub fn check_call_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.chars().count() > MAX_CALL_ID_CHARS || !crate::escape::is_printable(id) {
        return Err(format!("a call id has 1–{MAX_CALL_ID_CHARS} printable characters"));
    }
    Ok(())
}

/// A moment as the shell read it: wall time for the stamps people read (a call's start),
/// monotonic time for durations, which an NTP step must not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub wall: SystemTime,
    pub mono: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegEvent {
    LegOpened {
        call: String,
        leg: Leg,
        source: String,
    },
    /// Audio arrived: `samples` at `sample_rate` since the last report.
    Audio {
        call: String,
        leg: Leg,
        samples: u64,
        sample_rate: u32,
    },
    Dtmf {
        call: String,
        leg: Leg,
        digit: char,
    },
    LegClosed {
        call: String,
        leg: Leg,
        reason: String,
    },
}

/// Why a leg was not admitted (the input hangs up with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("call {call} already has an open {leg:?} leg")]
    LegAlreadyOpen { call: String, leg: Leg },
    /// `why` says where the limit comes from (the configured cap or the box's rating).
    #[error("at capacity: {max_calls} concurrent calls ({why})")]
    AtCapacity { max_calls: usize, why: String },
    /// The data directory is nearly full: new calls are refused so the store never has to
    /// refuse the utterances of calls it took; calls in progress go on.
    #[error("refusing new calls: {reason}")]
    DiskFull { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallAction {
    Started { call: String },
    Ended { call: String, summary: CallSummary },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegSummary {
    pub leg: Leg,
    pub source: String,
    pub open: bool,
    pub audio_ms: u64,
    pub dtmf: String,
    pub closed_because: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSummary {
    pub call: String,
    pub started_at_unix_ms: u64,
    pub legs: Vec<LegSummary>,
}

#[derive(Debug)]
struct LegState {
    source: String,
    open: bool,
    /// Audio received, in microseconds (rates differ between legs).
    audio_us: u64,
    dtmf: String,
    closed_because: Option<String>,
}

#[derive(Debug)]
struct CallEntry {
    started_at: SystemTime,
    started: Instant,
    legs: BTreeMap<Leg, LegState>,
}

/// Longest DTMF history kept per leg.
const MAX_DTMF: usize = 64;

#[derive(Debug)]
pub struct CallTable {
    /// Why new calls are refused for now (the data directory is nearly full).
    refusing: Option<String>,
    /// How many calls at once, and why that many (for the hang-up reason and `status`).
    limit: capacity::CallLimit,
    calls: BTreeMap<String, CallEntry>,
    pub total_started: u64,
    pub total_refused: u64,
    /// Of those, refused because the limit was reached.
    pub refused_at_capacity: u64,
}

impl CallTable {
    pub fn new(max_calls: usize) -> Self {
        Self {
            limit: capacity::CallLimit {
                max_calls,
                source: "calls.max_concurrent".into(),
                warning: None,
                rating: None,
            },
            calls: BTreeMap::new(),
            total_started: 0,
            total_refused: 0,
            refused_at_capacity: 0,
            refusing: None,
        }
    }

    /// New calls are refused with `reason` until this is given None (legs of calls already
    /// admitted still open).
    pub fn refuse_new_calls(&mut self, reason: Option<String>) {
        self.refusing = reason;
    }

    /// The limit on simultaneous calls from now on; calls already taken are never cut.
    pub fn set_limit(&mut self, limit: capacity::CallLimit) {
        self.limit = limit;
    }

    pub fn limit(&self) -> &capacity::CallLimit {
        &self.limit
    }

    pub fn active(&self) -> usize {
        self.calls.len()
    }

    /// Whether a new leg may open: asked before `LegOpened`, so an input can
    /// refuse (hang up) a stream the table will not take.
    pub fn admit(&mut self, call: &str, leg: Leg) -> Admission {
        let refusal = match self.calls.get(call) {
            Some(state) if state.legs.get(&leg).is_some_and(|l| l.open) => {
                Some(Refusal::LegAlreadyOpen { call: call.to_owned(), leg })
            }
            Some(_) => None,
            None if self.calls.len() >= self.limit.max_calls => {
                self.refused_at_capacity += 1;
                Some(Refusal::AtCapacity { max_calls: self.limit.max_calls, why: self.limit.source.clone() })
            }
            None if self.refusing.is_some() => {
                Some(Refusal::DiskFull { reason: self.refusing.clone().unwrap_or_default() })
            }
            None => None,
        };
        match refusal {
            Some(reason) => {
                self.total_refused += 1;
                Admission::Refused(reason)
            }
            None => Admission::Admitted,
        }
    }

    pub fn handle(&mut self, event: LegEvent, now: Stamp) -> Vec<CallAction> {
        match event {
            LegEvent::LegOpened { call, leg, source } => {
                let mut actions = vec![];
                let state = self.calls.entry(call.clone()).or_insert_with(|| {
                    actions.push(CallAction::Started { call: call.clone() });
                    CallEntry { started_at: now.wall, started: now.mono, legs: BTreeMap::new() }
                });
                if !actions.is_empty() {
                    self.total_started += 1;
                }
                state.legs.insert(
                    leg,
                    LegState { source, open: true, audio_us: 0, dtmf: String::new(), closed_because: None },
                );
                actions
            }
            LegEvent::Audio { call, leg, samples, sample_rate } => {
                self.add_audio(&call, leg, samples, sample_rate);
                vec![]
            }
            LegEvent::Dtmf { call, leg, digit } => {
                self.add_dtmf(&call, leg, digit);
                vec![]
            }
            LegEvent::LegClosed { call, leg, reason } => {
                if let Some(l) = self.leg_mut(&call, leg) {
                    l.open = false;
                    l.closed_because = Some(reason);
                }
                let all_closed = self.calls.get(&call).is_some_and(|c| c.legs.values().all(|l| !l.open));
                match (all_closed, self.calls.get(&call)) {
                    (true, Some(_)) => {
                        let summary = self.summary(&call);
                        self.calls.remove(&call);
                        summary.map(|summary| vec![CallAction::Ended { call, summary }]).unwrap_or_default()
                    }
                    _ => vec![],
                }
            }
        }
    }

    fn add_audio(&mut self, call: &str, leg: Leg, samples: u64, sample_rate: u32) {
        if let Some(l) = self.leg_mut(call, leg) {
            l.audio_us += samples * 1_000_000 / u64::from(sample_rate.max(1));
        }
    }

    fn add_dtmf(&mut self, call: &str, leg: Leg, digit: char) {
        if let Some(l) = self.leg_mut(call, leg) {
            if l.dtmf.len() < MAX_DTMF {
                l.dtmf.push(digit);
            }
        }
    }

    fn leg_mut(&mut self, call: &str, leg: Leg) -> Option<&mut LegState> {
        self.calls.get_mut(call).and_then(|c| c.legs.get_mut(&leg))
    }

    pub fn summary(&self, call: &str) -> Option<CallSummary> {
        let state = self.calls.get(call)?;
        Some(CallSummary {
            call: call.to_owned(),
            started_at_unix_ms: state
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
            legs: state
                .legs
                .iter()
                .map(|(leg, l)| LegSummary {
                    leg: *leg,
                    source: l.source.clone(),
                    open: l.open,
                    audio_ms: l.audio_us / 1000,
                    dtmf: l.dtmf.clone(),
                    closed_because: l.closed_because.clone(),
                })
                .collect(),
        })
    }

    /// When a live call started, on the monotonic clock.
    pub fn started(&self, call: &str) -> Option<Instant> {
        self.calls.get(call).map(|c| c.started)
    }

    pub fn snapshot(&self) -> Vec<CallSummary> {
        self.calls.keys().filter_map(|c| self.summary(c)).collect()
    }
}

/// Live calls for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallsReport {
    pub active: Vec<CallSummary>,
    pub total_started: u64,
    pub total_refused: u64,
    pub refused_at_capacity: u64,
    pub max_calls: usize,
    pub limit_source: String,
    pub limit_warning: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(call: &str, leg: Leg) -> LegEvent {
        LegEvent::LegOpened { call: call.into(), leg, source: "test".into() }
    }

    fn closed(call: &str, leg: Leg) -> LegEvent {
        LegEvent::LegClosed { call: call.into(), leg, reason: "hangup".into() }
    }

    #[test]
    fn two_legs_pair_into_one_call_that_ends_when_both_close() {
        let now = Stamp { wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1000), mono: Instant::now() };
        let mut t = CallTable::new(8);
        assert_eq!(t.handle(opened("c1", Leg::Customer), now), vec![CallAction::Started { call: "c1".into() }]);
        assert_eq!(t.handle(opened("c1", Leg::Agent), now), vec![]);
        t.handle(LegEvent::Audio { call: "c1".into(), leg: Leg::Customer, samples: 16_000, sample_rate: 8000 }, now);
        t.handle(LegEvent::Dtmf { call: "c1".into(), leg: Leg::Customer, digit: '7' }, now);
        assert_eq!(t.handle(closed("c1", Leg::Customer), now), vec![]);
        assert_eq!(t.active(), 1);
        let ended = t.handle(closed("c1", Leg::Agent), now);
        let [CallAction::Ended { summary, .. }] = ended.as_slice() else { panic!("{ended:?}") };
        let customer = summary.legs.iter().find(|l| l.leg == Leg::Customer).unwrap();
        assert_eq!((customer.audio_ms, customer.dtmf.as_str()), (2000, "7"));
        assert_eq!(summary.started_at_unix_ms, 1_000_000);
        assert_eq!(t.active(), 0);
        assert_eq!(t.total_started, 1);
    }

    #[test]
    fn admission_caps_concurrent_calls_and_duplicate_legs() {
        let now = Stamp { wall: SystemTime::now(), mono: Instant::now() };
        let mut t = CallTable::new(1);
        assert_eq!(t.admit("a", Leg::Customer), Admission::Admitted);
        t.handle(opened("a", Leg::Customer), now);
        assert!(matches!(t.admit("a", Leg::Customer), Admission::Refused(Refusal::LegAlreadyOpen { .. })));
        assert_eq!(t.admit("a", Leg::Agent), Admission::Admitted, "the other leg of an admitted call is welcome");
        assert!(matches!(t.admit("b", Leg::Customer), Admission::Refused(Refusal::AtCapacity { max_calls: 1, .. })));
        assert_eq!(t.total_refused, 2);
        t.handle(closed("a", Leg::Customer), now);
        assert_eq!(t.admit("b", Leg::Customer), Admission::Admitted);
    }

    #[test]
    fn a_nearly_full_disk_refuses_new_calls_but_not_the_legs_of_admitted_ones() {
        let now = Stamp { wall: SystemTime::now(), mono: Instant::now() };
        let mut t = CallTable::new(8);
        t.handle(opened("a", Leg::Customer), now);
        t.refuse_new_calls(Some("only 10 MiB free".into()));
        assert!(
            matches!(t.admit("b", Leg::Customer), Admission::Refused(Refusal::DiskFull { reason }) if reason == "only 10 MiB free")
        );
        assert_eq!(t.admit("a", Leg::Agent), Admission::Admitted, "a call in progress is never cut short");
        t.refuse_new_calls(None);
        assert_eq!(t.admit("b", Leg::Customer), Admission::Admitted);
    }

    #[test]
    fn events_for_unknown_calls_are_ignored() {
        let mut t = CallTable::new(4);
        let now = Stamp { wall: SystemTime::now(), mono: Instant::now() };
        assert!(t.handle(closed("ghost", Leg::Agent), now).is_empty());
        assert!(t
            .handle(LegEvent::Audio { call: "ghost".into(), leg: Leg::Agent, samples: 1, sample_rate: 8000 }, now)
            .is_empty());
        assert_eq!(t.active(), 0);
    }
}
