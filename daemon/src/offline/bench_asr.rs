//! `callbox bench asr`: the speech path's speed on the shared clips, 16 kHz and their
//! 8 kHz µ-law copies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{load_config, load_models};
use crate::audio::{g711, resample};
use crate::exit::{self, Failure};
use crate::speech::{SpeechModels, Transcript};
use crate::transcribe::transcribe_leg;

#[derive(Debug, Serialize)]
struct BenchRow {
    file: String,
    telephone: bool,
    audio_secs: f64,
    utterances: usize,
    tokens: usize,
    first_run_ms: f64,
    /// Median over the runs after the first.
    median_ms: f64,
    encoder_ms: f64,
    decoder_ms: f64,
    ms_per_token: f64,
    real_time_factor: f64,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<Vec<u32>>,
}

/// One benchmark run: the pipeline (VAD + ASR per utterance) or, `whole`, ASR alone on the
/// whole audio. Returns each utterance's text and transcript.
fn run_once(
    models: &SpeechModels,
    speech: &crate::config::SpeechConfig,
    pcm: &[i16],
    rate: u32,
    whole: bool,
) -> Result<Vec<(String, Transcript)>, String> {
    if !whole {
        let utterances = transcribe_leg(models, speech, pcm, rate).map_err(|e| e.to_string())?;
        return Ok(utterances.into_iter().map(|u| (u.text, u.asr)).collect());
    }
    let audio = resample::resample_all(pcm, rate, 16_000).map_err(|e| e.to_string())?;
    let window = models.asr.transcribe_window(&audio, &speech.decode_options()).map_err(|e| e.to_string())?;
    Ok(vec![(window.text.clone(), window)])
}

/// Decoding windows together against one at a time (`--batch N`).
#[derive(Debug, Serialize)]
struct BatchReport {
    batch: usize,
    windows: usize,
    audio_secs: f64,
    /// Medians over the runs after the first, summed over the groups of `batch` windows.
    alone_secs: f64,
    together_secs: f64,
    alone_rtf: f64,
    together_rtf: f64,
    /// Decoder time over generated tokens, one at a time and together (the batch's wall
    /// time over all its rows' tokens).
    alone_ms_per_token: f64,
    together_ms_per_token: f64,
    /// Windows whose text is the same either way.
    same_text: usize,
}

/// Every clip as one window (cut at the largest bucket), decoded one at a time and in
/// groups of `batch` (each group one `transcribe_windows`), `runs` times each.
fn batch_figures(
    models: &SpeechModels,
    speech: &crate::config::SpeechConfig,
    clips: &[Vec<f32>],
    batch: usize,
    runs: usize,
) -> Result<BatchReport, String> {
    let opts = speech.decode_options();
    let window = models.asr.max_window_samples();
    let clips: Vec<&[f32]> = clips.iter().map(|c| &c[..c.len().min(window)]).collect();
    let median = |mut times: Vec<f64>| -> f64 {
        let mut steady = times.split_off(1.min(times.len()));
        steady.sort_by(f64::total_cmp);
        steady.get(steady.len() / 2).copied().unwrap_or_default()
    };
    let (mut alone_secs, mut together_secs) = (0.0, 0.0);
    let (mut alone_decoder, mut together_decoder, mut tokens) = (0.0, 0.0, 0usize);
    let mut same_text = 0;
    for group in clips.chunks(batch.max(1)) {
        let mut alone_times = Vec::new();
        let mut alone = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            alone = group
                .iter()
                .map(|c| models.asr.transcribe_window(c, &opts))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            alone_times.push(started.elapsed().as_secs_f64());
        }
        let windows: Vec<(&[f32], &crate::speech::DecodeOptions)> = group.iter().map(|&c| (c, &opts)).collect();
        let mut together_times = Vec::new();
        let mut together = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            together = models
                .asr
                .transcribe_windows(&windows)
                .transcripts
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            together_times.push(started.elapsed().as_secs_f64());
        }
        alone_secs += median(alone_times);
        together_secs += median(together_times);
        tokens += alone.iter().map(|t| t.tokens).sum::<usize>();
        alone_decoder += alone.iter().map(|t| t.decoder_ms).sum::<f64>();
        // Rows of a batch decode at once: the batch's decoder time is its longest row's.
        together_decoder += together.iter().map(|t| t.decoder_ms).fold(0.0, f64::max);
        same_text += alone.iter().zip(&together).filter(|(a, b)| a.text == b.text).count();
    }
    let audio_secs: f64 = clips.iter().map(|c| c.len() as f64 / 16_000.0).sum();
    let per_token = |ms: f64| if tokens > 0 { ms / tokens as f64 } else { 0.0 };
    Ok(BatchReport {
        batch,
        windows: clips.len(),
        audio_secs,
        alone_secs,
        together_secs,
        alone_rtf: alone_secs / audio_secs.max(1e-9),
        together_rtf: together_secs / audio_secs.max(1e-9),
        alone_ms_per_token: per_token(alone_decoder),
        together_ms_per_token: per_token(together_decoder),
        same_text,
    })
}

/// Default benchmark inputs: the shared recordings beside the checkout.
fn default_files() -> Vec<PathBuf> {
    let root = PathBuf::from("../shared/data/speech");
    let Ok(tsv) = std::fs::read_to_string(root.join("transcripts.tsv")) else { return Vec::new() };
    tsv.lines().skip(1).filter_map(|l| l.split('\t').next()).map(|f| root.join(f)).collect()
}

/// The recording as a PBX trunk would carry it: 8 kHz µ-law.
fn telephone(samples: &[i16], rate: u32) -> Result<Vec<i16>, String> {
    let narrow = resample::resample_all(samples, rate, 8000).map_err(|e| e.to_string())?;
    let pcm: Vec<i16> = narrow.into_iter().map(crate::audio::f32_to_pcm).collect();
    Ok(g711::decode_ulaw(&g711::encode_ulaw(&pcm)))
}

