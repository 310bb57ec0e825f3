//! `callbox transcribe`: recordings through the speech path, printed or as JSON.

use std::path::{Path, PathBuf};

use super::{load_config, load_models};
use crate::exit::{self, Failure};
use crate::transcribe::{transcribe_file, TranscribeError};

pub fn transcribe(
    config_path: &Path,
    files: &[PathBuf],
    json: bool,
    lang: Option<&str>,
    models_dir: Option<&Path>,
) -> Result<u8, Failure> {
    let mut config = load_config(config_path)?;
    if let Some(lang) = lang {
        config.speech.language = lang.to_owned();
        let problems: Vec<_> = config.validate().into_iter().filter(|(k, _)| k == "speech.language").collect();
        if let Some((_, message)) = problems.first() {
            return Err(Failure::new(exit::USAGE, format!("--lang {message}")));
        }
    }
    let models = load_models(&config, models_dir)?;
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
                            u.leg.name(),
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
                return Err(Failure::new(exit::FAILURE, format!("{}: {e}", file.display())));
            }
        }
    }
    Ok(code)
}
