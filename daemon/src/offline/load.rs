//! The call load `bench soak` and `bench capacity` put on a private daemon: `slots`
//! simultaneous two-leg AudioSocket calls streamed in real time, each slot back to back
//! with a fresh call id, the slots staggered over one call's length so utterance ends
//! spread out as on a real box. What comes back is what a user would see: each
//! utterance's delay from its end in the audio to the understood utterance on the bus,
//! and whether every call finished.
//!
//! The streamers also watch their own schedule: a frame written more than a moment late
//! means the daemon held the TCP stream back (its per-leg queue was full), and a real PBX
//! would have dropped that audio.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audio::audiosocket::format_uuid;
use crate::calls::capacity::{LatencyBreakdown, Spread};
use crate::control::client::{self, WatchLine};
use crate::control::protocol::{LatencyItem, MonitorItem};
use crate::private_daemon::{random_uuid, stream_leg, PrivateDaemon};

/// After the last call's last frame: its last utterance and its finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A call made of clips: at most this many, and this long (every slot streams it again).
const MAX_CLIPS: usize = 64;
const MAX_CALL_SECS: usize = 600;

/// A two-leg call to stream: agent and customer PCM at `rate`, and its length.
pub struct TwoLegCall {
    pub legs: [Vec<i16>; 2],
    pub rate: u32,
    pub secs: f64,
}

impl TwoLegCall {
    /// A stereo recording (agent left, customer right).
    pub fn from_stereo(path: &Path, rate: u32) -> Result<Self, String> {
        let (legs, secs) = crate::private_daemon::load_two_leg_call(path, rate)?;
        Ok(Self { legs, rate, secs })
    }

    /// A call made of real recordings taking turns: the WAV files in `dir` (sorted by
    /// name), the first on the agent's leg, the next on the customer's and so on, with
    /// `gap` of silence between turns (the other leg is silent while one speaks).
    pub fn from_clips(dir: &Path, rate: u32, gap: Duration) -> Result<Self, String> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")))
            .collect();
        files.sort();
        if !(2..=MAX_CLIPS).contains(&files.len()) {
            return Err(format!(
                "{}: a call is made of 2–{MAX_CLIPS} WAV clips (taking turns on the two legs), found {}",
                dir.display(),
                files.len()
            ));
        }
        let gap_samples = (gap.as_secs_f64() * f64::from(rate)) as usize;
        let mut legs: [Vec<i16>; 2] = [Vec::new(), Vec::new()];
        for (turn, file) in files.iter().enumerate() {
            let clip = crate::private_daemon::load_mono(file, rate)?;
            let speaker = turn % 2;
            let now = legs[0].len().max(legs[1].len()) + gap_samples;
            for (leg, samples) in legs.iter_mut().enumerate() {
                samples.resize(now, 0);
                if leg == speaker {
                    samples.extend_from_slice(&clip);
                }
            }
        }
        let end = legs[0].len().max(legs[1].len()) + gap_samples;
        if end > MAX_CALL_SECS * rate as usize {
            return Err(format!("{}: the clips make a call longer than {MAX_CALL_SECS} s", dir.display()));
        }
        legs.iter_mut().for_each(|l| l.resize(end, 0));
        Ok(Self { secs: end as f64 / f64::from(rate), legs, rate })
    }
}

/// What the load saw come back from the daemon.
pub enum Observed {
    /// An utterance of one of the load's calls, `latency_secs` after its end in the audio,
    /// with the daemon's account of where that time went.
    Utterance {
        latency_secs: f64,
        parts: Option<LatencyItem>,
    },
    CallFinished,
}

/// How the load ended.
pub struct LoadEnd {
    pub started: usize,
    pub finished: usize,
    /// Legs that could not be streamed, with the first reason.
    pub stream_errors: Vec<String>,
    /// The latest any frame was written behind its real-time schedule, seconds.
    pub max_lag_secs: f64,
}

/// A running load. Read what it sees with [`Load::poll`] until [`Load::done`].
pub struct Load {
    starts: Arc<Mutex<HashMap<String, Instant>>>,
    items: mpsc::Receiver<MonitorItem>,
    slots: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
    finished: usize,
    errors: Arc<Mutex<Vec<String>>>,
    max_lag_us: Arc<AtomicU64>,
    deadline: Instant,
    drain_deadline: Option<Instant>,
}

