//! The store against real SQLite files in a temporary state directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::crypto::{MasterKey, Place, RecordKind, KEY_BYTES};
use super::*;

const PHRASE: &str = "这款理财保本零风险";
const NUMBER: &str = "13812345678";
const NAME: &str = "欧阳娜娜";

fn admin() -> Actor {
    Actor { uid: 0, role: "admin".into() }
}

fn master(byte: u8) -> MasterKey {
    MasterKey::new(&[byte; KEY_BYTES])
}

fn start(id: &str, customer: Option<&str>, at_ms: i64) -> CallStart {
    CallStart {
        id: id.into(),
        source: "spool".into(),
        line: "line-1".into(),
        started_unix_ms: at_ms,
        agent: Some("agent-7".into()),
        campaign: Some("spring".into()),
        script: Some("v3".into()),
        customer: customer.map(str::to_owned),
    }
}

fn utterance(index: u64, text: &str, unmasked: Option<&str>) -> StoredUtterance {
    StoredUtterance {
        index,
        leg: if index % 2 == 0 { "agent".into() } else { "customer".into() },
        start_secs: index as f64 * 2.0,
        end_secs: index as f64 * 2.0 + 1.5,
        text: text.into(),
        unmasked: unmasked.map(str::to_owned),
        intents: if index % 2 == 1 { vec!["price_inquiry".into()] } else { vec![] },
        emotion: Some("neutral".into()),
        phase: Some("needs_discovery".into()),
        facts: Some(serde_json::json!({"asr_ms": 120})),
        asr_ms: Some(100.0 + index as f64 * 200.0),
        understanding_ms: Some(20.0),
    }
}

/// A finished call with the phrase, and the number and name in the unmasked text.
fn store_one(store: &mut CallStore, id: &str, customer: Option<&str>, at_ms: i64) {
    store.begin_call(&start(id, customer, at_ms)).unwrap();
    let said = format!("我叫{NAME} 电话{NUMBER}");
    store
        .append(
            id,
            &[
                utterance(0, PHRASE, Some(PHRASE)),
                utterance(1, "我叫[name] 电话[mobile]", Some(&said)),
                utterance(2, "好的", Some("好的")),
            ],
        )
        .unwrap();
    store
        .add_hits(
            id,
            &[StoredHit {
                rule: "forbidden_promise".into(),
                severity: "critical".into(),
                event: Some("supervisor_alert".into()),
                reason: "agent promised a guaranteed return".into(),
                at_secs: 1.0,
                utterances: vec![0],
            }],
        )
        .unwrap();
    store
        .finish_call(
            id,
            &CallEnd {
                ended_unix_ms: at_ms + 60_000,
                phase: "closing".into(),
                tags: vec!["price_sensitive".into()],
                converted: false,
                rules_version: Some("rules-1".into()),
            },
        )
        .unwrap();
}

/// Every file under `dir`, recursively, as raw bytes.
fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn assert_nowhere(dir: &Path, secrets: &[&str]) {
    let files = all_bytes(dir);
    let names: Vec<_> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    assert!(files.len() >= 2, "expected both databases, found {names:?}");
    for (path, bytes) in files {
        for secret in secrets {
            let needle = secret.as_bytes();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{secret} in clear in {}", path.display());
        }
    }
}

#[test]
fn no_phrase_number_or_name_is_in_any_file_with_or_without_the_unmasked_text() {
    for keep_unmasked in [false, true] {
        let state = tempfile::tempdir().unwrap();
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), keep_unmasked).unwrap();
        for i in 0..20 {
            store_one(&mut store, &format!("call-{i}"), Some("c0ffee"), 1_000 + i);
        }
        // While open (the WAL holds the newest pages) and after closing.
        let wal = state.path().join(STORE_DIR).join("calls.sqlite-wal");
        assert!(wal.exists());
        assert_nowhere(state.path(), &[PHRASE, NUMBER, NAME, "理财"]);
        let read = store.transcript("call-3", &admin(), 5_000).unwrap();
        assert_eq!(read.utterances[0].text, PHRASE, "and it does come back for an admin");
        assert_eq!(read.unmasked.len(), if keep_unmasked { 3 } else { 0 });
        if keep_unmasked {
            assert!(read.unmasked[1].1.contains(NUMBER));
        }
        drop(store);
        assert_nowhere(state.path(), &[PHRASE, NUMBER, NAME, "理财"]);
        for (path, _) in all_bytes(&state.path().join(STORE_DIR)) {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        }
    }
}

#[test]
fn forgetting_a_customer_shreds_their_calls_for_good_and_twice_is_a_no_op() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), true).unwrap();
    store_one(&mut store, "theirs-1", Some("aaaa"), 1_000);
    store_one(&mut store, "theirs-2", Some("aaaa"), 2_000);
    store_one(&mut store, "someone-else", Some("bbbb"), 3_000);
    // What an attacker copied out before the erasure: the sealed rows.
    let copied: Vec<(String, i64, i64, Vec<u8>)> = store
        .calls
        .prepare("SELECT call, kind, idx, sealed FROM record WHERE call LIKE 'theirs-%'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(copied.len(), 12);

    let done = store.forget("aaaa", &admin(), 10_000).unwrap();
    assert_eq!((done.calls, done.first_time), (2, true));
    // No key the box holds opens any of the copied ciphertext.
    let wrapped: Vec<(String, String, Vec<u8>)> = store
        .keys
        .prepare("SELECT call, class, wrapped FROM class_key")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(wrapped.iter().all(|(call, _, _)| call == "someone-else"));
    for (call, kind, idx, sealed) in &copied {
        let kind = RecordKind::from_code(*kind).unwrap();
        let place = Place { call, kind, index: *idx as u64, last: false };
        for (owner, class, w) in &wrapped {
            let key = store.master.unwrap(owner, DataClass::from_name(class).unwrap(), w).unwrap();
            assert!(key.open(place, sealed).is_err());
        }
        assert!(store.transcript(call, &admin(), 11_000).unwrap().utterances.is_empty());
    }
    let left = store.list(&CallFilter { customer: Some("aaaa".into()), ..Default::default() }).unwrap();
    assert!(left.is_empty(), "no call is linked to the customer any more: {left:?}");
    let gone = store.summary("theirs-1").unwrap();
    assert_eq!((gone.status.as_str(), gone.customer.clone(), gone.tags.len()), ("forgotten", None, 0));
    assert_eq!(gone.shredded.len(), 3);
    assert!(store.tombstone("aaaa").unwrap().is_some());
    assert_eq!(store.transcript("someone-else", &admin(), 12_000).unwrap().utterances.len(), 3);

    let again = store.forget("aaaa", &admin(), 13_000).unwrap();
    assert_eq!((again.calls, again.first_time), (0, false));
    let actions: Vec<String> =
        store.audit_entries(None).unwrap().into_iter().map(|e| e.event.action + ":" + &e.event.outcome).collect();
    assert!(actions.contains(&"forget:ok: 2 calls".to_owned()), "{actions:?}");
    assert!(actions.contains(&"forget:ok: already forgotten".to_owned()), "{actions:?}");
}

