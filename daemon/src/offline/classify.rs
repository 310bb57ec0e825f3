//! `callbox classify`: the intent model on text from the arguments or a file.

use std::path::Path;

use super::{load_config, load_intent, read_lines};
use crate::exit::{self, Failure};

/// `callbox classify`: one utterance from the arguments, or one per line of `--file`; a
/// line `agent line<TAB>reply` reads the reply after that agent line.
pub fn classify(
    config_path: &Path,
    words: &[String],
    file: Option<&Path>,
    json: bool,
    models_dir: Option<&Path>,
) -> Result<u8, Failure> {
    let (config, model) = load_config(config_path).and_then(|c| load_intent(&c, models_dir).map(|m| (c, m)))?;
    let texts: Vec<String> = match file {
        None if words.is_empty() => {
            return Err(Failure::new(
                exit::USAGE,
                "give the text to classify, or --file FILE with one utterance per line",
            ));
        }
        None => vec![words.join(" ")],
        Some(path) => read_lines(path, config.spool.max_file_mb)
            .map_err(|e| Failure::new(exit::DATA_ERROR, format!("{}: {e}", path.display())))?,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in &texts {
        let (context, text) = line.split_once('\t').unwrap_or(("", line.as_str()));
        let c = model.classify_in_context(text, context).map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
        let line = if json {
            let mut v = serde_json::json!({
                "text": text, "label": c.label, "confidence": c.confidence, "top3": c.top3, "labels": c.labels
            });
            if !context.is_empty() {
                v["context"] = context.into();
            }
            v.to_string()
        } else {
            let top: Vec<String> = c.top3.iter().map(|s| format!("{} {:.2}", s.label, s.p)).collect();
            format!("{:<22} {:.2}  ({})  {text}", c.labels.join("+"), c.confidence, top.join(", "))
        };
        if std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()).is_err() {
            return Ok(exit::OK); // stdout closed (a pager quit): nothing more to say
        }
    }
    let _ = std::io::Write::flush(&mut out);
    Ok(exit::OK)
}
