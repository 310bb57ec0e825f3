//! The encrypted call store (SQLite + AES-256-GCM): what the box keeps of each call, under
//! privacy law (PIPL Art. 47 deletion, 51 encryption and access control, 55–56 records).
//!
//! Two files under `<state>/store/`, both 0600:
//! - `calls.sqlite` (WAL, `synchronous = FULL`, incremental auto-vacuum): call metadata and
//!   what may stay in clear for listing and aggregation (times, legs, intents, emotions,
//!   phases, rule hits, tags, the customer's keyed hash), the sealed records (masked text;
//!   unmasked text and audio only when configured), tombstones of forgotten customers, the
//!   audit chain.
//! - `keys.sqlite` (rollback journal, `secure_delete = ON`, no WAL): every call's class keys,
//!   wrapped by the master key, and the audit chain's head. Kept apart so that deleting a
//!   key overwrites it in place: no WAL frame or free page keeps a copy, and every copy of
//!   the ciphertext (old pages, WAL, flash blocks, a backup) is then noise.
//!
//! Writes go keys first, data second (a crash in between leaves a key without data, which
//! the sweeper drops); erasure goes keys first too (a crash leaves data without a key:
//! already unreadable, and swept). So the two files never need one transaction.
//!
//! This type is synchronous and owns both connections: one store task calls it, batching
//! utterances into one transaction per batch (group commit).

pub mod audio;
pub mod audit;
pub mod crypto;
pub mod live;
pub mod master;
pub mod outbox;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::uplink::aggregates::CallFacts;
use crate::uplink::messages::LateConversion;
use crate::uplink::messages::{CallReport, ErasureNotice, HitReport};
pub use crate::uplink::messages::{CustomerTags, DiagnosticsReport};
use crate::uplink::outbox::Lane;
use audio::AudioChunk;
use audit::{AuditEntry, AuditEvent, ChainHead};
use crypto::{ClassKey, CryptoError, DataClass, DataKey, MasterKey, Place, RecordKind, KEY_BYTES};
pub use outbox::{LaneBacklog, OutboxEntry, OutboxRow, OutboxSettings, OutboxTick};

pub const STORE_DIR: &str = "store";
pub const CALLS_FILE: &str = "calls.sqlite";
pub const KEYS_FILE: &str = "keys.sqlite";
/// Version 2 added the headquarters outbox (`outbox`), version 3 the open aggregate
/// windows (`aggregate`) and the utterances' latencies; earlier files are upgraded.
const CALLS_SCHEMA_VERSION: i64 = 3;
const KEYS_SCHEMA_VERSION: i64 = 1;
const MS_PER_DAY: i64 = 86_400_000;
/// A health report not sent within a day is of no use to HQ: it leaves unsent (a gap).
const DIAGNOSTICS_TTL_MS: i64 = MS_PER_DAY;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot make {path} private: {source}")]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("call store {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("call store {path} has schema version {found}; this callbox knows {knows}: a newer callbox wrote it, so install that version again (or restore the store from a backup)")]
    Schema { path: PathBuf, found: i64, knows: i64 },
    #[error("call store: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("call store: {0}")]
    Crypto(#[from] CryptoError),
    #[error("the master key (id {found}) is not the one that wrapped this store's keys (id {expected}): restore the right key (see README \"Call store\"); a new key would make every stored call unreadable")]
    WrongMasterKey { expected: String, found: String },
    #[error("master key: {0}")]
    MasterKey(String),
    #[error("the system random source failed")]
    Random,
    #[error("no call {0} in the store")]
    NoSuchCall(String),
    #[error("call {0} is already in the store")]
    DuplicateCall(String),
    #[error("call {call}: {what}")]
    BadInput { call: String, what: String },
    #[error("{0}")]
    Thread(String),
}

impl StoreError {
    /// Whether the disk refused the write for now (full, an I/O error, a lock held too
    /// long): the write is kept and retried, never dropped. Anything else is about the
    /// operation itself and retrying cannot help.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode as C;
        let code = match self {
            Self::Query(e) | Self::Database { source: e, .. } => e.sqlite_error_code(),
            _ => None,
        };
        matches!(code, Some(C::DiskFull | C::SystemIoFailure | C::DatabaseBusy | C::DatabaseLocked | C::CannotOpen))
    }
}

/// What becomes of a call's classes, in days from the call's start; 0 keeps forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub audio_days: u32,
    /// The masked transcript, and the unmasked one where it is kept.
    pub transcript_days: u32,
    /// The call itself (metadata, tags, rule hits): after this, nothing of it is left.
    pub metadata_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self { audio_days: 30, transcript_days: 180, metadata_days: 3 * 365 }
    }
}

/// The master key, and the next one while a rotation is under way.
pub struct MasterKeys {
    pub current: MasterKey,
    pub next: Option<MasterKey>,
}

impl MasterKeys {
    pub fn only(current: MasterKey) -> Self {
        Self { current, next: None }
    }
}

/// Whose access this is: the peer's uid and its role, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub uid: u32,
    pub role: String,
}

/// A call as it starts (from the input and the PBX's sidecar).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallStart {
    pub id: String,
    pub source: String,
    pub line: String,
    pub started_unix_ms: i64,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    /// The customer's keyed hash (never the number).
    pub customer: Option<String>,
}

/// One utterance as understood; `text` is masked, `unmasked` is kept only when configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredUtterance {
    pub index: u64,
    pub leg: String,
    pub start_secs: f64,
    pub end_secs: f64,
    pub text: String,
    #[serde(skip)]
    pub unmasked: Option<String>,
    pub intents: Vec<String>,
    pub emotion: Option<String>,
    pub phase: Option<String>,
    /// ASR facts and prosody, as the understanding layer gives them (JSON).
    pub facts: Option<serde_json::Value>,
    /// Whisper's compute time and the text models' time for this utterance (kept in
    /// clear: HQ's latency metrics).
    #[serde(default)]
    pub asr_ms: Option<f64>,
    #[serde(default)]
    pub understanding_ms: Option<f64>,
}

/// A rule hit with its evidence (utterance indices).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredHit {
    pub rule: String,
    pub severity: String,
    pub event: Option<String>,
    pub reason: String,
    pub at_secs: f64,
    pub utterances: Vec<usize>,
}

/// How a call ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallEnd {
    pub ended_unix_ms: i64,
    pub phase: String,
    pub tags: Vec<String>,
    pub converted: bool,
    /// The rule set the call was checked with (its digest): a key of HQ's aggregates.
    #[serde(default)]
    pub rules_version: Option<String>,
}

/// A call's metadata: what technicians see, all in clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallSummary {
    pub id: String,
    pub source: String,
    pub line: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: Option<i64>,
    /// `open`, `finished` or `interrupted` (open when the daemon stopped).
    pub status: String,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    pub customer: Option<String>,
    pub utterances: i64,
    pub phase: Option<String>,
    pub tags: Vec<String>,
    pub converted: bool,
    /// Intent label → count over the customer's utterances.
    pub intents: std::collections::BTreeMap<String, i64>,
    pub rule_hits: Vec<StoredHit>,
    /// Classes whose keys are gone (retention or erasure).
    pub shredded: Vec<String>,
    /// Seconds of audio kept per leg (with `store.keep_audio`).
    pub audio_secs: std::collections::BTreeMap<String, f64>,
}

/// A call with its transcript (admins; every such read is audited first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallTranscript {
    pub call: CallSummary,
    pub utterances: Vec<StoredUtterance>,
    /// The unmasked text per utterance index, when kept.
    pub unmasked: Vec<(u64, String)>,
}

/// What `forget` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub customer: String,
    pub calls: usize,
    /// False when the customer had been forgotten before (nothing was left to do).
    pub first_time: bool,
}

/// What a retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    pub audio_shredded: usize,
    pub transcripts_shredded: usize,
    pub calls_deleted: usize,
    pub orphan_keys: usize,
    pub pages_freed: i64,
}

impl SweepReport {
    /// One line for the audit trail, the log and `status`.
    pub fn describe(&self) -> String {
        format!(
            "{} audio and {} transcripts shredded, {} calls deleted, {} stray keys, {} pages freed",
            self.audio_shredded, self.transcripts_shredded, self.calls_deleted, self.orphan_keys, self.pages_freed
        )
    }
}

/// What `store stats` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub calls: i64,
    pub open: i64,
    pub finished: i64,
    pub interrupted: i64,
    pub forgotten: i64,
    pub utterances: i64,
    pub oldest_call_unix_ms: Option<i64>,
    pub class_keys: i64,
    pub tombstones: i64,
    pub audit_entries: i64,
    /// Both files with their WAL and journal.
    pub bytes: u64,
    /// The id of the master key in use.
    pub master_key: String,
}

