//! The shell around [`CallTable`]: one table behind a mutex, shared by the inputs (which
//! open legs through it) and by status and understanding (which read it). It reads the
//! clocks the table is fed with.

use std::time::{Instant, SystemTime};

use super::{Admission, CallAction, CallSummary, CallTable, CallsReport, LegEvent, Refusal, Stamp};
use crate::audio::Leg;

fn now() -> Stamp {
    Stamp { wall: SystemTime::now(), mono: Instant::now() }
}

/// The live call table shared by inputs (which open legs) and status (which
/// reads it). Short critical sections only; no IO under the lock.
#[derive(Clone)]
pub struct CallRegistry(std::sync::Arc<std::sync::Mutex<CallTable>>);

/// An open leg. Dropping it closes the leg, so a connection task that ends in
/// any way (error, panic, shutdown) cannot leave a call open.
pub struct LegGuard {
    registry: CallRegistry,
    call: String,
    leg: Leg,
    reason: Option<String>,
}

impl CallRegistry {
    pub fn new(max_calls: usize) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(CallTable::new(max_calls))))
    }

    fn with<R>(&self, f: impl FnOnce(&mut CallTable) -> R) -> R {
        // A panic while holding the lock leaves only counters behind: keep going.
        let mut table = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut table)
    }

    pub fn set_max_calls(&self, max_calls: usize) {
        self.with(|t| t.set_max_calls(max_calls));
    }

    /// New calls are refused with `reason` (the data directory is nearly full), or taken again.
    pub fn refuse_new_calls(&self, reason: Option<String>) {
        self.with(|t| t.refuse_new_calls(reason));
    }

    /// Admits and opens a leg in one step, or says why not.
    pub fn open(&self, call: &str, leg: Leg, source: &str) -> Result<LegGuard, Refusal> {
        let actions = self.with(|t| match t.admit(call, leg) {
            Admission::Refused(reason) => Err(reason),
            Admission::Admitted => {
                Ok(t.handle(LegEvent::LegOpened { call: call.to_owned(), leg, source: source.to_owned() }, now()))
            }
        })?;
        log_actions(&actions);
        log::info!(component = "calls", call_id = call; "{leg:?} leg opened from {source}");
        Ok(LegGuard { registry: self.clone(), call: call.to_owned(), leg, reason: None })
    }

    /// When a live call started, on the monotonic clock.
    pub fn started(&self, call: &str) -> Option<Instant> {
        self.with(|t| t.started(call))
    }

    /// One call's state, if it is live.
    pub fn summary(&self, call: &str) -> Option<CallSummary> {
        self.with(|t| t.summary(call))
    }

    pub fn snapshot(&self) -> CallsReport {
        self.with(|t| CallsReport {
            active: t.snapshot(),
            total_started: t.total_started,
            total_refused: t.total_refused,
        })
    }
}

fn log_actions(actions: &[CallAction]) {
    for action in actions {
        match action {
            CallAction::Started { call } => log::info!(component = "calls", call_id = call.as_str(); "call started"),
            CallAction::Ended { call, summary } => {
                let legs: Vec<String> =
                    summary.legs.iter().map(|l| format!("{:?} {} ms", l.leg, l.audio_ms).to_lowercase()).collect();
                log::info!(component = "calls", call_id = call.as_str(); "call ended ({})", legs.join(", "));
            }
        }
    }
}

impl LegGuard {
    pub fn call(&self) -> &str {
        &self.call
    }

    pub fn leg(&self) -> Leg {
        self.leg
    }

    /// Called per audio frame: updates the leg in place, no allocation.
    pub fn audio(&self, samples: u64, sample_rate: u32) {
        self.registry.with(|t| t.add_audio(&self.call, self.leg, samples, sample_rate));
    }

    /// Seconds since the leg's call started (its first leg opened), on the monotonic clock.
    pub fn secs_into_call(&self) -> f64 {
        self.registry.started(&self.call).map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    pub fn dtmf(&self, digit: char) {
        self.registry.with(|t| t.add_dtmf(&self.call, self.leg, digit));
    }

    /// Records why the leg ends; applied when the guard drops.
    pub fn close(mut self, reason: impl Into<String>) {
        self.reason = Some(reason.into());
    }
}

impl Drop for LegGuard {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| "input task ended".into());
        log::info!(component = "calls", call_id = self.call.as_str(); "{:?} leg closed: {reason}", self.leg);
        let event = LegEvent::LegClosed { call: self.call.clone(), leg: self.leg, reason };
        let actions = self.registry.with(|t| t.handle(event, now()));
        log_actions(&actions);
    }
}
