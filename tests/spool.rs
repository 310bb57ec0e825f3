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
    let settings = format!(
        "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\nspool.keep_in_clear = true\n{extra}",
        spool.display()
    );
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
    // The result is written first and the recording moved after it (crash safety), so
    // the filing is complete only when all three are in done/.
    let filed = || result.exists() && spool.join("done/call-1.wav").exists() && spool.join("done/call-1.json").exists();
    assert!(wait_until(WAIT, filed), "log:\n{}", d.log_text());
    assert!(!spool.join("call-1.wav").exists() && !spool.join("call-1.json").exists());

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
        "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\nspool.keep_in_clear = true\ncalls.max_concurrent = 1\naudiosocket.listeners = [{{ address = \"127.0.0.1:0\", leg = \"customer\" }}]",
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
fn an_entry_that_cannot_be_filed_away_is_warned_about_once() {
    let (d, spool) = spool_daemon("spool.settle_ms = 0");
    // failed/ replaced by a plain file: a FIFO named *.wav can be neither read nor moved.
    std::fs::remove_dir(spool.join("failed")).unwrap();
    std::fs::write(spool.join("failed"), "").unwrap();
    nix::unistd::mkfifo(&spool.join("stuck.wav"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let warned = || d.log_text().matches("cannot be moved to failed/").count();
    assert!(wait_until(WAIT, || warned() > 0), "log:\n{}", d.log_text());
    // 100-ms passes: some 20 more while we wait, and no second line.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(warned(), 1, "log:\n{}", d.log_text());
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

/// `n` stereo phone recordings renamed into `spool` as call-0.wav …, each with a sidecar.
fn drop_recordings(spool: &Path, n: usize) -> u64 {
    let template = spool.join(".template.wav");
    phone_recording(&template);
    let size = std::fs::metadata(&template).unwrap().len();
    for i in 0..n {
        let staged = spool.join(format!(".call-{i}.part"));
        std::fs::copy(&template, &staged).unwrap();
        std::fs::write(spool.join(format!("call-{i}.json")), format!(r#"{{"call_id":"soak-{i}"}}"#)).unwrap();
        std::fs::rename(&staged, spool.join(format!("call-{i}.wav"))).unwrap();
    }
    std::fs::remove_file(&template).unwrap();
    size
}

/// Every recording filed once in done/, beside the result that names it; nothing failed,
/// duplicated or half-written.
fn assert_each_filed_once_with_its_result(spool: &Path, n: usize, size: u64) {
    let done = spool.join("done");
    let mut names: Vec<String> =
        std::fs::read_dir(&done).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let expected: std::collections::BTreeSet<String> =
        (0..n).flat_map(|i| ["wav", "json", "result.json"].map(|ext| format!("call-{i}.{ext}"))).collect();
    let found: std::collections::BTreeSet<String> = names.drain(..).collect();
    let missing: Vec<_> = expected.difference(&found).collect();
    let extra: Vec<_> = found.difference(&expected).collect();
    let left: Vec<_> = std::fs::read_dir(spool).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}; in the spool {left:?}");
    for i in 0..n {
        let result = read_json(&done.join(format!("call-{i}.result.json")));
        assert_eq!(result["file"], format!("call-{i}.wav"), "{result}");
        assert_eq!(result["size_bytes"], size, "{result}");
        assert_eq!(result["metadata"]["call_id"], format!("soak-{i}"), "{result}");
        assert_eq!(std::fs::metadata(done.join(format!("call-{i}.wav"))).unwrap().len(), size);
    }
    assert!(std::fs::read_dir(spool.join("failed")).unwrap().next().is_none());
    let left: Vec<_> = std::fs::read_dir(spool).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only done/ and failed/ remain: {left:?}");
}

/// The probe's kill -9 loop lost 6 results of 4,000. Bounded here (1,000 files); the soak is
/// the same test with `CALLBOX_SOAK_FILES=4000` (README "Soak runs").
#[test]
fn kill_9_at_any_moment_loses_no_result_and_files_each_recording_once() {
    let n: usize = std::env::var("CALLBOX_SOAK_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let settings = format!(
        "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\nspool.settle_ms = 0\nspool.keep_in_clear = true",
        spool.display()
    );
    let config = dir.path().join("callbox.toml");
    std::fs::write(&config, TestDaemon::config_text(dir.path(), &settings)).unwrap();
    let size = drop_recordings(&spool, n);
    let waiting = || {
        std::fs::read_dir(&spool)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("wav".as_ref()))
            .count()
    };
    let log = dir.path().join("daemon.log");
    // Kill 0-140 ms after `start_ms`, a different moment each round (a fixed LCG:
    // reproducible). A round that filed nothing doubles `start_ms`, so a slow start (the
    // arm64 suite runs under qemu) is waited for instead of killed forever.
    let mut seed: u64 = 0x9e37_79b9;
    let (mut kills, mut mid_work, mut start_ms) = (0, 0, 10u64);
    while waiting() > 0 && kills < 20 * n + 100 {
        let before = waiting();
        let mut child = TestDaemon::spawn(&config, &log, &[]);
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(start_ms + (seed >> 33) % 140));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let after = waiting();
        if after < before && after > 0 {
            mid_work += 1;
        }
        if after == before {
            start_ms = (start_ms * 2).min(20_000);
        }
    }
    // A last, clean run: the start-up repair finishes whatever the last kill interrupted.
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    let socket = dir.path().join("control.sock");
    assert!(wait_until(WAIT, || crate::support::ping(&socket)), "{}", std::fs::read_to_string(&log).unwrap());
    assert!(wait_until(WAIT, || waiting() == 0), "{}", std::fs::read_to_string(&log).unwrap());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    eprintln!("{n} recordings, {kills} kill -9, {mid_work} of them while filing");
    assert!(mid_work >= 3, "only {mid_work} kills landed while files were being filed: the test proved nothing");
    assert_each_filed_once_with_its_result(&spool, n, size);
}

/// Unmounts the test's small filesystem, also when the test fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The probe filled the data filesystem: 20 of 20 results lost, nothing reprocessed after
/// space returned. On a real full filesystem (a 2 MiB tmpfs; the suite runs as root) the
/// recordings now stay in the spool, `status` says why, and all are filed once space is back.
#[test]
fn a_full_disk_keeps_recordings_in_the_spool_until_space_returns() {
    let n = 20;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root (the suite runs as root)");
    let unmount = Mounted(spool.clone());
    // Stage the recordings, then fill every byte left, then rename them in.
    let template = spool.join(".template.wav");
    phone_recording(&template);
    let size = std::fs::metadata(&template).unwrap().len();
    std::fs::create_dir_all(spool.join("done")).unwrap();
    std::fs::create_dir_all(spool.join("failed")).unwrap();
    for i in 0..n {
        std::fs::copy(&template, spool.join(format!(".call-{i}.part"))).unwrap();
        std::fs::write(spool.join(format!("call-{i}.json")), format!(r#"{{"call_id":"soak-{i}"}}"#)).unwrap();
    }
    std::fs::remove_file(&template).unwrap();
    let filler = spool.join(".filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
    }
    let settings = format!(
        "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\nspool.settle_ms = 0\nspool.keep_in_clear = true",
        spool.display()
    );
    let d = TestDaemon::start_in(dir, &settings, &[]);
    for i in 0..n {
        std::fs::rename(spool.join(format!(".call-{i}.part")), spool.join(format!("call-{i}.wav"))).unwrap();
    }
    let spool_health = || {
        let status = d.status_json();
        status["components"].as_array().unwrap().iter().find(|c| c["name"] == "spool").cloned().unwrap_or_default()
    };
    let degraded = wait_until(WAIT, || spool_health()["state"] == "degraded");
    assert!(degraded, "status: {}\nlog:\n{}", d.status_json(), d.log_text());
    let detail = spool_health().to_string();
    assert!(detail.contains("No space left"), "{detail}");
    std::thread::sleep(Duration::from_millis(1000));
    let waiting = || {
        std::fs::read_dir(&spool)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("wav".as_ref()))
            .count()
    };
    assert_eq!(waiting(), n, "every recording stays in the spool while the disk is full");
    std::fs::remove_file(&filler).unwrap();
    assert!(wait_until(WAIT, || waiting() == 0), "log:\n{}", d.log_text());
    assert!(wait_until(WAIT, || spool_health()["state"] == "ok"), "{}", d.status_json());
    assert_each_filed_once_with_its_result(&spool, n, size);
    // Detach the small filesystem first, so removing the test's folder then succeeds.
    drop(unmount);
    drop(d);
}
