//! The control socket: who may use it, and what bad input does to it.
//! Identities are real: the tests run as root and switch to nobody (65534) with setpriv.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::support::{run_as_nobody, stderr_of, stdout_of, world_executable_copy, TestDaemon};

fn open_socket_to_everyone(daemon: &TestDaemon) {
    // The filesystem would stop nobody at mode 0660; open it so that the
    // daemon's own check is what is tested.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
}

fn socket_mode(daemon: &TestDaemon) -> u32 {
    std::fs::metadata(&daemon.socket).unwrap().permissions().mode() & 0o777
}

#[test]
fn root_gets_status_as_admin() {
    let daemon = TestDaemon::start("", &[]);
    assert_eq!(socket_mode(&daemon), 0o660);
    // The storage probe reports once it has run.
    crate::support::wait_until(Duration::from_secs(10), || {
        daemon.status_json()["components"].as_array().is_some_and(|c| c.len() == 4)
    });
    let status = daemon.status_json();
    assert_eq!(status["caller"]["uid"], 0);
    assert_eq!(status["caller"]["role"], "admin");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["config"]["path"], daemon.config.to_str().unwrap());
    let components: Vec<_> =
        status["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    // The customer store is a supervised component of its own (its thread owns the database).
    assert_eq!(components, vec!["control", "customers", "storage", "store"]);
    assert!(status["components"].as_array().unwrap().iter().all(|c| c["state"] == "ok"), "{status}");

    let human = daemon.cli(&["status"]);
    assert!(human.status.success());
    let text = stdout_of(&human);
    assert!(text.contains("running (pid") && text.contains("storage") && text.contains("uid 0, admin"), "{text}");
}

