//! The headquarters outbox inside `calls.sqlite`: every message HQ must get is a row here,
//! written in the same transaction as the store data it reports, so a crash can never
//! leave a call stored but unreported, or reported but not stored. A row leaves only when
//! HQ acknowledges its id (`delete`), or when its lane must shed, and then a gap record
//! says which sequence numbers went. The rules (lanes, quotas, ids) are the pure
//! `uplink::outbox`; this is their SQLite end.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use super::StoreError;
use crate::uplink::aggregates::{window_start, AggregateKey, CallFacts, Counters, IntervalReport};
use crate::uplink::outbox::{
    message_id, topic_suffix, Envelope, Gap, Lane, LaneBook, Ledger, GAP_KIND, MAX_BODY_BYTES,
};

pub(super) const SCHEMA: &str = "
    CREATE TABLE outbox (
        id TEXT PRIMARY KEY, lane INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
        topic TEXT NOT NULL, body BLOB NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER,
        UNIQUE (lane, seq));
    CREATE TABLE outbox_lane (lane INTEGER PRIMARY KEY, next_seq INTEGER NOT NULL);
";

/// Open aggregate windows (one row per key, its counters as JSON) and the end of the last
/// window emitted, which is never reopened.
pub(super) const AGGREGATE_SCHEMA: &str = "
    CREATE TABLE aggregate (key TEXT PRIMARY KEY, ends_ms INTEGER NOT NULL, counters TEXT NOT NULL);
    CREATE INDEX aggregate_ends ON aggregate (ends_ms);
    CREATE TABLE aggregate_closed (id INTEGER PRIMARY KEY CHECK (id = 1), until_ms INTEGER NOT NULL);
";

/// What the store needs to write outbox rows (from `[hq]`); without it nothing is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    /// Bytes per lane, in `Lane::ALL` order.
    pub quotas: [u64; 5],
    /// The aggregates' keys: the box's ids, the window length, the models' version.
    pub site: String,
    pub box_id: String,
    pub window_secs: u32,
    pub models_version: String,
}

impl OutboxSettings {
    /// For tests and benchmarks: quotas and placeholders.
    pub fn with_quotas(quotas: [u64; 5]) -> Self {
        Self { quotas, site: "site".into(), box_id: "box".into(), window_secs: 300, models_version: "-".into() }
    }
}

/// A row as the uplink sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: String,
    pub lane: Lane,
    pub seq: u64,
    /// Under the box's topic prefix (`up/calls/call`, `gap`).
    pub topic: String,
    pub body: Vec<u8>,
}

/// One lane's backlog (`callbox hq status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneBacklog {
    pub lane: Lane,
    pub rows: u64,
    pub bytes: u64,
    pub oldest_created_ms: Option<i64>,
    pub next_seq: u64,
}

/// A row's metadata (`callbox hq outbox`): never its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxEntry {
    pub id: String,
    pub lane: Lane,
    pub seq: u64,
    pub kind: String,
    pub bytes: u64,
    pub created_ms: i64,
}

/// The outbox's live state in the store: the ledger and a flag the store thread reads
/// after each commit to wake the uplink.
pub(super) struct Outbox {
    pub settings: OutboxSettings,
    pub ledger: Ledger,
    /// Rows were added since the uplink was last woken.
    pub dirty: bool,
    /// Messages shed since the store opened (for status).
    pub shed: u64,
}

impl Outbox {
    pub fn load(conn: &Connection, settings: &OutboxSettings) -> Result<Self, StoreError> {
        let mut lanes = [LaneBook::default(); 5];
        let mut stmt =
            conn.prepare("SELECT lane, count(*), coalesce(sum(length(body)), 0) FROM outbox GROUP BY lane")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        for row in rows {
            let (lane, count, bytes) = row?;
            if let Some(lane) = Lane::from_index(lane) {
                lanes[lane.index()].rows = count as u64;
                lanes[lane.index()].bytes = bytes as u64;
            }
        }
        let mut stmt = conn.prepare("SELECT lane, next_seq FROM outbox_lane")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (lane, next) = row?;
            if let Some(lane) = Lane::from_index(lane) {
                lanes[lane.index()].next_seq = next as u64;
            }
        }
        Ok(Self { settings: settings.clone(), ledger: Ledger::new(settings.quotas, lanes), dirty: false, shed: 0 })
    }
}

