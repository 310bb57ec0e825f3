//! The spool folder: recordings the PBX drops in, one call per file.
//!
//! Only complete files are touched: the PBX writes under another name and
//! renames into place, so a `*.wav` present is whole; dot-files and other
//! extensions are left alone. A sidecar must be in place before its
//! recording is renamed in: it is read when the recording is picked up. Each file becomes a call in the registry
//! (stereo: one leg per channel; mono: the configured leg), then moves to
//! `done/` with a `.result.json`, or to `failed/` with a `.reason.txt`. A
//! corrupt file never stops the daemon. A file that arrives while the box is
//! at capacity waits in the spool for a later pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::calls::registry::CallRegistry;
use crate::calls::CallSummary;
use crate::config::RunningConfig;
use crate::customers::Customers;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::speech::live::{SpeechService, UtteranceEvent};
use crate::transcribe::LegUtterance;

const COMPONENT: &str = "spool";
/// A sidecar is a few fields; anything larger is not one.
const MAX_SIDECAR_BYTES: u64 = 64 * 1024;

/// Optional `<name>.json` beside a recording.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    pub call_id: Option<String>,
    pub caller_number: Option<String>,
    pub agent_id: Option<String>,
    pub campaign: Option<String>,
    pub script_version: Option<String>,
}

/// What `done/<name>.result.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolResult {
    pub file: String,
    pub sample_rate: u32,
    pub encoding: String,
    pub duration_ms: u64,
    /// The sidecar, without the caller number: that is kept only as `customer`.
    pub metadata: Sidecar,
    /// The caller's customer id (keyed hash of the number), when the sidecar gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    pub call: Option<CallSummary>,
    /// Both legs' utterances in time order; absent when speech is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utterances: Option<Vec<LegUtterance>>,
    /// Processing time over the recording's duration (all legs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_time_factor: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot prepare spool folder {path}: {source}")]
    Prepare { path: PathBuf, source: std::io::Error },
}

/// Why one file could not be processed.
#[derive(Debug)]
enum FileOutcome {
    Done(Box<SpoolResult>),
    Failed(String),
    /// Not now (at capacity): leave it for the next pass.
    Later(String),
}

/// Creates the spool folder and its `done/` and `failed/`.
pub fn prepare(dir: &Path) -> Result<(), SpoolError> {
    for d in [dir.to_owned(), dir.join("done"), dir.join("failed")] {
        std::fs::create_dir_all(&d).map_err(|source| SpoolError::Prepare { path: d.clone(), source })?;
    }
    Ok(())
}

/// Recordings ready in the folder, oldest first.
fn ready_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| is_recording_name(p))
        .filter_map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

fn is_recording_name(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("wav"))
}

/// The speech service and the settings it runs with, when speech is on.
type Speech<'a> = Option<(&'a SpeechService, &'a crate::config::SpeechConfig)>;

