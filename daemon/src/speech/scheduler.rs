//! The shared ASR scheduler: every leg's utterances take turns on a fixed number of slots
//! (by default one per core), oldest request first, instead of one ASR per open leg
//! competing for the cores. More legs than slots then wait in a queue whose age is measured
//! (`status`, and each utterance's `asr_queue_ms`), and memory is bounded by the slots:
//! each running transcription holds its encoder activations and decoder cache.
//!
//! `SlotQueue` is the pure core (who runs next); `AsrScheduler` is the blocking adapter the
//! leg worker threads call.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which request runs next: a fixed number of slots, requests served in ticket order
/// (tickets are handed out as utterances end, so the oldest utterance goes first and none
/// waits behind a later one).
#[derive(Debug)]
pub struct SlotQueue {
    slots: usize,
    busy: usize,
    waiting: BTreeSet<u64>,
}

impl SlotQueue {
    pub fn new(slots: usize) -> Self {
        Self { slots: slots.max(1), busy: 0, waiting: BTreeSet::new() }
    }

    /// A request arrives: true when it runs now, false when it waits its turn.
    pub fn arrive(&mut self, ticket: u64) -> bool {
        if self.busy < self.slots && self.waiting.is_empty() {
            self.busy += 1;
            true
        } else {
            self.waiting.insert(ticket);
            false
        }
    }

    /// A running request is done: the waiting request that runs in its slot, if any.
    pub fn done(&mut self) -> Option<u64> {
        self.busy = self.busy.saturating_sub(1);
        let next = self.waiting.pop_first()?;
        self.busy += 1;
        Some(next)
    }

