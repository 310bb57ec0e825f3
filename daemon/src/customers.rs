//! Customers across calls: tags kept per customer, where a customer is a keyed hash of the
//! caller number (HMAC-SHA256 with a per-box secret), never the number itself.
//!
//! The store is SQLite under the call store's directory (`store/customers.sqlite`, 0600 in a
//! 0700 folder, WAL, `synchronous = FULL`: a tag written is a tag kept across a kill -9 or a
//! power cut; `secure_delete`, so a forgotten customer's rows are overwritten, not left in
//! free pages). Earlier versions kept it, and the key, at the top of the data directory:
//! `Customers::open` moves them (`move_into_store`).
//! Tags are recorded per call as the call raises them; once the call is linked to a caller
//! (spool sidecar, `callbox call info`, the PBX sidecar) the call's tags, earlier and later,
//! are the customer's. `converted` comes only from the PBX/CRM sidecar, possibly hours after
//! the call, by call id.
//!
//! The secret (`store/caller-hash.key`, 32 random bytes, 0600) is what makes a hash useless to
//! anyone who copies the database: the space of phone numbers is small enough to hash whole.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::hmac;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::store::live::CallVault;
use crate::store::{now_ms, CustomerTags, StoreOp};

const COMPONENT: &str = "customers";

pub const DATABASE_FILE: &str = "store/customers.sqlite";
pub const KEY_FILE: &str = "store/caller-hash.key";
/// Where versions before the call store kept them (moved at the first start).
const OLD_DATABASE_FILE: &str = "customers.sqlite";
const OLD_KEY_FILE: &str = "keys/caller-hash.key";
const KEY_BYTES: usize = 32;
/// Longest caller number accepted, separators included (E.164 is at most 15 digits).
pub const MAX_CALLER_CHARS: usize = 32;
/// The tag only the PBX/CRM sidecar sets.
pub const CONVERTED: &str = "converted";
/// Version 2 added the tag changes waiting for HQ (`tag_change`).
const SCHEMA_VERSION: i64 = 2;
/// Tag changes waiting for HQ: one row per customer (its latest revision), written in the
/// same transaction as the tags, removed once the call store's outbox holds the message.
const TAG_CHANGE_SCHEMA: &str = "
    CREATE TABLE tag_change (customer TEXT PRIMARY KEY, revision INTEGER NOT NULL);
    CREATE TABLE tag_revision (id INTEGER PRIMARY KEY CHECK (id = 1), last INTEGER NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    #[error("cannot create {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("caller-hash key {path}: {source}")]
    Key { path: PathBuf, source: std::io::Error },
    #[error("cannot move {path} into the call store's folder: {source}")]
    Move { path: PathBuf, source: std::io::Error },
    #[error("caller-hash key {path} has {len} bytes, not {KEY_BYTES}: restore it from backup (a new key would split every customer's history)")]
    KeyLength { path: PathBuf, len: usize },
    #[error("cannot make {path} private: {source}")]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("customer database {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("customer database {path} has schema version {found}; this callbox knows {SCHEMA_VERSION}: a newer callbox wrote it, so install that version again (or restore the file from a backup)")]
    Schema { path: PathBuf, found: i64 },
    #[error("customer database: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("{0}")]
    BadInput(String),
    #[error("the customer store task failed: {0}")]
    Task(String),
}

/// Digits of a caller number as the PBX gives it, with the China country prefix removed so
/// that `+86 138…`, `0086138…` and `138…` are one customer. None if it is not a number.
pub fn normalize_number(raw: &str) -> Option<String> {
    if raw.chars().count() > MAX_CALLER_CHARS {
        return None;
    }
    let mut digits = String::new();
    for (i, c) in raw.trim().chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '(' | ')' | '.' => {}
            _ => return None,
        }
    }
    let national = if let Some(rest) = digits.strip_prefix("0086") {
        rest
    } else if digits.len() == 13 && digits.starts_with("861") {
        &digits[2..]
    } else {
        &digits
    };
    (national.len() >= 3).then(|| national.to_owned())
}

/// Turns caller numbers into customer ids.
pub struct CallerHasher {
    key: hmac::Key,
}

