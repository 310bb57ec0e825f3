//! `callbox doctor`: the checks a technician wants on site, each pass/warn/fail.
//!
//! Later issues add the broker and certificates here.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{self, Config};
use crate::control::client;
use crate::control::protocol::{HealthState, Request, Response};
use crate::storage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check { name, verdict, detail: detail.into() }
}

/// No real clock on a box built after this can read earlier (2026-01-01T00:00:00Z).
const CLOCK_FLOOR_UNIX: u64 = 1_767_225_600;

/// Runs every check. `socket` is where the CLI would reach the daemon.
pub fn run(config_path: &Path, data_dir: impl Fn(&Config) -> std::path::PathBuf, socket: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    match config::load(config_path) {
        Ok(loaded) => {
            let verdict = match loaded.source {
                config::ConfigSource::File { .. } => Verdict::Pass,
                config::ConfigSource::Defaults { .. } => Verdict::Warn,
            };
            checks.push(check("config", verdict, format!("{} is valid", loaded.source)));
            checks.push(config_file_permissions(config_path));
        }
        Err(e) => checks.push(check("config", Verdict::Fail, e.problem_lines().join("; "))),
    }
    let config = config::load_lenient(config_path);
    checks.push(access(&config.control));
    checks.push(data_directory(&data_dir(&config), config.storage.min_free_mb));
    checks.push(call_store(&config, &data_dir(&config), socket));
    checks.push(models(&config));
    checks.push(headquarters(&config, socket));
    checks.push(clock());
    checks.push(daemon(socket));
    checks
}

/// The speech models: present, every file matching its manifest digest.
fn models(config: &Config) -> Check {
    if !config.speech.enabled {
        return check("models", Verdict::Pass, "speech.enabled = false: no models needed");
    }
    let dir = config.speech.models_dir();
    let has_input =
        !config.audiosocket.listeners.is_empty() || config.spool.dir.is_some() || config.alsa.device.is_some();
    match crate::speech::ModelSet::open(&dir).and_then(|set| set.verify_all().map(|v| (set, v))) {
        Ok((set, (files, bytes))) => {
            let names: Vec<&str> = set.manifest.models.iter().map(|m| m.name.as_str()).collect();
            let detail = format!(
                "{}: {} ({files} files, {} MB, digests match)",
                dir.display(),
                names.join(", "),
                bytes / 1_000_000
            );
            check("models", Verdict::Pass, detail)
        }
        Err(e) => {
            // Without an input nothing needs them yet; with one the daemon will not start.
            let verdict = if has_input { Verdict::Fail } else { Verdict::Warn };
            check("models", verdict, format!("{e}; {}", crate::paths::how_to_get_models(&dir)))
        }
    }
}

/// Whether the caller's own groups let them use the daemon, judged as the daemon would.
fn access(control: &crate::config::ControlConfig) -> Check {
    use crate::control::auth::{describe_uid, groups_of, AccessPolicy, Peer};
    use crate::control::protocol::Role;
    let me = Peer {
        uid: nix::unistd::Uid::current().as_raw(),
        gid: nix::unistd::Gid::current().as_raw(),
        pid: std::process::id() as i32,
    };
    let groups = groups_of(&me);
    let policy = AccessPolicy::from_config(control);
    let who = describe_uid(me.uid);
    let in_technicians = policy.technician_gid.is_some_and(|g| groups.contains(&g));
    match policy.role_of(me.uid, &groups) {
        Some(Role::Admin) if me.uid != 0 && !in_technicians => check(
            "access",
            Verdict::Warn,
            format!(
                "{who} is an admin but not in '{}', so cannot open the socket: adduser <you> {}",
                control.technician_group, control.technician_group
            ),
        ),
        Some(role) => check("access", Verdict::Pass, format!("{who}: {role:?}").to_lowercase()),
        None => check(
            "access",
            Verdict::Warn,
            format!("{who} may not use the daemon: ask an admin to add you to '{}'", control.technician_group),
        ),
    }
}

fn config_file_permissions(path: &Path) -> Check {
    match std::fs::metadata(path) {
        Ok(meta) if meta.mode() & 0o002 != 0 => check(
            "config-permissions",
            Verdict::Fail,
            format!("{} is world-writable (mode {:o})", path.display(), meta.mode() & 0o7777),
        ),
        Ok(meta) if meta.uid() != 0 => check(
            "config-permissions",
            Verdict::Warn,
            format!("{} is owned by uid {}, not root", path.display(), meta.uid()),
        ),
        Ok(meta) => {
            check("config-permissions", Verdict::Pass, format!("owned by root, mode {:o}", meta.mode() & 0o7777))
        }
        Err(_) => check("config-permissions", Verdict::Pass, "no file (built-in defaults)"),
    }
}