/// Queues one message in `tx`: sheds what the ledger says (oldest first, a gap record for
/// them), inserts the row and advances the lane's sequence. `ledger` is the batch's copy:
/// the caller keeps it only if the transaction commits. Returns how many messages were shed.
pub(super) fn enqueue<T: Serialize>(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    lane: Lane,
    kind: &str,
    data: &T,
    now_ms: i64,
    random: [u8; 8],
) -> Result<u64, StoreError> {
    enqueue_until(tx, ledger, (lane, kind), data, now_ms, None, random)
}

/// `enqueue` for a message worth sending only until `expires_ms` (diagnostics): later it
/// leaves unsent, reported in a gap record (`expire`).
pub(super) fn enqueue_until<T: Serialize>(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    (lane, kind): (Lane, &str),
    data: &T,
    now_ms: i64,
    expires_ms: Option<i64>,
    random: [u8; 8],
) -> Result<u64, StoreError> {
    let id = message_id(now_ms, random);
    // The sequence number is only known after admission; the body's size hardly depends
    // on it, so size with a placeholder and admit before the real body is made.
    let probe = serde_json::to_vec(&Envelope {
        v: 1,
        id: id.clone(),
        lane,
        seq: u64::MAX,
        kind: kind.into(),
        at_unix_ms: now_ms,
        data,
    })
    .map_err(|e| StoreError::BadInput { call: "-".into(), what: format!("outbox message {kind}: {e}") })?;
    if probe.len() > MAX_BODY_BYTES {
        return Err(StoreError::BadInput {
            call: "-".into(),
            what: format!("an outbox message of kind {kind} has {} bytes (at most {MAX_BODY_BYTES})", probe.len()),
        });
    }
    let admit = ledger.admit(lane, probe.len() as u64);
    let mut shed_count = 0;
    for shed in &admit.shed {
        shed_count += shed_oldest(tx, ledger, shed.lane, shed.bytes, now_ms, random)?;
    }
    let body = serde_json::to_vec(&Envelope {
        v: 1,
        id: id.clone(),
        lane,
        seq: admit.seq,
        kind: kind.into(),
        at_unix_ms: now_ms,
        data,
    })
    .map_err(|e| StoreError::BadInput { call: "-".into(), what: format!("outbox message {kind}: {e}") })?;
    insert(tx, ledger, (&id, lane, admit.seq, kind), &body, now_ms, expires_ms)?;
    Ok(shed_count)
}

fn insert(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    (id, lane, seq, kind): (&str, Lane, u64, &str),
    body: &[u8],
    now_ms: i64,
    expires_ms: Option<i64>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO outbox (id, lane, seq, kind, topic, body, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![id, lane.index() as i64, seq as i64, kind, topic_suffix(lane, kind), body, now_ms, expires_ms],
    )?;
    tx.execute(
        "INSERT INTO outbox_lane (lane, next_seq) VALUES (?1, ?2)
         ON CONFLICT (lane) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
        params![lane.index() as i64, (seq + 1) as i64],
    )?;
    ledger.added(lane, body.len() as u64);
    Ok(())
}