impl CallerHasher {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// Reads the box's secret, creating it (0600, in a 0700 folder) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, CustomerError> {
        let key_err = |source| CustomerError::Key { path: path.to_owned(), source };
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == KEY_BYTES => return Ok(Self::from_secret(&bytes)),
            Ok(bytes) => return Err(CustomerError::KeyLength { path: path.to_owned(), len: bytes.len() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(key_err(e)),
        }
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| CustomerError::CreateDir { path: dir.to_owned(), source })?;
        }
        let mut secret = [0u8; KEY_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| key_err(std::io::Error::other("the system random source failed")))?;
        // create_new: two daemons racing must not each write a different key.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(key_err)?;
        file.write_all(&secret).and_then(|()| file.sync_all()).map_err(key_err)?;
        std::fs::hard_link(&tmp, path).map_err(key_err)?;
        let _ = std::fs::remove_file(&tmp);
        Ok(Self::from_secret(&secret))
    }

    /// The customer id of a caller number: 128 bits of HMAC-SHA256 over the normalized digits.
    pub fn customer_id(&self, caller: &str) -> Result<String, CustomerError> {
        let digits = normalize_number(caller).ok_or_else(|| {
            CustomerError::BadInput(format!(
                "not a caller number (digits, spaces, -, (), a leading +; at most {MAX_CALLER_CHARS} characters)"
            ))
        })?;
        let tag = hmac::sign(&self.key, digits.as_bytes());
        Ok(crate::hex::encode(&tag.as_ref()[..16]))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub tag: String,
    pub first_unix_ms: i64,
    pub last_unix_ms: i64,
    /// Calls that raised the tag.
    pub calls: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub customer: String,
    pub first_unix_ms: i64,
    pub last_unix_ms: i64,
    pub calls: i64,
    pub tags: Vec<TagRecord>,
}

/// Moves the customer database and the caller-hash key of an earlier version from the top
/// of the data directory into `store/` (0700). Crash-safe: each step is a rename within one
/// file system, the WAL before its database (a database moved without its WAL would lose
/// the last commits), and a start after a stop half-way finishes the job. Both an old and a
/// new file present is refused: one of them would be lost.
pub fn move_into_store(data_dir: &Path) -> Result<(), CustomerError> {
    let store_dir = data_dir.join(crate::store::STORE_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&store_dir)
        .map_err(|source| CustomerError::CreateDir { path: store_dir.clone(), source })?;
    let wal = |f: &str| format!("{f}-wal");
    let steps = [
        (OLD_KEY_FILE.to_owned(), KEY_FILE.to_owned()),
        (wal(OLD_DATABASE_FILE), wal(DATABASE_FILE)),
        (OLD_DATABASE_FILE.to_owned(), DATABASE_FILE.to_owned()),
    ];
    let mut moved = false;
    for (old, new) in &steps {
        let (old, new) = (data_dir.join(old), data_dir.join(new));
        if std::fs::symlink_metadata(&old).is_err() {
            continue;
        }
        if std::fs::symlink_metadata(&new).is_ok() {
            return Err(CustomerError::Move {
                path: old.clone(),
                source: std::io::Error::other(format!(
                    "both {} and {} exist: keep the one in use (the newer), move the other away, and start again",
                    old.display(),
                    new.display()
                )),
            });
        }
        std::fs::rename(&old, &new).map_err(|source| CustomerError::Move { path: old.clone(), source })?;
        moved = true;
    }
    if moved {
        // The shared-memory index is rebuilt from the WAL; a stale one must not follow.
        let _ = std::fs::remove_file(data_dir.join(format!("{OLD_DATABASE_FILE}-shm")));
        for dir in [data_dir, store_dir.as_path()] {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| CustomerError::Move { path: dir.to_owned(), source })?;
        }
        log::info!(component = COMPONENT; "moved customers.sqlite and caller-hash.key into {}", store_dir.display());
    }
    Ok(())
}

/// The SQLite side. Every change is one transaction.
pub struct CustomerStore {
    conn: Connection,
    /// Tag changes are recorded for HQ (`[hq]` on, see `track_tag_changes`).
    tracking: bool,
    /// Recorded changes not yet handed to the call store's outbox.
    changes_waiting: bool,
}