fn data_directory(dir: &Path, min_free_mb: u64) -> Check {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => meta,
        Ok(_) => return check("data-dir", Verdict::Fail, format!("{} is not a directory", dir.display())),
        Err(e) => return check("data-dir", Verdict::Fail, format!("{}: {e}", dir.display())),
    };
    if meta.mode() & 0o007 != 0 {
        return check(
            "data-dir",
            Verdict::Fail,
            format!(
                "{} is accessible to others (mode {:o}); call data must be 0750",
                dir.display(),
                meta.mode() & 0o7777
            ),
        );
    }
    if let Ok((owner, foreign)) = storage::foreign_owned(dir) {
        if !foreign.is_empty() {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
                .ok()
                .flatten()
                .map_or_else(|| owner.to_string(), |u| u.name);
            let paths: Vec<String> = foreign.iter().map(|p| p.display().to_string()).collect();
            return check(
                "data-dir",
                Verdict::Fail,
                format!(
                    "{} file(s) in {} are not owned by {name}, the directory's owner (left by a run as another user, \
                     e.g. root); the service cannot open them. Fix: chown -R {name}: {}",
                    foreign.len(),
                    dir.display(),
                    paths.join(" ")
                ),
            );
        }
    }
    let report = storage::probe(dir);
    let (state, detail) = storage::assess(&report, min_free_mb);
    let verdict = match (state, &report.writable) {
        (crate::health::HealthState::Ok, _) => Verdict::Pass,
        // Writing as this (CLI) user may be refused where the daemon's user may write;
        // the daemon's own view is in the `daemon` check.
        (_, Err(_)) if !nix::unistd::Uid::effective().is_root() => Verdict::Warn,
        _ => Verdict::Fail,
    };
    check("data-dir", verdict, format!("{}: {detail}", dir.display()))
}

fn clock() -> Check {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    if now < CLOCK_FLOOR_UNIX {
        return check(
            "clock",
            Verdict::Fail,
            "system time is before 2026; call timestamps and certificates will be wrong",
        );
    }
    // ntp_adjtime with modes 0 only reads the kernel's synchronisation state.
    // SAFETY: timex is a plain C struct of integers (and padding); all-zero bytes are a
    // valid value of every field, and modes = 0 is the read-only request.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: tx is a valid, zero-initialised timex; modes = 0 makes the call read-only.
    let state = unsafe { libc::ntp_adjtime(&mut tx) };
    let now_text = crate::logging::utc_timestamp(SystemTime::now());
    if state == libc::TIME_ERROR || state < 0 {
        check(
            "clock",
            Verdict::Warn,
            format!("{now_text}, but not synchronised by NTP (enable systemd-timesyncd or chrony)"),
        )
    } else {
        check("clock", Verdict::Pass, format!("{now_text}, NTP-synchronised"))
    }
}

fn daemon(socket: &Path) -> Check {
    match client::request(socket, Request::Status {}) {
        Ok(Response::Status(report)) => {
            let bad: Vec<String> = report
                .components
                .iter()
                .filter(|c| c.state != HealthState::Ok)
                .map(|c| format!("{} {}: {}", c.name, c.state.as_str(), c.detail))
                .collect();
            if bad.is_empty() {
                check(
                    "daemon",
                    Verdict::Pass,
                    format!("running (pid {}), all components ok, via {}", report.pid, socket.display()),
                )
            } else {
                check("daemon", Verdict::Warn, bad.join("; "))
            }
        }
        Ok(Response::Error(e)) => check("daemon", Verdict::Fail, e.message),
        Ok(other) => check("daemon", Verdict::Fail, format!("unexpected response {other:?}")),
        Err(e) => check("daemon", Verdict::Fail, e.to_string()),
    }
}

