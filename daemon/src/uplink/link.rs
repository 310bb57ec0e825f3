//! The `hq` component (shell): one MQTT connection to headquarters through rumqttc,
//! driven by the pure [`Session`]. It publishes the outbox's rows (read from the store
//! thread), takes HQ's acks on `{prefix}/ack` and has the store delete what they name.
//!
//! rumqttc keeps unacknowledged publishes only in memory and cannot say which publish an
//! ack belongs to, so nothing here relies on its session: every connection is a clean
//! one, each connection attempt gets a new client and event loop (nothing of the last one
//! is replayed), and what HQ has not acknowledged is simply sent again from the outbox
//! under the same ids.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::session::{Action, Outgoing, Session, SessionStats};
use super::UplinkError;
use crate::config::{BrokerUrl, HqConfig, RunningConfig};
use crate::health::{HealthBoard, HealthState, ShutdownSignal};
use crate::store::live::CallVault;
use crate::store::LaneBacklog;

const COMPONENT: &str = "hq";
/// The largest ack payload taken (an ack names at most a few thousand ids).
pub const MAX_ACK_BYTES: usize = 256 * 1024;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MOST: Duration = Duration::from_secs(60);
/// How long the box waits to read its own state back after connecting.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// HQ → box: the ids HQ has stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub ids: Vec<String>,
}

/// The retained `state` message (the Last Will sets it offline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxState {
    pub online: bool,
    pub boot_id: String,
    pub at_unix_ms: i64,
}

/// The `birth` message, once per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Birth {
    pub daemon_version: String,
    pub boot_id: String,
    pub site: String,
    #[serde(rename = "box")]
    pub box_id: String,
    pub config_generation: u64,
    /// Digests of the model manifest and of the rule file in use (as in the aggregates).
    pub models_version: String,
    pub rules_version: String,
    pub max_concurrent_calls: usize,
    /// The limit admission holds to now (`calls.max_concurrent` or the rated capacity)
    /// and where it comes from.
    pub call_limit: usize,
    pub call_limit_source: String,
    /// What `callbox bench capacity --save` measured on this box, if it was run.
    pub rated_capacity: Option<crate::calls::capacity::RatingSummary>,
    pub at_unix_ms: i64,
}

/// The models' version (a digest of the manifest), "-" when it cannot be read (the speech
/// path then reports why).
pub fn models_version(config: &crate::config::Config) -> String {
    crate::speech::manifest::ModelSet::open(&config.speech.models_dir()).map_or_else(|_| "-".into(), |m| m.version)
}

/// The rules' version (a digest of the rule file, or of the shipped rules).
fn rules_version(config: &crate::config::Config) -> String {
    crate::understanding::rules::load_rules(config.understanding.rules_file.as_deref())
        .map_or_else(|_| "-".into(), |r| r.version().to_owned())
}

/// What `status` and `hq status` show of the uplink.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UplinkStatus {
    pub broker: Option<String>,
    pub session: SessionStats,
    pub last_error: Option<String>,
    pub last_ack_unix_ms: Option<i64>,
    pub backlog: Vec<LaneBacklog>,
    pub shed: u64,
}

/// The shared view of the uplink (the control socket reads it).
#[derive(Clone, Default)]
pub struct UplinkHandle(Arc<Mutex<UplinkStatus>>);

impl UplinkHandle {
    pub fn status(&self) -> UplinkStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}