fn process(
    path: &Path,
    settings: &crate::config::SpoolConfig,
    calls: &CallRegistry,
    customers: Option<&Customers>,
    speech: Speech,
) -> FileOutcome {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_owned();
    let sidecar_path = path.with_extension("json");
    let metadata = match std::fs::metadata(&sidecar_path) {
        Err(_) => Sidecar::default(),
        Ok(m) if m.len() > MAX_SIDECAR_BYTES => {
            return FileOutcome::Failed(format!("sidecar larger than {MAX_SIDECAR_BYTES} bytes"))
        }
        Ok(_) => match std::fs::read(&sidecar_path).map(|b| serde_json::from_slice::<Sidecar>(&b)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return FileOutcome::Failed(format!("sidecar {}: {e}", sidecar_path.display())),
            Err(e) => return FileOutcome::Failed(format!("cannot read sidecar: {e}")),
        },
    };
    let recording = match crate::transcribe::read_recording(path, settings) {
        Ok(w) => w,
        Err(reason) => return FileOutcome::Failed(reason.to_string()),
    };
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("recording");
    let call_id = metadata.call_id.clone().unwrap_or_else(|| format!("spool:{stem}"));
    let legs = crate::transcribe::legs(&recording, settings);
    if legs.is_empty() {
        return FileOutcome::Failed("unexpected channel layout".into());
    }
    // Linked before the speech runs, so the tags it raises are the customer's at once.
    let customer = match (customers, metadata.caller_number.as_deref()) {
        (Some(customers), Some(number)) => match customers.link_call_blocking(&call_id, number) {
            Ok(record) => Some(record.customer),
            Err(e) => {
                log::warn!(component = COMPONENT, call_id = call_id.as_str(); "{name}: caller_number not used: {e}");
                None
            }
        },
        _ => None,
    };
    let mut guards = Vec::new();
    for (leg, samples) in &legs {
        match calls.open(&call_id, *leg, &format!("spool {name}")) {
            Ok(guard) => {
                guard.audio(samples.len() as u64, recording.sample_rate);
                guards.push(guard);
            }
            Err(reason) => return FileOutcome::Later(reason.to_string()),
        }
    }
    let started = std::time::Instant::now();
    let utterances = match speech {
        None => None,
        Some((service, config)) => match transcribe_legs(service, config, &call_id, &legs, recording.sample_rate) {
            Ok(u) => Some(u),
            Err(reason) => return FileOutcome::Failed(reason.to_string()),
        },
    };
    let duration_secs = recording.duration_secs();
    let real_time_factor = utterances.as_ref().map(|_| {
        if duration_secs > 0.0 {
            started.elapsed().as_secs_f64() / duration_secs
        } else {
            0.0
        }
    });
    let call = calls.summary(&call_id);
    for guard in guards {
        guard.close("recording processed");
    }
    FileOutcome::Done(Box::new(SpoolResult {
        file: name,
        sample_rate: recording.sample_rate,
        encoding: format!("{:?}", recording.encoding).to_lowercase(),
        duration_ms: (duration_secs * 1000.0).round() as u64,
        metadata: Sidecar { caller_number: None, ..metadata },
        customer,
        call,
        utterances,
        real_time_factor,
    }))
}

/// Transcribes every leg, publishes each utterance, and returns them in time order.
fn transcribe_legs(
    service: &SpeechService,
    config: &crate::config::SpeechConfig,
    call_id: &str,
    legs: &[(crate::audio::Leg, &[i16])],
    rate: u32,
) -> Result<Vec<LegUtterance>, String> {
    let mut out = Vec::new();
    for &(leg, samples) in legs {
        let utterances = crate::transcribe::transcribe_leg(service.models(), config, samples, rate)
            .map_err(|e| format!("speech: {e}"))?;
        // The result file is stored data: personal data is masked before it is written.
        out.extend(utterances.into_iter().map(|mut utterance| {
            utterance.text = crate::pii::mask(&utterance.text).0;
            utterance.asr.text = crate::pii::mask(&utterance.asr.text).0;
            LegUtterance { leg, utterance }
        }));
    }
    out.sort_by(|a, b| a.utterance.start_secs.total_cmp(&b.utterance.start_secs));
    for u in &out {
        let event = UtteranceEvent { call: call_id.to_owned(), leg: u.leg, utterance: u.utterance.clone() };
        service.publish(event, config.log_transcripts);
    }
    for &(leg, _) in legs {
        service.leg_ended(call_id, leg);
    }
    Ok(out)
}

/// Moves `path` (and its sidecar) into `dir`, never overwriting: a repeated
/// name gets a numeric suffix. Returns the new path of the recording.
fn file_away(path: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("recording").to_owned();
    let mut target_stem = stem.clone();
    let mut n = 1;
    while dir.join(format!("{target_stem}.wav")).exists() {
        target_stem = format!("{stem}.{n}");
        n += 1;
    }
    let target = dir.join(format!("{target_stem}.wav"));
    std::fs::rename(path, &target)?;
    let sidecar = path.with_extension("json");
    if sidecar.exists() {
        std::fs::rename(&sidecar, dir.join(format!("{target_stem}.json")))?;
    }
    Ok(target)
}

/// Writes a small file atomically (temp name, then rename), mode 0640.
fn write_beside(target: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = target.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(tmp, target)
}

