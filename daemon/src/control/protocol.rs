//! Wire format of the control socket, version 1.
//!
//! Request:  `{"v":1,"request":{"op":"status"}}` + `\n`
//! Response: `{"v":1,"response":{"kind":"status",...}}` + `\n`
//!
//! The set of requests and responses is closed (unknown ops and fields are
//! refused). A new field or op that old peers cannot ignore bumps `v`.
//!
//! `{"op":"watch"}` turns the connection into a stream: one `watching` response, then one
//! `{"v":1,"monitor":{"type":"utterance"|"event"|"call_finished",...}}` line per item of
//! the understanding bus, until either side closes.
//!
//! This module is the only place that knows the wire format. Every type here is the
//! protocol's own (Serialize and Deserialize, round-trip tested); the daemon's internal
//! types are converted to them in `control::convert`, so renaming a field in a core
//! cannot silently change protocol v1. It imports nothing else of the crate.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// The CLI refuses responses longer than this (status reports are a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    pub v: u32,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty struct variants, not unit ones: serde lets an internally tagged
    // unit variant ignore extra fields, which would make the set less closed.
    /// Liveness check; any permitted caller.
    Ping {},
    /// Version, uptime, configuration and component health.
    Status {},
    /// Re-read and validate the config file; keep the old one if invalid. Admins only.
    Reload {},
    /// Start a call on an ALSA capture line (the PBX or a technician says a call began).
    CallStart { line: String },
    /// End the call on an ALSA capture line.
    CallStop { line: String },
    /// From the PBX/CRM sidecar or a technician: whose call this is (`caller`, kept only as
    /// a keyed hash), its `campaign` (kept with the call; its hotwords apply from the next
    /// utterance) and whether it ended in a sale (`converted`). Without any, reports the
    /// call's customer.
    CallInfo {
        call: String,
        #[serde(default)]
        caller: Option<String>,
        #[serde(default)]
        campaign: Option<String>,
        #[serde(default)]
        converted: Option<bool>,
    },
    /// A customer's tags across calls, looked up by caller number.
    Customer { caller: String },
    /// Follow understood utterances, events and finished calls as they happen.
    Watch {},
    /// Stored calls, newest first, metadata only (no decryption).
    CallsList {
        #[serde(default)]
        since_unix_ms: Option<i64>,
        /// A caller number: the daemon hashes it and lists that customer's calls.
        #[serde(default)]
        caller: Option<String>,
        /// Only calls that raised this event (`transfer_to_human`, …).
        #[serde(default)]
        event: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// One stored call: metadata and the masked summary; with `transcript`, the decrypted
    /// text too (admins; audited before anything is decrypted).
    CallsShow {
        call: String,
        #[serde(default)]
        transcript: bool,
    },
    /// One call, decrypted, for an export file the CLI writes 0600 (admins; audited).
    CallsExport { call: String },
    /// One leg's stored audio from chunk `from_chunk` on, decrypted (admins; every page
    /// audited). A reply carries at most `MAX_AUDIO_PAGE_BYTES`; `next_chunk` asks on.
    CallsAudio {
        call: String,
        /// `customer` or `agent`.
        leg: String,
        #[serde(default)]
        from_chunk: u32,
    },
    /// Consent withdrawn: shred every call of this caller, delete their customer rows and
    /// tags, keep a tombstone (the hash only). Admins; idempotent.
    CustomerForget { caller: String },
    /// Audit trail entries (admins).
    AuditShow {
        #[serde(default)]
        since_unix_ms: Option<i64>,
    },
    /// Checks the audit trail's hash chain.
    AuditVerify {},
    /// Re-wraps every call key under a new master key (admins).
    KeysRotate {},
    /// Counts and sizes of the call store.
    StoreStats {},
    /// The headquarters uplink: connection, backlog per lane, acks.
    HqStatus {},
    /// Outbox rows' metadata (never their bodies), lanes in priority order.
    HqOutbox {
        #[serde(default)]
        lane: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
}

/// Longest line name a request may carry (config allows 32 characters).
pub const MAX_LINE_NAME: usize = 32;

/// Who may do what. Ordered: an admin may do everything a technician may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Technician,
    Admin,
}

