//! The speech path, call understanding and the call store run from the CLI without the
//! daemon: one file per command (`transcribe`, `bench_asr`, `bench_intent`, `bench_store`,
//! `bench_soak` and `bench_capacity` (which drive a private daemon with the call load of
//! `load`), `classify`, `analyze`) and the loaders they share. Each command returns
//! `Result<u8, Failure>`: the exit code of a run that did its job (possibly with some
//! inputs refused), or why it could not.

use std::path::Path;
use std::time::Instant;

use crate::config::{self, Config};
use crate::exit::{self, Failure};
use crate::speech::{SpeechError, SpeechModels};
use crate::understanding::intent::IntentModel;
use crate::understanding::live::UnderstandingModels;

mod analyze;
mod bench_asr;
mod bench_capacity;
mod bench_intent;
mod bench_outbox;
mod bench_soak;
mod bench_store;
mod classify;
mod load;
mod transcribe;

pub use analyze::analyze;
pub use bench_asr::bench_asr;
pub use bench_capacity::{bench_capacity, BenchCapacity, CallSource};
pub use bench_intent::bench_intent;
pub use bench_outbox::{bench_outbox, BenchOutbox};
pub use bench_soak::{bench_soak, soak_inputs, BenchSoak};
pub use bench_store::{bench_store, bench_store_stream};
pub use classify::classify;
pub use transcribe::transcribe;

/// The valid configuration, or every problem in it.
/// This process's resident memory now and at its peak, in MB (Linux `/proc/self/status`;
/// zeros elsewhere): the figures a box's RAM budget is held to.
pub(crate) fn process_memory_mb() -> (f64, f64) {
    memory_mb("/proc/self/status")
}

/// VmRSS and VmHWM, in MB, from a `/proc/PID/status` file (zeros when unreadable).
pub(crate) fn memory_mb(status_path: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    config::load(path).map(|loaded| loaded.config).map_err(|e| {
        let lines: Vec<String> = e.problem_lines().into_iter().map(|p| format!("  {p}")).collect();
        Failure::new(exit::CONFIG, format!("{e}\n{}", lines.join("\n")))
    })
}

fn load_models(config: &Config, dir: Option<&Path>) -> Result<SpeechModels, Failure> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    let started = Instant::now();
    let models = SpeechModels::load(&dir, &config.speech.encoder_buckets_secs).map_err(|e| {
        let fix = if matches!(e, SpeechError::Io { .. }) {
            format!("\ncallbox: {}", crate::paths::how_to_get_models(&dir))
        } else {
            String::new()
        };
        Failure::new(exit::UNAVAILABLE, format!("cannot load the speech models: {e}{fix}"))
    })?;
    log::info!("models from {} loaded in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
    Ok(models)
}

fn load_intent(config: &Config, models_dir: Option<&Path>) -> Result<IntentModel, Failure> {
    let dir = models_dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    crate::speech::ModelSet::open(&dir).and_then(|set| IntentModel::load(&set)).map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!("cannot load the intent model: {e}\ncallbox: {}", crate::paths::how_to_get_models(&dir)),
        )
    })
}

/// The intent and sentiment models together (what a live call runs per utterance).
fn load_text_models(config: &Config, models_dir: Option<&Path>) -> Result<UnderstandingModels, Failure> {
    let dir = models_dir.map(Path::to_path_buf).unwrap_or_else(|| config.speech.models_dir());
    UnderstandingModels::load(&dir).map_err(|e| {
        let fix = crate::paths::how_to_get_models(&dir);
        Failure::new(exit::UNAVAILABLE, format!("cannot load the intent/sentiment models: {e}\ncallbox: {fix}"))
    })
}

/// A text file's non-empty lines, the file bounded like a recording.
fn read_lines(path: &Path, max_mb: u64) -> Result<Vec<String>, String> {
    let text = crate::fsio::read_text_bounded(path, max_mb * 1024 * 1024, crate::fsio::Links::Follow)
        .map_err(|e| e.to_string())?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}