impl CustomerStore {
    pub fn open(path: &Path) -> Result<Self, CustomerError> {
        let db_err = |source| CustomerError::Database { path: path.to_owned(), source };
        let conn = Connection::open(path).map_err(db_err)?;
        // SQLite creates files with the process umask (0077 under the unit); a manual run
        // may have a laxer one, so the database itself is made private here.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| CustomerError::Permissions { path: path.to_owned(), source })?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(db_err)?;
        conn.pragma_update(None, "secure_delete", true).map_err(db_err)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db_err)?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN;
                     CREATE TABLE customer (
                         id TEXT PRIMARY KEY, first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL,
                         calls INTEGER NOT NULL);
                     CREATE TABLE customer_tag (
                         customer TEXT NOT NULL REFERENCES customer(id), tag TEXT NOT NULL,
                         first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, calls INTEGER NOT NULL,
                         PRIMARY KEY (customer, tag));
                     CREATE TABLE call (
                         id TEXT PRIMARY KEY, customer TEXT REFERENCES customer(id), at_ms INTEGER NOT NULL);
                     CREATE TABLE call_tag (
                         call TEXT NOT NULL REFERENCES call(id), tag TEXT NOT NULL, at_ms INTEGER NOT NULL,
                         PRIMARY KEY (call, tag));
                     {TAG_CHANGE_SCHEMA}
                     PRAGMA user_version = {SCHEMA_VERSION};
                     COMMIT;"
                ))
                .map_err(db_err)?;
            }
            1 => conn
                .execute_batch(&format!("BEGIN; {TAG_CHANGE_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"))
                .map_err(db_err)?,
            SCHEMA_VERSION => {}
            found => return Err(CustomerError::Schema { path: path.to_owned(), found }),
        }
        Ok(Self { conn, tracking: false, changes_waiting: false })
    }

    /// From now on, a customer gaining a tag is recorded for HQ (in the same transaction);
    /// changes an earlier run recorded and did not hand over are waiting again.
    pub fn track_tag_changes(&mut self) -> Result<(), CustomerError> {
        self.tracking = true;
        self.changes_waiting = self.conn.query_row("SELECT count(*) FROM tag_change", [], |r| r.get::<_, i64>(0))? > 0;
        Ok(())
    }

    pub fn tag_changes_waiting(&self) -> bool {
        self.changes_waiting
    }

    /// Up to `limit` waiting changes, each with the customer's tags as they are now.
    pub fn pending_tag_changes(&self, limit: usize) -> Result<Vec<CustomerTags>, CustomerError> {
        let waiting: Vec<(String, i64)> = self
            .conn
            .prepare("SELECT customer, revision FROM tag_change ORDER BY revision LIMIT ?1")?
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (customer, revision) in waiting {
            let record = self.customer(&customer)?;
            let (tags, calls) = match record {
                Some(r) => (r.tags.into_iter().map(|t| t.tag).collect(), r.calls),
                None => (Vec::new(), 0),
            };
            out.push(CustomerTags { customer, revision, tags, calls });
        }
        Ok(out)
    }

    /// The call store's outbox holds these: they stop waiting (a customer changed again
    /// meanwhile has a newer revision and waits on).
    pub fn tag_changes_handed(&mut self, handed: &[CustomerTags]) -> Result<(), CustomerError> {
        let tx = self.conn.transaction()?;
        for change in handed {
            tx.execute(
                "DELETE FROM tag_change WHERE customer = ?1 AND revision = ?2",
                params![change.customer, change.revision],
            )?;
        }
        let left: i64 = tx.query_row("SELECT count(*) FROM tag_change", [], |r| r.get(0))?;
        tx.commit()?;
        self.changes_waiting = left > 0;
        Ok(())
    }

    /// Tags a call raised. Kept with the call, and the customer's too once the call is linked.
    /// Returns the tags that were new for this call.
    pub fn add_call_tags(&mut self, call: &str, tags: &[&str], now_ms: i64) -> Result<Vec<String>, CustomerError> {
        let tx = self.conn.transaction()?;
        tx.execute("INSERT OR IGNORE INTO call (id, customer, at_ms) VALUES (?1, NULL, ?2)", params![call, now_ms])?;
        let mut new = Vec::new();
        for tag in tags {
            if tx.execute(
                "INSERT OR IGNORE INTO call_tag (call, tag, at_ms) VALUES (?1, ?2, ?3)",
                params![call, tag, now_ms],
            )? == 1
            {
                new.push((*tag).to_owned());
            }
        }
        let customer: Option<String> =
            tx.query_row("SELECT customer FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?.flatten();
        let mut changed = false;
        if let Some(customer) = customer {
            let mut gained = false;
            for tag in &new {
                gained |= upsert_customer_tag(&tx, &customer, tag, now_ms)?;
            }
            touch_customer(&tx, &customer, now_ms, 0)?;
            if gained {
                changed = tag_changed(self.tracking, &tx, &customer)?;
            }
        }
        tx.commit()?;
        self.changes_waiting |= changed;
        Ok(new)
    }

    /// Says whose call this is. The call's tags so far become the customer's; relinking a
    /// call to the same customer changes nothing, to another one is refused.
    pub fn link_call(&mut self, call: &str, customer: &str, now_ms: i64) -> Result<CustomerRecord, CustomerError> {
        let mut changed = false;
        let tx = self.conn.transaction()?;
        let existing: Option<Option<String>> =
            tx.query_row("SELECT customer FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?;
        match existing {
            Some(Some(c)) if c == customer => {}
            Some(Some(_)) => {
                return Err(CustomerError::BadInput(format!("call {call} is already linked to another caller")))
            }
            linked => {
                let first_call =
                    tx.query_row("SELECT 1 FROM customer WHERE id = ?1", [customer], |_| Ok(())).optional()?.is_none();
                if first_call {
                    tx.execute(
                        "INSERT INTO customer (id, first_ms, last_ms, calls) VALUES (?1, ?2, ?2, 0)",
                        params![customer, now_ms],
                    )?;
                }
                touch_customer(&tx, customer, now_ms, 1)?;
                if linked.is_some() {
                    tx.execute("UPDATE call SET customer = ?2 WHERE id = ?1", params![call, customer])?;
                } else {
                    tx.execute(
                        "INSERT INTO call (id, customer, at_ms) VALUES (?1, ?2, ?3)",
                        params![call, customer, now_ms],
                    )?;
                }
                let tags: Vec<(String, i64)> = tx
                    .prepare("SELECT tag, at_ms FROM call_tag WHERE call = ?1")?
                    .query_map([call], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut gained = false;
                for (tag, at_ms) in tags {
                    gained |= upsert_customer_tag(&tx, customer, &tag, at_ms)?;
                }
                if gained {
                    changed = tag_changed(self.tracking, &tx, customer)?;
                }
            }
        }
        tx.commit()?;
        self.changes_waiting |= changed;
        self.customer(customer)?.ok_or_else(|| CustomerError::BadInput(format!("customer of call {call} vanished")))
    }

    /// The PBX/CRM says the call ended in a sale. Err if the call is unknown or not linked.
    pub fn mark_converted(&mut self, call: &str, now_ms: i64) -> Result<CustomerRecord, CustomerError> {
        let customer: Option<Option<String>> =
            self.conn.query_row("SELECT customer FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?;
        match customer {
            None => Err(CustomerError::BadInput(format!("no call {call} is known here"))),
            Some(None) => Err(CustomerError::BadInput(format!(
                "call {call} has no caller number yet: give it with --caller first"
            ))),
            Some(Some(customer)) => {
                self.add_call_tags(call, &[CONVERTED], now_ms)?;
                self.customer(&customer)?
                    .ok_or_else(|| CustomerError::BadInput(format!("customer of call {call} vanished")))
            }
        }
    }

    pub fn customer(&self, customer: &str) -> Result<Option<CustomerRecord>, CustomerError> {
        let head = self
            .conn
            .query_row("SELECT first_ms, last_ms, calls FROM customer WHERE id = ?1", [customer], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((first_unix_ms, last_unix_ms, calls)) = head else { return Ok(None) };
        let tags = self
            .conn
            .prepare("SELECT tag, first_ms, last_ms, calls FROM customer_tag WHERE customer = ?1 ORDER BY tag")?
            .query_map([customer], |r| {
                Ok(TagRecord { tag: r.get(0)?, first_unix_ms: r.get(1)?, last_unix_ms: r.get(2)?, calls: r.get(3)? })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(CustomerRecord { customer: customer.to_owned(), first_unix_ms, last_unix_ms, calls, tags }))
    }

    /// The customer a call is linked to, if any.
    pub fn customer_of_call(&self, call: &str) -> Result<Option<String>, CustomerError> {
        Ok(self.conn.query_row("SELECT customer FROM call WHERE id = ?1", [call], |r| r.get(0)).optional()?.flatten())
    }

    /// The customer of a call, if the call is linked.
    pub fn of_call(&self, call: &str) -> Result<Option<CustomerRecord>, CustomerError> {
        match self.customer_of_call(call)? {
            Some(c) => self.customer(&c),
            None => Ok(None),
        }
    }

    /// Consent withdrawn: the customer's row, tags, call links and those calls' tags go.
    /// Returns the rows deleted (0 when there was nothing: idempotent).
    pub fn forget(&mut self, customer: &str) -> Result<usize, CustomerError> {
        let tx = self.conn.transaction()?;
        let mut rows =
            tx.execute("DELETE FROM call_tag WHERE call IN (SELECT id FROM call WHERE customer = ?1)", [customer])?;
        rows += tx.execute("DELETE FROM call WHERE customer = ?1", [customer])?;
        rows += tx.execute("DELETE FROM customer_tag WHERE customer = ?1", [customer])?;
        rows += tx.execute("DELETE FROM customer WHERE id = ?1", [customer])?;
        // A change not yet handed over is never sent (the outbox drops what it holds).
        tx.execute("DELETE FROM tag_change WHERE customer = ?1", [customer])?;
        tx.commit()?;
        Ok(rows)
    }

    pub fn customer_count(&self) -> Result<i64, CustomerError> {
        Ok(self.conn.query_row("SELECT count(*) FROM customer", [], |r| r.get(0))?)
    }
}

/// Records, in `tx`, that `customer`'s tags changed (when `tracking`).
fn tag_changed(tracking: bool, tx: &Connection, customer: &str) -> rusqlite::Result<bool> {
    if !tracking {
        return Ok(false);
    }
    tx.execute("INSERT INTO tag_revision (id, last) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET last = last + 1", [])?;
    tx.execute(
        "INSERT INTO tag_change (customer, revision) VALUES (?1, (SELECT last FROM tag_revision WHERE id = 1))
         ON CONFLICT (customer) DO UPDATE SET revision = excluded.revision",
        [customer],
    )?;
    Ok(true)
}

/// Returns whether the customer did not have the tag before.
fn upsert_customer_tag(tx: &Connection, customer: &str, tag: &str, at_ms: i64) -> rusqlite::Result<bool> {
    let had = tx
        .query_row("SELECT 1 FROM customer_tag WHERE customer = ?1 AND tag = ?2", [customer, tag], |_| Ok(()))
        .optional()?
        .is_some();
    tx.execute(
        "INSERT INTO customer_tag (customer, tag, first_ms, last_ms, calls) VALUES (?1, ?2, ?3, ?3, 1)
         ON CONFLICT (customer, tag) DO UPDATE SET
             last_ms = max(last_ms, excluded.last_ms), calls = calls + 1",
        params![customer, tag, at_ms],
    )?;
    Ok(!had)
}

fn touch_customer(tx: &Connection, customer: &str, now_ms: i64, more_calls: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE customer SET last_ms = max(last_ms, ?2), calls = calls + ?3 WHERE id = ?1",
        params![customer, now_ms, more_calls],
    )
}

/// Store requests waiting for the store thread; senders wait beyond this (a handful of
/// rows per call: the queue is never long unless the disk has stalled).
const STORE_QUEUE: usize = 256;

/// One request for the store thread.
enum Job {
    Run(Box<dyn FnOnce(&mut CustomerStore) + Send>),
    /// Tag changes go to HQ through this call store's outbox from now on.
    Uplink(CallVault),
    Close,
}

/// Most changes handed to the call store per round.
const HAND_OVER_BATCH: usize = 256;

/// Hands the waiting tag changes to the call store's outbox and stops tracking them once
/// the store has committed them (a crash between the two sends them again: HQ keeps the
/// highest revision, so a second copy changes nothing). A store that refuses is tried
/// again after the next write.
fn hand_over(store: &mut CustomerStore, vault: &CallVault) {
    while store.tag_changes_waiting() {
        let changes = match store.pending_tag_changes(HAND_OVER_BATCH) {
            Ok(changes) => changes,
            Err(e) => {
                log::error!(component = COMPONENT; "tag changes for HQ not read: {e}");
                return;
            }
        };
        for change in &changes {
            if vault.write_blocking(StoreOp::CustomerTags(change.clone())).is_err() {
                return;
            }
        }
        if let Err(e) = vault.barrier_blocking() {
            log::error!(component = COMPONENT; "tag changes for HQ not confirmed by the call store: {e}");
            return;
        }
        if let Err(e) = store.tag_changes_handed(&changes) {
            log::error!(component = COMPONENT; "tag changes for HQ handed over but still marked waiting: {e}");
            return;
        }
    }
}

/// The shared handle: the caller hasher, and the queue of the one thread that owns the
/// database connection. The understanding component, the spool and the control socket
/// all go through it, so no SQLite call (each write is an fsync) runs on an async worker
/// thread, and writes happen in the order they were sent.
#[derive(Clone)]
pub struct Customers {
    hasher: Arc<CallerHasher>,
    jobs: mpsc::Sender<Job>,
}

/// The store thread: owned by the `customers` component, which closes the store and
/// joins the thread in the last stage of shutdown.
pub struct StoreThread {
    handle: Customers,
    thread: std::thread::JoinHandle<()>,
}

impl Customers {
    /// Opens (creating on first start) the key and the database under the data directory
    /// and starts the store thread.
    pub fn open(data_dir: &Path) -> Result<(Self, StoreThread), CustomerError> {
        move_into_store(data_dir)?;
        let hasher = CallerHasher::load_or_create(&data_dir.join(KEY_FILE))?;
        let mut store = CustomerStore::open(&data_dir.join(DATABASE_FILE))?;
        let (jobs, mut queue) = mpsc::channel::<Job>(STORE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("customer-store".into())
            .spawn(move || {
                let mut uplink: Option<CallVault> = None;
                while let Some(job) = queue.blocking_recv() {
                    match job {
                        Job::Run(job) => job(&mut store),
                        Job::Uplink(vault) => {
                            if let Err(e) = store.track_tag_changes() {
                                log::error!(component = COMPONENT; "tag changes will not reach HQ: {e}");
                                continue;
                            }
                            uplink = Some(vault);
                        }
                        Job::Close => break,
                    }
                    if let Some(vault) = &uplink {
                        hand_over(&mut store, vault);
                    }
                }
                // Dropping the store closes the connection (SQLite checkpoints the WAL).
            })
            .map_err(|e| CustomerError::Task(format!("cannot start the store thread: {e}")))?;
        let handle = Self { hasher: Arc::new(hasher), jobs };
        Ok((handle.clone(), StoreThread { handle, thread }))
    }

    fn job<T: Send + 'static>(
        f: impl FnOnce(&mut CustomerStore) -> Result<T, CustomerError> + Send + 'static,
    ) -> (Job, oneshot::Receiver<Result<T, CustomerError>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job::Run(Box::new(move |store: &mut CustomerStore| {
            let _ = reply.send(f(store));
        }));
        (job, answer)
    }

    /// Runs `f` on the store thread and waits for its answer (async callers).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CustomerStore) -> Result<T, CustomerError> + Send + 'static,
    ) -> Result<T, CustomerError> {
        let (job, answer) = Self::job(f);
        self.jobs.send(job).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// The same from a plain thread (the spool's file processing); never from async code.
    fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CustomerStore) -> Result<T, CustomerError> + Send + 'static,
    ) -> Result<T, CustomerError> {
        let (job, answer) = Self::job(f);
        self.jobs.blocking_send(job).map_err(|_| closed())?;
        answer.blocking_recv().map_err(|_| closed())?
    }

    pub fn customer_id(&self, caller: &str) -> Result<String, CustomerError> {
        self.hasher.customer_id(caller)
    }

    /// With `[hq]` on: every customer's tag change becomes a `customer_tags` message in
    /// the call store's outbox (changes an earlier run left waiting go first).
    pub async fn send_tag_changes_to(&self, vault: CallVault) -> Result<(), CustomerError> {
        self.jobs.send(Job::Uplink(vault)).await.map_err(|_| closed())
    }

    /// Keeps the tags a call raised (and so its customer's, once the caller is known).
    pub async fn add_call_tags(&self, call: &str, tags: &[&'static str]) -> Result<Vec<String>, CustomerError> {
        let (call, tags) = (call.to_owned(), tags.to_vec());
        self.run(move |s| s.add_call_tags(&call, &tags, now_ms())).await
    }

    /// Links a call to its caller (blocking; the spool's sidecar).
    pub fn link_call_blocking(&self, call: &str, caller: &str) -> Result<CustomerRecord, CustomerError> {
        check_call_id(call)?;
        let customer = self.hasher.customer_id(caller)?;
        let call = call.to_owned();
        self.run_blocking(move |s| s.link_call(&call, &customer, now_ms()))
    }

    /// `callbox call info`: links the caller and/or marks the call converted, then says
    /// whose call it is (None when unlinked).
    pub async fn call_info(
        &self,
        call: &str,
        caller: Option<&str>,
        converted: bool,
    ) -> Result<Option<CustomerRecord>, CustomerError> {
        check_call_id(call)?;
        let customer = caller.map(|c| self.hasher.customer_id(c)).transpose()?;
        let call = call.to_owned();
        self.run(move |s| {
            if let Some(customer) = customer {
                s.link_call(&call, &customer, now_ms())?;
            }
            if converted {
                s.mark_converted(&call, now_ms())?;
            }
            s.of_call(&call)
        })
        .await
    }

    /// Erases a customer (by keyed hash, `customer_id`) from the customer store; returns
    /// the rows deleted.
    pub async fn forget(&self, customer: &str) -> Result<usize, CustomerError> {
        let customer = customer.to_owned();
        self.run(move |s| s.forget(&customer)).await
    }

    pub async fn by_caller(&self, caller: &str) -> Result<Option<CustomerRecord>, CustomerError> {
        let customer = self.hasher.customer_id(caller)?;
        self.run(move |s| s.customer(&customer)).await
    }

    pub async fn of_call(&self, call: &str) -> Result<Option<CustomerRecord>, CustomerError> {
        let call = call.to_owned();
        self.run(move |s| s.of_call(&call)).await
    }
}

fn closed() -> CustomerError {
    CustomerError::Task("the customer store is closed (the daemon is stopping)".into())
}

/// The `customers` component: the store runs until the last stage of shutdown, when the
/// writes already queued are done, the connection is closed and the thread joined.
pub async fn run(store: StoreThread, health: HealthBoard, mut shutdown: ShutdownSignal) -> Result<(), CustomerError> {
    health.set(COMPONENT, HealthState::Ok, "open");
    shutdown.wait().await;
    // Queued after every request sent before it: those are written first.
    let _ = store.handle.jobs.send(Job::Close).await;
    let StoreThread { handle, thread } = store;
    drop(handle);
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    health.set(COMPONENT, HealthState::Stopped, "closed");
    match joined {
        Ok(Ok(())) => Ok(()),
        _ => Err(CustomerError::Task("the store thread panicked".into())),
    }
}

fn check_call_id(call: &str) -> Result<(), CustomerError> {
    crate::calls::check_call_id(call).map_err(CustomerError::BadInput)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(r: &CustomerRecord) -> Vec<(&str, i64)> {
        r.tags.iter().map(|t| (t.tag.as_str(), t.calls)).collect()
    }

    #[test]
    fn one_customer_whatever_the_number_looks_like_and_different_keys_differ() {
        let h = CallerHasher::from_secret(b"0123456789abcdef0123456789abcdef");
        let id = h.customer_id("138 0013 8000").unwrap();
        assert_eq!(id.len(), 32);
        for same in ["13800138000", "+86 138-0013-8000", "008613800138000", "8613800138000"] {
            assert_eq!(h.customer_id(same).unwrap(), id, "{same}");
        }
        assert_ne!(h.customer_id("13800138001").unwrap(), id);
        assert!(!id.contains("138"), "the id must not carry the number");
        let other = CallerHasher::from_secret(b"another secret of thirty-two byt");
        assert_ne!(other.customer_id("13800138000").unwrap(), id);
        for bad in ["", "12", "anonymous", "138 0013 8000 ext 5", &"1".repeat(40)] {
            assert!(h.customer_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_key_is_created_private_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let a = CallerHasher::load_or_create(&path).unwrap().customer_id("13800138000").unwrap();
        let b = CallerHasher::load_or_create(&path).unwrap().customer_id("13800138000").unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(CallerHasher::load_or_create(&path), Err(CustomerError::KeyLength { len: 5, .. })));
    }

    #[test]
    fn an_earlier_layout_moves_into_the_store_whole_and_a_stop_half_way_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let hasher = CallerHasher::load_or_create(&data.join(OLD_KEY_FILE)).unwrap();
        let customer = hasher.customer_id("13800138000").unwrap();
        let mut old = CustomerStore::open(&data.join(OLD_DATABASE_FILE)).unwrap();
        old.link_call("c1", &customer, 1_000).unwrap();
        old.add_call_tags("c1", &["high_intent"], 2_000).unwrap();
        // Left open (its WAL holds the commits) and copied as a crash would leave it.
        let wal = std::fs::read(data.join("customers.sqlite-wal")).unwrap();
        assert!(!wal.is_empty(), "the commits are in the WAL: the move must carry it");
        let snapshot = tempfile::tempdir().unwrap();
        for f in ["customers.sqlite", "customers.sqlite-wal"] {
            std::fs::copy(data.join(f), snapshot.path().join(f)).unwrap();
        }
        std::mem::forget(old); // no checkpoint at close: the WAL stays the only copy
        std::fs::remove_file(data.join("customers.sqlite-shm")).ok();
        for f in ["customers.sqlite", "customers.sqlite-wal"] {
            std::fs::copy(snapshot.path().join(f), data.join(f)).unwrap();
        }
        // A stop half-way: the key and the WAL moved, the database not yet.
        std::fs::create_dir_all(data.join("store")).unwrap();
        std::fs::rename(data.join(OLD_KEY_FILE), data.join(KEY_FILE)).unwrap();
        std::fs::rename(data.join("customers.sqlite-wal"), data.join("store/customers.sqlite-wal")).unwrap();
        move_into_store(data).unwrap();
        assert!(!data.join(OLD_DATABASE_FILE).exists() && !data.join(OLD_KEY_FILE).exists());
        let moved = CustomerStore::open(&data.join(DATABASE_FILE)).unwrap();
        let record = moved.customer(&customer).unwrap().expect("the customer moved with the WAL");
        assert_eq!((record.calls, record.tags[0].tag.as_str()), (1, "high_intent"));
        let again = CallerHasher::load_or_create(&data.join(KEY_FILE)).unwrap();
        assert_eq!(again.customer_id("+86 138-0013-8000").unwrap(), customer, "the same key moved");
        move_into_store(data).unwrap(); // nothing left to do

        // Both an old and a new file: refused, nothing touched.
        std::fs::write(data.join(OLD_KEY_FILE), [1u8; KEY_BYTES]).unwrap();
        let err = move_into_store(data).unwrap_err().to_string();
        assert!(err.contains("both") && err.contains("caller-hash.key"), "{err}");
        assert!(data.join(OLD_KEY_FILE).exists() && data.join(KEY_FILE).exists());
    }

    #[test]
    fn a_customer_gaining_a_tag_waits_for_hq_until_handed_over_with_a_growing_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("customers.sqlite");
        let mut s = CustomerStore::open(&path).unwrap();
        // Not tracked without [hq]: nothing waits.
        s.link_call("c0", "early", 500).unwrap();
        s.add_call_tags("c0", &["price_sensitive"], 600).unwrap();
        s.track_tag_changes().unwrap();
        assert!(!s.tag_changes_waiting());
        s.add_call_tags("c1", &["price_sensitive"], 1_000).unwrap();
        assert!(!s.tag_changes_waiting(), "an unlinked call's tags are nobody's");
        s.link_call("c1", "cust", 2_000).unwrap();
        assert!(s.tag_changes_waiting());
        let first = s.pending_tag_changes(10).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].customer.as_str(), first[0].tags.as_slice(), first[0].calls),
            ("cust", &["price_sensitive".to_owned()][..], 1)
        );
        // A tag the customer has already changes nothing; a new one is a newer revision
        // of the same row (one per customer), with every tag.
        s.add_call_tags("c1", &["price_sensitive"], 2_500).unwrap();
        assert_eq!(s.pending_tag_changes(10).unwrap(), first);
        s.add_call_tags("c1", &["high_intent"], 3_000).unwrap();
        let second = s.pending_tag_changes(10).unwrap();
        assert_eq!(second.len(), 1);
        assert!(second[0].revision > first[0].revision);
        assert_eq!(second[0].tags, ["high_intent", "price_sensitive"]);
        // Handing over the older revision leaves the newer one waiting.
        s.tag_changes_handed(&first).unwrap();
        assert!(s.tag_changes_waiting());
        // A restart finds what was not handed over.
        drop(s);
        let mut s = CustomerStore::open(&path).unwrap();
        s.track_tag_changes().unwrap();
        assert!(s.tag_changes_waiting());
        assert_eq!(s.pending_tag_changes(10).unwrap(), second);
        s.tag_changes_handed(&second).unwrap();
        assert!(!s.tag_changes_waiting());
        // A forgotten customer's waiting change is never sent.
        s.link_call("c2", "gone", 4_000).unwrap();
        s.add_call_tags("c2", &["complaint_risk"], 4_100).unwrap();
        s.forget("gone").unwrap();
        assert!(s.pending_tag_changes(10).unwrap().is_empty());
    }

    #[test]
    fn a_version_1_customer_database_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("customers.sqlite");
        let mut s = CustomerStore::open(&path).unwrap();
        s.link_call("c1", "cust", 1).unwrap();
        s.conn.execute_batch("DROP TABLE tag_change; DROP TABLE tag_revision; PRAGMA user_version = 1;").unwrap();
        drop(s);
        let mut s = CustomerStore::open(&path).unwrap();
        s.track_tag_changes().unwrap();
        s.add_call_tags("c1", &["high_intent"], 2).unwrap();
        assert_eq!(s.pending_tag_changes(10).unwrap()[0].tags, ["high_intent"]);
        assert_eq!(s.customer("cust").unwrap().unwrap().calls, 1);
    }

    #[test]
    fn tags_follow_the_customer_across_calls_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("customers.sqlite");
        let mut s = CustomerStore::open(&path).unwrap();
        // Call 1: tags before and after the caller is known.
        assert_eq!(s.add_call_tags("c1", &["price_sensitive"], 1_000).unwrap(), ["price_sensitive"]);
        let r = s.link_call("c1", "cust", 2_000).unwrap();
        assert_eq!((r.calls, names(&r)), (1, vec![("price_sensitive", 1)]));
        assert_eq!(s.add_call_tags("c1", &["price_sensitive", "high_intent"], 3_000).unwrap(), ["high_intent"]);
        // Call 2 raises price_sensitive again and complaint_risk.
        s.link_call("c2", "cust", 10_000).unwrap();
        s.add_call_tags("c2", &["price_sensitive", "complaint_risk"], 11_000).unwrap();
        // An unlinked call's tags are nobody's.
        s.add_call_tags("c3", &["do_not_call"], 12_000).unwrap();
        drop(s);
        let mut s = CustomerStore::open(&path).unwrap();
        let r = s.customer("cust").unwrap().unwrap();
        assert_eq!(r.calls, 2);
        assert_eq!(names(&r), [("complaint_risk", 1), ("high_intent", 1), ("price_sensitive", 2)]);
        let price = &r.tags[2];
        assert_eq!((price.first_unix_ms, price.last_unix_ms), (1_000, 11_000));
        assert_eq!(s.customer_count().unwrap(), 1);
        // Linking again is idempotent; to someone else is refused.
        assert_eq!(s.link_call("c1", "cust", 20_000).unwrap().calls, 2);
        assert!(s.link_call("c1", "other", 20_000).is_err());
        // converted comes by call id, after the call.
        assert!(s.mark_converted("c3", 30_000).is_err(), "c3 has no caller");
        assert!(s.mark_converted("nope", 30_000).is_err());
        let r = s.mark_converted("c2", 30_000).unwrap();
        assert!(r.tags.iter().any(|t| t.tag == CONVERTED));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Consent withdrawn: the customer, their tags, their calls and those calls' tags go;
        // an unlinked call stays; a second time deletes nothing.
        assert!(s.forget("cust").unwrap() > 0);
        assert_eq!(s.customer("cust").unwrap(), None);
        assert_eq!(s.customer_of_call("c1").unwrap(), None);
        let left: i64 =
            s.conn.query_row("SELECT count(*) FROM call_tag WHERE call IN ('c1','c2')", [], |r| r.get(0)).unwrap();
        assert_eq!(left, 0);
        let kept: i64 = s.conn.query_row("SELECT count(*) FROM call_tag WHERE call = 'c3'", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 1);
        assert_eq!(s.forget("cust").unwrap(), 0);
    }
}
