//! systemd's service notification protocol, without libsystemd: one datagram
//! per state change to the `AF_UNIX` socket named by `NOTIFY_SOCKET` (a path,
//! or an abstract name when it starts with `@`). Unset: notifications are off.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A state change systemd understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    Ready,
    /// Free-form status line shown by `systemctl status`.
    Status(String),
    Watchdog,
    /// Reload started; systemd ≥ 253 wants the monotonic clock with it.
    Reloading {
        monotonic_usec: u64,
    },
    Stopping,
}

impl Notification {
    /// The datagram payload (newline-separated `KEY=VALUE` assignments).
    pub fn payload(&self) -> String {
        match self {
            Self::Ready => "READY=1".into(),
            // A newline would start a new assignment: keep status to one line.
            Self::Status(text) => format!("STATUS={}", text.replace(['\n', '\r'], " ")),
            Self::Watchdog => "WATCHDOG=1".into(),
            Self::Reloading { monotonic_usec } => {
                format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
            }
            Self::Stopping => "STOPPING=1".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract name (@…)")]
    BadAddress(String),
    #[error("cannot create notification socket: {0}")]
    Socket(io::Error),
}

/// Sends notifications to systemd, or nothing when not run by systemd.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn disabled() -> Self {
        Self { target: None }
    }

    /// Reads `NOTIFY_SOCKET`; unset or empty means notifications are off.
    pub fn from_env() -> Result<Self, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(value) if !value.is_empty() => Self::for_address(&value),
            _ => Ok(Self::disabled()),
        }
    }

    pub fn for_address(value: &str) -> Result<Self, NotifyError> {
        let addr = if let Some(name) = value.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value)
        } else {
            return Err(NotifyError::BadAddress(value.to_owned()));
        }
        .map_err(|_| NotifyError::BadAddress(value.to_owned()))?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // Never block the supervisor on a slow receiver; a lost datagram is
        // logged, and a lost watchdog ping is covered by the next one.
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Self { target: Some((socket, addr)) })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    pub fn send(&self, notification: &Notification) -> io::Result<()> {
        match &self.target {
            Some((socket, addr)) => socket.send_to_addr(notification.payload().as_bytes(), addr).map(drop),
            None => Ok(()),
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends, when the watchdog is meant for this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval(watchdog_usec: Option<&str>, watchdog_pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = watchdog_pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = watchdog_usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC` wants it.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_follow_sd_notify() {
        assert_eq!(Notification::Ready.payload(), "READY=1");
        assert_eq!(Notification::Status("a\nb".into()).payload(), "STATUS=a b");
        assert_eq!(Notification::Reloading { monotonic_usec: 5 }.payload(), "RELOADING=1\nMONOTONIC_USEC=5");
    }

    #[test]
    fn watchdog_interval_is_half_and_respects_pid() {
        assert_eq!(watchdog_interval(Some("2000000"), None, 7), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("7"), 7), Some(Duration::from_secs(1)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("junk"), None, 7), None);
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        Notifier::for_address(path.to_str().unwrap()).unwrap().send(&Notification::Ready).unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("callbox-notify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::for_address(&format!("@{name}")).unwrap().send(&Notification::Stopping).unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn relative_address_is_refused() {
        assert!(matches!(Notifier::for_address("notify.sock"), Err(NotifyError::BadAddress(_))));
    }
}