pub struct CallStore {
    calls: Connection,
    keys: Connection,
    master: MasterKey,
    dir: PathBuf,
    random: SystemRandom,
    keep_unmasked: bool,
    /// What was said about calls before they began (a spool sidecar is read before the
    /// first utterance is understood); taken in by their `Begin`. Bounded.
    described: std::collections::HashMap<String, (u64, CallInfo)>,
    /// Arrival order of descriptions (the oldest pending one is dropped first).
    described_seq: u64,
    /// Audio of calls not begun yet (a leg's first seconds come before its first
    /// utterance is understood), written at their `Begin`. Bounded by bytes.
    early_audio: std::collections::HashMap<String, Vec<AudioChunk>>,
    early_audio_bytes: usize,
    /// The headquarters outbox, when `[hq]` is on (`enable_outbox`).
    outbox: Option<outbox::Outbox>,
    /// Keys the pseudonyms HQ sees for agents (random, in keys.sqlite, made once).
    pseudonyms: Option<ring::hmac::Key>,
}

/// Most descriptions kept for calls that have not begun (older ones are dropped first
/// when a call never begins: a refused spool file, say).
const MAX_PENDING_DESCRIPTIONS: usize = 1024;
/// Most bytes of audio held for calls not begun yet (at 8 kHz µ-law, an hour of one leg is
/// 29 MB); past it the call holding the most is dropped whole, and the log says so.
const MAX_EARLY_AUDIO_BYTES: usize = 64 << 20;

fn private_db(path: &Path) -> Result<Connection, StoreError> {
    let db_err = |source| StoreError::Database { path: path.to_owned(), source };
    let conn = Connection::open(path).map_err(db_err)?;
    // SQLite creates files with the process umask (0077 under the unit); a manual run may
    // have a laxer one, so the database itself is made private here.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| StoreError::Permissions { path: path.to_owned(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db_err)?;
    Ok(conn)
}

impl CallStore {
    /// Opens (creating on first start) the store under `state_dir/store`, with the master
    /// key the caller loaded (`master::load`). With a next key (`keys/master.key.new`: a
    /// rotation was asked for, or stopped half-way), every class key still wrapped by the
    /// current one is re-wrapped first; the caller then promotes the new key file
    /// (`master::promote_next`). Calls still open from a run that ended without closing
    /// them are marked `interrupted`.
    pub fn open(state_dir: &Path, keys_in: MasterKeys, keep_unmasked: bool) -> Result<Self, StoreError> {
        let dir = state_dir.join(STORE_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StoreError::CreateDir { path: dir.clone(), source })?;
        let keys_path = dir.join(KEYS_FILE);
        let keys = private_db(&keys_path)?;
        let kerr = |source| StoreError::Database { path: keys_path.clone(), source };
        keys.pragma_update(None, "journal_mode", "DELETE").map_err(kerr)?;
        keys.pragma_update(None, "secure_delete", true).map_err(kerr)?;
        keys.pragma_update(None, "synchronous", "FULL").map_err(kerr)?;
        let calls_path = dir.join(CALLS_FILE);
        let calls = private_db(&calls_path)?;
        let cerr = |source| StoreError::Database { path: calls_path.clone(), source };
        // auto_vacuum must be set before the first table exists.
        calls.pragma_update(None, "auto_vacuum", "INCREMENTAL").map_err(cerr)?;
        calls.pragma_update(None, "journal_mode", "WAL").map_err(cerr)?;
        calls.pragma_update(None, "synchronous", "FULL").map_err(cerr)?;
        calls.pragma_update(None, "secure_delete", true).map_err(cerr)?;
        migrate(&keys, &keys_path, KEYS_SCHEMA, KEYS_SCHEMA_VERSION, &[])?;
        let calls_schema = format!("{CALLS_SCHEMA} {} {}", outbox::SCHEMA, outbox::AGGREGATE_SCHEMA);
        let to_v3 = format!("{V3_COLUMNS} {}", outbox::AGGREGATE_SCHEMA);
        migrate(&calls, &calls_path, &calls_schema, CALLS_SCHEMA_VERSION, &[(1, outbox::SCHEMA), (2, &to_v3)])?;
        // The master key this store was made with; a different one is refused, never used
        // to start over. A rotation that finished before its key file was promoted leaves
        // the store on the next key.
        let expected: Option<String> =
            keys.query_row("SELECT value FROM meta WHERE key = 'master_id'", [], |r| r.get(0)).optional()?;
        let MasterKeys { current, next } = keys_in;
        let (master, pending) = match (expected, next) {
            (None, next) => {
                keys.execute("INSERT INTO meta (key, value) VALUES ('master_id', ?1)", [current.id()])?;
                (current, next)
            }
            (Some(e), next) if e == current.id() => (current, next),
            (Some(e), Some(next)) if e == next.id() => (next, None),
            (Some(expected), _) => return Err(StoreError::WrongMasterKey { expected, found: current.id().to_owned() }),
        };
        let mut store = Self {
            calls,
            keys,
            master,
            dir,
            random: SystemRandom::new(),
            keep_unmasked,
            described: Default::default(),
            described_seq: 0,
            early_audio: Default::default(),
            early_audio_bytes: 0,
            outbox: None,
            pseudonyms: None,
        };
        if let Some(next) = pending {
            store.rotate(next, None)?;
        }
        store.calls.execute("UPDATE call SET status = 'interrupted' WHERE status = 'open'", [])?;
        Ok(store)
    }

    /// Re-wraps every class key under `next` (payloads are not touched), 256 keys per
    /// transaction. Each row names the key that wrapped it, so a stop at any point leaves
    /// every row openable by one of the two keys, and the next `open` with both finishes
    /// the job. Only when no row is left under the old key does the store switch to the new
    /// one. `stop_after` (tests) stops after that many rows, as a crash would.
    fn rotate(&mut self, next: MasterKey, stop_after: Option<usize>) -> Result<usize, StoreError> {
        let (old, new) = (self.master.id().to_owned(), next.id().to_owned());
        let mut done = 0;
        loop {
            if stop_after.is_some_and(|n| done >= n) {
                return Ok(done);
            }
            let take = stop_after.map_or(256, |n| (n - done).min(256));
            let rows: Vec<(String, String, Vec<u8>)> = self
                .keys
                .prepare("SELECT call, class, wrapped FROM class_key WHERE master = ?1 LIMIT ?2")?
                .query_map(params![old, take as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            if rows.is_empty() {
                break;
            }
            let mut rewrapped = Vec::with_capacity(rows.len());
            for (call, class_name, wrapped) in rows {
                let class = DataClass::from_name(&class_name).ok_or_else(|| StoreError::BadInput {
                    call: call.clone(),
                    what: format!("a key of unknown class {class_name:?} in {KEYS_FILE}"),
                })?;
                let key = self.master.unwrap(&call, class, &wrapped)?;
                rewrapped.push((next.wrap(&call, class, &key, self.random_bytes()?), call, class_name));
            }
            let tx = self.keys.transaction()?;
            for (wrapped, call, class) in &rewrapped {
                tx.execute(
                    "UPDATE class_key SET wrapped = ?3, master = ?4 WHERE call = ?1 AND class = ?2 AND master = ?5",
                    params![call, class, wrapped, new, old],
                )?;
            }
            tx.commit()?;
            done += rewrapped.len();
        }
        let strays: i64 =
            self.keys.query_row("SELECT count(*) FROM class_key WHERE master != ?1", [&new], |r| r.get(0))?;
        if strays > 0 {
            return Err(StoreError::MasterKey(format!(
                "{strays} keys in {KEYS_FILE} are wrapped by neither the current nor the next master key"
            )));
        }
        self.keys.execute("UPDATE meta SET value = ?1 WHERE key = 'master_id'", [&new])?;
        self.master = next;
        let actor = Actor { uid: nix::unistd::geteuid().as_raw(), role: "store".into() };
        let now = now_ms();
        self.audit(&actor, "key_rotation", "-", &format!("ok: {done} keys re-wrapped, master {old} -> {new}"), now)?;
        Ok(done)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Turns the headquarters outbox on (`[hq]` configured): from now on finished calls,
    /// events and rule hits, and erasures queue their messages in the same transaction as
    /// the data they report. Rows queued by an earlier run are kept and sent.
    pub fn enable_outbox(&mut self, settings: OutboxSettings) -> Result<(), StoreError> {
        let existing: Option<String> =
            self.keys.query_row("SELECT value FROM meta WHERE key = 'pseudonym_key'", [], |r| r.get(0)).optional()?;
        let key = match existing.as_deref().and_then(crate::hex::decode) {
            Some(key) => key,
            None => {
                let key = self.random_bytes::<32>()?.to_vec();
                self.keys.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('pseudonym_key', ?1)",
                    [crate::hex::encode(&key)],
                )?;
                key
            }
        };
        self.pseudonyms = Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key));
        let mut loaded = outbox::Outbox::load(&self.calls, &settings)?;
        // Rows an earlier run left are sent as soon as the link is up.
        loaded.dirty = Lane::ALL.iter().any(|l| loaded.ledger.book(*l).rows > 0);
        self.outbox = Some(loaded);
        Ok(())
    }

    /// The outbox's housekeeping (the store component runs it every few seconds): drops
    /// expired messages with a gap record, queues the aggregate windows that have ended.
    pub fn outbox_tick(&mut self, now_ms: i64) -> Result<OutboxTick, StoreError> {
        let Some(outbox) = self.outbox.as_mut() else { return Ok(OutboxTick::default()) };
        let random = &self.random;
        let done = outbox::tick(&mut self.calls, &mut outbox.ledger, &outbox.settings, now_ms, || random8(random))?;
        outbox.dirty |= done.windows + done.expired > 0;
        outbox.shed += done.shed;
        Ok(done)
    }