/// Deletes the lane's oldest rows until `bytes` are freed and writes one gap record for
/// them (earlier gap records of the lane are folded in). Returns how many messages of data
/// were shed now.
fn shed_oldest(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    lane: Lane,
    bytes: u64,
    now_ms: i64,
    random: [u8; 8],
) -> Result<u64, StoreError> {
    let mut freed = 0u64;
    let mut shed_now = 0u64;
    let mut gap: Option<Gap> = None;
    let mut gone = Vec::new();
    {
        let mut stmt = tx.prepare("SELECT id, seq, kind, body FROM outbox WHERE lane = ?1 ORDER BY seq")?;
        let mut rows = stmt.query([lane.index() as i64])?;
        while freed < bytes {
            let Some(row) = rows.next()? else { break };
            let (id, seq, kind, body): (String, i64, String, Vec<u8>) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            let seq = seq as u64;
            let this = if kind == GAP_KIND {
                match serde_json::from_slice::<Envelope<Gap>>(&body) {
                    Ok(earlier) => earlier.data,
                    // Not ours to read: count it as the one message it stands for.
                    Err(_) => Gap { lane, from_seq: seq, to_seq: seq, count: 1, why: "quota".into() },
                }
            } else {
                shed_now += 1;
                Gap { lane, from_seq: seq, to_seq: seq, count: 1, why: "quota".into() }
            };
            match &mut gap {
                Some(g) => g.fold(&this),
                None => gap = Some(this),
            }
            freed += body.len() as u64;
            gone.push(id);
        }
    }
    let Some(mut gap) = gap else { return Ok(0) };
    // Earlier gap records of the lane still waiting fold into this one, so a lane has at
    // most one: its range covers theirs (HQ takes the sequence numbers it never got in
    // the range as missing; the count is what was shed in all of them).
    {
        let mut stmt = tx.prepare("SELECT id, body FROM outbox WHERE lane = ?1 AND kind = ?2")?;
        let rows = stmt.query_map(params![lane.index() as i64, GAP_KIND], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (id, body) = row?;
            if gone.contains(&id) {
                continue;
            }
            if let Ok(earlier) = serde_json::from_slice::<Envelope<Gap>>(&body) {
                gap.fold(&earlier.data);
                freed += body.len() as u64;
                gone.push(id);
            }
        }
    }
    for id in &gone {
        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
    }
    ledger.removed(lane, freed, gone.len() as u64);
    insert_gap(tx, ledger, &gap, now_ms, random_variant(random))?;
    log::warn!(component = "store", lane = lane.name();
        "outbox lane {} is full: {shed_now} more messages shed ({} in all, seq {}..={}), reported to HQ as a gap", lane.name(), gap.count, gap.from_seq, gap.to_seq);
    Ok(shed_now)
}

/// Queues a gap record for `gap` under the lane's next sequence number.
fn insert_gap(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    gap: &Gap,
    now_ms: i64,
    random: [u8; 8],
) -> Result<(), StoreError> {
    let seq = ledger.take_seq(gap.lane);
    let id = message_id(now_ms, random);
    let body = serde_json::to_vec(&Envelope {
        v: 1,
        id: id.clone(),
        lane: gap.lane,
        seq,
        kind: GAP_KIND.into(),
        at_unix_ms: now_ms,
        data: gap,
    })
    .map_err(|e| StoreError::BadInput { call: "-".into(), what: format!("gap record: {e}") })?;
    insert(tx, ledger, (&id, gap.lane, seq, GAP_KIND), &body, now_ms, None)
}

/// Another id's randomness from the same draw (a gap record and the message that caused
/// it are made in the same millisecond).
fn random_variant(mut random: [u8; 8]) -> [u8; 8] {
    for b in &mut random {
        *b = !*b;
    }
    random
}

/// Rows not yet sent on this connection: per lane, those after `after[lane]`, lanes in
/// priority order, at most `limit`.
pub(super) fn page(conn: &Connection, after: [u64; 5], limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
    let mut out = Vec::new();
    let mut stmt = conn
        .prepare_cached("SELECT id, seq, topic, body FROM outbox WHERE lane = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
    for lane in Lane::ALL {
        if out.len() >= limit {
            break;
        }
        let rows = stmt.query_map(
            params![lane.index() as i64, after[lane.index()] as i64, (limit - out.len()) as i64],
            |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    lane,
                    seq: r.get::<_, i64>(1)? as u64,
                    topic: r.get(2)?,
                    body: r.get(3)?,
                })
            },
        )?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Removes acknowledged rows (ids not here are already gone: a second ack is a no-op).
/// Returns how many were removed.
pub(super) fn delete(conn: &mut Connection, ledger: &mut Ledger, ids: &[String]) -> Result<usize, StoreError> {
    let tx = conn.transaction()?;
    let mut removed = Vec::new();
    {
        let mut find = tx.prepare_cached("SELECT lane, length(body) FROM outbox WHERE id = ?1")?;
        let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        for id in ids {
            let found: Option<(i64, i64)> = find.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            if let Some((lane, bytes)) = found {
                del.execute([id])?;
                if let Some(lane) = Lane::from_index(lane) {
                    removed.push((lane, bytes as u64));
                }
            }
        }
    }
    tx.commit()?;
    for (lane, bytes) in &removed {
        ledger.removed(*lane, *bytes, 1);
    }
    Ok(removed.len())
}