    pub fn busy(&self) -> usize {
        self.busy
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// The queue as `status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct QueueReport {
    pub slots: usize,
    pub busy: usize,
    pub waiting: usize,
    /// How long the longest-waiting utterance has waited so far, seconds.
    pub oldest_wait_secs: f64,
    /// The longest any utterance waited since the start, seconds.
    pub max_wait_secs: f64,
}

#[derive(Debug)]
struct State {
    queue: SlotQueue,
    next_ticket: u64,
    /// Waiting tickets and since when; a ticket leaves when its turn comes.
    since: HashMap<u64, Instant>,
    /// Tickets whose turn came, not yet picked up by their thread.
    granted: BTreeSet<u64>,
    max_wait: Duration,
}

/// The blocking adapter: `run` waits for a slot, runs the work, frees the slot.
#[derive(Debug)]
pub struct AsrScheduler {
    state: Mutex<State>,
    turn: Condvar,
}

impl AsrScheduler {
    /// `slots` 0 means one per core.
    pub fn new(slots: usize) -> Self {
        let slots = slots_for(slots);
        Self {
            state: Mutex::new(State {
                queue: SlotQueue::new(slots),
                next_ticket: 0,
                since: HashMap::new(),
                granted: BTreeSet::new(),
                max_wait: Duration::ZERO,
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` in a slot once its turn comes; returns its result and how long it waited.
    pub fn run<T>(&self, work: impl FnOnce() -> T) -> (T, Duration) {
        let arrived = Instant::now();
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        if !state.queue.arrive(ticket) {
            state.since.insert(ticket, arrived);
            while !state.granted.remove(&ticket) {
                state = self.turn.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.since.remove(&ticket);
        }
        let waited = arrived.elapsed();
        state.max_wait = state.max_wait.max(waited);
        drop(state);
        // The slot is freed however `work` ends (a panic included), or the queue would stall.
        let _slot = SlotGuard(self);
        (work(), waited)
    }

    pub fn report(&self) -> QueueReport {
        let state = self.lock();
        let now = Instant::now();
        let oldest = state.since.values().map(|&t| now.duration_since(t)).max().unwrap_or_default();
        QueueReport {
            slots: state.queue.slots(),
            busy: state.queue.busy(),
            waiting: state.queue.waiting(),
            oldest_wait_secs: oldest.as_secs_f64(),
            max_wait_secs: state.max_wait.as_secs_f64(),
        }
    }
}

struct SlotGuard<'a>(&'a AsrScheduler);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if let Some(next) = state.queue.done() {
            state.granted.insert(next);
            drop(state);
            self.0.turn.notify_all();
        }
    }
}

/// The slots `speech.asr_workers` stands for: 0 is one per core.
pub fn slots_for(asr_workers: usize) -> usize {
    if asr_workers == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        asr_workers
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn requests_beyond_the_slots_wait_and_run_oldest_first() {
        let mut q = SlotQueue::new(2);
        assert!(q.arrive(0));
        assert!(q.arrive(1));
        assert!(!q.arrive(2));
        assert!(!q.arrive(3));
        assert_eq!((q.busy(), q.waiting()), (2, 2));
        assert_eq!(q.done(), Some(2));
        assert_eq!(q.done(), Some(3));
        assert_eq!(q.done(), None);
        assert_eq!(q.done(), None);
        assert_eq!((q.busy(), q.waiting()), (0, 0));
        // A newcomer does not jump a queue that has a free slot coming.
        assert!(q.arrive(4));
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// Takes a slot on another thread and keeps it until the gate is opened.
    fn hold_a_slot(scheduler: &Arc<AsrScheduler>) -> (std::thread::JoinHandle<((), Duration)>, Gate) {
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let started = Arc::new(Barrier::new(2));
        let holder = {
            let (scheduler, gate, started) = (scheduler.clone(), gate.clone(), started.clone());
            std::thread::spawn(move || {
                scheduler.run(|| {
                    started.wait();
                    let (lock, cvar) = &*gate;
                    let mut open = lock.lock().unwrap();
                    while !*open {
                        open = cvar.wait(open).unwrap();
                    }
                })
            })
        };
        started.wait();
        (holder, gate)
    }

    fn open(gate: &Gate) {
        let (lock, cvar) = &**gate;
        *lock.lock().unwrap() = true;
        cvar.notify_all();
    }

    #[test]
    fn a_long_utterance_does_not_hold_up_short_ones() {
        // Two slots; one leg's 30-s utterance takes one for a long time. Six short ones
        // arriving meanwhile all run on the other slot, in their order, while it runs.
        let scheduler = Arc::new(AsrScheduler::new(2));
        let (long, gate) = hold_a_slot(&scheduler);
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..6 {
            let (scheduler, order) = (scheduler.clone(), order.clone());
            // One after another: each arrives after the one before has run.
            std::thread::spawn(move || scheduler.run(|| order.lock().unwrap().push(i))).join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5], "short utterances waited for the long one");
        assert_eq!(scheduler.report().busy, 1);
        open(&gate);
        long.join().unwrap();
        assert_eq!(scheduler.report().busy, 0);
    }

    #[test]
    fn with_every_slot_busy_waiters_are_counted_and_served_in_arrival_order() {
        let scheduler = Arc::new(AsrScheduler::new(1));
        let (holder, gate) = hold_a_slot(&scheduler);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (waiter, order) = (scheduler.clone(), order.clone());
            waiters.push(std::thread::spawn(move || waiter.run(|| order.lock().unwrap().push(i)).1));
            // Each waiter is queued before the next arrives, so arrival order is known.
            while scheduler.report().waiting < i + 1 {
                std::thread::yield_now();
            }
        }
        std::thread::sleep(Duration::from_millis(30));
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting), (1, 3));
        assert!(report.oldest_wait_secs >= 0.03, "{report:?}");
        open(&gate);
        holder.join().unwrap();
        let waited: Vec<Duration> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert!(waited.iter().all(|w| *w >= Duration::from_millis(30)), "{waited:?}");
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting), (0, 0));
        assert!(report.max_wait_secs >= 0.03);
    }

    #[test]
    fn a_panicking_transcription_frees_its_slot() {
        let scheduler = Arc::new(AsrScheduler::new(1));
        let panicking = scheduler.clone();
        assert!(std::thread::spawn(move || panicking.run(|| panic!("model fault"))).join().is_err());
        assert_eq!(scheduler.report().busy, 0);
        assert_eq!(scheduler.run(|| 7).0, 7);
    }
}
