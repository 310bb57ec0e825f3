//! The speech path for live calls: one worker thread per open leg.
//!
//! An input opens a [`LegFeed`] per leg and pushes PCM at the leg's rate; the worker
//! resamples to 16 kHz and runs a [`LegPipeline`] (VAD per 32 ms chunk, ASR when an
//! utterance ends). Finished utterances are logged and published on the utterance bus
//! (call understanding subscribes there). Dropping the feed ends the leg: the worker
//! flushes the utterance in progress and exits.
//!
//! Back-pressure: each feed's queue holds [`QUEUE_CHUNKS`] chunks (about 30 s of 20 ms
//! frames) and a full queue blocks the input (TCP back-pressure for AudioSocket, an ALSA
//! overrun for capture, which that adapter reports), so no audio is silently skipped
//! inside the pipeline. A worker runs on its own OS thread: it waits while its utterances
//! are transcribed and must not stall the async runtime. Transcription itself is the shared
//! [`super::scheduler::AsrScheduler`]'s pool (`speech.asr_workers` threads, one per core by
//! default), so open legs beyond the cores queue instead of competing.
//!
//! Every worker thread is owned: the service keeps its join handle, and at shutdown the
//! `speech` component (stage [`Stage::Speech`], after the inputs have dropped their feeds)
//! joins them all, so each leg's last utterance is on the bus before understanding drains
//! it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::pipeline::{LegPipeline, Utterance};
use super::SpeechModels;
use crate::audio::resample::StreamResampler;
use crate::audio::Leg;
use crate::config::SpeechConfig;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::store::audio::{AudioChunk, AudioChunker};
use crate::store::live::CallVault;
use crate::store::StoreOp;

const COMPONENT: &str = "speech";
/// Chunks queued per leg before the input blocks: ~30 s of 20 ms frames.
pub const QUEUE_CHUNKS: usize = 1500;
/// Utterances buffered for each bus subscriber; a slower one loses the oldest (and is told).
const BUS_CAPACITY: usize = 1024;
/// Calls whose hotwords `call info --campaign` set are remembered, newest first, up to
/// this many: a call's legs may open after its info arrives (the PBX's order), and a
/// remembered call costs a few terms, so old ones simply age out.
const REMEMBERED_CALL_TERMS: usize = 512;

/// One finished utterance of a live or spooled call.
#[derive(Debug, Clone, Serialize)]
pub struct UtteranceEvent {
    pub call: String,
    pub leg: Leg,
    #[serde(flatten)]
    pub utterance: Utterance,
}

/// What the speech path publishes: utterances as they finish, and the end of each leg
/// (after its last utterance), so consumers know when a call's speech is complete.
#[derive(Debug, Clone)]
pub enum SpeechEvent {
    Utterance(Box<UtteranceEvent>),
    LegEnded { call: String, leg: Leg },
}

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct SpeechStats {
    pub legs_open: AtomicU64,
    pub legs_total: AtomicU64,
    pub utterances: AtomicU64,
    /// Audio seconds × 1000 that went through VAD.
    pub audio_ms: AtomicU64,
    /// Milliseconds spent in ASR (encoder + decoder).
    pub asr_ms: AtomicU64,
    pub errors: AtomicU64,
}

/// Why a leg gets no speech worker.
#[derive(Debug, thiserror::Error)]
pub enum LegError {
    #[error("cannot take audio at {rate} Hz: {source}")]
    Rate { rate: u32, source: crate::audio::resample::ResampleError },
    #[error("cannot start a speech worker thread: {0}")]
    Thread(std::io::Error),
}

/// A leg's worker thread, kept so that shutdown can wait for its last utterance.
struct Worker {
    call: String,
    leg: Leg,
    thread: JoinHandle<()>,
}

/// The loaded models and the utterance bus, shared by every input.
#[derive(Clone)]
pub struct SpeechService {
    models: Arc<SpeechModels>,
    /// Where each leg's audio goes with `store.keep_audio`.
    audio_store: Option<CallVault>,
    bus: broadcast::Sender<Arc<SpeechEvent>>,
    pub stats: Arc<SpeechStats>,
    workers: Arc<Mutex<Vec<Worker>>>,
    call_terms: Arc<CallTerms>,
}

