//! `callbox transcribe` and `callbox bench asr`: the speech path on files, from the CLI.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::audio::{g711, resample};
use crate::config::{self, Config};
use crate::exit;
use crate::speech::{SpeechError, SpeechModels, Transcript};
use crate::transcribe::{transcribe_file, transcribe_leg, TranscribeError};
use crate::understanding::intent::IntentModel;

fn load_config(path: &Path) -> Result<Config, u8> {
    match config::load(path) {
        Ok(loaded) => Ok(loaded.config),
        Err(e) => {
            eprintln!("callbox: {e}");
            for p in e.problem_lines() {
                eprintln!("  {p}");
            }
            Err(exit::CONFIG)
        }
    }
}

fn load_models(config: &Config, dir: Option<&Path>) -> Result<SpeechModels, u8> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    let started = Instant::now();
    match SpeechModels::load(&dir, &config.speech.encoder_buckets_secs) {
        Ok(models) => {
            log::info!("models from {} loaded in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
            Ok(models)
        }
        Err(e) => {
            eprintln!("callbox: cannot load the speech models: {e}");
            if matches!(e, SpeechError::Io { .. }) {
                eprintln!("callbox: build them with `bash models/build.sh` (models/cache) or set speech.models_dir");
            }
            Err(exit::UNAVAILABLE)
        }
    }
}

pub fn transcribe(
    config_path: &Path,
    files: &[PathBuf],
    json: bool,
    lang: Option<&str>,
    models_dir: Option<&Path>,
) -> u8 {
    let mut config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(lang) = lang {
        config.speech.language = lang.to_owned();
        let problems: Vec<_> = config.validate().into_iter().filter(|(k, _)| k == "speech.language").collect();
        if let Some((_, message)) = problems.first() {
            eprintln!("callbox: --lang {message}");
            return exit::USAGE;
        }
    }
    let models = match load_models(&config, models_dir) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let mut code = exit::OK;
    for file in files {
        match transcribe_file(&models, &config.speech, &config.spool, file) {
            Ok(t) => {
                if json {
                    match serde_json::to_string(&t) {
                        Ok(line) => println!("{line}"),
                        Err(e) => eprintln!("callbox: cannot print JSON: {e}"),
                    }
                } else {
                    println!(
                        "{} ({:.1} s, {} Hz, RTF {:.2})",
                        t.file, t.duration_secs, t.sample_rate, t.real_time_factor
                    );
                    for u in &t.utterances {
                        let p = &u.utterance.prosody;
                        println!(
                            "  [{:7.2} – {:7.2}] {:8} {}    (F0 {} Hz, {:.0} dBFS, {:.0}/min)",
                            u.utterance.start_secs,
                            u.utterance.end_secs,
                            format!("{:?}", u.leg).to_lowercase(),
                            u.utterance.text,
                            p.f0_median_hz.map_or("-".into(), |f| format!("{f:.0}")),
                            p.energy_dbfs,
                            p.rate_per_min
                        );
                    }
                }
            }
            Err(TranscribeError::Input { path, reason }) => {
                eprintln!("callbox: {path}: {reason}");
                code = exit::DATA_ERROR;
            }
            Err(e) => {
                eprintln!("callbox: {}: {e}", file.display());
                return exit::FAILURE;
            }
        }
    }
    code
}

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
) -> u8 {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let load_started = Instant::now();
    let models = match load_models(&config, models_dir) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let load_secs = load_started.elapsed().as_secs_f64();
    let files = if files.is_empty() { default_files() } else { files.to_vec() };
    if files.is_empty() {
        eprintln!("callbox: no files given and ../shared/data/speech/transcripts.tsv not found");
        return exit::USAGE;
    }
    let runs = runs.max(2);
    let mut rows = Vec::new();
    for file in &files {
        let recording = match crate::transcribe::read_recording(file, &config.spool) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("callbox: {}: {e}", file.display());
                return exit::DATA_ERROR;
            }
        };
        let Some(samples) = recording.channels.first() else { continue };
        let telephone_samples = match telephone(samples, recording.sample_rate) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("callbox: {}: {e}", file.display());
                return exit::FAILURE;
            }
        };
        for (is_phone, pcm, rate) in
            [(false, samples.as_slice(), recording.sample_rate), (true, &telephone_samples[..], 8000)]
        {
            let mut times = Vec::new();
            let mut last = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                last = match run_once(&models, &config.speech, pcm, rate, whole) {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("callbox: {}: {e}", file.display());
                        return exit::FAILURE;
                    }
                };
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
    if json {
        let report =
            serde_json::json!({ "models_load_secs": load_secs, "buckets": models.asr.bucket_secs(), "rows": rows });
        println!("{report}");
    } else {
        println!(
            "models loaded in {load_secs:.1} s; encoder buckets {:?} s; {runs} runs each",
            models.asr.bucket_secs()
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
    }
    exit::OK
}

