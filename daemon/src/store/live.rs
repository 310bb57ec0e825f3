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
use super::{now_ms, CallStore, Retention, StoreError, StoreOp};
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
    /// When the last retention sweep ran (ms since the epoch) and what it did.
    last_sweep: Mutex<Option<(i64, String)>>,
}

/// The shared handle to the store thread.
#[derive(Clone)]
pub struct CallVault {
    jobs: mpsc::Sender<Job>,
    keep_unmasked: bool,
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
    ) -> Result<(Self, VaultThread), StoreError> {
        let (keys, source) = master::load(state_dir, credentials_dir)?;
        let rotating = keys.next.is_some();
        let store = CallStore::open(state_dir, keys, config.keep_unmasked)?;
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
        Self::spawn(store, state_dir, source, config.keep_unmasked)
    }

    fn spawn(
        mut store: CallStore,
        state_dir: &Path,
        source: KeySource,
        keep_unmasked: bool,
    ) -> Result<(Self, VaultThread), StoreError> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new().name("call-store".into()).spawn(move || {
            let mut next: Option<Job> = None;
            loop {
                let job = match next.take() {
                    Some(job) => job,
                    None => match queue.blocking_recv() {
                        Some(job) => job,
                        None => break,
                    },
                };
                match job {
                    Job::Close => break,
                    Job::Request(f) => f(&mut store),
                    Job::Write(op) => {
                        let mut batch = vec![op];
                        while batch.len() < MAX_BATCH {
                            match queue.try_recv() {
                                Ok(Job::Write(op)) => batch.push(op),
                                Ok(request) => {
                                    next = Some(request);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        write(&mut store, &batch, &thread_counters);
                    }
                }
            }
            // Dropping the store closes both connections (SQLite checkpoints the WAL).
        });
        let thread = thread.map_err(|e| StoreError::Thread(format!("cannot start the store thread: {e}")))?;
        let handle =
            Self { jobs, keep_unmasked, counters, state_dir: state_dir.to_owned(), key_source: Arc::new(source) };
        Ok((handle.clone(), VaultThread { handle, thread }))
    }

    /// Whether unmasked text is kept (sealed under its own class key).
    pub fn keep_unmasked(&self) -> bool {
        self.keep_unmasked
    }

    /// Queues a write; waits while the queue is full.
    pub async fn write(&self, op: StoreOp) -> Result<(), StoreError> {
        self.jobs.send(Job::Write(op)).await.map_err(|_| closed())
    }

    /// The same from a plain thread (the spool); never from async code.
    pub fn write_blocking(&self, op: StoreOp) -> Result<(), StoreError> {
        self.jobs.blocking_send(Job::Write(op)).map_err(|_| closed())
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

    pub fn counters(&self) -> VaultCounters {
        VaultCounters {
            written: self.counters.written.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
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
            let summary = format!(
                "{} audio and {} transcripts shredded, {} calls deleted, {} stray keys, {} pages freed",
                report.audio_shredded,
                report.transcripts_shredded,
                report.calls_deleted,
                report.orphan_keys,
                report.pages_freed
            );
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

/// One group commit; on refusal, each operation alone.
fn write(store: &mut CallStore, batch: &[StoreOp], counters: &Counters) {
    counters.batches.fetch_add(1, Ordering::Relaxed);
    if store.apply(batch).is_ok() {
        counters.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        return;
    }
    for op in batch {
        match store.apply(std::slice::from_ref(op)) {
            Ok(()) => {
                counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Errors name call ids and what went wrong, never text.
                log::error!(component = COMPONENT, call_id = op.call(); "not stored ({}): {e}", op.kind());
            }
        }
    }
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
    let describe = |vault: &CallVault| {
        let c = vault.counters();
        let sweep = c.last_sweep.map_or("no sweep yet".to_owned(), |(_, s)| format!("last sweep: {s}"));
        format!("{} writes, {} refused; {sweep}", c.written, c.failed)
    };
    health.set(COMPONENT, HealthState::Ok, describe(&vault));
    let minutes = |c: &watch::Receiver<Arc<RunningConfig>>| c.borrow().config.store.sweep_interval_mins.max(1);
    let mut every = minutes(&config);
    let mut timer = tokio::time::interval(Duration::from_secs(every * 60));
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = timer.tick() => {
                let retention = retention(&config.borrow().config.store);
                match vault.sweep(retention).await {
                    Ok(_) => health.set(COMPONENT, HealthState::Ok, describe(&vault)),
                    Err(e) => {
                        log::error!(component = COMPONENT; "retention sweep failed: {e}");
                        health.set(COMPONENT, HealthState::Degraded, format!("retention sweep failed: {e}"));
                    }
                }
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
