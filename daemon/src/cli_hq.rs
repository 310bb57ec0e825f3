//! `callbox hq …`: the uplink's state from the running daemon (`status`, `outbox`), and
//! `listen`, the HQ end (a consumer HQ engineers start from; the tests' real consumer).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Subcommand;

use crate::control::client::{ask, unexpected};
use crate::control::protocol::{Request, Response};
use crate::exit::{self, Failure};
use crate::render::show;

#[derive(Debug, Subcommand)]
pub enum HqCommand {
    /// Connected or not, backlog per lane, oldest waiting message, last ack.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The outbox's messages, metadata only (id, lane, sequence, kind, size, age).
    Outbox {
        /// Only this lane: alert, compliance, calls, aggregates or diagnostics.
        #[arg(long)]
        lane: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Act as headquarters: take every box's messages through a shared subscription,
    /// check them against their schema, drop duplicates by id, store them, then ack.
    /// Runs until SIGINT/SIGTERM.
    Listen {
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long, value_name = "ID", default_value = "callbox-hq")]
        client_id: String,
        /// Shared-subscription group: listeners in one group split the messages.
        #[arg(long, default_value = "hq")]
        group: String,
        /// Keep messages in this SQLite file (deduplicated by id).
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// Print each new message as a JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// A broker and the TLS identity to reach it with (`hq listen`, `bench outbox`).
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// mqtts://host:port (or mqtt:// to a loopback broker).
    #[arg(long, value_name = "URL")]
    pub broker: String,
    /// The CA that signs the broker's certificate (PEM; mqtts:// only).
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// The client certificate and its key (PEM; mqtts:// only).
    #[arg(long, value_name = "PEM")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM")]
    pub key: Option<PathBuf>,
}

pub fn hq(socket: &Path, command: &HqCommand) -> Result<u8, Failure> {
    match command {
        HqCommand::Status { json } => {
            let reply = match ask(socket, Request::HqStatus {})? {
                Response::HqStatus(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(&reply, *json, |r| {
                let mut out = format!(
                    "link         {} ({})\nlast ack     {}\nin flight    {} (published {}, acked {}, resent {}, bad acks {})\nshed         {}\n",
                    if r.connected { "online" } else { "OFFLINE" },
                    match (&r.broker, &r.last_error) {
                        (Some(b), Some(e)) if !r.connected => format!("{b}: {e}"),
                        (Some(b), _) => b.clone(),
                        (None, _) => "no broker tried yet".into(),
                    },
                    r.last_ack_unix_ms.map_or("never".into(), age),
                    r.in_flight,
                    r.published,
                    r.acked,
                    r.resent,
                    r.bad_acks,
                    r.shed
                );
                for l in &r.lanes {
                    out += &format!(
                        "lane {:<12} {:>7} waiting {:>10} bytes  next seq {:<8} oldest {}\n",
                        l.lane,
                        l.rows,
                        l.bytes,
                        l.next_seq,
                        l.oldest_created_unix_ms.map_or("-".into(), age)
                    );
                }
                out
            });
            Ok(exit::OK)
        }
        HqCommand::Outbox { lane, limit, json } => {
            let reply = match ask(socket, Request::HqOutbox { lane: lane.clone(), limit: Some(*limit) })? {
                Response::HqOutbox(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(&reply, *json, |r| {
                r.entries
                    .iter()
                    .map(|e| {
                        format!(
                            "{}  {:<12} {:>8}  {:<20} {:>6} B  {}\n",
                            e.id,
                            e.lane,
                            e.seq,
                            e.kind,
                            e.bytes,
                            age(e.created_unix_ms)
                        )
                    })
                    .collect()
            });
            Ok(exit::OK)
        }
        HqCommand::Listen { broker, client_id, group, db, json } => {
            let stop = stop_on_signals()?;
            let opts = crate::uplink::hq::ListenOptions {
                broker: broker.broker.clone(),
                ca_file: broker.ca.clone(),
                cert_file: broker.cert.clone(),
                key_file: broker.key.clone(),
                client_id: client_id.clone(),
                group: group.clone(),
                db: db.clone(),
                json: *json,
            };
            let counts = crate::uplink::hq::listen(&opts, &|| stop.load(Ordering::Relaxed))
                .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
            eprintln!(
                "hq listen: {} messages stored, {} duplicates dropped, {} rejected",
                counts.stored, counts.duplicates, counts.rejected
            );
            Ok(exit::OK)
        }
    }
}

fn age(unix_ms: i64) -> String {
    format!("{} s ago", (crate::store::now_ms() - unix_ms).max(0) / 1000)
}

/// SIGINT and SIGTERM set the flag (blocked here, taken by a waiting thread), so the
/// listener finishes its batch — stored, then acked — before it exits.
fn stop_on_signals() -> Result<Arc<AtomicBool>, Failure> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(|e| Failure::new(exit::OS_ERROR, format!("cannot block signals: {e}")))?;
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if set.wait().is_ok() {
                seen.store(true, Ordering::Relaxed);
            }
        })
        .map_err(|e| Failure::new(exit::OS_ERROR, format!("cannot start the signal thread: {e}")))?;
    Ok(flag)
}
