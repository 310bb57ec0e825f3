//! The data directory: created at start, then watched (writable, free space).
//!
//! Low space or an unwritable directory makes the component degraded, not
//! failed: the daemon keeps serving and says so in `status` and `doctor`; the
//! call store (a later component) decides what to refuse when it cannot write.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RunningConfig;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};

const COMPONENT: &str = "storage";
const PROBE_FILE: &str = ".callbox-write-probe";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create data directory {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("data directory {0} exists but is not a directory")]
    NotADirectory(PathBuf),
    #[error("data directory {path} belongs to {owner}, not root: run as that user (e.g. `sudo -u {name} callbox run`); as root this run would leave files there that the service cannot open. `callbox run --as-root` overrides this.")]
    OwnedByServiceUser { path: PathBuf, owner: String, name: String },
}

/// Refuses a root run on a data directory that belongs to another user (the service's):
/// keys and databases it created would be root's, and the service could no longer start.
pub fn check_root_run(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.uid() != 0 => {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid())).ok().flatten();
            let name = user.map_or_else(|| meta.uid().to_string(), |u| u.name);
            Err(StorageError::OwnedByServiceUser {
                path: dir.to_owned(),
                owner: format!("uid {} ({name})", meta.uid()),
                name,
            })
        }
        _ => Ok(()),
    }
}

/// Entries directly in the data directory (and in its `keys/`) whose owner is not the
/// directory's: left by a run as another user (root), they stop the service. Returns the
/// directory's owner and the foreign paths.
pub fn foreign_owned(dir: &Path) -> std::io::Result<(u32, Vec<PathBuf>)> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir)?.uid();
    let mut foreign = Vec::new();
    for folder in [dir.to_owned(), dir.join("keys")] {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.filter_map(Result::ok) {
            if entry.metadata().is_ok_and(|m| m.uid() != owner) {
                foreign.push(entry.path());
            }
        }
    }
    foreign.sort();
    Ok((owner, foreign))
}

/// Creates the data directory (mode 0750) if missing.
pub fn prepare(dir: &Path) -> Result<(), StorageError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(StorageError::NotADirectory(dir.to_owned())),
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| StorageError::Create { path: dir.to_owned(), source }),
    }
}

/// What a look at the data directory found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirReport {
    pub free_bytes: Option<u64>,
    /// Err holds why a write failed.
    pub writable: Result<(), String>,
}