    /// Whether rows were queued since the last call (the store thread wakes the uplink).
    pub fn take_outbox_dirty(&mut self) -> bool {
        self.outbox.as_mut().is_some_and(|o| std::mem::take(&mut o.dirty))
    }

    /// Rows after `after[lane]` per lane, lanes in priority order, at most `limit`.
    pub fn outbox_page(&self, after: [u64; 5], limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        outbox::page(&self.calls, after, limit)
    }

    /// Rows HQ acknowledged leave the outbox; returns how many did.
    pub fn outbox_delete(&mut self, ids: &[String]) -> Result<usize, StoreError> {
        match self.outbox.as_mut() {
            Some(o) => outbox::delete(&mut self.calls, &mut o.ledger, ids),
            None => Ok(0),
        }
    }

    /// Per lane: rows, bytes, the oldest row's age, the next sequence number; and how many
    /// messages were shed since the store opened.
    pub fn outbox_backlog(&self) -> Result<(Vec<LaneBacklog>, u64), StoreError> {
        match &self.outbox {
            Some(o) => Ok((outbox::backlog(&self.calls, &o.ledger)?, o.shed)),
            None => Ok((Vec::new(), 0)),
        }
    }

    /// Rows' metadata, lanes in priority order (never their bodies).
    pub fn outbox_entries(&self, lane: Option<Lane>, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        outbox::entries(&self.calls, lane, limit)
    }

    /// Re-wraps every class key under `next` now (`callbox keys rotate`); the caller has
    /// written `next` as `master.key.new` first and promotes it after, so a stop anywhere
    /// is finished by the next start.
    pub fn rotate_master(&mut self, next: MasterKey) -> Result<usize, StoreError> {
        self.rotate(next, None)
    }

    /// The id of the master key in use (never the key).
    pub fn master_id(&self) -> &str {
        self.master.id()
    }

