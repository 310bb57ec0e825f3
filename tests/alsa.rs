//! ALSA capture without hardware: alsa-lib's `file` plugin feeds the capture PCM from a
//! raw file (tests/fixtures/asound-file.conf). Speech is off here; tests/speech.rs sends a
//! real clip through the same path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{run_cli, stderr_of, stdout_of, wait_until, TestDaemon};

const WAIT: Duration = Duration::from_secs(30);
const ALSA_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/asound-file.conf");
const RATE: usize = 8000;

/// Writes interleaved 2-channel 8 kHz S16_LE: `agent` and `customer` sample lists,
/// the shorter padded with silence.
fn write_raw(path: &Path, agent: &[i16], customer: &[i16]) {
    let n = agent.len().max(customer.len());
    let mut bytes = Vec::with_capacity(n * 4);
    for i in 0..n {
        bytes.extend_from_slice(&agent.get(i).copied().unwrap_or(0).to_le_bytes());
        bytes.extend_from_slice(&customer.get(i).copied().unwrap_or(0).to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn silence(secs: f64) -> Vec<i16> {
    vec![0; (secs * RATE as f64) as usize]
}

/// A 440 Hz tone at −12 dBFS.
fn tone(secs: f64) -> Vec<i16> {
    (0..(secs * RATE as f64) as usize)
        .map(|i| (8192.0 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / RATE as f64).sin()) as i16)
        .collect()
}

fn alsa_daemon(infile: &Path, device: &str, extra: &str) -> TestDaemon {
    let settings = format!(
        "speech.enabled = false\nalsa.device = \"{device}\"\nalsa.channels = 2\nalsa.sample_rate = 8000\n\
         alsa.map = [{{ channel = 0, line = \"1\", leg = \"agent\" }}, {{ channel = 1, line = \"1\", leg = \"customer\" }}]\n{extra}"
    );
    let infile = infile.to_str().unwrap().to_owned();
    TestDaemon::start(&settings, &[("ALSA_CONFIG_PATH", ALSA_CONF), ("CALLBOX_TEST_INFILE", &infile)])
}

fn alsa_health(d: &TestDaemon) -> serde_json::Value {
    let status = d.status_json();
    status["components"].as_array().unwrap().iter().find(|c| c["name"] == "alsa").cloned().unwrap_or_default()
}

fn call_cli(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--socket", d.socket.to_str().unwrap(), "call"];
    all.extend_from_slice(args);
    run_cli(&all)
}

fn infile(dir: &Path) -> PathBuf {
    dir.join("line.raw")
}

#[test]
fn sound_on_a_line_starts_a_call_and_silence_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = infile(dir.path());
    // Customer speaks (a tone) for 1.5 s after 0.5 s of quiet; long silence after, so the
    // plugin's repeated last buffer after the end of the file is silence too.
    let mut customer = silence(0.5);
    customer.extend(tone(1.5));
    customer.extend(silence(30.0));
    write_raw(&input, &[], &customer);
    let d = alsa_daemon(&input, "callbox_test", "alsa.silence_timeout_secs = 1");
    let ended = wait_until(WAIT, || d.log_text().contains("ended: silence timeout"));
    let log = d.log_text();
    assert!(ended, "no call ended; log:\n{log}");
    assert!(log.contains("call on line 1 started"), "{log}");
    assert_eq!(log.matches("call on line 1 started").count(), 1, "one burst is one call: {log}");
    // The call table's summary: both legs, the customer's carrying preroll + tone + timeout.
    let summary = log.lines().find(|l| l.contains("call ended (")).unwrap_or_else(|| panic!("{log}"));
    assert!(summary.contains("call_id=alsa:1:") || summary.contains("alsa:1:"), "{summary}");
    let customer_ms: u64 = summary
        .split("customer ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    // 0.3 s preroll (less what came before the tone) + 1.5 s tone + 1 s silence timeout.
    assert!((2400..=2900).contains(&customer_ms), "{customer_ms} ms: {summary}");
    let health = alsa_health(&d);
    assert_eq!(health["state"], "ok", "{health}");
    assert!(health["detail"].as_str().unwrap().contains("line 1: idle"), "{health}");
}

#[test]
fn without_auto_start_calls_follow_start_and_stop_requests() {
    let dir = tempfile::tempdir().unwrap();
    let input = infile(dir.path());
    write_raw(&input, &tone(2.0), &tone(2.0));
    let d = alsa_daemon(&input, "callbox_test", "alsa.auto_start = false\nalsa.silence_timeout_secs = 1");
    // Sound alone starts nothing.
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.status_json()["calls"]["active"].as_array().unwrap().is_empty());

    let out = call_cli(&d, &["start", "1"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let said = stdout_of(&out);
    let call = said.split_whitespace().nth(1).unwrap().to_owned();
    assert!(call.starts_with("alsa:1:") && said.contains("started on line 1"), "{said}");
    let active = d.status_json()["calls"]["active"].clone();
    assert_eq!(active[0]["call"], call.as_str(), "{active}");
    assert_eq!(active[0]["legs"].as_array().unwrap().len(), 2, "{active}");
    // Audio flows into the call while it lasts (the plugin is not paced: it is quick).
    assert!(wait_until(WAIT, || d.status_json()["calls"]["active"][0]["legs"][0]["audio_ms"].as_u64() > Some(0)));

    let again = call_cli(&d, &["start", "1"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr_of(&again).contains("already in call"), "{}", stderr_of(&again));
    let unknown = call_cli(&d, &["start", "9"]);
    assert!(stderr_of(&unknown).contains("no line \"9\""), "{}", stderr_of(&unknown));

    let stop = call_cli(&d, &["stop", "1", "--json"]);
    assert!(stop.status.success(), "{}", stderr_of(&stop));
    let reply: serde_json::Value = serde_json::from_str(&stdout_of(&stop)).unwrap();
    assert_eq!((reply["call"].as_str(), reply["started"].as_bool()), (Some(call.as_str()), Some(false)));
    assert!(d.status_json()["calls"]["active"].as_array().unwrap().is_empty());
    let none = call_cli(&d, &["stop", "1"]);
    assert!(stderr_of(&none).contains("no call in progress"), "{}", stderr_of(&none));
    assert!(d.log_text().contains("call on line 1 ended: stop requested"));
}

#[test]
fn a_missing_device_degrades_capture_and_the_daemon_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let input = infile(dir.path());
    write_raw(&input, &[], &silence(1.0));
    let d = alsa_daemon(&input, "callbox_nowhere", "");
    assert!(wait_until(WAIT, || alsa_health(&d)["state"] == "degraded"), "{}", d.log_text());
    let detail = alsa_health(&d)["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("callbox_nowhere") && detail.contains("cannot open"), "{detail}");
    let out = call_cli(&d, &["start", "1"]);
    assert!(stderr_of(&out).contains("is not open"), "{}", stderr_of(&out));
    // Said once in the log, not on every retry.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.log_text().matches("cannot open").count(), 1, "{}", d.log_text());
}

#[test]
fn call_requests_without_capture_are_refused_clearly() {
    let d = TestDaemon::start("", &[]);
    let out = call_cli(&d, &["start", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("ALSA capture is off"), "{}", stderr_of(&out));
}