/// Files a processed recording away. Returns whether it was postponed (left in place).
fn settle(path: &Path, dir: &Path, outcome: FileOutcome, log_postponed: bool) -> std::io::Result<bool> {
    match outcome {
        FileOutcome::Done(result) => {
            let target = file_away(path, &dir.join("done"))?;
            let json = serde_json::to_vec_pretty(&result).unwrap_or_default();
            write_beside(&target.with_extension("result.json"), &json)?;
            log::info!(component = COMPONENT; "{}: done ({} ms)", result.file, result.duration_ms);
        }
        FileOutcome::Failed(reason) => {
            let target = file_away(path, &dir.join("failed"))?;
            write_beside(&target.with_extension("reason.txt"), format!("{reason}\n").as_bytes())?;
            log::warn!(component = COMPONENT; "{}: failed: {reason}", path.display());
        }
        FileOutcome::Later(reason) => {
            if log_postponed {
                log::info!(component = COMPONENT; "{}: postponed: {reason}", path.display());
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Watches the spool folder until shutdown; the file in hand is finished first.
pub async fn watch(
    dir: PathBuf,
    config: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    customers: Option<Customers>,
    speech: Option<SpeechService>,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), SpoolError> {
    health.set(COMPONENT, HealthState::Ok, format!("watching {}", dir.display()));
    log::info!(component = COMPONENT; "watching {}", dir.display());
    // Files waiting for a free call slot: said once, not on every pass.
    let mut postponed = std::collections::HashSet::new();
    loop {
        let (settings, speech_config) = {
            let running = config.borrow();
            (running.config.spool.clone(), running.config.speech.clone())
        };
        for path in ready_files(&dir) {
            if shutdown.is_triggered() {
                break;
            }
            let (p, s, c, d) = (path.clone(), settings.clone(), calls.clone(), dir.clone());
            let (service, sc, cu) = (speech.clone(), speech_config.clone(), customers.clone());
            let first_time = !postponed.contains(&path);
            let settled = tokio::task::spawn_blocking(move || {
                let outcome = process(&p, &s, &c, cu.as_ref(), service.as_ref().map(|service| (service, &sc)));
                settle(&p, &d, outcome, first_time)
            })
            .await;
            match settled {
                Ok(Ok(waiting)) => {
                    if waiting {
                        postponed.insert(path);
                    } else {
                        postponed.remove(&path);
                    }
                    health.set(COMPONENT, HealthState::Ok, format!("watching {}", dir.display()));
                }
                Ok(Err(e)) => {
                    // Cannot move files: the folder is broken (permissions, full disk).
                    // Say so and retry on the next pass rather than spin on this file.
                    health.set(COMPONENT, HealthState::Degraded, format!("cannot file away {}: {e}", path.display()));
                    log::error!(component = COMPONENT; "cannot file away {}: {e}", path.display());
                    break;
                }
                Err(e) => log::error!(component = COMPONENT; "processing {} panicked: {e}", path.display()),
            }
        }
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(Duration::from_millis(settings.poll_interval_ms)) => {}
        }
    }
    health.set(COMPONENT, HealthState::Stopped, format!("{}", dir.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_recordings_are_picked() {
        for (name, picked) in [
            ("a.wav", true),
            ("B.WAV", true),
            (".a.wav", false),
            ("a.wav.part", false),
            ("a.tmp", false),
            ("a.json", false),
        ] {
            assert_eq!(is_recording_name(Path::new(name)), picked, "{name}");
        }
    }

    #[test]
    fn filing_away_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        for round in 0..3 {
            let file = dir.path().join("call.wav");
            std::fs::write(&file, format!("{round}")).unwrap();
            std::fs::write(file.with_extension("json"), "{}").unwrap();
            file_away(&file, &dir.path().join("done")).unwrap();
        }
        let done = dir.path().join("done");
        assert_eq!(std::fs::read_to_string(done.join("call.wav")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(done.join("call.2.wav")).unwrap(), "2");
        assert!(done.join("call.1.json").exists());
    }
}
