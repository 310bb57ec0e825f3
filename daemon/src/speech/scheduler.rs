//! The shared ASR scheduler: a fixed pool of ASR worker threads (by default one per core)
//! serves every leg's utterances, oldest first, instead of one ASR per open leg competing
//! for the cores. More utterances than the workers take wait in a queue whose age is
//! measured (`status`, and each utterance's `asr_queue_ms`), and memory is bounded by the
//! workers: each holds the encoder outputs and decoder caches of the utterances it decodes.
//!
//! Continuous batching: a worker decodes up to `speech.asr_batch` utterances together, one
//! decoder step for all of them (the decoder then reads its weights once per step for the
//! lot). Between steps it takes waiting utterances in (their encoders run, then they join
//! the next step), and each utterance is answered the moment its own decoding ends, so a
//! short utterance never waits for a long one it was decoded with. A worker already
//! decoding leaves the queue to an idle worker, so utterances share a step only when every
//! worker is busy; with a limit of 1 each worker decodes one utterance at a time.
//!
//! `SlotQueue` is the pure core (who starts where, and when); `Scheduler` runs the workers
//! and is what the legs' threads call: `submit` blocks until the utterance's result is in.

use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which waiting request starts on which worker: requests are served in ticket order
/// (tickets are handed out as utterances end, so the oldest utterance starts first and none
/// waits behind a later one); each worker holds at most `limit` at a time.
#[derive(Debug)]
pub struct SlotQueue {
    /// Requests in progress on each worker.
    load: Vec<usize>,
    limit: usize,
    waiting: BTreeSet<u64>,
}

impl SlotQueue {
    pub fn new(workers: usize, limit: usize) -> Self {
        Self { load: vec![0; workers.max(1)], limit: limit.max(1), waiting: BTreeSet::new() }
    }

    /// A request arrives and waits until a worker admits it.
    pub fn arrive(&mut self, ticket: u64) {
        self.waiting.insert(ticket);
    }

    /// Worker `worker` is between steps (or idle): the oldest waiting requests it starts
    /// now, up to its room under the limit. A busy worker leaves them to an idle one, which
    /// starts them without delaying any decoding in progress.
    pub fn admit(&mut self, worker: usize) -> Vec<u64> {
        let Some(&load) = self.load.get(worker) else { return Vec::new() };
        if load > 0 && self.load.contains(&0) {
            return Vec::new();
        }
        let taken: Vec<u64> =
            std::iter::from_fn(|| self.waiting.pop_first()).take(self.limit.saturating_sub(load)).collect();
        self.load[worker] += taken.len();
        taken
    }

    /// Worker `worker` finished `n` of its requests.
    pub fn finished(&mut self, worker: usize, n: usize) {
        if let Some(load) = self.load.get_mut(worker) {
            *load = load.saturating_sub(n);
        }
    }

    /// Workers with requests in progress.
    pub fn busy(&self) -> usize {
        self.load.iter().filter(|&&l| l > 0).count()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn slots(&self) -> usize {
        self.load.len()
    }
}

/// The queue as `status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct QueueReport {
    /// ASR workers, and how many are decoding.
    pub slots: usize,
    pub busy: usize,
    pub waiting: usize,
    /// How long the longest-waiting utterance has waited so far, seconds.
    pub oldest_wait_secs: f64,
    /// The longest any utterance waited since the start, seconds.
    pub max_wait_secs: f64,
    /// Most requests one worker decodes together, and the most it has since the start.
    pub batch_limit: usize,
    pub largest_batch: usize,
}

/// What a request gets when the work it was in ended without its result (a panic).
pub trait Abandoned {
    fn abandoned() -> Self;
}

