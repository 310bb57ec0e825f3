//! The call store's task: one thread owns the [`CallStore`] (both SQLite connections);
//! the understanding shell, the spool and the control socket send it work through one
//! bounded queue, so no SQLite call (each commit is an fsync) runs on an async worker.
//!
//! Writes are batched: the thread takes every write already queued (up to `MAX_BATCH`)
//! and commits them as one transaction per file (group commit). If a batch is refused, it
//! is retried one operation at a time, so one bad operation costs only itself (logged
//! with its call id, counted). Senders wait when the queue is full (block, not drop): a
//! call's record is worth more than a moment of latency in the understanding shell, and
//! the thread commits thousands of calls a second (`callbox bench store`).
//!
//! The `store` component owns the thread: it sweeps retention on a timer and, in the last
//! shutdown stage (after understanding has finished every call), closes the queue, lets
//! the thread write what is queued and joins it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::master::{self, KeySource};
use super::{now_ms, CallStore, DiagnosticsReport, Retention, StoreError, StoreOp};
use crate::config::{RunningConfig, StoreConfig};
use crate::health::{HealthBoard, HealthState, ShutdownSignal};

const COMPONENT: &str = "store";
/// Operations waiting for the thread. A call is a handful per utterance; this is minutes
/// of a busy box's writes, and is only ever full if the disk has stalled.
const QUEUE: usize = 4096;
/// Most operations in one group commit.
const MAX_BATCH: usize = 512;

type Request = Box<dyn FnOnce(&mut CallStore) + Send>;

enum Job {
    Write(StoreOp),
    Request(Request),
    /// Everything queued before it is done; then the thread closes the store and ends.
    Close,
}

/// Counters the thread keeps for `status` and the health board.
#[derive(Default)]
struct Counters {
    written: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    /// Writes the disk refused, waiting to be retried.
    waiting: AtomicU64,
    /// Audio chunks dropped because the disk refused writes or was nearly full.
    audio_dropped: AtomicU64,
    /// Free space is below `storage.stop_audio_below_mb`: audio is not being kept.
    audio_paused: std::sync::atomic::AtomicBool,
    /// When the last retention sweep ran (ms since the epoch) and what it did.
    last_sweep: Mutex<Option<(i64, String)>>,
    /// Rows were added to the headquarters outbox (the uplink waits on it).
    outbox_wake: tokio::sync::Notify,
}

/// The shared handle to the store thread.
#[derive(Clone)]
pub struct CallVault {
    jobs: mpsc::Sender<Job>,
    keep_unmasked: bool,
    keep_audio: bool,
    counters: Arc<Counters>,
    state_dir: PathBuf,
    key_source: Arc<KeySource>,
}

/// The thread, owned by the `store` component.
pub struct VaultThread {
    handle: CallVault,
    thread: std::thread::JoinHandle<()>,
}

/// What the store looks like from outside (status, doctor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultCounters {
    pub written: u64,
    pub failed: u64,
    pub batches: u64,
    pub waiting: u64,
    pub audio_dropped: u64,
    pub audio_paused: bool,
    pub last_sweep: Option<(i64, String)>,
}

impl CallVault {
    /// Loads the master key (systemd credential or key file), opens the store (finishing
    /// a key rotation a stop interrupted, marking calls left open as interrupted) and
    /// starts the thread.
    pub fn open(
        state_dir: &Path,
        credentials_dir: Option<&Path>,
        config: &StoreConfig,
        stop_audio_below_mb: u64,
        outbox: Option<super::OutboxSettings>,
    ) -> Result<(Self, VaultThread), StoreError> {
        let (keys, source) = master::load(state_dir, credentials_dir)?;
        let rotating = keys.next.is_some();
        let mut store = CallStore::open(state_dir, keys, config.keep_unmasked)?;
        if let Some(settings) = outbox {
            store.enable_outbox(settings)?;
        }
        if rotating {
            master::promote_next(state_dir)?;
            log::info!(component = COMPONENT; "a master-key rotation that had stopped was finished");
        }
        match &source {
            KeySource::Created(path) => log::warn!(component = COMPONENT;
                "a new master key was created at {}: back it up apart from the box (README \"Call store\"); without it no stored call can be read", path.display()),
            KeySource::Credential(path) => {
                log::info!(component = COMPONENT; "master key from the systemd credential {}", path.display())
            }
            KeySource::File(path) => log::info!(component = COMPONENT; "master key from {}", path.display()),
        }
        let audio_floor = AudioFloor::new(state_dir.join(super::STORE_DIR), stop_audio_below_mb);
        Self::spawn(store, state_dir, source, config, audio_floor)
    }