/// The topic prefix of a box: `callbox/v1/{site}/{box}`.
pub fn prefix(site: &str, box_id: &str) -> String {
    format!("callbox/v1/{site}/{box_id}")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// One connection's client: a fresh rumqttc client and event loop every time.
fn connect(
    cfg: &HqConfig,
    broker: &BrokerUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    will: Vec<u8>,
    window: usize,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(cfg.client_id(), broker.host.clone(), broker.port);
    options.set_keep_alive(Duration::from_secs(cfg.keepalive_secs));
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_ACK_BYTES + 1024, super::outbox::MAX_BODY_BYTES + 1024);
    options.set_inflight(u16::try_from(window.min(u16::MAX as usize)).unwrap_or(u16::MAX));
    options.set_last_will(LastWill::new(
        format!("{}/state", prefix(&cfg.site, &cfg.box_id)),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    // Room for the whole window plus the state, birth and subscription requests.
    AsyncClient::new(options, window + 16)
}

/// The TLS identity from `[hq]`, when any broker is `mqtts://`: read at start-up, so a
/// missing or unsafe key file stops the start with its path (exit 78) rather than a
/// running daemon that can never connect.
pub fn tls_for(cfg: &HqConfig) -> Result<Option<Arc<rustls::ClientConfig>>, UplinkError> {
    let tls = cfg.brokers.iter().any(|u| u.starts_with("mqtts://"));
    if tls {
        super::tls::client_config(cfg).map(Some)
    } else {
        Ok(None)
    }
}

/// The component: connects, publishes the outbox, deletes what HQ acknowledged, and
/// reconnects with jittered backoff; stops at its shutdown stage (what is unacknowledged
/// stays in the outbox for the next start).
pub async fn run(
    vault: CallVault,
    tls: Option<Arc<rustls::ClientConfig>>,
    config: watch::Receiver<Arc<RunningConfig>>,
    handle: UplinkHandle,
    calls: crate::calls::registry::CallRegistry,
    health: HealthBoard,
    mut shutdown: ShutdownSignal,
) -> Result<(), UplinkError> {
    let running = config.borrow().clone();
    let cfg = running.config.hq.clone();
    let brokers: Vec<BrokerUrl> =
        cfg.brokers.iter().map(|u| BrokerUrl::parse(u).map_err(UplinkError::Config)).collect::<Result<_, _>>()?;
    let prefix = prefix(&cfg.site, &cfg.box_id);
    let ack_topic = format!("{prefix}/ack");
    let state_topic = format!("{prefix}/state");
    let birth_topic = format!("{prefix}/birth");
    let boot = boot_id();
    let window = cfg.max_in_flight;
    let mut backoff = BACKOFF_FIRST;
    let mut attempt = 0usize;
    health.set(COMPONENT, HealthState::Starting, "connecting to headquarters");
    loop {
        if shutdown.is_triggered() {
            break;
        }
        let broker = &brokers[attempt % brokers.len()];
        attempt += 1;
        let address = format!("{}:{}", broker.host, broker.port);
        handle.update(|s| s.broker = Some(address.clone()));
        let will =
            serde_json::to_vec(&BoxState { online: false, boot_id: boot.clone(), at_unix_ms: 0 }).unwrap_or_default();
        let (client, mut events) = connect(&cfg, broker, tls.as_ref(), will, window);
        let mut session = Session::new(window, Duration::from_secs(cfg.ack_timeout_secs), stall_after(&cfg));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_every = 0u32;
        // The state this connection published, until it comes back.
        let mut echo: Option<(Instant, BoxState)> = None;
        let outcome: Result<(), String> = loop {
            let actions = tokio::select! {
                _ = shutdown.wait() => {
                    // A clean goodbye: the retained state says offline (the will is only
                    // for an unclean end).
                    let state = BoxState { online: false, boot_id: boot.clone(), at_unix_ms: crate::store::now_ms() };
                    if let Ok(body) = serde_json::to_vec(&state) {
                        let _ = client.try_publish(format!("{prefix}/state"), QoS::AtLeastOnce, true, body);
                    }
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while events.poll().await.is_ok() {}
                    })
                    .await;
                    break Ok(());
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = BACKOFF_FIRST;
                        // The box reads its own state back before it sends anything: a
                        // broker whose ACL silently drops this box's messages (MQTT 3.1.1
                        // acks a refused publish all the same) is found here, not by an
                        // outbox that never drains.
                        let _ = client.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                        let _ = client.try_subscribe(state_topic.clone(), QoS::AtLeastOnce);
                        let state = BoxState { online: true, boot_id: boot.clone(), at_unix_ms: crate::store::now_ms() };
                        let limit = calls.limit();
                        let birth = Birth {
                            daemon_version: env!("CARGO_PKG_VERSION").into(),
                            boot_id: boot.clone(),
                            site: cfg.site.clone(),
                            box_id: cfg.box_id.clone(),
                            config_generation: config.borrow().generation,
                            models_version: models_version(&config.borrow().config),
                            rules_version: rules_version(&config.borrow().config),
                            max_concurrent_calls: config.borrow().config.calls.max_concurrent,
                            call_limit: limit.max_calls,
                            call_limit_source: limit.source,
                            rated_capacity: limit.rating,
                            at_unix_ms: crate::store::now_ms(),
                        };
                        for (topic, body, retain) in [
                            (&state_topic, serde_json::to_vec(&state), true),
                            (&birth_topic, serde_json::to_vec(&birth), false),
                        ] {
                            if let Ok(body) = body {
                                let _ = client.try_publish(topic.clone(), QoS::AtLeastOnce, retain, body);
                            }
                        }
                        echo = Some((Instant::now(), state));
                        Vec::new()
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == state_topic => {
                        let back = serde_json::from_slice::<BoxState>(&p.payload).ok();
                        match (&echo, back) {
                            (Some((_, sent)), Some(back)) if *sent == back => {
                                echo = None;
                                log::info!(component = COMPONENT; "connected to headquarters at {address}");
                                handle.update(|s| s.last_error = None);
                                session.connected(Instant::now())
                            }
                            _ => Vec::new(),
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                        match parse_ack(&p.payload) {
                            Some(ack) => {
                                handle.update(|s| s.last_ack_unix_ms = Some(crate::store::now_ms()));
                                session.acks(ack.ids, Instant::now())
                            }
                            None => {
                                session.bad_ack();
                                log::warn!(component = COMPONENT; "an ack that is not {{\"ids\": [...]}} ({} bytes) was ignored", p.payload.len());
                                Vec::new()
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack)))
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
                    {
                        // Without its ack topic the box can never hear HQ: nothing would
                        // ever leave the outbox. Say why, then try again later.
                        break Err(format!(
                            "the broker refused the subscription to {ack_topic}: its ACL does not let this box's \
                             certificate use the prefix {prefix}/ (hq.site and hq.box_id must match the certificate)"
                        ));
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        session.puback(Instant::now());
                        Vec::new()
                    }
                    Ok(_) => Vec::new(),
                    Err(e) => break Err(describe(&e)),
                },
                _ = vault.outbox_changed() => session.wake(),
                _ = tick.tick() => {
                    if let Some((since, _)) = &echo {
                        if since.elapsed() >= ECHO_TIMEOUT {
                            break Err(format!(
                                "the broker took the connection but did not deliver this box's own state back within {} s: \
                                 its ACL does not let this box's certificate use the prefix {prefix}/ \
                                 (hq.site and hq.box_id must match the certificate)",
                                ECHO_TIMEOUT.as_secs()
                            ));
                        }
                    }
                    status_every += 1;
                    if status_every % 5 == 1 {
                        refresh(&vault, &handle, &session, &health).await;
                    }
                    session.tick(Instant::now())
                }
            };
            let done = perform(actions, &mut session, &client, &vault, &prefix).await;
            handle.update(|s| s.session = session.stats());
            if let Err(reason) = done {
                break Err(reason);
            }
        };
        session.disconnected();
        handle.update(|s| s.session = session.stats());
        match outcome {
            Ok(()) => break,
            // The store closing under us at shutdown is not a link problem.
            Err(_) if shutdown.is_triggered() => break,
            Err(reason) => {
                log::warn!(component = COMPONENT; "headquarters link to {address}: {reason}; retrying in {:.1} s", backoff.as_secs_f64());
                handle.update(|s| s.last_error = Some(reason.clone()));
                refresh(&vault, &handle, &session, &health).await;
                let delay = jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MOST);
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    health.set(COMPONENT, HealthState::Stopped, "stopped; what HQ has not acknowledged stays in the outbox");
    Ok(())
}

fn stall_after(cfg: &HqConfig) -> Duration {
    // Three keepalives without any sign of life while messages wait: the event loop or
    // the path is stuck (a proxy that stopped forwarding answers nothing).
    Duration::from_secs((cfg.keepalive_secs * 3).max(cfg.ack_timeout_secs * 2))
}

/// Carries out the session's actions; an error ends the connection.
async fn perform(
    mut actions: Vec<Action>,
    session: &mut Session,
    client: &AsyncClient,
    vault: &CallVault,
    prefix: &str,
) -> Result<(), String> {
    while !actions.is_empty() {
        let mut next = Vec::new();
        for action in actions {
            match action {
                Action::Publish(row) => {
                    let topic = format!("{prefix}/{}", row.topic);
                    if client.try_publish(topic, QoS::AtLeastOnce, false, row.body).is_err() {
                        session.not_sent(&row.id);
                    }
                }
                Action::Fetch { after, limit } => {
                    let rows = vault.run(move |s| s.outbox_page(after, limit)).await.map_err(|e| e.to_string())?;
                    let rows = rows
                        .into_iter()
                        .map(|r| Outgoing { id: r.id, lane: r.lane, seq: r.seq, topic: r.topic, body: r.body })
                        .collect();
                    next.extend(session.rows(rows, limit, Instant::now()));
                }
                Action::Delete(ids) => {
                    let asked = ids.clone();
                    match vault.run(move |s| s.outbox_delete(&ids)).await {
                        Ok(_) => session.deleted(&asked),
                        Err(e) => {
                            log::warn!(component = COMPONENT; "acknowledged messages not removed yet ({e}): they are sent again and removed at the next ack");
                            session.delete_failed(&asked);
                        }
                    }
                }
                Action::Rebuild(reason) => return Err(reason),
            }
        }
        actions = next;
    }
    Ok(())
}

async fn refresh(vault: &CallVault, handle: &UplinkHandle, session: &Session, health: &HealthBoard) {
    let backlog = vault.run(|s| s.outbox_backlog()).await;
    let stats = session.stats();
    let (rows, oldest) = match &backlog {
        Ok((lanes, _)) => {
            (lanes.iter().map(|l| l.rows).sum::<u64>(), lanes.iter().filter_map(|l| l.oldest_created_ms).min())
        }
        Err(_) => (0, None),
    };
    let age = oldest.map_or(String::new(), |ms| format!(", oldest {} s", (crate::store::now_ms() - ms).max(0) / 1000));
    let status = handle.status();
    let (state, detail) = if stats.connected {
        (HealthState::Ok, format!("online ({}); {rows} messages waiting{age}", status.broker.unwrap_or_default()))
    } else {
        (
            HealthState::Degraded,
            format!(
                "OFFLINE ({}); {rows} messages kept in the outbox{age}",
                status.last_error.unwrap_or_else(|| "connecting".into())
            ),
        )
    };
    health.set(COMPONENT, state, detail);
    handle.update(|s| {
        s.session = stats;
        if let Ok((lanes, shed)) = backlog {
            s.backlog = lanes;
            s.shed = shed;
        }
    });
}

/// An ack payload: `{"ids": [...]}`, bounded, ids of at most 64 bytes.
pub fn parse_ack(payload: &[u8]) -> Option<Ack> {
    if payload.len() > MAX_ACK_BYTES {
        return None;
    }
    let ack: Ack = serde_json::from_slice(payload).ok()?;
    ack.ids.iter().all(|id| !id.is_empty() && id.len() <= 64).then_some(ack)
}

/// Says what went wrong in words an operator can act on (TLS and refusals first). A
/// handshake the broker ends with an alert (an expired or unknown client certificate)
/// reaches rumqttc as an I/O error inside its state machine, so the text is looked at too.
fn describe(e: &rumqttc::ConnectionError) -> String {
    let text = e.to_string();
    let lower = text.to_lowercase();
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?}): check the box's certificate and the broker's ACL")
        }
        rumqttc::ConnectionError::Tls(e) => format!("TLS: {e} (check hq.ca_file, hq.cert_file, hq.key_file)"),
        _ if lower.contains("certificate") || lower.contains("alert") || lower.contains("handshake") => {
            format!("TLS: {text} (check hq.ca_file, hq.cert_file, hq.key_file and the certificates' dates)")
        }
        _ => text,
    }
}

/// 50–100 % of the delay, so boxes cut off together do not all come back at once.
fn jitter(delay: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0;
    delay.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_bounded_and_strict() {
        assert_eq!(parse_ack(br#"{"ids":["a","b"]}"#).map(|a| a.ids.len()), Some(2));
        assert!(parse_ack(br#"{"ids":["a"],"x":1}"#).is_none());
        assert!(parse_ack(br#"{"ids":[""]}"#).is_none());
        assert!(parse_ack(format!(r#"{{"ids":["{}"]}}"#, "a".repeat(65)).as_bytes()).is_none());
        assert!(parse_ack(&vec![b' '; MAX_ACK_BYTES + 1]).is_none());
        assert!(parse_ack(b"not json").is_none());
    }

    #[test]
    fn jitter_stays_within_half_to_all_of_the_delay() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(5) && d <= Duration::from_secs(10), "{d:?}");
        }
    }
}
