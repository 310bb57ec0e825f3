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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::calls::registry::CallRegistry;
use crate::calls::CallSummary;
use crate::config::RunningConfig;
use crate::customers::Customers;
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::speech::live::{SpeechService, UtteranceEvent};
use crate::store::audio::AudioChunker;
use crate::store::live::CallVault;
use crate::store::StoreOp;
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

/// Where a spooled call's outcome is kept besides the result file.
#[derive(Clone, Default)]
pub struct Stores {
    /// Customer tags across calls (the caller number becomes a keyed hash there).
    pub customers: Option<Customers>,
    /// The encrypted call store: the sidecar's agent, campaign, script and customer.
    pub vault: Option<CallVault>,
}

/// What `done/<name>.result.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolResult {
    /// The recording's original name, escaped (control characters, non-UTF-8 bytes).
    pub file: String,
    /// Its size: with `file`, what the start-up repair matches an interrupted filing on.
    pub size_bytes: u64,
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

/// What a look at the folder found.
#[derive(Debug, Default)]
struct Scan {
    /// Regular `*.wav` files: (mtime, path, size), for the settle check.
    files: Vec<(SystemTime, PathBuf, u64)>,
    /// `*.wav` entries that are not regular files, with their kind: never read, filed away.
    not_regular: Vec<(PathBuf, &'static str)>,
}

/// The folder's `*.wav` entries, without following any link (`DirEntry::file_type`
/// is the entry's own type).
fn scan(dir: &Path) -> Scan {
    let mut scan = Scan::default();
    let Ok(entries) = std::fs::read_dir(dir) else { return scan };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if !is_recording_name(&path) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.file_type().is_file() {
            scan.files.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), path, meta.len()));
        } else {
            scan.not_regular.push((path, crate::fsio::file_kind(&meta.file_type())));
        }
    }
    scan.files.sort();
    scan
}

/// A recording's name ends in `.wav` (any case) and is not a dot-file; judged on the
/// name's bytes, so a name that is not UTF-8 is still a recording.
fn is_recording_name(path: &Path) -> bool {
    let Some(name) = path.file_name() else { return false };
    let name = name.as_bytes();
    !name.starts_with(b".") && name.len() > 4 && name[name.len() - 4..].eq_ignore_ascii_case(b".wav")
}

/// The settle check: a file is picked up only once its size and mtime have stayed the
/// same for `spool.settle_ms`, so a recording written in place is not read half-way.
#[derive(Debug, Default)]
struct Settling {
    seen: HashMap<PathBuf, (u64, SystemTime, Instant)>,
}

impl Settling {
    /// Which of the listed files are ready at `now`; forgets files no longer listed.
    fn ready(&mut self, files: Vec<(SystemTime, PathBuf, u64)>, now: Instant, settle: Duration) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        let mut seen = HashMap::with_capacity(files.len());
        for (mtime, path, len) in files {
            let since = match self.seen.get(&path) {
                Some(&(l, m, since)) if l == len && m == mtime => since,
                _ => now,
            };
            if now.duration_since(since) >= settle {
                ready.push(path.clone());
            }
            seen.insert(path, (len, mtime, since));
        }
        self.seen = seen;
        ready
    }
}

/// The default call id of a spooled file: its escaped name, shortened with a digest
/// when the name is longer than a call id may be.
fn default_call_id(path: &Path) -> String {
    let stem = path.file_stem().map(|s| crate::escape::escape_bytes(s.as_bytes())).unwrap_or_default();
    let id = format!("spool:{stem}");
    if id.chars().count() <= crate::calls::MAX_CALL_ID_CHARS {
        return id;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, stem.as_bytes());
    let tag = crate::hex::encode(&digest.as_ref()[..6]);
    let head: String = id.chars().take(crate::calls::MAX_CALL_ID_CHARS - 14).collect();
    format!("{head}~{tag}")
}