    /// Counts and sizes for `store stats`, `status` and `doctor` (metadata only).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let count =
            |conn: &Connection, sql: &str| -> Result<i64, StoreError> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
        let by_status = |status: &str| -> Result<i64, StoreError> {
            Ok(self.calls.query_row("SELECT count(*) FROM call WHERE status = ?1", [status], |r| r.get(0))?)
        };
        let bytes = [CALLS_FILE, "calls.sqlite-wal", "calls.sqlite-shm", KEYS_FILE, "keys.sqlite-journal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        Ok(StoreStats {
            calls: count(&self.calls, "SELECT count(*) FROM call")?,
            open: by_status("open")?,
            finished: by_status("finished")?,
            interrupted: by_status("interrupted")?,
            forgotten: by_status("forgotten")?,
            utterances: count(&self.calls, "SELECT coalesce(sum(utterances), 0) FROM call")?,
            oldest_call_unix_ms: self.calls.query_row("SELECT min(started_ms) FROM call", [], |r| r.get(0))?,
            class_keys: count(&self.keys, "SELECT count(*) FROM class_key")?,
            tombstones: count(&self.calls, "SELECT count(*) FROM tombstone")?,
            audit_entries: count(&self.calls, "SELECT count(*) FROM audit")?,
            bytes,
            master_key: self.master.id().to_owned(),
        })
    }

    fn random_bytes<const N: usize>(&self) -> Result<[u8; N], StoreError> {
        let mut out = [0u8; N];
        self.random.fill(&mut out).map_err(|_| StoreError::Random)?;
        Ok(out)
    }

    /// Writes a batch of operations, possibly of many calls, as one transaction per file
    /// (group commit: one fsync pair for the batch, however many calls it carries). New
    /// calls' class keys are committed first, then everything else in order. If any
    /// operation is refused nothing of the batch's data is written (keys of new calls may
    /// stay, and are swept); the store task then retries the operations one by one, with
    /// the same plaintexts, so a nonce never seals two different records.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut fresh: Vec<(&str, [ClassKey; 3])> = Vec::new();
        let mut wrapped_keys = Vec::new();
        for op in ops {
            let StoreOp::Begin(call) = op else { continue };
            if call.id.is_empty() || call.id.len() > 128 {
                return Err(StoreError::BadInput {
                    call: call.id.clone(),
                    what: "a call id has 1 to 128 bytes".into(),
                });
            }
            let known = self.calls.query_row("SELECT 1 FROM call WHERE id = ?1", [&call.id], |_| Ok(())).optional()?;
            if known.is_some() || fresh.iter().any(|(id, _)| *id == call.id) {
                return Err(StoreError::DuplicateCall(call.id.clone()));
            }
            let data = DataKey::from_bytes(self.random_bytes::<KEY_BYTES>()?);
            let keys = DataClass::ALL.map(|class| data.class_key(class));
            for (class, key) in DataClass::ALL.into_iter().zip(&keys) {
                let wrapped = self.master.wrap(&call.id, class, key, self.random_bytes()?);
                wrapped_keys.push((call, class, wrapped));
            }
            fresh.push((&call.id, keys));
        }
        if !wrapped_keys.is_empty() {
            let tx = self.keys.transaction()?;
            // The start time rides along (it is clear metadata anyway) so that retention
            // finds expiring keys without reading the calls file.
            for (call, class, wrapped) in &wrapped_keys {
                tx.execute(
                    "INSERT OR REPLACE INTO class_key (call, class, master, wrapped, started_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![call.id, class.name(), self.master.id(), wrapped, call.started_unix_ms],
                )?;
            }
            tx.commit()?;
        }
        let mut pending: Vec<(String, CallInfo)> = Vec::new();
        let mut early: Vec<(String, AudioChunk)> = Vec::new();
        // The outbox's ledger is worked on a copy, kept only if the transaction commits.
        let mut ledger = self.outbox.as_ref().map(|o| o.ledger.clone());
        let (mut queued, mut shed) = (0u64, 0u64);
        let now = now_ms();
        let tx = self.calls.transaction()?;
        for op in ops {
            match op {
                StoreOp::Begin(call) => {
                    let described = self.described.get(&call.id).map(|(_, info)| info);
                    let converted = described.is_some_and(|i| i.converted);
                    let call = &match described {
                        Some(info) => info.merged_into(call.clone()),
                        None => call.clone(),
                    };
                    tx.execute(
                        "INSERT INTO call (id, source, line, started_ms, status, agent, campaign, script, customer)
                         VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8)",
                        params![
                            call.id,
                            call.source,
                            call.line,
                            call.started_unix_ms,
                            call.agent,
                            call.campaign,
                            call.script,
                            call.customer
                        ],
                    )?;
                    if converted {
                        tx.execute("UPDATE call SET converted = 1 WHERE id = ?1", [&call.id])?;
                    }
                    if let (Some(chunks), Some((_, keys))) =
                        (self.early_audio.get(&call.id), fresh.iter().find(|(id, _)| *id == call.id))
                    {
                        for chunk in chunks {
                            insert_audio(&tx, &call.id, chunk, &keys[2])?;
                        }
                    }
                }
                StoreOp::Audio { call, chunk } => {
                    let status: Option<String> =
                        tx.query_row("SELECT status FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?;
                    match status.as_deref() {
                        // The spool sends a recording's audio once it is understood: the
                        // call may be finished already. Each chunk has its own index, so
                        // no nonce is used twice.
                        Some("open" | "finished") => {}
                        Some(other) => {
                            return Err(StoreError::BadInput {
                                call: call.clone(),
                                what: format!("audio for a call that is {other}"),
                            })
                        }
                        None if fresh.iter().any(|(id, _)| *id == call.as_str()) => {}
                        None => {
                            early.push((call.clone(), chunk.clone()));
                            continue;
                        }
                    }
                    let stored_key;
                    let key = match fresh.iter().find(|(id, _)| *id == call.as_str()) {
                        Some((_, keys)) => &keys[2],
                        None => {
                            stored_key = stored_class_key(&self.keys, &self.master, call, DataClass::Audio)?
                                .ok_or_else(|| StoreError::BadInput {
                                    call: call.clone(),
                                    what: "its audio key is shredded".into(),
                                })?;
                            &stored_key
                        }
                    };
                    insert_audio(&tx, call, chunk, key)?;
                }
                StoreOp::Append { call, utterances } => {
                    let status: Option<String> =
                        tx.query_row("SELECT status FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?;
                    match status.as_deref() {
                        Some("open") => {}
                        // An interrupted call is never written again: its nonces must not be reused.
                        Some(other) => {
                            return Err(StoreError::BadInput {
                                call: call.clone(),
                                what: format!("the call is {other}"),
                            })
                        }
                        None => return Err(StoreError::NoSuchCall(call.clone())),
                    }
                    let known = fresh.iter().find(|(id, _)| *id == call.as_str()).map(|(_, keys)| keys);
                    let stored = |class| stored_class_key(&self.keys, &self.master, call, class);
                    let transcript_owned;
                    let transcript = match known {
                        Some(keys) => &keys[0],
                        None => {
                            transcript_owned =
                                stored(DataClass::Transcript)?.ok_or_else(|| StoreError::NoSuchCall(call.clone()))?;
                            &transcript_owned
                        }
                    };
                    let unmasked_owned;
                    let unmasked = match (self.keep_unmasked, known) {
                        (false, _) => None,
                        (true, Some(keys)) => Some(&keys[1]),
                        (true, None) => {
                            unmasked_owned = stored(DataClass::Unmasked)?;
                            unmasked_owned.as_ref()
                        }
                    };
                    append_records(&tx, call, utterances, transcript, unmasked)?;
                }
                StoreOp::Hits { call, hits } => {
                    for h in hits {
                        tx.execute(
                            "INSERT INTO rule_hit (call, rule, severity, event, reason, at_secs, utterances)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![
                                call,
                                h.rule,
                                h.severity,
                                h.event,
                                h.reason,
                                h.at_secs,
                                serde_json::to_string(&h.utterances).unwrap_or_default()
                            ],
                        )?;
                        if let Some(ledger) = ledger.as_mut() {
                            // An event is an alert; a warning or critical hit without one
                            // is compliance; an info hit only counts in the call's summary.
                            let lane = match (&h.event, h.severity.as_str()) {
                                (Some(_), _) => Lane::Alert,
                                (None, "info") => continue,
                                (None, _) => Lane::Compliance,
                            };
                            let kind = h.event.as_deref().unwrap_or("rule_hit");
                            let report = hit_report(&tx, call, h, self.pseudonyms.as_ref())?;
                            shed += outbox::enqueue(&tx, ledger, lane, kind, &report, now, random8(&self.random)?)?;
                            queued += 1;
                        }
                    }
                }
                StoreOp::Describe { call, info } => {
                    // A finished call said converted for the first time: HQ hears of it
                    // (its summary went out unconverted) and its key's window counts it.
                    let late_conversion = info.converted
                        && tx
                            .query_row(
                                "SELECT 1 FROM call WHERE id = ?1 AND status = 'finished' AND converted = 0",
                                [call],
                                |_| Ok(()),
                            )
                            .optional()?
                            .is_some();
                    // Applies to a call in any state (the PBX may say "converted" after
                    // the hang-up); a call not begun yet takes it in at its `Begin`.
                    let changed = tx.execute(
                        "UPDATE call SET agent = coalesce(?2, agent), campaign = coalesce(?3, campaign),
                             script = coalesce(?4, script), customer = coalesce(?5, customer),
                             converted = max(converted, ?6), source = coalesce(?7, source)
                         WHERE id = ?1 AND status != 'forgotten'",
                        params![
                            call,
                            info.agent,
                            info.campaign,
                            info.script,
                            info.customer,
                            info.converted,
                            info.source
                        ],
                    )?;
                    if changed == 0 {
                        pending.push((call.clone(), info.clone()));
                    }
                    if let (true, Some(ledger), Some(outbox)) = (late_conversion, ledger.as_mut(), self.outbox.as_ref())
                    {
                        let (report, _) = call_report(&tx, call, self.pseudonyms.as_ref())?;
                        let rules: Option<String> =
                            tx.query_row("SELECT rules_version FROM call WHERE id = ?1", [call], |r| r.get(0))?;
                        let dims = outbox::CallDims {
                            call,
                            agent: report.agent.clone(),
                            campaign: report.campaign.clone(),
                            script: report.script.clone(),
                            rules_version: rules.as_deref(),
                        };
                        outbox::count_late_conversion(&tx, &outbox.settings, dims, now)?;
                        let notice = LateConversion {
                            call: call.clone(),
                            ended_unix_ms: report.ended_unix_ms,
                            agent: report.agent,
                            campaign: report.campaign,
                            script: report.script,
                            customer: report.customer,
                        };
                        shed += outbox::enqueue(
                            &tx,
                            ledger,
                            Lane::Calls,
                            "conversion",
                            &notice,
                            now,
                            random8(&self.random)?,
                        )?;
                        queued += 1;
                    }
                }
                StoreOp::Diagnostics(report) => {
                    let Some(ledger) = ledger.as_mut() else { continue };
                    let mut report = report.clone();
                    for lane in Lane::ALL {
                        let book = ledger.book(lane);
                        report.outbox_rows.insert(lane.name().into(), book.rows);
                        report.outbox_bytes.insert(lane.name().into(), book.bytes);
                    }
                    report.outbox_shed = self.outbox.as_ref().map_or(0, |o| o.shed) + shed;
                    shed += outbox::enqueue_until(
                        &tx,
                        ledger,
                        (Lane::Diagnostics, "health"),
                        &report,
                        now,
                        Some(now + DIAGNOSTICS_TTL_MS),
                        random8(&self.random)?,
                    )?;
                    queued += 1;
                }
                StoreOp::CustomerTags(change) => {
                    let Some(ledger) = ledger.as_mut() else { continue };
                    let forgotten = tx
                        .query_row("SELECT 1 FROM tombstone WHERE customer = ?1", [&change.customer], |_| Ok(()))
                        .optional()?
                        .is_some();
                    if !forgotten {
                        shed += outbox::enqueue(
                            &tx,
                            ledger,
                            Lane::Calls,
                            "customer_tags",
                            change,
                            now,
                            random8(&self.random)?,
                        )?;
                        queued += 1;
                    }
                }
                StoreOp::Finish { call, end } => {
                    let changed = tx.execute(
                        "UPDATE call SET status = 'finished', ended_ms = ?2, phase = ?3, tags = ?4,
                             converted = max(converted, ?5), rules_version = ?6
                         WHERE id = ?1 AND status = 'open'",
                        params![
                            call,
                            end.ended_unix_ms,
                            end.phase,
                            end.tags.join(","),
                            end.converted,
                            end.rules_version
                        ],
                    )?;
                    if changed == 0 {
                        return Err(StoreError::NoSuchCall(call.clone()));
                    }
                    if let (Some(ledger), Some(outbox)) = (ledger.as_mut(), self.outbox.as_ref()) {
                        let (report, facts) = call_report(&tx, call, self.pseudonyms.as_ref())?;
                        let dims = outbox::CallDims {
                            call,
                            agent: report.agent.clone(),
                            campaign: report.campaign.clone(),
                            script: report.script.clone(),
                            rules_version: end.rules_version.as_deref(),
                        };
                        outbox::count_in_window(&tx, &outbox.settings, dims, &facts, now)?;
                        shed +=
                            outbox::enqueue(&tx, ledger, Lane::Calls, "call", &report, now, random8(&self.random)?)?;
                        queued += 1;
                    }
                }
            }
        }
        tx.commit()?;
        if let (Some(outbox), Some(ledger)) = (self.outbox.as_mut(), ledger) {
            outbox.ledger = ledger;
            outbox.dirty |= queued > 0;
            outbox.shed += shed;
        }
        for op in ops {
            if let StoreOp::Begin(call) = op {
                self.described.remove(&call.id);
                if let Some(chunks) = self.early_audio.remove(&call.id) {
                    self.early_audio_bytes -= chunks.iter().map(|c| c.mulaw.len()).sum::<usize>();
                }
            }
        }
        for (call, chunk) in early {
            self.early_audio_bytes += chunk.mulaw.len();
            self.early_audio.entry(call).or_default().push(chunk);
            while self.early_audio_bytes > MAX_EARLY_AUDIO_BYTES {
                let Some((largest, bytes)) = self
                    .early_audio
                    .iter()
                    .map(|(id, c)| (id.clone(), c.iter().map(|c| c.mulaw.len()).sum::<usize>()))
                    .max_by_key(|(_, bytes)| *bytes)
                else {
                    break;
                };
                self.early_audio.remove(&largest);
                self.early_audio_bytes -= bytes;
                log::warn!(call_id = largest.as_str();
                    "audio not kept: the call was never understood (no utterance) and its {bytes} bytes of audio waited too long");
            }
        }
        for (call, info) in pending {
            if self.described.len() >= MAX_PENDING_DESCRIPTIONS && !self.described.contains_key(&call) {
                if let Some(oldest) = self.described.iter().min_by_key(|(_, (seq, _))| *seq).map(|(k, _)| k.clone()) {
                    self.described.remove(&oldest);
                }
            }
            self.described_seq += 1;
            let merged = match self.described.remove(&call) {
                Some((_, old)) => old.updated_by(info),
                None => info,
            };
            self.described.insert(call, (self.described_seq, merged));
        }
        Ok(())
    }

    /// A new call: its class keys are made and stored (wrapped) first, then its row.
    pub fn begin_call(&mut self, call: &CallStart) -> Result<(), StoreError> {
        self.apply(&[StoreOp::Begin(call.clone())])
    }

    /// A batch of utterances of one open call, in one transaction. Each is sealed under the
    /// call's transcript key; the unmasked text only when configured.
    pub fn append(&mut self, call: &str, batch: &[StoredUtterance]) -> Result<(), StoreError> {
        self.apply(&[StoreOp::Append { call: call.into(), utterances: batch.to_vec() }])
    }

    /// Rule hits of a call (their reasons are the rule's words, not the customer's).
    pub fn add_hits(&mut self, call: &str, hits: &[StoredHit]) -> Result<(), StoreError> {
        self.apply(&[StoreOp::Hits { call: call.into(), hits: hits.to_vec() }])
    }

    pub fn finish_call(&mut self, call: &str, end: &CallEnd) -> Result<(), StoreError> {
        self.apply(&[StoreOp::Finish { call: call.into(), end: end.clone() }])
    }

    fn class_key(&self, call: &str, class: DataClass) -> Result<Option<ClassKey>, StoreError> {
        stored_class_key(&self.keys, &self.master, call, class)
    }

    /// Calls, newest first, metadata only (no decryption, not audited).
    pub fn list(&self, filter: &CallFilter) -> Result<Vec<CallSummary>, StoreError> {
        let ids: Vec<String> = column(
            &self.calls,
            "SELECT id FROM call
             WHERE started_ms >= ?1 AND (?2 IS NULL OR customer = ?2)
               AND (?3 IS NULL OR EXISTS (SELECT 1 FROM rule_hit h WHERE h.call = call.id AND h.event = ?3))
             ORDER BY started_ms DESC, id LIMIT ?4",
            params![filter.since_unix_ms.unwrap_or(i64::MIN), filter.customer, filter.event, filter.limit],
        )?;
        ids.iter().map(|id| self.summary(id)).collect()
    }

    pub fn summary(&self, id: &str) -> Result<CallSummary, StoreError> {
        let mut s = self
            .calls
            .query_row(
                "SELECT id, source, line, started_ms, ended_ms, status, agent, campaign, script, customer,
                        utterances, phase, tags, converted
                 FROM call WHERE id = ?1",
                [id],
                |r| {
                    Ok(CallSummary {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        line: r.get(2)?,
                        started_unix_ms: r.get(3)?,
                        ended_unix_ms: r.get(4)?,
                        status: r.get(5)?,
                        agent: r.get(6)?,
                        campaign: r.get(7)?,
                        script: r.get(8)?,
                        customer: r.get(9)?,
                        utterances: r.get(10)?,
                        phase: r.get(11)?,
                        tags: split_list(r.get::<_, Option<String>>(12)?),
                        converted: r.get(13)?,
                        intents: Default::default(),
                        rule_hits: vec![],
                        shredded: vec![],
                        audio_secs: Default::default(),
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NoSuchCall(id.into()))?;
        let intents: Vec<Option<String>> = column(
            &self.calls,
            "SELECT intents FROM record WHERE call = ?1 AND kind = ?2 AND leg = 'customer'",
            params![id, RecordKind::Utterance as i64],
        )?;
        for label in intents.into_iter().flat_map(split_list) {
            *s.intents.entry(label).or_default() += 1;
        }
        s.rule_hits = self
            .calls
            .prepare("SELECT rule, severity, event, reason, at_secs, utterances FROM rule_hit WHERE call = ?1 ORDER BY rowid")?
            .query_map([id], |r| {
                Ok(StoredHit {
                    rule: r.get(0)?,
                    severity: r.get(1)?,
                    event: r.get(2)?,
                    reason: r.get(3)?,
                    at_secs: r.get(4)?,
                    utterances: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let audio: Vec<(String, f64)> = self
            .calls
            .prepare("SELECT leg, sum(end_secs - start_secs) FROM record WHERE call = ?1 AND kind = ?2 GROUP BY leg")?
            .query_map(params![id, RecordKind::Audio as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        s.audio_secs = audio.into_iter().collect();
        let present: Vec<String> = column(&self.keys, "SELECT class FROM class_key WHERE call = ?1", [id])?;
        s.shredded = DataClass::ALL
            .into_iter()
            .filter(|c| !present.iter().any(|p| p == c.name()))
            .map(|c| c.name().to_owned())
            .collect();
        Ok(s)
    }

    /// The call with its transcript, decrypted. The access is written to the audit trail
    /// before anything is decrypted; without that entry nothing is returned.
    pub fn transcript(&mut self, id: &str, actor: &Actor, now_unix_ms: i64) -> Result<CallTranscript, StoreError> {
        self.decrypt_call(id, actor, "transcript_read", now_unix_ms)
    }

    /// The same, audited as `action` (`transcript_read`, `export`).
    pub fn decrypt_call(
        &mut self,
        id: &str,
        actor: &Actor,
        action: &str,
        now_unix_ms: i64,
    ) -> Result<CallTranscript, StoreError> {
        let call = match self.summary(id) {
            Ok(call) => call,
            Err(e) => {
                self.audit(actor, action, id, &format!("failed: {e}"), now_unix_ms)?;
                return Err(e);
            }
        };
        self.audit(actor, action, id, "ok", now_unix_ms)?;
        let mut utterances = Vec::new();
        if let Some(key) = self.class_key(id, DataClass::Transcript)? {
            // The clear columns come back as an utterance without its text; the sealed part
            // fills it in once it opens.
            let rows: Vec<(StoredUtterance, Vec<u8>)> = self
                .calls
                .prepare(
                    "SELECT idx, leg, start_secs, end_secs, intents, emotion, phase, sealed FROM record
                     WHERE call = ?1 AND kind = ?2 ORDER BY idx",
                )?
                .query_map(params![id, RecordKind::Utterance as i64], |r| {
                    let utterance = StoredUtterance {
                        index: u64::try_from(r.get::<_, i64>(0)?).unwrap_or_default(),
                        leg: r.get(1)?,
                        start_secs: r.get(2)?,
                        end_secs: r.get(3)?,
                        intents: split_list(r.get(4)?),
                        emotion: r.get(5)?,
                        phase: r.get(6)?,
                        ..Default::default()
                    };
                    Ok((utterance, r.get(7)?))
                })?
                .collect::<Result<_, _>>()?;
            for (mut utterance, sealed) in rows {
                let place = Place { call: id, kind: RecordKind::Utterance, index: utterance.index, last: false };
                let plain = key.open(place, &sealed)?;
                let opened: OpenedUtterance = serde_json::from_slice(&plain).map_err(|e| StoreError::BadInput {
                    call: id.into(),
                    what: format!("record {}: {e}", utterance.index),
                })?;
                utterance.text = opened.text;
                utterance.facts = opened.facts;
                utterances.push(utterance);
            }
        }
        let mut unmasked = Vec::new();
        if let Some(key) = self.class_key(id, DataClass::Unmasked)? {
            let rows: Vec<(i64, Vec<u8>)> = self
                .calls
                .prepare("SELECT idx, sealed FROM record WHERE call = ?1 AND kind = ?2 ORDER BY idx")?
                .query_map(params![id, RecordKind::Unmasked as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (idx, sealed) in rows {
                let index = u64::try_from(idx).unwrap_or_default();
                let place = Place { call: id, kind: RecordKind::Unmasked, index, last: false };
                let text = String::from_utf8_lossy(&key.open(place, &sealed)?).into_owned();
                unmasked.push((index, text));
            }
        }
        Ok(CallTranscript { call, utterances, unmasked })
    }

    /// One leg's audio from chunk `from` on, decrypted, up to about `max_bytes` of µ-law
    /// (the rest is asked for with `next`). Audited before anything is decrypted.
    pub fn audio(
        &mut self,
        id: &str,
        leg: crate::audio::Leg,
        from: u32,
        max_bytes: usize,
        actor: &Actor,
        now_unix_ms: i64,
    ) -> Result<LegAudio, StoreError> {
        let object = format!("{id} {} from chunk {from}", leg.name());
        if let Err(e) = self.summary(id) {
            self.audit(actor, "audio_read", &object, &format!("failed: {e}"), now_unix_ms)?;
            return Err(e);
        }
        let Some(key) = self.class_key(id, DataClass::Audio)? else {
            self.audit(actor, "audio_read", &object, "failed: no audio (not kept, or shredded)", now_unix_ms)?;
            return Err(StoreError::BadInput { call: id.into(), what: "no audio is kept for this call".into() });
        };
        self.audit(actor, "audio_read", &object, "ok", now_unix_ms)?;
        let first = audio::record_index(leg, from) as i64;
        let end = audio::record_index(leg, u32::MAX) as i64;
        let rows: Vec<(i64, Option<String>, Vec<u8>)> = self
            .calls
            .prepare(
                "SELECT idx, phase, sealed FROM record WHERE call = ?1 AND kind = ?2 AND idx >= ?3 AND idx <= ?4
                 ORDER BY idx",
            )?
            .query_map(params![id, RecordKind::Audio as i64, first, end], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = LegAudio { rate: 0, mulaw: Vec::new(), complete: false, next: None };
        for (idx, flag, sealed) in rows {
            let index = u64::try_from(idx).unwrap_or_default();
            let chunk = (index & u64::from(u32::MAX)) as u32;
            if !out.mulaw.is_empty() && out.mulaw.len() + sealed.len() > max_bytes {
                out.next = Some(chunk);
                break;
            }
            let last = flag.as_deref() == Some("last");
            let place = Place { call: id, kind: RecordKind::Audio, index, last };
            let plain = key.open(place, &sealed)?;
            let (rate, mulaw) = plain.split_at_checked(4).ok_or_else(|| StoreError::BadInput {
                call: id.into(),
                what: format!("audio record {chunk} is too short"),
            })?;
            out.rate = u32::from_le_bytes([rate[0], rate[1], rate[2], rate[3]]);
            out.mulaw.extend_from_slice(mulaw);
            out.complete = last;
        }
        Ok(out)
    }

    /// Erases a customer (PIPL Art. 47): every call's keys are shredded first, then its
    /// records, rule hits and the customer link go; a tombstone (the hash only) stays so a
    /// later sync can tell headquarters. Idempotent.
    pub fn forget(&mut self, customer: &str, actor: &Actor, now_unix_ms: i64) -> Result<Forgotten, StoreError> {
        let before: Option<i64> = self
            .calls
            .query_row("SELECT calls FROM tombstone WHERE customer = ?1", [customer], |r| r.get(0))
            .optional()?;
        let calls: Vec<String> = column(&self.calls, "SELECT id FROM call WHERE customer = ?1", [customer])?;
        self.shred(&calls, None)?;
        let tx = self.calls.transaction()?;
        for id in &calls {
            delete_content(&tx, id)?;
            tx.execute("UPDATE call SET customer = NULL, tags = NULL, status = 'forgotten' WHERE id = ?1", [id])?;
        }
        let total = before.unwrap_or(0) + calls.len() as i64;
        tx.execute(
            "INSERT INTO tombstone (customer, at_ms, calls) VALUES (?1, ?2, ?3)
             ON CONFLICT (customer) DO UPDATE SET calls = excluded.calls",
            params![customer, now_unix_ms, total],
        )?;
        let mut ledger = self.outbox.as_ref().map(|o| o.ledger.clone());
        if let Some(ledger) = ledger.as_mut() {
            // Messages not sent yet that name the customer go now; HQ is told to erase
            // what it already has (the notice names the keyed hash, never the number).
            let unsent = outbox::purge_mentions(&tx, ledger, customer)?;
            let notice =
                ErasureNotice { customer: customer.to_owned(), calls: calls.len() as u64, unsent_dropped: unsent };
            outbox::enqueue(&tx, ledger, Lane::Compliance, "erasure", &notice, now_unix_ms, random8(&self.random)?)?;
        }
        tx.commit()?;
        if let (Some(outbox), Some(ledger)) = (self.outbox.as_mut(), ledger) {
            outbox.ledger = ledger;
            outbox.dirty = true;
        }
        self.reclaim()?;
        let first_time = before.is_none() || !calls.is_empty();
        let outcome = if first_time { format!("ok: {} calls", calls.len()) } else { "ok: already forgotten".into() };
        self.audit(actor, "forget", customer, &outcome, now_unix_ms)?;
        Ok(Forgotten { customer: customer.into(), calls: calls.len(), first_time })
    }

    /// Whether a customer was forgotten (the tombstone).
    pub fn tombstone(&self, customer: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .calls
            .query_row("SELECT at_ms FROM tombstone WHERE customer = ?1", [customer], |r| r.get(0))
            .optional()?)
    }

    /// Applies retention at `now`: keys of expired classes are shredded first, then their
    /// rows deleted; expired calls go whole; keys without a call (a crash between the two
    /// files) go too; then the space is reclaimed.
    pub fn sweep(&mut self, retention: &Retention, now_unix_ms: i64) -> Result<SweepReport, StoreError> {
        // Every step is one statement over an index (class_key by class and start time,
        // call by start time): the work and the memory follow what expires now, not the
        // years of history that expired before.
        let mut report = SweepReport::default();
        let cutoff = |days: u32| (days > 0).then(|| now_unix_ms - i64::from(days) * MS_PER_DAY);
        for (class, kind, days) in [
            (DataClass::Audio, RecordKind::Audio, retention.audio_days),
            (DataClass::Transcript, RecordKind::Utterance, retention.transcript_days),
            (DataClass::Unmasked, RecordKind::Unmasked, retention.transcript_days),
        ] {
            let Some(cutoff) = cutoff(days) else { continue };
            let shredded = self
                .keys
                .execute("DELETE FROM class_key WHERE class = ?1 AND started_ms < ?2", params![class.name(), cutoff])?;
            self.calls.execute(
                "DELETE FROM record WHERE kind = ?1 AND call IN (SELECT id FROM call WHERE started_ms < ?2)",
                params![kind as i64, cutoff],
            )?;
            match class {
                DataClass::Audio => report.audio_shredded += shredded,
                DataClass::Transcript => report.transcripts_shredded += shredded,
                DataClass::Unmasked => {}
            }
        }
        if let Some(cutoff) = cutoff(retention.metadata_days) {
            self.keys.execute("DELETE FROM class_key WHERE started_ms < ?1", [cutoff])?;
            let tx = self.calls.transaction()?;
            let expired = "(SELECT id FROM call WHERE started_ms < ?1)";
            tx.execute(&format!("DELETE FROM record WHERE call IN {expired}"), [cutoff])?;
            tx.execute(&format!("DELETE FROM rule_hit WHERE call IN {expired}"), [cutoff])?;
            report.calls_deleted = tx.execute("DELETE FROM call WHERE started_ms < ?1", [cutoff])?;
            tx.commit()?;
        }
        // Keys whose call row never landed (a batch refused after its keys were committed):
        // streamed, one indexed lookup each, only the orphans kept.
        let mut orphans = Vec::new();
        {
            let mut known = self.calls.prepare("SELECT 1 FROM call WHERE id = ?1")?;
            let mut keyed = self.keys.prepare("SELECT DISTINCT call FROM class_key")?;
            let mut rows = keyed.query([])?;
            while let Some(row) = rows.next()? {
                let id: String = row.get(0)?;
                if !known.exists([&id])? {
                    orphans.push(id);
                }
            }
        }
        report.orphan_keys = self.shred(&orphans, None)?;
        report.pages_freed = self.reclaim()?;
        // Every retention run is a processing record (PIPL Art. 55-56): counts only.
        let actor = Actor { uid: nix::unistd::geteuid().as_raw(), role: "store".into() };
        self.audit(&actor, "retention", "-", &format!("ok: {}", report.describe()), now_unix_ms)?;
        // The entry went to the WAL: fold it in too, so nothing deleted lingers there.
        self.calls.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(report)
    }

    /// Deletes the wrapped keys of these calls (one class, or all), in one transaction of
    /// the keys file: from then on their ciphertext opens for nobody. Returns keys deleted.
    fn shred(&mut self, calls: &[String], class: Option<DataClass>) -> Result<usize, StoreError> {
        let tx = self.keys.transaction()?;
        let mut deleted = 0;
        for id in calls {
            deleted += match class {
                Some(c) => tx.execute("DELETE FROM class_key WHERE call = ?1 AND class = ?2", params![id, c.name()])?,
                None => tx.execute("DELETE FROM class_key WHERE call = ?1", [id])?,
            };
        }
        tx.commit()?;
        Ok(deleted)
    }

    /// Checkpoints the WAL into the file and truncates it, then gives free pages back to the
    /// file system, so deleted rows do not keep the file large (nor linger in the WAL).
    fn reclaim(&mut self) -> Result<i64, StoreError> {
        let free_before: i64 = self.calls.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        self.calls.execute_batch("PRAGMA incremental_vacuum;")?;
        self.calls.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let free_after: i64 = self.calls.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok(free_before - free_after)
    }

    /// Appends one audit entry, chained to the head kept in the keys file.
    pub fn audit(
        &mut self,
        actor: &Actor,
        action: &str,
        object: &str,
        outcome: &str,
        now_unix_ms: i64,
    ) -> Result<AuditEntry, StoreError> {
        let head = self.audit_head()?;
        let entry = audit::chain(
            &head,
            AuditEvent {
                at_unix_ms: now_unix_ms,
                uid: actor.uid,
                role: actor.role.clone(),
                action: action.into(),
                object: object.into(),
                outcome: outcome.into(),
            },
        );
        // Entry first, head second: a crash in between leaves an entry past the head, which
        // `verify` reports (never a head past the entries, which would hide a deletion).
        self.calls.execute(
            "INSERT INTO audit (seq, at_ms, uid, role, action, object, outcome, prev, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                entry.seq,
                entry.event.at_unix_ms,
                entry.event.uid,
                entry.event.role,
                entry.event.action,
                entry.event.object,
                entry.event.outcome,
                entry.prev,
                entry.hash
            ],
        )?;
        self.keys.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_head', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [format!("{} {}", entry.seq, entry.hash)],
        )?;
        Ok(entry)
    }

    fn audit_head(&self) -> Result<ChainHead, StoreError> {
        let value: Option<String> =
            self.keys.query_row("SELECT value FROM meta WHERE key = 'audit_head'", [], |r| r.get(0)).optional()?;
        Ok(value
            .and_then(|v| {
                let (seq, hash) = v.split_once(' ')?;
                Some(ChainHead { seq: seq.parse().ok()?, hash: hash.to_owned() })
            })
            .unwrap_or_else(ChainHead::empty))
    }

    /// Entries, oldest first (optionally from a time on).
    pub fn audit_entries(&self, since_unix_ms: Option<i64>) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self
            .calls
            .prepare(
                "SELECT seq, at_ms, uid, role, action, object, outcome, prev, hash FROM audit
                 WHERE at_ms >= ?1 ORDER BY rowid",
            )?
            .query_map([since_unix_ms.unwrap_or(i64::MIN)], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    event: AuditEvent {
                        at_unix_ms: r.get(1)?,
                        uid: r.get(2)?,
                        role: r.get(3)?,
                        action: r.get(4)?,
                        object: r.get(5)?,
                        outcome: r.get(6)?,
                    },
                    prev: r.get(7)?,
                    hash: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The whole chain against the head kept apart: how many entries hold, or the first
    /// broken one.
    pub fn audit_verify(&self) -> Result<Result<usize, audit::BrokenChain>, StoreError> {
        Ok(audit::verify(&self.audit_entries(None)?, &self.audit_head()?))
    }

    /// `PRAGMA integrity_check` of both files: "ok" or the problems.
    pub fn integrity(&self) -> Result<String, StoreError> {
        let mut out = Vec::new();
        for (name, conn) in [(CALLS_FILE, &self.calls), (KEYS_FILE, &self.keys)] {
            let rows: Vec<String> =
                conn.prepare("PRAGMA integrity_check")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            if rows != ["ok"] {
                out.push(format!("{name}: {}", rows.join("; ")));
            }
        }
        Ok(if out.is_empty() { "ok".into() } else { out.join("\n") })
    }
}

fn random8(random: &SystemRandom) -> Result<[u8; 8], StoreError> {
    let mut out = [0u8; 8];
    random.fill(&mut out).map_err(|_| StoreError::Random)?;
    Ok(out)
}

/// An agent as HQ sees it: a keyed hash (the box's pseudonym key), stable across calls.
fn pseudonym(key: Option<&ring::hmac::Key>, agent: Option<String>) -> Option<String> {
    let (key, agent) = (key?, agent?);
    Some(crate::hex::encode(&ring::hmac::sign(key, agent.as_bytes()).as_ref()[..8]))
}

fn hit_report(
    tx: &Connection,
    call: &str,
    hit: &StoredHit,
    pseudonyms: Option<&ring::hmac::Key>,
) -> Result<HitReport, StoreError> {
    let (line, agent, campaign, script): (String, Option<String>, Option<String>, Option<String>) = tx
        .query_row("SELECT line, agent, campaign, script FROM call WHERE id = ?1", [call], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?
        .ok_or_else(|| StoreError::NoSuchCall(call.to_owned()))?;
    Ok(HitReport {
        call: call.to_owned(),
        line,
        agent: pseudonym(pseudonyms, agent),
        campaign,
        script,
        rule: hit.rule.clone(),
        severity: hit.severity.clone(),
        event: hit.event.clone(),
        at_secs: hit.at_secs,
    })
}

/// A finished call's summary for HQ, and what it adds to its aggregate window.
fn call_report(
    tx: &Connection,
    call: &str,
    pseudonyms: Option<&ring::hmac::Key>,
) -> Result<(CallReport, CallFacts), StoreError> {
    type Row = (String, String, i64, Option<i64>, Option<String>, Option<String>, Option<String>, Option<String>);
    type Rest = (i64, Option<String>, Option<String>, bool);
    let (row, rest): (Row, Rest) = tx
        .query_row(
            "SELECT source, line, started_ms, ended_ms, agent, campaign, script, customer,
                    utterances, phase, tags, converted FROM call WHERE id = ?1",
            [call],
            |r| {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?),
                    (r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
                ))
            },
        )
        .optional()?
        .ok_or_else(|| StoreError::NoSuchCall(call.to_owned()))?;
    let (source, line, started, ended, agent, campaign, script, customer) = row;
    let (utterances, phase, tags, converted) = rest;
    let ended = ended.unwrap_or(started);
    let mut report = CallReport {
        call: call.to_owned(),
        source,
        line,
        started_unix_ms: started,
        ended_unix_ms: ended,
        duration_secs: (ended - started).max(0) as f64 / 1000.0,
        talk_secs: Default::default(),
        utterances,
        agent: pseudonym(pseudonyms, agent),
        campaign,
        script,
        phase,
        intents: Default::default(),
        emotions: Default::default(),
        rule_hits: Default::default(),
        events: Default::default(),
        tags: split_list(tags),
        converted,
        customer,
    };
    let mut facts = CallFacts { duration_secs: report.duration_secs, converted, ..Default::default() };
    let mut stmt = tx.prepare_cached(
        "SELECT leg, start_secs, end_secs, intents, emotion, asr_ms, understanding_ms
         FROM record WHERE call = ?1 AND kind = ?2",
    )?;
    let rows = stmt.query_map(params![call, RecordKind::Utterance as i64], |r| {
        Ok((
            (r.get::<_, Option<String>>(0)?, r.get::<_, Option<f64>>(1)?, r.get::<_, Option<f64>>(2)?),
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            (r.get::<_, Option<f64>>(5)?, r.get::<_, Option<f64>>(6)?),
        ))
    })?;
    for row in rows {
        let ((leg, start, end), intents, emotion, (asr_ms, understanding_ms)) = row?;
        if let (Some(leg), Some(start), Some(end)) = (leg, start, end) {
            *report.talk_secs.entry(leg.clone()).or_default() += (end - start).max(0.0);
            facts.spans.push((leg, start, end));
        }
        facts.asr_ms.extend(asr_ms);
        facts.understanding_ms.extend(understanding_ms);
        for intent in split_list(intents) {
            *report.intents.entry(intent).or_default() += 1;
        }
        if let Some(emotion) = emotion.filter(|e| !e.is_empty()) {
            *report.emotions.entry(emotion).or_default() += 1;
        }
    }
    let mut stmt = tx.prepare_cached("SELECT rule, event, severity FROM rule_hit WHERE call = ?1")?;
    let rows = stmt
        .query_map([call], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?)))?;
    for row in rows {
        let (rule, event, severity) = row?;
        facts.hits.push((rule.clone(), severity));
        *report.rule_hits.entry(rule).or_default() += 1;
        if let Some(event) = event {
            *report.events.entry(event).or_default() += 1;
        }
    }
    for secs in report.talk_secs.values_mut() {
        *secs = (*secs * 100.0).round() / 100.0;
    }
    facts.intents = report.intents.clone();
    facts.emotions = report.emotions.clone();
    facts.events = report.events.clone();
    Ok((report, facts))
}

/// The wall clock in ms since the epoch (audit entries, call times); 0 before 1970.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The first column of every row.
fn column<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<T>, StoreError> {
    Ok(conn.prepare(sql)?.query_map(params, |r| r.get(0))?.collect::<Result<_, _>>()?)
}

/// A call's sealed records and rule hits (after its keys are shredded).
fn delete_content(tx: &Connection, call: &str) -> Result<(), StoreError> {
    tx.execute("DELETE FROM record WHERE call = ?1", [call])?;
    tx.execute("DELETE FROM rule_hit WHERE call = ?1", [call])?;
    Ok(())
}

/// One write for the store task; a batch of them is one transaction (`CallStore::apply`).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    Begin(CallStart),
    Append {
        call: String,
        utterances: Vec<StoredUtterance>,
    },
    Hits {
        call: String,
        hits: Vec<StoredHit>,
    },
    Finish {
        call: String,
        end: CallEnd,
    },
    /// What the PBX, its sidecar or a technician says about a call, at any time.
    Describe {
        call: String,
        info: CallInfo,
    },
    /// A stretch of a leg's audio (with `store.keep_audio`).
    Audio {
        call: String,
        chunk: AudioChunk,
    },
    /// A customer's tags changed (from the customer store): queued for HQ, unless the
    /// customer has been forgotten meanwhile.
    CustomerTags(CustomerTags),
    /// The box's health for HQ (the outbox's own figures are filled in by the store).
    Diagnostics(DiagnosticsReport),
}

impl StoreOp {
    /// The call it is about (for logs).
    pub fn call(&self) -> &str {
        match self {
            Self::Begin(c) => &c.id,
            Self::Append { call, .. }
            | Self::Hits { call, .. }
            | Self::Finish { call, .. }
            | Self::Describe { call, .. }
            | Self::Audio { call, .. } => call,
            Self::CustomerTags(_) | Self::Diagnostics(_) => "-",
        }
    }

    /// About how much memory it holds (the store thread's backlog is bounded by it).
    pub fn approx_bytes(&self) -> usize {
        let base = 256 + self.call().len();
        base + match self {
            Self::Append { utterances, .. } => {
                utterances.iter().map(|u| 256 + u.text.len() + u.unmasked.as_ref().map_or(0, String::len)).sum()
            }
            Self::Hits { hits, .. } => hits.iter().map(|h| 128 + h.reason.len()).sum(),
            Self::Audio { chunk, .. } => chunk.mulaw.len(),
            Self::CustomerTags(c) => c.tags.iter().map(String::len).sum(),
            Self::Begin(_) | Self::Finish { .. } | Self::Describe { .. } | Self::Diagnostics(_) => 0,
        }
    }

    /// Its name (for logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Begin(_) => "begin",
            Self::Append { .. } => "utterances",
            Self::Hits { .. } => "rule hits",
            Self::Finish { .. } => "finish",
            Self::Describe { .. } => "call info",
            Self::Audio { .. } => "audio",
            Self::CustomerTags(_) => "customer tags",
            Self::Diagnostics(_) => "diagnostics",
        }
    }
}

/// Facts about a call from outside the audio; each given one replaces the stored one,
/// `converted` only ever turns on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallInfo {
    /// The input kind, when the one that took the call knows better than the registry
    /// (the spool: its calls can be gone from the registry before they are understood).
    pub source: Option<String>,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    /// The customer's keyed hash.
    pub customer: Option<String>,
    pub converted: bool,
}

impl CallInfo {
    fn updated_by(self, newer: CallInfo) -> CallInfo {
        CallInfo {
            source: newer.source.or(self.source),
            agent: newer.agent.or(self.agent),
            campaign: newer.campaign.or(self.campaign),
            script: newer.script.or(self.script),
            customer: newer.customer.or(self.customer),
            converted: self.converted || newer.converted,
        }
    }

    fn merged_into(&self, call: CallStart) -> CallStart {
        CallStart {
            source: self.source.clone().unwrap_or(call.source),
            agent: self.agent.clone().or(call.agent),
            campaign: self.campaign.clone().or(call.campaign),
            script: self.script.clone().or(call.script),
            customer: self.customer.clone().or(call.customer),
            ..call
        }
    }
}

fn stored_class_key(
    keys: &Connection,
    master: &MasterKey,
    call: &str,
    class: DataClass,
) -> Result<Option<ClassKey>, StoreError> {
    let wrapped: Option<Vec<u8>> = keys
        .query_row("SELECT wrapped FROM class_key WHERE call = ?1 AND class = ?2", params![call, class.name()], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(match wrapped {
        Some(w) => Some(master.unwrap(call, class, &w)?),
        None => None,
    })
}

fn append_records(
    tx: &Connection,
    call: &str,
    batch: &[StoredUtterance],
    transcript: &ClassKey,
    unmasked: Option<&ClassKey>,
) -> Result<(), StoreError> {
    for u in batch {
        let place = Place { call, kind: RecordKind::Utterance, index: u.index, last: false };
        let plain = serde_json::to_vec(&SealedUtterance { text: &u.text, facts: u.facts.as_ref() })
            .map_err(|e| StoreError::BadInput { call: call.into(), what: e.to_string() })?;
        tx.execute(
            "INSERT INTO record (call, kind, idx, leg, start_secs, end_secs, intents, emotion, phase, sealed,
                                 asr_ms, understanding_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                call,
                RecordKind::Utterance as i64,
                u.index as i64,
                u.leg,
                u.start_secs,
                u.end_secs,
                u.intents.join(","),
                u.emotion,
                u.phase,
                transcript.seal(place, &plain),
                u.asr_ms,
                u.understanding_ms
            ],
        )?;
        if let (Some(key), Some(text)) = (unmasked, &u.unmasked) {
            let place = Place { call, kind: RecordKind::Unmasked, index: u.index, last: false };
            tx.execute(
                "INSERT INTO record (call, kind, idx, leg, start_secs, end_secs, sealed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    call,
                    RecordKind::Unmasked as i64,
                    u.index as i64,
                    u.leg,
                    u.start_secs,
                    u.end_secs,
                    key.seal(place, text.as_bytes())
                ],
            )?;
        }
    }
    tx.execute("UPDATE call SET utterances = utterances + ?2 WHERE id = ?1", params![call, batch.len() as i64])?;
    Ok(())
}

/// One audio chunk, sealed under the call's audio key: the rate and the µ-law bytes;
/// the leg and the times stay in clear (metadata).
fn insert_audio(tx: &Connection, call: &str, chunk: &AudioChunk, key: &ClassKey) -> Result<(), StoreError> {
    let index = chunk.record_index();
    let place = Place { call, kind: RecordKind::Audio, index, last: chunk.last };
    let mut plain = Vec::with_capacity(4 + chunk.mulaw.len());
    plain.extend_from_slice(&chunk.rate.to_le_bytes());
    plain.extend_from_slice(&chunk.mulaw);
    tx.execute(
        "INSERT INTO record (call, kind, idx, leg, start_secs, end_secs, phase, sealed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            call,
            RecordKind::Audio as i64,
            index as i64,
            chunk.leg.name(),
            chunk.start_secs,
            chunk.end_secs(),
            // The last-chunk flag is part of the nonce: it must be known to open the record.
            if chunk.last { "last" } else { "" },
            key.seal(place, &plain)
        ],
    )?;
    Ok(())
}