/// The decodings one worker has in progress, advanced a step at a time.
pub trait Batch {
    type Req: Send + 'static;
    type Res: Abandoned + Send + 'static;
    /// Starts `request` (a model runs its encoder here); its result comes from a later
    /// `step`, or from this call when it needs none.
    fn join(&mut self, ticket: u64, request: Self::Req) -> Vec<(u64, Self::Res)>;
    /// Advances every request in progress one step: the results of those that ended.
    fn step(&mut self) -> Vec<(u64, Self::Res)>;
    /// Requests in progress.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct State<Req, Res> {
    queue: SlotQueue,
    next_ticket: u64,
    /// Waiting tickets, since when, and their requests; a ticket leaves when a worker
    /// admits it.
    since: HashMap<u64, Instant>,
    requests: HashMap<u64, Req>,
    /// Finished tickets' results, and how long each waited, until their thread takes them.
    results: HashMap<u64, (Res, Duration)>,
    max_wait: Duration,
    largest_batch: usize,
    closing: bool,
}

struct Shared<Req, Res> {
    state: Mutex<State<Req, Res>>,
    /// Workers wait here for requests; submitters for results.
    work: Condvar,
    answered: Condvar,
}

impl<Req, Res> Shared<Req, Res> {
    fn lock(&self) -> MutexGuard<'_, State<Req, Res>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The worker pool and its queue. Dropping it stops the workers (nothing can be in
/// flight then: every submitter holds the scheduler).
pub struct Scheduler<B: Batch> {
    shared: Arc<Shared<B::Req, B::Res>>,
    workers: Vec<JoinHandle<()>>,
    batch_limit: usize,
}

impl<B: Batch> std::fmt::Debug for Scheduler<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("report", &self.report()).finish()
    }
}

impl<B: Batch + 'static> Scheduler<B> {
    /// `workers` threads (0: one per core), each decoding up to `batch_limit` requests
    /// together (≥ 1) in a batch `make` builds (again after a panic).
    pub fn new(
        workers: usize,
        batch_limit: usize,
        make: impl Fn() -> B + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let workers = slots_for(workers);
        let batch_limit = batch_limit.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: SlotQueue::new(workers, batch_limit),
                next_ticket: 0,
                since: HashMap::new(),
                requests: HashMap::new(),
                results: HashMap::new(),
                max_wait: Duration::ZERO,
                largest_batch: 0,
                closing: false,
            }),
            work: Condvar::new(),
            answered: Condvar::new(),
        });
        let make = Arc::new(make);
        let mut scheduler = Self { shared, workers: Vec::with_capacity(workers), batch_limit };
        for worker in 0..workers {
            let (shared, make) = (scheduler.shared.clone(), make.clone());
            // On failure `scheduler` drops here and stops the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("asr-{worker}"))
                .spawn(move || work(worker, &shared, &*make))?;
            scheduler.workers.push(handle);
        }
        Ok(scheduler)
    }
}

/// How one request went through the pool.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// When it was submitted.
    pub submitted: Instant,
    /// Waiting for a worker.
    pub waited: Duration,
    /// In a worker until its result (with a batch's other requests, when it rode in one).
    pub in_worker: Duration,
}