/// Reads a recording's sidecar: absent is fine; a link, FIFO, device, oversized or
/// invalid sidecar fails the recording with the reason.
fn read_sidecar(path: &Path) -> Result<Sidecar, String> {
    let bytes = match crate::fsio::read_bounded(path, MAX_SIDECAR_BYTES, crate::fsio::Links::Refuse) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(Sidecar::default()),
        Err(e) => return Err(format!("sidecar: {e}")),
    };
    parse_sidecar(&bytes).map_err(|e| format!("sidecar {}: {e}", crate::escape::file_name(path)))
}

/// A JSON error as a reason that may be logged: serde's "invalid type: integer
/// `13800138000`" quotes the value, which can be a caller number. Keep what was expected
/// and where, never the value.
fn without_values(e: &serde_json::Error) -> String {
    let message = e.to_string();
    if message.starts_with("invalid type") || message.starts_with("invalid value") {
        let expected = message.find(", expected").map_or("", |at| &message[at + 2..]);
        format!("a field has the wrong type or value ({expected})")
    } else {
        message
    }
}

/// A sidecar's bytes: JSON with known keys only, and a call id valid as the control
/// protocol's are.
pub fn parse_sidecar(bytes: &[u8]) -> Result<Sidecar, String> {
    let sidecar: Sidecar = serde_json::from_slice(bytes).map_err(|e| without_values(&e))?;
    if let Some(id) = &sidecar.call_id {
        crate::calls::check_call_id(id).map_err(|e| format!("call_id: {e}"))?;
    }
    Ok(sidecar)
}

/// The speech service and the settings it runs with, when speech is on.
type Speech<'a> = Option<(&'a SpeechService, &'a crate::config::SpeechConfig)>;

fn process(
    path: &Path,
    settings: &crate::config::SpoolConfig,
    calls: &CallRegistry,
    stores: &Stores,
    speech: Speech,
) -> FileOutcome {
    let customers = stores.customers.as_ref();
    let name = crate::escape::file_name(path);
    let metadata = match read_sidecar(&path.with_extension("json")) {
        Ok(sidecar) => sidecar,
        Err(reason) => return FileOutcome::Failed(reason),
    };
    let mut recording = match crate::transcribe::open_recording(path, settings, crate::fsio::Links::Refuse) {
        Ok(w) => w,
        Err(reason) => return FileOutcome::Failed(reason.to_string()),
    };
    let call_id = metadata.call_id.clone().unwrap_or_else(|| default_call_id(path));
    let legs = crate::transcribe::leg_layout(recording.channels, settings);
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
    // Told to the store before the first utterance is understood (the store keeps it
    // until the call's record begins).
    if let Some(vault) = &stores.vault {
        let info = crate::store::CallInfo {
            source: Some("spool".into()),
            agent: metadata.agent_id.clone(),
            campaign: metadata.campaign.clone(),
            script: metadata.script_version.clone(),
            customer: customer.clone(),
            converted: false,
        };
        if let Err(e) = vault.write_blocking(StoreOp::Describe { call: call_id.clone(), info }) {
            log::warn!(component = COMPONENT, call_id = call_id.as_str(); "{name}: sidecar not kept in the call store: {e}");
        }
    }
    let mut guards = Vec::new();
    for leg in &legs {
        match calls.open(&call_id, *leg, &format!("spool {name}")) {
            Ok(guard) => {
                guard.audio(recording.frames(), recording.sample_rate);
                guards.push(guard);
            }
            Err(reason) => return FileOutcome::Later(reason.to_string()),
        }
    }
    let started = std::time::Instant::now();
    let utterances = match speech {
        None => None,
        Some((service, config)) => match transcribe_legs(
            service,
            &config.for_campaign(metadata.campaign.as_deref()),
            &call_id,
            &mut recording,
            &legs,
        ) {
            Ok(u) => Some(u),
            Err(reason) => return FileOutcome::Failed(reason.to_string()),
        },
    };
    // With store.keep_audio the recording moves into the store (sealed) before the spool
    // deletes it; a failure here costs the audio only, never the call's words.
    if let (Some(vault), Some(_)) = (stores.vault.as_ref().filter(|v| v.keep_audio()), &utterances) {
        if let Err(reason) = keep_recording_audio(vault, path, settings, &call_id, &legs) {
            log::warn!(component = COMPONENT, call_id = call_id.as_str(); "{name}: audio not kept in the call store: {reason}");
        }
    }
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
        size_bytes: std::fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0),
        sample_rate: recording.sample_rate,
        encoding: format!("{:?}", recording.encoding).to_lowercase(),
        duration_ms: (duration_secs * 1000.0).round() as u64,
        metadata: Sidecar { caller_number: None, ..metadata },
        customer,
        call,
        utterances: utterances.filter(|_| settings.keep_in_clear),
        real_time_factor,
    }))
}