#[test]
fn ciphertext_swapped_between_calls_or_rows_or_with_a_flipped_bit_fails() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    store_one(&mut store, "a", None, 1_000);
    store_one(&mut store, "b", None, 2_000);
    let sealed = |store: &CallStore, call: &str, idx: i64| -> Vec<u8> {
        store
            .calls
            .query_row("SELECT sealed FROM record WHERE call = ?1 AND kind = 1 AND idx = ?2", params![call, idx], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let set = |store: &CallStore, call: &str, idx: i64, bytes: &[u8]| {
        store
            .calls
            .execute(
                "UPDATE record SET sealed = ?3 WHERE call = ?1 AND kind = 1 AND idx = ?2",
                params![call, idx, bytes],
            )
            .unwrap();
    };
    let (a0, a1, b0) = (sealed(&store, "a", 0), sealed(&store, "a", 1), sealed(&store, "b", 0));
    // Another call's row.
    set(&store, "a", 0, &b0);
    assert!(matches!(store.transcript("a", &admin(), 1), Err(StoreError::Crypto(_))));
    // Another row of the same call.
    set(&store, "a", 0, &a1);
    assert!(matches!(store.transcript("a", &admin(), 2), Err(StoreError::Crypto(_))));
    // One flipped bit.
    let mut flipped = a0.clone();
    flipped[3] ^= 0x10;
    set(&store, "a", 0, &flipped);
    assert!(matches!(store.transcript("a", &admin(), 3), Err(StoreError::Crypto(_))));
    set(&store, "a", 0, &a0);
    assert_eq!(store.transcript("a", &admin(), 4).unwrap().utterances[0].text, PHRASE);
    // A wrapped key moved to another call.
    let key_b: Vec<u8> = store
        .keys
        .query_row("SELECT wrapped FROM class_key WHERE call = 'b' AND class = 'transcript'", [], |r| r.get(0))
        .unwrap();
    store.keys.execute("UPDATE class_key SET wrapped = ?1 WHERE call = 'a' AND class = 'transcript'", [key_b]).unwrap();
    assert!(matches!(store.transcript("a", &admin(), 5), Err(StoreError::Crypto(_))));
}

#[test]
fn a_call_open_when_the_store_went_away_is_interrupted_and_never_written_again() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    store.begin_call(&start("live", None, 1_000)).unwrap();
    store.append("live", &[utterance(0, "您好", None), utterance(1, "多少钱", None)]).unwrap();
    drop(store); // as a kill -9 would leave it: no finish
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    let s = store.summary("live").unwrap();
    assert_eq!((s.status.as_str(), s.utterances), ("interrupted", 2));
    assert_eq!(s.intents.get("price_inquiry"), Some(&1));
    assert!(matches!(store.append("live", &[utterance(2, "x", None)]), Err(StoreError::BadInput { .. })));
    assert!(matches!(store.begin_call(&start("live", None, 2_000)), Err(StoreError::DuplicateCall(_))));
    assert_eq!(store.integrity().unwrap(), "ok");
}

#[test]
fn retention_shreds_audio_then_transcripts_then_removes_calls_by_their_age() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), true).unwrap();
    let day = MS_PER_DAY;
    let now = 1_000 * day;
    store_one(&mut store, "today", None, now - 1_000);
    store_one(&mut store, "40-days", None, now - 40 * day);
    store_one(&mut store, "200-days", None, now - 200 * day);
    store_one(&mut store, "4-years", None, now - 4 * 365 * day);
    let on_disk = || -> u64 {
        ["store/calls.sqlite", "store/calls.sqlite-wal"]
            .iter()
            .map(|f| std::fs::metadata(state.path().join(f)).map_or(0, |m| m.len()))
            .sum()
    };
    let size_before = on_disk();
    let report = store.sweep(&Retention::default(), now).unwrap();
    assert_eq!((report.audio_shredded, report.transcripts_shredded, report.calls_deleted), (3, 2, 1));
    let shredded = |id: &str| store.summary(id).unwrap().shredded;
    assert!(shredded("today").is_empty());
    assert_eq!(shredded("40-days"), ["audio"]);
    assert_eq!(shredded("200-days"), ["transcript", "unmasked", "audio"]);
    assert!(matches!(store.summary("4-years"), Err(StoreError::NoSuchCall(_))));
    assert_eq!(store.transcript("40-days", &admin(), now).unwrap().utterances.len(), 3);
    let old = store.transcript("200-days", &admin(), now).unwrap();
    assert!(old.utterances.is_empty() && old.unmasked.is_empty());
    assert_eq!(store.summary("200-days").unwrap().rule_hits.len(), 1, "metadata outlives the transcript");
    // A second run finds nothing more; the WAL is truncated and the file did not grow.
    let again = store.sweep(&Retention::default(), now).unwrap();
    assert_eq!((again.audio_shredded, again.transcripts_shredded, again.calls_deleted), (0, 0, 0));
    assert_eq!(std::fs::metadata(state.path().join("store/calls.sqlite-wal")).unwrap().len(), 0);
    assert!(on_disk() < size_before, "{} bytes, {size_before} before the sweep", on_disk());
    // Keys whose call never landed go too.
    let data = DataKey::from_bytes([4; KEY_BYTES]);
    let w = store.master.wrap("ghost", DataClass::Audio, &data.class_key(DataClass::Audio), [0; 12]);
    store
        .keys
        .execute("INSERT INTO class_key VALUES ('ghost', 'audio', ?1, ?2, ?3)", params![store.master.id(), w, now])
        .unwrap();
    assert_eq!(store.sweep(&Retention::default(), now).unwrap().orphan_keys, 1);
    // Each of the three runs is in the audit trail with its counts, and the chain holds.
    let runs: Vec<String> = store
        .audit_entries(None)
        .unwrap()
        .into_iter()
        .filter(|e| e.event.action == "retention")
        .map(|e| e.event.outcome)
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs[0].starts_with("ok: 3 audio and 2 transcripts shredded, 1 calls deleted"), "{runs:?}");
    assert!(runs[2].contains("1 stray keys"), "{runs:?}");
    assert!(store.audit_verify().unwrap().is_ok());
}

