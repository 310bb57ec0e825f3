//! `callbox bench outbox`: messages per second from the outbox to HQ and back (ack), and
//! how long an alert takes from the event to HQ while a backlog drains.
//!
//! Real parts end to end: a throw-away call store with the outbox on (SQLite, FULL sync),
//! the daemon's own `hq` component, a broker the operator names (a local mosquitto), and
//! `hq listen`'s code as HQ (SQLite, FULL sync, acks after commit). The backlog is finished
//! calls written through the store thread before the link starts; alerts are raised while
//! it drains, one every `alert_every_ms`, and timed from the moment the event is handed to
//! the store to the moment HQ stores it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigSource, HqConfig, RunningConfig};
use crate::exit::{self, Failure};
use crate::store::live::CallVault;
use crate::store::{CallEnd, CallStart, OutboxSettings, StoreOp, StoredHit};

pub struct BenchOutbox {
    pub broker: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub messages: usize,
    pub alerts: usize,
    pub alert_every_ms: u64,
    pub json: bool,
}

pub fn bench_outbox(b: &BenchOutbox) -> Result<u8, Failure> {
    let fail = |e: crate::store::StoreError| Failure::new(exit::FAILURE, e.to_string());
    let dir = tempfile_dir()?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state).map_err(|e| Failure::new(exit::OS_ERROR, e.to_string()))?;
    let hq_cfg = HqConfig {
        brokers: vec![b.broker.clone()],
        site: "bench".into(),
        box_id: format!("box-{}", std::process::id()),
        ca_file: b.ca.clone(),
        cert_file: b.cert.clone(),
        key_file: b.key.clone(),
        max_in_flight: 512,
        ..HqConfig::default()
    };
    let quotas = OutboxSettings::with_quotas([1 << 30; 5]);
    let (vault, thread) =
        CallVault::open(&state, None, &crate::config::StoreConfig::default(), 0, Some(quotas)).map_err(fail)?;

    // The backlog: finished calls, one summary each; and the calls the alerts will be about.
    let filled = Instant::now();
    for i in 0..b.messages {
        let id = format!("backlog-{i:07}");
        vault
            .write_blocking(StoreOp::Begin(CallStart {
                id: id.clone(),
                source: "bench".into(),
                line: "line-1".into(),
                started_unix_ms: crate::store::now_ms(),
                agent: Some("agent-1".into()),
                campaign: Some("bench".into()),
                ..Default::default()
            }))
            .map_err(fail)?;
        let end = CallEnd { ended_unix_ms: crate::store::now_ms(), phase: "closing".into(), ..Default::default() };
        vault.write_blocking(StoreOp::Finish { call: id, end }).map_err(fail)?;
    }
    for i in 0..b.alerts {
        let start = CallStart { id: format!("alert-{i:05}"), source: "bench".into(), ..Default::default() };
        vault.write_blocking(StoreOp::Begin(start)).map_err(fail)?;
    }
    vault.barrier_blocking().map_err(fail)?;
    let fill_secs = filled.elapsed().as_secs_f64();

    // HQ: the listener's own code on a thread, into its own SQLite file.
    let hq_db = dir.join("hq.sqlite");
    let stop = Arc::new(AtomicBool::new(false));
    let listen = crate::uplink::hq::ListenOptions {
        broker: b.broker.clone(),
        ca_file: b.ca.clone(),
        cert_file: b.cert.clone(),
        key_file: b.key.clone(),
        client_id: format!("bench-hq-{}", std::process::id()),
        group: format!("bench{}", std::process::id()),
        db: Some(hq_db.clone()),
        json: false,
    };
    let hq_stop = stop.clone();
    let hq = std::thread::spawn(move || crate::uplink::hq::listen(&listen, &|| hq_stop.load(Ordering::Relaxed)));
    std::thread::sleep(Duration::from_millis(500));

    // The box's link: the daemon's `hq` component on a runtime of its own.
    let tls = crate::uplink::link::tls_for(&hq_cfg).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    let config = Config { hq: hq_cfg, ..Config::default() };
    let running = RunningConfig {
        config,
        source: ConfigSource::Defaults { path: PathBuf::from("-"), reason: "bench".into() },
        generation: 1,
        last_reload: None,
    };
    let (_config_tx, config_rx) = tokio::sync::watch::channel(Arc::new(running));
    let (trigger, signal) = crate::health::shutdown_channel();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::OS_ERROR, e.to_string()))?;
    let link = runtime.spawn(crate::uplink::link::run(
        vault.clone(),
        tls,
        config_rx,
        crate::uplink::link::UplinkHandle::default(),
        crate::calls::registry::CallRegistry::new(1),
        crate::health::HealthBoard::default(),
        signal,
    ));
    let started = Instant::now();
    let total = b.messages + b.alerts;
    let mut raised: Vec<(String, i64)> = Vec::new();
    let mut next_alert = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    // When the last message of the backlog reached HQ (the alerts go on at their pace).
    let mut backlog_secs: Option<f64> = None;
    let delivered = loop {
        if raised.len() < b.alerts && Instant::now() >= next_alert {
            let call = format!("alert-{:05}", raised.len());
            let hit = StoredHit {
                rule: "bench_alert".into(),
                severity: "critical".into(),
                event: Some("supervisor_alert".into()),
                reason: "bench".into(),
                at_secs: 1.0,
                utterances: vec![0],
            };
            raised.push((call.clone(), crate::store::now_ms()));
            vault.write_blocking(StoreOp::Hits { call, hits: vec![hit] }).map_err(fail)?;
            next_alert += Duration::from_millis(b.alert_every_ms);
        }
        let count = count_rows(&hq_db, "SELECT count(*) FROM message");
        if backlog_secs.is_none()
            && count_rows(&hq_db, "SELECT count(*) FROM message WHERE lane = 'calls'") >= b.messages as i64
        {
            backlog_secs = Some(started.elapsed().as_secs_f64());
        }
        if count >= total as i64 || Instant::now() > deadline {
            break count;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let drain_secs = started.elapsed().as_secs_f64();
    trigger.trigger();
    let _ = runtime.block_on(link);
    stop.store(true, Ordering::Relaxed);
    let counts = hq.join().map_err(|_| Failure::new(exit::FAILURE, "the HQ listener panicked"))?;
    let _ = thread.close_blocking();
    let counts = counts.map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;

    let mut latencies: Vec<f64> = Vec::new();
    if let Ok(conn) = rusqlite::Connection::open(&hq_db) {
        for (call, raised_ms) in &raised {
            let received: Option<i64> = conn
                .query_row(
                    "SELECT received_ms FROM message WHERE lane = 'alert' AND json_extract(data, '$.call') = ?1",
                    [call],
                    |r| r.get(0),
                )
                .ok();
            if let Some(received) = received {
                latencies.push((received - raised_ms) as f64);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied();
    let backlog_secs = backlog_secs.unwrap_or(drain_secs);
    let rate = b.messages as f64 / backlog_secs;
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "backlog": b.messages, "alerts": b.alerts, "delivered": delivered, "duplicates": counts.duplicates,
                "fill_secs": fill_secs, "backlog_secs": backlog_secs, "drain_secs": drain_secs, "messages_per_sec": rate,
                "alert_ms_p50": pct(0.5), "alert_ms_p99": pct(0.99), "alert_ms_max": latencies.last(),
            })
        );
    } else {
        println!(
            "{} messages queued (store, FULL sync) in {fill_secs:.2} s; the {} of the backlog delivered to HQ and \
             acknowledged (HQ: SQLite, FULL sync, ack after commit) in {backlog_secs:.2} s: {rate:.0} msg/s; \
             {delivered} of {total} with the alerts in {drain_secs:.2} s; {} duplicates dropped by HQ",
            b.messages + b.alerts,
            b.messages,
            counts.duplicates
        );
        println!(
            "{} alerts raised every {} ms while the backlog drained: event → HQ p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            latencies.len(),
            b.alert_every_ms,
            pct(0.5).unwrap_or(f64::NAN),
            pct(0.99).unwrap_or(f64::NAN),
            latencies.last().copied().unwrap_or(f64::NAN)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if delivered as usize == total { exit::OK } else { exit::FAILURE })
}

fn count_rows(db: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db).and_then(|c| c.query_row(sql, [], |r| r.get(0))).unwrap_or(0)
}

fn tempfile_dir() -> Result<PathBuf, Failure> {
    let dir = std::env::temp_dir().join(format!("callbox-bench-outbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::new(exit::OS_ERROR, format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
