//! `callbox bench intent`: per-utterance latency of the text models together (masking,
//! intent in context, sentiment), as a live call runs them.

use std::path::Path;
use std::time::Instant;

use super::{load_config, load_text_models, read_lines};
use crate::exit::{self, Failure};

/// `callbox bench intent`: per-utterance latency of the text models on one core.
pub fn bench_intent(
    config_path: &Path,
    file: Option<&Path>,
    runs: usize,
    json: bool,
    models_dir: Option<&Path>,
) -> Result<u8, Failure> {
    let (config, models) = load_config(config_path).and_then(|c| load_text_models(&c, models_dir).map(|m| (c, m)))?;
    let default = config.speech.models_dir().join("intent/eval.tsv");
    let dir_default = models_dir.map(|d| d.join("intent/eval.tsv")).unwrap_or(default);
    let path = file.map(Path::to_path_buf).unwrap_or(dir_default);
    // (agent line, reply): a given file has one reply per line, or `agent line<TAB>reply`.
    let texts: Vec<(String, String)> = match read_lines(&path, config.spool.max_file_mb) {
        // The test splits are TSV with a header naming the `text` and `context` columns.
        Ok(lines) if file.is_none() => {
            let header: Vec<&str> = lines.first().map(|h| h.split('\t').collect()).unwrap_or_default();
            let column = |name: &str| header.iter().position(|c| *c == name);
            let (Some(text), context) = (column("text"), column("context")) else {
                return Err(Failure::new(exit::DATA_ERROR, format!("{}: no `text` column", path.display())));
            };
            lines
                .iter()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    let context = context.and_then(|c| f.get(c)).copied().unwrap_or("");
                    Some((context.to_owned(), (*f.get(text)?).to_owned()))
                })
                .collect()
        }
        Ok(lines) => lines
            .into_iter()
            .map(|l| match l.split_once('\t') {
                Some((agent, reply)) => (agent.to_owned(), reply.to_owned()),
                None => (String::new(), l),
            })
            .collect(),
        Err(e) => {
            return Err(Failure::new(exit::DATA_ERROR, format!("{}: {e}", path.display())));
        }
    };
    if texts.is_empty() {
        return Err(Failure::new(exit::DATA_ERROR, format!("{}: no utterances", path.display())));
    }
    let mut per_utterance_us = Vec::new();
    for _ in 0..runs.max(1) {
        for (agent, text) in &texts {
            let started = Instant::now();
            if let Err(e) = models.facts(crate::audio::Leg::Customer, text, agent, None) {
                return Err(Failure::new(exit::FAILURE, e.to_string()));
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
    Ok(exit::OK)
}