#[test]
fn the_audit_chain_finds_an_edited_deleted_or_reordered_entry() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    store_one(&mut store, "a", None, 1_000);
    for t in 0..5 {
        store.transcript("a", &admin(), 10_000 + t).unwrap();
    }
    assert_eq!(store.audit_verify().unwrap(), Ok(5));
    let entries = store.audit_entries(Some(10_003)).unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    assert!(entries.iter().all(|e| e.event.object == "a" && e.event.action == "transcript_read" && e.event.uid == 0));

    store.calls.execute("UPDATE audit SET uid = 1000 WHERE seq = 3", []).unwrap();
    assert_eq!(store.audit_verify().unwrap().unwrap_err().seq, 3);
    store.calls.execute("UPDATE audit SET uid = 0 WHERE seq = 3", []).unwrap();
    assert_eq!(store.audit_verify().unwrap(), Ok(5));

    // Reordered: two entries' contents swapped.
    let row = |seq: i64| -> (i64, String, String) {
        store
            .calls
            .query_row("SELECT at_ms, prev, hash FROM audit WHERE seq = ?1", [seq], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
    };
    let (r2, r3) = (row(2), row(3));
    for (seq, (at, prev, hash)) in [(2, &r3), (3, &r2)] {
        store
            .calls
            .execute("UPDATE audit SET at_ms = ?2, prev = ?3, hash = ?4 WHERE seq = ?1", params![seq, at, prev, hash])
            .unwrap();
    }
    assert_eq!(store.audit_verify().unwrap().unwrap_err().seq, 2);
    for (seq, (at, prev, hash)) in [(2, &r2), (3, &r3)] {
        store
            .calls
            .execute("UPDATE audit SET at_ms = ?2, prev = ?3, hash = ?4 WHERE seq = ?1", params![seq, at, prev, hash])
            .unwrap();
    }
    assert_eq!(store.audit_verify().unwrap(), Ok(5));

    store.calls.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    assert_eq!(store.audit_verify().unwrap().unwrap_err().seq, 5);
    store.calls.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
    let cut = store.audit_verify().unwrap().unwrap_err();
    assert_eq!(cut.seq, 4, "{cut}");
}

#[test]
fn the_master_key_is_made_once_private_and_a_wrong_or_missing_one_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let (key, source) = master::load(state.path(), None).unwrap();
    assert!(matches!(source, master::KeySource::Created(_)));
    let path = state.path().join(master::KEY_FILE);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let id = key.current.id().to_owned();
    let mut store = CallStore::open(state.path(), key, false).unwrap();
    store_one(&mut store, "a", None, 1);
    drop(store);
    let (again, source) = master::load(state.path(), None).unwrap();
    assert_eq!((again.current.id(), source), (id.as_str(), master::KeySource::File(path.clone())));
    assert!(again.next.is_none());

    // A credential from systemd wins over the file; here it is another key, and refused.
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join(master::CREDENTIAL_NAME), [7u8; KEY_BYTES]).unwrap();
    let (other, source) = master::load(state.path(), Some(creds.path())).unwrap();
    assert!(matches!(source, master::KeySource::Credential(_)));
    let err = CallStore::open(state.path(), other, false).err().unwrap();
    assert!(matches!(err, StoreError::WrongMasterKey { .. }), "{err}");
    assert!(err.to_string().contains(&id));

    std::fs::write(&path, [1u8; 5]).unwrap();
    let err = master::load(state.path(), None).err().unwrap();
    assert!(err.to_string().contains("5 bytes"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let err = master::load(state.path(), None).err().unwrap();
    assert!(err.to_string().contains("restore the key"), "{err}");
}

#[test]
fn a_batch_of_many_calls_is_one_transaction_and_a_refused_operation_writes_none_of_it() {
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    let mut ops = Vec::new();
    for c in 0..10 {
        let id = format!("c{c}");
        ops.push(StoreOp::Begin(start(&id, None, c)));
        ops.push(StoreOp::Append {
            call: id.clone(),
            utterances: vec![utterance(0, "您好", None), utterance(1, PHRASE, None)],
        });
        ops.push(StoreOp::Finish { call: id, end: CallEnd { ended_unix_ms: c + 1, ..Default::default() } });
    }
    store.apply(&ops).unwrap();
    assert_eq!(store.list(&CallFilter::default()).unwrap().len(), 10);
    assert_eq!(store.transcript("c7", &admin(), 1).unwrap().utterances[1].text, PHRASE);

    // The last operation refers to an unknown call: the two new calls before it are not stored.
    let bad = vec![
        StoreOp::Begin(start("d1", None, 1)),
        StoreOp::Append { call: "d1".into(), utterances: vec![utterance(0, "x", None)] },
        StoreOp::Begin(start("d2", None, 2)),
        StoreOp::Finish { call: "nowhere".into(), end: CallEnd::default() },
    ];
    assert!(matches!(store.apply(&bad), Err(StoreError::NoSuchCall(_))));
    assert!(matches!(store.summary("d1"), Err(StoreError::NoSuchCall(_))));
    assert_eq!(store.list(&CallFilter::default()).unwrap().len(), 10);
    // Their keys were committed first and are swept as orphans.
    assert_eq!(
        store.sweep(&Retention { audio_days: 0, transcript_days: 0, metadata_days: 0 }, 0).unwrap().orphan_keys,
        6
    );
    // One by one, the good ones go in.
    for op in &bad[..3] {
        store.apply(std::slice::from_ref(op)).unwrap();
    }
    assert_eq!(store.transcript("d1", &admin(), 2).unwrap().utterances.len(), 1);
    let dup = store.apply(&[StoreOp::Begin(start("c1", None, 0))]);
    assert!(matches!(dup, Err(StoreError::DuplicateCall(_))));
}

/// Every call's transcript opens and every key row is under `id`.
fn all_readable_under(store: &mut CallStore, calls: usize, id: &str) {
    for c in 0..calls {
        assert_eq!(store.transcript(&format!("c{c}"), &admin(), 1).unwrap().utterances.len(), 3);
    }
    let masters: Vec<String> = column(&store.keys, "SELECT DISTINCT master FROM class_key", []).unwrap();
    assert_eq!(masters, [id]);
}

#[test]
fn a_key_rotation_stopped_after_any_row_is_finished_by_the_next_open() {
    const CALLS: usize = 4; // 12 class keys
    for stop in 0..=12 {
        let state = tempfile::tempdir().unwrap();
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), true).unwrap();
        for c in 0..CALLS {
            store_one(&mut store, &format!("c{c}"), None, c as i64);
        }
        assert_eq!(store.rotate(master(2), Some(stop)).unwrap(), stop.min(12));
        drop(store); // as a crash would leave it: some rows under each key
        let both = MasterKeys { current: master(1), next: Some(master(2)) };
        let mut store = CallStore::open(state.path(), both, true).unwrap();
        all_readable_under(&mut store, CALLS, master(2).id());
        let rotations =
            store.audit_entries(None).unwrap().into_iter().filter(|e| e.event.action == "key_rotation").count();
        assert_eq!(rotations, 1, "stop after {stop}");
        drop(store);
        // The key file not yet promoted: old + new still opens, on the new key.
        let both = MasterKeys { current: master(1), next: Some(master(2)) };
        drop(CallStore::open(state.path(), both, true).unwrap());
        // Promoted: the new key alone opens; the old one alone is refused.
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(2)), true).unwrap();
        all_readable_under(&mut store, CALLS, master(2).id());
        drop(store);
        let err = CallStore::open(state.path(), MasterKeys::only(master(1)), true).err().unwrap();
        assert!(matches!(err, StoreError::WrongMasterKey { .. }), "{err}");
    }
}

