//! Whisper (encoder + a one-token decoder step for a batch of utterances, with caller-kept
//! self-attention caches, as exported by models/whisper/export_onnx.py) on tract: the
//! decoding loop, with the rules of `decoding` (timestamps, loop guards, temperature
//! fallback) and no-speech detection.
//!
//! The encoder runs on the utterance's own length, rounded up to a bucket, not on Whisper's
//! 30-s window: on 2–5 s phone utterances that is 5–15× less encoder work. One encoder plan
//! with a symbolic length serves every bucket; the decoder step is `layers + 1` plans with
//! a symbolic batch and cache length, with `attention` run between them on each
//! utterance's own encoder output. Each model's weights are packed once, a step attends to
//! the tokens so far, and utterances decoded together share each step's weight reads. The
//! decoder's matrices are held in fp16 by default (`weights`).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use super::attention;
use super::decoding::{
    choose, compression_ratio, doubled_utterance, repetition_cut, timestamp_rule, Allowed, DecodeOptions, Decoding,
    SplitMix64,
};
use super::hotwords::{HotwordMode, Hotwords};
use super::manifest::{ModelEntry, ModelSet};
use super::mel::{MelFrontEnd, SAMPLE_RATE};
use super::scheduler::{Abandoned, Batch, Scheduler};
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
    /// The decoder step as `layers + 1` plans (cross-attention runs between them, in
    /// `cross_attention`), each for every batch and cache length.
    decoder: Vec<Plan>,
    vocab: Vocabulary,
    front_end: MelFrontEnd,
    layers: usize,
    d_model: usize,
    heads: usize,
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
        let heads = dim(entry, "n_heads")?;
        if heads == 0 || d_model % heads != 0 {
            return Err(SpeechError::model(&name, format!("{heads} heads do not divide d_model {d_model}")));
        }
        let context = dim(entry, "decoder_context")?;
        let max_secs = entry.extra_u64("max_audio_secs")?;
        // Refused before the 300 MB of weights are read and parsed.
        if entry.extra.get("decoder_cache").and_then(serde_json::Value::as_str) != Some("split") {
            return Err(SpeechError::model(
                &name,
                "its decoder is one graph for one utterance per step (callbox-models before release 4): \
                 install a newer callbox-models or rebuild with models/build.sh --force",
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
        // The batch and the cache length stay symbolic: the decoder's weights (most of the
        // model's memory) are packed once, each step attends to the tokens so far instead of
        // a padded full context, and any number of utterances can share a step.
        let mut decoder = Vec::with_capacity(layers + 1);
        for part in 0..=layers {
            let model = onnx
                .model_for_read(&mut Cursor::new(models.read_verified(entry, &format!("decoder_{part}"))?))
                .map_err(err)?;
            let batch = model.symbols.sym("batch");
            let past = model.symbols.sym("past");
            let rows = f32::fact(&[batch.to_dim(), d_model.to_dim()]);
            let mut facts: Vec<InferenceFact> = if part == 0 {
                vec![i64::fact(&[batch.to_dim()]).into(), i64::fact(&[batch.to_dim()]).into()]
            } else {
                vec![rows.clone().into(), rows.into()]
            };
            if part < layers {
                let cache = f32::fact(&[batch.to_dim(), past.to_dim(), d_model.to_dim()]);
                facts.extend([
                    cache.clone().into(),
                    cache.into(),
                    f32::fact(&[batch.to_dim(), past.to_dim() + 1]).into(),
                ]);
            }
            let model = facts
                .into_iter()
                .enumerate()
                .try_fold(model, |m, (input, fact)| m.with_input_fact(input, fact))
                .and_then(|m| plan(m, decoder_weights))
                .map_err(err)?;
            decoder.push(model);
        }
        Ok(Self {
            name,
            buckets: secs,
            encoder,
            decoder,
            vocab,
            front_end: MelFrontEnd::new(n_mels),
            layers,
            d_model,
            heads,
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
        self.transcribe_windows(&[(audio, opts)])
            .transcripts
            .pop()
            .unwrap_or_else(|| Err(SpeechError::model(&self.name, "no transcript for the window")))
    }

    /// Transcribes several windows (each no longer than the largest bucket; longer input is
    /// cut there) together: each runs its own encoder, then their decodings advance one
    /// token each per decoder step, so the decoder's weights are read once per step for all
    /// of them. A window's result does not depend on the others it is decoded with (each
    /// attends only to its own audio and tokens; the masks hide the padding). One result
    /// per window, in order, and the decoder steps run.
    pub fn transcribe_windows(&self, windows: &[(&[f32], &DecodeOptions)]) -> Decoded {
        let window = self.max_window_samples();
        let requests: Vec<(&[f32], &DecodeOptions)> =
            windows.iter().map(|&(audio, opts)| (&audio[..audio.len().min(window)], opts)).collect();
        let mut decodings = Decodings::default();
        let transcripts = decodings
            .run(self, &requests)
            .into_iter()
            .map(|result| {
                result.and_then(|mut parts| {
                    parts.pop().ok_or_else(|| SpeechError::model(&self.name, "no transcript for the window"))
                })
            })
            .collect();
        Decoded { transcripts, steps: decodings.steps }
    }

    /// Runs the encoder on one window and sets its decoding up.
    fn prepare(&self, audio: &[f32], opts: &DecodeOptions) -> Result<Prepared, SpeechError> {
        let err = |e: TractError| SpeechError::model(&self.name, e);
        let margin = (opts.tail_margin_secs.max(0.0) * SAMPLE_RATE as f32) as usize;
        let window_secs = self.window_for(audio.len(), margin);
        let window = window_secs as usize * SAMPLE_RATE as usize;
        let audio = &audio[..audio.len().min(window)];
        let started = Instant::now();
        let mel = self.front_end.log_mel(audio, window - audio.len());
        let mel = Tensor::from_shape(&[1, mel.bands, mel.frames], &mel.data).map_err(err)?;
        let cross = self.encoder.run(tvec!(mel.into_tvalue())).map_err(err)?;
        crate::cpu::leave_wide_vectors();
        let (k, v) = match cross.as_slice() {
            [k, v] => (k.clone(), v.clone()),
            _ => return Err(SpeechError::model(&self.name, "encoder must give cross_k and cross_v")),
        };
        let frames = match k.shape() {
            [layers, 1, frames, d] if *layers == self.layers && *d == self.d_model => *frames,
            shape => return Err(SpeechError::model(&self.name, format!("encoder output has shape {shape:?}"))),
        };
        let encoder_ms = started.elapsed().as_secs_f64() * 1000.0;

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
        Ok(Prepared {
            setup,
            cross: Cross { k, v, frames },
            // Sampling is seeded by the audio: the same utterance decodes the same way every time.
            rng: SplitMix64(audio.len() as u64 ^ 0x9e37_79b9_7f4a_7c15),
            temperatures: std::iter::once(0.0).chain(opts.fallback_temperatures.iter().copied()).collect(),
            window_secs,
            duration,
            encoder_ms,
        })
    }

    /// A window's transcript from the decodings it went through (Whisper's choice among
    /// them when the fallback ran), with its timings.
    fn transcript(&self, row: &mut Row, opts: Option<&DecodeOptions>) -> Result<Transcript, SpeechError> {
        let opts = opts.ok_or_else(|| SpeechError::model(&self.name, "a window outlived its utterance"))?;
        let tried = std::mem::take(&mut row.tried);
        let fallbacks = tried.len().saturating_sub(1) as u32;
        let chosen = choose(tried, opts).ok_or_else(|| SpeechError::model(&self.name, "no decoding ran"))?;
        let no_speech = chosen.no_speech_prob > opts.no_speech_threshold && chosen.avg_logprob < opts.logprob_threshold;
        let item = &row.item;
        Ok(Transcript {
            text: if no_speech { String::new() } else { chosen.text.trim().to_owned() },
            language: item.setup.language.clone(),
            tokens: chosen.tokens.len(),
            token_ids: chosen.tokens,
            avg_logprob: chosen.avg_logprob,
            no_speech_prob: chosen.no_speech_prob,
            no_speech,
            stop: chosen.stop,
            temperature: chosen.temperature,
            fallbacks,
            audio_secs: item.duration,
            window_secs: item.window_secs,
            encoder_ms: item.encoder_ms,
            decoder_ms: row.decoder.as_secs_f64() * 1000.0,
        })
    }

    /// The next token among those `next` allows, under Whisper's suppressions (no special
    /// token but end-of-text and allowed timestamps; no blank first): the likeliest at
    /// temperature 0, else one drawn from softmax(logits / temperature). Returns the token
    /// and its log-prob (unscaled, as Whisper averages them).
    ///
    /// The allowed ids are a few ranges (text, end-of-text, a span of timestamps), so each
    /// pass walks those ranges rather than classifying every id. (The 5 ms per token this
    /// step once took was the CPU's vector-state penalty, `crate::cpu`, not these passes.)
    fn pick(&self, logits: &[f32], next: Allowed, first: bool, temperature: f32, rng: &mut SplitMix64) -> (u32, f32) {
        let sp = self.vocab.specials;
        let n = logits.len();
        let text_end = (sp.first_special as usize).min(n);
        let blank = if first { self.vocab.blank.map(|b| b as usize).filter(|&b| b < text_end) } else { None };
        let text: [std::ops::Range<usize>; 2] = match blank {
            Some(b) => [0..b, b + 1..text_end],
            None => [0..text_end, text_end..text_end],
        };
        let stamps = match (next.stamps, sp.first_timestamp) {
            (Some((lo, hi)), Some(base)) => {
                let end = (base as usize + hi as usize + 1).min(n);
                (base as usize + lo as usize).min(end)..end
            }
            _ => 0..0,
        };
        let max_of = |range: std::ops::Range<usize>| logits[range].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut next = next;
        // Whisper: when the timestamps together are likelier than any one text token, the
        // next token is a timestamp.
        if next.text && !stamps.is_empty() {
            let max_text = text.iter().map(|r| max_of(r.clone())).fold(f32::NEG_INFINITY, f32::max);
            let max_stamp = max_of(stamps.clone());
            let stamps_sum: f32 = logits[stamps.clone()].iter().map(|&l| (l - max_stamp).exp()).sum();
            if max_stamp + stamps_sum.ln() > max_text {
                next.text = false;
            }
        }
        let end = sp.end_of_text as usize;
        let end = if next.end && end < n { end..end + 1 } else { 0..0 };
        let none = 0..0;
        // Ascending ids, as Whisper's argmax and sampling see them.
        let ranges: [std::ops::Range<usize>; 4] =
            if next.text { [text[0].clone(), text[1].clone(), end, stamps] } else { [none.clone(), none, end, stamps] };
        let mut best = (sp.end_of_text, f32::NEG_INFINITY);
        for range in &ranges {
            for (id, &l) in logits[range.clone()].iter().enumerate() {
                if l > best.1 {
                    best = ((range.start + id) as u32, l);
                }
            }
        }
        let max = best.1;
        let sum: f32 = ranges.iter().map(|r| logits[r.clone()].iter().map(|&l| (l - max).exp()).sum::<f32>()).sum();
        if temperature > 0.0 {
            let weight = |l: f32| ((l - max) / temperature).exp();
            let total: f32 = ranges.iter().map(|r| logits[r.clone()].iter().map(|&l| weight(l)).sum::<f32>()).sum();
            let mut target = rng.next_unit() * total;
            'draw: for range in &ranges {
                for (id, &l) in logits[range.clone()].iter().enumerate() {
                    target -= weight(l);
                    if target <= 0.0 {
                        best = ((range.start + id) as u32, l);
                        break 'draw;
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
        Decodings::default()
            .run(self, &[(audio, opts)])
            .pop()
            .unwrap_or_else(|| Err(SpeechError::model(&self.name, "no transcript for the utterance")))
    }

    /// Every window of every utterance decoded together.
    fn transcribe_batch(&self, requests: &[(&[f32], &DecodeOptions)]) -> Vec<Result<Vec<Transcript>, SpeechError>> {
        Decodings::default().run(self, requests)
    }
}

/// One utterance's audio (16 kHz) and how to decode it.
pub type AsrRequest = (Vec<f32>, DecodeOptions);
pub type AsrResult = Result<Vec<Transcript>, SpeechError>;
/// The ASR worker pool every leg's utterances go to.
pub type AsrScheduler = Scheduler<WhisperBatch>;

impl Abandoned for AsrResult {
    fn abandoned() -> Self {
        Err(SpeechError::model("asr", "the ASR worker decoding this utterance failed"))
    }
}

/// What `transcribe_windows` gives: one result per window, and how many decoder steps
/// decoding them took (windows decoded together share steps: the most any one needed).
#[derive(Debug)]
pub struct Decoded {
    pub transcripts: Vec<Result<Transcript, SpeechError>>,
    pub steps: usize,
}

/// The decodings one ASR worker has in progress (`scheduler::Batch`): utterances join
/// between decoder steps (their encoders run as they join) and each is answered as soon as
/// its own decoding ends, whatever the others it shares steps with still need.
pub struct WhisperBatch {
    whisper: Arc<Whisper>,
    decodings: Decodings,
}

impl WhisperBatch {
    pub fn new(whisper: Arc<Whisper>) -> Self {
        Self { whisper, decodings: Decodings::default() }
    }
}

impl Batch for WhisperBatch {
    type Req = AsrRequest;
    type Res = AsrResult;

    fn join(&mut self, ticket: u64, (audio, opts): AsrRequest) -> Vec<(u64, AsrResult)> {
        self.decodings
            .join(&self.whisper, ticket, &audio, &opts)
            .map(|result| vec![(ticket, result)])
            .unwrap_or_default()
    }

    fn step(&mut self) -> Vec<(u64, AsrResult)> {
        self.decodings.step(&self.whisper)
    }

    fn len(&self) -> usize {
        self.decodings.utterances.len()
    }
}

/// Utterances being decoded together, independent of the model (which each call passes)
/// so that `Whisper`'s own methods can run one on `&self`. An utterance longer than the
/// largest window is decoded as several windows side by side, and answered when all end.
#[derive(Default)]
struct Decodings {
    /// The decoder parts' run states, made at the first step and kept for the next.
    states: Vec<TypedSimpleState>,
    rows: Vec<Row>,
    utterances: HashMap<u64, Pending>,
    /// Decoder steps run.
    steps: usize,
}

/// One window in decoding.
struct Row {
    ticket: u64,
    part: usize,
    item: Prepared,
    /// Which of `item.temperatures` the decoding in progress uses.
    round: usize,
    decoding: RowDecoding,
    tried: Vec<Decoding>,
    /// Time spent in the decoder steps this window was in.
    decoder: Duration,
}

/// An utterance in decoding: how to decode it, and each window's result once it ended.
struct Pending {
    opts: DecodeOptions,
    parts: Vec<Option<Result<Transcript, SpeechError>>>,
}

impl Decodings {
    /// Decodes `requests` together to the end: one result per request, in order.
    fn run(&mut self, whisper: &Whisper, requests: &[(&[f32], &DecodeOptions)]) -> Vec<AsrResult> {
        let mut results: Vec<Option<AsrResult>> = requests.iter().map(|_| None).collect();
        let mut ended = Vec::new();
        for (ticket, &(audio, opts)) in requests.iter().enumerate() {
            ended.extend(self.join(whisper, ticket as u64, audio, opts).map(|result| (ticket as u64, result)));
        }
        while !self.utterances.is_empty() {
            ended.extend(self.step(whisper));
        }
        for (ticket, result) in ended {
            if let Some(slot) = results.get_mut(ticket as usize) {
                *slot = Some(result);
            }
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(SpeechError::model(&whisper.name, "no transcript"))))
            .collect()
    }

    /// Starts decoding an utterance: each of its windows runs its encoder and joins the
    /// next step. Its result now if there is nothing to decode (no audio, or every
    /// window's encoder failed).
    fn join(&mut self, whisper: &Whisper, ticket: u64, audio: &[f32], opts: &DecodeOptions) -> Option<AsrResult> {
        let window = whisper.max_window_samples();
        if window == 0 || audio.is_empty() {
            return Some(Ok(Vec::new()));
        }
        let mut pending = Pending { opts: opts.clone(), parts: Vec::new() };
        for (part, chunk) in audio.chunks(window).enumerate() {
            match whisper.prepare(chunk, opts) {
                Ok(item) => {
                    pending.parts.push(None);
                    self.rows.push(Row {
                        ticket,
                        part,
                        item,
                        round: 0,
                        decoding: RowDecoding::new(whisper.layers),
                        tried: Vec::new(),
                        decoder: Duration::ZERO,
                    });
                }
                Err(e) => pending.parts.push(Some(Err(e))),
            }
        }
        if pending.parts.iter().all(Option::is_some) {
            return Some(pending.answer());
        }
        self.utterances.insert(ticket, pending);
        None
    }

    /// One decoder step for every window in decoding (greedy at temperature 0, else
    /// sampling from the softened distribution; Whisper's suppressions either way). A
    /// window whose decoding ended starts again at the next temperature if it needs the
    /// fallback, else leaves. Returns the utterances all of whose windows have ended.
    fn step(&mut self, whisper: &Whisper) -> Vec<(u64, AsrResult)> {
        if self.rows.is_empty() {
            return self.answered();
        }
        let started = Instant::now();
        let outcome = self.run_step(whisper);
        let took = started.elapsed();
        self.steps += 1;
        let rows = std::mem::take(&mut self.rows);
        match outcome {
            Ok(mut logits) => {
                // `run_step` gives the same number of logits, at least one, for every row.
                let vocab = logits.len() / rows.len();
                for (mut row, logits) in rows.into_iter().zip(logits.chunks_exact_mut(vocab)) {
                    row.decoder += took;
                    match self.advance(whisper, &mut row, logits) {
                        Some(result) => self.settle(row.ticket, row.part, result),
                        None => self.rows.push(row),
                    }
                }
            }
            Err(e) => {
                for row in rows {
                    self.settle(row.ticket, row.part, Err(SpeechError::model(&whisper.name, &e)));
                }
            }
        }
        self.answered()
    }

    /// Gives a row its step's logits: the window's result when its decoding ended for good
    /// (a decoding that needs the fallback starts again at the next temperature instead).
    fn advance(&self, whisper: &Whisper, row: &mut Row, logits: &mut [f32]) -> Option<Result<Transcript, SpeechError>> {
        let temperature = row.item.temperatures.get(row.round).copied().unwrap_or(0.0);
        match row.decoding.feed(whisper, &mut row.item.setup, logits, temperature, &mut row.item.rng) {
            Ok(false) => None,
            Ok(true) => {
                let decoding = std::mem::replace(&mut row.decoding, RowDecoding::new(whisper.layers))
                    .finish(&whisper.vocab, temperature);
                // Language detected on the first decoding holds for the others.
                row.item.setup.detect_language = false;
                let opts = self.utterances.get(&row.ticket).map(|p| &p.opts);
                let again = opts.is_some_and(|opts| decoding.needs_fallback(opts))
                    && row.round + 1 < row.item.temperatures.len();
                row.tried.push(decoding);
                row.round += 1;
                (!again).then(|| whisper.transcript(row, opts))
            }
            Err(e) => Some(Err(SpeechError::model(&whisper.name, e))),
        }
    }

    /// Feeds each row its next token through the decoder parts, with cross-attention over
    /// each row's own encoder output between them: the logits, row after row.
    fn run_step(&mut self, whisper: &Whisper) -> TractResult<Vec<f32>> {
        if self.states.is_empty() {
            self.states = whisper.decoder.iter().map(|part| part.spawn()).collect::<TractResult<_>>()?;
        }
        let d = whisper.d_model;
        let batch = self.rows.len();
        let tokens: Vec<i64> = self.rows.iter().map(|r| i64::from(r.decoding.next_input(&r.item.setup))).collect();
        let positions: Vec<i64> = self.rows.iter().map(|r| r.decoding.position as i64).collect();
        let mut carried: TVec<TValue> = tvec!(
            Tensor::from_shape(&[batch], &tokens)?.into_tvalue(),
            Tensor::from_shape(&[batch], &positions)?.into_tvalue(),
        );
        for (layer, state) in self.states.iter_mut().enumerate() {
            let mut inputs = carried;
            if layer < whisper.layers {
                let caches: Vec<&RowDecoding> = self.rows.iter().map(|r| &r.decoding).collect();
                let (keys, values, mask) = batch_cache(&caches, layer, d)?;
                inputs.extend([keys.into_tvalue(), values.into_tvalue(), mask.into_tvalue()]);
            }
            let out = state.run(inputs)?;
            crate::cpu::leave_wide_vectors();
            if layer == whisper.layers {
                let logits =
                    out.into_iter().next().ok_or_else(|| TractError::msg("the decoder's last part gave no logits"))?;
                let logits = f32s(&logits)?;
                if logits.is_empty() || logits.len() % batch != 0 {
                    return Err(TractError::msg(format!("the decoder gave {} logits for {batch} rows", logits.len())));
                }
                return Ok(logits.to_vec());
            }
            let [x, query, new_k, new_v] = out.as_slice() else {
                return Err(TractError::msg("a decoder part must give x_out, query, new_k, new_v"));
            };
            let (new_k, new_v) = (f32s(new_k)?, f32s(new_v)?);
            for (b, row) in self.rows.iter_mut().enumerate() {
                row.decoding.keys[layer].extend_from_slice(&new_k[b * d..(b + 1) * d]);
                row.decoding.values[layer].extend_from_slice(&new_v[b * d..(b + 1) * d]);
            }
            let windows: Vec<&Cross> = self.rows.iter().map(|r| &r.item.cross).collect();
            let cross = cross_attention(f32s(query)?, &windows, layer, whisper.heads, d)?;
            carried = tvec!(x.clone(), cross.into_tvalue());
        }
        Err(TractError::msg("the decoder has no parts"))
    }

    fn settle(&mut self, ticket: u64, part: usize, result: Result<Transcript, SpeechError>) {
        if let Some(slot) = self.utterances.get_mut(&ticket).and_then(|p| p.parts.get_mut(part)) {
            *slot = Some(result);
        }
    }

    /// The utterances all of whose windows have ended, taken out.
    fn answered(&mut self) -> Vec<(u64, AsrResult)> {
        let done: Vec<u64> =
            self.utterances.iter().filter(|(_, p)| p.parts.iter().all(Option::is_some)).map(|(&t, _)| t).collect();
        done.into_iter().filter_map(|t| self.utterances.remove(&t).map(|p| (t, p.answer()))).collect()
    }
}

impl Pending {
    /// The transcripts of its windows in order, or the first window's error.
    fn answer(self) -> AsrResult {
        self.parts
            .into_iter()
            .map(|part| part.unwrap_or_else(|| Err(SpeechError::model("asr", "a window was not decoded"))))
            .collect()
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

/// One window ready to decode: its encoder output, prompt and fallback temperatures.
struct Prepared {
    setup: Setup,
    cross: Cross,
    rng: SplitMix64,
    /// 0 (greedy) first, then the fallback's.
    temperatures: Vec<f32>,
    window_secs: u32,
    duration: f32,
    encoder_ms: f64,
}

/// The encoder's output for one window: the decoder's cross-attention keys and values,
/// `[layers, 1, frames, d]`.
struct Cross {
    k: TValue,
    v: TValue,
    frames: usize,
}

/// Masks are added to attention scores: 0 where a row attends, this where it must not.
const MASKED: f32 = -1e9;

/// Layer `layer`'s self-attention caches of the rows as one batch: keys and values
/// `[B, P, d]` with P the longest history (shorter ones padded at the start, so every row's
/// newest token is last), and the mask `[B, P + 1]` (the column after P is this step's token).
fn batch_cache(rows: &[&RowDecoding], layer: usize, d: usize) -> TractResult<(Tensor, Tensor, Tensor)> {
    let batch = rows.len();
    let past = rows.iter().map(|r| r.past(layer, d)).max().unwrap_or(0);
    let mut mask = vec![0.0f32; batch * (past + 1)];
    let mut keys = vec![0.0f32; batch * past * d];
    let mut values = vec![0.0f32; batch * past * d];
    for (b, row) in rows.iter().enumerate() {
        let pad = past - row.past(layer, d);
        mask[b * (past + 1)..b * (past + 1) + pad].fill(MASKED);
        let at = (b * past + pad) * d;
        let len = row.keys[layer].len();
        keys[at..at + len].copy_from_slice(&row.keys[layer]);
        values[at..at + len].copy_from_slice(&row.values[layer]);
    }
    Ok((
        Tensor::from_shape(&[batch, past, d], &keys)?,
        Tensor::from_shape(&[batch, past, d], &values)?,
        Tensor::from_shape(&[batch, past + 1], &mask)?,
    ))
}

/// Layer `layer`'s cross-attention for every row: each row's query `[d]` against its own
/// window's keys and values (`attention::cross_attention`), as a `[B, d]` tensor.
fn cross_attention(query: &[f32], windows: &[&Cross], layer: usize, heads: usize, d: usize) -> TractResult<Tensor> {
    let mut out = vec![0.0f32; windows.len() * d];
    let mut scores: Vec<f32> = Vec::new();
    for ((window, q), o) in windows.iter().zip(query.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
        let span = layer * window.frames * d..(layer + 1) * window.frames * d;
        let (keys, values) = (&f32s(&window.k)?[span.clone()], &f32s(&window.v)?[span]);
        attention::cross_attention(q, keys, values, heads, o, &mut scores);
    }
    Tensor::from_shape(&[windows.len(), d], &out)
}

/// One row's decoding as it advances: the tokens so far and its self-attention cache.
struct RowDecoding {
    /// Every generated token (text and timestamps) and its log-prob, and the text alone
    /// with where each text token sits among them (a cut loop is found in the text).
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    text: Vec<u32>,
    text_at: Vec<usize>,
    no_speech_prob: f32,
    stop: TranscriptStop,
    /// Tokens fed so far (the prompt's included).
    position: usize,
    finished: bool,
    /// Per layer, `past × d` keys and values of the tokens fed so far.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl RowDecoding {
    fn new(layers: usize) -> Self {
        Self {
            generated: Vec::new(),
            logprobs: Vec::new(),
            text: Vec::new(),
            text_at: Vec::new(),
            no_speech_prob: 0.0,
            stop: TranscriptStop::TokenLimit,
            position: 0,
            finished: false,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// Tokens in layer `layer`'s cache (during a step, the layers already run hold one more).
    fn past(&self, layer: usize, d: usize) -> usize {
        self.keys.get(layer).map_or(0, |k| k.len() / d)
    }

    /// The token this row feeds at its position: the prompt's, then its own last.
    fn next_input(&self, setup: &Setup) -> u32 {
        let prompt = &setup.prompt;
        if self.position < prompt.len() {
            prompt[self.position]
        } else {
            self.generated[self.position - prompt.len()]
        }
    }

    /// Takes the step's logits for this row; true when the row's decoding has ended.
    fn feed(
        &mut self,
        whisper: &Whisper,
        setup: &mut Setup,
        logits: &mut [f32],
        temperature: f32,
        rng: &mut SplitMix64,
    ) -> TractResult<bool> {
        let sp = whisper.vocab.specials;
        let stamps = setup.stamps;
        let stamp = move |t: u32| stamps.and_then(|s| t.checked_sub(s.first));
        self.position += 1;
        if self.position == setup.sot + 1 {
            self.no_speech_prob = softmax_at(logits, sp.no_speech as usize);
            if setup.detect_language {
                let (code, id) = whisper
                    .vocab
                    .languages
                    .iter()
                    .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
                    .ok_or_else(|| TractError::msg("no language tokens"))?;
                setup.language.clone_from(code);
                setup.prompt[setup.sot + 1] = *id;
            }
        }
        if self.position < setup.prompt.len() {
            return Ok(false);
        }
        if let Some(bias) = setup.bias {
            setup.hotwords.bias(&self.text, logits, bias);
        }
        let next = match stamps {
            Some(s) => timestamp_rule(&self.generated, stamp, s.audio_end, s.window_end),
            None => Allowed::plain(self.text.is_empty()),
        };
        let (token, logprob) = whisper.pick(logits, next, self.text.is_empty(), temperature, rng);
        if token == sp.end_of_text {
            self.stop = TranscriptStop::EndOfText;
            return Ok(self.end());
        }
        self.generated.push(token);
        self.logprobs.push(logprob);
        if stamp(token).is_none() {
            self.text.push(token);
            self.text_at.push(self.generated.len() - 1);
            if let Some(keep) = repetition_cut(&self.text) {
                self.text.truncate(keep);
                self.stop = TranscriptStop::Repetition;
                return Ok(self.end());
            }
        } else if let Some(s) = stamps {
            // A segment closed within the last half second: only the end may follow, so
            // the step that would say so is not run.
            let after = timestamp_rule(&self.generated, stamp, s.audio_end, s.window_end);
            if !after.text && after.stamps.is_none() {
                self.stop = TranscriptStop::EndOfText;
                return Ok(self.end());
            }
        }
        if self.text.len() >= setup.budget || self.position >= whisper.context - 1 {
            return Ok(self.end());
        }
        Ok(false)
    }

    fn end(&mut self) -> bool {
        self.finished = true;
        // The cache is no longer needed; a batch may run on for a while without this row.
        self.keys = Vec::new();
        self.values = Vec::new();
        true
    }

    fn finish(mut self, vocab: &Vocabulary, temperature: f32) -> Decoding {
        if self.stop == TranscriptStop::EndOfText {
            if let Some(keep) = doubled_utterance(&self.text) {
                self.text.truncate(keep);
                self.stop = TranscriptStop::Repetition;
            }
        }
        // The log-probs of the tokens up to the last text token kept.
        let mut logprobs = self.logprobs;
        logprobs.truncate(self.text.len().checked_sub(1).map_or(0, |last| self.text_at[last] + 1));
        let avg_logprob = if logprobs.is_empty() {
            0.0
        } else {
            (logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64) as f32
        };
        let text = vocab.decode(&self.text);
        Decoding {
            compression_ratio: compression_ratio(text.trim()),
            text,
            tokens: self.text,
            avg_logprob,
            no_speech_prob: self.no_speech_prob,
            stop: self.stop,
            temperature,
        }
    }
}