/// A leg's stored audio, opened: µ-law bytes at `rate`, chunk after chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct LegAudio {
    pub rate: u32,
    pub mulaw: Vec<u8>,
    /// Whether the leg's last chunk is there (false: the daemon stopped mid-leg, or the
    /// disk was too full to keep the rest).
    pub complete: bool,
    /// Chunks from `from` on that were not returned (the caller asks again).
    pub next: Option<u32>,
}

/// What `list` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFilter {
    pub since_unix_ms: Option<i64>,
    pub customer: Option<String>,
    pub event: Option<String>,
    pub limit: i64,
}

impl Default for CallFilter {
    fn default() -> Self {
        Self { since_unix_ms: None, customer: None, event: None, limit: 100 }
    }
}

#[derive(Serialize)]
struct SealedUtterance<'a> {
    text: &'a str,
    facts: Option<&'a serde_json::Value>,
}

#[derive(Deserialize)]
struct OpenedUtterance {
    text: String,
    facts: Option<serde_json::Value>,
}

fn split_list(value: Option<String>) -> Vec<String> {
    value.map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()).unwrap_or_default()
}

const KEYS_SCHEMA: &str = "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE class_key (
        call TEXT NOT NULL, class TEXT NOT NULL, master TEXT NOT NULL, wrapped BLOB NOT NULL,
        started_ms INTEGER NOT NULL,
        PRIMARY KEY (call, class));
    CREATE INDEX class_key_expiry ON class_key (class, started_ms);