    fn spawn(
        store: CallStore,
        state_dir: &Path,
        source: KeySource,
        config: &StoreConfig,
        audio_floor: AudioFloor,
    ) -> Result<(Self, VaultThread), StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>(QUEUE);
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("call-store".into())
            .spawn(move || {
                StoreLoop { store, queue, counters: thread_counters, backlog: Backlog::default(), audio_floor }.run()
            })
            .map_err(|e| StoreError::Thread(format!("cannot start the store thread: {e}")));
        let thread = thread?;
        let handle = Self {
            jobs,
            keep_unmasked: config.keep_unmasked,
            keep_audio: config.keep_audio,
            counters,
            state_dir: state_dir.to_owned(),
            key_source: Arc::new(source),
        };
        Ok((handle.clone(), VaultThread { handle, thread }))
    }

    /// Whether unmasked text is kept (sealed under its own class key).
    pub fn keep_unmasked(&self) -> bool {
        self.keep_unmasked
    }

    /// Whether audio is kept (`store.keep_audio`).
    pub fn keep_audio(&self) -> bool {
        self.keep_audio
    }

    /// Queues a write; waits while the queue is full.
    pub async fn write(&self, op: StoreOp) -> Result<(), StoreError> {
        self.jobs.send(Job::Write(op)).await.map_err(|_| closed())
    }

    /// The same from a plain thread (the spool); never from async code.
    pub fn write_blocking(&self, op: StoreOp) -> Result<(), StoreError> {
        self.jobs.blocking_send(Job::Write(op)).map_err(|_| closed())
    }

    /// Returns once the store thread has handled every write queued before this call
    /// (from a plain thread: the spool, before it deletes a recording).
    pub fn barrier_blocking(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Request(Box::new(move |_: &mut CallStore| {
            let _ = reply.send(());
        }));
        self.jobs.blocking_send(job).map_err(|_| closed())?;
        answer.blocking_recv().map_err(|_| closed())
    }

    /// Runs `f` on the store thread after every write queued before it, and returns its
    /// answer (so a `calls show` sees the utterances understood before it was asked).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CallStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Request(Box::new(move |store: &mut CallStore| {
            let _ = reply.send(f(store));
        }));
        self.jobs.send(job).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Resolves when the store has queued outbox rows since the last time (at once if it
    /// had before anyone waited).
    pub async fn outbox_changed(&self) {
        self.counters.outbox_wake.notified().await
    }

    pub fn counters(&self) -> VaultCounters {
        VaultCounters {
            written: self.counters.written.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            waiting: self.counters.waiting.load(Ordering::Relaxed),
            audio_dropped: self.counters.audio_dropped.load(Ordering::Relaxed),
            audio_paused: self.counters.audio_paused.load(Ordering::Relaxed),
            last_sweep: self.counters.last_sweep.lock().map(|s| s.clone()).unwrap_or(None),
        }
    }

    /// `callbox keys rotate`: a new master key written beside the old one, every class key
    /// re-wrapped under it, then the new file replaces the old. A stop at any step is
    /// finished by the next start. Keys given as a systemd credential are rotated with
    /// `systemd-creds`, not here.
    pub async fn rotate_master_key(&self) -> Result<(usize, String), StoreError> {
        if let KeySource::Credential(path) = self.key_source.as_ref() {
            return Err(StoreError::MasterKey(format!(
                "the master key comes from the systemd credential {}: rotate it with systemd-creds \
                 (README \"Call store\"), not with callbox",
                path.display()
            )));
        }
        let state_dir = self.state_dir.clone();
        self.run(move |store| {
            let next = master::create_next(&state_dir)?;
            let done = store.rotate_master(next)?;
            master::promote_next(&state_dir)?;
            Ok((done, store.master_id().to_owned()))
        })
        .await
    }

    /// One retention sweep now.
    pub async fn sweep(&self, retention: Retention) -> Result<super::SweepReport, StoreError> {
        let counters = self.counters.clone();
        self.run(move |store| {
            let now = now_ms();
            let report = store.sweep(&retention, now)?;
            let summary = report.describe();
            if let Ok(mut last) = counters.last_sweep.lock() {
                *last = Some((now, summary));
            }
            Ok(report)
        })
        .await
    }
}

