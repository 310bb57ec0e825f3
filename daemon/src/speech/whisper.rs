//! Whisper (encoder + one-token decoder step with a caller-kept KV cache, as exported by
//! models/whisper/export_onnx.py) on tract, with greedy decoding and the guards a live system
//! needs: no-speech detection, repetition-loop cut-off, a tokens-per-second cap and
//! Whisper's temperature fallback (a looping, over-compressible or improbable decoding is
//! decoded again, sampling at rising temperatures, from the same encoder output).
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

/// Whisper's and faster-whisper's settings, not tuned here: temperatures tried in turn after
/// a greedy decoding that loops or is improbable, and the zlib compression ratio above which
/// a text is taken to be looping. Off by default: on the shared clips it doubled the ASR
/// time (RTF 0.155 → 0.349) for no gain in CER (README, "Decoding choices").
pub const WHISPER_FALLBACK_TEMPERATURES: &[f32] = &[0.2, 0.4, 0.6, 0.8, 1.0];
pub const COMPRESSION_RATIO_THRESHOLD: f32 = 2.4;
/// Bounds `speech.fallback_temperatures` (each decoding costs a whole decoder pass).
pub const MAX_FALLBACKS: usize = 8;

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
    /// Temperatures for the decodings after a greedy one that loops (a cut repetition, the
    /// token budget run out, a text compressing better than `compression_ratio_threshold`)
    /// or whose average log-probability is under `logprob_threshold`. Empty: greedy only.
    pub fallback_temperatures: Vec<f32>,
    pub compression_ratio_threshold: f32,
    /// Decode with Whisper's timestamp tokens (as most of its training text was) and end
    /// the text where the audio ends, instead of `<|notimestamps|>`. On by default: the
    /// demo's four looping lines then end by themselves instead of being cut, for the same
    /// CER on the shared clips and ~5 % less decoder time (README, "Decoding choices").
    pub timestamps: bool,
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
            fallback_temperatures: Vec::new(),
            compression_ratio_threshold: COMPRESSION_RATIO_THRESHOLD,
            timestamps: true,
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
        prompt.extend([sp.start_of_transcript, 0, sp.transcribe]);
        // 50 timestamps per second; Whisper's last is 30.00 s.
        let stamps = match (opts.timestamps, sp.first_timestamp) {
            (true, Some(first)) => Some(StampSetup {
                first,
                audio_end: (duration * 50.0).ceil() as u32,
                window_end: (window_secs * 50).min(1500),
            }),
            _ => {
                prompt.push(sp.no_timestamps);
                None
            }
        };
        let mut setup = Setup {
            prompt,
            sot,
            language: opts.language.clone(),
            detect_language: opts.language == "auto",
            bias: (opts.hotword_mode == HotwordMode::Bias && !hotwords.is_empty()).then_some(opts.hotword_bias),
            hotwords,
            budget: 0,
            stamps,
        };
        if !setup.detect_language {
            setup.prompt[sot + 1] = self.vocab.language(&setup.language).ok_or_else(|| {
                SpeechError::model(&self.name, format!("language `{}` not in the vocabulary", setup.language))
            })?;
        }
        setup.budget =
            ((duration * opts.max_tokens_per_sec).ceil() as usize + 4).min(self.context - setup.prompt.len() - 1);
        // Sampling is seeded by the audio: the same utterance decodes the same way every time.
        let mut rng = SplitMix64(audio.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
        let mut tried: Vec<Decoding> = Vec::new();
        for temperature in std::iter::once(0.0).chain(opts.fallback_temperatures.iter().copied()) {
            let decoding = self.decode(&mut setup, &cross_k, &cross_v, temperature, &mut rng).map_err(err)?;
            // Language detected on the first decoding holds for the others.
            setup.detect_language = false;
            let done = !decoding.needs_fallback(opts);
            tried.push(decoding);
            if done {
                break;
            }
        }
        let fallbacks = tried.len().saturating_sub(1) as u32;
        let chosen = choose(tried, opts).ok_or_else(|| SpeechError::model(&self.name, "no decoding ran"))?;
        let no_speech = chosen.no_speech_prob > opts.no_speech_threshold && chosen.avg_logprob < opts.logprob_threshold;
        let text = if no_speech { String::new() } else { chosen.text.trim().to_owned() };
        Ok(Transcript {
            text,
            language: setup.language,
            tokens: chosen.tokens.len(),
            token_ids: chosen.tokens,
            avg_logprob: chosen.avg_logprob,
            no_speech_prob: chosen.no_speech_prob,
            no_speech,
            stop: chosen.stop,
            temperature: chosen.temperature,
            fallbacks,
            audio_secs: duration,
            window_secs,
            encoder_ms,
            decoder_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// One decoding of the encoder's output: greedy at temperature 0, else sampling from
    /// the softened distribution (Whisper's suppressions either way), cut where it loops.
    fn decode(
        &self,
        setup: &mut Setup,
        cross_k: &TValue,
        cross_v: &TValue,
        temperature: f32,
        rng: &mut SplitMix64,
    ) -> TractResult<Decoding> {
        let sp = self.vocab.specials;
        let sot = setup.sot;
        let mut step = DecoderStep::new(&self.decoder, self.layers, self.d_model)?;
        // Every generated token (text and timestamps), its log-prob, and the text alone with
        // where each text token sits among them (a cut loop is found in the text).
        let mut generated: Vec<u32> = Vec::new();
        let mut logprobs: Vec<f32> = Vec::new();
        let mut text: Vec<u32> = Vec::new();
        let mut text_at: Vec<usize> = Vec::new();
        let stamps = setup.stamps;
        let stamp = move |t: u32| stamps.and_then(|s| t.checked_sub(s.first));
        let mut no_speech_prob = 0.0f32;
        let mut stop = TranscriptStop::TokenLimit;
        let mut position = 0usize;
        loop {
            let prompt = &setup.prompt;
            let token = if position < prompt.len() { prompt[position] } else { generated[position - prompt.len()] };
            let mut logits = step.run(token, position, cross_k, cross_v)?;
            position += 1;
            if position == sot + 1 {
                no_speech_prob = softmax_at(&logits, sp.no_speech as usize);
                if setup.detect_language {
                    let (code, id) = self
                        .vocab
                        .languages
                        .iter()
                        .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
                        .ok_or_else(|| TractError::msg("no language tokens"))?;
                    setup.language.clone_from(code);
                    setup.prompt[sot + 1] = *id;
                }
            }
            if position < setup.prompt.len() {
                continue;
            }
            if let Some(bias) = setup.bias {
                setup.hotwords.bias(&text, &mut logits, bias);
            }
            let next = match stamps {
                Some(s) => timestamp_rule(&generated, stamp, s.audio_end, s.window_end),
                None => Allowed::plain(text.is_empty()),
            };
            let (token, logprob) = self.pick(&logits, next, text.is_empty(), temperature, rng);
            if token == sp.end_of_text {
                stop = TranscriptStop::EndOfText;
                break;
            }
            generated.push(token);
            logprobs.push(logprob);
            if stamp(token).is_none() {
                text.push(token);
                text_at.push(generated.len() - 1);
                if let Some(keep) = repetition_cut(&text) {
                    text.truncate(keep);
                    stop = TranscriptStop::Repetition;
                    break;
                }
            } else if let Some(s) = stamps {
                // A segment closed within the last half second: only the end may follow, so
                // the step that would say so is not run.
                let after = timestamp_rule(&generated, stamp, s.audio_end, s.window_end);
                if !after.text && after.stamps.is_none() {
                    stop = TranscriptStop::EndOfText;
                    break;
                }
            }
            if text.len() >= setup.budget || position >= self.context - 1 {
                break;
            }
        }
        if stop == TranscriptStop::EndOfText {
            if let Some(keep) = doubled_utterance(&text) {
                text.truncate(keep);
                stop = TranscriptStop::Repetition;
            }
        }
        // The log-probs of the tokens up to the last text token kept.
        logprobs.truncate(text.len().checked_sub(1).map_or(0, |last| text_at[last] + 1));
        let avg_logprob = if logprobs.is_empty() {
            0.0
        } else {
            (logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64) as f32
        };
        let generated = text;
        let text = self.vocab.decode(&generated);
        Ok(Decoding {
            compression_ratio: compression_ratio(text.trim()),
            text,
            tokens: generated,
            avg_logprob,
            no_speech_prob,
            stop,
            temperature,
        })
    }

    /// The next token among those `next` allows, under Whisper's suppressions (no special
    /// token but end-of-text and allowed timestamps; no blank first): the likeliest at
    /// temperature 0, else one drawn from softmax(logits / temperature). Returns the token
    /// and its log-prob (unscaled, as Whisper averages them).
    fn pick(&self, logits: &[f32], next: Allowed, first: bool, temperature: f32, rng: &mut SplitMix64) -> (u32, f32) {
        let sp = self.vocab.specials;
        let stamp_base = sp.first_timestamp.unwrap_or(u32::MAX);
        let mut next = next;
        let class = |id: usize| {
            let id = id as u32;
            if id == sp.end_of_text {
                Class::End
            } else if id < sp.first_special {
                if first && Some(id) == self.vocab.blank {
                    Class::Barred
                } else {
                    Class::Text
                }
            } else if id >= stamp_base {
                Class::Stamp(id - stamp_base)
            } else {
                Class::Barred
            }
        };
        // Whisper: when the timestamps together are likelier than any one text token, the
        // next token is a timestamp.
        if let (true, Some(_)) = (next.text, next.stamps) {
            let mut max_text = f32::NEG_INFINITY;
            let mut max_stamp = f32::NEG_INFINITY;
            for (id, &l) in logits.iter().enumerate() {
                match class(id) {
                    Class::Text => max_text = max_text.max(l),
                    c @ Class::Stamp(_) if next.admits(c) => max_stamp = max_stamp.max(l),
                    _ => {}
                }
            }
            let stamps_sum: f32 = logits
                .iter()
                .enumerate()
                .filter(|&(id, _)| matches!(class(id), c @ Class::Stamp(_) if next.admits(c)))
                .map(|(_, &l)| (l - max_stamp).exp())
                .sum();
            if max_stamp + stamps_sum.ln() > max_text {
                next.text = false;
            }
        }
        let allowed = |id: usize| next.admits(class(id));
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
        if temperature > 0.0 {
            let weight = |l: f32| ((l - max) / temperature).exp();
            let total: f32 = logits.iter().enumerate().filter(|(id, _)| allowed(*id)).map(|(_, &l)| weight(l)).sum();
            let mut target = rng.next_unit() * total;
            for (id, &l) in logits.iter().enumerate() {
                if allowed(id) {
                    target -= weight(l);
                    if target <= 0.0 {
                        best = (id as u32, l);
                        break;
                    }
                }
            }
            // Rounding can leave the draw past the last weight: the greedy choice stands.
        }
        (best.0, best.1 - max - sum.ln())
    }
}

/// What a vocabulary id is to the decoder's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Text,
    End,
    /// A timestamp, as its index (20 ms steps).
    Stamp(u32),
    Barred,
}

/// Which tokens may come next: text, end-of-text, timestamps in an index range (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Allowed {
    text: bool,
    end: bool,
    stamps: Option<(u32, u32)>,
}