/// Hotwords set per call after the daemon started it (its campaign's, see
/// `SpeechConfig::hotwords_for`). A leg worker looks here when `version` has moved since
/// it last looked — one atomic load per audio chunk otherwise.
#[derive(Default)]
struct CallTerms {
    version: AtomicU64,
    recent: Mutex<VecDeque<(String, Arc<Vec<String>>)>>,
}

impl CallTerms {
    fn set(&self, call: &str, terms: Vec<String>) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.retain(|(c, _)| c != call);
        recent.push_front((call.to_owned(), Arc::new(terms)));
        recent.truncate(REMEMBERED_CALL_TERMS);
        self.version.fetch_add(1, Ordering::Release);
    }

    fn of(&self, call: &str) -> Option<Arc<Vec<String>>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().find(|(c, _)| c == call).map(|(_, terms)| terms.clone())
    }
}

/// The input's end of a leg's worker. Drop it to end the leg.
pub struct LegFeed {
    tx: mpsc::Sender<Vec<i16>>,
}

impl LegFeed {
    /// Queues PCM at the leg's rate; waits while the worker is a full queue behind.
    /// False when the worker has gone (it logged why).
    pub async fn push(&self, samples: Vec<i16>) -> bool {
        self.tx.send(samples).await.is_ok()
    }

    /// The same from a plain thread (ALSA capture).
    pub fn push_blocking(&self, samples: Vec<i16>) -> bool {
        self.tx.blocking_send(samples).is_ok()
    }
}

impl SpeechService {
    pub fn new(models: SpeechModels) -> Self {
        let (bus, _) = broadcast::channel(BUS_CAPACITY);
        Self {
            models: Arc::new(models),
            audio_store: None,
            bus,
            stats: Arc::default(),
            workers: Arc::default(),
            call_terms: Arc::default(),
        }
    }

    /// Every leg's audio also goes to the call store (µ-law chunks, sealed there).
    pub fn keeping_audio(mut self, vault: CallVault) -> Self {
        self.audio_store = Some(vault);
        self
    }

    pub fn models(&self) -> &SpeechModels {
        &self.models
    }

    /// Where utterances are published; every subscriber sees every utterance.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<SpeechEvent>> {
        self.bus.subscribe()
    }

    /// Publishes an utterance (also for the spool, which transcribes whole files).
    pub fn publish(&self, event: UtteranceEvent) {
        log_utterance(&event);
        self.stats.utterances.fetch_add(1, Ordering::Relaxed);
        let asr = &event.utterance.asr;
        self.stats.asr_ms.fetch_add((asr.encoder_ms + asr.decoder_ms) as u64, Ordering::Relaxed);
        // No subscriber is fine (speech without understanding, e.g. in tests).
        let _ = self.bus.send(Arc::new(SpeechEvent::Utterance(Box::new(event))));
    }

    /// The terms `call`'s utterances favour from now on (its campaign's and the common
    /// ones): its open legs take them before their next utterance, legs opened later at
    /// their start.
    pub fn set_call_hotwords(&self, call: &str, terms: Vec<String>) {
        self.call_terms.set(call, terms);
    }

    /// Says that a leg's last utterance has been published.
    pub fn leg_ended(&self, call: &str, leg: Leg) {
        let _ = self.bus.send(Arc::new(SpeechEvent::LegEnded { call: call.to_owned(), leg }));
    }

    /// Starts a worker for one leg whose audio arrives at `rate` Hz and whose first sample
    /// is `offset_secs` into the call: utterance times are published from the call's start,
    /// so both legs of a call share one time base.
    pub fn open_leg(
        &self,
        call: &str,
        leg: Leg,
        rate: u32,
        offset_secs: f64,
        config: &SpeechConfig,
    ) -> Result<LegFeed, LegError> {
        let resampler = StreamResampler::new(rate, 16_000).map_err(|source| LegError::Rate { rate, source })?;
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let mut pipeline = LegPipeline::new(&self.models, config.vad_params(), config.decode_options());
        let terms_seen = self.call_terms.version.load(Ordering::Acquire);
        if let Some(terms) = self.call_terms.of(call) {
            pipeline.set_hotwords(terms.to_vec());
        }
        let worker = LegWorker {
            service: self.clone(),
            call: call.to_owned(),
            leg,
            rate,
            offset_secs: offset_secs.max(0.0),
            resampler,
            pipeline,
            terms_seen,
            audio: self.audio_store.clone().map(|vault| (AudioChunker::new(leg, rate, offset_secs.max(0.0)), vault)),
        };
        let name = format!("speech-{}", leg.name());
        let thread = std::thread::Builder::new().name(name).spawn(move || worker.run(rx)).map_err(LegError::Thread)?;
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        // Reap the legs that have ended, so the list is as long as the open legs.
        let (done, open): (Vec<Worker>, Vec<Worker>) = workers.drain(..).partition(|w| w.thread.is_finished());
        *workers = open;
        workers.push(Worker { call: call.to_owned(), leg, thread });
        drop(workers);
        for w in done {
            let _ = w.thread.join();
        }
        Ok(LegFeed { tx })
    }

    /// Waits for every leg's worker to flush its last utterance and end (their feeds must
    /// have been dropped). Blocking: run it off the async workers.
    fn join_workers(&self) {
        let workers: Vec<Worker> = self.workers.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        for w in workers {
            if !w.thread.is_finished() {
                log::info!(component = COMPONENT, call_id = w.call.as_str(); "{} leg: waiting for its last utterance", w.leg.name());
            }
            if w.thread.join().is_err() {
                log::error!(component = COMPONENT, call_id = w.call.as_str(); "{} leg: the worker panicked", w.leg.name());
            }
        }
    }

    /// Worker threads not yet joined, by call and leg (for the shutdown log).
    fn pending(&self) -> Vec<String> {
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        workers.iter().filter(|w| !w.thread.is_finished()).map(|w| format!("{} {}", w.call, w.leg.name())).collect()
    }
}