impl Load {
    /// Starts `slots` call slots streaming `call` into `daemon` for `duration` (a call
    /// starts only if it can end before then, so the load's end is every call's end).
    pub fn start(daemon: &PrivateDaemon, call: &Arc<TwoLegCall>, slots: usize, duration: Duration) -> Self {
        let starts: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (items_tx, items) = mpsc::channel::<MonitorItem>();
        let socket = daemon.socket.clone();
        // Detached: it ends when the daemon does, or with its first item after this load
        // is gone (the channel is closed then).
        std::thread::spawn(move || {
            let _ = client::watch(&socket, |line| match line {
                WatchLine::Item(item) => items_tx.send(*item).is_ok(),
                WatchLine::Error(_) => true,
            });
        });
        let begun = Instant::now();
        let deadline = begun + duration;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let max_lag_us = Arc::new(AtomicU64::new(0));
        let call_length = Duration::from_secs_f64(call.secs);
        let slots = (0..slots)
            .map(|slot| {
                let (call, starts, stop, started, errors, max_lag_us) =
                    (call.clone(), starts.clone(), stop.clone(), started.clone(), errors.clone(), max_lag_us.clone());
                let addresses = daemon.addresses;
                let offset = call_length.mul_f64(slot as f64 / slots as f64);
                std::thread::spawn(move || {
                    let mut next = begun + offset;
                    while next + call_length <= deadline && !stop.load(Ordering::Relaxed) {
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let Ok(uuid) = random_uuid() else { break };
                        let start = Instant::now();
                        if let Ok(mut map) = starts.lock() {
                            map.insert(format_uuid(&uuid), start);
                        }
                        started.fetch_add(1, Ordering::Relaxed);
                        let streams: Vec<_> = call
                            .legs
                            .iter()
                            .zip(addresses)
                            .map(|(samples, address)| {
                                let (samples, rate) = (samples.clone(), call.rate);
                                std::thread::spawn(move || stream_leg(address, uuid, &samples, rate, start))
                            })
                            .collect();
                        for s in streams {
                            match s.join() {
                                Ok(Ok(lag)) => {
                                    max_lag_us.fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
                                }
                                Ok(Err(e)) => push(&errors, e.to_string()),
                                Err(_) => push(&errors, "a streaming thread panicked".to_owned()),
                            }
                        }
                        next = Instant::now().max(start + call_length);
                    }
                })
            })
            .collect();
        Self { starts, items, slots, stop, started, finished: 0, errors, max_lag_us, deadline, drain_deadline: None }
    }

