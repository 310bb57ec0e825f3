//! Helpers for tests that drive the real `callbox` binary as a child process.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_callbox");

/// The cross build runs tests under qemu-user without binfmt_misc: a child
/// process of the (emulated) test must be started through the emulator too.
pub fn wrapped(program: &Path) -> Command {
    match std::env::var("CALLBOX_TEST_EXEC_WRAPPER") {
        Ok(wrapper) if !wrapper.is_empty() => {
            let mut cmd = Command::new(wrapper);
            cmd.arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

pub fn callbox() -> Command {
    let mut cmd = wrapped(Path::new(BIN));
    // Tests must not pick up the caller's environment.
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "CALLBOX_CONFIG",
        "CALLBOX_SOCKET",
        "RUST_LOG",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn run_cli(args: &[&str]) -> Output {
    callbox().args(args).stdin(Stdio::null()).output().expect("spawn callbox")
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Datagrams a fake systemd manager received on its NOTIFY_SOCKET.
pub struct NotifyListener {
    pub address: String,
    rx: mpsc::Receiver<(Instant, String)>,
    pub received: Vec<(Instant, String)>,
}

impl NotifyListener {
    pub fn bind_path(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Self::spawn(socket, path.display().to_string())
    }

    pub fn bind_abstract(name: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        Self::spawn(socket, format!("@{name}"))
    }

    fn spawn(socket: UnixDatagram, address: String) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    break;
                }
            }
        });
        Self { address, rx, received: Vec::new() }
    }

    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.received.push(msg);
        }
    }

    /// Waits for a datagram whose text contains `needle` and that arrived after
    /// index `after` of `received`; returns its index.
    pub fn wait_for(&mut self, needle: &str, after: usize, timeout: Duration) -> Option<usize> {
        let end = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(i) = self.received.iter().skip(after).position(|(_, m)| m.contains(needle)) {
                return Some(after + i);
            }
            let left = end.checked_duration_since(Instant::now())?;
            if let Ok(msg) = self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                self.received.push(msg);
            }
        }
    }

    pub fn count(&mut self, needle: &str) -> usize {
        self.drain();
        self.received.iter().filter(|(_, m)| m.contains(needle)).count()
    }
}

/// A daemon under test: its own directory, config, socket and log file.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub child: Child,
    log: PathBuf,
}

impl TestDaemon {
    /// Writes a config (data dir and socket inside a fresh directory, plus
    /// `settings` as for [`Self::config_text`]) and starts `callbox run` with `envs`.
    pub fn start(extra: &str, envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra, envs)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str, envs: &[(&str, &str)]) -> Self {
        // World-traversable so tests can reach the socket as other users.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("callbox.toml");
        let socket = dir.path().join("control.sock");
        std::fs::write(&config, Self::config_text(dir.path(), extra)).unwrap();
        let log = dir.path().join("daemon.log");
        let child = Self::spawn(&config, &log, envs);
        let daemon = Self { dir, config, socket, child, log };
        daemon.wait_for_socket();
        daemon
    }

    /// A config with the data dir and socket inside `dir`, plus `settings`, each
    /// `"section.key = value"`, merged into their sections.
    pub fn config_text(dir: &Path, settings: &str) -> String {
        let mut sections: Vec<(String, Vec<String>)> = vec![
            ("daemon".into(), vec![format!("data_dir = \"{}\"", dir.join("data").display())]),
            ("control".into(), vec![format!("socket = \"{}\"", dir.join("control.sock").display())]),
        ];
        for line in settings.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (section, setting) = line.split_once('.').expect("settings are section.key = value");
            match sections.iter_mut().find(|(name, _)| name == section) {
                Some((_, lines)) => lines.push(setting.to_owned()),
                None => sections.push((section.to_owned(), vec![setting.to_owned()])),
            }
        }
        sections.iter().map(|(name, lines)| format!("[{name}]\n{}\n", lines.join("\n"))).collect::<Vec<_>>().join("\n")
    }

    pub fn spawn(config: &Path, log: &Path, envs: &[(&str, &str)]) -> Child {
        let log_file = std::fs::File::create(log).unwrap();
        let mut cmd = callbox();
        cmd.arg("run").arg("--config").arg(config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn callbox run")
    }

    /// Ready means answering on the socket, not merely having created it.
    fn wait_for_socket(&self) {
        let socket = self.socket.clone();
        let ok = wait_until(Duration::from_secs(30), || ping(&socket));
        assert!(ok, "daemon did not answer on its socket; log:\n{}", self.log_text());
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("signal daemon");
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Runs a CLI command against this daemon (its socket and config).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = callbox();
        cmd.arg("--config").arg(&self.config).arg("--socket").arg(&self.socket).args(args);
        cmd.stdin(Stdio::null()).output().expect("spawn callbox cli")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", stderr_of(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Every daemon of the suite: its whole log must hold none of the personal data
        // the tests fed it. Not while unwinding: the first failure is the one to see.
        if !std::thread::panicking() {
            let log = self.log_text();
            if let Some(found) = personal_data_in(&log) {
                panic!("personal data {found:?} in the daemon log:\n{log}");
            }
        }
    }
}

/// Caller numbers (in every spelling the tests use) and words spoken in the test clips.
/// None may ever appear in a daemon's log.
pub const PERSONAL_DATA: &[&str] = &[
    "13800138000",
    "138 0013 8000",
    "138-0013-8000",
    "13700137000",
    "13900139000",
    "13800000000",
    // Words of the clips and the demo call.
    "出现",
    "交易",
    "情况",
    "换一首歌",
    "How much does it cost",
];

/// The first item of [`PERSONAL_DATA`] in `text`, if any.
pub fn personal_data_in(text: &str) -> Option<&'static str> {
    PERSONAL_DATA.iter().copied().find(|needle| text.contains(needle))
}

/// One ping round trip on the control socket.
pub fn ping(socket: &Path) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"{\"v\":1,\"request\":{\"op\":\"ping\"}}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).is_ok() && line.contains("\"pong\"")
}

/// A copy of the binary that any user may execute (the build tree may sit in a
/// directory other users cannot enter).
pub fn world_executable_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("callbox-bin");
    std::fs::copy(BIN, &copy).expect("copy binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Runs a copy of callbox as uid/gid 65534 (nobody/nogroup) via setpriv.
pub fn run_as_nobody(binary: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    if let Ok(wrapper) = std::env::var("CALLBOX_TEST_EXEC_WRAPPER") {
        if !wrapper.is_empty() {
            cmd.arg(wrapper);
        }
    }
    cmd.arg(binary).args(args).env_remove("CALLBOX_CONFIG").env_remove("CALLBOX_SOCKET");
    cmd.stdin(Stdio::null()).output().expect("spawn setpriv")
}

/// Follows a daemon's understanding bus (`watch`) on a thread and keeps every line: the
/// way a test reads what was said, since transcripts never go to the log.
pub struct Watcher {
    lines: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watcher {
    pub fn start(socket: &Path) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect for watch");
        stream.write_all(b"{\"v\":1,\"request\":{\"op\":\"watch\"}}\n").expect("send watch");
        let mut reader = BufReader::new(stream);
        let mut first = String::new();
        reader.read_line(&mut first).expect("watch reply");
        assert!(first.contains("\"watching\""), "watch refused: {first}");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Self { lines }
    }

    /// Every line seen so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().clone()
    }
}