fn load_intent(config: &Config, models_dir: Option<&Path>) -> Result<IntentModel, u8> {
    let dir = models_dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    crate::speech::ModelSet::open(&dir).and_then(|set| IntentModel::load(&set)).map_err(|e| {
        eprintln!("callbox: cannot load the intent model: {e}");
        eprintln!("callbox: build it with `bash models/build.sh` (models/cache) or set speech.models_dir");
        exit::UNAVAILABLE
    })
}

/// `callbox bench intent`: per-utterance latency of featurizing and classifying.
pub fn bench_intent(config_path: &Path, file: Option<&Path>, runs: usize, json: bool, models_dir: Option<&Path>) -> u8 {
    let (config, model) = match load_config(config_path).and_then(|c| load_intent(&c, models_dir).map(|m| (c, m))) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let default = config.speech.models_dir().join("intent/eval.tsv");
    let dir_default = models_dir.map(|d| d.join("intent/eval.tsv")).unwrap_or(default);
    let path = file.map(Path::to_path_buf).unwrap_or(dir_default);
    let texts: Vec<String> = match read_lines(&path, config.spool.max_file_mb) {
        // The held-out split is TSV with a header: its first column is the text.
        Ok(lines) if file.is_none() => {
            lines.iter().skip(1).filter_map(|l| l.split('\t').next()).map(str::to_owned).collect()
        }
        Ok(lines) => lines,
        Err(e) => {
            eprintln!("callbox: {}: {e}", path.display());
            return exit::DATA_ERROR;
        }
    };
    if texts.is_empty() {
        eprintln!("callbox: {}: no utterances", path.display());
        return exit::DATA_ERROR;
    }
    let mut per_utterance_us = Vec::new();
    for _ in 0..runs.max(1) {
        for text in &texts {
            let started = Instant::now();
            if let Err(e) = model.classify(text) {
                eprintln!("callbox: {e}");
                return exit::FAILURE;
            }
            per_utterance_us.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    per_utterance_us.sort_by(f64::total_cmp);
    let at = |q: f64| per_utterance_us[((per_utterance_us.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
    if json {
        let report = serde_json::json!({ "utterances": texts.len(), "runs": runs.max(1), "p50_us": p50, "p99_us": p99, "max_us": max });
        println!("{report}");
    } else {
        println!(
            "{} utterances × {} runs: per utterance p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs",
            texts.len(),
            runs.max(1)
        );
    }
    exit::OK
}

/// `callbox classify`: one utterance from the arguments, or one per line of `--file`.
pub fn classify(
    config_path: &Path,
    words: &[String],
    file: Option<&Path>,
    json: bool,
    models_dir: Option<&Path>,
) -> u8 {
    let (config, model) = match load_config(config_path).and_then(|c| load_intent(&c, models_dir).map(|m| (c, m))) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let texts: Vec<String> = match file {
        None if words.is_empty() => {
            eprintln!("callbox: give the text to classify, or --file FILE with one utterance per line");
            return exit::USAGE;
        }
        None => vec![words.join(" ")],
        Some(path) => match read_lines(path, config.spool.max_file_mb) {
            Ok(lines) => lines,
            Err(e) => {
                eprintln!("callbox: {}: {e}", path.display());
                return exit::DATA_ERROR;
            }
        },
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for text in &texts {
        let c = match model.classify(text) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("callbox: {e}");
                return exit::FAILURE;
            }
        };
        let line = if json {
            serde_json::json!({ "text": text, "label": c.label, "confidence": c.confidence, "top3": c.top3 })
                .to_string()
        } else {
            let top: Vec<String> = c.top3.iter().map(|s| format!("{} {:.2}", s.label, s.p)).collect();
            format!("{:<22} {:.2}  ({})  {text}", c.label, c.confidence, top.join(", "))
        };
        if std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()).is_err() {
            return exit::OK; // stdout closed (a pager quit): nothing more to say
        }
    }
    let _ = std::io::Write::flush(&mut out);
    exit::OK
}

/// A text file's non-empty lines, the file bounded like a recording.
fn read_lines(path: &Path, max_mb: u64) -> Result<Vec<String>, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > max_mb * 1024 * 1024 {
        return Err(format!("larger than spool.max_file_mb = {max_mb}"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("not UTF-8 text: {e}"))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// One utterance of a transcript replay (`.jsonl`), as `transcribe --json` writes them.
#[derive(Debug, serde::Deserialize)]
struct ReplayUtterance {
    leg: crate::audio::Leg,
    start_secs: f64,
    end_secs: f64,
    text: String,
}

#[derive(Debug, Serialize)]
struct CallReport {
    file: String,
    utterances: Vec<crate::understanding::call::UtteranceView>,
    hits: Vec<crate::understanding::rules::RuleHit>,
    events: Vec<crate::understanding::call::CallEvent>,
    /// Phase reached, context memory and the customer's tags.
    state: crate::understanding::state::CallState,
    /// ASR time over audio duration (recordings only).
    asr_real_time_factor: Option<f64>,
    /// Slowest understanding step (masking, intent, rules) for one utterance.
    understanding_max_ms: f64,
}

/// Inputs of `analyze`: files as given, folders expanded to their `.wav` and `.jsonl` files.
fn analyze_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "wav" | "jsonl")))
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

/// `callbox analyze`: recordings (transcribed) or transcripts (`.jsonl`) through masking,
/// intent, rules and events, as the daemon does for a live call.
pub fn analyze(
    config_path: &Path,
    paths: &[PathBuf],
    json: bool,
    models_dir: Option<&Path>,
    rules_file: Option<&Path>,
) -> u8 {
    use crate::understanding::call::CallUnderstanding;
    use crate::understanding::live::{load_rules, UnderstandingModels};
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = models_dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    let text_models = match UnderstandingModels::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("callbox: cannot load the intent/sentiment models: {e}");
            eprintln!("callbox: build them with `bash models/build.sh` (models/cache) or set speech.models_dir");
            return exit::UNAVAILABLE;
        }
    };
    let rules = match load_rules(rules_file) {
        Ok(set) => std::sync::Arc::new(set),
        Err(problems) => {
            eprintln!("callbox: the rule file has {} problem(s):", problems.len());
            problems.iter().for_each(|p| eprintln!("  {p}"));
            return exit::CONFIG;
        }
    };
    let files = match analyze_inputs(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("callbox: {e}");
            return exit::DATA_ERROR;
        }
    };
    let mut speech: Option<SpeechModels> = None;
    let mut code = exit::OK;
    for file in &files {
        let is_wav = file.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("wav"));
        let (utterances, rtf) = if is_wav {
            if speech.is_none() {
                match load_models(&config, models_dir) {
                    Ok(m) => speech = Some(m),
                    Err(c) => return c,
                }
            }
            let Some(models) = speech.as_ref() else { return exit::UNAVAILABLE };
            match transcribe_file(models, &config.speech, &config.spool, file) {
                Ok(t) => {
                    let us = t.utterances.into_iter().map(|u| {
                        let v = u.utterance;
                        (u.leg, v.start_secs, v.end_secs, v.text, Some(v.prosody))
                    });
                    (us.collect::<Vec<AnalyzeUtterance>>(), Some(t.real_time_factor))
                }
                Err(e) => {
                    eprintln!("callbox: {e}");
                    code = exit::DATA_ERROR;
                    continue;
                }
            }
        } else {
            match read_replay(file, config.spool.max_file_mb) {
                Ok(us) => (us, None),
                Err(e) => {
                    eprintln!("callbox: {}: {e}", file.display());
                    code = exit::DATA_ERROR;
                    continue;
                }
            }
        };
        let mut call = CallUnderstanding::new(rules.clone());
        let mut slowest: f64 = 0.0;
        let mut last_end: f64 = 0.0;
        for (leg, start, end, text, prosody) in utterances {
            let started = Instant::now();
            let facts = match text_models.facts(leg, &text, prosody) {
                Ok(facts) => facts,
                Err(e) => {
                    eprintln!("callbox: {e}");
                    return exit::FAILURE;
                }
            };
            call.utterance(leg, start, end, &text, facts);
            slowest = slowest.max(started.elapsed().as_secs_f64() * 1000.0);
            last_end = last_end.max(end);
        }
        call.end(last_end);
        let report = CallReport {
            file: file.display().to_string(),
            utterances: call.utterances,
            hits: call.hits,
            events: call.events,
            state: call.state,
            asr_real_time_factor: rtf,
            understanding_max_ms: slowest,
        };
        if json {
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("callbox: cannot print JSON: {e}"),
            }
        } else {
            print!("{}", render_call(&report));
        }
    }
    code
}

