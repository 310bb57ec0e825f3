//! `callbox hq listen`: the HQ end, a starting point for HQ engineers and the tests' real
//! consumer. Subscribes with a shared subscription (`$share/{group}/callbox/v1/+/+/up/#`
//! and `…/gap`), so several listeners (or HQ workers behind an MQTT cluster) split the
//! load; checks each message against its kind's schema; drops duplicates by message id
//! (a SQLite table keyed by id); commits; then acks to the box (`{prefix}/ack`). An ack
//! is sent only after the message is durably stored, so a listener killed at any point
//! loses nothing: the box sends again whatever was not acknowledged.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, Transport};
use rusqlite::{params, Connection};

use super::link::Ack;
use super::outbox::Envelope;
use super::{messages, tls, UplinkError};
use crate::config::{BrokerUrl, HqConfig};

/// Where `hq listen` connects and what it writes.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_id: String,
    /// The shared-subscription group (`$share/{group}/…`).
    pub group: String,
    /// Messages kept in this SQLite file (deduplicated by id).
    pub db: Option<PathBuf>,
    /// Each new message printed as one JSON line on stdout.
    pub json: bool,
}

/// Counts for the end-of-run line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ListenCounts {
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS message (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, box TEXT NOT NULL, lane TEXT NOT NULL,
        seq INTEGER NOT NULL, kind TEXT NOT NULL, at_unix_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL, data TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS message_box ON message (site, box, lane, seq);
    CREATE TABLE IF NOT EXISTS rejected (
        topic TEXT NOT NULL, reason TEXT NOT NULL, received_ms INTEGER NOT NULL, bytes INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS box_state (
        site TEXT NOT NULL, box TEXT NOT NULL, topic TEXT NOT NULL, body TEXT NOT NULL,
        received_ms INTEGER NOT NULL, PRIMARY KEY (site, box, topic));
    CREATE TABLE IF NOT EXISTS aggregate (
        key TEXT PRIMARY KEY, site TEXT NOT NULL, box TEXT NOT NULL,
        window_start_unix_ms INTEGER NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS customer_tags (
        site TEXT NOT NULL, box TEXT NOT NULL, customer TEXT NOT NULL, revision INTEGER NOT NULL,
        tags TEXT NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (site, box, customer));
";

/// Most messages handled before their acks go out (one transaction, one ack per box).
const ACK_BATCH: usize = 512;
/// Longest a received message waits for its ack.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Runs until `stop` returns true (checked between events); returns the counts.
pub fn listen(opts: &ListenOptions, stop: &dyn Fn() -> bool) -> Result<ListenCounts, UplinkError> {
    let broker = BrokerUrl::parse(&opts.broker).map_err(UplinkError::Config)?;
    let mut conn = Connection::open_in_memory().map_err(|e| UplinkError::Store(e.to_string()))?;
    if let Some(path) = &opts.db {
        conn = open_db(path)?;
    }
    conn.execute_batch(SCHEMA).map_err(|e| UplinkError::Store(e.to_string()))?;
    let mut options = MqttOptions::new(opts.client_id.clone(), broker.host.clone(), broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(super::outbox::MAX_BODY_BYTES + 4096, super::link::MAX_ACK_BYTES + 1024);
    if broker.tls {
        let cfg = HqConfig {
            ca_file: opts.ca_file.clone(),
            cert_file: opts.cert_file.clone(),
            key_file: opts.key_file.clone(),
            ..HqConfig::default()
        };
        options.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls::client_config(&cfg)?)));
    }
    let (client, mut connection) = Client::new(options, 4 * ACK_BATCH);
    let group = &opts.group;
    let subscriptions = [
        format!("$share/{group}/callbox/v1/+/+/up/#"),
        format!("$share/{group}/callbox/v1/+/+/gap"),
        // State and birth are per box, not work to share: every listener sees them.
        "callbox/v1/+/+/state".to_owned(),
        "callbox/v1/+/+/birth".to_owned(),
    ];
    let mut counts = ListenCounts::default();
    let mut pending: Vec<(String, Vec<u8>)> = Vec::new();
    let mut first_pending: Option<Instant> = None;
    let stdout = std::io::stdout();
    let mut failures = 0u32;
    while !stop() {
        let due = first_pending.is_some_and(|t| t.elapsed() >= ACK_DELAY) || pending.len() >= ACK_BATCH;
        if due {
            flush(&mut conn, &client, &mut pending, &mut counts, opts.json, &mut stdout.lock())?;
            first_pending = None;
        }
        let wait = if first_pending.is_some() { Duration::from_millis(5) } else { Duration::from_millis(100) };
        match connection.recv_timeout(wait) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                failures = 0;
                for topic in &subscriptions {
                    client
                        .try_subscribe(topic.clone(), QoS::AtLeastOnce)
                        .map_err(|e| UplinkError::Broker(e.to_string()))?;
                }
                eprintln!("hq listen: connected to {}:{}, subscribed as group {group:?}", broker.host, broker.port);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                pending.push((p.topic.clone(), p.payload.to_vec()));
                first_pending.get_or_insert_with(Instant::now);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                failures += 1;
                eprintln!("hq listen: {e}; reconnecting");
                std::thread::sleep(Duration::from_millis(200 * u64::from(failures.min(25))));
            }
            Err(rumqttc::RecvTimeoutError::Timeout) => {}
            Err(rumqttc::RecvTimeoutError::Disconnected) => {
                return Err(UplinkError::Broker("the MQTT connection ended".into()));
            }
        }
    }
    flush(&mut conn, &client, &mut pending, &mut counts, opts.json, &mut stdout.lock())?;
    Ok(counts)
}

