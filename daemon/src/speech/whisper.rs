//! Whisper (encoder + one-token decoder step with a caller-kept KV cache, as exported by
//! models/whisper/export_onnx.py) on tract, with greedy decoding and the guards a live system
//! needs: no-speech detection, repetition-loop cut-off and a tokens-per-second cap.
//!
//! The encoder runs on the utterance's own length, rounded up to a bucket, not on Whisper's
//! 30-s window: on 2–5 s phone utterances that is 5–15× less encoder work. One encoder plan
//! with a symbolic length serves every bucket, and one decoder plan with symbolic cache and
//! encoder lengths: each model's weights are packed once, and a decoder step attends to the
//! tokens so far. The decoder's matrices are held in fp16 by default (`weights`).

use std::io::Cursor;
use std::time::Instant;

use serde::Serialize;
use tract_onnx::prelude::*;

use super::hotwords::{HotwordMode, Hotwords};
use super::manifest::{ModelEntry, ModelSet};
use super::mel::{MelFrontEnd, SAMPLE_RATE};
use super::tokens::Vocabulary;
use super::weights::{narrow_to_f16, WeightFormat};
use super::{f32s, Plan, Recognizer, SpeechError, Transcript, TranscriptStop};

/// Encoder windows, in seconds; an utterance uses the smallest that holds it with margin.
/// One symbolic encoder plan serves them all, so a fine grid costs no memory and saves the
/// encoder the padding (4, 8, 15, 30 before: a 4.2-s utterance paid for 8 s).
/// Logit bias for a hotword's next token: e^2 ≈ 7× the odds, enough to turn a near miss
/// the audio supports, not enough to write a term the audio does not (a common choice for
/// shallow contextual biasing; not tuned on our evaluation clips).
pub const DEFAULT_HOTWORD_BIAS: f32 = 2.0;

pub const DEFAULT_BUCKETS: &[u32] = &[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 25, 30];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeOptions {
    /// Language code ("zh", "en", …) or "auto" to detect it per utterance.
    pub language: String,
    /// Tokens allowed per second of audio, plus a small constant; stops runaway decoding.
    pub max_tokens_per_sec: f32,
    /// Whisper's rule: no-speech probability above this and average log-probability below
    /// `logprob_threshold` mean the segment is not speech.
    pub no_speech_threshold: f32,
    pub logprob_threshold: f32,
    /// Silence (seconds) always left after the audio inside the encoder window: with none,
    /// Whisper tends to loop on the last words.
    pub tail_margin_secs: f32,
    /// Terms to favour (`speech.hotwords`), how, and the logit bias in bias mode.
    pub hotwords: Vec<String>,
    pub hotword_mode: HotwordMode,
    pub hotword_bias: f32,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            language: "zh".into(),
            max_tokens_per_sec: 12.0,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
            tail_margin_secs: 1.0,
            hotwords: Vec::new(),
            hotword_mode: HotwordMode::Bias,
            hotword_bias: DEFAULT_HOTWORD_BIAS,
        }
    }
}

pub struct Whisper {
    name: String,
    /// Encoder window lengths, ascending.
    buckets: Vec<u32>,
    /// One plan for every window length: its weights are held once.
    encoder: Plan,
    /// One plan for every window and cache length.
    decoder: Plan,
    vocab: Vocabulary,
    front_end: MelFrontEnd,
    layers: usize,
    d_model: usize,
    context: usize,
    /// Encoder's and decoder's.
    weights: (WeightFormat, WeightFormat),
}

/// The runnable plan of a model whose input facts are set, its weights held as `weights`.
fn plan(model: InferenceModel, weights: WeightFormat) -> TractResult<Plan> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    if weights == WeightFormat::F16 {
        narrow_to_f16(&mut typed)?;
    }
    typed.into_optimized()?.into_runnable()
}

fn dim(entry: &ModelEntry, key: &str) -> Result<usize, SpeechError> {
    usize::try_from(entry.extra_u64(key)?).map_err(|_| SpeechError::model(&entry.name, format!("{key} too large")))
}

