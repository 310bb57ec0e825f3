//! The headquarters uplink against a real mosquitto (Debian's `mosquitto`) started by the
//! test: TLS with certificates made here (openssl), client certificates required, the
//! box's identity as its MQTT user and a per-box ACL. `callbox hq listen` is HQ: it stores
//! what arrives in SQLite and acks it. Calls are real: spooled recordings of a shared
//! clip, understood by the daemon, stored, queued in the outbox in the same transaction.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{callbox, stderr_of, wait_until, TestDaemon};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/cache");
const CLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/speech/zh/BAC009S0764W0121.wav");
const CALLER: &str = "13800138000";
/// Words the clip says: they must never reach HQ.
const SAID: [&str; 2] = ["交易", "情况"];
const LONG: Duration = Duration::from_secs(180);
/// An event on a word the clip says (the alert lane), and a warning without an event on
/// another (the compliance lane).
const RULES: &str = r#"
[[rule]]
id = "says_trade"
description = "the word trade"
severity = "critical"
event = "supervisor_alert"
when = { keywords_any = ["交易"] }

[[rule]]
id = "says_situation"
description = "the word situation"
severity = "warning"
when = { keywords_any = ["情况"] }
"#;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (apt install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, the broker's certificate (127.0.0.1) and client certificates, in one folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        pki.ca("ca");
        pki.ca("other-ca");
        // X.509 v3 with the usages TLS checks (openssl's x509 -req makes v1 without them).
        std::fs::write(
            pki.path("server.ext"),
            "basicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n",
        )
        .unwrap();
        std::fs::write(pki.path("client.ext"), "basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n").unwrap();
        pki.issue("ca", "broker", "localhost", 2, "server.ext");
        pki.issue("ca", "box1", "site-a/box-1", 2, "client.ext");
        pki.issue("ca", "box2", "site-a/box-2", 2, "client.ext");
        pki.issue("ca", "hq", "hq", 2, "client.ext");
        // Valid for no time at all: expired by the time it is used.
        pki.issue("ca", "expired", "site-a/box-1", 0, "client.ext");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn ca(&self, name: &str) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
            ],
        );
    }

    fn issue(&self, ca: &str, name: &str, cn: &str, days: u32, ext: &str) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let subject = format!("/CN={}", cn.replace('/', "\\/"));
        openssl(
            self.dir.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subject,
            ],
        );
        let (ca_pem, ca_key, days) = (format!("{ca}.pem"), format!("{ca}.key"), days.to_string());
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                &days,
                "-extfile",
                ext,
            ],
        );
        std::fs::set_permissions(self.path(&key), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// mosquitto on 127.0.0.1:`port`: TLS only, client certificates required, the
/// certificate's CN as user name, each box confined to its own prefix.
struct Broker {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn new(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let acl = dir.path().join("acl");
        std::fs::write(
            &acl,
            "user hq\ntopic read callbox/v1/#\ntopic write callbox/v1/+/+/ack\n\n\
             pattern write callbox/v1/%u/#\npattern read callbox/v1/%u/ack\npattern read callbox/v1/%u/state\n",
        )
        .unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous false\npersistence false\nuser root\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n\
                 listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
                 use_identity_as_username true\nacl_file {}\n",
                pki.p("ca.pem"),
                pki.p("broker.pem"),
                pki.p("broker.key"),
                acl.display()
            ),
        )
        .unwrap();
        let mut broker = Broker { port, conf, child: None, _dir: dir };
        broker.start();
        broker
    }

    fn start(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt install mosquitto)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "mosquitto did not listen"
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `callbox hq listen` into a SQLite file.
struct Hq {
    child: Child,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Hq {
    fn start(pki: &Pki, url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hq.sqlite");
        let child = callbox()
            .args([
                "hq",
                "listen",
                "--broker",
                url,
                "--ca",
                &pki.p("ca.pem"),
                "--cert",
                &pki.p("hq.pem"),
                "--key",
                &pki.p("hq.key"),
            ])
            .arg("--db")
            .arg(&db)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("hq.log")).unwrap())
            .spawn()
            .unwrap();
        let hq = Hq { child, db, _dir: dir };
        assert!(wait_until(Duration::from_secs(20), || hq.log().contains("subscribed")), "hq listen: {}", hq.log());
        hq
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("hq.log")).unwrap_or_default()
    }

    /// (lane, kind, id, seq, data) in arrival order.
    fn messages(&self) -> Vec<(String, String, String, i64, String)> {
        let Ok(conn) = rusqlite::Connection::open(&self.db) else { return Vec::new() };
        let Ok(mut stmt) = conn.prepare("SELECT lane, kind, id, seq, data FROM message ORDER BY rowid") else {
            return Vec::new();
        };
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    fn count(&self, kind: &str) -> usize {
        self.messages().iter().filter(|m| m.1 == kind).count()
    }

    /// HQ's one row per aggregate key: (key, data).
    fn aggregates(&self) -> Vec<(String, serde_json::Value)> {
        let Ok(conn) = rusqlite::Connection::open(&self.db) else { return Vec::new() };
        let Ok(mut stmt) = conn.prepare("SELECT key, data FROM aggregate") else { return Vec::new() };
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map(|rows| rows.filter_map(Result::ok).map(|(k, d)| (k, serde_json::from_str(&d).unwrap())).collect())
            .unwrap_or_default()
    }

    /// HQ's view of the box's customers: (customer, revision, tags).
    fn customer_tags(&self) -> Vec<(String, i64, String)> {
        let Ok(conn) = rusqlite::Connection::open(&self.db) else { return Vec::new() };
        let Ok(mut stmt) = conn.prepare("SELECT customer, revision, tags FROM customer_tags") else {
            return Vec::new();
        };
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    fn birth(&self, box_id: &str) -> String {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        conn.query_row("SELECT body FROM box_state WHERE box = ?1 AND topic = 'birth'", [box_id], |r| r.get(0)).unwrap()
    }

    fn box_states(&self) -> Vec<(String, String)> {
        let Ok(conn) = rusqlite::Connection::open(&self.db) else { return Vec::new() };
        let Ok(mut stmt) = conn.prepare("SELECT box, topic FROM box_state") else { return Vec::new() };
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
}

impl Drop for Hq {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn hq_settings(pki: &Pki, url: &str, box_id: &str, cert: &str, ca: &str) -> String {
    format!(
        "hq.brokers = [\"{url}\"]\nhq.site = \"site-a\"\nhq.box_id = \"{box_id}\"\nhq.ca_file = \"{}\"\n\
         hq.cert_file = \"{}\"\nhq.key_file = \"{}\"\nhq.keepalive_secs = 5\nhq.ack_timeout_secs = 3\n",
        pki.p(&format!("{ca}.pem")),
        pki.p(&format!("{cert}.pem")),
        pki.p(&format!("{cert}.key")),
    )
}

/// A daemon that understands spooled calls with the rules above, and sends to `url`.
fn spool_daemon(dir: tempfile::TempDir, pki: &Pki, url: &str) -> TestDaemon {
    assert!(Path::new(MODELS).join("manifest.json").exists(), "models missing: run `bash models/build.sh` first");
    let spool = dir.path().join("spool");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let settings = format!(
        "speech.encoder_buckets_secs = [8]\nspool.dir = \"{}\"\nspool.poll_interval_ms = 100\n\
         understanding.rules_file = \"{}\"\nhq.interval_secs = 10\n{}",
        spool.display(),
        rules.display(),
        hq_settings(pki, url, "box-1", "box1", "ca")
    );
    TestDaemon::start_in(dir, &settings, &[("CALLBOX_MODELS_DIR", MODELS)])
}

fn spool_calls(d: &TestDaemon, names: &[&str]) {
    let spool = d.dir.path().join("spool");
    for name in names {
        std::fs::write(
            spool.join(format!("{name}.json")),
            format!(r#"{{"caller_number":"{CALLER}","agent_id":"agent-7","campaign":"spring","script_version":"v3"}}"#),
        )
        .unwrap();
        std::fs::copy(CLIP, spool.join(".incoming")).unwrap();
        std::fs::rename(spool.join(".incoming"), spool.join(format!("{name}.wav"))).unwrap();
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), stderr_of(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn outbox_kinds(d: &TestDaemon) -> Vec<String> {
    outbox_entries(d).into_iter().map(|(kind, _)| kind).collect()
}

/// The kinds a call's data brings (summaries, alerts, rule hits), not the box's own
/// health reports and aggregate windows, which come on their own clocks.
const CALL_KINDS: [&str; 3] = ["call", "supervisor_alert", "rule_hit"];

/// (kind, id) of every row waiting in the outbox.
fn outbox_entries(d: &TestDaemon) -> Vec<(String, String)> {
    let reply = json(&d.cli(&["hq", "outbox", "--json"]));
    reply["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_owned(), e["id"].as_str().unwrap().to_owned()))
        .collect()
}

fn call_rows(d: &TestDaemon) -> Vec<(String, String)> {
    outbox_entries(d).into_iter().filter(|(kind, _)| CALL_KINDS.contains(&kind.as_str())).collect()
}

/// Whether HQ has stored every one of these ids.
fn hq_has_all(hq: &Hq, ids: &[String]) -> bool {
    let stored: std::collections::HashSet<String> = hq.messages().into_iter().map(|m| m.2).collect();
    ids.iter().all(|id| stored.contains(id))
}

fn doctor_check(d: &TestDaemon, name: &str) -> serde_json::Value {
    let out = d.cli(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    checks.as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or_default()
}

fn hq_status(d: &TestDaemon) -> serde_json::Value {
    json(&d.cli(&["hq", "status", "--json"]))
}

/// Every id once; nothing said and no number; calls numbered 1..=n in their lane.
fn assert_delivered_once(hq: &Hq, calls: usize) {
    let messages = hq.messages();
    let mut ids: Vec<&String> = messages.iter().map(|m| &m.2).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), messages.len(), "an id stored twice");
    let seqs: Vec<i64> = messages.iter().filter(|m| m.1 == "call").map(|m| m.3).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=calls as i64).collect::<Vec<_>>(), "call summaries by sequence: {seqs:?}");
    for m in &messages {
        for secret in SAID.iter().chain([&CALLER, &"agent-7"]) {
            assert!(!m.4.contains(secret), "{secret} reached HQ in {}", m.4);
        }
    }
}

#[test]
fn every_call_reaches_hq_once_with_its_alert_and_nothing_said() {
    let pki = Pki::new();
    let broker = Broker::new(&pki);
    let hq = Hq::start(&pki, &broker.url());
    let d = spool_daemon(tempfile::tempdir().unwrap(), &pki, &broker.url());
    spool_calls(&d, &["call-1", "call-2", "call-3"]);
    let arrived =
        wait_until(LONG, || hq.count("call") == 3 && hq.count("supervisor_alert") == 3 && hq.count("rule_hit") == 3);
    assert!(
        arrived,
        "HQ has {:?}\nhq: {}\ndaemon: {}",
        hq.messages().iter().map(|m| &m.1).collect::<Vec<_>>(),
        hq.log(),
        d.log_text()
    );
    assert_delivered_once(&hq, 3);
    let call: serde_json::Value =
        serde_json::from_str(&hq.messages().iter().find(|m| m.1 == "call").unwrap().4).unwrap();
    assert_eq!((call["campaign"].as_str(), call["script"].as_str()), (Some("spring"), Some("v3")), "{call}");
    assert_eq!(call["events"]["supervisor_alert"], 1, "{call}");
    assert_eq!(call["customer"].as_str().map(str::len), Some(32), "the keyed hash: {call}");
    // The calls are counted in 10-s windows, each sent once it has ended.
    let counted = |hq: &Hq| hq.aggregates().iter().map(|(_, d)| d["counters"]["calls"].as_u64().unwrap()).sum::<u64>();
    assert!(wait_until(LONG, || counted(&hq) == 3), "aggregates at HQ: {:?}\n{}", hq.aggregates(), d.log_text());
    for (_, a) in hq.aggregates() {
        let key = &a["key"];
        assert_eq!((key["site"].as_str(), key["box"].as_str()), (Some("site-a"), Some("box-1")), "{a}");
        assert_eq!((key["campaign"].as_str(), key["script"].as_str()), (Some("spring"), Some("v3")), "{a}");
        assert_eq!(key["agent"], call["agent"], "the same pseudonym as the summaries: {a}");
        assert_eq!(key["window_secs"], 10);
        assert_eq!(key["window_start_unix_ms"].as_i64().unwrap() % 10_000, 0, "aligned: {a}");
        assert_eq!(key["rules_version"].as_str().map(str::len), Some(12), "{a}");
        assert_eq!(key["models_version"].as_str().map(str::len), Some(12), "{a}");
        let c = &a["counters"];
        let n = c["calls"].as_u64().unwrap();
        assert_eq!(c["events"]["supervisor_alert"].as_u64(), Some(n), "one alert per call: {a}");
        assert!(c["asr_ms"]["count"].as_u64().unwrap() >= n, "every utterance's ASR time: {a}");
        assert!(c["duration_secs"].as_f64().unwrap() > 0.0 && c["silence_secs"].as_f64().is_some(), "{a}");
    }
    assert_eq!(hq.count("interval"), hq.aggregates().len(), "one message per key");
    // The PBX says a call ended in a sale: the customer gains `converted`, and HQ gets the
    // customer's tags under the keyed hash.
    let id = call["call"].as_str().unwrap();
    assert!(d.cli(&["call", "info", id, "--converted"]).status.success());
    let customer = call["customer"].as_str().unwrap().to_owned();
    let tagged = |hq: &Hq| hq.customer_tags().iter().any(|(c, _, tags)| *c == customer && tags.contains("converted"));
    assert!(wait_until(LONG, || tagged(&hq)), "customer tags at HQ: {:?}\n{}", hq.customer_tags(), d.log_text());
    // Its summary went out unconverted: HQ hears of the conversion once, and a later
    // window counts it.
    let late = |hq: &Hq| {
        hq.aggregates().iter().map(|(_, a)| a["counters"]["converted_after_end"].as_u64().unwrap()).sum::<u64>()
    };
    assert!(wait_until(LONG, || hq.count("conversion") == 1 && late(&hq) == 1), "{:?}", hq.aggregates());
    // Acknowledged rows leave the outbox; the status says so.
    assert!(wait_until(Duration::from_secs(20), || outbox_kinds(&d).is_empty()), "{:?}", outbox_kinds(&d));
    let status = hq_status(&d);
    assert_eq!(status["connected"], true, "{status}");
    assert!(status["acked"].as_u64().unwrap() >= 9, "{status}");
    let doctor = doctor_check(&d, "headquarters");
    assert_eq!(doctor["verdict"], "pass", "{doctor}");
    assert!(doctor["detail"].as_str().unwrap().contains("online"), "{doctor}");
    // The box's retained state and its birth reached HQ too; the birth names the models'
    // and rules' versions the aggregates are keyed by.
    let states = hq.box_states();
    assert!(
        states.contains(&("box-1".into(), "state".into())) && states.contains(&("box-1".into(), "birth".into())),
        "{states:?}"
    );
    let birth: serde_json::Value = serde_json::from_str(&hq.birth("box-1")).unwrap();
    let window = &hq.aggregates()[0].1["key"];
    assert_eq!(
        (&birth["models_version"], &birth["rules_version"]),
        (&window["models_version"], &window["rules_version"])
    );
    // A health report went at start: component states, no free text.
    let health = hq.messages().into_iter().find(|m| m.1 == "health").expect("a health report");
    let health: serde_json::Value = serde_json::from_str(&health.4).unwrap();
    assert_eq!(health["components"]["store"], "ok", "{health}");
    assert!(health["disk_free_mb"].as_u64().is_some(), "{health}");
}

#[test]
fn a_broker_outage_and_a_kill_9_lose_nothing_and_deliver_nothing_twice_alerts_first() {
    let pki = Pki::new();
    let mut broker = Broker::new(&pki);
    broker.stop();
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_owned();
    let mut d = spool_daemon(dir, &pki, &broker.url());
    spool_calls(&d, &["call-1", "call-2", "call-3", "call-4"]);
    // Offline: everything waits in the outbox, and the status says why.
    let queued = wait_until(LONG, || outbox_kinds(&d).iter().filter(|k| *k == "call").count() == 4);
    assert!(queued, "{:?}\n{}", outbox_kinds(&d), d.log_text());
    let status = hq_status(&d);
    assert_eq!(status["connected"], false, "{status}");
    assert!(status["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{status}");
    let waiting = call_rows(&d).len();
    assert_eq!(waiting, 12, "4 calls, 4 alerts, 4 warnings: {:?}", outbox_kinds(&d));
    // Everything waiting now (health reports and ended windows too) must reach HQ.
    let before_kill: Vec<String> = outbox_entries(&d).into_iter().map(|(_, id)| id).collect();
    // kill -9 with a full outbox, then the broker and HQ come back, then the daemon.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    broker.start();
    let hq = Hq::start(&pki, &broker.url());
    let config = d.config.clone();
    let log = dir_path.join("daemon-2.log");
    let mut child = TestDaemon::spawn(&config, &log, &[("CALLBOX_MODELS_DIR", MODELS)]);
    // The aggregate windows open at the kill were kept on disk: all 4 calls are counted.
    let counted = |hq: &Hq| hq.aggregates().iter().map(|(_, d)| d["counters"]["calls"].as_u64().unwrap()).sum::<u64>();
    let all = wait_until(LONG, || hq_has_all(&hq, &before_kill) && counted(&hq) == 4);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        all,
        "HQ has {} messages, {} calls in aggregates\nhq: {}\ndaemon: {}",
        hq.messages().len(),
        counted(&hq),
        hq.log(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A little longer: a late resend must not show up as a second copy.
    std::thread::sleep(Duration::from_secs(4));
    assert_delivered_once(&hq, 4);
    let lanes: Vec<String> = hq.messages().iter().map(|m| m.0.clone()).collect();
    let last_alert = lanes.iter().rposition(|l| l == "alert").unwrap();
    let first_other = lanes.iter().position(|l| l != "alert").unwrap();
    assert!(last_alert < first_other, "alerts drained first: {lanes:?}");
    drop(d);
}

/// A TCP relay that can stop forwarding without closing anything: the silent cut of a
/// proxy or a NAT that dropped its state.
struct Relay {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    fn new(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            while f.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    // Frozen while reading: what was read is dropped, as a
                                    // cut link drops it.
                                    if f.load(Ordering::Relaxed) {
                                        continue;
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, frozen }
    }
}

#[test]
fn a_silent_cut_deletes_nothing_before_hq_acks_and_the_link_recovers() {
    let pki = Pki::new();
    let broker = Broker::new(&pki);
    let hq = Hq::start(&pki, &broker.url());
    let relay = Relay::new(broker.port);
    let url = format!("mqtts://127.0.0.1:{}", relay.port);
    let d = spool_daemon(tempfile::tempdir().unwrap(), &pki, &url);
    assert!(wait_until(Duration::from_secs(30), || hq_status(&d)["connected"] == true), "{}", d.log_text());
    relay.frozen.store(true, Ordering::Relaxed);
    spool_calls(&d, &["cut-1"]);
    // Understood and queued while the path is dead: nothing may leave the outbox, for
    // well past the ack timeout (3 s) and a keepalive (5 s).
    assert!(wait_until(LONG, || outbox_kinds(&d).contains(&"call".to_owned())), "{:?}", outbox_kinds(&d));
    let queued: Vec<String> = outbox_entries(&d).into_iter().map(|(_, id)| id).collect();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(call_rows(&d).len(), 3, "{:?}", outbox_kinds(&d));
    let still: Vec<String> = outbox_entries(&d).into_iter().map(|(_, id)| id).collect();
    assert!(queued.iter().all(|id| still.contains(id)), "a row left before its ack: {queued:?} vs {still:?}");
    assert!(hq.messages().iter().all(|m| !CALL_KINDS.contains(&m.1.as_str())), "{:?}", hq.messages());
    relay.frozen.store(false, Ordering::Relaxed);
    let arrived = wait_until(LONG, || hq_has_all(&hq, &still));
    assert!(arrived, "HQ has {:?}\n{}", hq.messages().len(), d.log_text());
    let drained = || call_rows(&d).is_empty() && !outbox_entries(&d).iter().any(|(_, id)| still.contains(id));
    assert!(wait_until(Duration::from_secs(30), drained), "{:?}", outbox_kinds(&d));
    assert_delivered_once(&hq, 1);
}

/// A daemon without inputs (no models needed) pointed at the broker.
fn bare_daemon(settings: &str) -> TestDaemon {
    TestDaemon::start(settings, &[])
}

#[test]
fn wrong_ca_expired_certificate_and_a_foreign_prefix_are_clear_errors_and_nothing_crashes() {
    let pki = Pki::new();
    let broker = Broker::new(&pki);
    let hq = Hq::start(&pki, &broker.url());
    let url = broker.url();
    let cases = [
        ("box-1", "box1", "other-ca", "certificate"),
        ("box-1", "expired", "ca", "TLS"),
        // The box's certificate is box-1's: box-2's prefix is not its own.
        ("box-2", "box1", "ca", "ACL"),
    ];
    for (box_id, cert, ca, expect) in cases {
        let mut d = bare_daemon(&hq_settings(&pki, &url, box_id, cert, ca));
        let clear = wait_until(Duration::from_secs(30), || {
            hq_status(&d)["last_error"].as_str().is_some_and(|e| e.contains(expect))
        });
        assert!(clear, "{box_id}/{cert}/{ca}: {}\n{}", hq_status(&d), d.log_text());
        assert_eq!(hq_status(&d)["connected"], false);
        assert!(d.is_running(), "the daemon runs on");
        let status = d.status_json();
        let hq_component = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "hq").cloned();
        assert_eq!(hq_component.as_ref().map(|c| c["state"].clone()), Some("degraded".into()), "{status}");
        let doctor = doctor_check(&d, "headquarters");
        assert_eq!(doctor["verdict"], "warn", "{doctor}");
        assert!(doctor["detail"].as_str().unwrap().contains("OFFLINE"), "{doctor}");
    }
    // Nothing was published under box-2's prefix with box-1's certificate; box-1 with its
    // own certificate and CA does reach HQ.
    let d = bare_daemon(&hq_settings(&pki, &url, "box-1", "box1", "ca"));
    assert!(wait_until(Duration::from_secs(30), || hq.box_states().iter().any(|(b, t)| b == "box-1" && t == "birth")));
    assert!(hq.box_states().iter().all(|(b, _)| b != "box-2"), "{:?}", hq.box_states());
    assert!(wait_until(Duration::from_secs(30), || hq_status(&d)["connected"] == true), "{}", hq_status(&d));
}

#[test]
fn a_key_file_others_can_read_stops_the_start_with_its_path() {
    let pki = Pki::new();
    let broker = Broker::new(&pki);
    std::fs::set_permissions(pki.path("box1.key"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("callbox.toml");
    std::fs::write(
        &config,
        TestDaemon::config_text(dir.path(), &hq_settings(&pki, &broker.url(), "box-1", "box1", "ca")),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = TestDaemon::spawn(&config, &log, &[]);
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(78), "{text}");
    assert!(text.contains("box1.key") && text.contains("readable by everyone"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}