impl Allowed {
    /// Without timestamps: any text, or the end (not first).
    fn plain(first: bool) -> Self {
        Self { text: true, end: !first, stamps: None }
    }

    fn admits(self, class: Class) -> bool {
        match class {
            Class::Text => self.text,
            Class::End => self.end,
            Class::Stamp(at) => self.stamps.is_some_and(|(lo, hi)| (lo..=hi).contains(&at)),
            Class::Barred => false,
        }
    }
}

/// Whisper's first timestamp is at most 1 s in (its `max_initial_timestamp`).
const MAX_INITIAL_STAMP: u32 = 50;
/// A segment ending this close to the audio's end (0.5 s) is the last one.
const LAST_SEGMENT_STAMPS: u32 = 25;

/// Timestamp mode: Whisper's rules (`ApplyTimestampRules`: the text opens with a timestamp
/// in the first second; timestamps come in pairs between segments and never go back; a
/// segment is never empty) over the tokens generated so far, plus one of ours: no segment
/// starts, and none follows one that ends, within 0.5 s of the audio's end — the rest of the
/// window is the silence margin, where Whisper repeats itself. `audio_end` and `window_end`
/// are timestamp indices; `stamp` tells a timestamp's index.
fn timestamp_rule(generated: &[u32], stamp: impl Fn(u32) -> Option<u32>, audio_end: u32, window_end: u32) -> Allowed {
    let n = generated.len();
    let Some(&last) = generated.last() else {
        return Allowed { text: false, end: false, stamps: Some((0, MAX_INITIAL_STAMP.min(audio_end))) };
    };
    let penultimate_is_stamp = n < 2 || stamp(generated[n - 2]).is_some();
    match stamp(last) {
        // A pair (end, start) or the opening stamp: no third timestamp.
        Some(_) if penultimate_is_stamp => Allowed { text: true, end: true, stamps: None },
        // A segment just ended: another may start (at or after it) or the text ends.
        Some(at) => {
            let latest_start = audio_end.saturating_sub(LAST_SEGMENT_STAMPS);
            let stamps = (at < latest_start).then_some((at, latest_start));
            Allowed { text: false, end: true, stamps }
        }
        // Inside a segment: more text, the end, or the segment's closing stamp after its start.
        None => {
            let opened = generated.iter().rev().find_map(|&t| stamp(t)).map_or(0, |s| s + 1);
            Allowed { text: true, end: true, stamps: (opened <= window_end).then_some((opened, window_end)) }
        }
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

/// What one decoding needs to know while it runs: the prompt, the language (found on the
/// first decoding when "auto"), the hotwords and the token budget.
struct Setup {
    prompt: Vec<u32>,
    sot: usize,
    language: String,
    detect_language: bool,
    hotwords: Hotwords,
    bias: Option<f32>,
    budget: usize,
    /// Timestamp mode: where the timestamps start in the vocabulary, and the audio's end and
    /// the window's end as timestamp indices.
    stamps: Option<StampSetup>,
}

#[derive(Debug, Clone, Copy)]
struct StampSetup {
    first: u32,
    audio_end: u32,
    window_end: u32,
}

/// One decoding's outcome, before the fallback rule picks among them.
struct Decoding {
    text: String,
    tokens: Vec<u32>,
    avg_logprob: f32,
    no_speech_prob: f32,
    stop: TranscriptStop,
    temperature: f32,
    compression_ratio: f32,
}

impl Decoding {
    /// A loop: cut (a repetition, the budget run out) or a text that compresses too well.
    fn loops(&self, opts: &DecodeOptions) -> bool {
        self.stop != TranscriptStop::EndOfText || self.compression_ratio > opts.compression_ratio_threshold
    }

    /// Whisper's rule: decode again if looping or improbable, unless it is likely silence
    /// (then the no-speech test decides and another decoding would not change it).
    fn needs_fallback(&self, opts: &DecodeOptions) -> bool {
        self.no_speech_prob <= opts.no_speech_threshold
            && (self.loops(opts) || self.avg_logprob < opts.logprob_threshold)
    }
}

/// The decoding to keep: the last one tried if it passed, else (all failed) the most
/// probable of those that do not loop, else the most probable — faster-whisper's choice.
fn choose(mut tried: Vec<Decoding>, opts: &DecodeOptions) -> Option<Decoding> {
    if tried.last().is_some_and(|d| !d.needs_fallback(opts)) {
        return tried.pop();
    }
    let any_clean = tried.iter().any(|d| !d.loops(opts));
    tried.into_iter().filter(|d| !any_clean || !d.loops(opts)).max_by(|a, b| a.avg_logprob.total_cmp(&b.avg_logprob))
}

/// Bytes of UTF-8 text over bytes of its zlib stream (level 6, as Python's `zlib.compress`):
/// Whisper's measure of a looping text.
pub fn compression_ratio(text: &str) -> f32 {
    if text.is_empty() {
        return 0.0;
    }
    let packed = miniz_oxide::deflate::compress_to_vec_zlib(text.as_bytes(), 6);
    text.len() as f32 / packed.len().max(1) as f32
}

/// A small, seedable generator for sampling (splitmix64): decoding must be reproducible,
/// and this is all the randomness it needs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
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
    use super::{
        choose, compression_ratio, doubled_utterance, repetition_cut, timestamp_rule, Allowed, Class, DecodeOptions,
        Decoding, SplitMix64, TranscriptStop,
    };

    fn decoding(text: &str, avg_logprob: f32, stop: TranscriptStop, temperature: f32) -> Decoding {
        Decoding {
            compression_ratio: compression_ratio(text),
            text: text.into(),
            tokens: Vec::new(),
            avg_logprob,
            no_speech_prob: 0.01,
            stop,
            temperature,
        }
    }

    #[test]
    fn a_looping_text_compresses_past_whispers_threshold_and_speech_does_not() {
        let opts = DecodeOptions::default();
        let looped = "我们这个产品是保本的，".repeat(6);
        assert!(compression_ratio(&looped) > opts.compression_ratio_threshold, "{}", compression_ratio(&looped));
        for said in ["您好，请问是王先生吗？我们这边是做理财产品的。", "It is $99.00 a month.", "好的好的"]
        {
            assert!(compression_ratio(said) < opts.compression_ratio_threshold, "{said}: {}", compression_ratio(said));
        }
        assert_eq!(compression_ratio(""), 0.0);
    }

    #[test]
    fn the_fallback_rule_keeps_a_passing_decoding_and_else_the_likeliest_clean_one() {
        let opts = DecodeOptions::default();
        let clean = decoding("您好请问是王先生吗", -0.3, TranscriptStop::EndOfText, 0.0);
        assert!(!clean.needs_fallback(&opts));
        // Cut loops, a run-out budget and improbable text all ask for another decoding …
        assert!(decoding("您好", -0.3, TranscriptStop::Repetition, 0.0).needs_fallback(&opts));
        assert!(decoding("您好", -0.3, TranscriptStop::TokenLimit, 0.0).needs_fallback(&opts));
        assert!(decoding("您好", -1.4, TranscriptStop::EndOfText, 0.0).needs_fallback(&opts));
        // … unless it is likely silence: the no-speech test decides that.
        let mut silent = decoding("嗯", -1.4, TranscriptStop::EndOfText, 0.0);
        silent.no_speech_prob = 0.9;
        assert!(!silent.needs_fallback(&opts));

        // The last decoding passed: it is kept.
        let tried = vec![
            decoding("您好", -1.5, TranscriptStop::EndOfText, 0.0),
            decoding("您好王先生", -0.5, TranscriptStop::EndOfText, 0.2),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.2));
        // All failed: the likeliest that does not loop, even if a looping one is likelier.
        let tried = vec![
            decoding("您好", -0.2, TranscriptStop::Repetition, 0.0),
            decoding("您好王", -1.6, TranscriptStop::EndOfText, 0.2),
            decoding("您好王先生", -1.2, TranscriptStop::EndOfText, 0.4),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.4));
        // All loop: the likeliest.
        let tried = vec![
            decoding("您好", -0.9, TranscriptStop::Repetition, 0.0),
            decoding("您好王", -0.4, TranscriptStop::TokenLimit, 0.2),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.2));
        assert!(choose(Vec::new(), &opts).is_none());
    }

    #[test]
    fn timestamps_open_the_text_pair_up_never_go_back_and_stop_at_the_audios_end() {
        // Text tokens are < 100, timestamps 100 + index; the audio ends at index 150 (3 s) in a
        // 4-s window (index 200).
        let stamp = |t: u32| t.checked_sub(100);
        let rule = |g: &[u32]| timestamp_rule(g, stamp, 150, 200);
        // First a timestamp, within the first second.
        assert_eq!(rule(&[]), Allowed { text: false, end: false, stamps: Some((0, 50)) });
        // After the opening stamp: text (or Whisper's empty end), no second stamp.
        assert_eq!(rule(&[100]), Allowed { text: true, end: true, stamps: None });
        // Inside a segment: its closing stamp lies after its opening one.
        assert_eq!(rule(&[105, 7, 8]), Allowed { text: true, end: true, stamps: Some((6, 200)) });
        // A segment closed at 1.2 s: the next starts there or later, before the last half second.
        assert_eq!(rule(&[105, 7, 8, 160]), Allowed { text: false, end: true, stamps: Some((60, 125)) });
        // A pair: text next.
        assert_eq!(rule(&[105, 7, 8, 160, 160]), Allowed { text: true, end: true, stamps: None });
        // A segment closed within 0.5 s of the audio's end: only the end may follow.
        assert_eq!(rule(&[105, 7, 8, 230]), Allowed { text: false, end: true, stamps: None });
        // No closing stamp fits in the window: text or the end.
        assert_eq!(timestamp_rule(&[100, 7], stamp, 150, 0), Allowed { text: true, end: true, stamps: None });
        // Without timestamps: text, and the end once something was said.
        assert_eq!(Allowed::plain(true), Allowed { text: true, end: false, stamps: None });
        assert!(Allowed::plain(false).admits(Class::End));
        assert!(!Allowed::plain(false).admits(Class::Stamp(0)) && !Allowed::plain(false).admits(Class::Barred));
    }

    #[test]
    fn sampling_is_reproducible_and_uniform_enough() {
        let draws = |seed| {
            let mut rng = SplitMix64(seed);
            (0..4000).map(|_| rng.next_unit()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let d = draws(7);
        assert!(d.iter().all(|u| (0.0..1.0).contains(u)));
        let low = d.iter().filter(|&&u| u < 0.5).count();
        assert!((1800..2200).contains(&low), "{low} of 4000 under 0.5");
    }

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