#[test]
fn an_unprivileged_user_is_refused_by_the_daemon() {
    // technician/admin groups that nobody is not in.
    let daemon = TestDaemon::start("control.technician_group = \"callbox-test-none\"", &[]);
    open_socket_to_everyone(&daemon);
    let bin = world_executable_copy(daemon.dir.path());
    let socket = daemon.socket.to_str().unwrap();
    let out = run_as_nobody(&bin, &["--socket", socket, "status"]);
    assert_eq!(out.status.code(), Some(77), "stdout: {} stderr: {}", stdout_of(&out), stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("uid 65534") && err.contains("may not use callbox"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line, got: {err}");
    assert!(daemon.log_text().contains("refused"), "daemon did not log the refusal");
    // The daemon keeps serving.
    assert_eq!(daemon.status_json()["state"], "running");
}

#[test]
fn a_technician_may_read_status_but_not_reload() {
    // nobody's primary group is nogroup: make that the technician group.
    let daemon = TestDaemon::start("control.technician_group = \"nogroup\"", &[]);
    open_socket_to_everyone(&daemon);
    let bin = world_executable_copy(daemon.dir.path());
    let socket = daemon.socket.to_str().unwrap();
    let out = run_as_nobody(&bin, &["--socket", socket, "status", "--json"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["caller"]["role"], "technician");
    assert_eq!(status["caller"]["uid"], 65534);

    let out = run_as_nobody(&bin, &["--socket", socket, "reload"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr_of(&out).contains("needs the admin role"), "{}", stderr_of(&out));
    assert_eq!(daemon.status_json()["config_generation"], 1, "a technician must not trigger a reload");
}

fn read_response(stream: &UnixStream) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("a response line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

#[test]
fn a_request_over_the_size_bound_is_refused_without_harming_the_daemon() {
    let daemon = TestDaemon::start("control.max_request_bytes = 1024", &[]);
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // 4 MiB without a newline: the daemon must answer after 1 KiB, not buffer it all.
    let writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..64 {
            if (&writer).write_all(&chunk).is_err() {
                return false; // the daemon closed the connection: expected
            }
        }
        true
    });
    let reply = read_response(&stream);
    assert_eq!(reply["response"]["kind"], "error", "{reply}");
    assert_eq!(reply["response"]["code"], "request_too_large");
    assert!(reply["response"]["message"].as_str().unwrap().contains("1024"));
    assert!(!flood.join().unwrap(), "the daemon kept reading 4 MiB past its 1 KiB bound");
    // Unharmed: other clients are served.
    assert_eq!(daemon.status_json()["state"], "running");
    assert!(daemon.log_text().contains("refused request over 1024 bytes"));
}

#[test]
fn malformed_and_unknown_requests_get_clear_errors_on_a_live_connection() {
    let daemon = TestDaemon::start("", &[]);
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ask = |line: &str| {
        stream.write_all(line.as_bytes()).unwrap();
        read_response(&stream)
    };
    let r = ask("this is not json\n");
    assert_eq!(r["response"]["code"], "bad_request");
    let r = ask("{\"v\":1,\"request\":{\"op\":\"erase_everything\"}}\n");
    assert_eq!(r["response"]["code"], "bad_request");
    let r = ask("{\"v\":7,\"request\":{\"op\":\"status\"}}\n");
    assert_eq!(r["response"]["code"], "unsupported_version");
    let r = ask("{\"v\":1,\"request\":{\"op\":\"ping\"}}\n");
    assert_eq!(r["response"]["kind"], "pong");
    let r = ask("{\"v\":1,\"request\":{\"op\":\"status\"}}\n");
    assert_eq!(r["response"]["kind"], "status");
}

#[test]
fn a_silent_connection_times_out() {
    let daemon = TestDaemon::start("control.request_timeout_secs = 1", &[]);
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reply = read_response(&stream);
    assert_eq!(reply["response"]["code"], "timeout");
}

/// Opens `n` connections to the socket as nobody, sends nothing, and prints how many got
/// each kind of answer (or none) within 5 s; then holds them for 30 s.
const HOLDER: &str = r#"
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
answers = {}
for s in held:
    s.settimeout(5)
    try:
        data = s.recv(4096).decode()
    except Exception:
        data = ""
    kind = "forbidden" if "forbidden" in data else "busy" if "busy" in data else "none"
    answers[kind] = answers.get(kind, 0) + 1
print(" ".join(f"{k}={v}" for k, v in sorted(answers.items())), flush=True)
time.sleep(30)
"#;

fn hold_connections_as_nobody(daemon: &TestDaemon, n: usize) -> (std::process::Child, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c", HOLDER])
        .arg(&daemon.socket)
        .arg(n.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 as nobody");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line.trim().to_owned())
}

#[test]
fn strangers_are_refused_at_connect_and_never_lock_root_out() {
    // Slots held until the request timeout would lock everyone out for a minute.
    let daemon =
        TestDaemon::start("control.technician_group = \"callbox-test-none\"\ncontrol.request_timeout_secs = 60", &[]);
    open_socket_to_everyone(&daemon);
    let (mut holder, answers) = hold_connections_as_nobody(&daemon, 40);
    // Every stranger's connection was answered and closed at once, not parked in a slot.
    assert_eq!(answers, "forbidden=40", "{}", daemon.log_text());
    let out = daemon.cli(&["status"]);
    assert!(out.status.success(), "root was locked out: {}", stderr_of(&out));
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(daemon.log_text().contains("refused a connection from uid 65534"), "{}", daemon.log_text());
}

#[test]
fn one_technician_cannot_take_every_slot_and_hears_busy() {
    let daemon = TestDaemon::start("control.technician_group = \"nogroup\"\ncontrol.request_timeout_secs = 60", &[]);
    open_socket_to_everyone(&daemon);
    let (mut holder, answers) = hold_connections_as_nobody(&daemon, 10);
    // Four connections per technician (the default): the other six are told "busy".
    assert_eq!(answers, "busy=6 none=4", "{}", daemon.log_text());
    let out = daemon.cli(&["status"]);
    assert!(out.status.success(), "root was locked out: {}", stderr_of(&out));
    // The technician's fifth connection, from the CLI: an honest "busy", not an OS error.
    let bin = world_executable_copy(daemon.dir.path());
    let out = run_as_nobody(&bin, &["--socket", daemon.socket.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("busy: uid 65534 already has 4 connections open"), "{}", stderr_of(&out));
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn refused_requests_are_logged_without_their_arguments() {
    let daemon = TestDaemon::start("control.technician_group = \"nogroup\"", &[]);
    open_socket_to_everyone(&daemon);
    let bin = world_executable_copy(daemon.dir.path());
    let socket = daemon.socket.to_str().unwrap();
    // A technician may not reload: logged by kind and uid.
    let out = run_as_nobody(&bin, &["--socket", socket, "reload"]);
    assert_eq!(out.status.code(), Some(77));
    // A stranger's request with a caller number (the old log line carried it whole).
    let reconfigured = TestDaemon::config_text(daemon.dir.path(), "control.technician_group = \"callbox-test-none\"");
    std::fs::write(&daemon.config, reconfigured).unwrap();
    assert!(daemon.cli(&["reload"]).status.success());
    let out = run_as_nobody(&bin, &["--socket", socket, "call", "info", "c-1", "--caller", "13800138000"]);
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
    // Root's accepted request is logged without the number too.
    assert!(daemon.cli(&["call", "info", "c-1", "--caller", "13800138000"]).status.success());
    let log = daemon.log_text();
    assert!(log.contains("refused reload from uid 65534"), "{log}");
    assert!(log.contains("refused a connection from uid 65534"), "{log}");
    assert_eq!(crate::support::personal_data_in(&log), None, "{log}");
}