impl Whisper {
    pub fn load(models: &ModelSet, entry: &ModelEntry, bucket_secs: &[u32]) -> Result<Self, SpeechError> {
        let name = entry.name.clone();
        let n_mels = dim(entry, "n_mels")?;
        let layers = dim(entry, "decoder_layers")?;
        let d_model = dim(entry, "d_model")?;
        let context = dim(entry, "decoder_context")?;
        let max_secs = entry.extra_u64("max_audio_secs")?;
        // Refused before the 300 MB of weights are read and parsed.
        if entry.extra.get("decoder_cache").and_then(serde_json::Value::as_str) != Some("growing") {
            return Err(SpeechError::model(
                &name,
                "its decoder keeps a fixed-size cache (callbox-models before release 3): install a newer \
                 callbox-models or rebuild with models/build.sh --force",
            ));
        }
        let weights_of = |key: &str, default| {
            WeightFormat::parse(entry.extra.get(key).and_then(serde_json::Value::as_str), default)
                .map_err(|reason| SpeechError::model(&name, format!("manifest `{key}`: {reason}")))
        };
        // The decoder reads its weights once per token (bandwidth-bound: fp16 is ~25 % faster
        // per token); the encoder reuses each weight across hundreds of frames (compute-bound:
        // fp16 packing costs it ~30 %), so fp32 is its default.
        let encoder_weights = weights_of("encoder_weights", WeightFormat::Fp32)?;
        let decoder_weights = weights_of("decoder_weights", WeightFormat::F16)?;
        let vocab_text = models.read_verified(entry, "tokens")?;
        let vocab = Vocabulary::parse(
            std::str::from_utf8(&vocab_text).map_err(|_| SpeechError::Vocabulary("tokens.txt is not UTF-8".into()))?,
        )?;
        let err = |e: TractError| SpeechError::model(&name, e);
        let onnx = tract_onnx::onnx();
        let mut secs: Vec<u32> = bucket_secs.iter().copied().filter(|&s| s > 0 && u64::from(s) <= max_secs).collect();
        secs.sort_unstable();
        secs.dedup();
        if secs.is_empty() {
            return Err(SpeechError::model(&name, format!("no encoder bucket between 1 and {max_secs} s")));
        }
        // One plan with a symbolic length serves every bucket: the weights (95 MB in fp32) are
        // packed once instead of once per bucket (measured with `bench asr`: encoder time
        // within ±13 % per clip of per-bucket plans, the same in total). Each file is read,
        // planned and dropped before the next, so loading peaks at one model's copies.
        let encoder = onnx.model_for_read(&mut Cursor::new(models.read_verified(entry, "encoder")?)).map_err(err)?;
        let frames = encoder.symbols.sym("frames");
        let encoder = encoder
            .with_input_fact(0, f32::fact(&[1.to_dim(), n_mels.to_dim(), frames.to_dim()]).into())
            .and_then(|m| plan(m, encoder_weights))
            .map_err(err)?;
        let decoder = onnx.model_for_read(&mut Cursor::new(models.read_verified(entry, "decoder")?)).map_err(err)?;
        // The cache length and the encoder length stay symbolic: the decoder's weights (most
        // of the model's memory) are packed once, and each step attends to the tokens so far
        // instead of a padded full context.
        let past = decoder.symbols.sym("past");
        let enc_len = decoder.symbols.sym("enc_len");
        let cache = f32::fact(&[layers.to_dim(), 1.to_dim(), past.to_dim(), d_model.to_dim()]);
        let cross = f32::fact(&[layers.to_dim(), 1.to_dim(), enc_len.to_dim(), d_model.to_dim()]);
        let decoder = decoder
            .with_input_fact(0, i64::fact([1, 1]).into())
            .and_then(|m| m.with_input_fact(1, i64::fact([1]).into()))
            .and_then(|m| m.with_input_fact(2, cache.clone().into()))
            .and_then(|m| m.with_input_fact(3, cache.into()))
            .and_then(|m| m.with_input_fact(4, cross.clone().into()))
            .and_then(|m| m.with_input_fact(5, cross.into()))
            .and_then(|m| plan(m, decoder_weights))
            .map_err(err)?;
        Ok(Self {
            name,
            buckets: secs,
            encoder,
            decoder,
            vocab,
            front_end: MelFrontEnd::new(n_mels),
            layers,
            d_model,
            context,
            weights: (encoder_weights, decoder_weights),
        })
    }

