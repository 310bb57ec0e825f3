//! One leg's speech pipeline: 16 kHz samples in, finished utterances (times, transcript,
//! prosody) out. VAD runs on every 32 ms chunk as audio arrives; ASR runs when an
//! utterance ends, on that utterance's audio only. Only the audio of the utterance in
//! progress (plus the padding before it) is kept.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::decoding::DecodeOptions;
use super::prosody::{self, Prosody};
use super::vad::{Segment, Segmenter, SileroVad, VadParams, CHUNK};
use super::whisper::AsrScheduler;
use super::zh::TraditionalToSimplified;
use super::{SpeechError, SpeechModels, Transcript};

const RATE: f64 = 16_000.0;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Utterance {
    /// Seconds from the start of the leg's audio.
    pub start_secs: f64,
    pub end_secs: f64,
    pub text: String,
    pub prosody: Prosody,
    pub asr: Transcript,
    /// How long the utterance waited for an ASR worker (the shared scheduler), ms.
    pub asr_queue_ms: f64,
    /// From a worker taking it to its transcript, ms: its own encoder and decoder steps,
    /// and the encoders of utterances that joined its batch meanwhile.
    pub asr_worker_ms: f64,
    /// Audio heard after `end_secs` before the VAD closed the utterance (the hangover), ms.
    pub hangover_ms: f64,
    /// When the VAD closed it: the start of the daemon's share of the latency.
    #[serde(skip)]
    pub closed: Instant,
}

pub struct LegPipeline {
    vad: SileroVad,
    segmenter: Segmenter,
    asr: Arc<AsrScheduler>,
    zh: Option<Arc<TraditionalToSimplified>>,
    opts: DecodeOptions,
    pad: u64,
    /// Audio from sample `buffer_start` on; VAD has seen the first `processed` samples.
    buffer: Vec<f32>,
    buffer_start: u64,
    processed: u64,
}

impl LegPipeline {
    pub fn new(models: &SpeechModels, params: VadParams, opts: DecodeOptions) -> Self {
        Self {
            vad: models.vad.fresh(),
            segmenter: Segmenter::new(params),
            asr: models.asr_pool.clone(),
            zh: models.zh.clone(),
            opts,
            pad: u64::from(params.speech_pad_ms) * 16,
            buffer: Vec::new(),
            buffer_start: 0,
            processed: 0,
        }
    }

    /// Feeds 16 kHz mono samples (−1..1); returns utterances that ended within them.
    /// The terms the utterances from now on favour (a call's campaign became known).
    pub fn set_hotwords(&mut self, terms: Vec<String>) {
        self.opts.hotwords = terms;
    }

    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Utterance>, SpeechError> {
        self.buffer.extend_from_slice(samples);
        let mut out = Vec::new();
        let mut chunk = [0f32; CHUNK];
        while self.buffer_start + self.buffer.len() as u64 >= self.processed + CHUNK as u64 {
            let at = (self.processed - self.buffer_start) as usize;
            chunk.copy_from_slice(&self.buffer[at..at + CHUNK]);
            let prob = self.vad.probability(&chunk)?;
            self.processed += CHUNK as u64;
            if let Some(segment) = self.segmenter.push(prob, CHUNK) {
                let hangover = self.processed.saturating_sub(segment.end);
                out.push(self.recognise(segment, hangover)?);
            }
            self.trim();
        }
        Ok(out)
    }

    /// End of the leg: the partial chunk is padded with silence and speech in progress ends.
    pub fn finish(&mut self) -> Result<Vec<Utterance>, SpeechError> {
        let partial = (self.buffer_start + self.buffer.len() as u64 - self.processed) as usize;
        let mut out = Vec::new();
        if partial > 0 {
            out.extend(self.push(&vec![0.0; CHUNK - partial])?);
        }
        if let Some(segment) = self.segmenter.finish() {
            let hangover = self.processed.saturating_sub(segment.end);
            out.push(self.recognise(segment, hangover)?);
        }
        Ok(out)
    }

    /// `hangover`: samples the VAD heard after the segment's end before closing it.
    fn recognise(&self, segment: Segment, hangover: u64) -> Result<Utterance, SpeechError> {
        let from = segment.start.saturating_sub(self.buffer_start) as usize;
        let to = (segment.end.saturating_sub(self.buffer_start) as usize).min(self.buffer.len());
        let audio = &self.buffer[from.min(to)..to];
        // An ASR worker thread decodes it (with other legs' utterances when the box is
        // busy), so it travels as owned data.
        let (transcripts, served) = self.asr.submit((audio.to_vec(), self.opts.clone()));
        let asr =
            merge(transcripts?).ok_or_else(|| SpeechError::model("asr", "no transcript for a non-empty utterance"))?;
        // `asr.text` stays as the recogniser wrote it; `text` is what later stages read.
        let text = match (&self.zh, asr.language.as_str()) {
            (Some(zh), "zh") => zh.convert(&asr.text),
            _ => asr.text.clone(),
        };
        Ok(Utterance {
            start_secs: segment.start as f64 / RATE,
            end_secs: segment.end as f64 / RATE,
            prosody: prosody::analyse(audio, &text),
            text,
            asr,
            asr_queue_ms: served.waited.as_secs_f64() * 1000.0,
            asr_worker_ms: served.in_worker.as_secs_f64() * 1000.0,
            hangover_ms: hangover as f64 / RATE * 1000.0,
            // Submitted straight after the close: the copy of its audio lies between.
            closed: served.submitted,
        })
    }

    /// Drops audio no utterance can still need: all but the padding while silent, and
    /// everything before the padding of the utterance in progress.
    fn trim(&mut self) {
        let keep_from = match self.segmenter.speech_start() {
            Some(start) => start.saturating_sub(self.pad),
            None => self.processed.saturating_sub(self.pad),
        };
        if keep_from > self.buffer_start {
            let drop = ((keep_from - self.buffer_start) as usize).min(self.buffer.len());
            // Amortised: only compact once the dead prefix is large.
            if drop >= 16_000 || drop == self.buffer.len() {
                self.buffer.drain(..drop);
                self.buffer_start += drop as u64;
            }
        }
    }
}

/// One transcript's worth of facts for an utterance the recogniser took in several windows.
fn merge(parts: Vec<Transcript>) -> Option<Transcript> {
    let mut iter = parts.into_iter();
    let mut first = iter.next()?;
    for t in iter {
        first.text.push(' ');
        first.text.push_str(&t.text);
        first.tokens += t.tokens;
        first.token_ids.extend(t.token_ids);
        first.audio_secs += t.audio_secs;
        first.encoder_ms += t.encoder_ms;
        first.decoder_ms += t.decoder_ms;
        first.fallbacks += t.fallbacks;
        first.temperature = first.temperature.max(t.temperature);
        first.no_speech &= t.no_speech;
    }
    Some(first)
}
