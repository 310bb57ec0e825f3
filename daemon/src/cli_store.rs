//! The call-store commands of the CLI (`calls`, `customer forget`, `audit`, `keys`,
//! `store`): each is one request over the control socket; the daemon decides who may do
//! what (technicians: metadata and masked summaries; admins: decrypted text, export,
//! erasure, key rotation, the audit trail) and audits every decrypting access.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::control::client::{ask, unexpected};
use crate::control::protocol::{self as wire, Request, Response};
use crate::exit::{self, Failure};
use crate::render::show;

#[derive(Debug, Subcommand)]
pub enum CallsCommand {
    /// Stored calls, newest first: metadata, intents, events (no text; technicians may).
    List {
        /// Only calls that started since: "24h", "7d", "30m", or a Unix time in ms.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only this customer's calls (a caller number; the daemon hashes it).
        #[arg(long, value_name = "NUMBER")]
        customer: Option<String>,
        /// Only calls that raised this event (transfer_to_human, supervisor_alert, …).
        #[arg(long, value_name = "KIND")]
        event: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One stored call: metadata and masked summary; with --transcript the decrypted
    /// (masked) text, and the unmasked text where kept (admins; audited).
    Show {
        #[arg(value_name = "CALL")]
        call: String,
        #[arg(long)]
        transcript: bool,
        #[arg(long)]
        json: bool,
    },
    /// Writes one call, decrypted, as JSON to FILE (created 0600, never overwritten;
    /// admins; audited before the data leaves the daemon).
    Export {
        #[arg(value_name = "CALL")]
        call: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Writes one leg's stored audio (`store.keep_audio`) to FILE as a µ-law WAV (created
    /// 0600, never overwritten; admins; every page audited).
    Audio {
        #[arg(value_name = "CALL")]
        call: String,
        #[arg(long, value_parser = ["customer", "agent"], default_value = "customer")]
        leg: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Consent withdrawn (PIPL Art. 47): shred every call of NUMBER, delete the customer's
    /// rows and tags, keep a tombstone (hash only). Admins; idempotent.
    Forget {
        #[arg(value_name = "NUMBER")]
        number: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit trail's hash chain; exit 1 and the first broken entry if it fails.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Audit entries (admins): who read, exported, erased or was refused what, and when.
    Show {
        /// "24h", "7d", "30m", or a Unix time in ms.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every call key under a new master key (admins). Payloads are not
    /// re-encrypted; a stop at any step is finished by the next start. Back up the new
    /// key file afterwards.
    Rotate {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Counts, sizes, key id, writes and the last retention sweep.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

/// "24h" / "7d" / "30m" before now, or a Unix time in milliseconds.
pub fn parse_since(text: &str, now_unix_ms: i64) -> Result<i64, Failure> {
    let bad = || {
        Failure::new(exit::USAGE, format!("--since {text:?}: give a span such as 30m, 24h or 7d, or a Unix time in ms"))
    };
    let unit = match text.chars().last() {
        Some('m') => 60_000,
        Some('h') => 3_600_000,
        Some('d') => 86_400_000,
        _ => return text.parse::<i64>().map_err(|_| bad()),
    };
    let n: i64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    if !(0..=100_000).contains(&n) {
        return Err(bad());
    }
    Ok(now_unix_ms - n * unit)
}

fn stamp(ms: i64) -> String {
    crate::logging::utc_timestamp(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
}

pub fn calls(socket: &Path, command: &CallsCommand) -> Result<u8, Failure> {
    match command {
        CallsCommand::List { since, customer, event, limit, json } => {
            let since_unix_ms = since.as_deref().map(|s| parse_since(s, crate::store::now_ms())).transpose()?;
            let request = Request::CallsList {
                since_unix_ms,
                caller: customer.clone(),
                event: event.clone(),
                limit: Some(*limit),
            };
            let reply = match ask(socket, request)? {
                Response::Calls(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(&reply, *json, |r| {
                if r.calls.is_empty() {
                    return "no stored calls\n".into();
                }
                r.calls.iter().map(call_line).collect()
            });
            Ok(exit::OK)
        }
        CallsCommand::Show { call, transcript, json } => {
            let reply = match ask(socket, Request::CallsShow { call: call.clone(), transcript: *transcript })? {
                Response::StoredCall(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(reply.as_ref(), *json, render_call);
            Ok(exit::OK)
        }
        CallsCommand::Export { call, out } => {
            // The file is claimed before asking, so a refused path costs no audited read.
            let mut file = claim(out)?;
            let written = (|| {
                let reply = match ask(socket, Request::CallsExport { call: call.clone() })? {
                    Response::StoredCall(reply) => reply,
                    other => return Err(unexpected(&other)),
                };
                let text = serde_json::to_vec_pretty(&reply)
                    .map_err(|e| Failure::new(exit::FAILURE, format!("cannot encode the export: {e}")))?;
                file.write_all(&text)
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .map_err(|e| Failure::new(exit::FAILURE, format!("cannot write {}: {e}", out.display())))?;
                Ok(reply.utterances.len())
            })();
            match written {
                Ok(n) => {
                    println!("call {call}: {n} utterances written to {} (mode 0600)", out.display());
                    Ok(exit::OK)
                }
                Err(e) => {
                    // Nothing half-written stays behind.
                    let _ = std::fs::remove_file(out);
                    Err(e)
                }
            }
        }
        CallsCommand::Audio { call, leg, out } => {
            let mut file = claim(out)?;
            let written = (|| {
                let (mut rate, mut mulaw, mut from_chunk) = (0, Vec::new(), 0);
                let mut complete;
                loop {
                    let request = Request::CallsAudio { call: call.clone(), leg: leg.clone(), from_chunk };
                    let page = match ask(socket, request)? {
                        Response::CallAudio(page) => page,
                        other => return Err(unexpected(&other)),
                    };
                    mulaw.extend(crate::hex::decode(&page.mulaw_hex).ok_or_else(|| {
                        Failure::new(exit::FAILURE, "the daemon sent audio that is not hex".to_owned())
                    })?);
                    (rate, complete) = (page.rate.max(rate), page.complete);
                    match page.next_chunk {
                        Some(next) if next > from_chunk => from_chunk = next,
                        _ => break,
                    }
                }
                file.write_all(&crate::store::audio::mulaw_wav(rate.max(1), &mulaw))
                    .and_then(|()| file.sync_all())
                    .map_err(|e| Failure::new(exit::FAILURE, format!("cannot write {}: {e}", out.display())))?;
                Ok((mulaw.len() as f64 / f64::from(rate.max(1)), complete))
            })();
            match written {
                Ok((secs, complete)) => {
                    let cut =
                        if complete { "" } else { " (cut short: the daemon stopped or the disk filled mid-call)" };
                    println!(
                        "call {call}, {leg} leg: {secs:.1} s of audio written to {} (mode 0600){cut}",
                        out.display()
                    );
                    Ok(exit::OK)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(out);
                    Err(e)
                }
            }
        }
    }
}

/// Creates an export file: 0600, never over an existing one (nor through a link).
fn claim(out: &Path) -> Result<std::fs::File, Failure> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot create {}: {e}", out.display())))
}

fn call_line(c: &wire::StoredCallItem) -> String {
    let events: Vec<&str> = c.rule_hits.iter().filter_map(|h| h.event.as_deref()).collect();
    format!(
        "{}  {}  {:<11} {:>3} utt  {:<18} {}{}\n",
        stamp(c.started_unix_ms),
        c.call,
        c.status,
        c.utterances,
        c.phase.as_deref().unwrap_or("-"),
        if c.tags.is_empty() { "-".into() } else { c.tags.join(",") },
        if events.is_empty() { String::new() } else { format!("  events: {}", events.join(",")) }
    )
}

fn render_call(r: &wire::StoredCallReply) -> String {
    let c = &r.call;
    let mut out = format!(
        "call {} ({}, {})\n",
        c.call,
        c.status,
        if c.line.is_empty() { c.source.clone() } else { format!("{} line {}", c.source, c.line) }
    );
    out += &format!("  started  {}\n", stamp(c.started_unix_ms));
    if let Some(end) = c.ended_unix_ms {
        out += &format!("  ended    {} ({} s)\n", stamp(end), (end - c.started_unix_ms) / 1000);
    }
    for (key, value) in
        [("agent", &c.agent), ("campaign", &c.campaign), ("script", &c.script), ("customer", &c.customer)]
    {
        if let Some(v) = value {
            out += &format!("  {key:<8} {v}\n");
        }
    }
    out += &format!("  phase    {}; converted: {}\n", c.phase.as_deref().unwrap_or("-"), c.converted);
    if !c.tags.is_empty() {
        out += &format!("  tags     {}\n", c.tags.join(", "));
    }
    if !c.intents.is_empty() {
        let intents: Vec<String> = c.intents.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        out += &format!("  intents  {}\n", intents.join(", "));
    }
    for h in &c.rule_hits {
        out += &format!(
            "  rule     {} [{}] at {:.1} s{}: {}\n",
            h.rule,
            h.severity,
            h.at_secs,
            h.event.as_deref().map(|e| format!(" → {e}")).unwrap_or_default(),
            h.reason
        );
    }
    if !c.shredded.is_empty() {
        out += &format!("  shredded {}\n", c.shredded.join(", "));
    }
    for (leg, secs) in &c.audio_secs {
        out += &format!("  audio    {leg}: {secs:.1} s (sealed; admins: callbox calls audio {} --leg {leg})\n", c.call);
    }
    for u in &r.utterances {
        out += &format!(
            "  [{:>6.1}-{:>6.1}] {:<8} {}{}\n",
            u.start_secs,
            u.end_secs,
            u.leg,
            u.text,
            if u.intents.is_empty() { String::new() } else { format!("  ({})", u.intents.join("+")) }
        );
        if let Some(clear) = &u.unmasked {
            out += &format!("                    unmasked: {clear}\n");
        }
    }
    out
}

pub fn customer_forget(socket: &Path, number: &str, json: bool) -> Result<u8, Failure> {
    let reply = match ask(socket, Request::CustomerForget { caller: number.to_owned() })? {
        Response::Forgotten(reply) => reply,
        other => return Err(unexpected(&other)),
    };
    show(&reply, json, |r| {
        if r.first_time || r.calls > 0 || r.customer_rows > 0 {
            format!(
                "customer {} erased: {} calls shredded, {} customer rows deleted; tombstone kept\n",
                r.customer, r.calls, r.customer_rows
            )
        } else {
            format!("customer {} was already erased: nothing left to do\n", r.customer)
        }
    });
    Ok(exit::OK)
}

pub fn audit(socket: &Path, command: &AuditCommand) -> Result<u8, Failure> {
    match command {
        AuditCommand::Verify { json } => {
            let reply = match ask(socket, Request::AuditVerify {})? {
                Response::AuditVerified(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(&reply, *json, |r| match (&r.broken_seq, &r.why) {
                (Some(seq), Some(why)) => {
                    format!("audit trail BROKEN at entry {seq}: {why} ({} entries before it hold)\n", r.entries)
                }
                _ => format!("audit trail ok: {} entries, every link holds\n", r.entries),
            });
            Ok(if reply.ok { exit::OK } else { exit::FAILURE })
        }
        AuditCommand::Show { since, json } => {
            let since_unix_ms = since.as_deref().map(|s| parse_since(s, crate::store::now_ms())).transpose()?;
            let reply = match ask(socket, Request::AuditShow { since_unix_ms })? {
                Response::Audit(reply) => reply,
                other => return Err(unexpected(&other)),
            };
            show(&reply, *json, |r| {
                let mut out = String::new();
                if r.omitted > 0 {
                    out += &format!("({} older entries not shown; use --since)\n", r.omitted);
                }
                for e in &r.entries {
                    out += &format!(
                        "{:>6}  {}  uid {:<6} {:<10} {:<22} {:<34} {}\n",
                        e.seq,
                        stamp(e.at_unix_ms),
                        e.uid,
                        e.role,
                        e.action,
                        e.object,
                        e.outcome
                    );
                }
                out
            });
            Ok(exit::OK)
        }
    }
}

pub fn keys(socket: &Path, command: &KeysCommand) -> Result<u8, Failure> {
    let KeysCommand::Rotate { json } = command;
    let reply = match ask(socket, Request::KeysRotate {})? {
        Response::KeysRotated(reply) => reply,
        other => return Err(unexpected(&other)),
    };
    show(&reply, *json, |r| {
        format!(
            "master key rotated: {} call keys re-wrapped under key {}; back up the new key file now (README \"Call store\")\n",
            r.keys, r.master_key
        )
    });
    Ok(exit::OK)
}

pub fn store(socket: &Path, command: &StoreCommand) -> Result<u8, Failure> {
    let StoreCommand::Stats { json } = command;
    let reply = match ask(socket, Request::StoreStats {})? {
        Response::StoreStats(reply) => reply,
        other => return Err(unexpected(&other)),
    };
    show(&reply, *json, |r| {
        format!(
            "calls        {} ({} open, {} finished, {} interrupted, {} forgotten)\n\
             utterances   {}\n\
             oldest call  {}\n\
             call keys    {} (master key {})\n\
             tombstones   {}\n\
             audit        {} entries\n\
             on disk      {:.1} MiB\n\
             writes       {} ({} refused, {} waiting for the disk; {} audio chunks not kept{})\n\
             last sweep   {}\n",
            r.calls,
            r.open,
            r.finished,
            r.interrupted,
            r.forgotten,
            r.utterances,
            r.oldest_call_unix_ms.map_or("-".into(), stamp),
            r.class_keys,
            r.master_key,
            r.tombstones,
            r.audit_entries,
            r.bytes as f64 / (1024.0 * 1024.0),
            r.writes,
            r.writes_refused,
            r.writes_waiting,
            r.audio_dropped,
            if r.audio_paused { "; AUDIO NOT KEPT NOW: free space below storage.stop_audio_below_mb" } else { "" },
            match (&r.last_sweep_unix_ms, &r.last_sweep) {
                (Some(at), Some(what)) => format!("{}: {what}", stamp(*at)),
                _ => "not yet".into(),
            }
        )
    });
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_spans_and_unix_times_and_refuses_the_rest() {
        let now = 1_000_000_000;
        assert_eq!(parse_since("30m", now).unwrap(), now - 30 * 60_000);
        assert_eq!(parse_since("24h", now).unwrap(), now - 24 * 3_600_000);
        assert_eq!(parse_since("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(parse_since("12345", now).unwrap(), 12345);
        for bad in ["", "d", "-1d", "1w", "soon", "99999999d"] {
            assert_eq!(parse_since(bad, now).unwrap_err().code, exit::USAGE, "{bad:?}");
        }
    }
}
