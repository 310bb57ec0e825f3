//! The shared ASR scheduler: every leg's utterances take turns on a fixed number of slots
//! (by default one per core), oldest request first, instead of one ASR per open leg
//! competing for the cores. More legs than slots then wait in a queue whose age is measured
//! (`status`, and each utterance's `asr_queue_ms`), and memory is bounded by the slots:
//! each running transcription holds its encoder activations and decoder cache.
//!
//! A request whose turn comes takes the oldest waiting requests along, up to the batch limit
//! (`speech.asr_batch`), and runs them as one batch (the decoder then reads its weights
//! once per step for all of them); the requests it took get their results from it. With
//! no queue a request runs alone, so batching costs nothing until the box is busy.
//!
//! `SlotQueue` is the pure core (who runs next, who rides along); `Scheduler` is the
//! blocking adapter the leg worker threads call.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::decoding::DecodeOptions;
use super::{SpeechError, Transcript};

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

    /// A request starting in a slot takes up to `n` of the oldest waiting requests along in
    /// its batch: they leave the queue without a slot of their own.
    pub fn take(&mut self, n: usize) -> Vec<u64> {
        std::iter::from_fn(|| self.waiting.pop_first()).take(n).collect()
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
    /// Most requests one slot runs together, and the largest batch run since the start.
    pub batch_limit: usize,
    pub largest_batch: usize,
}

/// What a request that rode in a batch gets when the batch ended without its result (the
/// work panicked or returned too few results).
pub trait Abandoned {
    fn abandoned() -> Self;
}

#[derive(Debug)]
struct State<Req, Res> {
    queue: SlotQueue,
    next_ticket: u64,
    /// Waiting tickets, since when, and their requests; a ticket leaves when its turn comes
    /// or a running request takes it along.
    since: HashMap<u64, Instant>,
    requests: HashMap<u64, Req>,
    /// Tickets whose turn came, not yet picked up by their thread.
    granted: BTreeSet<u64>,
    /// Results of tickets that rode in another's batch, and how long each had waited.
    results: HashMap<u64, (Res, Duration)>,
    max_wait: Duration,
    largest_batch: usize,
}

/// The blocking adapter: `run` waits for a slot (or for a batch that takes it along), runs
/// the work, frees the slot.
#[derive(Debug)]
pub struct Scheduler<Req, Res> {
    state: Mutex<State<Req, Res>>,
    turn: Condvar,
    batch_limit: usize,
}

/// One utterance's audio (16 kHz) and how to decode it.
pub type AsrRequest = (Vec<f32>, DecodeOptions);
pub type AsrResult = Result<Vec<Transcript>, SpeechError>;
pub type AsrScheduler = Scheduler<AsrRequest, AsrResult>;

impl Abandoned for AsrResult {
    fn abandoned() -> Self {
        Err(SpeechError::model("asr", "the transcription batch this utterance was in failed"))
    }
}

