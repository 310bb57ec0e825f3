//! A private daemon for the commands that drive the real one from outside as a PBX would
//! (`callbox demo`, `callbox bench soak`): this binary's `run` on a temporary config with
//! AudioSocket listeners on loopback, and a leg streamer that sends 20-ms frames on a
//! real-time schedule.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::audio::audiosocket::{encode, Frame};
use crate::control::client;
use crate::control::protocol::{Request, Response};

pub const FRAME_MS: u64 = 20;
/// Model loading takes a few seconds; a cold disk cache more.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A private working folder, removed when dropped (it holds a key and a database).
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| std::io::Error::other("the system random source failed"))?;
        let name = format!("callbox-demo-{}", crate::hex::encode(&id));
        let dir = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon child; stopped (SIGTERM, then SIGKILL) when dropped.
struct DaemonChild(Child);

impl Drop for DaemonChild {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The running private daemon. Dropping it stops the daemon, then removes its folder.
pub struct PrivateDaemon {
    // Field order is drop order: the daemon stops before its folder goes.
    child: DaemonChild,
    work: WorkDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The agent and customer AudioSocket listeners.
    pub addresses: [SocketAddr; 2],
    pub ready_secs: f64,
}

impl PrivateDaemon {
    /// Starts the daemon on `models` with `asr_workers` ASR slots (0: one per core), each
    /// batching up to `asr_batch` waiting utterances, and waits until it answers.
    pub fn start(models: &Path, language: &str, asr_workers: u32, asr_batch: u32) -> Result<Self, String> {
        let work = WorkDir::create().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
        let socket = work.0.join("control.sock");
        let config = work.0.join("callbox.toml");
        let log_path = work.0.join("daemon.log");
        let toml = format!(
            "# callbox: a private daemon on loopback\n\
             [daemon]\ndata_dir = {data:?}\nshutdown_timeout_secs = 10\n\
             [control]\nsocket = {socket:?}\n\
             [speech]\nmodels_dir = {models:?}\nlanguage = {language:?}\nasr_workers = {asr_workers}\nasr_batch = {asr_batch}\n\
             [calls]\nmax_concurrent = 1024\nuse_rated_capacity = false\n\
             [audiosocket]\nlisteners = [{{ address = \"127.0.0.1:0\", leg = \"agent\" }}, {{ address = \"127.0.0.1:0\", leg = \"customer\" }}]\n",
            data = work.0.join("data"),
        );
        std::fs::write(&config, toml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("CALLBOX_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        let mut child = DaemonChild(child);
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(code)) = child.0.try_wait() {
                return Err(format!("the daemon exited ({code}) while starting; its log:\n{}", tail(&log_path)));
            }
            match client::request(&socket, Request::Status {}) {
                Ok(Response::Status(report)) => break report,
                _ if started.elapsed() > START_TIMEOUT => {
                    return Err(format!(
                        "the daemon did not answer within {START_TIMEOUT:?}; its log:\n{}",
                        tail(&log_path)
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let address_of = |leg: &str| -> Result<SocketAddr, String> {
            status
                .audiosocket_listeners
                .iter()
                .find_map(|l| l.strip_suffix(&format!(" ({leg})")).and_then(|a| a.parse().ok()))
                .ok_or_else(|| format!("the daemon reports no {leg} listener: {:?}", status.audiosocket_listeners))
        };
        let addresses = [address_of("agent")?, address_of("customer")?];
        Ok(Self { child, work, socket, config, log: log_path, addresses, ready_secs: started.elapsed().as_secs_f64() })
    }

    /// `Some(status)` once the daemon has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.0.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// The private folder (for a caller that wants to keep something beside the daemon).
    pub fn dir(&self) -> &Path {
        &self.work.0
    }
}

/// One leg of a call over AudioSocket: the UUID, 20-ms frames on a real-time schedule from
/// `start`, then hangup. The daemon's silence towards the PBX is read and dropped, as
/// Asterisk would play it. Returns how far behind its schedule the latest frame went out
/// (the daemon holding the stream back, which would cost a real PBX audio).
pub fn stream_leg(
    address: SocketAddr,
    uuid: [u8; 16],
    samples: &[i16],
    rate: u32,
    start: Instant,
) -> std::io::Result<Duration> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    let mut back = socket.try_clone()?;
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(back.read(&mut sink), Ok(n) if n > 0) {}
    });
    socket.write_all(&encode(&Frame::Uuid(uuid)))?;
    let per_frame = (u64::from(rate) * FRAME_MS / 1000) as usize;
    let mut max_lag = Duration::ZERO;
    for (n, chunk) in samples.chunks(per_frame).enumerate() {
        let due = start + Duration::from_millis(n as u64 * FRAME_MS);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        socket.write_all(&encode(&Frame::Audio { sample_rate: rate, samples: chunk.to_vec() }))?;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
    }
    socket.write_all(&encode(&Frame::Hangup))?;
    socket.shutdown(std::net::Shutdown::Write)?;
    let _ = drain.join();
    Ok(max_lag)
}

fn read_wav(path: &Path) -> Result<crate::audio::wav::Wav, String> {
    let bytes = crate::fsio::read_bounded(
        path,
        crate::config::SpoolConfig::default().max_file_mb << 20,
        crate::fsio::Links::Follow,
    )
    .map_err(|e| e.to_string())?;
    crate::audio::wav::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// One channel resampled to `rate` as 16-bit PCM.
fn to_phone(samples: &[i16], from: u32, rate: u32) -> Result<Vec<i16>, String> {
    let resampled = crate::audio::resample::resample_all(samples, from, rate)
        .map_err(|e| format!("cannot resample to {rate} Hz: {e}"))?;
    Ok(resampled.iter().map(|&x| (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16).collect())
}

/// A sample call's two legs (agent left, customer right) at `rate` as 16-bit PCM.
pub fn load_two_leg_call(path: &Path, rate: u32) -> Result<([Vec<i16>; 2], f64), String> {
    let recording = read_wav(path)?;
    let [agent, customer] = recording.channels.as_slice() else {
        return Err(format!("{}: the sample call must be stereo (agent left, customer right)", path.display()));
    };
    let from = recording.sample_rate;
    Ok(([to_phone(agent, from, rate)?, to_phone(customer, from, rate)?], recording.duration_secs()))
}

/// A recording's first channel at `rate` as 16-bit PCM.
pub fn load_mono(path: &Path, rate: u32) -> Result<Vec<i16>, String> {
    let recording = read_wav(path)?;
    let first = recording.channels.first().ok_or_else(|| format!("{}: no audio channel", path.display()))?;
    to_phone(first, recording.sample_rate, rate)
}

/// A fresh random call UUID.
pub fn random_uuid() -> Result<[u8; 16], String> {
    let mut uuid = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uuid)
        .map_err(|_| "the system random source failed".to_owned())?;
    Ok(uuid)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
