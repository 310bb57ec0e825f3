//! The daemon as systemd runs it: notifications, signals, reload, supervision.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::support::{wait_until, NotifyListener, TestDaemon};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn notifies_ready_watchdog_stopping_and_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifyListener::bind_path(dir.path());
    let address = notify.address.clone();
    // 200 ms watchdog: pings due every 100 ms.
    let mut daemon = TestDaemon::start_in(dir, "", &[("NOTIFY_SOCKET", &address), ("WATCHDOG_USEC", "200000")]);
    let ready = notify.wait_for("READY=1", 0, WAIT).expect("READY=1");
    let first_ping = notify.wait_for("WATCHDOG=1", ready, WAIT).expect("a WATCHDOG=1 after READY");
    let fourth =
        (0..3).try_fold(first_ping, |after, _| notify.wait_for("WATCHDOG=1", after + 1, Duration::from_secs(2)));
    assert!(fourth.is_some(), "watchdog pings stopped: {:?}", notify.received);
    let (t_first, t_fourth) = (notify.received[first_ping].0, notify.received[fourth.unwrap()].0);
    // Three intervals of 100 ms; generous upper bound for loaded CI machines,
    // but a daemon pinging once per second would fail it.
    assert!(t_fourth - t_first < Duration::from_millis(900), "pings too slow: {:?}", t_fourth - t_first);

    let status = daemon.status_json();
    assert_eq!(status["systemd_notify"], true);
    assert_eq!(status["watchdog_interval_ms"], 100);

    let stop_sent = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let before_stop = notify.received.len();
    notify.wait_for("STOPPING=1", before_stop.saturating_sub(1), WAIT).expect("STOPPING=1");
    let exit = daemon.wait_exit(WAIT).expect("daemon exits after SIGTERM");
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log_text());
    // The default deadline is 10 s; with nothing in flight it must be far quicker.
    assert!(stop_sent.elapsed() < Duration::from_secs(10), "took {:?}", stop_sent.elapsed());
    assert!(!daemon.socket.exists(), "socket file left behind");
}

/// A stop request the moment READY=1 is sent is handled, never the default action (the
/// handlers exist from the first moment of `run`, before READY).
#[test]
fn sigterm_right_after_ready_is_a_clean_stop() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let mut notify = NotifyListener::bind_path(dir.path());
        let config = dir.path().join("callbox.toml");
        std::fs::write(&config, TestDaemon::config_text(dir.path(), "")).unwrap();
        let log = dir.path().join("daemon.log");
        let mut child = TestDaemon::spawn(&config, &log, &[("NOTIFY_SOCKET", &notify.address.clone())]);
        notify.wait_for("READY=1", 0, WAIT).expect("READY=1");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "{status:?}; log:\n{text}");
    }
}

