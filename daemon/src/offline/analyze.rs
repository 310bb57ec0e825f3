//! `callbox analyze`: recordings or transcripts through masking, intent, rules and events,
//! as the daemon does for a live call.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{load_config, load_models, read_lines};
use crate::control::protocol::MonitorItem;
use crate::exit::{self, Failure};
use crate::render;
use crate::speech::SpeechModels;
use crate::transcribe::transcribe_file;

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
) -> Result<u8, Failure> {
    use crate::understanding::call::CallUnderstanding;
    use crate::understanding::rules::load_rules;
    let files = analyze_inputs(paths).map_err(|e| Failure::new(exit::DATA_ERROR, e))?;
    if files.is_empty() {
        return Err(Failure::new(
            exit::DATA_ERROR,
            "nothing to analyze: no .wav or .jsonl file in the given folder(s)",
        ));
    }
    let config = load_config(config_path)?;
    let text_models = super::load_text_models(&config, models_dir)?;
    let rules = load_rules(rules_file).map(std::sync::Arc::new).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        Failure::new(exit::CONFIG, format!("the rule file has {} problem(s):\n{}", problems.len(), lines.join("\n")))
    })?;
    let mut speech: Option<SpeechModels> = None;
    let mut code = exit::OK;
    for file in &files {
        let is_wav = file.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("wav"));
        let (utterances, rtf) = if is_wav {
            let models = match &mut speech {
                Some(models) => models,
                empty => empty.insert(load_models(&config, models_dir)?),
            };
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
            let agent_line =
                if leg == crate::audio::Leg::Customer { call.agent_line_before(start) } else { String::new() };
            let facts = text_models
                .facts(leg, &text, &agent_line, prosody)
                .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
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
    Ok(code)
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

/// The call as `callbox watch` shows a live one (the same renderer), then what only an
/// offline run knows: rule hits without an event, the phase and tags reached, timings.
fn render_call(r: &CallReport) -> String {
    use crate::control::convert;
    let mut out = format!("{}\n", r.file);
    let mut items: Vec<(f64, MonitorItem)> = r
        .utterances
        .iter()
        .map(|u| (u.end_secs, MonitorItem::Utterance(convert::utterance_item(&r.file, u, None))))
        .chain(r.events.iter().map(|e| (e.at_secs, MonitorItem::Event(convert::event_item(&r.file, e)))))
        .collect();
    // Events after the utterance that raised them, as they arrive live.
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, item) in &items {
        out += &format!("{}\n", render::monitor_item(item, None));
    }
    for h in r.hits.iter().filter(|h| h.event.is_none()) {
        out += &format!("  rule {} ({:?}): {}\n", h.rule, h.severity, h.reason).to_lowercase();
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
