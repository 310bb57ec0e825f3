//! Call boundaries on capture lines, sans-IO.
//!
//! A capture device carries phone lines without signalling: a call is the stretch of
//! sound between silences, or what a start/stop request brackets. [`LineTracker`] is fed
//! each period's level per line and the requests, with the device's frame clock and the
//! wall time (for call ids), and says when a call starts and ends.

use std::time::{Duration, SystemTime};

/// Why a `call start|stop` request on a capture line was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("no line {line:?} on this device (lines: {lines})")]
    NoSuchLine { line: String, lines: String },
    #[error("line {line} is already in call {call}")]
    AlreadyInCall { line: String, call: String },
    #[error("line {line} has no call in progress")]
    NoCall { line: String },
    #[error("capture device {device} is not open: {reason}")]
    DeviceNotOpen { device: String, reason: String },
    #[error("capture is busy or stopped; try again")]
    Busy,
    #[error("capture did not answer (is the device open? see `callbox status`)")]
    NoAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineParams {
    /// Start calls on sound; otherwise only on requests.
    pub auto_start: bool,
    /// RMS level (0..1 of full scale) that counts as sound.
    pub sound_level: f32,
    /// Frames of silence on every leg that end an auto-started call.
    pub silence_timeout_frames: u64,
}

impl LineParams {
    pub fn from_config(alsa: &crate::config::AlsaConfig) -> Self {
        Self {
            auto_start: alsa.auto_start,
            sound_level: 10f32.powf(alsa.start_level_dbfs / 20.0),
            silence_timeout_frames: u64::from(alsa.silence_timeout_secs) * u64::from(alsa.sample_rate),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineAction {
    Start { line: usize, call: String },
    End { line: usize, call: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LineState {
    Idle,
    InCall {
        call: String,
        /// Started by a request: only a request (or shutdown) ends it.
        explicit: bool,
        last_sound: u64,
    },
}

#[derive(Debug)]
pub struct LineTracker {
    params: LineParams,
    names: Vec<String>,
    states: Vec<LineState>,
}

impl LineTracker {
    pub fn new(names: Vec<String>, params: LineParams) -> Self {
        let states = vec![LineState::Idle; names.len()];
        Self { params, names, states }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn call_on(&self, line: usize) -> Option<&str> {
        match self.states.get(line) {
            Some(LineState::InCall { call, .. }) => Some(call),
            _ => None,
        }
    }

    /// One period on `line` whose loudest leg had RMS `level`, ending at device frame `at`.
    pub fn period(&mut self, line: usize, level: f32, at: u64, now: SystemTime) -> Option<LineAction> {
        let sound = level >= self.params.sound_level;
        let name = self.names.get(line)?.clone();
        let state = self.states.get_mut(line)?;
        match state {
            LineState::Idle if sound && self.params.auto_start => {
                let call = call_id(&name, now);
                *state = LineState::InCall { call: call.clone(), explicit: false, last_sound: at };
                Some(LineAction::Start { line, call })
            }
            LineState::Idle => None,
            LineState::InCall { last_sound, .. } if sound => {
                *last_sound = at;
                None
            }
            LineState::InCall { call, explicit: false, last_sound }
                if at.saturating_sub(*last_sound) >= self.params.silence_timeout_frames =>
            {
                let call = std::mem::take(call);
                *state = LineState::Idle;
                Some(LineAction::End { line, call, reason: "silence timeout".into() })
            }
            LineState::InCall { .. } => None,
        }
    }

    /// A start or stop request for the line called `name`.
    pub fn request(&mut self, name: &str, start: bool, at: u64, now: SystemTime) -> Result<LineAction, LineError> {
        let line = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| LineError::NoSuchLine { line: name.to_owned(), lines: self.names.join(", ") })?;
        let state = &mut self.states[line];
        match (start, &mut *state) {
            (true, LineState::Idle) => {
                let call = call_id(name, now);
                *state = LineState::InCall { call: call.clone(), explicit: true, last_sound: at };
                Ok(LineAction::Start { line, call })
            }
            (true, LineState::InCall { call, explicit, .. }) => {
                // A request takes over a call that sound started: it now ends on request.
                *explicit = true;
                Err(LineError::AlreadyInCall { line: name.to_owned(), call: call.clone() })
            }
            (false, LineState::InCall { call, .. }) => {
                let call = std::mem::take(call);
                *state = LineState::Idle;
                Ok(LineAction::End { line, call, reason: "stop requested".into() })
            }
            (false, LineState::Idle) => Err(LineError::NoCall { line: name.to_owned() }),
        }
    }

    /// Ends every call (shutdown, device lost).
    pub fn end_all(&mut self, reason: &str) -> Vec<LineAction> {
        let mut out = Vec::new();
        for (line, state) in self.states.iter_mut().enumerate() {
            if let LineState::InCall { call, .. } = std::mem::replace(state, LineState::Idle) {
                out.push(LineAction::End { line, call, reason: reason.to_owned() });
            }
        }
        out
    }
}

fn call_id(line: &str, now: SystemTime) -> String {
    let ms = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
    format!("alsa:{line}:{ms}")
}

/// RMS of 16-bit samples as a fraction of full scale.
pub fn rms(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    ((sum / samples.len() as f64).sqrt() / 32768.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn tracker(auto_start: bool) -> LineTracker {
        let params = LineParams { auto_start, sound_level: 0.01, silence_timeout_frames: 8000 };
        LineTracker::new(vec!["1".into(), "2".into()], params)
    }

    #[test]
    fn sound_starts_a_call_and_silence_ends_it_after_the_timeout() {
        let mut t = tracker(true);
        assert_eq!(t.period(0, 0.001, 160, T0), None, "quiet line stays idle");
        let now = T0 + Duration::from_millis(1234);
        assert_eq!(t.period(0, 0.2, 320, now), Some(LineAction::Start { line: 0, call: "alsa:1:1234".into() }));
        assert_eq!(t.call_on(0), Some("alsa:1:1234"));
        assert_eq!(t.call_on(1), None, "lines are independent");
        // Pauses shorter than the timeout do not end it; sound resets the clock.
        assert_eq!(t.period(0, 0.0, 320 + 7999, now), None);
        assert_eq!(t.period(0, 0.5, 10_000, now), None);
        assert_eq!(t.period(0, 0.0, 17_999, now), None);
        let end = t.period(0, 0.0, 18_000, now);
        assert_eq!(
            end,
            Some(LineAction::End { line: 0, call: "alsa:1:1234".into(), reason: "silence timeout".into() })
        );
        assert_eq!(t.call_on(0), None);
    }

    #[test]
    fn without_auto_start_only_requests_bracket_calls_and_silence_does_not_end_them() {
        let mut t = tracker(false);
        assert_eq!(t.period(1, 0.9, 160, T0), None);
        let start = t.request("2", true, 160, T0).unwrap();
        assert_eq!(start, LineAction::Start { line: 1, call: "alsa:2:0".into() });
        assert!(
            matches!(t.request("2", true, 200, T0), Err(LineError::AlreadyInCall { call, .. }) if call == "alsa:2:0")
        );
        assert_eq!(t.period(1, 0.0, 1_000_000, T0), None, "an explicit call ignores silence");
        let end = t.request("2", false, 1_000_000, T0).unwrap();
        assert_eq!(end, LineAction::End { line: 1, call: "alsa:2:0".into(), reason: "stop requested".into() });
        assert_eq!(t.request("2", false, 0, T0), Err(LineError::NoCall { line: "2".into() }));
        assert!(t.request("9", true, 0, T0).unwrap_err().to_string().contains("lines: 1, 2"));
    }

    #[test]
    fn a_start_request_during_a_sound_started_call_keeps_it_until_stop() {
        let mut t = tracker(true);
        assert!(matches!(t.period(0, 0.5, 160, T0), Some(LineAction::Start { .. })));
        assert!(t.request("1", true, 160, T0).is_err());
        assert_eq!(t.period(0, 0.0, 100_000, T0), None, "now explicit: silence does not end it");
        assert_eq!(t.end_all("shutdown").len(), 1);
        assert!(t.end_all("shutdown").is_empty());
    }

    #[test]
    fn rms_is_a_fraction_of_full_scale() {
        assert_eq!(rms(&[]), 0.0);
        assert!((rms(&[16384, -16384]) - 0.5).abs() < 1e-6);
        let db = 20.0 * rms(&[328; 160]).log10();
        assert!((db + 40.0).abs() < 0.1, "{db}");
    }
}