pub fn bench_asr(
    config_path: &Path,
    files: &[PathBuf],
    runs: usize,
    json: bool,
    models_dir: Option<&Path>,
    whole: bool,
    batch: usize,
) -> Result<u8, Failure> {
    let config = load_config(config_path)?;
    let load_started = Instant::now();
    let models = load_models(&config, models_dir)?;
    let load_secs = load_started.elapsed().as_secs_f64();
    let (loaded_rss_mb, _) = super::process_memory_mb();
    let files = if files.is_empty() { default_files() } else { files.to_vec() };
    if files.is_empty() {
        return Err(Failure::new(exit::USAGE, "no files given and ../shared/data/speech/transcripts.tsv not found"));
    }
    let runs = runs.max(2);
    let mut rows = Vec::new();
    let mut clips: Vec<Vec<f32>> = Vec::new();
    for file in &files {
        let recording = crate::transcribe::read_recording(file, &config.spool, crate::fsio::Links::Follow)
            .map_err(|e| Failure::new(exit::DATA_ERROR, format!("{}: {e}", file.display())))?;
        let Some(samples) = recording.channels.first() else { continue };
        let telephone_samples = telephone(samples, recording.sample_rate)
            .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", file.display())))?;
        for (is_phone, pcm, rate) in
            [(false, samples.as_slice(), recording.sample_rate), (true, &telephone_samples[..], 8000)]
        {
            if batch > 1 {
                clips.push(
                    resample::resample_all(pcm, rate, 16_000)
                        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", file.display())))?,
                );
            }
            let mut times = Vec::new();
            let mut last = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                last = run_once(&models, &config.speech, pcm, rate, whole)
                    .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", file.display())))?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            let mut steady = times[1..].to_vec();
            steady.sort_by(f64::total_cmp);
            let median = steady[steady.len() / 2];
            let tokens: usize = last.iter().map(|(_, t)| t.tokens).sum();
            let encoder_ms: f64 = last.iter().map(|(_, t)| t.encoder_ms).sum();
            let decoder_ms: f64 = last.iter().map(|(_, t)| t.decoder_ms).sum();
            let audio_secs = recording.duration_secs();
            rows.push(BenchRow {
                file: file.display().to_string(),
                telephone: is_phone,
                audio_secs,
                utterances: last.len(),
                tokens,
                first_run_ms: times[0],
                median_ms: median,
                encoder_ms,
                decoder_ms,
                ms_per_token: if tokens > 0 { decoder_ms / tokens as f64 } else { 0.0 },
                real_time_factor: median / 1000.0 / audio_secs.max(1e-9),
                text: last.iter().map(|(text, _)| text.as_str()).collect::<Vec<_>>().join(" "),
                token_ids: whole.then(|| last.iter().flat_map(|(_, t)| t.token_ids.iter().copied()).collect()),
            });
        }
    }
    let batched = if batch > 1 {
        Some(batch_figures(&models, &config.speech, &clips, batch, runs).map_err(|e| Failure::new(exit::FAILURE, e))?)
    } else {
        None
    };
    let (end_rss_mb, peak_rss_mb) = super::process_memory_mb();
    let (encoder_weights, decoder_weights) = models.asr.weight_formats();
    if json {
        let report = serde_json::json!({
            "models_load_secs": load_secs,
            "buckets": models.asr.bucket_secs(),
            "weights": { "encoder": encoder_weights.name(), "decoder": decoder_weights.name() },
            "rss_mb": { "loaded": loaded_rss_mb, "end": end_rss_mb, "peak": peak_rss_mb },
            "rows": rows,
            "batched": batched,
        });
        println!("{report}");
    } else {
        println!(
            "models loaded in {load_secs:.1} s; encoder buckets {:?} s; weights: encoder {}, decoder {}; {runs} runs \
             each; RSS {loaded_rss_mb:.0} MB loaded, {end_rss_mb:.0} MB at the end, {peak_rss_mb:.0} MB peak",
            models.asr.bucket_secs(),
            encoder_weights.name(),
            decoder_weights.name()
        );
        println!(
            "{:<48} {:>5} {:>6} {:>8} {:>8} {:>8} {:>7} {:>5}  text",
            "file", "phone", "secs", "median", "enc ms", "dec ms", "ms/tok", "RTF"
        );
        for r in &rows {
            let name = Path::new(&r.file).file_name().map_or(r.file.clone(), |n| n.to_string_lossy().into_owned());
            println!(
                "{:<48} {:>5} {:>6.2} {:>8.0} {:>8.0} {:>8.0} {:>7.1} {:>5.2}  {}",
                name,
                if r.telephone { "8k-µ" } else { "16k" },
                r.audio_secs,
                r.median_ms,
                r.encoder_ms,
                r.decoder_ms,
                r.ms_per_token,
                r.real_time_factor,
                r.text
            );
        }
        if let Some(b) = &batched {
            println!(
                "batches of {}: {} windows, {:.1} s of audio (each clip as one window); one at a time {:.2} s (RTF \
                 {:.3}, decoder {:.1} ms/token), together {:.2} s (RTF {:.3}, decoder {:.1} ms/token); same text in {} \
                 of {}",
                b.batch,
                b.windows,
                b.audio_secs,
                b.alone_secs,
                b.alone_rtf,
                b.alone_ms_per_token,
                b.together_secs,
                b.together_rtf,
                b.together_ms_per_token,
                b.same_text,
                b.windows
            );
        }
    }
    Ok(exit::OK)
}