";

const CALLS_SCHEMA: &str = "
    CREATE TABLE call (
        id TEXT PRIMARY KEY, source TEXT NOT NULL, line TEXT NOT NULL,
        started_ms INTEGER NOT NULL, ended_ms INTEGER, status TEXT NOT NULL,
        agent TEXT, campaign TEXT, script TEXT, customer TEXT,
        utterances INTEGER NOT NULL DEFAULT 0, phase TEXT, tags TEXT,
        converted INTEGER NOT NULL DEFAULT 0, rules_version TEXT);
    CREATE INDEX call_started ON call (started_ms);
    CREATE INDEX call_customer ON call (customer);
    CREATE TABLE record (
        call TEXT NOT NULL REFERENCES call(id), kind INTEGER NOT NULL, idx INTEGER NOT NULL,
        leg TEXT, start_secs REAL, end_secs REAL, intents TEXT, emotion TEXT, phase TEXT,
        sealed BLOB NOT NULL, asr_ms REAL, understanding_ms REAL,
        PRIMARY KEY (call, kind, idx));
    CREATE TABLE rule_hit (
        call TEXT NOT NULL REFERENCES call(id), rule TEXT NOT NULL, severity TEXT NOT NULL,
        event TEXT, reason TEXT NOT NULL, at_secs REAL NOT NULL, utterances TEXT NOT NULL);
    CREATE INDEX rule_hit_call ON rule_hit (call);
    CREATE TABLE tombstone (customer TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, calls INTEGER NOT NULL);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, uid INTEGER NOT NULL, role TEXT NOT NULL,
        action TEXT NOT NULL, object TEXT NOT NULL, outcome TEXT NOT NULL,
        prev TEXT NOT NULL, hash TEXT NOT NULL);
