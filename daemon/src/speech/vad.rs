//! Voice activity detection: Silero VAD (the openvino_16k ONNX export, which tract runs
//! exactly; the plain export's `If` node does not load) and a pure segmenter that turns its
//! per-chunk speech probabilities into utterances.

use std::io::Cursor;

use tract_onnx::prelude::*;

use super::manifest::{ModelEntry, ModelSet};
use super::{f32s, Plan, SpeechError};

/// Silero's chunk at 16 kHz: 512 new samples (32 ms) plus 64 samples of left context.
pub const CHUNK: usize = 512;
const CONTEXT: usize = 64;
const STATE_LEN: usize = 2 * 128;

/// Silero VAD with its recurrent state; one per audio stream.
pub struct SileroVad {
    plan: Plan,
    state: Tensor,
    context: [f32; CONTEXT],
    input: Vec<f32>,
}

impl SileroVad {
    pub fn load(models: &ModelSet, entry: &ModelEntry) -> Result<Self, SpeechError> {
        // The runner's framing is fixed by the export; a manifest that says otherwise is for
        // a different model.
        for (key, expected) in [("chunk_samples", CHUNK), ("context_samples", CONTEXT)] {
            if entry.extra_u64(key)? != expected as u64 {
                return Err(SpeechError::model(&entry.name, format!("{key} must be {expected} for this runner")));
            }
        }
        let bytes = models.read_verified(entry, "model")?;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut Cursor::new(bytes))
            .and_then(|m| m.with_input_fact(0, f32::fact([1, CONTEXT + CHUNK]).into()))
            .and_then(|m| m.with_input_fact(1, f32::fact([2, 1, 128]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| SpeechError::model(&entry.name, e))?;
        Ok(Self::with_plan(plan))
    }

    fn with_plan(plan: Plan) -> Self {
        Self {
            plan,
            state: Tensor::from(tract_ndarray::Array3::<f32>::zeros((2, 1, 128))),
            context: [0.0; CONTEXT],
            input: Vec::with_capacity(CONTEXT + CHUNK),
        }
    }

    /// A fresh stream sharing this one's loaded model.
    pub fn fresh(&self) -> Self {
        Self::with_plan(self.plan.clone())
    }

    /// Speech probability of one 512-sample chunk (16 kHz, −1..1).
    pub fn probability(&mut self, chunk: &[f32; CHUNK]) -> Result<f32, SpeechError> {
        self.input.clear();
        self.input.extend_from_slice(&self.context);
        self.input.extend_from_slice(chunk);
        self.context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        let input = Tensor::from_shape(&[1, CONTEXT + CHUNK], &self.input).map_err(|e| SpeechError::model("vad", e))?;
        let state = std::mem::replace(&mut self.state, Tensor::from(0f32));
        let outputs =
            self.plan.run(tvec!(input.into_tvalue(), state.into_tvalue())).map_err(|e| SpeechError::model("vad", e))?;
        crate::cpu::leave_wide_vectors();
        let prob = f32s(&outputs[0])
            .ok()
            .and_then(|s| s.first().copied())
            .ok_or_else(|| SpeechError::model("vad", "no probability output"))?;
        let new_state = outputs[1].clone().into_tensor();
        if new_state.len() != STATE_LEN {
            return Err(SpeechError::model("vad", format!("state has {} values", new_state.len())));
        }
        self.state = new_state;
        Ok(prob)
    }
}

/// Utterance segmentation thresholds (milliseconds at the 16 kHz pipeline rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadParams {
    /// Probability at or above which a chunk is speech.
    pub threshold: f32,
    /// Probability below which speech counts as paused (hysteresis; Silero uses threshold − 0.15).
    pub neg_threshold: f32,
    /// Shorter bursts are dropped (coughs, clicks).
    pub min_speech_ms: u32,
    /// Silence that ends an utterance: the hangover, and most of the end-of-words latency.
    pub min_silence_ms: u32,
    /// Audio kept before and after the detected speech.
    pub speech_pad_ms: u32,
    /// Longer speech is cut here so transcripts keep coming during a monologue.
    pub max_utterance_ms: u32,
}

impl Default for VadParams {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_speech_ms: 250,
            min_silence_ms: 400,
            speech_pad_ms: 150,
            max_utterance_ms: 15_000,
        }
    }
}

/// Sample span `[start, end)` of one utterance, padding included, at 16 kHz.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Silence,
    Speech { start: u64, silent_since: Option<u64> },
}

/// Pure: chunk probabilities in stream order → finished segments.
#[derive(Debug, Clone)]
pub struct Segmenter {
    params: VadParams,
    state: State,
    /// Samples seen so far (the end of the last chunk).
    position: u64,
}

const fn samples(ms: u32) -> u64 {
    ms as u64 * 16
}

impl Segmenter {
    pub fn new(params: VadParams) -> Self {
        Self { params, state: State::Silence, position: 0 }
    }