#[test]
fn rotating_the_key_file_replaces_it_and_a_stop_between_the_steps_is_finished_at_start() {
    let state = tempfile::tempdir().unwrap();
    let (keys, _) = master::load(state.path(), None).unwrap();
    let old_id = keys.current.id().to_owned();
    let mut store = CallStore::open(state.path(), keys, false).unwrap();
    store_one(&mut store, "c0", None, 1);
    drop(store);
    // Step 1 only (a stop right after the new key file was written).
    let next = master::create_next(state.path()).unwrap();
    let new_id = next.id().to_owned();
    assert_ne!(new_id, old_id);
    let next_path = state.path().join(master::NEXT_KEY_FILE);
    assert_eq!(std::fs::metadata(&next_path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(master::create_next(state.path()).unwrap().id(), new_id, "a second call reuses it");
    // The next start loads both, the open finishes the rotation, the file is promoted.
    let (keys, _) = master::load(state.path(), None).unwrap();
    assert_eq!(keys.next.as_ref().map(|k| k.id().to_owned()), Some(new_id.clone()));
    let mut store = CallStore::open(state.path(), keys, false).unwrap();
    master::promote_next(state.path()).unwrap();
    all_readable_under(&mut store, 1, &new_id);
    drop(store);
    assert!(!next_path.exists());
    let (keys, _) = master::load(state.path(), None).unwrap();
    assert_eq!((keys.current.id(), keys.next.is_none()), (new_id.as_str(), true));
    CallStore::open(state.path(), keys, false).unwrap();
}

#[test]
fn what_the_pbx_says_about_a_call_is_kept_whether_it_comes_before_or_after_the_call_begins() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(dir.path(), MasterKeys::only(master(1)), false).unwrap();
    let info = |agent: Option<&str>, customer: Option<&str>, converted| CallInfo {
        source: None,
        agent: agent.map(str::to_owned),
        campaign: Some("spring".into()),
        script: None,
        customer: customer.map(str::to_owned),
        converted,
    };
    // A spool sidecar is told before the first utterance is understood: kept, then merged.
    store.apply(&[StoreOp::Describe { call: "early".into(), info: info(Some("a1"), None, false) }]).unwrap();
    store.apply(&[StoreOp::Describe { call: "early".into(), info: info(None, Some("cust"), true) }]).unwrap();
    let bare = CallStart { id: "early".into(), source: "spool".into(), started_unix_ms: 5, ..Default::default() };
    store.begin_call(&bare).unwrap();
    let s = store.summary("early").unwrap();
    assert_eq!(
        (s.agent.as_deref(), s.campaign.as_deref(), s.customer.as_deref()),
        (Some("a1"), Some("spring"), Some("cust"))
    );
    assert!(s.converted);
    // The PBX says "converted" after the hang-up: the finish does not turn it off.
    let late = CallStart { id: "late".into(), source: "audiosocket".into(), started_unix_ms: 6, ..Default::default() };
    store.begin_call(&late).unwrap();
    store.apply(&[StoreOp::Describe { call: "late".into(), info: info(None, Some("cust"), true) }]).unwrap();
    let end = CallEnd { ended_unix_ms: 9, phase: "closing".into(), ..Default::default() };
    store.finish_call("late", &end).unwrap();
    let s = store.summary("late").unwrap();
    assert!(s.converted && s.customer.as_deref() == Some("cust") && s.status == "finished");
    // A description is kept only once: a second call of the same id begins without it.
    assert_eq!(store.list(&CallFilter { customer: Some("cust".into()), ..Default::default() }).unwrap().len(), 2);
    // Pending descriptions are bounded: the oldest go first.
    for i in 0..(MAX_PENDING_DESCRIPTIONS + 10) {
        store.apply(&[StoreOp::Describe { call: format!("never-{i}"), info: info(Some("x"), None, false) }]).unwrap();
    }
    assert_eq!(store.described.len(), MAX_PENDING_DESCRIPTIONS);
    assert!(!store.described.contains_key("never-0"));
    // A forgotten call takes no new description.
    store.forget("cust", &admin(), 10).unwrap();
    store.apply(&[StoreOp::Describe { call: "late".into(), info: info(None, Some("cust"), false) }]).unwrap();
    assert_eq!(store.summary("late").unwrap().customer, None);
}

fn chunk(leg: crate::audio::Leg, index: u32, last: bool, seed: u8) -> audio::AudioChunk {
    audio::AudioChunk {
        leg,
        index,
        last,
        rate: 8000,
        start_secs: f64::from(index) * 5.0,
        // Distinct, recognisable bytes per chunk (searched for in the files below).
        mulaw: (0..40_000u32).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect(),
    }
}

#[test]
fn audio_is_sealed_per_leg_read_back_in_pages_shredded_by_retention_and_forgotten() {
    use crate::audio::Leg;
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    let audio_op = |call: &str, chunk| StoreOp::Audio { call: call.into(), chunk };
    // The first seconds arrive before the call begins (held), the rest after; the spool's
    // come after the call is finished.
    store.apply(&[audio_op("a", chunk(Leg::Customer, 0, false, 3))]).unwrap();
    store.begin_call(&start("a", Some("cust-a"), 1_000)).unwrap();
    store
        .apply(&[
            audio_op("a", chunk(Leg::Agent, 0, true, 5)),
            audio_op("a", chunk(Leg::Customer, 1, false, 7)),
            audio_op("a", chunk(Leg::Customer, 2, true, 9)),
        ])
        .unwrap();
    store.finish_call("a", &CallEnd { ended_unix_ms: 16_000, ..Default::default() }).unwrap();
    store.apply(&[audio_op("a", chunk(Leg::Customer, 3, true, 11))]).unwrap();
    // The same chunk twice is refused (one nonce, one record).
    assert!(store.apply(&[audio_op("a", chunk(Leg::Customer, 3, true, 11))]).is_err());
    let summary = store.summary("a").unwrap();
    assert_eq!(summary.audio_secs.get("customer").copied(), Some(15.0 + 5.0), "{summary:?}");
    assert_eq!(summary.audio_secs.get("agent").copied(), Some(5.0));

    // Nothing of it in clear anywhere (four 40-kB patterns, 64-byte windows).
    let files = all_bytes(state.path());
    for seed in [3u8, 5, 7, 9] {
        let needle = &chunk(Leg::Customer, 0, false, seed).mulaw[1000..1064];
        assert!(!files.iter().any(|(_, b)| b.windows(64).any(|w| w == needle)), "chunk {seed} in clear");
    }

    // Read back: pages, in order, complete; every page audited.
    let first = store.audio("a", Leg::Customer, 0, 50_000, &admin(), 20_000).unwrap();
    assert_eq!((first.rate, first.mulaw.len(), first.next), (8000, 40_000, Some(1)));
    let rest = store.audio("a", Leg::Customer, 1, 1 << 20, &admin(), 20_001).unwrap();
    assert_eq!((rest.mulaw.len(), rest.next, rest.complete), (80_000 + 40_000, None, true));
    let expect: Vec<u8> = [3u8, 7, 9, 11].iter().flat_map(|&s| chunk(Leg::Customer, 0, false, s).mulaw).collect();
    assert_eq!([first.mulaw, rest.mulaw].concat(), expect);
    let agent = store.audio("a", Leg::Agent, 0, 1 << 20, &admin(), 20_002).unwrap();
    assert_eq!((agent.mulaw, agent.complete), (chunk(Leg::Agent, 0, true, 5).mulaw, true));
    let reads = store.audit_entries(Some(20_000)).unwrap();
    assert_eq!(reads.iter().filter(|e| e.event.action == "audio_read" && e.event.outcome == "ok").count(), 3);

    // A chunk's last flag is part of its nonce: flipping it in the clear column breaks it.
    store
        .calls
        .execute("UPDATE record SET phase = '' WHERE call = 'a' AND kind = 3 AND phase = 'last' AND leg = 'agent'", [])
        .unwrap();
    assert!(store.audio("a", Leg::Agent, 0, 1 << 20, &admin(), 20_003).is_err());

    // An interrupted call takes no more audio (its nonces must not be reused).
    store.begin_call(&start("b", None, 2_000)).unwrap();
    drop(store);
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    assert!(store.apply(&[audio_op("b", chunk(Leg::Customer, 0, false, 13))]).is_err());

    // Retention shreds audio at audio_days; the transcript stays.
    let now = 1_000 + 31 * MS_PER_DAY;
    assert_eq!(store.sweep(&Retention::default(), now).unwrap().audio_shredded, 2);
    assert!(store.audio("a", Leg::Customer, 0, 1 << 20, &admin(), now).is_err());
    assert!(store.summary("a").unwrap().audio_secs.is_empty());
    assert_eq!(store.summary("a").unwrap().shredded, ["audio"]);
    assert!(store.audit_verify().unwrap().is_ok());
}

#[test]
fn audio_of_a_call_never_begun_is_held_within_a_bound() {
    use crate::audio::Leg;
    let state = tempfile::tempdir().unwrap();
    let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
    // 2,000 chunks of 40 kB = 80 MB for calls that never begin: the store holds at most
    // its bound and drops the largest waiting call first.
    for i in 0..2000u32 {
        let call = format!("silent-{}", i % 4);
        store.apply(&[StoreOp::Audio { call, chunk: chunk(Leg::Customer, i / 4, false, 1) }]).unwrap();
        assert!(store.early_audio_bytes <= MAX_EARLY_AUDIO_BYTES);
    }
    assert!(store.early_audio_bytes > 0);
    assert_eq!(store.early_audio_bytes, store.early_audio.values().flatten().map(|c| c.mulaw.len()).sum::<usize>());
}

mod outbox {
    //! The headquarters outbox in the real calls.sqlite.
    use super::*;
    use crate::uplink::aggregates::IntervalReport;
    use crate::uplink::messages::{self, CallReport};
    use crate::uplink::outbox::{Envelope, Gap, Lane};

    fn with_outbox(quotas: [u64; 5]) -> (tempfile::TempDir, CallStore) {
        let state = tempfile::tempdir().unwrap();
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
        store.enable_outbox(OutboxSettings::with_quotas(quotas)).unwrap();
        (state, store)
    }

    fn rows(store: &CallStore) -> Vec<OutboxRow> {
        store.outbox_page([0; 5], 10_000).unwrap()
    }

    #[test]
    fn a_finished_call_and_its_alert_are_queued_with_the_data_and_say_no_word_or_number() {
        let (state, mut store) = with_outbox([1 << 20; 5]);
        store_one(&mut store, "c1", Some("feedc0ffee"), 1_700_000_000_000);
        assert!(store.take_outbox_dirty());
        assert!(!store.take_outbox_dirty(), "the flag is taken once");
        let rows = rows(&store);
        let kinds: Vec<_> = rows.iter().map(|r| (r.lane, r.topic.as_str(), r.seq)).collect();
        assert_eq!(kinds, [(Lane::Alert, "up/alert/supervisor_alert", 1), (Lane::Calls, "up/calls/call", 1)]);
        for row in &rows {
            let body = String::from_utf8(row.body.clone()).unwrap();
            for secret in [PHRASE, NUMBER, NAME, "agent-7"] {
                assert!(!body.contains(secret), "{secret} in {body}");
            }
            messages::check(&row.topic, &row.body).unwrap();
        }
        let call: Envelope<CallReport> = serde_json::from_slice(&rows[1].body).unwrap();
        let c = call.data;
        assert_eq!((c.call.as_str(), c.utterances, c.duration_secs), ("c1", 3, 60.0));
        assert_eq!(c.intents.get("price_inquiry"), Some(&1));
        assert_eq!(c.emotions.get("neutral"), Some(&3));
        assert_eq!(c.events.get("supervisor_alert"), Some(&1));
        assert_eq!(c.customer.as_deref(), Some("feedc0ffee"));
        assert_eq!(c.agent.as_ref().map(String::len), Some(16), "a pseudonym, not the agent's name");
        assert_eq!(c.talk_secs.get("agent"), Some(&3.0));
        // A second call by the same agent carries the same pseudonym; the store reopened
        // keeps the rows and the lanes' sequence numbers.
        drop(store);
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
        store.enable_outbox(OutboxSettings::with_quotas([1 << 20; 5])).unwrap();
        store_one(&mut store, "c2", None, 1_700_000_100_000);
        let rows = self::rows(&store);
        assert_eq!(rows.len(), 4);
        let second: Envelope<CallReport> = serde_json::from_slice(&rows[3].body).unwrap();
        assert_eq!((second.seq, second.data.agent), (2, c.agent));
    }

    #[test]
    fn a_refused_batch_queues_nothing_and_the_ledger_stays_true() {
        let (_state, mut store) = with_outbox([1 << 20; 5]);
        store.begin_call(&start("c1", None, 1)).unwrap();
        // The batch finishes c1 then fails on a call that does not exist: nothing of it
        // may stay, the summary included.
        let end = CallEnd { ended_unix_ms: 2, phase: "closing".into(), ..Default::default() };
        let err = store.apply(&[
            StoreOp::Finish { call: "c1".into(), end: end.clone() },
            StoreOp::Finish { call: "nope".into(), end: end.clone() },
        ]);
        assert!(err.is_err());
        assert!(rows(&store).is_empty());
        let (lanes, _) = store.outbox_backlog().unwrap();
        assert!(lanes.iter().all(|l| l.rows == 0 && l.bytes == 0), "{lanes:?}");
        store.apply(&[StoreOp::Finish { call: "c1".into(), end }]).unwrap();
        assert_eq!(rows(&store)[0].seq, 1, "the refused batch used no sequence number");
    }

    #[test]
    fn acked_rows_leave_and_a_second_ack_is_a_no_op() {
        let (_state, mut store) = with_outbox([1 << 20; 5]);
        store_one(&mut store, "c1", None, 1);
        let ids: Vec<String> = rows(&store).into_iter().map(|r| r.id).collect();
        assert_eq!(store.outbox_delete(&ids[..1]).unwrap(), 1);
        assert_eq!(store.outbox_delete(&ids[..1]).unwrap(), 0);
        let left = rows(&store);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, ids[1]);
        let (lanes, _) = store.outbox_backlog().unwrap();
        assert_eq!(lanes.iter().map(|l| l.rows).sum::<u64>(), 1);
        // Paging after a sequence number skips what was sent on this connection.
        assert!(store.outbox_page([0, 0, 1, 0, 0], 10).unwrap().is_empty());
    }

    #[test]
    fn a_full_lane_sheds_its_oldest_into_one_gap_with_the_right_range_and_alerts_are_never_shed() {
        // The calls lane holds about three summaries; alerts have room.
        let (_state, mut store) = with_outbox([1 << 20, 1 << 20, 3_000, 1 << 20, 1 << 20]);
        for i in 0..20 {
            store_one(&mut store, &format!("call-{i:02}"), None, 1_000 + i);
        }
        let all = rows(&store);
        let alerts: Vec<_> = all.iter().filter(|r| r.lane == Lane::Alert).collect();
        assert_eq!(alerts.len(), 20, "every alert kept");
        assert_eq!(alerts.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
        let calls: Vec<_> = all.iter().filter(|r| r.lane == Lane::Calls).collect();
        let gaps: Vec<_> = calls.iter().filter(|r| r.topic == "gap").collect();
        assert_eq!(
            gaps.len(),
            1,
            "earlier gaps fold into the newest: {:?}",
            calls.iter().map(|r| &r.topic).collect::<Vec<_>>()
        );
        let gap: Envelope<Gap> = serde_json::from_slice(&gaps[0].body).unwrap();
        let kept: Vec<u64> = calls.iter().filter(|r| r.topic != "gap").map(|r| r.seq).collect();
        // Every summary is either still queued or counted in the gap, and the gap's range
        // covers exactly what is missing before the ones kept.
        assert_eq!(kept.len() as u64 + gap.data.count, 20, "kept {kept:?}, gap {:?}", gap.data);
        assert_eq!(gap.data.from_seq, 1);
        assert!(gap.data.to_seq < kept[0], "{:?} vs {kept:?}", gap.data);
        assert_eq!(gap.data.why, "quota");
        let (lanes, shed) = store.outbox_backlog().unwrap();
        assert_eq!(shed, gap.data.count);
        let calls_bytes: u64 = calls.iter().map(|r| r.body.len() as u64).sum();
        assert_eq!(lanes[Lane::Calls.index()].bytes, calls_bytes);
        assert!(calls_bytes <= 3_000 + 1_000, "bounded: {calls_bytes}");
        messages::check("gap", &gaps[0].body).unwrap();
    }

    #[test]
    fn health_reports_carry_the_outbox_and_leave_unsent_after_a_day_with_a_gap() {
        let (_state, mut store) = with_outbox([1 << 20; 5]);
        store_one(&mut store, "c1", None, 1);
        let report = DiagnosticsReport { daemon_version: "t".into(), uptime_secs: 5, ..Default::default() };
        store.apply(&[StoreOp::Diagnostics(report.clone()), StoreOp::Diagnostics(report)]).unwrap();
        let health: Vec<OutboxRow> = rows(&store).into_iter().filter(|r| r.lane == Lane::Diagnostics).collect();
        assert_eq!(health.len(), 2);
        let first: Envelope<DiagnosticsReport> = serde_json::from_slice(&health[0].body).unwrap();
        messages::check(&health[0].topic, &health[0].body).unwrap();
        assert_eq!(health[0].topic, "up/diagnostics/health");
        assert_eq!((first.data.outbox_rows["alert"], first.data.outbox_rows["calls"]), (1, 1), "{:?}", first.data);
        assert!(first.data.outbox_bytes["calls"] > 0);
        let second: Envelope<DiagnosticsReport> = serde_json::from_slice(&health[1].body).unwrap();
        assert_eq!(second.data.outbox_rows["diagnostics"], 1, "the first report counts in the second");
        // A day later neither was sent: both go, one gap says which; nothing else goes
        // (the call's window has ended meanwhile and is queued).
        let tick = store.outbox_tick(now_ms() + 3_600_000).unwrap();
        assert_eq!((tick.expired, tick.windows), (0, 1), "not yet");
        let tick = store.outbox_tick(now_ms() + 86_400_000 + 1_000).unwrap();
        assert_eq!(tick.expired, 2);
        let left = rows(&store);
        let lanes: Vec<(Lane, &str)> = left.iter().map(|r| (r.lane, r.topic.as_str())).collect();
        assert_eq!(
            lanes,
            [
                (Lane::Alert, "up/alert/supervisor_alert"),
                (Lane::Calls, "up/calls/call"),
                (Lane::Aggregates, "up/aggregates/interval"),
                (Lane::Diagnostics, "gap")
            ]
        );
        let gap: Envelope<Gap> = serde_json::from_slice(&left[3].body).unwrap();
        assert_eq!((gap.data.from_seq, gap.data.to_seq, gap.data.count, gap.data.why.as_str()), (1, 2, 2, "expired"));
        assert_eq!(gap.seq, 3, "the gap takes the lane's next number");
        let (lanes, _) = store.outbox_backlog().unwrap();
        assert_eq!(lanes[Lane::Diagnostics.index()].rows, 1, "the ledger follows: only the gap");
    }

    #[test]
    fn forgetting_a_customer_drops_their_unsent_messages_and_queues_an_erasure_notice() {
        let (_state, mut store) = with_outbox([1 << 20; 5]);
        store_one(&mut store, "c1", Some("feedc0ffee"), 1);
        store_one(&mut store, "c2", Some("0123456789"), 2);
        store.forget("feedc0ffee", &admin(), 3).unwrap();
        let all = rows(&store);
        let bodies: Vec<String> = all.iter().map(|r| String::from_utf8(r.body.clone()).unwrap()).collect();
        let notice = all.iter().position(|r| r.topic == "up/compliance/erasure").expect("an erasure notice");
        let n: Envelope<messages::ErasureNotice> = serde_json::from_slice(&all[notice].body).unwrap();
        assert_eq!((n.data.customer.as_str(), n.data.calls, n.data.unsent_dropped), ("feedc0ffee", 1, 1));
        assert_eq!(bodies.iter().filter(|b| b.contains("feedc0ffee")).count(), 1, "only the notice names them");
        assert!(bodies.iter().any(|b| b.contains("0123456789")), "another customer's call stays");
    }

    #[test]
    fn version_1_and_2_stores_are_upgraded_with_their_calls() {
        for from in [1, 2] {
            let state = tempfile::tempdir().unwrap();
            {
                let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
                store_one(&mut store, "old", None, 1);
            }
            // Back to what that version wrote: no aggregate tables nor latency columns
            // (version 2), and no outbox either (version 1).
            let path = state.path().join(STORE_DIR).join(CALLS_FILE);
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DROP TABLE aggregate; DROP TABLE aggregate_closed;
                 ALTER TABLE record DROP COLUMN asr_ms; ALTER TABLE record DROP COLUMN understanding_ms;
                 ALTER TABLE call DROP COLUMN rules_version;",
            )
            .unwrap();
            if from == 1 {
                conn.execute_batch("DROP TABLE outbox; DROP TABLE outbox_lane;").unwrap();
            }
            conn.pragma_update(None, "user_version", from).unwrap();
            drop(conn);
            let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
            store.enable_outbox(OutboxSettings::with_quotas([1 << 20; 5])).unwrap();
            assert_eq!(store.list(&Default::default()).unwrap().len(), 1);
            store_one(&mut store, "new", None, 2);
            assert_eq!(rows(&store).len(), 2, "from version {from}");
            assert_eq!(store.outbox_tick(i64::MAX / 2).unwrap().windows, 1, "the new call is counted");
            let version: i64 =
                Connection::open(&path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
            assert_eq!(version, 3);
        }
    }

    /// The `interval` messages in the aggregates lane.
    fn intervals(store: &CallStore) -> Vec<IntervalReport> {
        rows(store)
            .iter()
            .filter(|r| r.lane == Lane::Aggregates)
            .map(|r| {
                messages::check(&r.topic, &r.body).unwrap();
                serde_json::from_slice::<Envelope<IntervalReport>>(&r.body).unwrap().data
            })
            .collect()
    }

    fn window_ends(store: &CallStore) -> Vec<i64> {
        column(&store.calls, "SELECT ends_ms FROM aggregate ORDER BY ends_ms", []).unwrap()
    }

    #[test]
    fn a_conversion_after_the_summary_went_out_is_sent_once_and_counted_in_a_later_window() {
        let (_state, mut store) = with_outbox([1 << 20; 5]);
        store_one(&mut store, "c1", Some("feedc0ffee"), now_ms());
        let first_window = window_ends(&store)[0];
        assert_eq!(store.outbox_tick(first_window).unwrap().windows, 1);
        let said = || StoreOp::Describe { call: "c1".into(), info: CallInfo { converted: true, ..Default::default() } };
        store.apply(&[said()]).unwrap();
        store.apply(&[said()]).unwrap();
        let conversions: Vec<OutboxRow> =
            rows(&store).into_iter().filter(|r| r.topic == "up/calls/conversion").collect();
        assert_eq!(conversions.len(), 1, "said twice, sent once");
        messages::check(&conversions[0].topic, &conversions[0].body).unwrap();
        let notice: Envelope<messages::LateConversion> = serde_json::from_slice(&conversions[0].body).unwrap();
        assert_eq!((notice.data.call.as_str(), notice.data.customer.as_deref()), ("c1", Some("feedc0ffee")));
        let later = window_ends(&store);
        assert_eq!(later.len(), 1);
        assert!(later[0] > first_window, "not in the window already sent");
        assert_eq!(store.outbox_tick(later[0]).unwrap().windows, 1);
        let sent = intervals(&store);
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[0].counters.calls, sent[0].counters.converted), (1, 0));
        let late = &sent[1];
        assert_eq!((late.counters.calls, late.counters.converted_after_end), (0, 1));
        assert_eq!(late.key.rules_version, "rules-1", "under the call's own key");
        assert_eq!(late.key.agent, sent[0].key.agent);
    }

    #[test]
    fn finished_calls_count_in_their_window_which_is_queued_once_when_it_has_ended() {
        let (state, mut store) = with_outbox([1 << 20; 5]);
        let t0 = now_ms();
        store_one(&mut store, "c1", Some("feedc0ffee"), t0);
        store_one(&mut store, "c2", None, t0);
        let ends = window_ends(&store);
        assert!(!ends.is_empty() && ends.len() <= 2, "{ends:?}");
        // Nothing leaves before its window ends (a restart keeps the open window).
        assert_eq!(store.outbox_tick(ends[0] - 1).unwrap().windows, 0);
        drop(store);
        let mut store = CallStore::open(state.path(), MasterKeys::only(master(1)), false).unwrap();
        store.enable_outbox(OutboxSettings::with_quotas([1 << 20; 5])).unwrap();
        let last_end = *ends.last().unwrap();
        assert_eq!(store.outbox_tick(last_end).unwrap().windows, ends.len() as u64);
        assert!(window_ends(&store).is_empty());
        assert_eq!(store.outbox_tick(last_end).unwrap().windows, 0, "queued once");
        let sent = intervals(&store);
        let calls: u64 = sent.iter().map(|r| r.counters.calls).sum();
        assert_eq!(calls, 2);
        let first = &sent[0];
        assert_eq!(first.key.window_secs, 300);
        assert_eq!(first.key.window_start_unix_ms % 300_000, 0, "aligned");
        assert_eq!(first.key.rules_version, "rules-1");
        assert_eq!(first.key.agent.as_ref().map(String::len), Some(16), "the pseudonym");
        let sum = |f: &dyn Fn(&IntervalReport) -> f64| sent.iter().map(f).sum::<f64>();
        assert_eq!(sum(&|r| r.counters.duration_secs), 120.0);
        assert_eq!(sum(&|r| r.counters.utterances as f64), 6.0);
        // Utterances at 0-1.5, 2-3.5, 4-5.5 s of a 60-s call: 4.5 s spoken, none at once.
        assert_eq!(sum(&|r| r.counters.silence_secs), 111.0);
        assert_eq!(sum(&|r| r.counters.talk_over_secs), 0.0);
        assert_eq!(sum(&|r| r.counters.asr_ms.count as f64), 6.0);
        assert_eq!(sum(&|r| r.counters.events.get("supervisor_alert").copied().unwrap_or(0) as f64), 2.0);
        let hits: u64 = sent.iter().flat_map(|r| r.counters.rule_hits.values()).flat_map(|s| s.values()).sum();
        assert_eq!(hits, 2);
        if sent.len() == 1 {
            // 100, 300 and 500 ms per call: the median bucket is 300, the p99 the max.
            assert_eq!((first.asr_p50_ms, first.asr_p99_ms), (Some(300.0), Some(500.0)));
        }
        for r in &sent {
            let body = serde_json::to_string(r).unwrap();
            for secret in [PHRASE, NUMBER, NAME, "agent-7", "feedc0ffee"] {
                assert!(!body.contains(secret), "{secret} in {body}");
            }
        }
        // A call finished now lands in a window after the last one emitted, never in a
        // window already sent, even with the clock far behind it.
        store_one(&mut store, "c3", None, t0);
        let reopened = window_ends(&store);
        assert_eq!(reopened.len(), 1);
        assert!(reopened[0] > last_end, "{reopened:?} after {last_end}");
        assert_eq!(store.outbox_tick(reopened[0]).unwrap().windows, 1);
        let keys: std::collections::BTreeSet<String> =
            intervals(&store).iter().map(|r| serde_json::to_string(&r.key).unwrap()).collect();
        assert_eq!(keys.len(), sent.len() + 1, "every key sent once");
    }
}