impl VaultThread {
    /// Closes the store from a plain thread (the offline bench): everything queued is
    /// written, the connections closed, the thread joined; returns the final counters.
    pub fn close_blocking(self) -> Result<VaultCounters, StoreError> {
        let VaultThread { handle, thread } = self;
        let _ = handle.jobs.blocking_send(Job::Close);
        thread.join().map_err(|_| StoreError::Thread("the store thread panicked".into()))?;
        Ok(handle.counters())
    }
}

/// The store thread: takes jobs in order; writes are group-committed. While the disk
/// refuses writes (full, I/O errors), they wait in the backlog and are retried with
/// backoff, in order; reads are still answered. A closed enum of jobs, one owner.
struct StoreLoop {
    store: CallStore,
    queue: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    backlog: Backlog,
    audio_floor: AudioFloor,
}

/// Free space under which audio is not kept (`storage.stop_audio_below_mb`), looked at
/// no more than once every few seconds.
struct AudioFloor {
    dir: PathBuf,
    floor_bytes: u64,
    checked: Option<(std::time::Instant, bool)>,
}

impl AudioFloor {
    const EVERY: Duration = Duration::from_secs(5);

    fn new(dir: PathBuf, floor_mb: u64) -> Self {
        Self { dir, floor_bytes: floor_mb.saturating_mul(1 << 20), checked: None }
    }

    /// Whether there is room for audio; says so in the log when that changes.
    fn room(&mut self) -> bool {
        if let Some((at, room)) = self.checked {
            if at.elapsed() < Self::EVERY {
                return room;
            }
        }
        let free = crate::storage::free_bytes(&self.dir);
        // A failed look is not a reason to drop audio; a refused write will show.
        let room = free.is_none_or(|free| free >= self.floor_bytes);
        let before = self.checked.map(|(_, r)| r);
        if before != Some(room) && (before.is_some() || !room) {
            if room {
                log::info!(component = COMPONENT; "free space is back above storage.stop_audio_below_mb: audio is kept again");
            } else {
                log::warn!(component = COMPONENT;
                    "free space is below storage.stop_audio_below_mb ({} MiB): audio is not kept until there is room (the words of calls still are)",
                    self.floor_bytes >> 20);
            }
        }
        self.checked = Some((std::time::Instant::now(), room));
        room
    }
}

/// Writes the disk refused, oldest first, with their size. Past `BACKLOG_BYTES` the
/// thread stops taking writes off the queue, so senders wait (block, not drop); audio is
/// the exception: while the disk refuses writes, new audio is dropped (counted), so the
/// words of the calls keep their place.
#[derive(Default)]
struct Backlog {
    ops: std::collections::VecDeque<StoreOp>,
    bytes: usize,
    since: Option<std::time::Instant>,
}

/// Most bytes of refused writes held in memory before senders wait.
const BACKLOG_BYTES: usize = 64 << 20;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MOST: Duration = Duration::from_secs(5);

