//! The headquarters uplink (issue 13): aggregated tags, metrics and alerts to HQ over
//! MQTT, never audio or transcripts. `outbox`, `session`, `messages` and `aggregates`
//! are pure cores (lanes, quotas, ids; what to send, resend and delete; what HQ gets;
//! per-window metrics); the rows live in the call store
//! (`store::outbox`), written in the same transaction as the data they report; `link` is
//! the `hq` component (rumqttc over rustls); `tls` builds the client identity; `hq` is
//! `callbox hq listen`, the HQ end.

pub mod aggregates;
pub mod hq;
pub mod link;
pub mod messages;
pub mod outbox;
pub mod session;
pub mod tls;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("hq: {0}")]
    Config(String),
    #[error("hq TLS: {0}")]
    Tls(String),
    #[error("hq: {0}")]
    Broker(String),
    #[error("hq store: {0}")]
    Store(String),
}