/// Streams a recording's legs into the call store as µ-law chunks, then waits until the
/// store thread has taken them (so the recording can be deleted).
fn keep_recording_audio(
    vault: &CallVault,
    path: &Path,
    settings: &crate::config::SpoolConfig,
    call_id: &str,
    legs: &[crate::audio::Leg],
) -> Result<(), String> {
    let mut recording =
        crate::transcribe::open_recording(path, settings, crate::fsio::Links::Refuse).map_err(|e| e.to_string())?;
    let rate = recording.sample_rate;
    let mut chunkers: Vec<AudioChunker> = legs.iter().map(|&leg| AudioChunker::new(leg, rate, 0.0)).collect();
    let send =
        |chunk| vault.write_blocking(StoreOp::Audio { call: call_id.to_owned(), chunk }).map_err(|e| e.to_string());
    loop {
        let block = recording.read_block(rate as usize).map_err(|e| e.to_string())?;
        if block.first().is_none_or(Vec::is_empty) {
            break;
        }
        for (chunker, channel) in chunkers.iter_mut().zip(&block) {
            chunker.push(channel).into_iter().try_for_each(send)?;
        }
    }
    chunkers.into_iter().try_for_each(|c| send(c.finish()))?;
    vault.barrier_blocking().map_err(|e| e.to_string())
}

/// Transcribes every leg, streaming the recording in blocks, publishes each utterance,
/// and returns them in time order.
fn transcribe_legs(
    service: &SpeechService,
    config: &crate::config::SpeechConfig,
    call_id: &str,
    recording: &mut crate::transcribe::RecordingStream,
    legs: &[crate::audio::Leg],
) -> Result<Vec<LegUtterance>, crate::transcribe::StreamError> {
    let mut out = crate::transcribe::transcribe_stream(service.models(), config, recording, legs)?;
    // The result file is stored data: personal data is masked before it is written.
    for u in &mut out {
        u.utterance.text = crate::pii::mask(&u.utterance.text).0;
        u.utterance.asr.text = crate::pii::mask(&u.utterance.asr.text).0;
    }
    for u in &out {
        let event = UtteranceEvent { call: call_id.to_owned(), leg: u.leg, utterance: u.utterance.clone() };
        service.publish(event);
    }
    for &leg in legs {
        service.leg_ended(call_id, leg);
    }
    Ok(out)
}

/// Longest stem a filed-away recording keeps, in bytes: with `.result.json` and a
/// numeric suffix its names stay under the 255 bytes a file name may have. The full
/// name is kept (escaped) inside the result or reason file.
const MAX_FILED_STEM_BYTES: usize = 200;

fn with_suffix(dir: &Path, stem: &OsStr, suffix: &str) -> PathBuf {
    let mut name = stem.to_owned();
    name.push(suffix);
    dir.join(name)
}

