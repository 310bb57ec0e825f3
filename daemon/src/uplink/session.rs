//! The uplink's session logic (pure): what to fetch from the outbox, what to publish,
//! what HQ's acks delete, when to resend and when the connection is stuck. Fed events with
//! the monotonic time; returns actions for the shell (`uplink::link`) to perform.
//!
//! Delivery is "every id acknowledged by HQ, or reported missing in a gap": a row leaves
//! the outbox only on HQ's application-level ack (never on PUBACK). What was published
//! and not acknowledged within the ack timeout, or when the connection drops, is sent
//! again under the same id, from the lane's oldest unacknowledged row on (per-lane order
//! holds; HQ drops duplicates by id).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::outbox::Lane;

/// A row fetched from the outbox, as the session needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub id: String,
    pub lane: Lane,
    pub seq: u64,
    pub topic: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read rows after these sequence numbers (per lane, lanes in priority order), at most
    /// `limit`; answer with `rows`.
    Fetch {
        after: [u64; 5],
        limit: usize,
    },
    Publish(Outgoing),
    /// HQ acknowledged these: remove them from the outbox; answer with `deleted`.
    Delete(Vec<String>),
    /// Nothing moved for too long while messages wait: drop the connection and make a
    /// new one (rumqttc's event loop can stop making progress).
    Rebuild(String),
}

#[derive(Debug, Clone)]
struct Flight {
    lane: Lane,
    seq: u64,
    sent: Instant,
}

/// Counters for `status` and `hq status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    pub connected: bool,
    pub in_flight: usize,
    pub published: u64,
    pub acked: u64,
    pub resent: u64,
    pub bad_acks: u64,
}

pub struct Session {
    window: usize,
    ack_timeout: Duration,
    /// No ack or PUBACK for this long while messages are in flight: rebuild.
    stall: Duration,
    connected: bool,
    /// The highest sequence number published per lane on this connection.
    cursor: [u64; 5],
    in_flight: BTreeMap<String, Flight>,
    /// Acknowledged, their delete not confirmed yet (a fetch may still return them).
    acked: BTreeSet<String>,
    fetching: bool,
    /// New rows arrived while a fetch was out.
    again: bool,
    last_progress: Option<Instant>,
    stats: SessionStats,
}

/// Rows one fetch asks for beyond what the window has room for is pointless; fewer than
/// this per fetch costs a store round trip per few messages.
const MIN_FETCH: usize = 16;

impl Session {
    pub fn new(window: usize, ack_timeout: Duration, stall: Duration) -> Self {
        Self {
            window: window.max(1),
            ack_timeout,
            stall,
            connected: false,
            cursor: [0; 5],
            in_flight: BTreeMap::new(),
            acked: BTreeSet::new(),
            fetching: false,
            again: false,
            last_progress: None,
            stats: SessionStats::default(),
        }
    }

    pub fn stats(&self) -> SessionStats {
        SessionStats { connected: self.connected, in_flight: self.in_flight.len(), ..self.stats.clone() }
    }

    /// The broker accepted the connection (and the ack subscription is asked for): send
    /// everything still in the outbox from the start, under the same ids.
    pub fn connected(&mut self, now: Instant) -> Vec<Action> {
        self.connected = true;
        self.restart(now);
        self.fetch()
    }