#[test]
fn abstract_notify_socket_is_supported() {
    let name = format!("callbox-test-{}-{}", std::process::id(), line!());
    let mut notify = NotifyListener::bind_abstract(&name);
    let address = notify.address.clone();
    let mut daemon = TestDaemon::start("", &[("NOTIFY_SOCKET", &address)]);
    assert!(notify.wait_for("READY=1", 0, WAIT).is_some());
    assert!(notify.wait_for("STATUS=running", 0, WAIT).is_some());
    // No WATCHDOG_USEC: no pings.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(notify.count("WATCHDOG=1"), 0);
    daemon.signal(Signal::SIGINT);
    assert_eq!(daemon.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
}

#[test]
fn sighup_with_a_bad_file_keeps_running_on_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifyListener::bind_path(dir.path());
    let address = notify.address.clone();
    let mut daemon = TestDaemon::start_in(dir, "log.level = \"info\"", &[("NOTIFY_SOCKET", &address)]);
    notify.wait_for("READY=1", 0, WAIT).expect("READY=1");
    assert_eq!(daemon.status_json()["config_generation"], 1);

    let good = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(&daemon.config, format!("{good}\n[log]\nlevel = \"chatty\"\nmystery = 1\n")).unwrap();
    let mark = notify.received.len();
    daemon.signal(Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", mark, WAIT).expect("RELOADING=1");
    assert!(notify.received[reloading].1.contains("MONOTONIC_USEC="));
    notify.wait_for("READY=1", reloading, WAIT).expect("READY=1 after reload");
    notify.wait_for("previous configuration kept", reloading, WAIT).expect("STATUS says reload failed");

    assert!(daemon.is_running(), "daemon died on a bad reload; log:\n{}", daemon.log_text());
    let status = daemon.status_json();
    assert_eq!(status["config_generation"], 1, "{status}");
    assert_eq!(status["log_level"], "info");
    assert_eq!(status["last_reload"]["ok"], false);
    let problems = status["last_reload"]["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("duplicate")), "{problems:?}");
    let log = daemon.log_text();
    assert!(log.contains("reload refused"), "{log}");

    // A good file afterwards is applied, with a live change visible in status.
    std::fs::write(&daemon.config, good.replace("level = \"info\"", "level = \"debug\"")).unwrap();
    let mark = notify.received.len();
    daemon.signal(Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", mark, WAIT).expect("second RELOADING=1");
    notify.wait_for("READY=1", reloading, WAIT).expect("READY=1");
    let status = daemon.status_json();
    assert_eq!(status["config_generation"], 2, "{status}\nlog:\n{}", daemon.log_text());
    assert_eq!(status["log_level"], "debug");
    assert_eq!(status["last_reload"]["ok"], true);
}

#[test]
fn reload_through_the_cli_reports_problems_and_exits_78() {
    let daemon = TestDaemon::start("", &[]);
    std::fs::write(&daemon.config, "[daemon]\nshutdown_timeout_secs = 0\n").unwrap();
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(78), "{}", crate::support::stderr_of(&out));
    let text = crate::support::stdout_of(&out);
    assert!(text.contains("daemon.shutdown_timeout_secs"), "{text}");
    assert_eq!(daemon.status_json()["config_generation"], 1);
}

#[test]
fn a_daemon_started_from_a_file_refuses_to_reload_from_nothing() {
    let daemon = TestDaemon::start("audiosocket.allowed_peers = [\"127.0.0.2\"]", &[]);
    for (what, damage) in [("does not exist", None), ("is empty", Some(""))] {
        match damage {
            None => std::fs::remove_file(&daemon.config).unwrap(),
            Some(text) => std::fs::write(&daemon.config, text).unwrap(),
        }
        let out = daemon.cli(&["reload"]);
        assert_eq!(out.status.code(), Some(78), "{what}: {}", crate::support::stdout_of(&out));
        let text = crate::support::stdout_of(&out);
        assert!(text.contains(what) && text.contains("does not reload from nothing"), "{text}");
        // SIGHUP too: the restriction stays.
        daemon.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(300));
        let status = daemon.status_json();
        assert_eq!(status["config_generation"], 1, "{status}");
        assert_eq!(status["config"]["kind"], "file", "{status}");
    }
    assert!(!daemon.log_text().contains("reloaded from built-in defaults"), "{}", daemon.log_text());
    // `config check` says what a reload would do with it.
    let out = crate::support::run_cli(&["config", "check", "--config", daemon.config.to_str().unwrap()]);
    let text = crate::support::stdout_of(&out);
    assert!(text.contains("refuses to reload from it"), "{text}");
}

/// Opens a control connection and sends half a request: work in progress that
/// a graceful shutdown must wait for.
fn half_request(daemon: &TestDaemon) -> UnixStream {
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.write_all(b"{\"v\":1,").unwrap();
    stream
}

#[test]
fn second_signal_during_shutdown_exits_at_once() {
    let mut daemon = TestDaemon::start("control.request_timeout_secs = 60\ndaemon.shutdown_timeout_secs = 60", &[]);
    let _pending = half_request(&daemon);
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(Signal::SIGTERM);
    // Draining: still alive because a request is in flight.
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.is_running(), "exited without draining; log:\n{}", daemon.log_text());
    let second = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let exit = daemon.wait_exit(WAIT).expect("exits on the second signal");
    assert_eq!(exit.code(), Some(130), "log:\n{}", daemon.log_text());
    assert!(second.elapsed() < Duration::from_secs(5));
    assert!(daemon.log_text().contains("again during shutdown"));
}

#[test]
fn shutdown_deadline_abandons_stuck_work_and_exits_75() {
    let mut daemon = TestDaemon::start("control.request_timeout_secs = 60\ndaemon.shutdown_timeout_secs = 1", &[]);
    let _pending = half_request(&daemon);
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let exit = daemon.wait_exit(WAIT).expect("exits at the deadline");
    assert_eq!(exit.code(), Some(75), "log:\n{}", daemon.log_text());
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(900), "exited before its deadline: {took:?}");
    let log = daemon.log_text();
    assert!(log.contains("abandoning components still running: control"), "{log}");
}

#[test]
fn a_failing_component_brings_the_daemon_down_with_its_reason() {
    let mut daemon = TestDaemon::start("", &[]);
    // A real fault: the control socket disappears (someone cleaned /run).
    std::fs::remove_file(&daemon.socket).unwrap();
    let exit = daemon.wait_exit(WAIT).expect("daemon stops when its control socket is gone");
    assert_eq!(exit.code(), Some(70), "log:\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains("component control failed: control socket") && log.contains("was removed or replaced"),
        "{log}"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let daemon = TestDaemon::start("", &[]);
    let log = daemon.dir.path().join("second.log");
    let mut second = TestDaemon::spawn(&daemon.config, &log, &[]);
    let mut code = None;
    assert!(wait_until(WAIT, || {
        code = second.try_wait().ok().flatten().and_then(|s| s.code());
        code.is_some()
    }));
    assert_eq!(code, Some(71));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("already listening"), "{text}");
    // The first one is unharmed.
    assert_eq!(daemon.status_json()["state"], "running");
}