/// The `speech` component: reports health while running; at its stage of shutdown (the
/// inputs have ended and dropped every feed) joins every worker thread, so that each
/// leg's last utterance is published before understanding drains the bus.
pub async fn run(
    service: SpeechService,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), std::io::Error> {
    health.set(COMPONENT, HealthState::Ok, "models loaded");
    shutdown.wait().await;
    let pending = service.pending();
    if !pending.is_empty() {
        log::info!(component = COMPONENT; "finishing the last utterances of {} leg(s): {}", pending.len(), pending.join(", "));
    }
    let joiner = service.clone();
    tokio::task::spawn_blocking(move || joiner.join_workers()).await.map_err(std::io::Error::other)?;
    health.set(COMPONENT, HealthState::Stopped, "every leg's speech finished");
    Ok(())
}

struct LegWorker {
    service: SpeechService,
    call: String,
    leg: Leg,
    rate: u32,
    offset_secs: f64,
    resampler: StreamResampler,
    pipeline: LegPipeline,
    /// `CallTerms::version` when this leg last looked for its call's hotwords.
    terms_seen: u64,
    audio: Option<(AudioChunker, CallVault)>,
}

impl LegWorker {
    fn run(mut self, mut rx: mpsc::Receiver<Vec<i16>>) {
        let stats = self.service.stats.clone();
        stats.legs_open.fetch_add(1, Ordering::Relaxed);
        stats.legs_total.fetch_add(1, Ordering::Relaxed);
        let mut received: u64 = 0;
        let mut failed = false;
        while let Some(samples) = rx.blocking_recv() {
            received += samples.len() as u64;
            if let Some((chunker, _)) = &mut self.audio {
                let chunks = chunker.push(&samples);
                self.keep_audio(chunks);
            }
            if failed {
                continue; // keep draining so the input never blocks on a dead leg
            }
            self.take_new_hotwords();
            let audio = self.resampler.push(&samples);
            failed = !self.step(|p| p.push(&audio));
        }
        if !failed {
            self.take_new_hotwords();
            let tail = self.resampler.finish();
            if self.step(|p| p.push(&tail)) {
                self.step(LegPipeline::finish);
            }
        }
        if let Some((chunker, vault)) = self.audio.take() {
            // The last chunk, marked as such: the leg's audio is whole.
            let last = StoreOp::Audio { call: self.call.clone(), chunk: chunker.finish() };
            if let Err(e) = vault.write_blocking(last) {
                log::warn!(component = COMPONENT, call_id = self.call.as_str(); "{} leg: end of audio not kept: {e}", self.leg.name());
            }
        }
        stats.audio_ms.fetch_add(received * 1000 / u64::from(self.rate.max(1)), Ordering::Relaxed);
        stats.legs_open.fetch_sub(1, Ordering::Relaxed);
        self.service.leg_ended(&self.call, self.leg);
    }