impl<Req, Res: Abandoned> Scheduler<Req, Res> {
    /// `slots` 0 means one per core; `batch_limit` requests at most run together (≥ 1).
    pub fn new(slots: usize, batch_limit: usize) -> Self {
        let slots = slots_for(slots);
        Self {
            state: Mutex::new(State {
                queue: SlotQueue::new(slots),
                next_ticket: 0,
                since: HashMap::new(),
                requests: HashMap::new(),
                granted: BTreeSet::new(),
                results: HashMap::new(),
                max_wait: Duration::ZERO,
                largest_batch: 0,
            }),
            turn: Condvar::new(),
            batch_limit: batch_limit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<Req, Res>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `request` once its turn comes, together with the oldest waiting requests (up to
    /// the batch limit): `work` gets the batch, this request first, and returns one result
    /// per request in order. Unless another request's batch took this one along first: its
    /// result then comes from that batch, and `work` is not called. Returns the result and
    /// how long the request waited before its batch started.
    pub fn run(&self, request: Req, work: impl FnOnce(Vec<Req>) -> Vec<Res>) -> (Res, Duration) {
        let arrived = Instant::now();
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let mut request = Some(request);
        if !state.queue.arrive(ticket) {
            state.since.insert(ticket, arrived);
            if let Some(request) = request.take() {
                state.requests.insert(ticket, request);
            }
            loop {
                if let Some(served) = state.results.remove(&ticket) {
                    return served;
                }
                if state.granted.remove(&ticket) {
                    request = state.requests.remove(&ticket);
                    break;
                }
                state = self.turn.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.since.remove(&ticket);
        }
        let waited = arrived.elapsed();
        state.max_wait = state.max_wait.max(waited);
        let mut batch: Vec<Req> = request.into_iter().collect();
        let mut riders = Vec::new();
        for rider in state.queue.take(self.batch_limit - 1) {
            let rider_waited = state.since.remove(&rider).map_or(Duration::ZERO, |t| t.elapsed());
            state.max_wait = state.max_wait.max(rider_waited);
            if let Some(request) = state.requests.remove(&rider) {
                batch.push(request);
                riders.push((rider, rider_waited));
            }
        }
        state.largest_batch = state.largest_batch.max(batch.len());
        drop(state);
        // The slot is freed, and the riders answered, however `work` ends (a panic
        // included), or the queue would stall.
        let mut slot = SlotGuard { scheduler: self, riders, results: Vec::new() };
        let mut results = work(batch).into_iter();
        let own = results.next().unwrap_or_else(Res::abandoned);
        slot.results = results.collect();
        (own, waited)
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
            batch_limit: self.batch_limit,
            largest_batch: state.largest_batch,
        }
    }
}

struct SlotGuard<'a, Req, Res: Abandoned> {
    scheduler: &'a Scheduler<Req, Res>,
    /// The requests taken along, and how long each waited; their results, in order.
    riders: Vec<(u64, Duration)>,
    results: Vec<Res>,
}

impl<Req, Res: Abandoned> Drop for SlotGuard<'_, Req, Res> {
    fn drop(&mut self) {
        let mut results = std::mem::take(&mut self.results).into_iter();
        let mut state = self.scheduler.lock();
        for &(rider, waited) in &self.riders {
            state.results.insert(rider, (results.next().unwrap_or_else(Res::abandoned), waited));
        }
        if let Some(next) = state.queue.done() {
            state.granted.insert(next);
        }
        drop(state);
        self.scheduler.turn.notify_all();
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

    impl Abandoned for u32 {
        fn abandoned() -> Self {
            u32::MAX
        }
    }

    type Test = Scheduler<u32, u32>;

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

    #[test]
    fn a_batch_takes_the_oldest_waiting_requests_along() {
        let mut q = SlotQueue::new(1);
        assert!(q.arrive(0));
        for ticket in 1..=5 {
            assert!(!q.arrive(ticket));
        }
        assert_eq!(q.done(), Some(1));
        assert_eq!(q.take(2), vec![2, 3]);
        assert_eq!((q.busy(), q.waiting()), (1, 2));
        assert_eq!(q.take(9), vec![4, 5]);
        assert_eq!(q.take(1), Vec::<u64>::new());
        assert_eq!(q.done(), None);
        assert_eq!(q.busy(), 0);
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// Takes a slot on another thread and keeps it until the gate is opened.
    fn hold_a_slot(scheduler: &Arc<Test>) -> (std::thread::JoinHandle<(u32, Duration)>, Gate) {
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let started = Arc::new(Barrier::new(2));
        let holder = {
            let (scheduler, gate, started) = (scheduler.clone(), gate.clone(), started.clone());
            std::thread::spawn(move || {
                scheduler.run(1000, |batch| {
                    started.wait();
                    let (lock, cvar) = &*gate;
                    let mut open = lock.lock().unwrap();
                    while !*open {
                        open = cvar.wait(open).unwrap();
                    }
                    batch
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

    /// Queues `n` requests 0..n behind a busy slot, in arrival order; each one's work records
    /// its batch and answers every request r with r * 10.
    fn queue_behind(
        scheduler: &Arc<Test>,
        n: u32,
        batches: &Arc<Mutex<Vec<Vec<u32>>>>,
    ) -> Vec<std::thread::JoinHandle<(u32, Duration)>> {
        let mut waiters = Vec::new();
        for i in 0..n {
            let (waiter, batches) = (scheduler.clone(), batches.clone());
            waiters.push(std::thread::spawn(move || {
                waiter.run(i, |batch| {
                    batches.lock().unwrap().push(batch.clone());
                    batch.into_iter().map(|r| r * 10).collect()
                })
            }));
            // Each waiter is queued before the next arrives, so arrival order is known.
            while scheduler.report().waiting < i as usize + 1 {
                std::thread::yield_now();
            }
        }
        waiters
    }

    #[test]
    fn a_long_utterance_does_not_hold_up_short_ones() {
        // Two slots; one leg's 30-s utterance takes one for a long time. Six short ones
        // arriving meanwhile all run on the other slot, in their order, while it runs.
        let scheduler = Arc::new(Test::new(2, 4));
        let (long, gate) = hold_a_slot(&scheduler);
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..6 {
            let (scheduler, order) = (scheduler.clone(), order.clone());
            // One after another: each arrives after the one before has run.
            let (result, _) = std::thread::spawn(move || {
                scheduler.run(i, |batch| {
                    order.lock().unwrap().extend(batch.iter().copied());
                    batch
                })
            })
            .join()
            .unwrap();
            assert_eq!(result, i);
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5], "short utterances waited for the long one");
        assert_eq!(scheduler.report().busy, 1);
        open(&gate);
        assert_eq!(long.join().unwrap().0, 1000);
        let report = scheduler.report();
        assert_eq!((report.busy, report.largest_batch), (0, 1), "nothing waited, so nothing was batched");
    }

    #[test]
    fn with_every_slot_busy_waiters_are_counted_and_served_in_arrival_order() {
        // Batches of one: the queue alone.
        let scheduler = Arc::new(Test::new(1, 1));
        let (holder, gate) = hold_a_slot(&scheduler);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let waiters = queue_behind(&scheduler, 3, &batches);
        std::thread::sleep(Duration::from_millis(30));
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting), (1, 3));
        assert!(report.oldest_wait_secs >= 0.03, "{report:?}");
        open(&gate);
        holder.join().unwrap();
        let served: Vec<(u32, Duration)> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(*batches.lock().unwrap(), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(served.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 10, 20]);
        assert!(served.iter().all(|s| s.1 >= Duration::from_millis(30)), "{served:?}");
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting), (0, 0));
        assert!(report.max_wait_secs >= 0.03);
    }

    #[test]
    fn the_request_whose_turn_comes_runs_the_oldest_waiting_ones_with_it() {
        // One slot, batches of up to 3: five requests queue behind a busy slot; the oldest
        // runs 0, 1 and 2 together, then 3 runs 3 and 4. Each gets its own result.
        let scheduler = Arc::new(Test::new(1, 3));
        let (holder, gate) = hold_a_slot(&scheduler);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let waiters = queue_behind(&scheduler, 5, &batches);
        std::thread::sleep(Duration::from_millis(20));
        open(&gate);
        holder.join().unwrap();
        let served: Vec<(u32, Duration)> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(*batches.lock().unwrap(), vec![vec![0, 1, 2], vec![3, 4]]);
        assert_eq!(served.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 10, 20, 30, 40]);
        // Riders report their own wait, up to the start of the batch that took them.
        assert!(served.iter().all(|s| s.1 >= Duration::from_millis(20)), "{served:?}");
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting, report.batch_limit, report.largest_batch), (0, 0, 3, 3));
    }

    #[test]
    fn a_panicking_batch_frees_its_slot_and_answers_its_riders() {
        let scheduler = Arc::new(Test::new(1, 2));
        let (holder, gate) = hold_a_slot(&scheduler);
        let leader = {
            let scheduler = scheduler.clone();
            std::thread::spawn(move || scheduler.run(1, |_| panic!("model fault")))
        };
        while scheduler.report().waiting < 1 {
            std::thread::yield_now();
        }
        let rider = {
            let scheduler = scheduler.clone();
            std::thread::spawn(move || scheduler.run(2, |batch| batch))
        };
        while scheduler.report().waiting < 2 {
            std::thread::yield_now();
        }
        open(&gate);
        holder.join().unwrap();
        assert!(leader.join().is_err());
        assert_eq!(rider.join().unwrap().0, u32::abandoned(), "the rider got no answer");
        assert_eq!(scheduler.report().busy, 0);
        assert_eq!(scheduler.run(7, |batch| batch).0, 7);
    }
}