pub(super) fn backlog(conn: &Connection, ledger: &Ledger) -> Result<Vec<LaneBacklog>, StoreError> {
    let mut out = Vec::new();
    let mut stmt = conn.prepare_cached("SELECT min(created_ms) FROM outbox WHERE lane = ?1")?;
    for lane in Lane::ALL {
        let oldest: Option<i64> = stmt.query_row([lane.index() as i64], |r| r.get(0))?;
        let book = ledger.book(lane);
        out.push(LaneBacklog {
            lane,
            rows: book.rows,
            bytes: book.bytes,
            oldest_created_ms: oldest,
            next_seq: book.next_seq,
        });
    }
    Ok(out)
}

pub(super) fn entries(conn: &Connection, lane: Option<Lane>, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, lane, seq, kind, length(body), created_ms FROM outbox
         WHERE ?1 IS NULL OR lane = ?1 ORDER BY lane, seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![lane.map(|l| l.index() as i64), limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, lane, seq, kind, bytes, created_ms) = row?;
        if let Some(lane) = Lane::from_index(lane) {
            out.push(OutboxEntry { id, lane, seq: seq as u64, kind, bytes: bytes as u64, created_ms });
        }
    }
    Ok(out)
}

/// Drops unsent rows whose body names `customer` (a keyed hash: hex, so a byte search
/// cannot match inside another value). Returns how many went.
pub(super) fn purge_mentions(tx: &Transaction<'_>, ledger: &mut Ledger, customer: &str) -> Result<u64, StoreError> {
    let needle = format!("\"customer\":\"{customer}\"");
    let rows: Vec<(String, i64, i64)> = tx
        .prepare("SELECT id, lane, length(body) FROM outbox WHERE instr(body, CAST(?1 AS BLOB)) > 0")?
        .query_map([&needle], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (id, lane, bytes) in &rows {
        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
        if let Some(lane) = Lane::from_index(*lane) {
            ledger.removed(lane, *bytes as u64, 1);
        }
    }
    Ok(rows.len() as u64)
}

/// The end of the last aggregate window emitted (0: none yet).
fn closed_until(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT until_ms FROM aggregate_closed WHERE id = 1", [], |r| r.get(0)).optional()?.unwrap_or(0))
}

/// Who a call was, as its aggregate window is keyed: agent pseudonym, campaign, script,
/// rules' version.
pub(super) struct CallDims<'a> {
    pub call: &'a str,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    pub rules_version: Option<&'a str>,
}

/// Adds a finished call to its aggregate window's counters, in the call's transaction:
/// the window the box finished it in (aligned), keyed by the call's dimensions and the
/// models' version.
pub(super) fn count_in_window(
    tx: &Transaction<'_>,
    settings: &OutboxSettings,
    dims: CallDims<'_>,
    facts: &CallFacts,
    now_ms: i64,
) -> Result<(), StoreError> {
    update_window(tx, settings, dims, now_ms, |c| c.add_call(facts))
}

/// A call already finished (and counted) is said converted later: counted as such in the
/// window in which the box learned it, under the call's own dimensions.
pub(super) fn count_late_conversion(
    tx: &Transaction<'_>,
    settings: &OutboxSettings,
    dims: CallDims<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    update_window(tx, settings, dims, now_ms, |c| c.converted_after_end += 1)
}

fn update_window(
    tx: &Transaction<'_>,
    settings: &OutboxSettings,
    dims: CallDims<'_>,
    now_ms: i64,
    change: impl FnOnce(&mut Counters),
) -> Result<(), StoreError> {
    let key = AggregateKey {
        site: settings.site.clone(),
        box_id: settings.box_id.clone(),
        window_start_unix_ms: window_start(now_ms, settings.window_secs, closed_until(tx)?),
        window_secs: settings.window_secs,
        agent: dims.agent,
        campaign: dims.campaign,
        script: dims.script,
        rules_version: dims.rules_version.unwrap_or("-").to_owned(),
        models_version: settings.models_version.clone(),
    };
    let bad =
        |e: serde_json::Error| StoreError::BadInput { call: dims.call.to_owned(), what: format!("aggregate: {e}") };
    let key_text = serde_json::to_string(&key).map_err(bad)?;
    let stored: Option<String> =
        tx.query_row("SELECT counters FROM aggregate WHERE key = ?1", [&key_text], |r| r.get(0)).optional()?;
    let mut counters = match stored {
        // Counters this version cannot read (written by another) start again rather than
        // stopping every call's write; the loss is logged.
        Some(text) => serde_json::from_str::<Counters>(&text).unwrap_or_else(|e| {
            log::error!(component = "store"; "aggregate window {key_text}: stored counters unreadable ({e}); counting from zero");
            Counters::default()
        }),
        None => Counters::default(),
    };
    change(&mut counters);
    tx.execute(
        "INSERT INTO aggregate (key, ends_ms, counters) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET counters = excluded.counters",
        params![key_text, key.window_end_unix_ms(), serde_json::to_string(&counters).map_err(bad)?],
    )?;
    Ok(())
}