#[test]
fn a_stale_socket_from_a_killed_daemon_is_replaced() {
    let mut first = TestDaemon::start("", &[]);
    first.signal(Signal::SIGKILL);
    first.wait_exit(WAIT).expect("killed");
    assert!(first.socket.exists(), "SIGKILL leaves the socket behind");
    let log = first.dir.path().join("restart.log");
    first.child = TestDaemon::spawn(&first.config, &log, &[]);
    let socket = first.socket.clone();
    assert!(wait_until(WAIT, || crate::support::ping(&socket)), "restarted daemon did not take over the stale socket");
    assert_eq!(first.status_json()["state"], "running");
}

/// Under systemd stderr is the journal: lines must go there, with structured
/// fields. journald cannot run here (no systemd as PID 1), so a stand-in binds
/// its socket and reads the native-protocol datagrams.
#[test]
fn under_journald_logs_go_to_the_journal_with_structured_fields() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixDatagram;
    let socket_path = std::path::Path::new("/run/systemd/journal/socket");
    assert!(
        !socket_path.exists(),
        "a real journald owns {}: run this suite on a machine without systemd as PID 1 (as CI does)",
        socket_path.display()
    );
    std::fs::create_dir_all(socket_path.parent().unwrap()).unwrap();
    let journal = UnixDatagram::bind(socket_path).unwrap();
    struct Unlink<'a>(&'a std::path::Path);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(socket_path);
    journal.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("callbox.toml"), TestDaemon::config_text(dir.path(), "")).unwrap();
    let log = dir.path().join("stderr.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    // What systemd sets for a service whose stderr is the journal stream.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut child = {
        let file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut cmd = crate::support::callbox();
        cmd.arg("run").arg("--config").arg(dir.path().join("callbox.toml"));
        cmd.env("JOURNAL_STREAM", &stream).stdin(std::process::Stdio::null()).stderr(file);
        cmd.spawn().unwrap()
    };

    let mut buf = vec![0u8; 64 * 1024];
    let mut entries = Vec::new();
    let found = loop {
        let Ok(n) = journal.recv(&mut buf) else { break None };
        let entry = decode_journal_entry(&buf[..n]);
        let field = |k: &str| entry.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let done = field("COMPONENT").as_deref() == Some("control")
            && field("MESSAGE").is_some_and(|m| m.starts_with("listening on"));
        entries.push(entry);
        if done {
            break entries.last().cloned();
        }
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    let entry = found.unwrap_or_else(|| panic!("no control entry in the journal; got {entries:#?}"));
    let has = |k: &str, v: &str| entry.iter().any(|(key, value)| key == k && value == v);
    assert!(has("SYSLOG_IDENTIFIER", "callbox"), "{entry:?}");
    assert!(has("PRIORITY", "5"), "info maps to notice: {entry:?}");
    assert!(has("SYSLOG_PID", &child.id().to_string()), "{entry:?}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.is_empty(), "log lines went to stderr too: {stderr}");
}

/// journald's native protocol: `KEY=value\n`, or `KEY\n` + u64 LE length + bytes + `\n`.
fn decode_journal_entry(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = data.iter().position(|&b| b == b'\n' || b == b'=') {
        let key = String::from_utf8_lossy(&data[..end]).into_owned();
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            fields.push((key, String::from_utf8_lossy(&rest[..stop]).into_owned()));
            data = &rest[(stop + 1).min(rest.len())..];
        } else {
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned()));
            data = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}

#[test]
fn root_does_not_take_over_the_service_users_data_directory() {
    // The service's state directory belongs to its user (nobody stands in for callbox).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let config = dir.path().join("callbox.toml");
    std::fs::write(&config, TestDaemon::config_text(dir.path(), "")).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(77), "{text}");
    assert!(text.contains("belongs to uid 65534 (nobody)") && text.contains("sudo -u nobody callbox run"), "{text}");
    assert!(!data.join("keys").exists(), "nothing was written as root");

    // What such a run used to leave behind: doctor names it and the one command that fixes it.
    std::fs::create_dir(data.join("keys")).unwrap();
    std::fs::write(data.join("keys/caller-hash.key"), [0u8; 32]).unwrap();
    let out = crate::support::run_cli(&["--config", config.to_str().unwrap(), "doctor"]);
    let report = crate::support::stdout_of(&out);
    assert!(
        report.lines().any(|l| l.starts_with("FAIL") && l.contains("data-dir") && l.contains("chown -R nobody:")),
        "{report}"
    );
}
