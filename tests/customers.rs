//! Customers across calls: caller numbers kept only as keyed hashes, tags and `converted`
//! per customer, kept across restarts. Speech is off here (fast, and runs under qemu);
//! tests/speech.rs has tags raised by real understanding.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::support::{stderr_of, wait_until, TestDaemon};

const WAIT: Duration = Duration::from_secs(30);
const CLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/speech/zh/IT0011W0001.wav");

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), stderr_of(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", crate::support::stdout_of(out)))
}

fn settings(spool: &std::path::Path) -> String {
    format!("speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100", spool.display())
}

#[test]
fn callers_are_customers_by_keyed_hash_kept_across_calls_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let d = TestDaemon::start_in(dir, &settings(&spool), &[]);
    // Two recordings from one caller, written two ways, and one from another caller.
    for (name, number) in [("a", "+86 138-0013-8000"), ("b", "13800138000"), ("c", "13900139000")] {
        std::fs::write(spool.join(format!("{name}.json")), format!(r#"{{"caller_number":"{number}"}}"#)).unwrap();
        std::fs::copy(CLIP, spool.join(format!("{name}.wav"))).unwrap();
    }
    let result = |n: &str| spool.join(format!("done/{n}.result.json"));
    assert!(wait_until(WAIT, || ["a", "b", "c"].iter().all(|n| result(n).exists())), "log:\n{}", d.log_text());
    let read = |n: &str| std::fs::read_to_string(result(n)).unwrap();
    let customer_of = |n: &str| serde_json::from_str::<serde_json::Value>(&read(n)).unwrap()["customer"].clone();
    let id = customer_of("a");
    assert_eq!(id.as_str().map(str::len), Some(32), "{}", read("a"));
    assert_eq!(customer_of("b"), id, "one caller, one customer");
    assert_ne!(customer_of("c"), id);
    assert!(!read("a").contains("0013") && !read("b").contains("13800138000"), "the number leaked: {}", read("b"));

    let c = json(&d.cli(&["customer", "+8613800138000", "--json"]))["customer"].clone();
    assert_eq!((&c["customer"], c["calls"].as_i64()), (&id, Some(2)), "{c}");
    assert_eq!(c["tags"], serde_json::json!([]));
    assert!(json(&d.cli(&["customer", "13700137000", "--json"]))["customer"].is_null());

    // The CRM says call b sold; a call without a caller cannot convert anyone.
    let c = json(&d.cli(&["call", "info", "spool:b", "--converted", "--json"]))["customer"].clone();
    assert_eq!(c["tags"][0]["tag"], "converted", "{c}");
    let refused = d.cli(&["call", "info", "spool:nope", "--converted"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr_of(&refused).contains("no call spool:nope"), "{}", stderr_of(&refused));
    let refused = d.cli(&["call", "info", "x", "--caller", "call me maybe"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr_of(&refused).contains("not a caller number"), "{}", stderr_of(&refused));
    // A PBX sidecar may name the caller before any audio; relinking to another is refused.
    let c = json(&d.cli(&["call", "info", "live-1", "--caller", "13900139000", "--json"]))["customer"].clone();
    assert_eq!((c["calls"].as_i64(), &c["customer"]), (Some(2), &customer_of("c")), "{c}");
    let refused = d.cli(&["call", "info", "live-1", "--caller", "13800138000"]);
    assert!(stderr_of(&refused).contains("already linked to another caller"), "{}", stderr_of(&refused));
    // Nothing to watch without speech: said clearly.
    let watch = d.cli(&["watch"]);
    assert_eq!(watch.status.code(), Some(1));
    assert!(stderr_of(&watch).contains("call understanding is off"), "{}", stderr_of(&watch));

    // Private files, and no number in the database.
    let data = d.dir.path().join("data");
    for (file, mode) in [("store/customers.sqlite", 0o600), ("store/caller-hash.key", 0o600), ("store", 0o700)] {
        assert_eq!(std::fs::metadata(data.join(file)).unwrap().mode() & 0o777, mode, "{file}");
    }
    let db = std::fs::read(data.join("store/customers.sqlite")).unwrap();
    assert!(!db.windows(11).any(|w| w == b"13800138000"));

    // Kept across a restart (and a second start reuses the key: same id).
    let (config, socket) = (d.config.clone(), d.socket.clone());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let mut d = d;
    assert!(d.wait_exit(WAIT).is_some_and(|s| s.success()), "log:\n{}", d.log_text());
    let log = d.dir.path().join("daemon2.log");
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    assert!(
        wait_until(WAIT, || crate::support::ping(&socket)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let c = json(&d.cli(&["customer", "138 0013 8000", "--json"]))["customer"].clone();
    assert_eq!((&c["customer"], c["calls"].as_i64(), &c["tags"][0]["tag"]), (&id, Some(2), &"converted".into()));
    let human = d.cli(&["customer", "13800138000"]);
    assert!(
        crate::support::stdout_of(&human).contains("converted")
            && crate::support::stdout_of(&human).contains("2 calls")
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_damaged_caller_key_stops_the_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("data/keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("caller-hash.key"), b"truncated").unwrap();
    let config = dir.path().join("callbox.toml");
    std::fs::write(&config, TestDaemon::config_text(dir.path(), "")).unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    let mut status = None;
    assert!(wait_until(WAIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.unwrap().code(), Some(71), "{text}");
    assert!(text.contains("caller-hash.key has 9 bytes") && text.contains("restore it from backup"), "{text}");
}