/// Free bytes for an unprivileged writer under `dir` (statvfs).
// fsblkcnt_t and c_ulong are 32-bit on some targets: the casts are not no-ops everywhere.
#[allow(clippy::unnecessary_cast)]
pub fn free_bytes(dir: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(dir).ok().map(|s| (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Looks at the directory: free space (statvfs) and a real write + fsync + delete.
pub fn probe(dir: &Path) -> DirReport {
    let free_bytes = free_bytes(dir);
    let probe_path = dir.join(PROBE_FILE);
    let writable = std::fs::File::create(&probe_path)
        .and_then(|mut f| {
            f.write_all(b"probe")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::remove_file(&probe_path))
        .map_err(|e| e.to_string());
    DirReport { free_bytes, writable }
}

/// Pure judgement of a probe against the configured free-space floor.
pub fn assess(report: &DirReport, min_free_mb: u64) -> (HealthState, String) {
    let free = report.free_bytes.map(human_bytes).unwrap_or_else(|| "unknown".into());
    match (&report.writable, report.free_bytes) {
        (Err(e), _) => (HealthState::Degraded, format!("not writable: {e}")),
        (Ok(()), Some(bytes)) if bytes < min_free_mb.saturating_mul(1024 * 1024) => {
            (HealthState::Degraded, format!("only {free} free, below storage.min_free_mb = {min_free_mb}"))
        }
        (Ok(()), _) => (HealthState::Ok, format!("writable, {free} free")),
    }
}

/// Why new calls must be refused, if they must: less free space than `below_mb` (0: never).
pub fn refuse_calls(report: &DirReport, below_mb: u64) -> Option<String> {
    let free = report.free_bytes?;
    (below_mb > 0 && free < below_mb.saturating_mul(1024 * 1024)).then(|| {
        format!(
            "only {} free in the data directory, below storage.refuse_calls_below_mb = {below_mb}",
            human_bytes(free)
        )
    })
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Watches the data directory until shutdown, publishing health on change.
pub async fn monitor(
    dir: PathBuf,
    mut config: watch::Receiver<Arc<RunningConfig>>,
    calls: crate::calls::registry::CallRegistry,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), StorageError> {
    let mut last_state = None;
    let mut last_refusal: Option<String> = None;
    loop {
        let storage = config.borrow_and_update().config.storage.clone();
        let probe_dir = dir.clone();
        let report = tokio::task::spawn_blocking(move || probe(&probe_dir))
            .await
            .unwrap_or(DirReport { free_bytes: None, writable: Err("probe task failed".into()) });
        let (state, mut detail) = assess(&report, storage.min_free_mb);
        let refusal = refuse_calls(&report, storage.refuse_calls_below_mb);
        if refusal != last_refusal {
            match &refusal {
                Some(why) => log::error!(component = COMPONENT; "refusing new calls: {why}"),
                None if last_refusal.is_some() => log::info!(component = COMPONENT; "taking new calls again"),
                None => {}
            }
            calls.refuse_new_calls(refusal.clone());
            last_refusal = refusal.clone();
        }
        if let Some(why) = &refusal {
            detail = format!("REFUSING NEW CALLS ({why}); {detail}");
        }
        if last_state != Some(state) {
            match state {
                HealthState::Ok => log::info!(component = COMPONENT; "data directory {}: {detail}", dir.display()),
                _ => log::warn!(component = COMPONENT; "data directory {}: {detail}", dir.display()),
            }
            last_state = Some(state);
        }
        health.set(COMPONENT, state, format!("{}: {detail}", dir.display()));
        tokio::select! {
            _ = shutdown.wait() => break,
            // A reload re-checks at once with the new threshold. The sender
            // outlives every component; if it is gone, stop rather than spin.
            changed = config.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(storage.check_interval_secs)) => {}
        }
    }
    health.set(COMPONENT, HealthState::Stopped, format!("{}", dir.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_calls_are_refused_only_below_their_own_threshold() {
        let report = DirReport { free_bytes: Some(100 << 20), writable: Ok(()) };
        assert_eq!(refuse_calls(&report, 64), None);
        assert!(refuse_calls(&report, 128).is_some_and(|why| why.contains("100.0 MiB free")));
        assert_eq!(refuse_calls(&report, 0), None, "0 never refuses");
        assert_eq!(refuse_calls(&DirReport { free_bytes: None, writable: Ok(()) }, 128), None);
    }

    #[test]
    fn low_space_and_unwritable_are_degraded() {
        let ok = DirReport { free_bytes: Some(2 << 30), writable: Ok(()) };
        assert_eq!(assess(&ok, 1024).0, HealthState::Ok);
        assert_eq!(assess(&ok, 4096).0, HealthState::Degraded);
        assert!(assess(&ok, 4096).1.contains("2.0 GiB"));
        let ro = DirReport { free_bytes: Some(2 << 30), writable: Err("Read-only file system".into()) };
        let (state, detail) = assess(&ro, 0);
        assert_eq!(state, HealthState::Degraded);
        assert!(detail.contains("Read-only"));
    }

    #[test]
    fn probe_writes_for_real_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let report = probe(dir.path());
        assert_eq!(report.writable, Ok(()));
        assert!(report.free_bytes.unwrap() > 0);
        assert!(!dir.path().join(PROBE_FILE).exists());
        let missing = probe(&dir.path().join("gone"));
        assert!(missing.writable.is_err());
    }

    #[test]
    fn prepare_creates_with_0750_and_refuses_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        prepare(&data).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o750);
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(prepare(&file), Err(StorageError::NotADirectory(_))));
    }
}