    /// The next thing seen of the load's calls, waiting at most `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Option<Observed> {
        let item = self.items.recv_timeout(timeout).ok()?;
        let arrived = Instant::now();
        let start_of = |call: &str| self.starts.lock().ok().and_then(|m| m.get(call).copied());
        match item {
            MonitorItem::Utterance(u) => {
                let start = start_of(&u.call)?;
                let latency_secs = arrived.duration_since(start).as_secs_f64() - u.end_secs;
                Some(Observed::Utterance { latency_secs, parts: u.latency })
            }
            MonitorItem::CallFinished(f) => {
                start_of(&f.call)?;
                self.finished += 1;
                Some(Observed::CallFinished)
            }
            MonitorItem::Event(_) => None,
        }
    }

    /// Calls started so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    pub fn finished(&self) -> usize {
        self.finished
    }

    /// True once the streaming is over and every call has finished, or the drain has
    /// waited long enough for those that did not.
    pub fn done(&mut self) -> bool {
        let now = Instant::now();
        if now < self.deadline || !self.slots.iter().all(JoinHandle::is_finished) {
            return false;
        }
        if self.finished >= self.started() {
            return true;
        }
        now >= *self.drain_deadline.get_or_insert(now + DRAIN_TIMEOUT)
    }

    /// Stops the streamers (if still going) and says how the load went.
    pub fn finish(mut self) -> LoadEnd {
        self.stop.store(true, Ordering::Relaxed);
        for slot in std::mem::take(&mut self.slots) {
            let _ = slot.join();
        }
        LoadEnd {
            started: self.started(),
            finished: self.finished,
            stream_errors: self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
            max_lag_secs: self.max_lag_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

fn push(errors: &Mutex<Vec<String>>, error: String) {
    if let Ok(mut errors) = errors.lock() {
        errors.push(error);
    }
}

/// The `p`th percentile (nearest rank) of sorted values; 0 when there are none.
/// The parts of every utterance's latency seen over a step or a soak.
#[derive(Default)]
pub struct LatencyParts {
    to_close: Vec<f64>,
    hangover: Vec<f64>,
    asr_queue: Vec<f64>,
    asr: Vec<f64>,
    encoder: Vec<f64>,
    text: Vec<f64>,
    other: Vec<f64>,
}

impl LatencyParts {
    /// One utterance `latency_secs` after its end, of which the daemon accounts `parts`
    /// (none from a daemon that does not say: the utterance is left out).
    pub fn add(&mut self, latency_secs: f64, parts: Option<&LatencyItem>) {
        let Some(parts) = parts else { return };
        let secs = |ms: f64| ms / 1000.0;
        let after_close = secs(parts.after_close_ms);
        let accounted = secs(parts.asr_queue_ms + parts.asr_worker_ms + parts.understanding_ms);
        self.to_close.push(latency_secs - after_close);
        self.hangover.push(secs(parts.hangover_ms));
        self.asr_queue.push(secs(parts.asr_queue_ms));
        self.asr.push(secs(parts.asr_worker_ms));
        self.encoder.push(secs(parts.encoder_ms));
        self.text.push(secs(parts.understanding_ms));
        self.other.push((after_close - accounted).max(0.0));
    }

    /// p50 and p99 of each part; None when no utterance brought its parts.
    pub fn breakdown(&self) -> Option<LatencyBreakdown> {
        let spread = |values: &[f64]| {
            let mut sorted = values.to_vec();
            sorted.sort_by(f64::total_cmp);
            Spread { p50_secs: percentile(&sorted, 50.0), p99_secs: percentile(&sorted, 99.0) }
        };
        (!self.to_close.is_empty()).then(|| LatencyBreakdown {
            to_close: spread(&self.to_close),
            hangover: spread(&self.hangover),
            asr_queue: spread(&self.asr_queue),
            asr: spread(&self.asr),
            encoder: spread(&self.encoder),
            text: spread(&self.text),
            other: spread(&self.other),
        })
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_parts_split_what_the_load_saw_by_what_the_daemon_accounts() {
        let mut parts = LatencyParts::default();
        assert_eq!(parts.breakdown(), None, "no utterance, no breakdown");
        parts.add(0.9, None);
        assert_eq!(parts.breakdown(), None, "an utterance without the daemon's parts is left out");
        // 100 utterances: the n-th spent n ms in the queue; each 0.9 s end to end, of which
        // 0.6 s after the close: 0.3 s before it (266 ms of hangover).
        for n in 1..=100 {
            let item = LatencyItem {
                hangover_ms: 266.0,
                after_close_ms: 600.0,
                asr_queue_ms: f64::from(n),
                asr_worker_ms: 400.0,
                encoder_ms: 100.0,
                understanding_ms: 20.0,
            };
            parts.add(0.9, Some(&item));
        }
        let b = parts.breakdown().unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(b.to_close.p50_secs, 0.3) && close(b.hangover.p99_secs, 0.266), "{b:?}");
        assert!(close(b.asr_queue.p50_secs, 0.050) && close(b.asr_queue.p99_secs, 0.099), "{b:?}");
        assert!(close(b.asr.p50_secs, 0.4) && close(b.encoder.p50_secs, 0.1) && close(b.text.p99_secs, 0.02), "{b:?}");
        // Other: 600 − n − 400 − 20 ms (80–179 ms): 129 ms at the median, 178 at the 99th.
        assert!(close(b.other.p50_secs, 0.129) && close(b.other.p99_secs, 0.178), "{b:?}");
        // A daemon's accounts that exceed its share (clocks read at different moments)
        // never give a negative rest.
        let mut odd = LatencyParts::default();
        let item = LatencyItem {
            hangover_ms: 266.0,
            after_close_ms: 100.0,
            asr_queue_ms: 0.0,
            asr_worker_ms: 150.0,
            encoder_ms: 50.0,
            understanding_ms: 0.0,
        };
        odd.add(0.5, Some(&item));
        assert_eq!(odd.breakdown().unwrap().other.p99_secs, 0.0);
    }

    #[test]
    fn clips_take_turns_on_the_two_legs_and_never_overlap() {
        let dir = crate::testdata::shared_path("speech/zh");
        let rate = 8000;
        let call = TwoLegCall::from_clips(&dir, rate, Duration::from_millis(800)).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        let speech: Vec<usize> =
            names.iter().map(|p| crate::private_daemon::load_mono(p, rate).unwrap().len()).collect();
        // Each clip once, a gap before each turn and after the last.
        let gaps = (names.len() + 1) * 6400;
        assert_eq!(call.legs[0].len(), call.legs[1].len());
        assert_eq!(call.legs[0].len(), speech.iter().sum::<usize>() + gaps);
        assert!((call.secs - call.legs[0].len() as f64 / 8000.0).abs() < 1e-9);
        // One leg speaks at a time, and the first clip is the agent's (left).
        assert!(call.legs[0].iter().zip(&call.legs[1]).all(|(a, c)| *a == 0 || *c == 0));
        let first_turn = &call.legs[0][6400..6400 + speech[0]];
        assert!(first_turn.iter().any(|&x| x != 0));
        assert!(call.legs[1][..6400 + speech[0]].iter().all(|&x| x == 0));
    }
}