/// A stem under which nothing is filed in `dir` yet (a repeated name gets `.1`, `.2` …).
fn free_stem(path: &Path, dir: &Path) -> OsString {
    let stem = path.file_stem().map(OsStr::as_bytes).unwrap_or(b"recording");
    let mut cut = stem.len().min(MAX_FILED_STEM_BYTES);
    // Cut on a character boundary when the name is UTF-8.
    while std::str::from_utf8(&stem[..cut]).is_err() && std::str::from_utf8(stem).is_ok() {
        cut -= 1;
    }
    let stem = OsStr::from_bytes(&stem[..cut]);
    let taken = |candidate: &OsStr| {
        [".wav", ".json", ".result.json", ".reason.txt"]
            .iter()
            .any(|suffix| std::fs::symlink_metadata(with_suffix(dir, candidate, suffix)).is_ok())
    };
    let mut candidate = stem.to_owned();
    let mut n = 1;
    while taken(&candidate) {
        candidate = stem.to_owned();
        candidate.push(format!(".{n}"));
        n += 1;
    }
    candidate
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a small file durably: a temp name, fsync, rename, fsync of the folder.
/// Mode 0640.
fn write_durably(target: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = target.parent().unwrap_or(Path::new("."));
    let mut tmp_name = OsString::from(".");
    tmp_name.push(target.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    })();
    if written.is_err() {
        // A full disk leaves no half-written temp behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Moves a recording (and its sidecar) into `dir` under `stem`; renames never follow
/// links and never overwrite (the stem is free). The sidecar goes first: a crash between
/// the two renames leaves the recording in the spool, which the start-up repair files
/// beside its result (the other order left a sidecar behind for good, found by the kill -9
/// soak: 3 of 4,000, and it would have been read as the next same-named recording's).
fn move_recording(path: &Path, dir: &Path, stem: &OsStr) -> std::io::Result<()> {
    let sidecar = path.with_extension("json");
    if std::fs::symlink_metadata(&sidecar).is_ok() {
        std::fs::rename(&sidecar, with_suffix(dir, stem, ".json"))?;
    }
    std::fs::rename(path, with_suffix(dir, stem, ".wav"))?;
    sync_dir(dir)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Deletes a processed recording and its sidecar (the sidecar first, for the same reason
/// `move_recording` moves it first), then syncs the spool folder. The call is in the
/// encrypted store; a clear copy would outlive retention and erasure.
fn delete_recording(path: &Path) -> std::io::Result<()> {
    let sidecar = path.with_extension("json");
    if std::fs::symlink_metadata(&sidecar).is_ok() {
        std::fs::remove_file(&sidecar)?;
    }
    std::fs::remove_file(path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// What a reason file says: the reason, then the recording's original (escaped) name,
/// which the start-up repair matches on.
fn reason_text(reason: &str, name: &str, size_bytes: u64) -> String {
    format!("{reason}\nfile: {name}\nsize: {size_bytes}\n")
}

/// Files a processed recording away: its result (or reason) first, durably, then the
/// recording, so a crash or a full disk never leaves a filed recording without its
/// result. Returns whether it was postponed (left in place on purpose).
fn file_away(
    path: &Path,
    dir: &Path,
    outcome: &FileOutcome,
    log_postponed: bool,
    keep_in_clear: bool,
) -> std::io::Result<bool> {
    let name = crate::escape::file_name(path);
    match outcome {
        FileOutcome::Done(result) => {
            let done = dir.join("done");
            let stem = free_stem(path, &done);
            let json = serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?;
            write_durably(&with_suffix(&done, &stem, ".result.json"), &json)?;
            if keep_in_clear {
                move_recording(path, &done, &stem)?;
            } else {
                delete_recording(path)?;
            }
            log::info!(component = COMPONENT; "{name}: done ({} ms)", result.duration_ms);
        }
        FileOutcome::Failed(reason) => {
            let failed = dir.join("failed");
            let stem = free_stem(path, &failed);
            write_durably(
                &with_suffix(&failed, &stem, ".reason.txt"),
                reason_text(reason, &name, std::fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0)).as_bytes(),
            )?;
            move_recording(path, &failed, &stem)?;
            log::warn!(component = COMPONENT; "{name}: failed: {reason}");
        }
        FileOutcome::Later(reason) => {
            if log_postponed {
                log::info!(component = COMPONENT; "{name}: postponed: {reason}");
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Finishes what a crash interrupted: a result or reason file written whose recording
/// is still in the spool gets its recording moved beside it; stray temp files go.
fn repair(dir: &Path, keep_in_clear: bool) {
    let waiting: HashMap<(String, u64), PathBuf> =
        scan(dir).files.into_iter().map(|(_, path, size)| ((crate::escape::file_name(&path), size), path)).collect();
    for (sub, suffix) in [("done", ".result.json"), ("failed", ".reason.txt")] {
        let folder = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let file = entry.file_name();
            let bytes = file.as_bytes();
            if bytes.starts_with(b".") && bytes.ends_with(b".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(stem) = bytes.strip_suffix(suffix.as_bytes()).map(OsStr::from_bytes) else { continue };
            if std::fs::symlink_metadata(with_suffix(&folder, stem, ".wav")).is_ok() {
                continue;
            }
            let Ok(text) = crate::fsio::read_text_bounded(&entry.path(), 16 << 20, crate::fsio::Links::Refuse) else {
                continue;
            };
            let original = if sub == "done" {
                serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| Some((v.get("file")?.as_str()?.to_owned(), v.get("size_bytes")?.as_u64()?)))
            } else {
                let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::to_owned);
                field("file: ").zip(field("size: ").and_then(|n| n.parse().ok()))
            };
            if let Some(path) = original.and_then(|key| waiting.get(&key)) {
                let finished = if sub == "done" && !keep_in_clear {
                    delete_recording(path)
                } else {
                    move_recording(path, &folder, stem)
                };
                match finished {
                    Ok(()) => {
                        log::info!(component = COMPONENT; "{}: filing finished after an interrupted run", crate::escape::file_name(path))
                    }
                    Err(e) => {
                        log::warn!(component = COMPONENT; "cannot finish filing {}: {e}", crate::escape::file_name(path))
                    }
                }
            }
        }
    }
}

/// A `*.wav` entry that is not a regular file goes to `failed/` as it is (a link is
/// moved, never followed), with the reason.
fn file_away_not_regular(path: &Path, kind: &str, dir: &Path) -> std::io::Result<()> {
    let reason = format!("not a regular file ({kind}); never read");
    file_away(path, dir, &FileOutcome::Failed(reason), false, true).map(|_| ())
}

/// Watches the spool folder until shutdown; the file in hand is finished first.
pub async fn watch(
    dir: PathBuf,
    config: watch::Receiver<Arc<RunningConfig>>,
    calls: CallRegistry,
    stores: Stores,
    speech: Option<SpeechService>,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), SpoolError> {
    let watching = format!("watching {}", dir.display());
    {
        let d = dir.clone();
        let keep = config.borrow().config.spool.keep_in_clear;
        let _ = tokio::task::spawn_blocking(move || repair(&d, keep)).await;
    }
    health.set(COMPONENT, HealthState::Ok, watching.clone());
    log::info!(component = COMPONENT; "{watching}");
    // Files waiting for a free call slot: said once, not on every pass.
    let mut postponed = std::collections::HashSet::new();
    let mut settling = Settling::default();
    // Entries that are not regular files and could not be moved to failed/ (warned once).
    let mut stuck: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    // A processed file that could not be filed away (full disk, permissions): its
    // outcome is kept and filing retried on later passes, without processing it again.
    let mut unfiled: Option<(PathBuf, Arc<FileOutcome>)> = None;
    loop {
        let (settings, speech_config) = {
            let running = config.borrow();
            (running.config.spool.clone(), running.config.speech.clone())
        };
        'pass: {
            if let Some((path, outcome)) = unfiled.take() {
                let (p, d, o) = (path.clone(), dir.clone(), outcome.clone());
                let keep = settings.keep_in_clear;
                match tokio::task::spawn_blocking(move || file_away(&p, &d, &o, false, keep)).await {
                    Ok(Ok(_)) => health.set(COMPONENT, HealthState::Ok, watching.clone()),
                    Ok(Err(e)) if std::fs::symlink_metadata(&path).is_ok() => {
                        health.set(COMPONENT, HealthState::Degraded, unfiled_reason(&path, &e));
                        unfiled = Some((path, outcome));
                        break 'pass;
                    }
                    // The file went away meanwhile: nothing left to file.
                    _ => {}
                }
            }
            let found = {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || scan(&d)).await.unwrap_or_default()
            };
            let mut still_stuck = std::collections::HashSet::new();
            for (path, kind) in found.not_regular {
                if let Err(e) = file_away_not_regular(&path, kind, &dir) {
                    // Said once per entry, not on every pass while it stays.
                    if !stuck.contains(&path) {
                        let name = crate::escape::file_name(&path);
                        log::warn!(component = COMPONENT; "{name}: not a regular file ({kind}) and cannot be moved to failed/: {e}");
                    }
                    still_stuck.insert(path);
                }
            }
            stuck = still_stuck;
            let settle = Duration::from_millis(settings.settle_ms);
            for path in settling.ready(found.files, Instant::now(), settle) {
                if shutdown.is_triggered() {
                    break;
                }
                let (p, s, c) = (path.clone(), settings.clone(), calls.clone());
                let (service, sc, st) = (speech.clone(), speech_config.clone(), stores.clone());
                let processed = tokio::task::spawn_blocking(move || {
                    Arc::new(process(&p, &s, &c, &st, service.as_ref().map(|service| (service, &sc))))
                })
                .await;
                let outcome = match processed {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        log::error!(component = COMPONENT; "processing {} panicked: {e}", crate::escape::file_name(&path));
                        continue;
                    }
                };
                let first_time = !postponed.contains(&path);
                let (p, d, o) = (path.clone(), dir.clone(), outcome.clone());
                let keep = settings.keep_in_clear;
                match tokio::task::spawn_blocking(move || file_away(&p, &d, &o, first_time, keep)).await {
                    Ok(Ok(waiting)) => {
                        if waiting {
                            postponed.insert(path);
                        } else {
                            postponed.remove(&path);
                        }
                        health.set(COMPONENT, HealthState::Ok, watching.clone());
                    }
                    Ok(Err(e)) => {
                        // The recording stays in the spool; its outcome waits to be filed.
                        let reason = unfiled_reason(&path, &e);
                        log::error!(component = COMPONENT; "{reason}; the recording stays in the spool and is filed when possible");
                        health.set(COMPONENT, HealthState::Degraded, reason);
                        unfiled = Some((path, outcome));
                        break;
                    }
                    Err(e) => {
                        log::error!(component = COMPONENT; "filing {} panicked: {e}", crate::escape::file_name(&path))
                    }
                }
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

fn unfiled_reason(path: &Path, e: &std::io::Error) -> String {
    format!("cannot file away {}: {e}", crate::escape::file_name(path))
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

    fn failed(reason: &str) -> FileOutcome {
        FileOutcome::Failed(reason.into())
    }

    #[test]
    fn filing_away_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        for round in 0..3 {
            let file = dir.path().join("call.wav");
            std::fs::write(&file, format!("{round}")).unwrap();
            std::fs::write(file.with_extension("json"), "{}").unwrap();
            file_away(&file, dir.path(), &failed("bad"), false, false).unwrap();
        }
        let done = dir.path().join("failed");
        assert_eq!(std::fs::read_to_string(done.join("call.wav")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(done.join("call.2.wav")).unwrap(), "2");
        assert!(done.join("call.1.json").exists());
        assert!(std::fs::read_to_string(done.join("call.2.reason.txt")).unwrap().starts_with("bad\n"));
    }

    #[test]
    fn a_long_name_is_filed_with_its_full_name_inside() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        // 246 characters: the old `<name>.result.json` hit ENAMETOOLONG and lost the result.
        let name = format!("{}.wav", "长".repeat(80).chars().chain("x".repeat(162).chars()).collect::<String>());
        let name = &name[..name.len().min(250)];
        let file = dir.path().join(name);
        std::fs::write(&file, "x").unwrap();
        file_away(&file, dir.path(), &failed("bad"), false, false).unwrap();
        let filed: Vec<_> =
            std::fs::read_dir(dir.path().join("failed")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(filed.len(), 2, "{filed:?}");
        let reason = filed.iter().find(|n| n.to_string_lossy().ends_with(".reason.txt")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("failed").join(reason)).unwrap();
        assert!(text.contains(&format!("file: {name}")), "{text}");
    }

    #[test]
    fn a_full_disk_leaves_the_recording_in_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        let file = dir.path().join("call.wav");
        std::fs::write(&file, "x").unwrap();
        // done/ made a plain file stands in for a full disk (and fails for root too):
        // writing the result fails, and that comes first.
        let done = dir.path().join("done");
        std::fs::remove_dir(&done).unwrap();
        std::fs::write(&done, "").unwrap();
        let outcome = FileOutcome::Done(Box::new(SpoolResult {
            file: "call.wav".into(),
            size_bytes: 1,
            sample_rate: 8000,
            encoding: "pcm".into(),
            duration_ms: 0,
            metadata: Sidecar::default(),
            customer: None,
            call: None,
            utterances: None,
            real_time_factor: None,
        }));
        assert!(file_away(&file, dir.path(), &outcome, false, false).is_err());
        assert!(file.exists(), "the recording must stay in the spool");
        std::fs::remove_file(&done).unwrap();
        prepare(dir.path()).unwrap();
        file_away(&file, dir.path(), &outcome, false, true).unwrap();
        assert!(done.join("call.wav").exists() && done.join("call.result.json").exists());
        // The default: once the result is written the recording and its sidecar are gone.
        std::fs::write(&file, "x").unwrap();
        std::fs::write(file.with_extension("json"), r#"{"caller_number":"13800138000"}"#).unwrap();
        file_away(&file, dir.path(), &outcome, false, false).unwrap();
        assert!(!file.exists() && !file.with_extension("json").exists());
        assert!(done.join("call.1.result.json").exists() && !done.join("call.1.wav").exists());
    }

    #[test]
    fn an_interrupted_filing_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        let done = dir.path().join("done");
        // A crash after the result was written, before the recording moved.
        std::fs::write(dir.path().join("call.wav"), "abc").unwrap();
        std::fs::write(done.join("call.result.json"), r#"{"file":"call.wav","size_bytes":3}"#).unwrap();
        // A crash mid-write of a result.
        std::fs::write(done.join(".other.result.json.tmp"), "").unwrap();
        // Same name, different size: a new recording, to be processed, not filed.
        std::fs::write(dir.path().join("new.wav"), "abcdef").unwrap();
        std::fs::write(done.join("new.result.json"), r#"{"file":"new.wav","size_bytes":3}"#).unwrap();
        repair(dir.path(), true);
        assert!(done.join("call.wav").exists());
        assert!(!dir.path().join("call.wav").exists());
        assert!(!done.join(".other.result.json.tmp").exists());
        assert!(dir.path().join("new.wav").exists());
        // Without keep_in_clear, the interrupted step was a deletion: finished as one.
        std::fs::write(dir.path().join("later.wav"), "abc").unwrap();
        std::fs::write(dir.path().join("later.json"), "{}").unwrap();
        std::fs::write(done.join("later.result.json"), r#"{"file":"later.wav","size_bytes":3}"#).unwrap();
        repair(dir.path(), false);
        assert!(!dir.path().join("later.wav").exists() && !dir.path().join("later.json").exists());
        assert!(!done.join("later.wav").exists() && done.join("later.result.json").exists());
        assert!(dir.path().join("new.wav").exists());
    }

    #[test]
    fn entries_that_are_not_regular_files_are_seen_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.wav")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("dangling.wav")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo.wav"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir(dir.path().join("folder.wav")).unwrap();
        std::fs::write(dir.path().join(OsStr::from_bytes(b"bad\xff\nname.wav")), "x").unwrap();
        let found = scan(dir.path());
        let mut kinds: Vec<_> = found.not_regular.iter().map(|(p, k)| (crate::escape::file_name(p), *k)).collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                ("dangling.wav".to_owned(), "symbolic link"),
                ("fifo.wav".to_owned(), "FIFO"),
                ("folder.wav".to_owned(), "directory"),
                ("link.wav".to_owned(), "symbolic link")
            ]
        );
        assert_eq!(found.files.len(), 1);
        let odd = &found.files[0].1;
        assert_eq!(crate::escape::file_name(odd), "bad\\xff\\nname.wav");
        assert_eq!(default_call_id(odd), "spool:bad\\xff\\nname");
        for (path, kind) in found.not_regular {
            file_away_not_regular(&path, kind, dir.path()).unwrap();
        }
        let failed = dir.path().join("failed");
        assert_eq!(std::fs::read_link(failed.join("link.wav")).unwrap(), Path::new("/etc/passwd"));
        let reason = std::fs::read_to_string(failed.join("fifo.reason.txt")).unwrap();
        assert!(reason.starts_with("not a regular file (FIFO)"), "{reason}");
    }

    #[test]
    fn sidecars_are_bounded_regular_files_with_valid_ids() {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = dir.path().join("x.json");
        assert_eq!(read_sidecar(&sidecar).unwrap(), Sidecar::default());
        std::os::unix::fs::symlink("/dev/zero", &sidecar).unwrap();
        assert!(read_sidecar(&sidecar).unwrap_err().contains("symbolic link"));
        std::fs::remove_file(&sidecar).unwrap();
        nix::unistd::mkfifo(&sidecar, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_sidecar(&sidecar).unwrap_err().contains("FIFO"));
        std::fs::remove_file(&sidecar).unwrap();
        for bad in ["a\nb".to_owned(), "a\u{202E}b".to_owned(), "x".repeat(60_000)] {
            std::fs::write(&sidecar, serde_json::json!({ "call_id": bad }).to_string()).unwrap();
            assert!(read_sidecar(&sidecar).unwrap_err().contains("call_id"), "{bad:.20}");
        }
        // A number where a string belongs: the reason says so without quoting the number.
        std::fs::write(&sidecar, r#"{"caller_number":13800138000}"#).unwrap();
        let reason = read_sidecar(&sidecar).unwrap_err();
        assert!(!reason.contains("13800138000") && reason.contains("expected a string"), "{reason}");
        std::fs::write(&sidecar, r#"{"call_id":"pbx-1"}"#).unwrap();
        assert_eq!(read_sidecar(&sidecar).unwrap().call_id.as_deref(), Some("pbx-1"));
    }

    #[test]
    fn a_file_is_picked_only_after_it_settles() {
        let mut settling = Settling::default();
        let t0 = Instant::now();
        let settle = Duration::from_millis(1000);
        let (p, m) = (PathBuf::from("a.wav"), SystemTime::UNIX_EPOCH);
        assert!(settling.ready(vec![(m, p.clone(), 10)], t0, settle).is_empty());
        // Growing: the clock starts again.
        assert!(settling.ready(vec![(m, p.clone(), 20)], t0 + Duration::from_millis(900), settle).is_empty());
        assert!(settling.ready(vec![(m, p.clone(), 20)], t0 + Duration::from_millis(1800), settle).is_empty());
        assert_eq!(settling.ready(vec![(m, p.clone(), 20)], t0 + Duration::from_millis(1900), settle), vec![p.clone()]);
        // settle_ms = 0: at once.
        assert_eq!(Settling::default().ready(vec![(m, p.clone(), 1)], t0, Duration::ZERO), vec![p]);
    }
}