    /// The connection is gone: nothing is in flight any more (all is resent later).
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.in_flight.clear();
        self.cursor = [0; 5];
        self.fetching = false;
        self.again = false;
    }

    fn restart(&mut self, now: Instant) {
        self.stats.resent += self.in_flight.len() as u64;
        self.in_flight.clear();
        self.cursor = [0; 5];
        self.last_progress = Some(now);
    }

    /// The store queued new rows.
    pub fn wake(&mut self) -> Vec<Action> {
        self.fetch()
    }

    fn room(&self) -> usize {
        self.window.saturating_sub(self.in_flight.len())
    }

    fn fetch(&mut self) -> Vec<Action> {
        if !self.connected {
            return Vec::new();
        }
        if self.fetching {
            self.again = true;
            return Vec::new();
        }
        let room = self.room();
        if room == 0 || (room < MIN_FETCH.min(self.window.div_ceil(2)) && !self.in_flight.is_empty()) {
            // Wait for acks to free a useful amount of the window.
            self.again = true;
            return Vec::new();
        }
        self.fetching = true;
        self.again = false;
        vec![Action::Fetch { after: self.cursor, limit: room }]
    }

    /// A fetch's answer: publish each row not already in flight or acknowledged.
    pub fn rows(&mut self, rows: Vec<Outgoing>, limit: usize, now: Instant) -> Vec<Action> {
        self.fetching = false;
        if !self.connected {
            return Vec::new();
        }
        let full = rows.len() >= limit;
        let mut out = Vec::new();
        for row in rows {
            let cursor = &mut self.cursor[row.lane.index()];
            *cursor = (*cursor).max(row.seq);
            if self.acked.contains(&row.id) || self.in_flight.contains_key(&row.id) {
                continue;
            }
            if self.in_flight.len() >= self.window {
                // The window filled meanwhile: this row and the lane's later ones go next time.
                self.cursor[row.lane.index()] = row.seq - 1;
                self.again = true;
                break;
            }
            self.in_flight.insert(row.id.clone(), Flight { lane: row.lane, seq: row.seq, sent: now });
            self.stats.published += 1;
            out.push(Action::Publish(row));
        }
        if self.in_flight.is_empty() {
            self.last_progress = Some(now);
        }
        if full || self.again {
            out.extend(self.fetch());
        }
        out
    }

    /// A publish could not be queued in the client (its queue was full): it goes again
    /// with the next fetch.
    pub fn not_sent(&mut self, id: &str) {
        if let Some(f) = self.in_flight.remove(id) {
            let cursor = &mut self.cursor[f.lane.index()];
            *cursor = (*cursor).min(f.seq.saturating_sub(1));
            self.again = true;
        }
    }

    /// The broker acknowledged a publish (PUBACK): the link is alive, nothing more.
    pub fn puback(&mut self, now: Instant) {
        self.last_progress = Some(now);
    }

    /// HQ acknowledged these ids: they leave the outbox. Unknown ids (an ack for a resend
    /// already acknowledged) are ignored.
    pub fn acks(&mut self, ids: Vec<String>, now: Instant) -> Vec<Action> {
        self.last_progress = Some(now);
        let mut delete = Vec::new();
        for id in ids {
            if self.acked.contains(&id) {
                continue;
            }
            // An ack for a row sent on an earlier connection is as good: delete it too.
            self.in_flight.remove(&id);
            self.stats.acked += 1;
            self.acked.insert(id.clone());
            delete.push(id);
        }
        let mut out = Vec::new();
        if !delete.is_empty() {
            out.push(Action::Delete(delete));
        }
        out.extend(self.fetch());
        out
    }

    /// A payload on the ack topic that is not a valid ack.
    pub fn bad_ack(&mut self) {
        self.stats.bad_acks += 1;
    }

    /// The outbox no longer has these rows.
    pub fn deleted(&mut self, ids: &[String]) {
        for id in ids {
            self.acked.remove(id);
        }
    }

    /// The delete failed (the disk refuses writes): the rows stay, and forgetting that
    /// they were acknowledged lets a later resend and ack remove them.
    pub fn delete_failed(&mut self, ids: &[String]) {
        self.deleted(ids);
    }

    /// Once a second: unacknowledged messages past the timeout are sent again (from the
    /// oldest of their lane on); a connection that moves nothing is rebuilt.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if !self.connected {
            return Vec::new();
        }
        if let Some(last) = self.last_progress {
            if !self.in_flight.is_empty() && now.duration_since(last) >= self.stall {
                return vec![Action::Rebuild(format!(
                    "no acknowledgement for {} s with {} messages in flight",
                    now.duration_since(last).as_secs(),
                    self.in_flight.len()
                ))];
            }
        }
        let mut late = [None::<u64>; 5];
        for f in self.in_flight.values() {
            if now.duration_since(f.sent) >= self.ack_timeout {
                let slot = &mut late[f.lane.index()];
                *slot = Some(slot.map_or(f.seq, |s: u64| s.min(f.seq)));
            }
        }
        if late.iter().all(Option::is_none) {
            return if self.again { self.fetch() } else { Vec::new() };
        }
        for lane in Lane::ALL {
            if let Some(first) = late[lane.index()] {
                let before = self.in_flight.len();
                self.in_flight.retain(|_, f| f.lane != lane || f.seq < first);
                self.stats.resent += (before - self.in_flight.len()) as u64;
                self.cursor[lane.index()] = first - 1;
            }
        }
        self.fetch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(lane: Lane, seq: u64) -> Outgoing {
        Outgoing { id: format!("{}-{seq}", lane.name()), lane, seq, topic: String::new(), body: Vec::new() }
    }

    fn published(actions: &[Action]) -> Vec<String> {
        actions.iter().filter_map(|a| if let Action::Publish(r) = a { Some(r.id.clone()) } else { None }).collect()
    }

    fn fetch_of(actions: &[Action]) -> Option<([u64; 5], usize)> {
        actions.iter().find_map(|a| if let Action::Fetch { after, limit } = a { Some((*after, *limit)) } else { None })
    }

    #[test]
    fn nothing_is_fetched_or_sent_while_offline() {
        let mut s = Session::new(8, Duration::from_secs(30), Duration::from_secs(90));
        assert!(s.wake().is_empty());
        let t = Instant::now();
        assert!(s.tick(t).is_empty());
        assert_eq!(fetch_of(&s.connected(t)), Some(([0; 5], 8)));
    }

    #[test]
    fn a_row_leaves_only_on_hqs_ack_and_a_puback_deletes_nothing() {
        let t = Instant::now();
        let mut s = Session::new(8, Duration::from_secs(30), Duration::from_secs(90));
        s.connected(t);
        let a = s.rows(vec![row(Lane::Calls, 1), row(Lane::Calls, 2)], 8, t);
        assert_eq!(published(&a), ["calls-1", "calls-2"]);
        s.puback(t);
        assert_eq!(s.stats().in_flight, 2);
        let a = s.acks(vec!["calls-1".into(), "calls-1".into(), "nobody".into()], t);
        assert_eq!(a[0], Action::Delete(vec!["calls-1".into(), "nobody".into()]));
        // The deleted row, fetched again before its delete landed, is not sent twice.
        let again = s.rows(vec![row(Lane::Calls, 1)], 8, t);
        assert!(published(&again).is_empty());
        s.deleted(&["calls-1".into()]);
        assert_eq!(s.stats().in_flight, 1);
    }

    #[test]
    fn a_dropped_connection_resends_everything_unacked_under_the_same_ids_in_lane_order() {
        let t = Instant::now();
        let mut s = Session::new(8, Duration::from_secs(30), Duration::from_secs(90));
        s.connected(t);
        s.rows(vec![row(Lane::Alert, 1), row(Lane::Calls, 5), row(Lane::Calls, 6)], 8, t);
        s.acks(vec!["calls-5".into()], t);
        s.disconnected();
        let a = s.connected(t);
        assert_eq!(fetch_of(&a), Some(([0; 5], 8)), "from the start of every lane");
        let a = s.rows(vec![row(Lane::Alert, 1), row(Lane::Calls, 5), row(Lane::Calls, 6)], 8, t);
        assert_eq!(published(&a), ["alert-1", "calls-6"], "the acked one is not sent again");
    }

    #[test]
    fn an_ack_timeout_resends_from_the_lanes_oldest_late_message() {
        let t0 = Instant::now();
        let mut s = Session::new(8, Duration::from_secs(30), Duration::from_secs(600));
        s.connected(t0);
        s.rows(vec![row(Lane::Calls, 1), row(Lane::Calls, 2), row(Lane::Diagnostics, 1)], 8, t0);
        s.acks(vec!["diagnostics-1".into()], t0);
        s.rows(vec![], 8, t0); // the fetch the ack asked for: nothing new
        assert!(s.tick(t0 + Duration::from_secs(29)).is_empty());
        let a = s.tick(t0 + Duration::from_secs(31));
        let (after, _) = fetch_of(&a).unwrap();
        assert_eq!(after[Lane::Calls.index()], 0);
        assert_eq!(s.stats().resent, 2);
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_acks_open_it_again() {
        let t = Instant::now();
        let mut s = Session::new(2, Duration::from_secs(30), Duration::from_secs(90));
        s.connected(t);
        let a = s.rows(vec![row(Lane::Calls, 1), row(Lane::Calls, 2)], 2, t);
        assert_eq!(published(&a).len(), 2);
        assert_eq!(fetch_of(&a), None, "the window is full: no fetch until an ack");
        assert!(s.wake().is_empty());
        let a = s.acks(vec!["calls-1".into()], t);
        assert_eq!(fetch_of(&a), Some(([0, 0, 2, 0, 0], 1)));
    }

    #[test]
    fn a_connection_that_moves_nothing_is_rebuilt() {
        let t0 = Instant::now();
        let mut s = Session::new(8, Duration::from_secs(3600), Duration::from_secs(90));
        s.connected(t0);
        s.rows(vec![row(Lane::Alert, 1)], 8, t0);
        assert!(s.tick(t0 + Duration::from_secs(60)).is_empty());
        assert!(matches!(s.tick(t0 + Duration::from_secs(91))[..], [Action::Rebuild(_)]));
    }

    #[test]
    fn a_publish_the_client_could_not_queue_goes_with_the_next_fetch() {
        let t = Instant::now();
        let mut s = Session::new(8, Duration::from_secs(30), Duration::from_secs(90));
        s.connected(t);
        s.rows(vec![row(Lane::Calls, 1), row(Lane::Calls, 2)], 8, t);
        s.not_sent("calls-2");
        s.not_sent("calls-1");
        let a = s.tick(t);
        assert_eq!(fetch_of(&a).map(|(after, _)| after[Lane::Calls.index()]), Some(0));
    }
}