impl<B: Batch> Scheduler<B> {
    /// Queues `request` and blocks until a worker has decoded it: its result, and when it
    /// came, how long it waited for a worker and how long it then took.
    pub fn submit(&self, request: B::Req) -> (B::Res, Served) {
        let submitted = Instant::now();
        let mut state = self.shared.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.since.insert(ticket, submitted);
        state.requests.insert(ticket, request);
        state.queue.arrive(ticket);
        self.shared.work.notify_all();
        loop {
            if let Some((result, waited)) = state.results.remove(&ticket) {
                let in_worker = submitted.elapsed().saturating_sub(waited);
                return (result, Served { submitted, waited, in_worker });
            }
            state = self.shared.answered.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    pub fn report(&self) -> QueueReport {
        let state = self.shared.lock();
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

impl<B: Batch> Drop for Scheduler<B> {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        for worker in self.workers.drain(..) {
            // A worker that panicked outside its batch has nothing left to clean up.
            let _ = worker.join();
        }
    }
}

/// One worker's loop: admit what the queue gives it, step its batch, answer what ended.
fn work<B: Batch>(worker: usize, shared: &Shared<B::Req, B::Res>, make: &dyn Fn() -> B) {
    let mut batch = make();
    // Tickets in progress here, and how long each waited before it started.
    let mut mine: HashMap<u64, Duration> = HashMap::new();
    loop {
        let admitted: Vec<(u64, B::Req)> = {
            let mut state = shared.lock();
            let tickets = loop {
                let tickets = state.queue.admit(worker);
                if !tickets.is_empty() || !mine.is_empty() {
                    break tickets;
                }
                if state.closing {
                    return;
                }
                state = shared.work.wait(state).unwrap_or_else(PoisonError::into_inner);
            };
            let mut admitted = Vec::with_capacity(tickets.len());
            for ticket in tickets {
                let waited = state.since.remove(&ticket).map_or(Duration::ZERO, |t| t.elapsed());
                state.max_wait = state.max_wait.max(waited);
                if let Some(request) = state.requests.remove(&ticket) {
                    mine.insert(ticket, waited);
                    admitted.push((ticket, request));
                }
            }
            state.largest_batch = state.largest_batch.max(mine.len());
            admitted
        };
        // A panic in the model answers every request here with an error and starts afresh,
        // or their threads would wait forever.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut ended = Vec::new();
            for (ticket, request) in admitted {
                ended.extend(batch.join(ticket, request));
            }
            if !batch.is_empty() {
                ended.extend(batch.step());
            }
            ended
        }));
        let ended = match outcome {
            // A request the batch dropped without a result would be waited for forever.
            Ok(mut ended) if batch.is_empty() => {
                let answered: BTreeSet<u64> = ended.iter().map(|(ticket, _)| *ticket).collect();
                ended.extend(mine.keys().filter(|t| !answered.contains(t)).map(|&t| (t, B::Res::abandoned())));
                ended
            }
            Ok(ended) => ended,
            Err(_) => {
                batch = make();
                mine.keys().map(|&ticket| (ticket, B::Res::abandoned())).collect()
            }
        };
        if ended.is_empty() {
            continue;
        }
        let mut state = shared.lock();
        let mut finished = 0;
        for (ticket, result) in ended {
            if let Some(waited) = mine.remove(&ticket) {
                state.results.insert(ticket, (result, waited));
                finished += 1;
            }
        }
        state.queue.finished(worker, finished);
        drop(state);
        shared.answered.notify_all();
        // A freed place may let this or another worker admit a waiting request.
        shared.work.notify_all();
    }
}