/// What one housekeeping round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxTick {
    /// Aggregate windows queued.
    pub windows: u64,
    /// Unsent messages past their expiry, dropped (and reported in a gap record).
    pub expired: u64,
    /// Messages shed to make room.
    pub shed: u64,
}

/// Drops the unsent messages whose expiry has passed, one gap record (`expired`) per lane
/// for them. Returns how many went.
fn expire(tx: &Transaction<'_>, ledger: &mut Ledger, now_ms: i64, random: [u8; 8]) -> Result<u64, StoreError> {
    let gone: Vec<(String, i64, i64, i64)> = tx
        .prepare("SELECT id, lane, seq, length(body) FROM outbox WHERE expires_ms <= ?1 ORDER BY lane, seq")?
        .query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let mut gaps: Vec<Gap> = Vec::new();
    for (id, lane, seq, bytes) in &gone {
        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
        let Some(lane) = Lane::from_index(*lane) else { continue };
        ledger.removed(lane, *bytes as u64, 1);
        let this = Gap { lane, from_seq: *seq as u64, to_seq: *seq as u64, count: 1, why: "expired".into() };
        match gaps.iter_mut().find(|g| g.lane == lane) {
            Some(g) => g.fold(&this),
            None => gaps.push(this),
        }
    }
    for (i, gap) in gaps.iter().enumerate() {
        let mut random = random;
        random[0] ^= i as u8;
        insert_gap(tx, ledger, gap, now_ms, random)?;
        log::warn!(component = "store", lane = gap.lane.name();
            "{} unsent {} messages expired (seq {}..={}), reported to HQ as a gap", gap.count, gap.lane.name(), gap.from_seq, gap.to_seq);
    }
    Ok(gone.len() as u64)
}

/// Housekeeping, in one transaction: drops expired messages (`expire`), then queues every
/// aggregate window that has ended by `now_ms` (one `interval` message per key, in the
/// `aggregates` lane) and removes it; windows before the current one are never reopened.
pub(super) fn tick(
    conn: &mut Connection,
    ledger: &mut Ledger,
    settings: &OutboxSettings,
    now_ms: i64,
    random: impl Fn() -> Result<[u8; 8], StoreError>,
) -> Result<OutboxTick, StoreError> {
    let tx = conn.transaction()?;
    let mut work = ledger.clone();
    let expired = expire(&tx, &mut work, now_ms, random()?)?;
    let due: Vec<(String, String)> = tx
        .prepare("SELECT key, counters FROM aggregate WHERE ends_ms <= ?1 ORDER BY ends_ms, key")?
        .query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let (mut queued, mut shed) = (0u64, 0u64);
    for (key_text, counters) in &due {
        tx.execute("DELETE FROM aggregate WHERE key = ?1", [key_text])?;
        let parsed = serde_json::from_str::<AggregateKey>(key_text)
            .and_then(|key| Ok((key, serde_json::from_str::<Counters>(counters)?)));
        let (key, counters) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                log::error!(component = "store"; "aggregate window {key_text} unreadable ({e}): dropped");
                continue;
            }
        };
        let report = IntervalReport::new(key, counters);
        shed += enqueue(&tx, &mut work, Lane::Aggregates, "interval", &report, now_ms, random()?)?;
        queued += 1;
    }
    let open_from = window_start(now_ms, settings.window_secs, closed_until(&tx)?);
    tx.execute(
        "INSERT INTO aggregate_closed (id, until_ms) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)",
        [open_from],
    )?;
    tx.commit()?;
    *ledger = work;
    Ok(OutboxTick { windows: queued, expired, shed })
}