/// One utterance to analyse: leg, start, end, text, prosody (recordings only).
type AnalyzeUtterance = (crate::audio::Leg, f64, f64, String, Option<crate::speech::prosody::Prosody>);

fn read_replay(path: &Path, max_mb: u64) -> Result<Vec<AnalyzeUtterance>, String> {
    let mut out = Vec::new();
    for (n, line) in read_lines(path, max_mb)?.iter().enumerate() {
        let u: ReplayUtterance = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        if !(u.start_secs.is_finite() && u.end_secs >= u.start_secs) {
            return Err(format!("line {}: start_secs/end_secs out of order", n + 1));
        }
        out.push((u.leg, u.start_secs, u.end_secs, u.text, None));
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(out)
}

fn render_call(r: &CallReport) -> String {
    let mut out = format!("{}\n", r.file);
    for u in &r.utterances {
        let mut intent = u.intent.as_ref().map(|c| format!("{} {:.2}", c.label, c.confidence)).unwrap_or_default();
        if let Some(e) = u.emotion {
            intent = format!("{intent} {}", e.name()).trim().to_owned();
        }
        let rules = if u.rules.is_empty() { String::new() } else { format!("  ⚑ {}", u.rules.join(", ")) };
        out += &format!(
            "  [{:7.2} – {:7.2}] {:<8} {:<26} {}{rules}\n",
            u.start_secs,
            u.end_secs,
            u.leg.name(),
            intent,
            u.text
        );
    }
    for h in r.hits.iter().filter(|h| h.event.is_none()) {
        out += &format!("  rule {} ({:?}): {}\n", h.rule, h.severity, h.reason).to_lowercase();
    }
    for e in &r.events {
        out += &format!("  EVENT {} at {:.1} s: {} (utterances {:?})\n", e.kind, e.at_secs, e.reason, e.utterances);
    }
    let tags: Vec<String> = r.state.tags.iter().map(|t| format!("{t:?}")).collect();
    out += &format!(
        "  phase reached {:?}; customer tags: {}\n",
        r.state.phase,
        if tags.is_empty() { "none".into() } else { tags.join(", ") }
    );
    if let Some(rtf) = r.asr_real_time_factor {
        out += &format!("  asr real-time factor {rtf:.2}; ");
    } else {
        out += "  ";
    }
    out += &format!("understanding at most {:.2} ms per utterance\n", r.understanding_max_ms);
    out
}
