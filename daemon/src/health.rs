//! Shared component health, written by components, read by `status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::control::protocol::{ComponentHealth, HealthState};
use crate::logging::utc_timestamp;

/// Component name → latest health. Short critical sections only.
#[derive(Clone, Default)]
pub struct HealthBoard(Arc<Mutex<BTreeMap<&'static str, ComponentHealth>>>);

impl HealthBoard {
    /// Records a component's state; `since` changes only when the state does.
    pub fn set(&self, name: &'static str, state: HealthState, detail: impl Into<String>) {
        let detail = detail.into();
        let Ok(mut board) = self.0.lock() else { return };
        let since = match board.get(name) {
            Some(old) if old.state == state => old.since.clone(),
            _ => utc_timestamp(SystemTime::now()),
        };
        board.insert(name, ComponentHealth { name: name.to_owned(), state, detail, since });
    }

    pub fn snapshot(&self) -> Vec<ComponentHealth> {
        self.0.lock().map(|b| b.values().cloned().collect()).unwrap_or_default()
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
        let first = board.snapshot()[0].since.clone();
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