/// The workers `speech.asr_workers` stands for: 0 is one per core.
pub fn slots_for(asr_workers: usize) -> usize {
    if asr_workers == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        asr_workers
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    impl Abandoned for u32 {
        fn abandoned() -> Self {
            u32::MAX
        }
    }

    /// A request of the test batch: its id, and when it ends.
    enum Job {
        /// After this many steps.
        Steps(u32, u32),
        /// At the first step after the gate opens.
        Hold(u32, Arc<AtomicBool>),
        /// Its join panics.
        Panic,
    }

    /// What the test batches did: (batch, tickets) of every step, and joins in order.
    #[derive(Default)]
    struct Log {
        steps: Mutex<Vec<(usize, Vec<u64>)>>,
        joins: Mutex<Vec<u64>>,
    }

    /// Answers request `id` with `id * 10`.
    struct TestBatch {
        id: usize,
        log: Arc<Log>,
        jobs: Vec<(u64, Job, u32)>,
    }

    impl Batch for TestBatch {
        type Req = Job;
        type Res = u32;
        fn join(&mut self, ticket: u64, job: Job) -> Vec<(u64, u32)> {
            if let Job::Panic = job {
                panic!("model fault");
            }
            self.log.joins.lock().unwrap().push(ticket);
            self.jobs.push((ticket, job, 0));
            Vec::new()
        }
        fn step(&mut self) -> Vec<(u64, u32)> {
            std::thread::sleep(Duration::from_millis(1));
            let tickets = self.jobs.iter().map(|j| j.0).collect();
            self.log.steps.lock().unwrap().push((self.id, tickets));
            let mut ended = Vec::new();
            self.jobs.retain_mut(|(ticket, job, done)| {
                *done += 1;
                let result = match job {
                    Job::Steps(id, n) if *done >= *n => Some(*id * 10),
                    Job::Hold(id, gate) if gate.load(Ordering::SeqCst) => Some(*id * 10),
                    _ => None,
                };
                result.map(|r| ended.push((*ticket, r))).is_none()
            });
            ended
        }
        fn len(&self) -> usize {
            self.jobs.len()
        }
    }

    fn scheduler(workers: usize, limit: usize) -> (Arc<Scheduler<TestBatch>>, Arc<Log>) {
        let log = Arc::new(Log::default());
        let batches = Arc::new(AtomicUsize::new(0));
        let for_batches = log.clone();
        let make = move || TestBatch {
            id: batches.fetch_add(1, Ordering::SeqCst),
            log: for_batches.clone(),
            jobs: Vec::new(),
        };
        (Arc::new(Scheduler::new(workers, limit, make).unwrap()), log)
    }

    /// The job's answer and how long it waited for a worker.
    fn submit(scheduler: &Arc<Scheduler<TestBatch>>, job: Job) -> std::thread::JoinHandle<(u32, Duration)> {
        let scheduler = scheduler.clone();
        std::thread::spawn(move || {
            let (answer, served) = scheduler.submit(job);
            (answer, served.waited)
        })
    }

    /// Blocks until `cond` holds of the scheduler's report.
    fn until(scheduler: &Scheduler<TestBatch>, cond: impl Fn(&QueueReport) -> bool) {
        while !cond(&scheduler.report()) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn until_joined(log: &Log, n: usize) {
        while log.joins.lock().unwrap().len() < n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    type Decoding = std::thread::JoinHandle<(u32, Duration)>;

    /// A scheduler whose worker (the first, on an idle pool) is decoding a long utterance
    /// that ends only when the gate opens (answered `id * 10`).
    fn with_a_long_one(
        workers: usize,
        limit: usize,
        id: u32,
    ) -> (Arc<Scheduler<TestBatch>>, Arc<Log>, Arc<AtomicBool>, Decoding) {
        let (scheduler, log) = scheduler(workers, limit);
        let gate = Arc::new(AtomicBool::new(false));
        let long = submit(&scheduler, Job::Hold(id, gate.clone()));
        until_joined(&log, 1);
        (scheduler, log, gate, long)
    }

    #[test]
    fn an_idle_worker_takes_the_oldest_requests_and_a_busy_one_fills_up_only_when_none_is_idle() {
        let mut q = SlotQueue::new(2, 3);
        q.arrive(0);
        assert_eq!(q.admit(0), vec![0]);
        q.arrive(1);
        q.arrive(2);
        assert_eq!(q.admit(0), Vec::<u64>::new(), "worker 1 is idle: it takes them");
        assert_eq!(q.admit(1), vec![1, 2]);
        for ticket in 3..=6 {
            q.arrive(ticket);
        }
        assert_eq!(q.admit(0), vec![3, 4], "two places left under the limit of 3");
        assert_eq!(q.admit(1), vec![5], "one place left");
        assert_eq!(q.admit(1), Vec::<u64>::new(), "worker 1 is full");
        assert_eq!((q.busy(), q.waiting()), (2, 1));
        q.finished(1, 2);
        assert_eq!(q.admit(1), vec![6]);
        q.finished(0, 3);
        q.finished(1, 2);
        assert_eq!((q.busy(), q.waiting()), (0, 0));
        // Limit 1: every worker decodes one request at a time, the rest queue.
        let mut q = SlotQueue::new(1, 1);
        for ticket in 0..3 {
            q.arrive(ticket);
        }
        assert_eq!(q.admit(0), vec![0]);
        assert_eq!(q.admit(0), Vec::<u64>::new());
        q.finished(0, 1);
        assert_eq!(q.admit(0), vec![1]);
    }

    #[test]
    fn a_long_utterance_does_not_hold_up_short_ones() {
        // Two workers; a 30-s utterance keeps one decoding. Six short ones arriving one
        // after another all run on the other, each alone, while it runs.
        let (scheduler, log, gate, long) = with_a_long_one(2, 4, 100);
        for i in 0..6 {
            assert_eq!(submit(&scheduler, Job::Steps(i, 3)).join().unwrap().0, i * 10);
        }
        assert!(!long.is_finished());
        let steps = log.steps.lock().unwrap().clone();
        let long_batch = steps.iter().find(|(_, t)| t.contains(&0)).unwrap().0;
        assert!(steps.iter().all(|(batch, tickets)| (*batch == long_batch) == (tickets == &vec![0])), "{steps:?}");
        assert_eq!(*log.joins.lock().unwrap(), (0..7).collect::<Vec<u64>>());
        gate.store(true, Ordering::SeqCst);
        assert_eq!(long.join().unwrap().0, 1000);
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting, report.largest_batch), (0, 0, 1), "nothing had to share");
    }

    #[test]
    fn a_short_utterance_decoded_with_a_long_one_is_answered_when_its_own_decoding_ends() {
        // One worker, batches of up to 4: the short one joins the long one's decoding
        // between steps and gets its answer while the long one goes on.
        let (scheduler, log, gate, long) = with_a_long_one(1, 4, 100);
        let (short, waited) = submit(&scheduler, Job::Steps(7, 5)).join().unwrap();
        assert_eq!(short, 70);
        assert!(waited < Duration::from_millis(500), "it joined between steps, not after the long one: {waited:?}");
        assert!(!long.is_finished());
        let shared = log.steps.lock().unwrap().iter().filter(|(_, t)| t == &vec![0, 1]).count();
        assert_eq!(shared, 5, "the two shared each of the short one's steps");
        gate.store(true, Ordering::SeqCst);
        assert_eq!(long.join().unwrap().0, 1000);
        assert_eq!(scheduler.report().largest_batch, 2);
    }

    #[test]
    fn with_every_worker_full_waiters_are_counted_and_served_in_arrival_order() {
        let (scheduler, log) = scheduler(1, 2);
        let gate = Arc::new(AtomicBool::new(false));
        let held: Vec<_> = (0..2).map(|i| submit(&scheduler, Job::Hold(100 + i, gate.clone()))).collect();
        until_joined(&log, 2);
        let mut waiters = Vec::new();
        for i in 0..3 {
            waiters.push(submit(&scheduler, Job::Steps(i, 2)));
            // Each queued before the next arrives, so arrival order is known.
            until(&scheduler, |r| r.waiting == i as usize + 1);
        }
        std::thread::sleep(Duration::from_millis(30));
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting), (1, 3));
        assert!(report.oldest_wait_secs >= 0.03, "{report:?}");
        gate.store(true, Ordering::SeqCst);
        for holder in held {
            holder.join().unwrap();
        }
        let served: Vec<(u32, Duration)> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(served.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 10, 20]);
        assert!(served.iter().all(|s| s.1 >= Duration::from_millis(30)), "{served:?}");
        assert_eq!(*log.joins.lock().unwrap(), (0..5).collect::<Vec<u64>>(), "oldest first");
        let report = scheduler.report();
        assert_eq!((report.busy, report.waiting, report.batch_limit, report.largest_batch), (0, 0, 2, 2));
        assert!(report.max_wait_secs >= 0.03);
    }

    #[test]
    fn a_panic_answers_every_request_of_its_batch_and_the_worker_goes_on() {
        let (scheduler, _log, _gate, held) = with_a_long_one(1, 2, 1);
        let faulty = submit(&scheduler, Job::Panic);
        assert_eq!(faulty.join().unwrap().0, u32::abandoned());
        assert_eq!(held.join().unwrap().0, u32::abandoned(), "the request decoded beside it got no answer");
        assert_eq!(scheduler.report().busy, 0);
        assert_eq!(scheduler.submit(Job::Steps(7, 1)).0, 70);
    }

    #[test]
    fn dropping_the_scheduler_stops_its_workers() {
        let (scheduler, _log) = scheduler(2, 1);
        assert_eq!(scheduler.submit(Job::Steps(1, 1)).0, 10);
        let shared = Arc::downgrade(&scheduler.shared);
        drop(scheduler);
        // Each worker holds the shared state until it ends: gone, so all ended.
        assert!(shared.upgrade().is_none(), "a worker outlived its scheduler");
    }
}
