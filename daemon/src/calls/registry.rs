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

    /// The limit on simultaneous calls (at start and on reload); a warning about it is
    /// logged and kept for `status`.
    pub fn set_limit(&self, limit: super::capacity::CallLimit) {
        if let Some(warning) = &limit.warning {
            log::warn!(component = "calls"; "{warning}");
        }
        log::info!(component = "calls"; "at most {} simultaneous calls ({})", limit.max_calls, limit.source);
        self.with(|t| t.set_limit(limit));
    }

    /// The limit in force and where it comes from.
    pub fn limit(&self) -> super::capacity::CallLimit {
        self.with(|t| t.limit().clone())
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
            refused_at_capacity: t.refused_at_capacity,
            max_calls: t.limit().max_calls,
            limit_source: t.limit().source.clone(),
            limit_warning: t.limit().warning.clone(),
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

/// Reads the box's rating (`bench capacity --save`), bounded in size.
pub fn read_rating(path: &std::path::Path) -> super::capacity::RatingFile {
    use super::capacity::{RatingFile, MAX_RATING_BYTES};
    match crate::fsio::read_text_bounded(path, MAX_RATING_BYTES, crate::fsio::Links::Refuse) {
        Err(e) if e.is_not_found() => RatingFile::Missing,
        Err(e) => RatingFile::Unreadable(format!("{}: {e}", path.display())),
        Ok(text) => match serde_json::from_str(&text) {
            Ok(rating) => RatingFile::Found(Box::new(rating)),
            Err(e) => RatingFile::Unreadable(format!("{}: {e}", path.display())),
        },
    }
}

/// Writes a rating where the daemon reads it: whole or not at all (a temporary file
/// renamed over it), mode 0600, owned like the data directory (a technician runs the
/// benchmark as root; the daemon runs as its own user).
pub fn write_rating(dir: &std::path::Path, rating: &super::capacity::Rating) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = dir.join(super::capacity::RATING_FILE);
    let tmp = dir.join(format!(".{}.tmp", super::capacity::RATING_FILE));
    let _ = std::fs::remove_file(&tmp);
    let text = serde_json::to_string_pretty(rating).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    let owner = std::fs::metadata(dir)?;
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            &tmp,
            Some(nix::unistd::Uid::from_raw(owner.uid())),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )
        .map_err(std::io::Error::from)?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
