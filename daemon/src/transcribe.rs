//! Offline transcription of recordings, for technicians (`callbox transcribe`), the
//! benchmark (`callbox bench asr`) and the spool: WAV → per-leg 16 kHz → speech pipeline.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::audio::{resample, wav, Leg};
use crate::config::{SpeechConfig, SpoolConfig};
use crate::speech::pipeline::{LegPipeline, Utterance};
use crate::speech::{SpeechError, SpeechModels};

#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("{path}: {reason}")]
    Input { path: String, reason: RecordingError },
    #[error(transparent)]
    Speech(#[from] SpeechError),
}

#[derive(Debug, Clone, Serialize)]
pub struct LegUtterance {
    pub leg: Leg,
    #[serde(flatten)]
    pub utterance: Utterance,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileTranscript {
    pub file: String,
    pub sample_rate: u32,
    pub duration_secs: f64,
    pub utterances: Vec<LegUtterance>,
    /// Wall-clock processing time over audio duration (all legs).
    pub real_time_factor: f64,
}

/// Why a recording cannot be used; its text goes to a reason file or a message.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("larger than spool.max_file_mb = {max_mb}")]
    TooLarge { max_mb: u64 },
    #[error("{0}")]
    Read(crate::fsio::ReadError),
    #[error("not a usable recording: {0}")]
    Unusable(#[from] wav::WavError),
}

/// Reads and parses a recording no larger than `spool.max_file_mb` (the CLI and the spool
/// share the bound).
pub fn read_recording(path: &Path, spool: &SpoolConfig, links: crate::fsio::Links) -> Result<wav::Wav, RecordingError> {
    let max_bytes = spool.max_file_mb * 1024 * 1024;
    let bytes = crate::fsio::read_bounded(path, max_bytes, links).map_err(|e| match e {
        crate::fsio::ReadError::TooLarge { .. } => RecordingError::TooLarge { max_mb: spool.max_file_mb },
        other => RecordingError::Read(other),
    })?;
    Ok(wav::parse(&bytes)?)
}

/// The legs of a recording: mono → `mono_leg`; stereo → left is `left_channel`.
pub fn legs<'a>(recording: &'a wav::Wav, spool: &SpoolConfig) -> Vec<(Leg, &'a [i16])> {
    match recording.channels.as_slice() {
        [mono] => vec![(spool.mono_leg, mono.as_slice())],
        [left, right] => vec![(spool.left_channel, left.as_slice()), (spool.left_channel.other(), right.as_slice())],
        _ => Vec::new(),
    }
}

/// Runs one leg's PCM (any rate the resampler takes) through a fresh pipeline.
pub fn transcribe_leg(
    models: &SpeechModels,
    speech: &SpeechConfig,
    samples: &[i16],
    rate: u32,
) -> Result<Vec<Utterance>, SpeechError> {
    // A no-op (just the scaling) when the recording is already at 16 kHz.
    let audio = resample::resample_all(samples, rate, 16_000).map_err(|e| SpeechError::model("resampler", e))?;
    let mut pipeline = LegPipeline::new(models, speech.vad_params(), speech.decode_options());
    // Fed in 20 ms pieces, as a live input would.
    let mut out = Vec::new();
    for piece in audio.chunks(320) {
        out.extend(pipeline.push(piece)?);
    }
    out.extend(pipeline.finish()?);
    Ok(out)
}

pub fn transcribe_file(
    models: &SpeechModels,
    speech: &SpeechConfig,
    spool: &SpoolConfig,
    path: &Path,
) -> Result<FileTranscript, TranscribeError> {
    let input = |reason| TranscribeError::Input { path: path.display().to_string(), reason };
    let recording = read_recording(path, spool, crate::fsio::Links::Follow).map_err(input)?;
    let started = Instant::now();
    let mut utterances = Vec::new();
    for (leg, samples) in legs(&recording, spool) {
        for utterance in transcribe_leg(models, speech, samples, recording.sample_rate)? {
            utterances.push(LegUtterance { leg, utterance });
        }
    }
    utterances.sort_by(|a, b| a.utterance.start_secs.total_cmp(&b.utterance.start_secs));
    let duration = recording.duration_secs();
    Ok(FileTranscript {
        file: path.display().to_string(),
        sample_rate: recording.sample_rate,
        duration_secs: duration,
        utterances,
        real_time_factor: if duration > 0.0 { started.elapsed().as_secs_f64() / duration } else { 0.0 },
    })
}
