//! Offline transcription of recordings, for technicians (`callbox transcribe`), the
//! benchmark (`callbox bench asr`) and the spool: WAV → per-leg 16 kHz → speech pipeline.

use std::fs::File;
use std::io::BufReader;
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

/// What stops a recording half-way through the speech pipeline.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("not a usable recording: {0}")]
    Recording(#[from] wav::WavError),
    #[error("speech: {0}")]
    Speech(#[from] SpeechError),
}

/// A recording opened for streaming: header parsed, samples still on disk.
pub type RecordingStream = wav::WavReader<BufReader<File>>;

/// Opens a recording no larger than `spool.max_file_mb` (the CLI and the spool share
/// the bound) and parses its header; the samples are read block by block later.
pub fn open_recording(
    path: &Path,
    spool: &SpoolConfig,
    links: crate::fsio::Links,
) -> Result<RecordingStream, RecordingError> {
    let max_bytes = spool.max_file_mb * 1024 * 1024;
    let (file, size) = crate::fsio::open_regular(path, links).map_err(RecordingError::Read)?;
    if size > max_bytes {
        return Err(RecordingError::TooLarge { max_mb: spool.max_file_mb });
    }
    // `size` is the regular file's length at open: a file still growing is read only
    // that far, so the bound holds.
    Ok(wav::WavReader::new(BufReader::with_capacity(READ_BUFFER_BYTES, file), size)?)
}

/// Reads and parses a whole recording into memory (benchmarks on short clips).
pub fn read_recording(path: &Path, spool: &SpoolConfig, links: crate::fsio::Links) -> Result<wav::Wav, RecordingError> {
    Ok(open_recording(path, spool, links)?.read_to_end()?)
}

/// The legs of a recording's channels: mono → `mono_leg`; stereo → left is `left_channel`.
pub fn leg_layout(channels: u16, spool: &SpoolConfig) -> Vec<Leg> {
    match channels {
        1 => vec![spool.mono_leg],
        2 => vec![spool.left_channel, spool.left_channel.other()],
        _ => Vec::new(),
    }
}

const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Samples the pipeline is fed at a time: 20 ms at 16 kHz, as a live input would.
const PIECE_SAMPLES: usize = 320;

/// One leg on its way through the speech pipeline: resampled to 16 kHz and fed in
/// 20-ms pieces whatever sizes the blocks come in, so a streamed recording gives the
/// same utterances as one decoded whole.
struct LegStream {
    resampler: resample::StreamResampler,
    pipeline: LegPipeline,
    pending: Vec<f32>,
}

impl LegStream {
    fn new(models: &SpeechModels, speech: &SpeechConfig, rate: u32) -> Result<Self, SpeechError> {
        Ok(Self {
            resampler: resample::StreamResampler::new(rate, 16_000).map_err(|e| SpeechError::model("resampler", e))?,
            pipeline: LegPipeline::new(models, speech.vad_params(), speech.decode_options()),
            pending: Vec::with_capacity(2 * PIECE_SAMPLES),
        })
    }

    fn push(&mut self, samples: &[i16]) -> Result<Vec<Utterance>, SpeechError> {
        let audio = self.resampler.push(samples);
        self.feed(&audio)
    }

    fn feed(&mut self, audio: &[f32]) -> Result<Vec<Utterance>, SpeechError> {
        let mut out = Vec::new();
        let mut rest = audio;
        if !self.pending.is_empty() {
            let take = (PIECE_SAMPLES - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == PIECE_SAMPLES {
                out.extend(self.pipeline.push(&self.pending)?);
                self.pending.clear();
            }
        }
        let mut pieces = rest.chunks_exact(PIECE_SAMPLES);
        for piece in &mut pieces {
            out.extend(self.pipeline.push(piece)?);
        }
        self.pending.extend_from_slice(pieces.remainder());
        Ok(out)
    }

    fn finish(mut self) -> Result<Vec<Utterance>, SpeechError> {
        let tail = self.resampler.finish();
        let mut out = self.feed(&tail)?;
        if !self.pending.is_empty() {
            out.extend(self.pipeline.push(&self.pending)?);
        }
        out.extend(self.pipeline.finish()?);
        Ok(out)
    }
}

/// Runs one leg's PCM (any rate the resampler takes) through a fresh pipeline.
pub fn transcribe_leg(
    models: &SpeechModels,
    speech: &SpeechConfig,
    samples: &[i16],
    rate: u32,
) -> Result<Vec<Utterance>, SpeechError> {
    let mut leg = LegStream::new(models, speech, rate)?;
    let mut out = leg.push(samples)?;
    out.extend(leg.finish()?);
    Ok(out)
}

/// Runs a recording through one pipeline per leg, a second of audio at a time, so
/// memory stays flat however long the recording is. Utterances come back in time order.
pub fn transcribe_stream<R: std::io::Read>(
    models: &SpeechModels,
    speech: &SpeechConfig,
    recording: &mut wav::WavReader<R>,
    legs: &[Leg],
) -> Result<Vec<LegUtterance>, StreamError> {
    let mut streams = legs
        .iter()
        .map(|&leg| Ok((leg, LegStream::new(models, speech, recording.sample_rate)?)))
        .collect::<Result<Vec<_>, SpeechError>>()?;
    let block_frames = recording.sample_rate as usize;
    let mut out = Vec::new();
    loop {
        let block = recording.read_block(block_frames)?;
        if block.first().is_none_or(Vec::is_empty) {
            break;
        }
        for ((leg, stream), samples) in streams.iter_mut().zip(&block) {
            out.extend(stream.push(samples)?.into_iter().map(|utterance| LegUtterance { leg: *leg, utterance }));
        }
    }
    for (leg, stream) in streams {
        out.extend(stream.finish()?.into_iter().map(|utterance| LegUtterance { leg, utterance }));
    }
    out.sort_by(|a, b| a.utterance.start_secs.total_cmp(&b.utterance.start_secs));
    Ok(out)
}

pub fn transcribe_file(
    models: &SpeechModels,
    speech: &SpeechConfig,
    spool: &SpoolConfig,
    path: &Path,
) -> Result<FileTranscript, TranscribeError> {
    let input = |reason| TranscribeError::Input { path: path.display().to_string(), reason };
    let mut recording = open_recording(path, spool, crate::fsio::Links::Follow).map_err(input)?;
    let started = Instant::now();
    let legs = leg_layout(recording.channels, spool);
    let utterances = transcribe_stream(models, speech, &mut recording, &legs).map_err(|e| match e {
        StreamError::Recording(e) => input(RecordingError::Unusable(e)),
        StreamError::Speech(e) => TranscribeError::Speech(e),
    })?;
    let duration = recording.duration_secs();
    Ok(FileTranscript {
        file: path.display().to_string(),
        sample_rate: recording.sample_rate,
        duration_secs: duration,
        utterances,
        real_time_factor: if duration > 0.0 { started.elapsed().as_secs_f64() / duration } else { 0.0 },
    })
}