impl Request {
    /// The request's name, for logs: never its arguments, which may be personal data
    /// (a caller number).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ping {} => "ping",
            Self::Status {} => "status",
            Self::Reload {} => "reload",
            Self::CallStart { .. } => "call_start",
            Self::CallStop { .. } => "call_stop",
            Self::CallInfo { .. } => "call_info",
            Self::Customer { .. } => "customer",
            Self::Watch {} => "watch",
            Self::CallsList { .. } => "calls_list",
            Self::CallsShow { transcript: false, .. } => "calls_show",
            Self::CallsShow { transcript: true, .. } => "calls_show_transcript",
            Self::CallsExport { .. } => "calls_export",
            Self::CallsAudio { .. } => "calls_audio",
            Self::CustomerForget { .. } => "customer_forget",
            Self::AuditShow { .. } => "audit_show",
            Self::AuditVerify {} => "audit_verify",
            Self::KeysRotate {} => "keys_rotate",
            Self::StoreStats {} => "store_stats",
            Self::HqStatus {} => "hq_status",
            Self::HqOutbox { .. } => "hq_outbox",
        }
    }

    pub fn required_role(&self) -> Role {
        match self {
            Self::Ping {}
            | Self::Status {}
            | Self::CallStart { .. }
            | Self::CallStop { .. }
            | Self::CallInfo { .. }
            | Self::Customer { .. }
            | Self::Watch {}
            | Self::CallsList { .. }
            | Self::CallsShow { transcript: false, .. }
            | Self::AuditVerify {}
            | Self::StoreStats {}
            | Self::HqStatus {}
            | Self::HqOutbox { .. } => Role::Technician,
            Self::Reload {}
            | Self::CallsShow { transcript: true, .. }
            | Self::CallsExport { .. }
            | Self::CallsAudio { .. }
            | Self::CustomerForget { .. }
            | Self::AuditShow { .. }
            | Self::KeysRotate {} => Role::Admin,
        }
    }

    pub fn frame(self) -> RequestFrame {
        RequestFrame { v: PROTOCOL_VERSION, request: self }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFrame {
    pub v: u32,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong,
    Status(Box<StatusReport>),
    Reload(ReloadReport),
    /// A call started or stopped on a capture line.
    Call(CallReply),
    /// A call's customer (after `call_info`), or a customer looked up by number; None when
    /// unknown.
    Customer(CustomerReply),
    /// The stream of `monitor` lines follows.
    Watching,
    /// Stored calls (`calls_list`).
    Calls(CallsReply),
    /// One stored call (`calls_show`, `calls_export`).
    StoredCall(Box<StoredCallReply>),
    /// A page of one leg's audio (`calls_audio`).
    CallAudio(CallAudioReply),
    Forgotten(ForgottenReply),
    Audit(AuditReply),
    AuditVerified(AuditVerifyReply),
    KeysRotated(KeysRotatedReply),
    StoreStats(StoreStatsReply),
    HqStatus(HqStatusReply),
    HqOutbox(HqOutboxReply),
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallsReply {
    pub calls: Vec<StoredCallItem>,
}

/// A stored call's metadata and masked summary: nothing here identifies a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCallItem {
    pub call: String,
    pub source: String,
    pub line: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: Option<i64>,
    /// open, finished, interrupted or forgotten.
    pub status: String,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    /// The customer's keyed hash.
    pub customer: Option<String>,
    pub utterances: i64,
    pub phase: Option<String>,
    pub tags: Vec<String>,
    pub converted: bool,
    /// Customer intents and how many utterances carried each.
    pub intents: std::collections::BTreeMap<String, i64>,
    pub rule_hits: Vec<StoredHitItem>,
    /// Data classes whose key is shredded (retention, erasure).
    pub shredded: Vec<String>,
    /// Seconds of audio kept per leg (`store.keep_audio`).
    #[serde(default)]
    pub audio_secs: std::collections::BTreeMap<String, f64>,
}

/// Most µ-law bytes in one `calls_audio` reply (hex-encoded, the reply stays well under
/// the CLI's 1 MiB): 50 s of a leg at 8 kHz.
pub const MAX_AUDIO_PAGE_BYTES: usize = 400 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallAudioReply {
    pub call: String,
    pub leg: String,
    /// Samples per second (µ-law, one byte a sample).
    pub rate: u32,
    /// The µ-law bytes, hex.
    pub mulaw_hex: String,
    /// Whether the leg's last chunk is in (false: cut short by a stop or a full disk).
    pub complete: bool,
    /// Ask again from here for the rest.
    pub next_chunk: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredHitItem {
    pub rule: String,
    pub severity: String,
    pub event: Option<String>,
    pub reason: String,
    pub at_secs: f64,
    pub utterances: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCallReply {
    pub call: StoredCallItem,
    /// Decrypted utterances (masked text), when asked for and permitted.
    pub utterances: Vec<StoredUtteranceItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredUtteranceItem {
    pub index: u64,
    pub leg: String,
    pub start_secs: f64,
    pub end_secs: f64,
    /// Personal data masked.
    pub text: String,
    /// The unmasked text, only where `store.keep_unmasked` kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmasked: Option<String>,
    pub intents: Vec<String>,
    pub emotion: Option<String>,
    pub phase: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgottenReply {
    /// The customer's keyed hash (the tombstone's key).
    pub customer: String,
    /// Calls erased by this request (0 when repeated).
    pub calls: usize,
    /// Customer rows and tags deleted from the customer store.
    pub customer_rows: usize,
    pub first_time: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReply {
    pub entries: Vec<AuditItem>,
    /// Entries left out (only the newest are sent).
    pub omitted: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditItem {
    pub seq: i64,
    pub at_unix_ms: i64,
    pub uid: u32,
    pub role: String,
    pub action: String,
    /// A call id, a customer hash or `-`: never personal data.
    pub object: String,
    pub outcome: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerifyReply {
    pub ok: bool,
    /// Entries that hold (all of them when ok).
    pub entries: usize,
    /// The first broken entry and why.
    pub broken_seq: Option<i64>,
    pub why: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysRotatedReply {
    pub keys: usize,
    /// The new master key's id (never the key).
    pub master_key: String,
}

/// The uplink to headquarters (`hq status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HqStatusReply {
    pub connected: bool,
    /// `host:port` of the broker in use or last tried.
    pub broker: Option<String>,
    pub last_error: Option<String>,
    pub last_ack_unix_ms: Option<i64>,
    pub in_flight: u64,
    pub published: u64,
    pub acked: u64,
    pub resent: u64,
    pub bad_acks: u64,
    /// Messages shed (reported in gap records) since the daemon started.
    pub shed: u64,
    pub lanes: Vec<HqLane>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HqLane {
    pub lane: String,
    pub rows: u64,
    pub bytes: u64,
    pub oldest_created_unix_ms: Option<i64>,
    pub next_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HqOutboxReply {
    pub entries: Vec<HqOutboxEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HqOutboxEntry {
    pub id: String,
    pub lane: String,
    pub seq: u64,
    pub kind: String,
    pub bytes: u64,
    pub created_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatsReply {
    pub calls: i64,
    pub open: i64,
    pub finished: i64,
    pub interrupted: i64,
    pub forgotten: i64,
    pub utterances: i64,
    pub oldest_call_unix_ms: Option<i64>,
    pub class_keys: i64,
    pub tombstones: i64,
    pub audit_entries: i64,
    pub bytes: u64,
    pub master_key: String,
    pub writes: u64,
    pub writes_refused: u64,
    /// Writes the disk refused for now, kept in memory and retried.
    #[serde(default)]
    pub writes_waiting: u64,
    /// Audio chunks not kept (disk nearly full, or refusing writes).
    #[serde(default)]
    pub audio_dropped: u64,
    /// Free space is below `storage.stop_audio_below_mb`: audio is not being kept now.
    #[serde(default)]
    pub audio_paused: bool,
    /// When retention last ran (ms since the epoch) and what it did.
    pub last_sweep_unix_ms: Option<i64>,
    pub last_sweep: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallReply {
    pub line: String,
    pub call: String,
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerReply {
    pub customer: Option<CustomerRecord>,
}

/// A customer across calls (the id is the keyed hash of the caller number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub customer: String,
    pub first_unix_ms: i64,
    pub last_unix_ms: i64,
    pub calls: i64,
    pub tags: Vec<TagRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub tag: String,
    pub first_unix_ms: i64,
    pub last_unix_ms: i64,
    /// Calls that raised the tag.
    pub calls: i64,
}

impl Response {
    pub fn frame(self) -> ResponseFrame {
        ResponseFrame { v: PROTOCOL_VERSION, response: self }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorReply { code, message: message.into() })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    RequestTooLarge,
    UnsupportedVersion,
    Forbidden,
    /// Understood and allowed, but not possible now (no call on that line, …).
    Rejected,
    Timeout,
    ShuttingDown,
    Internal,
    /// Every connection slot open to this caller is taken; try again shortly.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub state: DaemonState,
    pub started_at: String,
    pub uptime_secs: u64,
    pub config: ConfigSource,
    /// Starts at 1; each successful reload adds one.
    pub config_generation: u64,
    pub last_reload: Option<ReloadReport>,
    pub log_level: String,
    pub log_to_journal: bool,
    pub systemd_notify: bool,
    pub watchdog_interval_ms: Option<u64>,
    pub control_socket: String,
    pub data_dir: String,
    pub components: Vec<ComponentHealth>,
    /// Bound AudioSocket listeners, "address (leg)".
    pub audiosocket_listeners: Vec<String>,
    pub calls: CallsReport,
    /// The speech path; absent when it is off or no input is configured.
    #[serde(default)]
    pub speech: Option<SpeechReport>,
    pub caller: CallerInfo,
}

/// Where the running configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ConfigSource {
    File {
        path: PathBuf,
    },
    /// Built-in defaults, because the named file does not exist or is empty.
    Defaults {
        path: PathBuf,
        reason: String,
    },
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { path } => write!(f, "{}", path.display()),
            Self::Defaults { path, reason } => write!(f, "built-in defaults ({} {reason})", path.display()),
        }
    }
}

/// Live calls.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CallsReport {
    pub active: Vec<CallSummary>,
    pub total_started: u64,
    pub total_refused: u64,
    /// Of the refused, those turned away because the limit was reached.
    #[serde(default)]
    pub refused_at_capacity: u64,
    /// Simultaneous calls taken at most, and where that limit comes from
    /// (`calls.max_concurrent` or the box's rated capacity).
    #[serde(default)]
    pub max_calls: usize,
    #[serde(default)]
    pub limit_source: String,
    /// Something to act on about the limit (no rating, a rating of another box).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_warning: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallSummary {
    pub call: String,
    pub started_at_unix_ms: u64,
    pub legs: Vec<LegSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegSummary {
    /// `agent` or `customer`.
    pub leg: String,
    pub source: String,
    pub open: bool,
    pub audio_ms: u64,
    pub dtmf: String,
    pub closed_because: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechReport {
    pub models_dir: String,
    pub legs_open: u64,
    pub legs_total: u64,
    pub utterances: u64,
    /// Audio that went through VAD, in legs that have ended.
    pub audio_secs: f64,
    /// Compute time spent in ASR (encoder + decoder), all utterances.
    pub asr_secs: f64,
    pub errors: u64,
    /// The shared ASR scheduler: slots, utterances transcribing and waiting now, the
    /// longest current and all-time waits.
    #[serde(default)]
    pub asr_queue: AsrQueueReport,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AsrQueueReport {
    pub slots: usize,
    pub busy: usize,
    pub waiting: usize,
    pub oldest_wait_secs: f64,
    pub max_wait_secs: f64,
    /// Most utterances a slot transcribes together (`speech.asr_batch`), and the largest
    /// batch since the start (1: the queue never held more than one slot could take).
    #[serde(default)]
    pub batch_limit: usize,
    #[serde(default)]
    pub largest_batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    Running,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub name: String,
    pub state: HealthState,
    pub detail: String,
    pub since: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Starting,
    Ok,
    Degraded,
    Failed,
    Stopped,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ok => "ok",
            Self::Degraded => "degraded",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerInfo {
    pub uid: u32,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub at: String,
    pub ok: bool,
    /// The generation running after this reload attempt.
    pub generation: u64,
    pub problems: Vec<String>,
    /// Keys that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
}

/// One line of a `watch` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorFrame {
    pub v: u32,
    pub monitor: MonitorItem,
}

/// What the understanding bus carries, as watchers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MonitorItem {
    /// An understood utterance (text masked).
    Utterance(UtteranceItem),
    /// A real-time event of a call.
    Event(EventItem),
    /// A call's end: counts, phase, the customer's tags from it, and the customer.
    CallFinished(CallFinishedItem),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtteranceItem {
    pub call: String,
    pub index: usize,
    /// `agent` or `customer`.
    pub leg: String,
    pub start_secs: f64,
    pub end_secs: f64,
    /// The transcript with personal data masked.
    pub text: String,
    /// Kinds of personal data masked in it.
    pub pii: Vec<String>,
    /// Customer utterances only.
    pub intent: Option<IntentItem>,
    pub emotion: Option<String>,
    /// The call's phase after this utterance.
    pub phase: String,
    /// Ids of the rules that fired on this utterance.
    pub rules: Vec<String>,
    /// Live calls: where its time went after the last word (added within v1: absent from
    /// replays and from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyItem>,
}

/// An utterance's time between the end of its words and its publication, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyItem {
    /// Audio the VAD heard after the words before closing the utterance.
    pub hangover_ms: f64,
    /// From the VAD's close to the publication (queue, ASR, text models, hand-offs).
    pub after_close_ms: f64,
    pub asr_queue_ms: f64,
    /// In an ASR worker, and of that the utterance's own encoder.
    pub asr_worker_ms: f64,
    pub encoder_ms: f64,
    pub understanding_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentItem {
    pub label: String,
    pub confidence: f32,
    pub top3: Vec<ScoredLabel>,
    /// Every label over the model's threshold, best first (added within v1: a line from
    /// an older daemon without it reads as empty).
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredLabel {
    pub label: String,
    pub p: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventItem {
    pub call: String,
    pub kind: String,
    pub rule: String,
    pub reason: String,
    /// Seconds from the call's start when the event was raised.
    pub at_secs: f64,
    pub utterances: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallFinishedItem {
    pub call: String,
    pub utterances: usize,
    pub rule_hits: usize,
    pub events: usize,
    pub phase: String,
    /// The customer's tags from this call.
    pub tags: Vec<String>,
    /// The customer across calls, when the call has a caller number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<CustomerRecord>,
}

/// What a request line turned into.
pub fn decode_request(line: &[u8]) -> Result<Request, ErrorReply> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    match serde_json::from_slice::<RequestFrame>(line) {
        Ok(frame) if frame.v == PROTOCOL_VERSION => Ok(frame.request),
        Ok(frame) => Err(unsupported(frame.v)),
        Err(e) => match serde_json::from_slice::<VersionOnly>(line) {
            Ok(VersionOnly { v }) if v != PROTOCOL_VERSION => Err(unsupported(v)),
            _ => Err(ErrorReply { code: ErrorCode::BadRequest, message: format!("malformed request: {e}") }),
        },
    }
}

fn unsupported(v: u32) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::UnsupportedVersion,
        message: format!("protocol version {v} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
    }
}

/// One JSON line, newline-terminated.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail (no maps with non-string keys).
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Assembles newline-terminated lines from arbitrary chunks, refusing any line
/// longer than `max` bytes before buffering more than that. No IO: the async
/// server and the blocking CLI both feed it.
#[derive(Debug)]
pub struct LineFramer {
    max: usize,
    partial: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// Need more input; the whole chunk was consumed.
    NeedMore,
    /// A complete line (without the newline); `consumed` bytes of the chunk were used.
    Line { line: Vec<u8>, consumed: usize },
    /// The line being assembled exceeds the bound.
    TooLong,
}

impl LineFramer {
    pub fn new(max: usize) -> Self {
        Self { max, partial: Vec::new() }
    }

    /// Whether part of a line has been received.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    pub fn push(&mut self, chunk: &[u8]) -> Framed {
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if self.partial.len() + i > self.max {
                    return Framed::TooLong;
                }
                self.partial.extend_from_slice(&chunk[..i]);
                Framed::Line { line: std::mem::take(&mut self.partial), consumed: i + 1 }
            }
            None => {
                if self.partial.len() + chunk.len() > self.max {
                    return Framed::TooLong;
                }
                self.partial.extend_from_slice(chunk);
                Framed::NeedMore
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        assert_eq!(encode_line(&Request::Status {}.frame()), b"{\"v\":1,\"request\":{\"op\":\"status\"}}\n");
        assert_eq!(decode_request(br#"{"v":1,"request":{"op":"reload"}}"#), Ok(Request::Reload {}));
    }

    #[test]
    fn unknown_ops_fields_and_versions_are_refused() {
        let code = |line: &[u8]| decode_request(line).unwrap_err().code;
        assert_eq!(code(br#"{"v":1,"request":{"op":"format_disk"}}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"v":1,"request":{"op":"status"},"x":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"v":1,"request":{"op":"status","x":1}}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"v":2,"request":{"op":"status"}}"#), ErrorCode::UnsupportedVersion);
        assert_eq!(code(br#"{"v":9,"request":{"op":"new_thing","arg":3}}"#), ErrorCode::UnsupportedVersion);
        assert_eq!(code(b"not json"), ErrorCode::BadRequest);
    }

    #[test]
    fn roles_are_ordered_and_reload_needs_admin() {
        assert!(Role::Admin > Role::Technician);
        assert_eq!(Request::Status {}.required_role(), Role::Technician);
        assert_eq!(Request::Reload {}.required_role(), Role::Admin);
    }

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(value: T) {
        let line = encode_line(&value);
        let back: T = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, value, "{}", String::from_utf8_lossy(&line));
    }

    fn customer() -> CustomerRecord {
        CustomerRecord {
            customer: "ab12".into(),
            first_unix_ms: 1,
            last_unix_ms: 2,
            calls: 3,
            tags: vec![TagRecord { tag: "price_sensitive".into(), first_unix_ms: 1, last_unix_ms: 2, calls: 2 }],
        }
    }

    fn utterance() -> MonitorItem {
        MonitorItem::Utterance(UtteranceItem {
            call: "c1".into(),
            index: 0,
            leg: "customer".into(),
            start_secs: 1.5,
            end_secs: 2.25,
            text: "多少钱".into(),
            pii: vec!["mobile".into()],
            intent: Some(IntentItem {
                label: "price_inquiry".into(),
                confidence: 0.5,
                top3: vec![ScoredLabel { label: "price_inquiry".into(), p: 0.5 }],
                labels: vec!["price_inquiry".into(), "budget_concern".into()],
            }),
            emotion: Some("neutral".into()),
            phase: "needs_discovery".into(),
            rules: vec!["r1".into()],
            latency: Some(LatencyItem {
                hangover_ms: 416.0,
                after_close_ms: 350.5,
                asr_queue_ms: 12.0,
                asr_worker_ms: 300.0,
                encoder_ms: 80.0,
                understanding_ms: 20.0,
            }),
        })
    }

    #[test]
    fn every_request_round_trips() {
        for request in [
            Request::Ping {},
            Request::Status {},
            Request::Reload {},
            Request::CallStart { line: "1".into() },
            Request::CallStop { line: "1".into() },
            Request::CallInfo {
                call: "c".into(),
                caller: Some("+86 138".into()),
                campaign: Some("autumn".into()),
                converted: Some(true),
            },
            Request::Customer { caller: "138".into() },
            Request::Watch {},
            Request::CallsList { since_unix_ms: Some(1), caller: Some("138".into()), event: None, limit: Some(5) },
            Request::CallsShow { call: "c".into(), transcript: true },
            Request::CallsExport { call: "c".into() },
            Request::CallsAudio { call: "c".into(), leg: "agent".into(), from_chunk: 3 },
            Request::CustomerForget { caller: "138".into() },
            Request::AuditShow { since_unix_ms: None },
            Request::AuditVerify {},
            Request::KeysRotate {},
            Request::StoreStats {},
        ] {
            let line = encode_line(&request.clone().frame());
            assert_eq!(decode_request(&line[..line.len() - 1]), Ok(request.clone()));
            round_trip(request.frame());
        }
    }

    #[test]
    fn every_response_round_trips() {
        let status = StatusReport {
            version: "0.1.0".into(),
            pid: 7,
            state: DaemonState::Stopping,
            started_at: "2026-12-01T00:00:00Z".into(),
            uptime_secs: 5,
            config: ConfigSource::Defaults { path: "/etc/callbox/callbox.toml".into(), reason: "is empty".into() },
            config_generation: 2,
            last_reload: Some(ReloadReport {
                at: "2026-12-01T00:00:01Z".into(),
                ok: false,
                generation: 1,
                problems: vec!["line 3: x: bad".into()],
                restart_required: vec!["control.socket".into()],
            }),
            log_level: "info".into(),
            log_to_journal: false,
            systemd_notify: true,
            watchdog_interval_ms: Some(15_000),
            control_socket: "/run/callbox/control.sock".into(),
            data_dir: "/var/lib/callbox".into(),
            components: vec![ComponentHealth {
                name: "speech".into(),
                state: HealthState::Degraded,
                detail: "d".into(),
                since: "2026-12-01T00:00:00Z".into(),
            }],
            audiosocket_listeners: vec!["127.0.0.1:9092 (customer)".into()],
            calls: CallsReport {
                active: vec![CallSummary {
                    call: "c".into(),
                    started_at_unix_ms: 9,
                    legs: vec![LegSummary {
                        leg: "agent".into(),
                        source: "peer".into(),
                        open: true,
                        audio_ms: 20,
                        dtmf: "1".into(),
                        closed_because: None,
                    }],
                }],
                total_started: 1,
                total_refused: 2,
                refused_at_capacity: 1,
                max_calls: 6,
                limit_source: "the box's rated capacity".into(),
                limit_warning: Some("w".into()),
            },
            speech: Some(SpeechReport {
                models_dir: "/m".into(),
                legs_open: 1,
                legs_total: 2,
                utterances: 3,
                audio_secs: 4.5,
                asr_secs: 0.5,
                errors: 0,
                asr_queue: AsrQueueReport {
                    slots: 2,
                    busy: 1,
                    waiting: 3,
                    oldest_wait_secs: 0.2,
                    max_wait_secs: 0.9,
                    batch_limit: 4,
                    largest_batch: 3,
                },
            }),
            caller: CallerInfo { uid: 0, role: Role::Admin },
        };
        for response in [
            Response::Pong,
            Response::Status(Box::new(status)),
            Response::Reload(ReloadReport {
                at: "t".into(),
                ok: true,
                generation: 2,
                problems: vec![],
                restart_required: vec![],
            }),
            Response::Call(CallReply { line: "1".into(), call: "alsa:1:0".into(), started: true }),
            Response::Customer(CustomerReply { customer: Some(customer()) }),
            Response::Customer(CustomerReply { customer: None }),
            Response::Watching,
            Response::Calls(CallsReply { calls: vec![stored_call()] }),
            Response::StoredCall(Box::new(StoredCallReply {
                call: stored_call(),
                utterances: vec![StoredUtteranceItem {
                    index: 0,
                    leg: "customer".into(),
                    start_secs: 1.0,
                    end_secs: 2.5,
                    text: "[手机号]".into(),
                    unmasked: Some("x".into()),
                    intents: vec!["price_question".into()],
                    emotion: Some("neutral".into()),
                    phase: Some("opening".into()),
                }],
            })),
            Response::Forgotten(ForgottenReply { customer: "ab".into(), calls: 2, customer_rows: 3, first_time: true }),
            Response::Audit(AuditReply {
                entries: vec![AuditItem {
                    seq: 1,
                    at_unix_ms: 2,
                    uid: 0,
                    role: "admin".into(),
                    action: "transcript_read".into(),
                    object: "c".into(),
                    outcome: "ok".into(),
                    hash: "h".into(),
                }],
                omitted: 0,
            }),
            Response::AuditVerified(AuditVerifyReply {
                ok: false,
                entries: 3,
                broken_seq: Some(4),
                why: Some("hash".into()),
            }),
            Response::KeysRotated(KeysRotatedReply { keys: 9, master_key: "id".into() }),
            Response::StoreStats(StoreStatsReply {
                calls: 1,
                open: 0,
                finished: 1,
                interrupted: 0,
                forgotten: 0,
                utterances: 3,
                oldest_call_unix_ms: Some(5),
                class_keys: 3,
                tombstones: 0,
                audit_entries: 1,
                bytes: 4096,
                master_key: "id".into(),
                writes: 4,
                writes_refused: 0,
                writes_waiting: 2,
                audio_dropped: 1,
                audio_paused: true,
                last_sweep_unix_ms: None,
                last_sweep: None,
            }),
            Response::CallAudio(CallAudioReply {
                call: "c".into(),
                leg: "customer".into(),
                rate: 8000,
                mulaw_hex: "ff7f".into(),
                complete: false,
                next_chunk: Some(10),
            }),
            Response::error(ErrorCode::ShuttingDown, "stopping"),
        ] {
            round_trip(response.frame());
        }
    }

    fn stored_call() -> StoredCallItem {
        StoredCallItem {
            call: "c".into(),
            source: "spool".into(),
            line: "".into(),
            started_unix_ms: 1,
            ended_unix_ms: Some(2),
            status: "finished".into(),
            agent: Some("a7".into()),
            campaign: None,
            script: Some("v2".into()),
            customer: Some("ab".into()),
            utterances: 3,
            phase: Some("closing".into()),
            tags: vec!["high_intent".into()],
            converted: true,
            intents: [("price_question".to_owned(), 2)].into(),
            rule_hits: vec![StoredHitItem {
                rule: "r".into(),
                severity: "warning".into(),
                event: Some("supervisor_alert".into()),
                reason: "why".into(),
                at_secs: 3.5,
                utterances: vec![1],
            }],
            shredded: vec!["audio".into()],
            audio_secs: [("customer".to_owned(), 12.5)].into(),
        }
    }

    #[test]
    fn every_monitor_item_round_trips() {
        let event = MonitorItem::Event(EventItem {
            call: "c1".into(),
            kind: "dnc_request".into(),
            rule: "customer_do_not_call".into(),
            reason: "asked".into(),
            at_secs: 3.5,
            utterances: vec![0, 2],
        });
        let finished = |customer| {
            MonitorItem::CallFinished(CallFinishedItem {
                call: "c1".into(),
                utterances: 3,
                rule_hits: 1,
                events: 1,
                phase: "closing".into(),
                tags: vec!["do_not_call".into()],
                customer,
            })
        };
        for item in [utterance(), event, finished(Some(customer())), finished(None)] {
            round_trip(MonitorFrame { v: PROTOCOL_VERSION, monitor: item });
        }
    }

    #[test]
    fn monitor_lines_keep_the_v1_shape() {
        // What `watch --json` consumers parse: a field renamed here is a protocol change.
        let line = encode_line(&MonitorFrame { v: 1, monitor: utterance() });
        let expected = r#"{"v":1,"monitor":{"type":"utterance","call":"c1","index":0,"leg":"customer","start_secs":1.5,"end_secs":2.25,"text":"多少钱","pii":["mobile"],"intent":{"label":"price_inquiry","confidence":0.5,"top3":[{"label":"price_inquiry","p":0.5}],"labels":["price_inquiry","budget_concern"]},"emotion":"neutral","phase":"needs_discovery","rules":["r1"],"latency":{"hangover_ms":416.0,"after_close_ms":350.5,"asr_queue_ms":12.0,"asr_worker_ms":300.0,"encoder_ms":80.0,"understanding_ms":20.0}}}"#;
        assert_eq!(String::from_utf8(line).unwrap().trim_end(), expected);
        // A line from a daemon before `labels` and `latency` existed still reads.
        let older = expected
            .replace(r#","labels":["price_inquiry","budget_concern"]"#, "")
            .replace(r#","latency":{"hangover_ms":416.0,"after_close_ms":350.5,"asr_queue_ms":12.0,"asr_worker_ms":300.0,"encoder_ms":80.0,"understanding_ms":20.0}"#, "");
        let frame: MonitorFrame = serde_json::from_str(&older).unwrap();
        let MonitorItem::Utterance(u) = frame.monitor else { panic!("not an utterance: {older}") };
        assert_eq!(u.intent.map(|i| i.labels), Some(vec![]));
        assert_eq!(u.latency, None);
    }

    #[test]
    fn framer_splits_lines_across_chunks() {
        let mut f = LineFramer::new(16);
        assert_eq!(f.push(b"abc"), Framed::NeedMore);
        assert!(f.has_partial());
        assert_eq!(f.push(b"de\nxy"), Framed::Line { line: b"abcde".to_vec(), consumed: 3 });
        assert!(!f.has_partial());
        assert_eq!(f.push(b"xy\n"), Framed::Line { line: b"xy".to_vec(), consumed: 3 });
    }

    #[test]
    fn framer_refuses_lines_over_the_bound_without_buffering_them() {
        let mut f = LineFramer::new(4);
        assert_eq!(f.push(b"abcd"), Framed::NeedMore);
        assert_eq!(f.push(b"e"), Framed::TooLong);
        let mut f = LineFramer::new(4);
        assert_eq!(f.push(b"abcde\n"), Framed::TooLong);
        let mut f = LineFramer::new(4);
        assert_eq!(f.push(b"abcd\n"), Framed::Line { line: b"abcd".to_vec(), consumed: 5 });
    }
}
