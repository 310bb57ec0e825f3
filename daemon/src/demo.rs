//! `callbox demo`: the main job on a sample call, end to end, with nothing but the models.
//!
//! Starts the real daemon (this binary, `run`) on a private temporary config with two
//! AudioSocket listeners on loopback, tells it the caller number as a PBX sidecar would,
//! streams the sample stereo call into it as two legs in real time (20 ms frames, 16 kHz as
//! Asterisk sends them with slin16; `--rate 8000` for narrowband), and prints what the daemon's understanding bus says while the call
//! runs: each utterance (masked) with intent and emotion, each event with how long after
//! the end of the words it came, and the call's tags and customer at the end.
//! `callbox watch` prints the same lines for the calls of a running daemon.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::audio::audiosocket::format_uuid;
use crate::audio::Leg;
use crate::control::client::{self, WatchLine};
use crate::control::protocol::{MonitorItem, Request, Response};
use crate::exit;
use crate::private_daemon::{stream_leg, PrivateDaemon};
use crate::render;

const DEMO_CALLER: &str = "+86 138 0013 8000";
/// After the last frame: the last utterance's ASR and the call's finish.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The sample call's default place: beside the models (`models/build.sh` makes it).
pub fn default_call(models_dir: &Path) -> PathBuf {
    models_dir.join("demo/call.wav")
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
pub(crate) fn models_dir(config_path: &Path, explicit: Option<&Path>) -> PathBuf {
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
    let (legs, call_secs) = crate::private_daemon::load_two_leg_call(&call_path, rate)?;
    let [agent, customer] = legs;
    let legs = [(Leg::Agent, agent), (Leg::Customer, customer)];
    let say = |line: String| {
        if !options.json {
            println!("{line}");
        }
    };
    say(format!("callbox demo: daemon starting with models from {} …", models.display()));
    let mut daemon = PrivateDaemon::start(&models, &options.language, 0, crate::config::DEFAULT_ASR_BATCH)?;
    let socket = daemon.socket.clone();
    let addresses = daemon.addresses;
    say(format!(
        "daemon ready in {:.1} s; AudioSocket agent {} customer {}",
        daemon.ready_secs, addresses[0], addresses[1]
    ));

    let uuid = crate::private_daemon::random_uuid()?;
    let call_id = format_uuid(&uuid);
    // What the PBX sidecar does when the call is answered: say who is calling.
    match client::request(
        &socket,
        Request::CallInfo { call: call_id.clone(), caller: Some(DEMO_CALLER.into()), campaign: None, converted: None },
    ) {
        Ok(Response::Customer(_)) => {}
        Ok(Response::Error(e)) => return Err(format!("the daemon refused the caller number: {}", e.message)),
        Ok(other) => return Err(format!("unexpected reply to call_info: {other:?}")),
        Err(e) => return Err(format!("cannot reach the demo daemon: {e}; its log:\n{}", daemon.log_tail())),
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
            if let Some(code) = daemon.exited() {
                return Err(format!("the daemon exited ({code}) during the call; its log:\n{}", daemon.log_tail()));
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
            Ok(Ok(_lag)) => {}
            Ok(Err((leg, e))) => return Err(format!("streaming the {} leg failed: {e}", leg.name())),
            Err(_) => return Err("a streaming thread panicked".into()),
        }
    }
    let Some(_) = finished else {
        return Err(format!(
            "the call did not finish within {FINISH_TIMEOUT:?} of its end; the daemon's log:\n{}",
            daemon.log_tail()
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
            crate::config::load_lenient(&daemon.config).speech.min_silence_ms,
        );
    }
    drop(daemon);
    let _ = watcher.join();
    Ok(exit::OK)
}
