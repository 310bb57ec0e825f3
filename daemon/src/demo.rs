//! `callbox demo`: the main job on a sample call, end to end, with nothing but the models.
//!
//! Starts the real daemon (this binary, `run`) on a private temporary config with two
//! AudioSocket listeners on loopback, tells it the caller number as a PBX sidecar would,
//! streams the sample stereo call into it as two legs in real time (20 ms frames, 16 kHz as
//! Asterisk sends them with slin16; `--rate 8000` for narrowband), and prints what the daemon's understanding bus says while the call
//! runs: each utterance (masked) with intent and emotion, each event with how long after
//! the end of the words it came, and the call's tags and customer at the end.
//! `callbox watch` prints the same lines for the calls of a running daemon.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::audio::audiosocket::{encode, format_uuid, Frame};
use crate::audio::Leg;
use crate::control::client::{self, WatchLine};
use crate::control::protocol::{MonitorItem, Request, Response};
use crate::exit;
use crate::render;

const FRAME_MS: u64 = 20;
const DEMO_CALLER: &str = "+86 138 0013 8000";
/// Model loading takes a few seconds; a cold disk cache more.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// After the last frame: the last utterance's ASR and the call's finish.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The sample call's default place: beside the models (`models/build.sh` makes it).
pub fn default_call(models_dir: &Path) -> PathBuf {
    models_dir.join("demo/call.wav")
}

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

pub struct DemoOptions {
    pub call: Option<PathBuf>,
    pub models: Option<PathBuf>,
    pub language: String,
    /// AudioSocket sample rate: 8000 (slin) or 16000 (slin16).
    pub rate: u32,
    pub json: bool,
}

pub fn run(config_path: &Path, options: DemoOptions) -> u8 {
    match demo(config_path, &options) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("callbox demo: {message}");
            exit::FAILURE
        }
    }
}

/// Where the models are: --models, the config / $CALLBOX_MODELS_DIR, else a checkout's
/// `models/cache` when the packaged folder is absent.
fn models_dir(config_path: &Path, explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_owned();
    }
    let configured = crate::config::load_lenient(config_path).speech.models_dir();
    let checkout = PathBuf::from("models/cache");
    if !configured.join("manifest.json").exists() && checkout.join("manifest.json").exists() {
        return checkout.canonicalize().unwrap_or(checkout);
    }
    configured
}

