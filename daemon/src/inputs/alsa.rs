//! ALSA capture: one device whose channels carry phone lines (one channel per leg).
//!
//! A plain thread reads interleaved 16-bit periods (ALSA's API blocks), splits them per
//! channel, lets [`LineTracker`] decide call boundaries, and feeds each in-call leg to
//! the call table and the speech path. Start/stop requests from the control socket
//! reach the thread through a small queue and are answered after the period in hand.
//!
//! Faults: an overrun (the reader fell behind: the speech path's queues were full) is
//! logged with the audio lost and capture goes on; a device that cannot be opened or
//! fails is retried every [`RETRY`], with the component degraded meanwhile. Calls in
//! progress end when the device is lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};
use tokio::sync::{oneshot, watch};

use super::lines::{rms, LineAction, LineError, LineParams, LineTracker};
use crate::audio::Leg;
use crate::calls::registry::{CallRegistry, LegGuard};
use crate::config::AlsaConfig;
use crate::config::RunningConfig;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::speech::live::{LegFeed, SpeechService};

const COMPONENT: &str = "alsa";
const RETRY: Duration = Duration::from_secs(2);
/// Audio kept from before a call starts on sound, so its first syllable is not lost.
const PREROLL_MS: u32 = 300;
/// Requests waiting for the capture thread; more are refused at once.
const MAX_PENDING_REQUESTS: usize = 16;

/// Why the capture device could not be set up (it is retried every [`RETRY`]).
#[derive(Debug, thiserror::Error)]
enum DeviceError {
    #[error("capture device {device}: {what}: {source}")]
    Setup { device: String, what: String, source: alsa::Error },
    #[error(
        "capture device {device} runs at {rate} Hz, not alsa.sample_rate = {wanted}; use the plughw: device to convert"
    )]
    Rate { device: String, rate: u32, wanted: u32 },
}

/// `callbox call start|stop LINE`, as the control socket hands it to capture.
pub struct LineRequest {
    pub line: String,
    pub start: bool,
    /// The call id, or why not.
    pub reply: oneshot::Sender<Result<String, LineError>>,
}

/// The control socket's end of the request queue.
#[derive(Clone)]
pub struct LineRequests(mpsc::SyncSender<LineRequest>);

impl LineRequests {
    pub async fn send(&self, line: &str, start: bool) -> Result<String, LineError> {
        let (reply, answer) = oneshot::channel();
        let request = LineRequest { line: line.to_owned(), start, reply };
        self.0.try_send(request).map_err(|_| LineError::Busy)?;
        match tokio::time::timeout(Duration::from_secs(3), answer).await {
            Ok(Ok(result)) => result,
            _ => Err(LineError::NoAnswer),
        }
    }
}

pub fn request_queue() -> (LineRequests, mpsc::Receiver<LineRequest>) {
    let (tx, rx) = mpsc::sync_channel(MAX_PENDING_REQUESTS);
    (LineRequests(tx), rx)
}

/// Runs capture until shutdown.
pub async fn capture(
    config: AlsaConfig,
    running: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    speech: Option<SpeechService>,
    requests: mpsc::Receiver<LineRequest>,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), std::io::Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let device = config.device.clone().unwrap_or_default();
    let worker = Capture { config, running, calls, speech, health: health.clone(), stop: stop.clone() };
    let thread = std::thread::Builder::new().name("alsa-capture".into()).spawn(move || worker.run(requests))?;
    shutdown.wait().await;
    stop.store(true, Ordering::SeqCst);
    // The thread notices within one period (or one retry pause) and ends its calls.
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        log::error!(component = COMPONENT; "capture thread for {device} panicked");
    }
    health.set(COMPONENT, HealthState::Stopped, format!("{device}: not capturing"));
    Ok(())
}

struct Capture {
    config: AlsaConfig,
    running: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    speech: Option<SpeechService>,
    health: HealthBoard,
    stop: Arc<AtomicBool>,
}

/// One mapped channel's leg of the call in progress on its line.
struct OpenLeg {
    channel: usize,
    guard: LegGuard,
    feed: Option<LegFeed>,
}

/// A line as configured: its name and its (channel, leg) pairs.
struct LineSpec {
    name: String,
    channels: Vec<(usize, Leg)>,
}

/// What one line holds while a call is in progress.
#[derive(Default)]
struct LineCall {
    legs: Vec<OpenLeg>,
}

impl Capture {
    fn device(&self) -> &str {
        self.config.device.as_deref().unwrap_or("")
    }