impl StoreLoop {
    fn run(mut self) {
        let mut next: Option<Job> = None;
        let mut delay = RETRY_FIRST;
        loop {
            if !self.backlog.ops.is_empty() {
                std::thread::sleep(delay);
                if self.retry_backlog() {
                    self.wake_uplink();
                    delay = RETRY_FIRST;
                } else {
                    delay = (delay * 2).min(RETRY_MOST);
                }
                // What arrived meanwhile: writes join the backlog (in order), reads are
                // answered now; a close ends the loop after one last attempt.
                while self.backlog.bytes < BACKLOG_BYTES && !self.backlog.ops.is_empty() {
                    match self.queue.try_recv() {
                        Ok(Job::Write(op)) => self.hold(op),
                        Ok(Job::Request(f)) => f(&mut self.store),
                        Ok(Job::Close) => return self.close(),
                        Err(_) => break,
                    }
                }
                continue;
            }
            let job = match next.take() {
                Some(job) => job,
                None => match self.queue.blocking_recv() {
                    Some(job) => job,
                    None => break,
                },
            };
            match job {
                Job::Close => return self.close(),
                Job::Request(f) => f(&mut self.store),
                Job::Write(op) => {
                    let mut batch = Vec::new();
                    self.admit(op, &mut batch);
                    while batch.len() < MAX_BATCH {
                        match self.queue.try_recv() {
                            Ok(Job::Write(op)) => self.admit(op, &mut batch),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    let refused = write(&mut self.store, batch, &self.counters);
                    for op in refused {
                        self.hold(op);
                    }
                }
            }
            self.wake_uplink();
        }
        // Dropping the store closes both connections (SQLite checkpoints the WAL).
    }

    /// Tells the uplink about rows committed to the outbox (a write, a forget).
    fn wake_uplink(&mut self) {
        if self.store.take_outbox_dirty() {
            self.counters.outbox_wake.notify_one();
        }
    }

    /// Adds a write to the batch, unless it is audio and the disk is nearly full.
    fn admit(&mut self, op: StoreOp, batch: &mut Vec<StoreOp>) {
        if matches!(op, StoreOp::Audio { .. }) {
            let room = self.audio_floor.room();
            self.counters.audio_paused.store(!room, Ordering::Relaxed);
            if !room {
                self.counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        batch.push(op);
    }

    /// Keeps a write the disk refused (or one that arrived while it refuses).
    fn hold(&mut self, op: StoreOp) {
        if self.backlog.ops.is_empty() {
            self.backlog.since = Some(std::time::Instant::now());
            log::error!(component = COMPONENT, call_id = op.call();
                "the disk refuses writes: they are kept in memory and retried (see storage in callbox status)");
        } else if matches!(op, StoreOp::Audio { .. }) {
            self.counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.backlog.bytes += op.approx_bytes();
        self.backlog.ops.push_back(op);
        self.counters.waiting.store(self.backlog.ops.len() as u64, Ordering::Relaxed);
    }

    /// Writes the backlog in batches, in order, until the disk refuses again. True when
    /// something was written.
    fn retry_backlog(&mut self) -> bool {
        let mut progressed = false;
        while !self.backlog.ops.is_empty() {
            let take = self.backlog.ops.len().min(MAX_BATCH);
            let batch: Vec<StoreOp> = self.backlog.ops.drain(..take).collect();
            let sent: usize = batch.iter().map(StoreOp::approx_bytes).sum();
            let refused = write(&mut self.store, batch, &self.counters);
            let kept: usize = refused.iter().map(StoreOp::approx_bytes).sum();
            progressed |= kept < sent;
            self.backlog.bytes -= sent - kept;
            let stop = !refused.is_empty();
            for op in refused.into_iter().rev() {
                self.backlog.ops.push_front(op);
            }
            if stop {
                break;
            }
        }
        self.counters.waiting.store(self.backlog.ops.len() as u64, Ordering::Relaxed);
        if self.backlog.ops.is_empty() {
            let waited = self.backlog.since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
            self.backlog.bytes = 0;
            log::info!(component = COMPONENT; "the disk takes writes again: every kept write is stored ({waited:.1} s)");
        }
        progressed
    }

    /// The last shutdown stage: everything queued is written; what the disk still refuses
    /// after one more attempt is lost, and the log says how much and of which calls.
    fn close(mut self) {
        while let Ok(job) = self.queue.try_recv() {
            match job {
                Job::Write(op) if !self.backlog.ops.is_empty() => self.hold(op),
                Job::Write(op) => {
                    for op in write(&mut self.store, vec![op], &self.counters) {
                        self.hold(op);
                    }
                }
                Job::Request(f) => f(&mut self.store),
                Job::Close => {}
            }
        }
        if !self.backlog.ops.is_empty() {
            self.retry_backlog();
        }
        if !self.backlog.ops.is_empty() {
            let mut calls: Vec<&str> = self.backlog.ops.iter().map(StoreOp::call).collect();
            calls.dedup();
            self.counters.failed.fetch_add(self.backlog.ops.len() as u64, Ordering::Relaxed);
            log::error!(component = COMPONENT;
                "stopping with {} writes the disk refused; not stored: calls {}", self.backlog.ops.len(), calls.join(", "));
        }
    }
}

/// One group commit; on refusal, each operation alone. Returns the operations the disk
/// refused for now (a transient error), in order, from the first such one on: they are
/// retried later. An operation refused for itself is logged and counted, and dropped.
fn write(store: &mut CallStore, batch: Vec<StoreOp>, counters: &Counters) -> Vec<StoreOp> {
    counters.batches.fetch_add(1, Ordering::Relaxed);
    if store.apply(&batch).is_ok() {
        counters.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        return Vec::new();
    }
    let mut ops = batch.into_iter();
    while let Some(op) = ops.next() {
        match store.apply(std::slice::from_ref(&op)) {
            Ok(()) => {
                counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_transient() => {
                // Kept with every later one, so a call's writes stay in order.
                return std::iter::once(op).chain(ops).collect();
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Errors name call ids and what went wrong, never text.
                log::error!(component = COMPONENT, call_id = op.call(); "not stored ({}): {e}", op.kind());
            }
        }
    }
    Vec::new()
}

fn closed() -> StoreError {
    StoreError::Thread("the call store is closed (the daemon is stopping)".into())
}

/// Retention from the configuration.
pub fn retention(config: &StoreConfig) -> Retention {
    Retention {
        audio_days: config.audio_days,
        transcript_days: config.transcript_days,
        metadata_days: config.metadata_days,
    }
}

/// The `store` component: sweeps retention now and then every
/// `store.sweep_interval_mins`; in the last shutdown stage, writes what is queued, closes
/// the store and joins its thread.
pub async fn run(
    store: VaultThread,
    mut config: watch::Receiver<Arc<RunningConfig>>,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), StoreError> {
    let vault = store.handle.clone();
    // Health follows the disk every few seconds: writes the disk refuses, or audio not kept
    // for lack of room, make the store degraded until they clear (status, doctor).
    let mut sweep_failed: Option<String> = None;
    let mut close_failed: Option<String> = None;
    let report = |vault: &CallVault, sweep_failed: &Option<String>| {
        let c = vault.counters();
        let sweep = c.last_sweep.map_or("no sweep yet".to_owned(), |(_, s)| format!("last sweep: {s}"));
        let mut detail =
            format!("{} writes, {} refused, {} waiting for the disk; {sweep}", c.written, c.failed, c.waiting);
        if c.audio_paused {
            detail += "; AUDIO NOT KEPT: free space below storage.stop_audio_below_mb";
        }
        if let Some(e) = sweep_failed {
            detail += &format!("; retention sweep failed: {e}");
        }
        let degraded = c.waiting > 0 || c.audio_paused || sweep_failed.is_some();
        health.set(COMPONENT, if degraded { HealthState::Degraded } else { HealthState::Ok }, detail);
    };
    report(&vault, &sweep_failed);
    let mut refresh = tokio::time::interval(Duration::from_secs(5));
    let minutes = |c: &watch::Receiver<Arc<RunningConfig>>| c.borrow().config.store.sweep_interval_mins.max(1);
    let mut every = minutes(&config);
    let mut timer = tokio::time::interval(Duration::from_secs(every * 60));
    // With `[hq]`: a health report for HQ now (the box came up) and every
    // `hq.diagnostics_mins` (a restart applies a change, as for the rest of `[hq]`).
    let started = std::time::Instant::now();
    let hq = config.borrow().config.hq.clone();
    let mut diagnostics = tokio::time::interval(Duration::from_secs(hq.diagnostics_mins.max(1) * 60));
    diagnostics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = diagnostics.tick(), if hq.enabled() => {
                let report = diagnostics_report(&vault, &health, started);
                if let Err(e) = vault.write(StoreOp::Diagnostics(report)).await {
                    log::error!(component = COMPONENT; "health report for HQ not queued: {e}");
                }
            }
            _ = timer.tick() => {
                let retention = retention(&config.borrow().config.store);
                sweep_failed = match vault.sweep(retention).await {
                    Ok(_) => None,
                    Err(e) => {
                        log::error!(component = COMPONENT; "retention sweep failed: {e}");
                        Some(e.to_string())
                    }
                };
                report(&vault, &sweep_failed);
            }
            _ = refresh.tick() => {
                // Aggregate windows that have ended go to the outbox (no-op without `[hq]`).
                let closed = vault.run(|store| store.outbox_tick(super::now_ms())).await;
                match closed {
                    Ok(_) => close_failed = None,
                    Err(e) if close_failed.as_deref() != Some(&e.to_string()) => {
                        log::error!(component = COMPONENT; "aggregate windows not queued for HQ (tried again every 5 s): {e}");
                        close_failed = Some(e.to_string());
                    }
                    Err(_) => {}
                }
                report(&vault, &sweep_failed);
            }
            Ok(()) = config.changed() => {
                let wanted = minutes(&config);
                if wanted != every {
                    every = wanted;
                    timer = tokio::time::interval(Duration::from_secs(every * 60));
                    timer.tick().await;
                }
            }
        }
    }
    let c = vault.counters();
    log::info!(component = COMPONENT; "closing: {} writes in {} group commits, {} refused", c.written, c.batches, c.failed);
    // Queued after every write sent before it: those are committed first.
    let _ = vault.jobs.send(Job::Close).await;
    drop(vault);
    let VaultThread { handle, thread } = store;
    drop(handle);
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    health.set(COMPONENT, HealthState::Stopped, "closed");
    match joined {
        Ok(Ok(())) => Ok(()),
        _ => Err(StoreError::Thread("the store thread panicked".into())),
    }
}

/// The box's health as HQ gets it: states only (details may name calls or paths).
fn diagnostics_report(vault: &CallVault, health: &HealthBoard, started: std::time::Instant) -> DiagnosticsReport {
    let c = vault.counters();
    DiagnosticsReport {
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: started.elapsed().as_secs(),
        components: health.snapshot().into_iter().map(|h| (h.name, h.state.name().to_owned())).collect(),
        store_writes: c.written,
        store_refused: c.failed,
        store_waiting: c.waiting,
        audio_dropped: c.audio_dropped,
        disk_free_mb: crate::storage::free_bytes(&vault.state_dir).map(|b| b >> 20),
        // Filled in by the store, which knows its outbox.
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{master, CallEnd, CallFilter, CallStart, StoredUtterance};
    use std::process::Command;

    /// A tmpfs of a few MiB: a disk that really fills. Unmounted when dropped.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(at: &Path, mib: u32) -> Self {
            std::fs::create_dir_all(at).unwrap();
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
                .arg(at)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "this test mounts a small tmpfs to fill a real disk, so it runs as root (CI does): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Self(at.to_owned())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    fn call_ops(id: &str, at_ms: i64, utterances: u64) -> Vec<StoreOp> {
        let begin = CallStart { id: id.into(), source: "test".into(), started_unix_ms: at_ms, ..Default::default() };
        let mut ops = vec![StoreOp::Begin(begin)];
        for index in 0..utterances {
            let text = format!("第{index}句 {}", "请问这个套餐每个月多少钱 ".repeat(8));
            let u = StoredUtterance { index, leg: "customer".into(), text, ..Default::default() };
            ops.push(StoreOp::Append { call: id.into(), utterances: vec![u] });
        }
        ops.push(StoreOp::Finish { call: id.into(), end: CallEnd { ended_unix_ms: at_ms + 1, ..Default::default() } });
        ops
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Below `storage.stop_audio_below_mb` audio is not kept, and says so; words still are.
    #[test]
    fn audio_stops_first_when_free_space_is_below_its_floor() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { keep_audio: true, ..Default::default() };
        // A floor above any disk's free space (16 TiB).
        let (vault, thread) = CallVault::open(dir.path(), None, &config, 16 << 20, None).unwrap();
        let mut ops = call_ops("c", 1_000, 3);
        let chunk = crate::store::audio::AudioChunk {
            leg: crate::audio::Leg::Agent,
            index: 0,
            last: true,
            rate: 8000,
            start_secs: 0.0,
            mulaw: vec![0x55; 800],
        };
        ops.insert(1, StoreOp::Audio { call: "c".into(), chunk });
        for op in ops {
            vault.write_blocking(op).unwrap();
        }
        vault.barrier_blocking().unwrap();
        let c = vault.counters();
        assert_eq!((c.audio_dropped, c.audio_paused, c.written, c.failed), (1, true, 5, 0));
        thread.close_blocking().unwrap();
        let (keys, _) = master::load(dir.path(), None).unwrap();
        let store = CallStore::open(dir.path(), keys, false).unwrap();
        let call = store.summary("c").unwrap();
        assert_eq!((call.utterances, call.audio_secs.len()), (3, 0));
    }

    /// The disk fills while calls stream in: no write is dropped or refused for good; they
    /// wait in order and are all stored once there is room; audio yields first.
    #[test]
    fn a_full_disk_holds_writes_in_order_and_stores_every_one_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let _disk = Tmpfs::mount(&state, 8);
        let config = StoreConfig { keep_audio: true, ..Default::default() };
        let (vault, thread) = CallVault::open(&state, None, &config, 0, None).unwrap();
        let mut sent = 0u64;
        for i in 0..5 {
            for op in call_ops(&format!("before-{i}"), 1_000 + i, 20) {
                vault.write_blocking(op).unwrap();
                sent += 1;
            }
        }
        vault.barrier_blocking().unwrap();
        assert_eq!(vault.counters().written, sent);

        // Fill the disk to the last byte.
        let filler = state.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 64 * 1024];
            while f.write_all(&block).is_ok() {}
            while f.write_all(&block[..512]).is_ok() {}
            let _ = f.sync_all();
        }
        for i in 0..40 {
            let id = format!("full-{i}");
            for op in call_ops(&id, 2_000 + i, 20) {
                vault.write_blocking(op).unwrap();
                sent += 1;
            }
            let chunk = crate::store::audio::AudioChunk {
                leg: crate::audio::Leg::Customer,
                index: 0,
                last: true,
                rate: 8000,
                start_secs: 0.0,
                mulaw: vec![0x55; 8000],
            };
            vault.write_blocking(StoreOp::Audio { call: id, chunk }).unwrap();
        }
        wait_for("the store to hold refused writes", || vault.counters().waiting > 0);
        vault.barrier_blocking().unwrap();
        let stalled = vault.counters();
        assert_eq!(stalled.failed, 0, "nothing is refused for good: {:?}", stalled.waiting);
        assert!(stalled.written < sent, "the disk is full, yet every write went in");
        assert!(stalled.audio_dropped > 0, "audio yields first while the disk refuses writes");

        // Room again: everything held is written, in order, and nothing twice.
        std::fs::remove_file(&filler).unwrap();
        wait_for("the held writes to be stored", || vault.counters().waiting == 0);
        let done = thread.close_blocking().unwrap();
        assert_eq!((done.failed, done.written), (0, sent));
        let (keys, _) = master::load(&state, None).unwrap();
        let store = CallStore::open(&state, keys, false).unwrap();
        assert_eq!(store.integrity().unwrap(), "ok");
        let calls = store.list(&CallFilter { limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(calls.len(), 45);
        for c in &calls {
            assert_eq!((c.status.as_str(), c.utterances), ("finished", 20), "{}", c.id);
        }
    }
}
