//! `callbox bench store`: how fast the encrypted call store writes calls durably and reads
//! one back decrypted, on this machine's disk. A benchmark, not a test: it prints figures.

use std::path::Path;
use std::time::Instant;

use crate::exit::{self, Failure};
use crate::store::crypto::{MasterKey, KEY_BYTES};
use crate::store::{Actor, CallEnd, CallStart, CallStore, MasterKeys, StoreOp, StoredUtterance};

/// Writes `calls` calls of `utterances` utterances each into a fresh store under `dir`
/// (a new folder in the system temp folder by default, removed afterwards), then reads
/// `reads` of them back with their transcripts.
pub fn bench_store(
    dir: Option<&Path>,
    calls: usize,
    utterances: usize,
    reads: usize,
    batch_calls: usize,
    json: bool,
) -> Result<u8, Failure> {
    let fail = |e: crate::store::StoreError| Failure::new(exit::FAILURE, e.to_string());
    let base = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("callbox-bench-store-{}", std::process::id())),
    };
    let state = base.join("state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)
        .map_err(|e| Failure::new(exit::OS_ERROR, format!("cannot create {}: {e}", state.display())))?;
    let mut key = [0u8; KEY_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| Failure::new(exit::FAILURE, "the system random source failed"))?;
    let mut store = CallStore::open(&state, MasterKeys::only(MasterKey::new(&key)), false).map_err(fail)?;
    let said: Vec<StoredUtterance> = (0..utterances as u64)
        .map(|i| StoredUtterance {
            index: i,
            leg: if i % 2 == 0 { "agent".into() } else { "customer".into() },
            start_secs: i as f64 * 3.0,
            end_secs: i as f64 * 3.0 + 2.5,
            text: "您好 这边是客服中心 想跟您确认一下本月的账单和套餐情况 您看现在方便吗".into(),
            unmasked: None,
            intents: if i % 2 == 1 { vec!["price_inquiry".into()] } else { vec![] },
            emotion: Some("neutral".into()),
            phase: Some("needs_discovery".into()),
            facts: Some(serde_json::json!({"asr_ms": 180, "pitch_hz": 190.5, "energy_db": -21.0})),
            asr_ms: Some(180.0),
            understanding_ms: Some(12.0),
        })
        .collect();
    // As the store task will write: every call whole (begin, utterances, end), and
    // `batch_calls` calls per transaction (group commit).
    let started = Instant::now();
    let mut ops = Vec::new();
    for c in 0..calls {
        let id = format!("bench-{c:06}");
        ops.push(StoreOp::Begin(CallStart {
            id: id.clone(),
            source: "bench".into(),
            line: "line-1".into(),
            started_unix_ms: 1_000 * c as i64,
            customer: Some(format!("{:032x}", c % 97)),
            ..Default::default()
        }));
        ops.push(StoreOp::Append { call: id.clone(), utterances: said.clone() });
        let end = CallEnd { ended_unix_ms: 1_000 * c as i64 + 60_000, phase: "closing".into(), ..Default::default() };
        ops.push(StoreOp::Finish { call: id, end });
        if (c + 1) % batch_calls.max(1) == 0 || c + 1 == calls {
            store.apply(&ops).map_err(fail)?;
            ops.clear();
        }
    }
    let write_secs = started.elapsed().as_secs_f64();
    let actor = Actor { uid: 0, role: "admin".into() };
    let mut read_ms = Vec::with_capacity(reads);
    for r in 0..reads {
        let id = format!("bench-{:06}", (r * 7919) % calls.max(1));
        let t = Instant::now();
        let got = store.transcript(&id, &actor, r as i64).map_err(fail)?;
        read_ms.push(t.elapsed().as_secs_f64() * 1_000.0);
        if got.utterances.len() != utterances {
            return Err(Failure::new(
                exit::FAILURE,
                format!("call {id} read back {} utterances", got.utterances.len()),
            ));
        }
    }
    read_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| read_ms.get(((read_ms.len() as f64 * p) as usize).min(read_ms.len().saturating_sub(1))).copied();
    let bytes: u64 = ["calls.sqlite", "calls.sqlite-wal", "keys.sqlite"]
        .iter()
        .map(|f| std::fs::metadata(store.dir().join(f)).map_or(0, |m| m.len()))
        .sum();
    drop(store);
    if dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    let calls_per_sec = calls as f64 / write_secs;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "calls": calls, "utterances_per_call": utterances, "write_secs": write_secs,
                "calls_per_sec": calls_per_sec, "batch_calls": batch_calls, "reads": reads, "read_p50_ms": pct(0.5), "read_p99_ms": pct(0.99),
                "bytes": bytes,
            })
        );
    } else {
        println!(
            "{calls} calls × {utterances} utterances written durably, {batch_calls} per transaction, in \
             {write_secs:.2} s: {calls_per_sec:.0} calls/s ({:.0} bytes per call on disk)",
            bytes as f64 / calls.max(1) as f64
        );
        println!(
            "{reads} transcript reads (audited, decrypted): p50 {:.2} ms, p99 {:.2} ms",
            pct(0.5).unwrap_or(0.0),
            pct(0.99).unwrap_or(0.0)
        );
    }
    Ok(exit::OK)
}

