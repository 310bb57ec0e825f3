//! The speech path: 16 kHz audio → VAD → utterances → ASR → timed transcripts.
//!
//! Models run in-process on tract. `manifest` checks what `models/build.sh` produced;
//! `mel`, `tokens`, `vad::Segmenter` and `pipeline::LegPipeline`'s bookkeeping are pure and
//! tested without models; `vad::SileroVad` and `whisper::Whisper` are the tract adapters.
//! Other ASR families (CTC models such as SenseVoice or Paraformer, streaming transducers)
//! plug in behind `Recognizer` when operators supply such weights.

pub mod attention;
pub mod decoding;
pub mod hotwords;
pub mod live;
pub mod manifest;
pub mod mel;
pub mod pipeline;
pub mod prosody;
pub mod scheduler;
pub mod tokens;
pub mod vad;
pub mod weights;
pub mod whisper;
pub mod zh;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

pub use decoding::DecodeOptions;
pub use manifest::ModelSet;

/// A loaded, optimised tract model, shareable between threads.
pub type Plan = Arc<tract_onnx::prelude::TypedRunnableModel>;

#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: bad model manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}")]
    Digest { path: PathBuf, expected: String, actual: String },
    #[error("model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error("vocabulary: {0}")]
    Vocabulary(String),
}

impl SpeechError {
    pub fn model(model: &str, reason: impl std::fmt::Display) -> Self {
        // tract errors carry their context chain; {:#} keeps it on one line.
        Self::Model { model: model.to_owned(), reason: format!("{reason:#}") }
    }
}

/// A tensor's values as `f32`s (model outputs are plain host tensors).
pub(crate) fn f32s(t: &tract_onnx::prelude::Tensor) -> tract_onnx::prelude::TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TranscriptStop {
    EndOfText,
    /// A looping tail was cut back to its first occurrence.
    Repetition,
    /// The tokens-per-second budget (or the decoder context) ran out.
    TokenLimit,
}

/// What the recogniser made of one stretch of audio.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transcript {
    pub text: String,
    /// The generated token ids (for runtime comparisons; not in the JSON output).
    #[serde(skip)]
    pub token_ids: Vec<u32>,
    pub language: String,
    pub tokens: usize,
    pub avg_logprob: f32,
    pub no_speech_prob: f32,
    /// Judged not to be speech (the text is then empty).
    pub no_speech: bool,
    pub stop: TranscriptStop,
    /// The kept decoding's temperature (0: greedy) and how many decodings followed the
    /// greedy one (Whisper's temperature fallback; each costs a decoder pass).
    pub temperature: f32,
    pub fallbacks: u32,
    pub audio_secs: f32,
    pub window_secs: u32,
    pub encoder_ms: f64,
    pub decoder_ms: f64,
}

/// An ASR model family. Audio is 16 kHz mono in −1..1.
pub trait Recognizer: Send + Sync {
    fn transcribe(&self, audio: &[f32], opts: &DecodeOptions) -> Result<Vec<Transcript>, SpeechError>;

    /// Several utterances at once, one result per utterance in order; a model that can
    /// share work between them overrides this.
    fn transcribe_batch(&self, requests: &[(&[f32], &DecodeOptions)]) -> Vec<Result<Vec<Transcript>, SpeechError>> {
        requests.iter().map(|&(audio, opts)| self.transcribe(audio, opts)).collect()
    }
}

/// Everything the speech path loads from a models folder, shared by all legs.
pub struct SpeechModels {
    pub vad: vad::SileroVad,
    pub asr: Arc<whisper::Whisper>,
    pub zh: Option<Arc<zh::TraditionalToSimplified>>,
    pub dir: PathBuf,
    /// The ASR workers every leg's utterances go to (one per core unless configured).
    pub asr_pool: Arc<whisper::AsrScheduler>,
}

impl SpeechModels {
    /// `asr_workers` ASR worker threads (0: one per core), each decoding up to `asr_batch`
    /// utterances together when every worker is busy.
    pub fn with_asr_scheduler(mut self, asr_workers: u32, asr_batch: u32) -> Result<Self, SpeechError> {
        self.asr_pool = asr_scheduler(&self.asr, asr_workers, asr_batch)?;
        Ok(self)
    }

    pub fn load(dir: &Path, bucket_secs: &[u32]) -> Result<Self, SpeechError> {
        let set = ModelSet::open(dir)?;
        let vad = vad::SileroVad::load(&set, set.for_task("vad")?)?;
        let asr_entry = set.for_task("asr")?;
        if asr_entry.family != "whisper" {
            return Err(SpeechError::model(&asr_entry.name, format!("family `{}` is not supported", asr_entry.family)));
        }
        let asr = Arc::new(whisper::Whisper::load(&set, asr_entry, bucket_secs)?);
        let zh = match set.for_task("zh-t2s") {
            Ok(entry) => Some(Arc::new(zh::TraditionalToSimplified::load(&set, entry)?)),
            Err(_) => None,
        };
        release_freed_memory();
        let asr_pool = asr_scheduler(&asr, 0, 1)?;
        Ok(Self { vad, asr, zh, dir: dir.to_path_buf(), asr_pool })
    }
}

/// The ASR worker pool over `asr`: `workers` threads (0: one per core), each decoding up
/// to `batch` utterances together.
fn asr_scheduler(
    asr: &Arc<whisper::Whisper>,
    workers: u32,
    batch: u32,
) -> Result<Arc<whisper::AsrScheduler>, SpeechError> {
    let asr = asr.clone();
    whisper::AsrScheduler::new(workers as usize, batch as usize, move || whisper::WhisperBatch::new(asr.clone()))
        .map(Arc::new)
        .map_err(|e| SpeechError::model("asr", format!("cannot start an ASR worker thread: {e}")))
}

/// Hands the heap's free pages back to the kernel. Loading reads ~400 MB of ONNX files and
/// builds the plans beside them; glibc keeps those freed pages in the process (and counted
/// in its RSS) unless asked, and a box's RAM budget is held to the RSS.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointer and invalidates no allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