    /// Whether speech is in progress, and since which sample (padding not included).
    pub fn speech_start(&self) -> Option<u64> {
        match self.state {
            State::Speech { start, .. } => Some(start),
            State::Silence => None,
        }
    }

    /// Feeds the probability of the next `len`-sample chunk; returns a segment when one ends.
    pub fn push(&mut self, probability: f32, len: usize) -> Option<Segment> {
        let chunk_start = self.position;
        self.position += len as u64;
        let p = self.params;
        match self.state {
            State::Silence => {
                if probability >= p.threshold {
                    self.state = State::Speech { start: chunk_start, silent_since: None };
                }
                None
            }
            State::Speech { start, silent_since } => {
                if self.position - start >= samples(p.max_utterance_ms) {
                    // Cut and, if still speaking, go on at once with the next utterance.
                    self.state = if probability >= p.threshold {
                        State::Speech { start: self.position, silent_since: None }
                    } else {
                        State::Silence
                    };
                    return self.segment(start, self.position);
                }
                if probability >= p.threshold {
                    self.state = State::Speech { start, silent_since: None };
                    None
                } else if probability < p.neg_threshold {
                    let since = silent_since.unwrap_or(chunk_start);
                    if self.position - since >= samples(p.min_silence_ms) {
                        self.state = State::Silence;
                        self.segment(start, since)
                    } else {
                        self.state = State::Speech { start, silent_since: Some(since) };
                        None
                    }
                } else {
                    None
                }
            }
        }
    }

    /// End of stream: speech in progress becomes a last segment.
    pub fn finish(&mut self) -> Option<Segment> {
        match std::mem::replace(&mut self.state, State::Silence) {
            State::Speech { start, silent_since } => self.segment(start, silent_since.unwrap_or(self.position)),
            State::Silence => None,
        }
    }

    fn segment(&self, start: u64, end: u64) -> Option<Segment> {
        if end.saturating_sub(start) < samples(self.params.min_speech_ms) {
            return None;
        }
        let pad = samples(self.params.speech_pad_ms);
        Some(Segment { start: start.saturating_sub(pad), end: (end + pad).min(self.position) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(params: VadParams, probs: &[f32]) -> Vec<Segment> {
        let mut s = Segmenter::new(params);
        let mut out: Vec<Segment> = probs.iter().filter_map(|&p| s.push(p, CHUNK)).collect();
        out.extend(s.finish());
        out
    }

    fn params() -> VadParams {
        VadParams { speech_pad_ms: 0, ..VadParams::default() }
    }

    #[test]
    fn speech_between_silences_is_one_segment_ending_where_silence_began() {
        // 10 chunks silence, 20 speech, 20 silence (32 ms chunks; hangover 400 ms = 12.5 chunks).
        let probs: Vec<f32> = [vec![0.1; 10], vec![0.9; 20], vec![0.05; 20]].concat();
        let segs = run(params(), &probs);
        assert_eq!(segs, vec![Segment { start: 10 * 512, end: 30 * 512 }]);
    }

    #[test]
    fn a_short_pause_does_not_split_and_a_short_burst_is_dropped() {
        let probs: Vec<f32> =
            [vec![0.9; 10], vec![0.1; 5], vec![0.9; 10], vec![0.1; 20], vec![0.9; 3], vec![0.1; 20]].concat();
        let segs = run(params(), &probs);
        // One utterance across the 160 ms pause; the 96 ms burst (< 250 ms) is gone.
        assert_eq!(segs, vec![Segment { start: 0, end: 25 * 512 }]);
    }

    #[test]
    fn hysteresis_keeps_speech_through_middling_probabilities() {
        let probs: Vec<f32> = [vec![0.9; 10], vec![0.4; 30], vec![0.9; 5], vec![0.0; 20]].concat();
        assert_eq!(run(params(), &probs), vec![Segment { start: 0, end: 45 * 512 }]);
    }

    #[test]
    fn long_speech_is_cut_at_the_maximum_and_continues() {
        let p = VadParams { max_utterance_ms: 1024, ..params() }; // 32 chunks
        let probs: Vec<f32> = [vec![0.9; 50], vec![0.0; 20]].concat();
        let segs = run(p, &probs);
        assert_eq!(segs, vec![Segment { start: 0, end: 32 * 512 }, Segment { start: 32 * 512, end: 50 * 512 }]);
    }

    #[test]
    fn padding_widens_segments_within_the_stream() {
        let p = VadParams { speech_pad_ms: 64, ..VadParams::default() }; // 2 chunks
        let probs: Vec<f32> = [vec![0.0; 1], vec![0.9; 20], vec![0.0; 20]].concat();
        let segs = run(p, &probs);
        assert_eq!(segs, vec![Segment { start: 0, end: 23 * 512 }]);
    }

    #[test]
    fn speech_at_the_end_of_the_stream_is_flushed() {
        let probs: Vec<f32> = [vec![0.0; 5], vec![0.9; 20]].concat();
        assert_eq!(run(params(), &probs), vec![Segment { start: 5 * 512, end: 25 * 512 }]);
    }
}
