//! The outbox's rules (pure): the lanes in priority order, per-lane sequence numbers, byte
//! quotas and what to shed when a lane is full, message ids and the wire envelope.
//!
//! The store (`store::outbox`) keeps the rows in `calls.sqlite`, written in the same
//! transaction as the data they report; this core decides numbers and shedding from a
//! [`Ledger`] of per-lane totals, so the store can try a batch on a copy and keep the copy
//! only when the transaction commits.

use serde::{Deserialize, Serialize};

/// Where a message waits, in the order lanes are sent: a lane with a backlog never holds
/// up a lane before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Real-time events (supervisor alert, transfer to a human, do-not-call, lead): sent
    /// first, shed only when nothing else is left to shed.
    Alert,
    /// Rule hits without an event, erasure notices.
    Compliance,
    /// One summary per finished call.
    Calls,
    /// Per-interval metrics, idempotent by key.
    Aggregates,
    /// Health: shed first.
    Diagnostics,
}

impl Lane {
    pub const ALL: [Lane; 5] = [Lane::Alert, Lane::Compliance, Lane::Calls, Lane::Aggregates, Lane::Diagnostics];

    pub fn name(self) -> &'static str {
        match self {
            Lane::Alert => "alert",
            Lane::Compliance => "compliance",
            Lane::Calls => "calls",
            Lane::Aggregates => "aggregates",
            Lane::Diagnostics => "diagnostics",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: i64) -> Option<Lane> {
        usize::try_from(i).ok().and_then(|i| Lane::ALL.get(i).copied())
    }

    pub fn parse(name: &str) -> Option<Lane> {
        Lane::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// The largest body one message may have: a call summary is a few kB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// One lane's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneBook {
    /// The sequence number the next message of the lane gets (from 1; never reused).
    pub next_seq: u64,
    pub bytes: u64,
    pub rows: u64,
}

/// Bytes to free from a lane's oldest messages before a new one goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub lane: Lane,
    pub bytes: u64,
}

/// What `Ledger::admit` decided for a new message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admit {
    /// Its sequence number in its lane.
    pub seq: u64,
    /// The oldest messages to shed first, lane by lane (each shed range is reported in a
    /// gap message of its lane).
    pub shed: Vec<Shed>,
}

/// Per-lane totals and quotas: which sequence number a message gets and what must make
/// room for it. Bounded: the outbox never holds more than the sum of the quotas (plus one
/// message), whatever the broker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    lanes: [LaneBook; 5],
    quotas: [u64; 5],
}

/// The order lanes give up room to an alert: diagnostics first, compliance last.
const ALERT_BORROWS_FROM: [Lane; 4] = [Lane::Diagnostics, Lane::Aggregates, Lane::Calls, Lane::Compliance];

impl Ledger {
    /// `lanes` as found in the store (next sequence numbers from 1).
    pub fn new(quotas: [u64; 5], mut lanes: [LaneBook; 5]) -> Self {
        for book in &mut lanes {
            book.next_seq = book.next_seq.max(1);
        }
        Self { lanes, quotas }
    }

    pub fn book(&self, lane: Lane) -> LaneBook {
        self.lanes[lane.index()]
    }

    fn cap(&self) -> u64 {
        self.quotas.iter().sum()
    }

    fn total(&self) -> u64 {
        self.lanes.iter().map(|b| b.bytes).sum()
    }

    /// A new message of `bytes` for `lane`: its sequence number and what to shed first.
    /// A lane other than `alert` keeps within its quota, and within what alerts leave of
    /// the whole; alerts may use the whole outbox, taking room from the other lanes
    /// (diagnostics first) before they shed an older alert.
    pub fn admit(&mut self, lane: Lane, bytes: u64) -> Admit {
        let seq = self.take_seq(lane);
        let book = self.lanes[lane.index()];
        let mut shed = Vec::new();
        if lane == Lane::Alert {
            let mut excess = (self.total() + bytes).saturating_sub(self.cap());
            for other in ALERT_BORROWS_FROM.into_iter().chain([Lane::Alert]) {
                if excess == 0 {
                    break;
                }
                let take = excess.min(self.lanes[other.index()].bytes);
                if take > 0 {
                    shed.push(Shed { lane: other, bytes: take });
                    excess -= take;
                }
            }
        } else {
            let others = self.total() - book.bytes;
            let limit = self.quotas[lane.index()].min(self.cap().saturating_sub(others));
            let excess = (book.bytes + bytes).saturating_sub(limit);
            if excess > 0 && book.bytes > 0 {
                shed.push(Shed { lane, bytes: excess.min(book.bytes) });
            }
        }
        Admit { seq, shed }
    }

    /// A sequence number for a message that needs no room check (a gap record).
    pub fn take_seq(&mut self, lane: Lane) -> u64 {
        let book = &mut self.lanes[lane.index()];
        let seq = book.next_seq;
        book.next_seq += 1;
        seq
    }

    pub fn added(&mut self, lane: Lane, bytes: u64) {
        let book = &mut self.lanes[lane.index()];
        book.bytes += bytes;
        book.rows += 1;
    }

    pub fn removed(&mut self, lane: Lane, bytes: u64, rows: u64) {
        let book = &mut self.lanes[lane.index()];
        book.bytes = book.bytes.saturating_sub(bytes);
        book.rows = book.rows.saturating_sub(rows);
    }
}