";

/// Version 3's new columns (in `CALLS_SCHEMA` for new files): utterance latencies, and
/// the rules' version a call was checked with (an aggregate key).
const V3_COLUMNS: &str = "
    ALTER TABLE record ADD COLUMN asr_ms REAL;
    ALTER TABLE record ADD COLUMN understanding_ms REAL;
    ALTER TABLE call ADD COLUMN rules_version TEXT;
";

/// Creates the schema in a new file, or runs the upgrades from the file's version on,
/// each in its own transaction with the version it reaches.
fn migrate(
    conn: &Connection,
    path: &Path,
    schema: &str,
    version: i64,
    upgrades: &[(i64, &str)],
) -> Result<(), StoreError> {
    let db_err = |source| StoreError::Database { path: path.to_owned(), source };
    let mut found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db_err)?;
    if found == 0 {
        return conn
            .execute_batch(&format!("BEGIN; {schema} PRAGMA user_version = {version}; COMMIT;"))
            .map_err(db_err);
    }
    for (from, upgrade) in upgrades {
        if found == *from {
            conn.execute_batch(&format!("BEGIN; {upgrade} PRAGMA user_version = {}; COMMIT;", from + 1))
                .map_err(db_err)?;
            found = from + 1;
        }
    }
    if found == version {
        Ok(())
    } else {
        Err(StoreError::Schema { path: path.to_owned(), found, knows: version })
    }
}

#[cfg(test)]
mod tests;
