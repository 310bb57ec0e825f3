//! Shared component health, written by components, read by `status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

/// How a component is doing. The control protocol has its own copy of this set
/// (`control::protocol::HealthState`), converted at the control boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Starting,
    Ok,
    Degraded,
    Failed,
    Stopped,
}

impl HealthState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// One component's latest health, with the time its state last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHealth {
    pub name: String,
    pub state: HealthState,
    pub detail: String,
    /// When the state last changed (formatted for people at the control boundary).
    pub since: SystemTime,
}

/// Component name → latest health. Short critical sections only.
#[derive(Clone, Default)]
pub struct HealthBoard(Arc<Mutex<BTreeMap<&'static str, ComponentHealth>>>);

impl HealthBoard {
    /// Records a component's state; `since` changes only when the state does.
    pub fn set(&self, name: &'static str, state: HealthState, detail: impl Into<String>) {
        let detail = detail.into();
        let Ok(mut board) = self.0.lock() else { return };
        let since = match board.get(name) {
            Some(old) if old.state == state => old.since,
            _ => SystemTime::now(),
        };
        board.insert(name, ComponentHealth { name: name.to_owned(), state, detail, since });
    }

    pub fn snapshot(&self) -> Vec<ComponentHealth> {
        self.0.lock().map(|b| b.values().cloned().collect()).unwrap_or_default()
    }
}

/// The order in which the daemon's parts stop, as in Vector's topology drain: each stage
/// is told to stop only once every component of the stages before it has ended, so what
/// an earlier stage still produces (the last utterance of a leg) reaches the later ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Inputs and the control socket: take no more audio or requests; drop the legs' feeds.
    Inputs,
    /// The speech service: join every leg's worker (each flushes its last utterance).
    Speech,
    /// Understanding: drain the utterance bus, finish every call.
    Understanding,
    /// Stores: write what is queued, close the databases.
    Stores,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Inputs, Stage::Speech, Stage::Understanding, Stage::Stores];

    pub fn name(self) -> &'static str {
        match self {
            Self::Inputs => "inputs",
            Self::Speech => "speech",
            Self::Understanding => "understanding",
            Self::Stores => "stores",
        }
    }

    pub fn next(self) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| *s > self)
    }
}

/// One shutdown signal per [`Stage`]; the supervisor triggers them in order.
pub struct StagedShutdown {
    stages: Vec<(Stage, ShutdownTrigger, ShutdownSignal)>,
}

impl Default for StagedShutdown {
    fn default() -> Self {
        let stages = Stage::ALL
            .iter()
            .map(|&stage| {
                let (trigger, signal) = shutdown_channel();
                (stage, trigger, signal)
            })
            .collect();
        Self { stages }
    }
}

impl StagedShutdown {
    /// What the components of `stage` wait on.
    pub fn signal(&self, stage: Stage) -> ShutdownSignal {
        self.stages.iter().find(|(s, ..)| *s == stage).map(|(_, _, signal)| signal.clone()).unwrap_or_else(|| {
            // Every stage has a channel (built from Stage::ALL); unreachable, but a closed
            // channel is the safe answer: its waiters wake at once.
            shutdown_channel().1
        })
    }

    pub fn trigger(&self, stage: Stage) {
        if let Some((_, trigger, _)) = self.stages.iter().find(|(s, ..)| *s == stage) {
            trigger.trigger();
        }
    }
}

/// Tells components that shutdown has begun: stop taking input, finish, return.
#[derive(Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

/// The supervisor's end of [`ShutdownSignal`].
pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn shutdown_channel() -> (ShutdownTrigger, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), ShutdownSignal(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has, or if the
    /// supervisor is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_kept_while_state_is_unchanged() {
        let board = HealthBoard::default();
        board.set("storage", HealthState::Ok, "10 GiB free");
        let first = board.snapshot()[0].since;
        std::thread::sleep(std::time::Duration::from_millis(5));
        board.set("storage", HealthState::Ok, "9 GiB free");
        let snap = board.snapshot();
        assert_eq!(snap[0].since, first);
        assert_eq!(snap[0].detail, "9 GiB free");
        board.set("storage", HealthState::Degraded, "full");
        assert_ne!(board.snapshot()[0].since, first);
    }

    #[tokio::test]
    async fn shutdown_signal_wakes_waiters() {
        let (trigger, signal) = shutdown_channel();
        let mut waiter = signal.clone();
        let task = tokio::spawn(async move { waiter.wait().await });
        assert!(!signal.is_triggered());
        trigger.trigger();
        task.await.unwrap();
        assert!(signal.is_triggered());
    }
}