/// A message id: 12 hex digits of milliseconds since the epoch, then 16 random ones, so
/// ids sort by creation time and two boxes never make the same one.
pub fn message_id(now_unix_ms: i64, random: [u8; 8]) -> String {
    let ms = u64::try_from(now_unix_ms).unwrap_or(0) & 0xffff_ffff_ffff;
    format!("{ms:012x}{}", crate::hex::encode(&random))
}

/// What every message carries, around its kind's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<T> {
    /// The wire version of the payloads (the topic tree's `v1`).
    pub v: u32,
    pub id: String,
    pub lane: Lane,
    pub seq: u64,
    pub kind: String,
    pub at_unix_ms: i64,
    pub data: T,
}

/// The topic suffix a message goes to under the box's prefix.
pub fn topic_suffix(lane: Lane, kind: &str) -> String {
    if kind == GAP_KIND {
        "gap".to_owned()
    } else {
        format!("up/{}/{kind}", lane.name())
    }
}

pub const GAP_KIND: &str = "gap";

/// A gap record: messages of a lane that were shed rather than sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub lane: Lane,
    /// The sequence range the missing messages lie in (earlier gap records of the lane
    /// that were still unsent are folded in).
    pub from_seq: u64,
    pub to_seq: u64,
    /// How many messages of data are missing.
    pub count: u64,
    /// `quota` (the lane was full) or `expired`.
    pub why: String,
}

impl Gap {
    /// Folds another gap of the same lane into this one.
    pub fn fold(&mut self, other: &Gap) {
        self.from_seq = self.from_seq.min(other.from_seq);
        self.to_seq = self.to_seq.max(other.to_seq);
        self.count += other.count;
        if !self.why.split(", ").any(|w| w == other.why) {
            self.why = format!("{}, {}", self.why, other.why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(quota: u64) -> Ledger {
        Ledger::new([quota; 5], [LaneBook::default(); 5])
    }

    #[test]
    fn sequence_numbers_start_at_one_per_lane_and_are_never_reused() {
        let mut l = ledger(1000);
        assert_eq!(l.admit(Lane::Calls, 10).seq, 1);
        l.added(Lane::Calls, 10);
        assert_eq!(l.admit(Lane::Calls, 10).seq, 2);
        assert_eq!(l.admit(Lane::Alert, 10).seq, 1);
        l.removed(Lane::Calls, 10, 1);
        assert_eq!(l.take_seq(Lane::Calls), 3);
    }

    #[test]
    fn a_full_lane_sheds_its_own_oldest_and_no_other() {
        let mut l = ledger(100);
        for _ in 0..9 {
            l.added(Lane::Calls, 10);
        }
        l.added(Lane::Diagnostics, 50);
        assert_eq!(l.admit(Lane::Calls, 10).shed, vec![]);
        l.added(Lane::Calls, 10);
        assert_eq!(l.admit(Lane::Calls, 25).shed, vec![Shed { lane: Lane::Calls, bytes: 25 }]);
    }

    #[test]
    fn alerts_take_room_from_diagnostics_first_and_shed_alerts_last() {
        let mut l = ledger(100);
        // Every lane full: 500 bytes, the whole outbox.
        for lane in Lane::ALL {
            l.added(lane, 100);
        }
        let a = l.admit(Lane::Alert, 30);
        assert_eq!(a.shed, vec![Shed { lane: Lane::Diagnostics, bytes: 30 }]);
        // Nothing but alerts left: an older alert goes, with a gap.
        let mut l = ledger(100);
        l.added(Lane::Alert, 500);
        assert_eq!(l.admit(Lane::Alert, 20).shed, vec![Shed { lane: Lane::Alert, bytes: 20 }]);
        // Room left anywhere: alerts exceed their own quota without shedding.
        let mut l = ledger(100);
        l.added(Lane::Alert, 100);
        assert_eq!(l.admit(Lane::Alert, 50).shed, vec![]);
    }

    #[test]
    fn other_lanes_give_way_to_alerts_that_borrowed_their_room() {
        let mut l = ledger(100);
        l.added(Lane::Alert, 450); // alerts borrowed 350 bytes of the others' room
        l.added(Lane::Calls, 40);
        // Calls' quota is 100, but only 50 are left of the whole: 40 + 20 - 50 = 10 to shed.
        assert_eq!(l.admit(Lane::Calls, 20).shed, vec![Shed { lane: Lane::Calls, bytes: 10 }]);
    }

    #[test]
    fn ids_sort_by_time_and_differ_by_randomness() {
        let a = message_id(1_700_000_000_000, [1; 8]);
        let b = message_id(1_700_000_000_001, [0; 8]);
        let c = message_id(1_700_000_000_001, [2; 8]);
        assert_eq!(a.len(), 28);
        assert!(a < b && b < c);
    }

    #[test]
    fn gaps_fold_into_one_range_with_the_sum_of_their_counts() {
        let mut g = Gap { lane: Lane::Calls, from_seq: 10, to_seq: 14, count: 5, why: "quota".into() };
        g.fold(&Gap { lane: Lane::Calls, from_seq: 3, to_seq: 8, count: 5, why: "quota".into() });
        assert_eq!((g.from_seq, g.to_seq, g.count), (3, 14, 10));
        assert_eq!(topic_suffix(Lane::Calls, "call"), "up/calls/call");
        assert_eq!(topic_suffix(Lane::Calls, GAP_KIND), "gap");
    }
}