    /// Takes the call's hotwords if `call info` changed them since this leg last looked.
    fn take_new_hotwords(&mut self) {
        let terms = &self.service.call_terms;
        let version = terms.version.load(Ordering::Acquire);
        if version != self.terms_seen {
            self.terms_seen = version;
            if let Some(terms) = terms.of(&self.call) {
                self.pipeline.set_hotwords(terms.to_vec());
            }
        }
    }

    /// Hands audio chunks to the store (waits while its queue is full: the store thread
    /// drops audio itself when the disk is nearly full). Once the store is closed, the
    /// rest of the leg's audio is not kept.
    fn keep_audio(&mut self, chunks: Vec<AudioChunk>) {
        let Some((_, vault)) = &self.audio else { return };
        let sent = chunks
            .into_iter()
            .try_for_each(|chunk| vault.write_blocking(StoreOp::Audio { call: self.call.clone(), chunk }));
        if let Err(e) = sent {
            log::warn!(component = COMPONENT, call_id = self.call.as_str(); "{} leg: audio no longer kept: {e}", self.leg.name());
            self.audio = None;
        }
    }

    /// Runs one pipeline step and publishes what it finished. False after an error.
    fn step(&mut self, f: impl FnOnce(&mut LegPipeline) -> Result<Vec<Utterance>, super::SpeechError>) -> bool {
        match f(&mut self.pipeline) {
            Ok(utterances) => {
                for mut utterance in utterances {
                    utterance.start_secs += self.offset_secs;
                    utterance.end_secs += self.offset_secs;
                    let event = UtteranceEvent { call: self.call.clone(), leg: self.leg, utterance };
                    self.service.publish(event);
                }
                true
            }
            Err(e) => {
                self.service.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::error!(component = COMPONENT, call_id = self.call.as_str(); "{} leg: speech stopped for this leg: {e}", self.leg.name());
                false
            }
        }
    }
}

/// Facts about the utterance, never its words: a transcript is personal data, and the
/// log is read by more people than the call store (`callbox watch` shows the text, and
/// says who watched).
fn log_utterance(event: &UtteranceEvent) {
    let u = &event.utterance;
    let compute_ms = u.asr.encoder_ms + u.asr.decoder_ms;
    log::info!(component = COMPONENT, call_id = event.call.as_str(), leg = event.leg.name();
        "{} utterance {:.2}–{:.2} s, {} chars, lang {}, asr {:.0} ms (encoder {:.0}) after {:.0} ms queued",
        event.leg.name(), u.start_secs, u.end_secs, u.text.chars().count(), u.asr.language, compute_ms,
        u.asr.encoder_ms, u.asr_queue_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calls_terms_are_found_by_call_the_newest_replacing_and_the_oldest_calls_aging_out() {
        let terms = CallTerms::default();
        assert_eq!(terms.of("a"), None);
        terms.set("a", vec!["停滞".into()]);
        terms.set("b", vec!["房地产".into()]);
        terms.set("a", vec!["安心贷".into()]);
        assert_eq!(terms.of("a").as_deref(), Some(&vec!["安心贷".to_owned()]));
        assert_eq!(terms.of("b").as_deref(), Some(&vec!["房地产".to_owned()]));
        // Every change moves the version a leg thread compares against.
        assert_eq!(terms.version.load(Ordering::Acquire), 3);
        for n in 0..REMEMBERED_CALL_TERMS - 1 {
            terms.set(&format!("call-{n}"), Vec::new());
        }
        assert!(terms.of("a").is_some(), "the newest {REMEMBERED_CALL_TERMS} calls are kept");
        assert_eq!(terms.of("b"), None, "the oldest went");
        assert_eq!(terms.recent.lock().unwrap().len(), REMEMBERED_CALL_TERMS);
    }
}
