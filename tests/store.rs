//! The encrypted call store through the real daemon: a spooled call with its sidecar is
//! understood and stored as it goes; technicians see metadata, admins decrypt (audited);
//! export, erasure, key rotation and the audit chain through the real socket, as root, as
//! a technician (nobody in the technician group) and as a stranger.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::support::{run_as_nobody, stderr_of, world_executable_copy, TestDaemon};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/cache");
const CLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/speech/zh/BAC009S0764W0121.wav");
/// Words the clip says (its transcript is personal data once stored).
const SAID: [&str; 3] = ["出现", "交易", "情况"];
const CALLER: &str = "13800138000";
const LONG: Duration = Duration::from_secs(120);

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), stderr_of(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", crate::support::stdout_of(out)))
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn a_stored_call_is_sealed_and_read_erased_and_audited_by_role_through_the_socket() {
    assert!(Path::new(MODELS).join("manifest.json").exists(), "models missing: run `bash models/build.sh` first");
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let settings = format!(
        "speech.encoder_buckets_secs = [8]\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\n\
         control.technician_group = \"nogroup\"\nstore.keep_unmasked = true\nstore.keep_audio = true",
        spool.display()
    );
    let d = TestDaemon::start_in(dir, &settings, &[("CALLBOX_MODELS_DIR", MODELS)]);
    std::fs::write(
        spool.join("call-1.json"),
        format!(r#"{{"caller_number":"{CALLER}","agent_id":"a-7","campaign":"spring","script_version":"v3"}}"#),
    )
    .unwrap();
    std::fs::copy(CLIP, spool.join(".incoming")).unwrap();
    std::fs::rename(spool.join(".incoming"), spool.join("call-1.wav")).unwrap();

    // Stored as understood, then finished; the sidecar's facts are on the record.
    let listed = || json(&d.cli(&["calls", "list", "--json"]))["calls"].clone();
    let finished = crate::support::wait_until(LONG, || listed()[0]["status"] == "finished");
    assert!(finished, "{}\nlog:\n{}", listed(), d.log_text());
    let call = listed()[0].clone();
    // The spool keeps ids, status and metadata only: no recording, no sidecar, no text.
    let result_file = spool.join("done/call-1.result.json");
    // The result is written first and the recording deleted after it (crash safety).
    let filed = || result_file.exists() && !spool.join("call-1.wav").exists();
    assert!(crate::support::wait_until(LONG, filed), "log:\n{}", d.log_text());
    let result = std::fs::read_to_string(&result_file).unwrap();
    assert!(!result.contains("utterances") && !result.contains(CALLER), "{result}");
    let left: Vec<_> = std::fs::read_dir(spool.join("done")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["call-1.result.json"], "only the result stays");
    assert!(!spool.join("call-1.wav").exists() && !spool.join("call-1.json").exists());
    assert_eq!(call["call"], "spool:call-1");
    assert_eq!((&call["agent"], &call["campaign"], &call["script"]), (&"a-7".into(), &"spring".into(), &"v3".into()));
    assert_eq!(call["customer"].as_str().map(str::len), Some(32), "{call}");
    assert_eq!((&call["source"], call["utterances"].as_i64()), (&"spool".into(), Some(1)), "{call}");
    let by_customer = json(&d.cli(&["calls", "list", "--customer", CALLER, "--json"]));
    assert_eq!(by_customer["calls"].as_array().map(Vec::len), Some(1));
    assert_eq!(json(&d.cli(&["calls", "list", "--customer", "13900139000", "--json"]))["calls"], serde_json::json!([]));

    // Nothing said, and not the number, is in any file of the data directory in clear
    // (calls.sqlite, its WAL, keys.sqlite, customers.sqlite, the keys).
    let data = d.dir.path().join("data");
    for needle in SAID.iter().map(|w| w.as_bytes()).chain([CALLER.as_bytes()]) {
        assert_eq!(files_containing(&data, needle), Vec::<String>::new(), "{}", String::from_utf8_lossy(needle));
    }
    for (file, mode) in [("store/calls.sqlite", 0o600), ("store/keys.sqlite", 0o600), ("keys/master.key", 0o600)] {
        assert_eq!(std::fs::metadata(data.join(file)).unwrap().mode() & 0o777, mode, "{file}");
    }

    // The recording moved into the store (keep_audio): its µ-law bytes are in no file in
    // clear, and an admin gets the leg back sample for sample.
    let clip = callbox::audio::wav::parse(&std::fs::read(CLIP).unwrap()).unwrap();
    let mulaw = callbox::audio::g711::encode_ulaw(&clip.channels[0]);
    let middle = &mulaw[mulaw.len() / 2..mulaw.len() / 2 + 64];
    assert_eq!(files_containing(&data, middle), Vec::<String>::new(), "the recording's audio in clear");
    let shown = json(&d.cli(&["calls", "show", "spool:call-1", "--json"]));
    let kept_secs = shown["call"]["audio_secs"]["customer"].as_f64().unwrap_or_default();
    assert!((kept_secs - clip.duration_secs()).abs() < 0.01, "{kept_secs} s kept of {}: {shown}", clip.duration_secs());
    let wav_out = d.dir.path().join("customer.wav");
    let out = d.cli(&["calls", "audio", "spool:call-1", "--leg", "customer", "--out", wav_out.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(std::fs::metadata(&wav_out).unwrap().mode() & 0o777, 0o600);
    let back = callbox::audio::wav::parse(&std::fs::read(&wav_out).unwrap()).unwrap();
    assert_eq!(back.sample_rate, clip.sample_rate);
    assert_eq!(back.channels[0], callbox::audio::g711::decode_ulaw(&mulaw), "the leg comes back sample for sample");

    // Root is an admin: decrypts (masked and, kept here, unmasked text).
    let shown = json(&d.cli(&["calls", "show", "spool:call-1", "--transcript", "--json"]));
    let text = shown["utterances"][0]["text"].as_str().unwrap_or_default().to_owned();
    assert!(SAID.iter().all(|w| text.contains(w)), "{shown}");
    assert!(shown["utterances"][0]["unmasked"].is_string(), "{shown}");

    // A technician sees the metadata and the masked summary, never text; each refusal is audited.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let bin = world_executable_copy(d.dir.path());
    let socket = d.socket.to_str().unwrap();
    let as_nobody = |args: &[&str]| run_as_nobody(&bin, &[&["--socket", socket][..], args].concat());
    let listed_by_tech = json(&as_nobody(&["calls", "list", "--json"]));
    assert_eq!(listed_by_tech["calls"][0]["call"], "spool:call-1");
    let summary = json(&as_nobody(&["calls", "show", "spool:call-1", "--json"]));
    assert_eq!(summary["utterances"], serde_json::json!([]), "{summary}");
    for denied in [
        &["calls", "show", "spool:call-1", "--transcript"][..],
        &["calls", "export", "spool:call-1", "--out", "/tmp/callbox-test-never-written.json"],
        &["calls", "audio", "spool:call-1", "--out", "/tmp/callbox-test-never-written.wav"],
        &["customer", "forget", CALLER],
        &["audit", "show"],
        &["keys", "rotate"],
    ] {
        let out = as_nobody(denied);
        assert_eq!(out.status.code(), Some(77), "{denied:?}: {}", stderr_of(&out));
        assert!(stderr_of(&out).contains("needs the admin role"), "{}", stderr_of(&out));
    }
    assert!(!Path::new("/tmp/callbox-test-never-written.json").exists());
    assert!(!Path::new("/tmp/callbox-test-never-written.wav").exists());
    assert!(json(&as_nobody(&["audit", "verify", "--json"]))["ok"] == true);

    // Export: a 0600 file, never over an existing one.
    let export = d.dir.path().join("export.json");
    assert!(d.cli(&["calls", "export", "spool:call-1", "--out", export.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::metadata(&export).unwrap().mode() & 0o777, 0o600);
    assert!(SAID.iter().all(|w| std::fs::read_to_string(&export).unwrap().contains(w)));
    let again = d.cli(&["calls", "export", "spool:call-1", "--out", export.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr_of(&again));

    // The audit trail: who read, exported and was refused, with uid and role; no personal data.
    let audit = json(&d.cli(&["audit", "show", "--json"]));
    let entries = audit["entries"].as_array().unwrap().clone();
    let has = |uid: u64, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["uid"] == uid && e["action"] == action && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has(0, "transcript_read", "ok") && has(0, "export", "ok") && has(0, "audio_read", "ok"), "{audit}");
    assert!(has(65534, "calls_show_transcript", "refused") && has(65534, "customer_forget", "refused"), "{audit}");
    let audit_text = audit.to_string();
    assert!(!audit_text.contains(CALLER) && !SAID.iter().any(|w| audit_text.contains(w)), "{audit_text}");

    // Consent withdrawn: shredded, customer rows gone, tombstone; a second time is a no-op.
    let forgotten = json(&d.cli(&["customer", "forget", CALLER, "--json"]));
    assert_eq!((forgotten["calls"].as_u64(), &forgotten["first_time"]), (Some(1), &true.into()), "{forgotten}");
    let again = json(&d.cli(&["customer", "forget", CALLER, "--json"]));
    assert_eq!((again["calls"].as_u64(), &again["first_time"]), (Some(0), &false.into()), "{again}");
    let after = json(&d.cli(&["calls", "show", "spool:call-1", "--transcript", "--json"]));
    assert_eq!(after["utterances"], serde_json::json!([]), "{after}");
    assert_eq!(after["call"]["status"], "forgotten");
    assert!(after["call"]["customer"].is_null() && after["call"]["tags"] == serde_json::json!([]), "{after}");
    assert!(json(&d.cli(&["customer", CALLER, "--json"]))["customer"].is_null());
    let gone = d.dir.path().join("gone.wav");
    let out = d.cli(&["calls", "audio", "spool:call-1", "--out", gone.to_str().unwrap()]);
    assert!(!out.status.success() && !gone.exists(), "audio of a forgotten call: {}", stderr_of(&out));

    // Key rotation through the socket; the chain still holds; stats name the new key.
    let before = json(&d.cli(&["store", "stats", "--json"]))["master_key"].clone();
    let rotated = json(&d.cli(&["keys", "rotate", "--json"]));
    assert_ne!(rotated["master_key"], before, "{rotated}");
    assert!(!data.join("keys/master.key.new").exists(), "the new key file replaced the old one");
    let stats = json(&d.cli(&["store", "stats", "--json"]));
    assert_eq!((stats["master_key"].clone(), stats["calls"].as_i64()), (rotated["master_key"].clone(), Some(1)));
    let verified = json(&d.cli(&["audit", "verify", "--json"]));
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["entries"].as_u64().unwrap() >= 7, "{verified}");

    // A stranger (no role) is refused at connect, before any request.
    let reconfigured = TestDaemon::config_text(d.dir.path(), &settings.replace("nogroup", "callbox-test-none"));
    std::fs::write(&d.config, reconfigured).unwrap();
    assert!(d.cli(&["reload"]).status.success());
    let out = as_nobody(&["calls", "list"]);
    assert_eq!(out.status.code(), Some(77), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("may not use callbox"), "{}", stderr_of(&out));
    assert_eq!(crate::support::personal_data_in(&d.log_text()), None, "{}", d.log_text());
}

/// The writer is `callbox bench store --stream`: calls written as the daemon writes them
/// (begun, one utterance per write, a rule hit, finished; 16 at a time, interleaved, group
/// committed by the store thread). It is killed with SIGKILL at a random moment, 50 times;
/// after each kill the store opens (calls left open become `interrupted`), passes
/// `PRAGMA integrity_check`, and every call is whole: finished with all its utterances, or
/// interrupted with a gap-free run of them that decrypts; no call twice.
#[test]
fn kill_9_while_calls_stream_in_never_corrupts_the_store_nor_splits_a_call() {
    use callbox::store::{master, CallFilter, CallStore};
    const KILLS: usize = 50;
    const UTTERANCES: i64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut random = move |below: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % below
    };
    let admin = callbox::store::Actor { uid: 0, role: "admin".into() };
    let mut checked_interrupted = 0;
    for kill in 0..KILLS {
        let mut writer = crate::support::callbox()
            .args(["bench", "store", "--stream", "16", "--calls", "1000000", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = writer.id();
        std::thread::sleep(Duration::from_millis(20 + random(300)));
        writer.kill().unwrap();
        let status = writer.wait().unwrap();
        assert!(!status.success(), "kill {kill}: the writer ended on its own: {status:?}");
        if !state.join("store").join("keys.sqlite").exists() {
            continue; // killed before the store existed
        }
        let (keys, _) = master::load(&state, None).unwrap();
        let mut store = CallStore::open(&state, keys, false).unwrap_or_else(|e| panic!("kill {kill}: {e}"));
        assert_eq!(store.integrity().unwrap(), "ok", "kill {kill}");
        let calls = store.list(&CallFilter { limit: i64::MAX, ..Default::default() }).unwrap();
        let ids: std::collections::HashSet<&str> = calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), calls.len(), "kill {kill}: a call twice");
        for c in &calls {
            match c.status.as_str() {
                "finished" => assert_eq!(c.utterances, UTTERANCES, "kill {kill}: {c:?}"),
                "interrupted" => {
                    // Only this kill's calls are read back (the earlier ones were checked then).
                    if !c.id.starts_with(&format!("stream-{pid}-")) {
                        continue;
                    }
                    let t = store.transcript(&c.id, &admin, 0).unwrap_or_else(|e| panic!("kill {kill} {}: {e}", c.id));
                    let idx: Vec<u64> = t.utterances.iter().map(|u| u.index).collect();
                    assert_eq!(idx, (0..c.utterances as u64).collect::<Vec<_>>(), "kill {kill}: {c:?}");
                    assert!(t.utterances.iter().all(|u| u.text.starts_with(&format!("第{}句", u.index))));
                    checked_interrupted += 1;
                }
                other => panic!("kill {kill}: call {} is {other} after reopening", c.id),
            }
        }
    }
    assert!(checked_interrupted > 0, "no kill ever caught a call half-way: the test proves nothing");
}

/// A data directory nearly full (here: a threshold above this disk's free space) refuses
/// new calls with the reason, keeps the daemon running and says so in status; once there
/// is room again (a reload with a lower threshold), the postponed recording is taken.
#[test]
fn a_nearly_full_disk_refuses_new_calls_and_says_why_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let settings = |refuse_mb: u64| {
        format!(
            "speech.enabled = false\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\n\
             storage.min_free_mb = 16777216\nstorage.refuse_calls_below_mb = {refuse_mb}\nstorage.check_interval_secs = 1\n\
             storage.stop_audio_below_mb = 16777216",
            spool.display()
        )
    };
    let d = TestDaemon::start_in(dir, &settings(16 * 1024 * 1024), &[]);
    let storage = |d: &TestDaemon| {
        d.status_json()["components"].as_array().unwrap().iter().find(|c| c["name"] == "storage").cloned().unwrap()
    };
    assert!(crate::support::wait_until(LONG, || storage(&d)["detail"]
        .as_str()
        .unwrap()
        .contains("REFUSING NEW CALLS")));
    std::fs::copy(CLIP, spool.join("waiting.wav")).unwrap();
    assert!(crate::support::wait_until(LONG, || d.log_text().contains("waiting.wav: postponed: refusing new calls")));
    assert!(spool.join("waiting.wav").exists(), "a refused recording waits in the spool");
    let status = d.status_json();
    assert!(status["calls"]["total_refused"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(storage(&d)["state"], "degraded");
    // Room again: the recording is taken.
    let reconfigured = TestDaemon::config_text(d.dir.path(), &settings(0));
    std::fs::write(&d.config, reconfigured).unwrap();
    assert!(d.cli(&["reload"]).status.success());
    let result = spool.join("done/waiting.result.json");
    assert!(crate::support::wait_until(LONG, || result.exists()), "log:\n{}", d.log_text());
    assert!(d.log_text().contains("taking new calls again"));
}