    /// How the encoder's and the decoder's weight matrices are held (the manifest's
    /// `encoder_weights` and `decoder_weights`).
    pub fn weight_formats(&self) -> (WeightFormat, WeightFormat) {
        self.weights
    }

    pub fn bucket_secs(&self) -> Vec<u32> {
        self.buckets.clone()
    }

    /// Longest audio one call to `transcribe_window` takes, in samples.
    pub fn max_window_samples(&self) -> usize {
        self.buckets.last().map_or(0, |&secs| secs as usize * SAMPLE_RATE as usize)
    }

    /// The smallest window (seconds) that holds `samples` plus `margin`, else the largest.
    fn window_for(&self, samples: usize, margin: usize) -> u32 {
        let need = samples + margin;
        self.buckets
            .iter()
            .copied()
            .find(|&secs| secs as usize * SAMPLE_RATE as usize >= need)
            .or_else(|| self.buckets.last().copied())
            .unwrap_or_else(|| unreachable!("load refuses an empty bucket list"))
    }

    /// Transcribes audio no longer than the largest bucket (longer input is cut there).
    pub fn transcribe_window(&self, audio: &[f32], opts: &DecodeOptions) -> Result<Transcript, SpeechError> {
        let err = |e: TractError| SpeechError::model(&self.name, e);
        let margin = (opts.tail_margin_secs.max(0.0) * SAMPLE_RATE as f32) as usize;
        let window_secs = self.window_for(audio.len(), margin);
        let window = window_secs as usize * SAMPLE_RATE as usize;
        let audio = &audio[..audio.len().min(window)];
        let started = Instant::now();
        let mel = self.front_end.log_mel(audio, window - audio.len());
        let mel = Tensor::from_shape(&[1, mel.bands, mel.frames], &mel.data).map_err(err)?;
        let cross = self.encoder.run(tvec!(mel.into_tvalue())).map_err(err)?;
        let (cross_k, cross_v) = match cross.as_slice() {
            [k, v] => (k.clone(), v.clone()),
            _ => return Err(SpeechError::model(&self.name, "encoder must give cross_k and cross_v")),
        };
        let encoder_ms = started.elapsed().as_secs_f64() * 1000.0;

        let started = Instant::now();
        let sp = self.vocab.specials;
        let duration = audio.len() as f32 / SAMPLE_RATE as f32;
        let hotwords = Hotwords::new(&self.vocab, &opts.hotwords);
        // Prompt mode: `<|startofprev|>` and the terms come first; the transcript's own
        // prompt starts at `sot`.
        let mut prompt: Vec<u32> = Vec::new();
        if let (HotwordMode::Prompt, Some(prev), false) =
            (opts.hotword_mode, sp.start_of_prev, hotwords.prompt.is_empty())
        {
            prompt.push(prev);
            prompt.extend_from_slice(&hotwords.prompt);
        }
        let sot = prompt.len();
        prompt.extend([sp.start_of_transcript, 0, sp.transcribe, sp.no_timestamps]);
        let bias = (opts.hotword_mode == HotwordMode::Bias && !hotwords.is_empty()).then_some(opts.hotword_bias);
        let mut language = opts.language.clone();
        let auto = language == "auto";
        if !auto {
            prompt[sot + 1] = self.vocab.language(&language).ok_or_else(|| {
                SpeechError::model(&self.name, format!("language `{language}` not in the vocabulary"))
            })?;
        }
        let budget = ((duration * opts.max_tokens_per_sec).ceil() as usize + 4).min(self.context - prompt.len() - 1);
        let mut step = DecoderStep::new(&self.decoder, self.layers, self.d_model).map_err(err)?;
        let mut generated: Vec<u32> = Vec::new();
        // Per generated token, so a cut tail's tokens leave the average with them.
        let mut logprobs: Vec<f32> = Vec::new();
        let mut no_speech_prob = 0.0f32;
        let mut stop = TranscriptStop::TokenLimit;
        let mut position = 0usize;
        loop {
            let token = if position < prompt.len() { prompt[position] } else { generated[position - prompt.len()] };
            let mut logits = step.run(token, position, &cross_k, &cross_v).map_err(err)?;
            position += 1;
            if position == sot + 1 {
                no_speech_prob = softmax_at(&logits, sp.no_speech as usize);
                if auto {
                    let (code, id) = self
                        .vocab
                        .languages
                        .iter()
                        .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
                        .ok_or_else(|| SpeechError::Vocabulary("no language tokens".into()))?;
                    language.clone_from(code);
                    prompt[sot + 1] = *id;
                }
            }
            if position < prompt.len() {
                continue;
            }
            let first = generated.is_empty();
            if let Some(bias) = bias {
                hotwords.bias(&generated, &mut logits, bias);
            }
            let (next, logprob) = self.pick(&logits, first);
            if next == sp.end_of_text {
                stop = TranscriptStop::EndOfText;
                break;
            }
            generated.push(next);
            logprobs.push(logprob);
            if let Some(keep) = repetition_cut(&generated) {
                generated.truncate(keep);
                stop = TranscriptStop::Repetition;
                break;
            }
            if generated.len() >= budget || position >= self.context - 1 {
                break;
            }
        }
        if stop == TranscriptStop::EndOfText {
            if let Some(keep) = doubled_utterance(&generated) {
                generated.truncate(keep);
                stop = TranscriptStop::Repetition;
            }
        }
        logprobs.truncate(generated.len());
        let avg_logprob = if logprobs.is_empty() {
            0.0
        } else {
            (logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64) as f32
        };
        let no_speech = no_speech_prob > opts.no_speech_threshold && avg_logprob < opts.logprob_threshold;
        let text = if no_speech { String::new() } else { self.vocab.decode(&generated).trim().to_owned() };
        Ok(Transcript {
            text,
            language,
            tokens: generated.len(),
            token_ids: generated,
            avg_logprob,
            no_speech_prob,
            no_speech,
            stop,
            audio_secs: duration,
            window_secs,
            encoder_ms,
            decoder_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Greedy choice with Whisper's suppressions: no special tokens but end-of-text, and
    /// neither a blank nor end-of-text as the first token. Returns the token and its log-prob.
    fn pick(&self, logits: &[f32], first: bool) -> (u32, f32) {
        let sp = self.vocab.specials;
        let allowed = |id: usize| {
            let id = id as u32;
            if first && (id == sp.end_of_text || Some(id) == self.vocab.blank) {
                return false;
            }
            id < sp.first_special || id == sp.end_of_text
        };
        let mut best = (sp.end_of_text, f32::NEG_INFINITY);
        let mut max = f32::NEG_INFINITY;
        for (id, &l) in logits.iter().enumerate() {
            if allowed(id) {
                max = max.max(l);
                if l > best.1 {
                    best = (id as u32, l);
                }
            }
        }
        let sum: f32 = logits.iter().enumerate().filter(|(id, _)| allowed(*id)).map(|(_, &l)| (l - max).exp()).sum();
        (best.0, best.1 - max - sum.ln())
    }
}

impl Recognizer for Whisper {
    fn transcribe(&self, audio: &[f32], opts: &DecodeOptions) -> Result<Vec<Transcript>, SpeechError> {
        let window = self.max_window_samples();
        if window == 0 {
            return Ok(Vec::new());
        }
        audio.chunks(window).map(|chunk| self.transcribe_window(chunk, opts)).collect()
    }
}

fn softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits.get(index).map_or(0.0, |&l| (l - max).exp() / sum)
}

/// If the tail of `tokens` is one pattern repeated (a single token 6 times, a 2–7 token
/// pattern 3 times, an 8–64 token phrase twice back to back), the length to keep:
/// everything up to the end of the first occurrence of the repeated phrase. Checked after
/// every token, so a loop stops as soon as it shows.
///
/// The repeated stretch is followed back to where the loop began, not only to where a
/// tail-aligned copy starts: "It is $99.00 a month. It is $99.00 a month. It is $" keeps
/// "It is $99.00 a month.", where cutting at the first tail-aligned copy of "99.00 a month.
/// It is $" used to leave the doubled tail "… a month. It is $".
pub fn repetition_cut(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    for period in 1..=64usize {
        let repeats = match period {
            1 => 6,
            2..=7 => 3,
            _ => 2,
        };
        let span = period * repeats;
        // Spans do not grow with the period (3 × 7 > 2 × 8): skip, never stop early.
        if span > n {
            continue;
        }
        if let Some(start) = periodic_start(tokens, period, span) {
            return Some(start + period);
        }
    }
    None
}

/// A finished utterance that is one phrase of 4+ tokens said twice and nothing else —
/// Whisper's doubling of a short greeting on phone audio — keeps one copy. Shorter phrases
/// said twice (好的好的, 对对) are what people say. Only for a decoding that ended by itself:
/// a doubled start may go on with other words.
pub fn doubled_utterance(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    (n >= 8 && n % 2 == 0 && tokens[..n / 2] == tokens[n / 2..]).then_some(n / 2)
}

/// Where a stretch of period `period` that covers at least the last `span` tokens begins,
/// followed back as far as it goes; `None` when the last `span` tokens are not periodic.
fn periodic_start(tokens: &[u32], period: usize, span: usize) -> Option<usize> {
    let n = tokens.len();
    let tail = &tokens[n - span..];
    if !tail.chunks(period).all(|c| c == &tail[..period]) {
        return None;
    }
    let mut start = n - span;
    while start > 0 && tokens[start - 1] == tokens[start - 1 + period] {
        start -= 1;
    }
    Some(start)
}

/// The decoder's per-utterance state: the self-attention keys and values of the tokens so far,
/// per layer, appended to after every step.
struct DecoderStep {
    /// Kept for the whole utterance: spawning a fresh state per token costs more than a
    /// small layer's work.
    state: TypedSimpleState,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    d_model: usize,
}

impl DecoderStep {
    fn new(plan: &Plan, layers: usize, d_model: usize) -> TractResult<Self> {
        Ok(Self { state: plan.spawn()?, keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers], d_model })
    }

    /// The cache as the plan's `[layers, 1, past, d]` input.
    fn tensor(rows: &[Vec<f32>], d_model: usize) -> TractResult<Tensor> {
        let past = rows.first().map_or(0, |r| r.len() / d_model);
        let flat: Vec<f32> = rows.concat();
        Tensor::from_shape(&[rows.len(), 1, past, d_model], &flat)
    }

    fn run(&mut self, token: u32, position: usize, cross_k: &TValue, cross_v: &TValue) -> TractResult<Vec<f32>> {
        let inputs = tvec!(
            Tensor::from_shape(&[1, 1], &[i64::from(token)])?.into_tvalue(),
            Tensor::from_shape(&[1], &[position as i64])?.into_tvalue(),
            Self::tensor(&self.keys, self.d_model)?.into_tvalue(),
            Self::tensor(&self.values, self.d_model)?.into_tvalue(),
            cross_k.clone(),
            cross_v.clone(),
        );
        let out = self.state.run(inputs)?;
        let [logits, new_k, new_v] = out.as_slice() else {
            return Err(TractError::msg("decoder must give logits, new_k, new_v"));
        };
        let d = self.d_model;
        for (cache, new) in [(&mut self.keys, new_k), (&mut self.values, new_v)] {
            let new = f32s(new)?;
            for (layer, rows) in cache.iter_mut().enumerate() {
                rows.extend_from_slice(&new[layer * d..(layer + 1) * d]);
            }
        }
        Ok(f32s(logits)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::{doubled_utterance, repetition_cut};

    #[test]
    fn a_looping_tail_is_cut_back_to_its_first_occurrence() {
        let mut t = vec![1, 2, 3];
        t.extend([7, 8, 9].repeat(3));
        assert_eq!(repetition_cut(&t), Some(6));
        let mut single = vec![5, 6];
        single.extend([4; 6]);
        assert_eq!(repetition_cut(&single), Some(3));
        // A whole sentence said twice (the 8 kHz loop seen on a podcast clip).
        let sentence: Vec<u32> = (100..112).collect();
        let twice = [vec![1], sentence.clone(), sentence].concat();
        assert_eq!(repetition_cut(&twice), Some(13));
    }

    #[test]
    fn a_doubled_tail_is_followed_back_to_where_the_loop_began() {
        // "It is $99.00 a month. It is $99.00 a month. It is $" (the demo's agent line): the
        // tail-aligned copy is "99.00 a month. It is $"; the loop began at "It is".
        let sentence: Vec<u32> = (10..19).collect();
        let looped = [sentence.clone(), sentence.clone(), sentence[..3].to_vec()].concat();
        assert_eq!(repetition_cut(&looped), Some(9));
        // After words that are not part of the loop, those stay.
        let lead = [vec![1, 2], sentence.clone(), sentence.clone(), sentence[..4].to_vec()].concat();
        assert_eq!(repetition_cut(&lead), Some(11));
        // A short pattern looping mid-word: 1 2 [3 4 5]x3 + 3 → keep through the first 3 4 5.
        let short = [vec![1, 2], [3, 4, 5].repeat(3), vec![3]].concat();
        assert_eq!(repetition_cut(&short), Some(5));
    }

    #[test]
    fn a_short_utterance_said_twice_is_cut_once() {
        // 各位观众晚上好各位观众晚上好: a 1.3-s greeting doubled on 8-kHz audio.
        let greeting = vec![40, 41, 42, 43, 44, 45];
        assert_eq!(doubled_utterance(&[greeting.clone(), greeting.clone()].concat()), Some(6));
        // Four tokens twice is still a doubling; three twice (喂你好喂你好) is left alone, as
        // is a phrase said twice after other words (only a whole-utterance doubling is cut
        // for phrases under 8 tokens).
        assert_eq!(doubled_utterance(&[7, 8, 9, 10, 7, 8, 9, 10]), Some(4));
        assert_eq!(doubled_utterance(&[7, 8, 9, 7, 8, 9]), None);
        assert_eq!(doubled_utterance(&[1, 7, 8, 9, 10, 7, 8, 9, 10]), None);
        assert_eq!(repetition_cut(&[7, 8, 9, 10, 7, 8, 9, 10]), None);
    }

    #[test]
    fn a_phrase_of_eight_to_ten_tokens_said_twice_is_seen_whatever_the_length() {
        // 16–20 tokens: the 3-repeat spans of periods 6 and 7 are longer than the text,
        // which once stopped the search before the 2-repeat periods 8–10.
        let phrase: Vec<u32> = (50..58).collect();
        assert_eq!(repetition_cut(&[phrase.clone(), phrase.clone()].concat()), Some(8));
        let phrase: Vec<u32> = (50..60).collect();
        assert_eq!(repetition_cut(&[phrase.clone(), phrase.clone()].concat()), Some(10));
    }

    #[test]
    fn ordinary_text_and_short_repeats_are_kept() {
        assert_eq!(repetition_cut(&[1, 2, 3, 4, 5, 6, 7]), None);
        // 对对对 (one token three times) is speech, not a loop.
        assert_eq!(repetition_cut(&[9, 4, 4, 4]), None);
        assert_eq!(repetition_cut(&[1, 2, 1, 2]), None);
        // A short phrase said twice is speech too (好的好的).
        assert_eq!(repetition_cut(&[7, 3, 4, 3, 4]), None);
    }
}