fn demo(config_path: &Path, options: &DemoOptions) -> Result<u8, String> {
    let rate = options.rate;
    if ![8000, 16000].contains(&rate) {
        return Err(format!("--rate must be 8000 or 16000, not {rate}"));
    }
    let models = models_dir(config_path, options.models.as_deref());
    // The private daemon's config wants an absolute path; `--models models/cache` is fine here.
    let models = std::path::absolute(&models).unwrap_or(models);
    let call_path = options.call.clone().unwrap_or_else(|| default_call(&models));
    if !call_path.exists() {
        return Err(format!(
            "no sample call at {}: the callbox-models package installs it; on a source checkout `bash models/build.sh` \
             makes it (it needs espeak-ng: apt-get install espeak-ng)",
            call_path.display()
        ));
    }
    let bytes = crate::fsio::read_bounded(
        &call_path,
        crate::config::SpoolConfig::default().max_file_mb << 20,
        crate::fsio::Links::Follow,
    )
    .map_err(|e| e.to_string())?;
    let recording = crate::audio::wav::parse(&bytes).map_err(|e| format!("{}: {e}", call_path.display()))?;
    let [agent, customer] = recording.channels.as_slice() else {
        return Err(format!("{}: the sample call must be stereo (agent left, customer right)", call_path.display()));
    };
    let to_phone = |samples: &[i16]| -> Result<Vec<i16>, String> {
        let resampled = crate::audio::resample::resample_all(samples, recording.sample_rate, rate)
            .map_err(|e| format!("cannot resample the sample call: {e}"))?;
        Ok(resampled.iter().map(|&x| (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16).collect())
    };
    let legs = [(Leg::Agent, to_phone(agent)?), (Leg::Customer, to_phone(customer)?)];
    let call_secs = recording.duration_secs();

    let work = WorkDir::create().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let socket = work.0.join("control.sock");
    let config = work.0.join("callbox.toml");
    let log_path = work.0.join("daemon.log");
    let toml = format!(
        "# callbox demo: a private daemon on loopback\n\
         [daemon]\ndata_dir = {data:?}\nshutdown_timeout_secs = 10\n\
         [control]\nsocket = {socket:?}\n\
         [speech]\nmodels_dir = {models:?}\nlanguage = {lang:?}\n\
         [audiosocket]\nlisteners = [{{ address = \"127.0.0.1:0\", leg = \"agent\" }}, {{ address = \"127.0.0.1:0\", leg = \"customer\" }}]\n",
        data = work.0.join("data"),
        socket = socket,
        models = models,
        lang = options.language,
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
    let mut daemon = DaemonChild(child);
    let say = |line: String| {
        if !options.json {
            println!("{line}");
        }
    };
    say(format!("callbox demo: daemon starting with models from {} …", models.display()));

    let started = Instant::now();
    let status = loop {
        if let Ok(Some(code)) = daemon.0.try_wait() {
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
    say(format!(
        "daemon ready in {:.1} s; AudioSocket agent {} customer {}",
        started.elapsed().as_secs_f64(),
        addresses[0],
        addresses[1]
    ));

    let mut uuid = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uuid)
        .map_err(|_| "the system random source failed".to_owned())?;
    let call_id = format_uuid(&uuid);
    // What the PBX sidecar does when the call is answered: say who is calling.
    match client::request(
        &socket,
        Request::CallInfo { call: call_id.clone(), caller: Some(DEMO_CALLER.into()), converted: None },
    ) {
        Ok(Response::Customer(_)) => {}
        Ok(Response::Error(e)) => return Err(format!("the daemon refused the caller number: {}", e.message)),
        Ok(other) => return Err(format!("unexpected reply to call_info: {other:?}")),
        Err(e) => return Err(format!("cannot reach the demo daemon: {e}; its log:\n{}", tail(&log_path))),
    }

    // The watcher runs on its own thread; items come back through a channel.
    let (items_tx, items_rx) = mpsc::channel::<MonitorItem>();
    let watch_socket = socket.clone();
    // Joined after the daemon is stopped, which closes the stream it reads.
    let watcher = std::thread::spawn(move || {
        let _ = client::watch(&watch_socket, |line| match line {
            WatchLine::Item(item) => items_tx.send(*item).is_ok(),
            WatchLine::Error(_) => true,
        });
    });
    say(format!(
        "call {call_id}: streaming {:.1} s of {} (agent left, customer right) at {rate} Hz in real time, caller {DEMO_CALLER}\n",
        call_secs,
        call_path.display()
    ));

    let stream_start = Instant::now();
    let streams: Vec<_> = legs
        .into_iter()
        .zip(addresses)
        .map(|((leg, samples), address)| {
            std::thread::spawn(move || stream_leg(address, uuid, &samples, rate, stream_start).map_err(|e| (leg, e)))
        })
        .collect();

    let mut finished = None;
    let mut items = Vec::new();
    let deadline_after_call = Duration::from_secs_f64(call_secs) + FINISH_TIMEOUT;
    while finished.is_none() && stream_start.elapsed() < deadline_after_call {
        let Ok(item) = items_rx.recv_timeout(Duration::from_millis(200)) else {
            if let Ok(Some(code)) = daemon.0.try_wait() {
                return Err(format!("the daemon exited ({code}) during the call; its log:\n{}", tail(&log_path)));
            }
            continue;
        };
        let now = stream_start.elapsed().as_secs_f64();
        let (call, latency) = match &item {
            MonitorItem::Utterance(u) => (&u.call, Some(now - u.end_secs)),
            MonitorItem::Event(e) => (&e.call, Some(now - e.at_secs)),
            MonitorItem::CallFinished(f) => (&f.call, None),
        };
        if *call != call_id {
            continue;
        }
        if options.json {
            let mut line = serde_json::to_value(&item).unwrap_or_default();
            if let (Some(l), Some(obj)) = (latency, line.as_object_mut()) {
                obj.insert("latency_secs".into(), serde_json::json!((l * 1000.0).round() / 1000.0));
            }
            println!("{line}");
        } else {
            say(render::monitor_item(&item, latency));
        }
        if matches!(item, MonitorItem::CallFinished(_)) {
            finished = Some(());
        }
        items.push((item, latency));
    }
    for s in streams {
        match s.join() {
            Ok(Ok(())) => {}
            Ok(Err((leg, e))) => return Err(format!("streaming the {} leg failed: {e}", leg.name())),
            Err(_) => return Err("a streaming thread panicked".into()),
        }
    }
    let Some(_) = finished else {
        return Err(format!(
            "the call did not finish within {FINISH_TIMEOUT:?} of its end; the daemon's log:\n{}",
            tail(&log_path)
        ));
    };
    if !options.json {
        let latencies: Vec<f64> =
            items.iter().filter(|(i, _)| matches!(i, MonitorItem::Event(_))).filter_map(|(_, l)| *l).collect();
        let events = latencies.len();
        let worst = latencies.iter().copied().fold(0.0, f64::max);
        println!(
            "\n{} utterances, {events} events; events came at most {worst:.2} s after the end of the words \
             (VAD hangover {} ms included)",
            items.iter().filter(|(i, _)| matches!(i, MonitorItem::Utterance(_))).count(),
            crate::config::load_lenient(&config).speech.min_silence_ms,
        );
    }
    drop(daemon);
    let _ = watcher.join();
    Ok(exit::OK)
}

/// One leg of the call over AudioSocket: the UUID, 20-ms frames on a real-time schedule,
/// then hangup. The daemon's silence towards the PBX is read and dropped, as Asterisk
/// would play it.
fn stream_leg(address: SocketAddr, uuid: [u8; 16], samples: &[i16], rate: u32, start: Instant) -> std::io::Result<()> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    let mut back = socket.try_clone()?;
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(back.read(&mut sink), Ok(n) if n > 0) {}
    });
    socket.write_all(&encode(&Frame::Uuid(uuid)))?;
    let per_frame = (u64::from(rate) * FRAME_MS / 1000) as usize;
    for (n, chunk) in samples.chunks(per_frame).enumerate() {
        let due = start + Duration::from_millis(n as u64 * FRAME_MS);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        socket.write_all(&encode(&Frame::Audio { sample_rate: rate, samples: chunk.to_vec() }))?;
    }
    socket.write_all(&encode(&Frame::Hangup))?;
    socket.shutdown(std::net::Shutdown::Write)?;
    let _ = drain.join();
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
