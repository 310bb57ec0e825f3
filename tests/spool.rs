//! The spool folder with real recordings: pickup, done/, failed/, postponement.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::support::{wait_until, TestDaemon};

const WAIT: Duration = Duration::from_secs(30);
const CLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/speech/zh/BAC009S0764W0121.wav");

fn spool_daemon(extra: &str) -> (TestDaemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // Speech off: these tests are about pickup and filing (tests/speech.rs transcribes).
    let settings =
        format!("speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\n{extra}", spool.display());
    let d = TestDaemon::start_in(dir, &settings, &[]);
    (d, spool)
}

/// A stereo 8 kHz µ-law telephone recording, as a PBX writes one.
fn phone_recording(out: &Path) {
    let status = std::process::Command::new("sox")
        .args(["-D", CLIP, "-r", "8000", "-e", "u-law", "-b", "8", "-c", "2", "-t", "wav"])
        .arg(out)
        .status()
        .expect("sox is needed for this test (apt-get install sox)");
    assert!(status.success());
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_complete_recording_is_processed_and_filed_with_its_sidecar() {
    let (d, spool) = spool_daemon("");
    // Written under a temporary name: must not be touched while incomplete.
    let partial = spool.join(".call-1.wav.part");
    phone_recording(&partial);
    std::fs::write(
        spool.join("call-1.json"),
        r#"{"caller_number":"13800000000","agent_id":"a-7","campaign":"autumn"}"#,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(partial.exists(), "an incomplete file was picked up");
    assert!(std::fs::read_dir(spool.join("done")).unwrap().next().is_none());

    std::fs::rename(&partial, spool.join("call-1.wav")).unwrap();
    let result = spool.join("done/call-1.result.json");
    assert!(wait_until(WAIT, || result.exists()), "log:\n{}", d.log_text());
    assert!(spool.join("done/call-1.wav").exists() && spool.join("done/call-1.json").exists());
    assert!(!spool.join("call-1.wav").exists());

    let r = read_json(&result);
    assert_eq!(r["sample_rate"], 8000);
    assert_eq!(r["encoding"], "ulaw");
    assert_eq!(r["metadata"]["agent_id"], "a-7");
    let duration = r["duration_ms"].as_u64().unwrap();
    assert!((4000..6000).contains(&duration), "{duration}");
    let legs = r["call"]["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 2, "{r:#}");
    assert!(legs.iter().all(|l| l["audio_ms"].as_u64().unwrap().abs_diff(duration) <= 1), "{r:#}");
    assert_eq!(d.status_json()["calls"]["total_started"], 1);
}

#[test]
fn corrupt_recordings_go_to_failed_with_a_reason_and_the_daemon_goes_on() {
    let (d, spool) = spool_daemon("");
    std::fs::write(spool.join("garbage.wav"), b"RIFF\x10\x00\x00\x00WAVEjunkjunk").unwrap();
    std::fs::write(spool.join("text.wav"), b"this is not audio at all").unwrap();
    std::fs::copy(CLIP, spool.join("bad-sidecar.wav")).unwrap();
    std::fs::write(spool.join("bad-sidecar.json"), r#"{"agent":"unknown key"}"#).unwrap();
    let reason = |name: &str| std::fs::read_to_string(spool.join("failed").join(format!("{name}.reason.txt"))).ok();
    assert!(
        wait_until(WAIT, || ["garbage", "text", "bad-sidecar"].iter().all(|n| reason(n).is_some())),
        "log:\n{}",
        d.log_text()
    );
    assert!(reason("garbage").unwrap().contains("truncated"), "{:?}", reason("garbage"));
    assert!(reason("text").unwrap().contains("no RIFF/WAVE header"));
    assert!(reason("bad-sidecar").unwrap().contains("unknown field `agent`"));
    assert!(spool.join("failed/bad-sidecar.json").exists(), "the sidecar travels with its recording");

    // Still working: a good file afterwards is processed.
    // Upper-case extension: picked up, and the call is named without it.
    std::fs::copy(CLIP, spool.join("Good.WAV")).unwrap();
    assert!(wait_until(WAIT, || spool.join("done/Good.result.json").exists()), "{}", d.log_text());
    assert_eq!(read_json(&spool.join("done/Good.result.json"))["call"]["call"], "spool:Good");
    assert_eq!(d.status_json()["state"], "running");
}

#[test]
fn a_recording_that_arrives_at_capacity_waits_for_a_free_slot() {
    // The only call slot is held by a live AudioSocket stream.
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let settings = format!(
        "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\ncalls.max_concurrent = 1\naudiosocket.listeners = [{{ address = \"127.0.0.1:0\", leg = \"customer\" }}]",
        spool.display()
    );
    let d = TestDaemon::start_in(dir, &settings, &[]);
    let addr = d.status_json()["audiosocket_listeners"][0].as_str().unwrap().split(' ').next().unwrap().to_owned();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    stream.write_all(&[0x01, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]).unwrap();
    assert!(wait_until(WAIT, || d.status_json()["calls"]["active"].as_array().unwrap().len() == 1));

    std::fs::copy(CLIP, spool.join("waiting.wav")).unwrap();
    assert!(
        wait_until(WAIT, || d.log_text().contains("waiting.wav: postponed: at capacity")),
        "log:\n{}",
        d.log_text()
    );
    assert!(spool.join("waiting.wav").exists(), "a postponed file stays in the spool");
    // Retried on every pass (100 ms), but said once.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(d.log_text().matches("waiting.wav: postponed").count(), 1, "{}", d.log_text());
    assert!(spool.join("waiting.wav").exists());
    drop(stream);
    assert!(wait_until(WAIT, || spool.join("done/waiting.result.json").exists()), "log:\n{}", d.log_text());
}

#[test]
fn an_input_without_usable_models_stops_the_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("callbox.toml");
    let settings = format!("spool.dir = \"{}\"", dir.path().join("spool").display());
    std::fs::write(&config, TestDaemon::config_text(dir.path(), &settings)).unwrap();
    let log = dir.path().join("daemon.log");
    let missing = dir.path().join("no-models");
    let mut child = TestDaemon::spawn(&config, &log, &[("CALLBOX_MODELS_DIR", missing.to_str().unwrap())]);
    let mut status = None;
    assert!(wait_until(WAIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.unwrap().code(), Some(69), "{text}");
    assert!(text.contains("cannot load the speech models") && text.contains("no-models"), "{text}");
    assert!(text.contains("models/build.sh") && text.contains("speech.enabled = false"), "{text}");
}

#[test]
fn hostile_spool_entries_are_filed_away_never_followed_nor_read_unbounded() {
    let (d, spool) = spool_daemon("spool.settle_ms = 0");
    let fifo = |path: &Path| nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Sidecars: a link to /dev/zero (the old reader ran to OOM), a FIFO (hung the spool
    // forever), a link to a JSON file outside the spool (was read into the result).
    std::fs::copy(CLIP, spool.join("zero.wav")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", spool.join("zero.json")).unwrap();
    std::fs::copy(CLIP, spool.join("fifo.wav")).unwrap();
    fifo(&spool.join("fifo.json"));
    let outside = d.dir.path().join("outside.json");
    std::fs::write(&outside, r#"{"agent_id":"read-from-outside"}"#).unwrap();
    std::fs::copy(CLIP, spool.join("outside.wav")).unwrap();
    std::os::unix::fs::symlink(&outside, spool.join("outside.json")).unwrap();
    // Recordings that are not regular files: were ignored forever without a word.
    std::os::unix::fs::symlink(CLIP, spool.join("link.wav")).unwrap();
    fifo(&spool.join("pipe.wav"));
    // A name that forged a whole log line.
    let forged = "x.wav\n2026-01-01T00:00:00.000Z ERROR [supervisor] forged";
    std::fs::copy(CLIP, spool.join(format!("{forged}.wav"))).unwrap();
    let reason = |name: &str| std::fs::read_to_string(spool.join("failed").join(format!("{name}.reason.txt"))).ok();
    let all_filed = || ["zero", "fifo", "outside", "link", "pipe"].iter().all(|n| reason(n).is_some());
    assert!(wait_until(WAIT, all_filed), "log:\n{}", d.log_text());
    for (name, why) in [
        ("zero", "symbolic link"),
        ("fifo", "FIFO"),
        ("outside", "symbolic link"),
        ("link", "symbolic link"),
        ("pipe", "FIFO"),
    ] {
        assert!(reason(name).unwrap().contains(why), "{name}: {:?}", reason(name));
    }
    // Moved as they are: the link still points where it did, nothing was read through it.
    assert_eq!(std::fs::read_link(spool.join("failed/link.wav")).unwrap(), Path::new(CLIP));
    let forged_result = spool.join("done").join(format!("{forged}.result.json"));
    assert!(wait_until(WAIT, || forged_result.exists()), "log:\n{}", d.log_text());
    let log = d.log_text();
    assert!(log.lines().all(|l| !l.starts_with("2026-01-01T00:00:00.000Z")), "a forged line:\n{log}");
    assert!(log.contains("x.wav\\n2026-01-01T00:00:00.000Z ERROR [supervisor] forged"), "{log}");
    let status = d.status_json();
    let spool_health = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "spool").unwrap().clone();
    assert_eq!(spool_health["state"], "ok", "{status}");
}

#[test]
fn a_recording_written_in_place_is_read_only_once_it_settles() {
    let (d, spool) = spool_daemon("spool.settle_ms = 1500");
    let bytes = std::fs::read(CLIP).unwrap();
    // A PBX writing in place, with a streaming header: the first half, then a pause
    // shorter than the settle time, then the rest.
    let path = spool.join("inplace.wav");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(path.exists(), "picked up while still being written:\n{}", d.log_text());
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&bytes[bytes.len() / 2..]).unwrap();
    let result = spool.join("done/inplace.result.json");
    assert!(wait_until(WAIT, || result.exists()), "log:\n{}", d.log_text());
    let r = read_json(&result);
    let duration = r["duration_ms"].as_u64().unwrap();
    assert!((4000..6000).contains(&duration), "read before it was whole: {duration} ms");
}