/// The headquarters uplink: its TLS files as the daemon will read them, then the link's
/// state and backlog from the running daemon.
fn headquarters(config: &Config, socket: &Path) -> Check {
    const NAME: &str = "headquarters";
    if !config.hq.enabled() {
        return check(NAME, Verdict::Pass, "hq.brokers is empty: nothing is sent to headquarters");
    }
    if let Err(e) = crate::uplink::link::tls_for(&config.hq) {
        return check(NAME, Verdict::Fail, e.to_string());
    }
    match client::request(socket, Request::HqStatus {}) {
        Ok(Response::HqStatus(r)) => {
            let waiting: u64 = r.lanes.iter().map(|l| l.rows).sum();
            let broker = r.broker.unwrap_or_default();
            if r.connected {
                check(NAME, Verdict::Pass, format!("online ({broker}); {waiting} messages waiting, {} shed", r.shed))
            } else {
                check(
                    NAME,
                    Verdict::Warn,
                    format!(
                        "OFFLINE ({broker}: {}); {waiting} messages kept in the outbox",
                        r.last_error.unwrap_or_else(|| "connecting".into())
                    ),
                )
            }
        }
        Ok(Response::Error(e)) => check(NAME, Verdict::Warn, e.message),
        Ok(other) => check(NAME, Verdict::Fail, format!("unexpected response {other:?}")),
        // The daemon check says it is not running; the files are fine.
        Err(_) => check(NAME, Verdict::Pass, "TLS files readable and private; the daemon is not running"),
    }
}

/// The encrypted call store: the master key where the daemon will look for it, both files'
/// integrity (read-only, safe beside the running daemon), and the sweeper's lag.
fn call_store(config: &Config, data_dir: &Path, socket: &Path) -> Check {
    use crate::store::{master, CALLS_FILE, KEYS_FILE, STORE_DIR};
    const NAME: &str = "call store";
    if !config.store.enabled {
        return check(NAME, Verdict::Pass, "store.enabled = false: no calls are kept");
    }
    let store_dir = data_dir.join(STORE_DIR);
    let exists = store_dir.join(KEYS_FILE).exists();
    let key = data_dir.join(master::KEY_FILE);
    let mut notes = Vec::new();
    match std::fs::metadata(&key) {
        Ok(m) if m.mode() & 0o077 != 0 => {
            return check(
                NAME,
                Verdict::Fail,
                format!("{} has mode {:o}: make it 0600", key.display(), m.mode() & 0o777),
            );
        }
        Ok(m) if m.len() != crate::store::crypto::KEY_BYTES as u64 => {
            return check(
                NAME,
                Verdict::Fail,
                format!("{} has {} bytes, not 32: restore it from its backup", key.display(), m.len()),
            );
        }
        Ok(_) => notes.push(format!("master key {}", key.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && exists => notes.push(format!(
            "no {}: the key must come from the systemd credential {} (else the daemon will not start)",
            key.display(),
            master::CREDENTIAL_NAME
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(NAME, Verdict::Pass, "no store yet: the daemon creates it and its master key on first start");
        }
        Err(e) => {
            return check(NAME, Verdict::Warn, format!("cannot check {} ({e}): run doctor as root", key.display()))
        }
    }
    for file in [CALLS_FILE, KEYS_FILE] {
        let path = store_dir.join(file);
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let verdict = rusqlite::Connection::open_with_flags(&path, flags)
            .and_then(|c| c.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)));
        match verdict {
            Ok(v) if v == "ok" => {}
            Ok(v) => return check(NAME, Verdict::Fail, format!("{}: integrity check: {v}", path.display())),
            Err(e) => {
                return check(NAME, Verdict::Warn, format!("cannot check {} ({e}): run doctor as root", path.display()))
            }
        }
    }
    notes.push("integrity ok".into());
    if let Ok(Response::StoreStats(stats)) = client::request(socket, Request::StoreStats {}) {
        notes.push(format!("{} calls, {:.1} MiB", stats.calls, stats.bytes as f64 / (1024.0 * 1024.0)));
        let now = crate::store::now_ms();
        let allowed_ms = (config.store.sweep_interval_mins as i64 * 2 + 5) * 60_000;
        if let Some(at) = stats.last_sweep_unix_ms {
            if now - at > allowed_ms {
                let mins = (now - at) / 60_000;
                return check(
                    NAME,
                    Verdict::Warn,
                    format!("{}; the retention sweep last ran {mins} min ago", notes.join("; ")),
                );
            }
        }
        if stats.writes_waiting > 0 {
            return check(
                NAME,
                Verdict::Fail,
                format!(
                    "{}; {} writes waiting: the disk refuses them (full?): free space under the data directory",
                    notes.join("; "),
                    stats.writes_waiting
                ),
            );
        }
        if stats.audio_paused {
            return check(
                NAME,
                Verdict::Warn,
                format!(
                    "{}; audio is not being kept: free space is below storage.stop_audio_below_mb (free space, or lower it)",
                    notes.join("; ")
                ),
            );
        }
        if stats.writes_refused > 0 {
            return check(
                NAME,
                Verdict::Warn,
                format!("{}; {} writes refused (see the log)", notes.join("; "), stats.writes_refused),
            );
        }
    }
    check(NAME, Verdict::Pass, notes.join("; "))
}