/// `bench store --stream`: calls written the way the daemon writes them, through the
/// store thread (`CallVault`): `concurrent` calls at a time, each begun, fed one utterance
/// per write, given a rule hit and finished, interleaved with the others, every write
/// queued and group-committed by the thread. The store under `dir/state` is kept, with its
/// master key file, and a new run adds to it: that is what the kill -9 test drives.
pub fn bench_store_stream(
    dir: &Path,
    calls: usize,
    utterances: usize,
    concurrent: usize,
    json: bool,
) -> Result<u8, Failure> {
    use crate::store::live::CallVault;
    use crate::store::StoredHit;
    let fail = |e: crate::store::StoreError| Failure::new(exit::FAILURE, e.to_string());
    let state = dir.join("state");
    std::fs::create_dir_all(&state)
        .map_err(|e| Failure::new(exit::OS_ERROR, format!("cannot create {}: {e}", state.display())))?;
    let (vault, thread) =
        CallVault::open(&state, None, &crate::config::StoreConfig::default(), 0, None).map_err(fail)?;
    let utterance = |i: u64| StoredUtterance {
        index: i,
        leg: if i % 2 == 0 { "agent".into() } else { "customer".into() },
        start_secs: i as f64 * 3.0,
        end_secs: i as f64 * 3.0 + 2.5,
        text: format!("第{i}句 您好 这边是客服中心 想跟您确认一下本月的账单"),
        unmasked: None,
        intents: vec![],
        emotion: Some("neutral".into()),
        phase: Some("opening".into()),
        facts: None,
        ..Default::default()
    };
    let run = std::process::id();
    let started = Instant::now();
    let mut live: Vec<(String, u64)> = Vec::new();
    let (mut begun, mut finished) = (0usize, 0usize);
    while finished < calls {
        while live.len() < concurrent.max(1) && begun < calls {
            let id = format!("stream-{run}-{begun:07}");
            let start = CallStart {
                id: id.clone(),
                source: "bench".into(),
                started_unix_ms: crate::store::now_ms(),
                ..Default::default()
            };
            vault.write_blocking(StoreOp::Begin(start)).map_err(fail)?;
            live.push((id, 0));
            begun += 1;
        }
        for (id, said) in live.iter_mut() {
            vault
                .write_blocking(StoreOp::Append { call: id.clone(), utterances: vec![utterance(*said)] })
                .map_err(fail)?;
            *said += 1;
        }
        let mut still = Vec::with_capacity(live.len());
        for (id, said) in live.drain(..) {
            if said < utterances as u64 {
                still.push((id, said));
                continue;
            }
            let hit = StoredHit {
                rule: "bench".into(),
                severity: "info".into(),
                event: None,
                reason: "a streamed call".into(),
                at_secs: 1.0,
                utterances: vec![0],
            };
            vault.write_blocking(StoreOp::Hits { call: id.clone(), hits: vec![hit] }).map_err(fail)?;
            let end = CallEnd { ended_unix_ms: crate::store::now_ms(), phase: "closing".into(), ..Default::default() };
            vault.write_blocking(StoreOp::Finish { call: id, end }).map_err(fail)?;
            finished += 1;
        }
        live = still;
    }
    let counters = thread.close_blocking().map_err(fail)?;
    let secs = started.elapsed().as_secs_f64();
    let (calls_per_sec, writes_per_commit) =
        (calls as f64 / secs, counters.written as f64 / counters.batches.max(1) as f64);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "calls": calls, "utterances_per_call": utterances, "concurrent": concurrent, "secs": secs,
                "calls_per_sec": calls_per_sec, "writes": counters.written, "commits": counters.batches,
                "refused": counters.failed,
            })
        );
    } else {
        println!(
            "{calls} calls × {utterances} utterances streamed through the store thread, {concurrent} at a time, \
             one utterance per write, in {secs:.2} s: {calls_per_sec:.0} calls/s; {} writes in {} group commits \
             ({writes_per_commit:.1} per commit), {} refused",
            counters.written, counters.batches, counters.failed
        );
    }
    Ok(if counters.failed == 0 { exit::OK } else { exit::FAILURE })
}
