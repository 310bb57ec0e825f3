//! Whisper (encoder + one-token decoder step with a caller-kept KV cache, as exported by
//! models/whisper/export_onnx.py) on tract: the decoding loop, with the rules of `decoding`
//! (timestamps, loop guards, temperature fallback) and no-speech detection.
//!
//! The encoder runs on the utterance's own length, rounded up to a bucket, not on Whisper's
//! 30-s window: on 2–5 s phone utterances that is 5–15× less encoder work. One encoder plan
//! with a symbolic length serves every bucket, and one decoder plan with symbolic cache and
//! encoder lengths: each model's weights are packed once, and a decoder step attends to the
//! tokens so far. The decoder's matrices are held in fp16 by default (`weights`).

use std::io::Cursor;
use std::time::Instant;

use tract_onnx::prelude::*;

use super::decoding::{
    choose, compression_ratio, doubled_utterance, repetition_cut, timestamp_rule, Allowed, Class, DecodeOptions,
    Decoding, SplitMix64,
};
use super::hotwords::{HotwordMode, Hotwords};
use super::manifest::{ModelEntry, ModelSet};
use super::mel::{MelFrontEnd, SAMPLE_RATE};
use super::tokens::Vocabulary;
use super::weights::{narrow_to_f16, WeightFormat};
use super::{f32s, Plan, Recognizer, SpeechError, Transcript, TranscriptStop};

/// Encoder windows, in seconds; an utterance uses the smallest that holds it with margin.
/// One symbolic encoder plan serves them all, so a fine grid costs no memory and saves the
/// encoder the padding (4, 8, 15, 30 before: a 4.2-s utterance paid for 8 s).
pub const DEFAULT_BUCKETS: &[u32] = &[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 25, 30];

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

fn softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits.get(index).map_or(0.0, |&l| (l - max).exp() / sum)
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