fn open_db(path: &Path) -> Result<Connection, UplinkError> {
    let conn = Connection::open(path).map_err(|e| UplinkError::Store(format!("{}: {e}", path.display())))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| UplinkError::Store(e.to_string()))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| UplinkError::Store(e.to_string()))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| UplinkError::Store(e.to_string()))?;
    Ok(conn)
}

/// `callbox/v1/{site}/{box}/{tail…}` → (site, box, tail).
fn split_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let rest = topic.strip_prefix("callbox/v1/")?;
    let mut parts = rest.splitn(3, '/');
    let (site, box_id, tail) = (parts.next()?, parts.next()?, parts.next()?);
    (!site.is_empty() && !box_id.is_empty()).then_some((site, box_id, tail))
}

/// HQ's views beside the message log: one aggregate per key (a second message with a key
/// already stored changes nothing: idempotent by key), each customer's latest tags (the
/// highest revision wins), and an erasure removes the customer's tags.
fn project(tx: &Connection, site: &str, box_id: &str, env: &Envelope<serde_json::Value>) -> rusqlite::Result<()> {
    match env.kind.as_str() {
        "interval" => {
            let key = env.data.get("key").map(|k| k.to_string()).unwrap_or_default();
            let start = env.data["key"]["window_start_unix_ms"].as_i64().unwrap_or_default();
            tx.execute(
                "INSERT OR IGNORE INTO aggregate (key, site, box, window_start_unix_ms, id, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![key, site, box_id, start, env.id, env.data.to_string()],
            )?;
        }
        "customer_tags" => {
            let d = &env.data;
            tx.execute(
                "INSERT INTO customer_tags (site, box, customer, revision, tags, calls) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (site, box, customer) DO UPDATE SET revision = excluded.revision,
                     tags = excluded.tags, calls = excluded.calls
                 WHERE excluded.revision > customer_tags.revision",
                params![
                    site,
                    box_id,
                    d["customer"].as_str().unwrap_or_default(),
                    d["revision"].as_i64().unwrap_or_default(),
                    d["tags"].to_string(),
                    d["calls"].as_i64().unwrap_or_default()
                ],
            )?;
        }
        "erasure" => {
            tx.execute(
                "DELETE FROM customer_tags WHERE site = ?1 AND box = ?2 AND customer = ?3",
                params![site, box_id, env.data["customer"].as_str().unwrap_or_default()],
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// Stores what is pending in one transaction, then acks it box by box.
fn flush(
    conn: &mut Connection,
    client: &Client,
    pending: &mut Vec<(String, Vec<u8>)>,
    counts: &mut ListenCounts,
    json: bool,
    out: &mut impl Write,
) -> Result<(), UplinkError> {
    if pending.is_empty() {
        return Ok(());
    }
    let now = crate::store::now_ms();
    let db = |e: rusqlite::Error| UplinkError::Store(e.to_string());
    let tx = conn.transaction().map_err(db)?;
    let mut acks: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (topic, body) in pending.drain(..) {
        let Some((site, box_id, tail)) = split_topic(&topic) else { continue };
        if tail == "state" || tail == "birth" {
            tx.execute(
                "INSERT OR REPLACE INTO box_state (site, box, topic, body, received_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![site, box_id, tail, String::from_utf8_lossy(&body), now],
            )
            .map_err(db)?;
            continue;
        }
        match messages::check(tail, &body).and_then(|env| messages::check_origin(site, box_id, &env).map(|()| env)) {
            Ok(env) => {
                let data = env.data.to_string();
                let added = tx
                    .execute(
                        "INSERT OR IGNORE INTO message (id, site, box, lane, seq, kind, at_unix_ms, received_ms, data)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        params![
                            env.id,
                            site,
                            box_id,
                            env.lane.name(),
                            env.seq as i64,
                            env.kind,
                            env.at_unix_ms,
                            now,
                            data
                        ],
                    )
                    .map_err(db)?;
                if added == 1 {
                    project(&tx, site, box_id, &env).map_err(db)?;
                    counts.stored += 1;
                    if json {
                        let line = serde_json::json!({"site": site, "box": box_id, "id": env.id, "lane": env.lane,
                            "seq": env.seq, "kind": env.kind, "at_unix_ms": env.at_unix_ms, "data": env.data});
                        let _ = writeln!(out, "{line}");
                    }
                } else {
                    counts.duplicates += 1;
                }
                acks.entry((site.to_owned(), box_id.to_owned())).or_default().push(env.id);
            }
            Err(reason) => {
                // Kept apart and acknowledged when it has an id: a message that can never
                // pass would otherwise be resent forever.
                counts.rejected += 1;
                eprintln!("hq listen: rejected a message on {topic}: {reason}");
                tx.execute(
                    "INSERT INTO rejected (topic, reason, received_ms, bytes) VALUES (?1, ?2, ?3, ?4)",
                    params![topic, reason, now, body.len() as i64],
                )
                .map_err(db)?;
                if let Some(id) = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                    .filter(|id| id.len() <= 64 && !id.is_empty())
                {
                    acks.entry((site.to_owned(), box_id.to_owned())).or_default().push(id);
                }
            }
        }
    }
    tx.commit().map_err(db)?;
    let _ = out.flush();
    for ((site, box_id), ids) in acks {
        for chunk in ids.chunks(2048) {
            let body =
                serde_json::to_vec(&Ack { ids: chunk.to_vec() }).map_err(|e| UplinkError::Broker(e.to_string()))?;
            let topic = format!("{}/ack", super::link::prefix(&site, &box_id));
            // Blocking publish: the request queue is drained by recv; a full queue waits.
            client.publish(topic, QoS::AtLeastOnce, false, body).map_err(|e| UplinkError::Broker(e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_split_into_site_box_and_tail() {
        assert_eq!(split_topic("callbox/v1/s1/b2/up/calls/call"), Some(("s1", "b2", "up/calls/call")));
        assert_eq!(split_topic("callbox/v1/s1/b2/gap"), Some(("s1", "b2", "gap")));
        assert_eq!(split_topic("callbox/v2/s1/b2/gap"), None);
        assert_eq!(split_topic("callbox/v1//b2/gap"), None);
    }
}