    fn run(self, requests: mpsc::Receiver<LineRequest>) {
        let mut last_error = String::new();
        while !self.stop.load(Ordering::SeqCst) {
            match self.open() {
                Ok((pcm, period)) => {
                    last_error.clear();
                    let reason = self.capture_from(&pcm, period, &requests);
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    self.degraded(format!("{}: {reason}; reopening", self.device()), &mut last_error);
                }
                Err(e) => self.degraded(e.to_string(), &mut last_error),
            }
            // Requests while the device is away get a clear answer rather than a timeout.
            let deadline = std::time::Instant::now() + RETRY;
            while !self.stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                while let Ok(r) = requests.try_recv() {
                    let device = self.device().to_owned();
                    let _ = r.reply.send(Err(LineError::DeviceNotOpen { device, reason: last_error.clone() }));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn degraded(&self, reason: String, last_error: &mut String) {
        if *last_error != reason {
            log::error!(component = COMPONENT; "{reason}");
        }
        self.health.set(COMPONENT, HealthState::Degraded, reason.clone());
        *last_error = reason;
    }

    /// Opens the device with the configured layout; returns it and the period in frames.
    fn open(&self) -> Result<(PCM, usize), DeviceError> {
        let alsa_config = &self.config;
        let device = self.device();
        let fail = |what: &str, source: alsa::Error| DeviceError::Setup {
            device: device.to_owned(),
            what: what.to_owned(),
            source,
        };
        let pcm = PCM::new(device, Direction::Capture, false).map_err(|e| fail("cannot open", e))?;
        let period = (alsa_config.sample_rate * alsa_config.period_ms / 1000) as usize;
        {
            let hw = HwParams::any(&pcm).map_err(|e| fail("no parameters", e))?;
            hw.set_access(Access::RWInterleaved).map_err(|e| fail("interleaved access", e))?;
            hw.set_format(Format::s16()).map_err(|e| fail("16-bit samples", e))?;
            hw.set_channels(alsa_config.channels)
                .map_err(|e| fail(&format!("{} channels", alsa_config.channels), e))?;
            hw.set_rate(alsa_config.sample_rate, ValueOr::Nearest).map_err(|e| fail("rate", e))?;
            let rate = hw.get_rate().map_err(|e| fail("rate", e))?;
            if rate != alsa_config.sample_rate {
                return Err(DeviceError::Rate { device: device.to_owned(), rate, wanted: alsa_config.sample_rate });
            }
            hw.set_period_size_near(period as alsa::pcm::Frames, ValueOr::Nearest).map_err(|e| fail("period", e))?;
            // Half a second of buffer rides out scheduling hiccups.
            hw.set_buffer_size_near((alsa_config.sample_rate / 2) as alsa::pcm::Frames)
                .map_err(|e| fail("buffer", e))?;
            pcm.hw_params(&hw).map_err(|e| fail("cannot apply parameters", e))?;
        }
        pcm.prepare().map_err(|e| fail("prepare", e))?;
        Ok((pcm, period))
    }

    /// Reads until stop or a device failure (returned as the reason).
    fn capture_from(&self, pcm: &PCM, period: usize, requests: &mpsc::Receiver<LineRequest>) -> String {
        let alsa_config = &self.config;
        let channels = alsa_config.channels as usize;
        let io = match pcm.io_i16() {
            Ok(io) => io,
            Err(e) => return format!("no 16-bit reader: {e}"),
        };
        let mut lines: Vec<LineSpec> = Vec::new();
        for m in &alsa_config.map {
            match lines.iter_mut().find(|l| l.name == m.line) {
                Some(l) => l.channels.push((m.channel as usize, m.leg)),
                None => lines.push(LineSpec { name: m.line.clone(), channels: vec![(m.channel as usize, m.leg)] }),
            }
        }
        let mut tracker =
            LineTracker::new(lines.iter().map(|l| l.name.clone()).collect(), LineParams::from_config(alsa_config));
        let mut active: Vec<Option<LineCall>> = (0..lines.len()).map(|_| None).collect();
        let preroll_periods = (PREROLL_MS / alsa_config.period_ms.max(1)).max(1) as usize;
        let mut preroll: Vec<VecDeque<Vec<i16>>> = vec![VecDeque::new(); channels];
        let mut interleaved = vec![0i16; period * channels];
        let mut split: Vec<Vec<i16>> = vec![Vec::with_capacity(period); channels];
        let mut frames_read: u64 = 0;
        let mut overruns: u64 = 0;
        self.health.set(COMPONENT, HealthState::Ok, self.describe(&tracker, overruns));
        log::info!(component = COMPONENT; "capturing from {} ({} ch, {} Hz, lines {})",
            self.device(), alsa_config.channels, alsa_config.sample_rate, tracker.names().join(", "));

        let reason = loop {
            if self.stop.load(Ordering::SeqCst) {
                break "shutdown".to_owned();
            }
            while let Ok(request) = requests.try_recv() {
                let result = tracker.request(&request.line, request.start, frames_read, SystemTime::now());
                let answer = result.map(|action| {
                    let call = action_call(&action).to_owned();
                    self.apply(action, &lines, &mut active, &mut preroll);
                    call
                });
                let _ = request.reply.send(answer);
                self.health.set(COMPONENT, HealthState::Ok, self.describe(&tracker, overruns));
            }
            let frames = match io.readi(&mut interleaved) {
                Ok(n) => n,
                Err(e) if e.errno() == -libc::EPIPE => {
                    overruns += 1;
                    log::warn!(component = COMPONENT; "{}: capture overrun #{overruns}: the speech path fell behind, audio was lost", self.device());
                    if let Err(e) = pcm.prepare() {
                        break format!("cannot recover from an overrun: {e}");
                    }
                    continue;
                }
                Err(e) => match pcm.try_recover(e, true) {
                    Ok(()) => continue,
                    Err(e) => break format!("read failed: {e}"),
                },
            };
            if frames == 0 {
                continue;
            }
            for (ch, out) in split.iter_mut().enumerate() {
                out.clear();
                out.extend(interleaved[..frames * channels].iter().skip(ch).step_by(channels));
            }
            frames_read += frames as u64;
            let mut changed = false;
            for (line, spec) in lines.iter().enumerate() {
                let level = spec.channels.iter().map(|&(ch, _)| rms(&split[ch])).fold(0.0, f32::max);
                if let Some(action) = tracker.period(line, level, frames_read, SystemTime::now()) {
                    self.apply(action, &lines, &mut active, &mut preroll);
                    changed = true;
                }
                if let Some(call) = active[line].as_mut() {
                    for leg in &mut call.legs {
                        self.feed(leg, &split[leg.channel]);
                    }
                }
            }
            for (ch, samples) in split.iter().enumerate() {
                let ring = &mut preroll[ch];
                // The oldest period's buffer is reused: no allocation per period once full.
                let mut kept =
                    if ring.len() == preroll_periods { ring.pop_front().unwrap_or_default() } else { Vec::new() };
                kept.clear();
                kept.extend_from_slice(samples);
                ring.push_back(kept);
            }
            if changed {
                self.health.set(COMPONENT, HealthState::Ok, self.describe(&tracker, overruns));
            }
        };
        for action in
            tracker.end_all(if reason == "shutdown" { "callbox is shutting down" } else { "capture device lost" })
        {
            self.apply(action, &lines, &mut active, &mut preroll);
        }
        reason
    }

    fn feed(&self, leg: &mut OpenLeg, samples: &[i16]) {
        leg.guard.audio(samples.len() as u64, self.config.sample_rate);
        if let Some(feed) = &leg.feed {
            if !feed.push_blocking(samples.to_vec()) {
                leg.feed = None; // the worker logged why; the call goes on untranscribed
            }
        }
    }

    fn apply(
        &self,
        action: LineAction,
        lines: &[LineSpec],
        active: &mut [Option<LineCall>],
        preroll: &mut [VecDeque<Vec<i16>>],
    ) {
        match action {
            LineAction::Start { line, call } => {
                let source = format!("alsa {} line {}", self.device(), lines[line].name);
                log::info!(component = COMPONENT, call_id = call.as_str(); "call on line {} started", lines[line].name);
                let speech_config = self.running.borrow().config.speech.clone();
                let mut legs = Vec::new();
                for &(channel, leg) in &lines[line].channels {
                    let guard = match self.calls.open(&call, leg, &source) {
                        Ok(guard) => guard,
                        Err(reason) => {
                            log::warn!(component = COMPONENT, call_id = call.as_str(); "{} leg not taken: {reason}", leg.name());
                            continue;
                        }
                    };
                    let feed = self.speech.as_ref().and_then(|s| {
                        // A line's legs are channels of one device: they start together.
                        s.open_leg(&call, leg, self.config.sample_rate, 0.0, &speech_config)
                            .map_err(|e| log::error!(component = COMPONENT, call_id = call.as_str(); "{e}"))
                            .ok()
                    });
                    let mut open = OpenLeg { channel, guard, feed };
                    for samples in preroll[channel].drain(..) {
                        self.feed(&mut open, &samples);
                    }
                    legs.push(open);
                }
                active[line] = Some(LineCall { legs });
            }
            LineAction::End { line, call, reason } => {
                if let Some(ended) = active[line].take() {
                    for leg in ended.legs {
                        // The worker flushes the last utterance once its feed is gone.
                        drop(leg.feed);
                        leg.guard.close(reason.clone());
                    }
                }
                log::info!(component = COMPONENT, call_id = call.as_str(); "call on line {} ended: {reason}", lines[line].name);
            }
        }
    }

    fn describe(&self, tracker: &LineTracker, overruns: u64) -> String {
        let lines: Vec<String> = tracker
            .names()
            .iter()
            .enumerate()
            .map(|(i, n)| format!("line {n}: {}", tracker.call_on(i).unwrap_or("idle")))
            .collect();
        format!("capturing from {}; {}; {overruns} overruns", self.device(), lines.join(", "))
    }
}

fn action_call(action: &LineAction) -> &str {
    match action {
        LineAction::Start { call, .. } | LineAction::End { call, .. } => call,
    }
}
