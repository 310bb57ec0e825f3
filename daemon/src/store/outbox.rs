//! The headquarters outbox inside `calls.sqlite`: every message HQ must get is a row here,
//! written in the same transaction as the store data it reports, so a crash can never
//! leave a call stored but unreported, or reported but not stored. A row leaves only when
//! HQ acknowledges its id (`delete`), or when its lane must shed, and then a gap record
//! says which sequence numbers went. The rules (lanes, quotas, ids) are the pure
//! `uplink::outbox`; this is their SQLite end.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use super::StoreError;
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

/// What the store needs to write outbox rows (from `[hq]`); without it nothing is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    /// Bytes per lane, in `Lane::ALL` order.
    pub quotas: [u64; 5],
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
        Ok(Self { ledger: Ledger::new(settings.quotas, lanes), dirty: false, shed: 0 })
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
    insert(tx, ledger, &id, lane, admit.seq, kind, &body, now_ms)?;
    Ok(shed_count)
}

#[allow(clippy::too_many_arguments)]
fn insert(
    tx: &Transaction<'_>,
    ledger: &mut Ledger,
    id: &str,
    lane: Lane,
    seq: u64,
    kind: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO outbox (id, lane, seq, kind, topic, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, lane.index() as i64, seq as i64, kind, topic_suffix(lane, kind), body, now_ms],
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
    let seq = ledger.take_seq(lane);
    let id = message_id(now_ms, random_variant(random));
    let body = serde_json::to_vec(&Envelope {
        v: 1,
        id: id.clone(),
        lane,
        seq,
        kind: GAP_KIND.into(),
        at_unix_ms: now_ms,
        data: &gap,
    })
    .map_err(|e| StoreError::BadInput { call: "-".into(), what: format!("gap record: {e}") })?;
    insert(tx, ledger, &id, lane, seq, GAP_KIND, &body, now_ms)?;
    log::warn!(component = "store", lane = lane.name();
        "outbox lane {} is full: {shed_now} more messages shed ({} in all, seq {}..={}), reported to HQ as a gap", lane.name(), gap.count, gap.from_seq, gap.to_seq);
    Ok(shed_now)
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
