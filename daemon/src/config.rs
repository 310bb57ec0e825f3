//! The configuration: one TOML file, every key optional, unknown keys refused.
//!
//! `load` never stops at the first problem: syntax errors are collected by the
//! recovering parser; type and unknown-key errors by deserializing again after
//! pruning each offending key; range and consistency errors by `validate`.
//! Each problem carries its dotted key path and, where the file has it, a line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A config file larger than this is refused before parsing (it is hand-written TOML).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Upper bound on deserialize-prune rounds; each round removes one key, so a file
/// with more distinct problems than this reports the first ones only.
const MAX_PRUNE_ROUNDS: usize = 64;
/// `speech.asr_batch`'s default (README "Capacity", `bench capacity` both ways): with every
/// ASR worker busy, utterances that share decoder steps keep the box from falling behind
/// (20 calls: p99 1.40–1.50 s batched, 1.78–3.85 s one at a time), and since each is
/// answered as its own decoding ends, batching no longer costs a lighter load anything.
pub const DEFAULT_ASR_BATCH: u32 = 4;
/// Longest socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub log: LogConfig,
    pub control: ControlConfig,
    pub storage: StorageConfig,
    pub calls: CallsConfig,
    pub audiosocket: AudioSocketConfig,
    pub spool: SpoolConfig,
    pub alsa: AlsaConfig,
    pub speech: SpeechConfig,
    pub understanding: UnderstandingConfig,
    pub store: StoreConfig,
    pub hq: HqConfig,
}

/// The headquarters uplink (MQTT over TLS with a client certificate). Off until `brokers`
/// is set: nothing leaves the box, and the outbox is not written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HqConfig {
    /// `mqtts://host:port` (tried in turn on each reconnect); `mqtt://` only to a loopback
    /// address (a broker on the box itself). Empty: the uplink is off.
    pub brokers: Vec<String>,
    /// Site (branch) and box ids: the topic prefix `callbox/v1/{site}/{box_id}/`.
    pub site: String,
    pub box_id: String,
    /// MQTT client id; empty: `callbox-{site}-{box_id}`.
    pub client_id: String,
    /// CA certificate(s) that sign the broker's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// The box's client certificate chain and its key (PEM; the key file must be 0600 or
    /// 0640 and not world-readable).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keepalive_secs: u64,
    /// Resend what HQ has not acknowledged after this long (same message ids).
    pub ack_timeout_secs: u64,
    /// Messages published and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Length of an aggregate window (aligned to the epoch, so every box's windows line
    /// up): each window's metrics go to HQ once it has ended. Divides a day.
    pub interval_secs: u32,
    /// A health report (component states, store counters, free disk, outbox) every this
    /// many minutes.
    pub diagnostics_mins: u64,
    pub quota_mb: LaneQuotas,
}

/// Bytes each outbox lane may hold before it sheds its oldest (with a gap record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaneQuotas {
    pub alert: u64,
    pub compliance: u64,
    pub calls: u64,
    pub aggregates: u64,
    pub diagnostics: u64,
}

impl Default for LaneQuotas {
    fn default() -> Self {
        Self { alert: 16, compliance: 16, calls: 64, aggregates: 16, diagnostics: 4 }
    }
}

impl LaneQuotas {
    /// In bytes, in `Lane::ALL` order.
    pub fn bytes(&self) -> [u64; 5] {
        [self.alert, self.compliance, self.calls, self.aggregates, self.diagnostics].map(|mb| mb << 20)
    }
}

impl Default for HqConfig {
    fn default() -> Self {
        Self {
            brokers: Vec::new(),
            site: String::new(),
            box_id: String::new(),
            client_id: String::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            keepalive_secs: 30,
            ack_timeout_secs: 30,
            max_in_flight: 256,
            interval_secs: 300,
            diagnostics_mins: 15,
            quota_mb: LaneQuotas::default(),
        }
    }
}

impl HqConfig {
    pub fn enabled(&self) -> bool {
        !self.brokers.is_empty()
    }

    pub fn client_id(&self) -> String {
        if self.client_id.is_empty() {
            format!("callbox-{}-{}", self.site, self.box_id)
        } else {
            self.client_id.clone()
        }
    }

    /// Every problem with the section (empty when it is off).
    fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.enabled() {
            return out;
        }
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                out.push((key.to_owned(), message));
            }
        };
        for url in &self.brokers {
            if let Err(e) = BrokerUrl::parse(url) {
                check(false, "hq.brokers", e);
            }
        }
        for (key, id) in [("hq.site", &self.site), ("hq.box_id", &self.box_id)] {
            check(
                is_valid_line_name(id),
                key,
                format!("{id:?}: use 1 to 32 letters, digits, '-' or '_' (it is a topic level)"),
            );
        }
        let tls = self.brokers.iter().any(|u| u.starts_with("mqtts://"));
        for (key, path) in
            [("hq.ca_file", &self.ca_file), ("hq.cert_file", &self.cert_file), ("hq.key_file", &self.key_file)]
        {
            match path {
                Some(p) => check(p.is_absolute(), key, format!("must be an absolute path, got {p:?}")),
                None => check(!tls, key, "must be set for an mqtts:// broker (TLS with a client certificate)".into()),
            }
        }
        check(
            self.client_id().len() <= 128 && !self.client_id().contains(['/', '+', '#']),
            "hq.client_id",
            "must have at most 128 bytes and no '/', '+' or '#'".into(),
        );
        check(
            (10..=86_400).contains(&self.interval_secs) && 86_400 % self.interval_secs == 0,
            "hq.interval_secs",
            format!(
                "must divide a day (86400) and be at least 10, got {} (e.g. 60, 300, 900, 3600)",
                self.interval_secs
            ),
        );
        for (key, value, lo, hi) in [
            ("hq.keepalive_secs", self.keepalive_secs, 5, 3600),
            ("hq.ack_timeout_secs", self.ack_timeout_secs, 1, 3600),
            ("hq.max_in_flight", self.max_in_flight as u64, 1, 10_000),
            ("hq.diagnostics_mins", self.diagnostics_mins, 1, 1440),
            ("hq.quota_mb.alert", self.quota_mb.alert, 1, 4096),
            ("hq.quota_mb.compliance", self.quota_mb.compliance, 1, 4096),
            ("hq.quota_mb.calls", self.quota_mb.calls, 1, 4096),
            ("hq.quota_mb.aggregates", self.quota_mb.aggregates, 1, 4096),
            ("hq.quota_mb.diagnostics", self.quota_mb.diagnostics, 1, 4096),
        ] {
            check((lo..=hi).contains(&value), key, format!("must be between {lo} and {hi}, got {value}"));
        }
        out
    }
}

/// A broker address from `hq.brokers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// `mqtts://host[:port]` (8883) or `mqtt://host[:port]` (1883, loopback only: the
    /// uplink never sends in clear over a network).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("{url:?}: use mqtts://host:port (or mqtt:// to a loopback address)"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port.parse::<u16>().map_err(|_| format!("{url:?}: the port must be a number 1..65535"))?;
                (host, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
            return Err(format!("{url:?}: expected mqtts://host:port"));
        }
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err(format!("{url:?}: mqtt:// sends in clear; use mqtts:// (only a loopback broker may be plain)"));
        }
        Ok(Self { tls, host: host.to_owned(), port })
    }
}

/// The encrypted call store (`<data_dir>/store`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Keep every understood call (metadata in clear, text sealed). Off: nothing of a
    /// call outlives the process but the customer tags.
    pub enabled: bool,
    /// Also keep the unmasked transcript, sealed under its own key (off: only the masked
    /// text is kept, and an admin's `calls show --transcript` shows that).
    pub keep_unmasked: bool,
    /// Also keep both legs' audio (G.711 µ-law at the leg's rate, 5-s chunks sealed under
    /// the call's audio key; a spooled recording is moved in). Off by default.
    pub keep_audio: bool,
    /// Days from a call's start after which its audio key is shredded (0: keep).
    pub audio_days: u32,
    /// Days after which the transcript (masked and unmasked) is shredded (0: keep).
    pub transcript_days: u32,
    /// Days after which nothing of the call is left (0: keep).
    pub metadata_days: u32,
    /// How often retention is applied, in minutes (and once at start).
    pub sweep_interval_mins: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keep_unmasked: false,
            keep_audio: false,
            audio_days: 30,
            transcript_days: 180,
            metadata_days: 3 * 365,
            sweep_interval_mins: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnderstandingConfig {
    /// Compliance and business rules (TOML; `callbox rules check FILE`). Unset: the shipped
    /// rules. Re-read on reload; an invalid file keeps the rules in use.
    pub rules_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where calls and state are kept. Unset: systemd's StateDirectory, else
    /// /var/lib/callbox as root, else a per-user directory.
    pub data_dir: Option<PathBuf>,
    /// Graceful shutdown deadline: inputs stop, work drains, then the rest is abandoned.
    pub shutdown_timeout_secs: u64,
    /// Async worker threads. Unset: one per CPU core.
    pub worker_threads: Option<usize>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self { data_dir: None, shutdown_timeout_secs: 10, worker_threads: None }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Minimum level logged. `RUST_LOG`, when set, overrides it (with per-module filters).
    pub level: LogLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Unix socket for the CLI. Unset: systemd's RuntimeDirectory/control.sock,
    /// else /run/callbox/control.sock as root, else a per-user path.
    pub socket: Option<PathBuf>,
    /// Members may read status and run diagnostics.
    pub technician_group: String,
    /// Members (and root) may also change the daemon's state (reload, later: call control).
    pub admin_group: String,
    /// A request line longer than this is refused and its connection closed.
    pub max_request_bytes: usize,
    /// Concurrent CLI connections; one in eight is kept for admins.
    pub max_connections: usize,
    /// Concurrent connections one technician uid may hold.
    pub max_connections_per_uid: usize,
    /// A connection that has not sent a complete request by then is closed.
    pub request_timeout_secs: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: None,
            technician_group: "callbox".into(),
            admin_group: "callbox-admin".into(),
            max_request_bytes: 64 * 1024,
            max_connections: 16,
            max_connections_per_uid: 4,
            request_timeout_secs: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Below this much free space in the data directory the storage component is degraded.
    pub min_free_mb: u64,
    /// How often the data directory is checked (writable, free space).
    pub check_interval_secs: u64,
    /// Below this much free space new calls are refused (AudioSocket: hung up with the
    /// reason; spool: postponed; ALSA: not started), so the store never has to refuse the
    /// utterances of a call it took; calls in progress go on. 0: never refuse.
    pub refuse_calls_below_mb: u64,
    /// Below this much free space the call store stops keeping audio (with
    /// `store.keep_audio`) before anything else: the words of calls outrank their sound.
    pub stop_audio_below_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { min_free_mb: 1024, check_interval_secs: 30, refuse_calls_below_mb: 256, stop_audio_below_mb: 1024 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Admission control: legs of further calls are refused (AudioSocket: hung up).
    pub max_concurrent: usize,
    /// Admission also holds to the box's rated capacity (`<data_dir>/capacity.json`,
    /// written by `callbox bench capacity --save`) when it is lower.
    pub use_rated_capacity: bool,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self { max_concurrent: 32, use_rated_capacity: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioSocketConfig {
    /// TCP listeners for Asterisk's AudioSocket(); each carries one leg of calls,
    /// and legs with the same call UUID are paired. Empty: AudioSocket is off.
    pub listeners: Vec<AudioSocketListener>,
    /// Source addresses allowed to connect (the PBX). Empty: any, with a warning.
    pub allowed_peers: Vec<std::net::IpAddr>,
    /// Open streams one source address may hold.
    pub max_connections_per_peer: usize,
    /// A frame, once begun, must be complete within this.
    pub frame_timeout_ms: u64,
    /// Largest frame payload accepted; a larger one closes that connection.
    pub max_frame_bytes: usize,
    /// A leg that sends no complete frame for this long is closed.
    pub idle_timeout_secs: u64,
    /// Send 20 ms of silence back every 20 ms once a call is admitted: Asterisk's
    /// AudioSocket ends a socket that never sends audio towards it.
    pub send_silence: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioSocketListener {
    /// host:port to listen on, e.g. "0.0.0.0:9092" (port 0 picks a free one).
    pub address: std::net::SocketAddr,
    /// Which side of the call the streams on this listener carry.
    pub leg: crate::audio::Leg,
}

impl Default for AudioSocketConfig {
    fn default() -> Self {
        Self {
            listeners: vec![],
            allowed_peers: vec![],
            max_connections_per_peer: 64,
            frame_timeout_ms: 2000,
            max_frame_bytes: crate::audio::audiosocket::DEFAULT_MAX_PAYLOAD,
            idle_timeout_secs: 10,
            send_silence: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Folder the PBX drops finished recordings into (rename into place). Unset: off.
    pub dir: Option<PathBuf>,
    /// Which leg the left channel of a stereo recording carries (the right is the other).
    pub left_channel: crate::audio::Leg,
    /// Which leg a mono recording carries.
    pub mono_leg: crate::audio::Leg,
    /// How often the folder is looked at, in milliseconds.
    pub poll_interval_ms: u64,
    /// A file is picked up once its size and mtime have not changed for this long.
    pub settle_ms: u64,
    /// Larger recordings go to failed/.
    pub max_file_mb: u64,
    /// Keep processed recordings (and sidecars) in done/ and the masked utterances in the
    /// result file, as before the call store. Outside the privacy guarantees: clear audio
    /// and text on disk, never erased by retention or `customer forget`. Off: a processed
    /// recording and its sidecar are deleted once its result (ids, status, metadata) is
    /// written; the call itself is in the encrypted store.
    pub keep_in_clear: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            left_channel: crate::audio::Leg::Agent,
            mono_leg: crate::audio::Leg::Customer,
            poll_interval_ms: 1000,
            settle_ms: 1000,
            max_file_mb: 512,
            keep_in_clear: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlsaConfig {
    /// ALSA capture device, e.g. "hw:1,0" or a PCM defined in asound.conf. Unset: off.
    pub device: Option<String>,
    /// Channels opened on the device (interleaved 16-bit).
    pub channels: u32,
    pub sample_rate: u32,
    /// Capture period: the unit of reading and of call-boundary decisions.
    pub period_ms: u32,
    /// Which channel carries which line and leg; unmapped channels are ignored.
    pub map: Vec<AlsaChannel>,
    /// Start a call when a line's level rises above `start_level_dbfs`. Off: calls start
    /// and stop only on `callbox call start|stop LINE` (the control socket).
    pub auto_start: bool,
    /// RMS level over one period (dB full scale) that counts as sound on a line.
    pub start_level_dbfs: f32,
    /// A call ends after this much silence on every leg of its line (auto-started calls;
    /// explicitly started ones end on `call stop`).
    pub silence_timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlsaChannel {
    /// Channel index on the device, from 0.
    pub channel: u32,
    /// Line name, e.g. "1" or "sales-3": calls on it are called `alsa:<line>:<start>`.
    pub line: String,
    pub leg: crate::audio::Leg,
}

impl Default for AlsaConfig {
    fn default() -> Self {
        Self {
            device: None,
            channels: 2,
            sample_rate: 8000,
            period_ms: 20,
            map: vec![],
            auto_start: true,
            start_level_dbfs: -45.0,
            silence_timeout_secs: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeechConfig {
    /// Transcribe live and spooled calls. Off: inputs still take calls (counted in
    /// `status`), nothing is transcribed and no models are loaded.
    pub enabled: bool,
    /// No longer honoured: transcripts never go to the log (personal data); `callbox
    /// watch` shows them. Accepted so that existing files stay valid; `true` is warned about.
    pub log_transcripts: bool,
    /// Folder with manifest.json and the models it lists (models/build.sh makes one).
    /// Unset: $CALLBOX_MODELS_DIR, else /usr/share/callbox/models.
    pub models_dir: Option<PathBuf>,
    /// Language of the calls ("zh", "en", …) or "auto" to detect it per utterance.
    pub language: String,
    /// Encoder windows in seconds; each utterance uses the smallest that fits it.
    pub encoder_buckets_secs: Vec<u32>,
    /// VAD speech probability threshold (0..1).
    pub vad_threshold: f32,
    /// Speech shorter than this is dropped.
    pub min_speech_ms: u32,
    /// Silence that ends an utterance (the hangover).
    pub min_silence_ms: u32,
    /// Audio kept before and after each utterance.
    pub speech_pad_ms: u32,
    /// Longer speech is cut into several utterances.
    pub max_utterance_secs: u32,
    /// Decoding stops after this many tokens per second of audio (loop guard).
    pub max_tokens_per_sec: f32,
    /// Utterances transcribed at once, by every leg together (the shared ASR scheduler's
    /// slots; more wait their turn, oldest first). 0: one per core.
    pub asr_workers: u32,
    /// Most utterances one slot transcribes together when others are waiting: their
    /// decodings share each decoder step (its weights read once for all). 1: never batched.
    pub asr_batch: u32,
    /// Terms the ASR should favour: product, company, place names (at most 64, each
    /// 1–32 characters).
    pub hotwords: Vec<String>,
    /// "bias" (raise the terms' tokens while decoding; free) or "prompt" (Whisper's
    /// previous-text context; one decoder step per prompt token on every utterance).
    pub hotword_mode: crate::speech::hotwords::HotwordMode,
    /// Logit bias in bias mode (0–10).
    pub hotword_bias: f32,
    /// Per campaign, by the name a call's metadata gives (the spool sidecar's `campaign`,
    /// `callbox call info --campaign`): its own terms, favoured on its calls besides
    /// `hotwords` (together at most 64).
    pub campaigns: std::collections::BTreeMap<String, CampaignSpeech>,
    /// Temperatures for Whisper's fallback: an utterance whose greedy decoding loops or is
    /// improbable is decoded again, sampling at each in turn until one passes (at most 8,
    /// each in 0.05–1.5, ascending). Empty (the default): greedy only. Whisper's own list is
    /// `decoding::WHISPER_FALLBACK_TEMPERATURES`.
    pub fallback_temperatures: Vec<f32>,
    /// Decode with Whisper's timestamp tokens and end each utterance's text where its audio
    /// ends (instead of `<|notimestamps|>`).
    pub timestamps: bool,
}

impl Default for SpeechConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            log_transcripts: false,
            models_dir: None,
            language: "zh".into(),
            encoder_buckets_secs: crate::speech::whisper::DEFAULT_BUCKETS.to_vec(),
            vad_threshold: 0.5,
            min_speech_ms: 250,
            min_silence_ms: 400,
            speech_pad_ms: 150,
            max_utterance_secs: 15,
            max_tokens_per_sec: 12.0,
            asr_workers: 0,
            asr_batch: DEFAULT_ASR_BATCH,
            hotwords: Vec::new(),
            hotword_mode: crate::speech::hotwords::HotwordMode::Bias,
            hotword_bias: crate::speech::decoding::DEFAULT_HOTWORD_BIAS,
            campaigns: std::collections::BTreeMap::new(),
            fallback_temperatures: Vec::new(),
            timestamps: true,
        }
    }
}

impl SpeechConfig {
    pub const DEFAULT_MODELS_DIR: &'static str = crate::paths::PACKAGED_MODELS_DIR;

    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .or_else(|| std::env::var_os("CALLBOX_MODELS_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(Self::DEFAULT_MODELS_DIR))
    }

    pub fn vad_params(&self) -> crate::speech::vad::VadParams {
        crate::speech::vad::VadParams {
            threshold: self.vad_threshold,
            neg_threshold: (self.vad_threshold - 0.15).max(0.01),
            min_speech_ms: self.min_speech_ms,
            min_silence_ms: self.min_silence_ms,
            speech_pad_ms: self.speech_pad_ms,
            max_utterance_ms: self.max_utterance_secs * 1000,
        }
    }

    /// The terms a call of `campaign` favours: `hotwords`, then the campaign's own not
    /// already among them. An unknown campaign (or none) has the common terms only.
    pub fn hotwords_for(&self, campaign: Option<&str>) -> Vec<String> {
        let mut terms = self.hotwords.clone();
        let own = campaign.and_then(|c| self.campaigns.get(c)).map_or(&[][..], |c| &c.hotwords[..]);
        for term in own {
            if !terms.contains(term) {
                terms.push(term.clone());
            }
        }
        terms
    }

    /// These settings for a call of `campaign`: its terms in `hotwords`.
    pub fn for_campaign(&self, campaign: Option<&str>) -> Self {
        Self { hotwords: self.hotwords_for(campaign), ..self.clone() }
    }

    pub fn decode_options(&self) -> crate::speech::DecodeOptions {
        crate::speech::DecodeOptions {
            language: self.language.clone(),
            max_tokens_per_sec: self.max_tokens_per_sec,
            hotwords: self.hotwords.clone(),
            hotword_mode: self.hotword_mode,
            hotword_bias: self.hotword_bias,
            fallback_temperatures: self.fallback_temperatures.clone(),
            timestamps: self.timestamps,
            ..Default::default()
        }
    }
}

/// A campaign's speech settings (`[speech.campaigns."<name>"]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CampaignSpeech {
    /// Terms the ASR favours on this campaign's calls: its products, company, places.
    pub hotwords: Vec<String>,
}

/// Most campaigns `[speech.campaigns]` may name, and the longest name.
pub const MAX_CAMPAIGNS: usize = 256;
pub const MAX_CAMPAIGN_CHARS: usize = 64;

/// A campaign's name as config and `call info` take it: 1–64 printable characters.
pub fn check_campaign_name(name: &str) -> Result<(), String> {
    if (1..=MAX_CAMPAIGN_CHARS).contains(&name.chars().count()) && crate::escape::is_printable(name) {
        Ok(())
    } else {
        Err(format!("a campaign name has 1–{MAX_CAMPAIGN_CHARS} printable characters"))
    }
}

/// What is wrong with a list of hotwords, if anything: at most `MAX_TERMS`, each 1–32
/// printable characters.
fn hotword_problem(terms: &[String]) -> Option<String> {
    use crate::speech::hotwords::{MAX_TERMS, MAX_TERM_CHARS};
    let bad = terms.iter().find(|t| {
        let n = t.trim().chars().count();
        n == 0 || n > MAX_TERM_CHARS || !crate::escape::is_printable(t)
    });
    match bad {
        Some(term) => Some(format!("each term has 1–{MAX_TERM_CHARS} printable characters, got {term:?}")),
        None if terms.len() > MAX_TERMS => Some(format!("at most {MAX_TERMS} terms, got {}", terms.len())),
        None => None,
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Dotted key path, e.g. `control.max_request_bytes`; empty for the document itself.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Unreadable { path: PathBuf, source: crate::fsio::ReadError },
    #[error("config file {path} {reason}: a daemon started from a file does not reload from nothing, which would drop the file's settings (allowed_peers, allowed groups …); restore the file, or restart the daemon to run on built-in defaults")]
    WouldDropFile { path: PathBuf, reason: String },
    #[error("config file {path} is invalid ({} problem{}):\n{}", problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(|p| format!("  {}: {p}", path.display())).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
        /// The file's valid keys over the defaults: lets the CLI still find the
        /// daemon's socket and data directory in a file with an unrelated mistake.
        best_effort: Box<Config>,
    },
}

impl ConfigError {
    /// Every problem, one per line, each prefixed with the file: for logs and the CLI.
    pub fn problem_lines(&self) -> Vec<String> {
        match self {
            Self::Invalid { path, problems, .. } => {
                problems.iter().map(|p| format!("{}: {p}", path.display())).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

/// The running configuration as components see it (through a `watch`): what is in force,
/// where it came from, and how the last reload went.
#[derive(Debug, Clone)]
pub struct RunningConfig {
    pub config: Config,
    pub source: ConfigSource,
    /// Starts at 1; each successful reload adds one.
    pub generation: u64,
    pub last_reload: Option<ReloadReport>,
}

/// The outcome of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// When it was attempted (UTC, RFC 3339).
    pub at: String,
    pub ok: bool,
    /// The generation running after this reload attempt.
    pub generation: u64,
    pub problems: Vec<String>,
    /// Keys that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
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

impl ConfigSource {
    pub fn path(&self) -> &Path {
        match self {
            Self::File { path } | Self::Defaults { path, .. } => path,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path } => write!(f, "{}", path.display()),
            Self::Defaults { path, reason } => {
                write!(f, "built-in defaults ({} {reason})", path.display())
            }
        }
    }
}

/// A validated configuration and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    pub config: Config,
    pub source: ConfigSource,
}

/// Reads and validates a config file. A missing or empty file yields the built-in defaults.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let defaults = |reason: &str| LoadedConfig {
        config: Config::default(),
        source: ConfigSource::Defaults { path: path.to_owned(), reason: reason.into() },
    };
    // Bounded and regular files only: `--config /dev/zero` or a FIFO is an error, not a hang.
    let text = match crate::fsio::read_text_bounded(path, MAX_CONFIG_BYTES, crate::fsio::Links::Follow) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => return Ok(defaults("does not exist")),
        Err(source) => return Err(ConfigError::Unreadable { path: path.to_owned(), source }),
    };
    if text.trim().is_empty() {
        return Ok(defaults("is empty"));
    }
    let (config, mut problems) = parse_best_effort(&text);
    problems.extend(referenced_file_problems(&config, &text));
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { path: path.to_owned(), problems, best_effort: Box::new(config) });
    }
    Ok(LoadedConfig { config, source: ConfigSource::File { path: path.to_owned() } })
}

/// `load` for a reload: a daemon that runs on a file refuses to fall back to the
/// built-in defaults because the file went missing or empty.
pub fn load_for_reload(path: &Path, running: &ConfigSource) -> Result<LoadedConfig, ConfigError> {
    let loaded = load(path)?;
    match (running, &loaded.source) {
        (ConfigSource::File { .. }, ConfigSource::Defaults { path, reason }) => {
            Err(ConfigError::WouldDropFile { path: path.clone(), reason: reason.clone() })
        }
        _ => Ok(loaded),
    }
}

/// Files the config points at that must be valid for it to be: the rule file. So
/// `config check` and `reload` refuse a broken rule file as they refuse a broken key.
fn referenced_file_problems(config: &Config, text: &str) -> Vec<Problem> {
    let Some(rules) = config.understanding.rules_file.as_deref().filter(|p| p.is_absolute()) else {
        return vec![];
    };
    let line = DeTable::parse(text)
        .ok()
        .and_then(|t| span_of_path(t.get_ref(), "understanding.rules_file"))
        .map(|at| line_of(text, at));
    match crate::understanding::rules::load_rules(Some(rules)) {
        Ok(_) => vec![],
        Err(found) => {
            found.into_iter().map(|message| Problem { key: "understanding.rules_file".into(), line, message }).collect()
        }
    }
}

/// The configuration a CLI should act on: the valid file, or its valid keys if it
/// has problems, or the defaults if it cannot be read.
pub fn load_lenient(path: &Path) -> Config {
    match load(path) {
        Ok(loaded) => loaded.config,
        Err(ConfigError::Invalid { best_effort, .. }) => *best_effort,
        Err(_) => Config::default(),
    }
}

/// Parses and validates TOML text, reporting every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let (config, problems) = parse_best_effort(text);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// Every problem in the text, and the configuration its valid keys make.
fn parse_best_effort(text: &str) -> (Config, Vec<Problem>) {
    let (mut table, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // Past a syntax error the recovered table is a guess; typed errors on it would mislead.
        let problems = syntax_errors
            .iter()
            .map(|e| Problem {
                key: String::new(),
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().trim().to_owned(),
            })
            .collect();
        return (Config::default(), problems);
    }
    table.get_mut().make_owned();

    let mut problems = Vec::new();
    let mut config = Config::default();
    for _ in 0..MAX_PRUNE_ROUNDS {
        match Config::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(parsed) => {
                config = parsed;
                break;
            }
            Err(e) => {
                let located = e.span().and_then(|span| locate(table.get_ref(), &span, &[]));
                let message = e.message().trim().to_owned();
                match located {
                    Some((keys, line_at)) => {
                        problems.push(Problem { key: keys.join("."), line: Some(line_of(text, line_at)), message });
                        if !remove_path(table.get_mut(), &keys) {
                            break;
                        }
                    }
                    None => {
                        let line = e.span().map(|s| line_of(text, s.start));
                        problems.push(Problem { key: String::new(), line, message });
                        break;
                    }
                }
            }
        }
    }
    for (key, message) in config.validate() {
        let line = span_of_path(table.get_ref(), &key).map(|at| line_of(text, at));
        problems.push(Problem { key, line, message });
    }
    (config, problems)
}

impl Config {
    /// Range and consistency checks that types alone cannot express.
    /// Returns (dotted key, message) pairs.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                out.push((key.to_owned(), message));
            }
        };
        let (d, c, a, sp, s) = (&self.daemon, &self.control, &self.audiosocket, &self.spool, &self.storage);
        let sp2 = &self.speech;
        let al = &self.alsa;
        let st = &self.store;
        let ranges: [(&str, u64, u64, u64); 32] = [
            ("store.audio_days", u64::from(st.audio_days), 0, 36_500),
            ("store.transcript_days", u64::from(st.transcript_days), 0, 36_500),
            ("store.metadata_days", u64::from(st.metadata_days), 0, 36_500),
            ("store.sweep_interval_mins", st.sweep_interval_mins, 1, 24 * 60),
            ("alsa.channels", u64::from(al.channels), 1, 64),
            ("alsa.sample_rate", u64::from(al.sample_rate), 8000, 48_000),
            ("alsa.period_ms", u64::from(al.period_ms), 5, 200),
            ("alsa.silence_timeout_secs", u64::from(al.silence_timeout_secs), 1, 3600),
            ("speech.min_speech_ms", u64::from(sp2.min_speech_ms), 32, 5000),
            ("speech.min_silence_ms", u64::from(sp2.min_silence_ms), 64, 5000),
            ("speech.speech_pad_ms", u64::from(sp2.speech_pad_ms), 0, 1000),
            ("speech.max_utterance_secs", u64::from(sp2.max_utterance_secs), 1, 30),
            ("speech.asr_workers", u64::from(sp2.asr_workers), 0, 64),
            ("speech.asr_batch", u64::from(sp2.asr_batch), 1, 16),
            ("daemon.shutdown_timeout_secs", d.shutdown_timeout_secs, 1, 600),
            ("daemon.worker_threads", d.worker_threads.unwrap_or(1) as u64, 1, 256),
            ("control.max_request_bytes", c.max_request_bytes as u64, 256, 1024 * 1024),
            ("control.max_connections", c.max_connections as u64, 1, 1024),
            ("control.max_connections_per_uid", c.max_connections_per_uid as u64, 1, 1024),
            ("control.request_timeout_secs", c.request_timeout_secs, 1, 300),
            ("calls.max_concurrent", self.calls.max_concurrent as u64, 1, 1024),
            ("audiosocket.max_frame_bytes", a.max_frame_bytes as u64, 320, 65_535),
            ("audiosocket.idle_timeout_secs", a.idle_timeout_secs, 1, 300),
            ("audiosocket.max_connections_per_peer", a.max_connections_per_peer as u64, 2, 512),
            ("audiosocket.frame_timeout_ms", a.frame_timeout_ms, 100, 60_000),
            ("spool.poll_interval_ms", sp.poll_interval_ms, 100, 60_000),
            ("spool.settle_ms", sp.settle_ms, 0, 600_000),
            ("spool.max_file_mb", sp.max_file_mb, 1, 4096),
            ("storage.check_interval_secs", s.check_interval_secs, 1, 3600),
            ("storage.min_free_mb", s.min_free_mb, 0, 16 * 1024 * 1024),
            ("storage.refuse_calls_below_mb", s.refuse_calls_below_mb, 0, 16 * 1024 * 1024),
            ("storage.stop_audio_below_mb", s.stop_audio_below_mb, 0, 16 * 1024 * 1024),
        ];
        for (key, value, lo, hi) in ranges {
            check((lo..=hi).contains(&value), key, format!("must be between {lo} and {hi}, got {value}"));
        }
        check(
            (0.05..=0.95).contains(&sp2.vad_threshold),
            "speech.vad_threshold",
            format!("must be between 0.05 and 0.95, got {}", sp2.vad_threshold),
        );
        check(
            (1.0..=50.0).contains(&sp2.max_tokens_per_sec),
            "speech.max_tokens_per_sec",
            format!("must be between 1 and 50, got {}", sp2.max_tokens_per_sec),
        );
        check(
            !sp2.encoder_buckets_secs.is_empty() && sp2.encoder_buckets_secs.iter().all(|s| (1..=30).contains(s)),
            "speech.encoder_buckets_secs",
            format!("must list 1 to 30 s windows, got {:?}", sp2.encoder_buckets_secs),
        );
        check(
            (0.0..=10.0).contains(&sp2.hotword_bias),
            "speech.hotword_bias",
            format!("must be between 0 and 10, got {}", sp2.hotword_bias),
        );
        {
            let temps = &sp2.fallback_temperatures;
            let max = crate::speech::decoding::MAX_FALLBACKS;
            check(
                temps.len() <= max
                    && temps.iter().all(|t| (0.05..=1.5).contains(t))
                    && temps.windows(2).all(|w| w[0] < w[1]),
                "speech.fallback_temperatures",
                format!("at most {max} rising temperatures, each between 0.05 and 1.5, got {temps:?}"),
            );
        }
        if let Some(problem) = hotword_problem(&sp2.hotwords) {
            check(false, "speech.hotwords", problem);
        }
        check(
            sp2.campaigns.len() <= MAX_CAMPAIGNS,
            "speech.campaigns",
            format!("at most {MAX_CAMPAIGNS} campaigns, got {}", sp2.campaigns.len()),
        );
        for (name, campaign) in &sp2.campaigns {
            let key = format!("speech.campaigns.{name}");
            if let Err(problem) = check_campaign_name(name) {
                check(false, &key, problem);
            } else if let Some(problem) = hotword_problem(&campaign.hotwords) {
                check(false, &format!("{key}.hotwords"), problem);
            } else if let Some(problem) = hotword_problem(&sp2.hotwords_for(Some(name))) {
                check(false, &format!("{key}.hotwords"), format!("with speech.hotwords: {problem}"));
            }
        }
        let lang_ok = sp2.language == "auto"
            || (2..=3).contains(&sp2.language.len()) && sp2.language.chars().all(|c| c.is_ascii_lowercase());
        check(
            lang_ok,
            "speech.language",
            format!("must be a language code such as \"zh\" or \"auto\", got {:?}", sp2.language),
        );
        let absolute = [
            ("daemon.data_dir", &d.data_dir),
            ("control.socket", &c.socket),
            ("spool.dir", &sp.dir),
            ("speech.models_dir", &sp2.models_dir),
            ("understanding.rules_file", &self.understanding.rules_file),
        ];
        for (key, path) in absolute {
            if let Some(path) = path {
                check(path.is_absolute(), key, format!("must be an absolute path, got {:?}", path));
            }
        }
        if let Some(socket) = &c.socket {
            let len = socket.as_os_str().len();
            check(
                len <= MAX_SOCKET_PATH_BYTES,
                "control.socket",
                format!("is {len} bytes; a Unix socket path may have at most {MAX_SOCKET_PATH_BYTES}"),
            );
        }
        for (key, name) in [("control.technician_group", &c.technician_group), ("control.admin_group", &c.admin_group)]
        {
            check(is_valid_group_name(name), key, format!("{name:?} is not a valid group name"));
        }
        check(
            s.refuse_calls_below_mb <= s.min_free_mb,
            "storage.refuse_calls_below_mb",
            format!(
                "must not exceed storage.min_free_mb ({}): the box reports low space before it refuses calls, got {}",
                s.min_free_mb, s.refuse_calls_below_mb
            ),
        );
        check(
            s.stop_audio_below_mb >= s.refuse_calls_below_mb,
            "storage.stop_audio_below_mb",
            format!(
                "must be at least storage.refuse_calls_below_mb ({}): audio stops being kept before calls are refused, got {}",
                s.refuse_calls_below_mb, s.stop_audio_below_mb
            ),
        );
        let outlives = |longer: u32, shorter: u32| longer == 0 || (shorter != 0 && shorter <= longer);
        check(
            outlives(st.metadata_days, st.transcript_days) && outlives(st.metadata_days, st.audio_days),
            "store.metadata_days",
            format!(
                "must be at least store.transcript_days and store.audio_days (a call's metadata outlives its content; 0 keeps forever), got {} with {} and {}",
                st.metadata_days, st.transcript_days, st.audio_days
            ),
        );
        check(
            (-90.0..=0.0).contains(&al.start_level_dbfs),
            "alsa.start_level_dbfs",
            format!("must be between -90 and 0, got {}", al.start_level_dbfs),
        );
        check(
            al.device.is_none() || !al.map.is_empty(),
            "alsa.map",
            "must map at least one channel to a line and leg when alsa.device is set".into(),
        );
        for (i, m) in al.map.iter().enumerate() {
            check(
                m.channel < al.channels,
                "alsa.map",
                format!("channel {} is beyond alsa.channels = {}", m.channel, al.channels),
            );
            check(
                is_valid_line_name(&m.line),
                "alsa.map",
                format!("line {:?}: use 1 to 32 letters, digits, '-' or '_'", m.line),
            );
            let earlier = &al.map[..i];
            check(
                !earlier.iter().any(|o| o.channel == m.channel),
                "alsa.map",
                format!("channel {} is mapped twice", m.channel),
            );
            check(
                !earlier.iter().any(|o| o.line == m.line && o.leg == m.leg),
                "alsa.map",
                format!("line {:?} has two {} channels", m.line, m.leg.name()),
            );
        }
        for (i, l) in a.listeners.iter().enumerate() {
            let clash = a.listeners[..i].iter().any(|o| o.address == l.address && l.address.port() != 0);
            check(!clash, "audiosocket.listeners", format!("{} is listed twice", l.address));
        }
        check(
            !self.hq.enabled() || st.enabled,
            "hq.brokers",
            "the uplink sends from the call store's outbox: store.enabled must be true".into(),
        );
        out.extend(self.hq.problems());
        out
    }

    /// Keys whose new value only takes effect after a restart, for reload warnings.
    pub fn restart_required_changes(&self, new: &Config) -> Vec<&'static str> {
        let (old, sp, nsp) = (self, &self.speech, &new.speech);
        // Models are loaded and capture opened once at start; speech thresholds and
        // language apply to legs opened after a reload.
        let changed = [
            (old.daemon.data_dir != new.daemon.data_dir, "daemon.data_dir"),
            (old.daemon.worker_threads != new.daemon.worker_threads, "daemon.worker_threads"),
            (old.control.socket != new.control.socket, "control.socket"),
            (old.control.max_connections != new.control.max_connections, "control.max_connections"),
            (
                old.control.max_connections_per_uid != new.control.max_connections_per_uid,
                "control.max_connections_per_uid",
            ),
            (old.audiosocket.listeners != new.audiosocket.listeners, "audiosocket.listeners"),
            (old.spool.dir != new.spool.dir, "spool.dir"),
            (old.store.enabled != new.store.enabled, "store.enabled"),
            (old.store.keep_unmasked != new.store.keep_unmasked, "store.keep_unmasked"),
            (old.hq != new.hq, "hq"),
            (old.alsa != new.alsa, "alsa"),
            (sp.enabled != nsp.enabled, "speech.enabled"),
            (sp.models_dir != nsp.models_dir, "speech.models_dir"),
            (sp.encoder_buckets_secs != nsp.encoder_buckets_secs, "speech.encoder_buckets_secs"),
        ];
        changed.into_iter().filter(|(differs, _)| *differs).map(|(_, key)| key).collect()
    }
}

fn is_valid_line_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// POSIX portable user/group name rules as Debian's adduser enforces them by default.
fn is_valid_group_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn line_of(text: &str, byte_offset: usize) -> usize {
    let end = byte_offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Finds the deepest key whose key or value span holds `span.start`; returns the key
/// path and the offset to report (the key's own position reads best in messages).
fn locate(table: &DeTable<'_>, span: &Range<usize>, prefix: &[String]) -> Option<(Vec<String>, usize)> {
    let hit = |r: &Range<usize>| r.start <= span.start && span.start < r.end.max(r.start + 1);
    for (key, value) in table.iter() {
        let mut path = prefix.to_vec();
        path.push(key.get_ref().to_string());
        // A `[section]` table's own span covers only its header, so look inside
        // every table whatever its span says.
        if let DeValue::Table(inner) = value.get_ref() {
            if let Some(deeper) = locate(inner, span, &path) {
                return Some(deeper);
            }
        }
        if hit(&key.span()) || hit(&value.span()) {
            return Some((path, key.span().start));
        }
    }
    None
}

fn remove_path(table: &mut DeTable<'_>, keys: &[String]) -> bool {
    match keys {
        [] => false,
        [last] => table.remove(last.as_str()).is_some(),
        [first, rest @ ..] => match table.get_mut(first.as_str()).map(Spanned::get_mut) {
            Some(DeValue::Table(inner)) => remove_path(inner, rest),
            _ => false,
        },
    }
}

fn span_of_path(table: &DeTable<'_>, dotted: &str) -> Option<usize> {
    let mut current = table;
    let mut parts = dotted.split('.').peekable();
    while let Some(part) = parts.next() {
        let (key, value) = current.iter().find(|(k, _)| k.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(key.span().start);
        }
        match value.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn empty_and_comment_only_text_gives_defaults() {
        assert_eq!(parse("# nothing here\n").unwrap(), Config::default());
    }

    #[test]
    fn invalid_file_still_yields_its_valid_keys_for_the_cli() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[control]\nsocket = \"/run/x.sock\"\nmax_connections = 0\n").unwrap();
        assert!(matches!(load(&path), Err(ConfigError::Invalid { .. })));
        assert_eq!(load_lenient(&path).control.socket, Some(PathBuf::from("/run/x.sock")));
    }

    #[test]
    fn valid_file_is_read() {
        let cfg = parse("[daemon]\nshutdown_timeout_secs = 3\n[log]\nlevel = \"debug\"\n").unwrap();
        assert_eq!(cfg.daemon.shutdown_timeout_secs, 3);
        assert_eq!(cfg.log.level, LogLevel::Debug);
        assert_eq!(cfg.control, ControlConfig::default());
    }

    #[test]
    fn every_kind_of_problem_is_reported_at_once_with_key_and_line() {
        let text = "\
[daemon]
shutdown_timeout_secs = 0
colour = \"blue\"

[control]
max_request_bytes = \"big\"
admin_group = \"Root Users\"

[log]
level = \"loud\"

[audio]
device = \"hw:0\"
";
        let problems = parse(text).unwrap_err();
        let mut found = keys(&problems);
        found.sort();
        assert_eq!(
            found,
            vec![
                "audio",
                "control.admin_group",
                "control.max_request_bytes",
                "daemon.colour",
                "daemon.shutdown_timeout_secs",
                "log.level"
            ],
            "{problems:#?}"
        );
        let line_of_key = |k: &str| problems.iter().find(|p| p.key == k).and_then(|p| p.line);
        assert_eq!(line_of_key("daemon.shutdown_timeout_secs"), Some(2));
        assert_eq!(line_of_key("daemon.colour"), Some(3));
        assert_eq!(line_of_key("control.max_request_bytes"), Some(6));
        assert_eq!(line_of_key("control.admin_group"), Some(7));
        assert_eq!(line_of_key("log.level"), Some(10));
        assert_eq!(line_of_key("audio"), Some(12));
        let colour = problems.iter().find(|p| p.key == "daemon.colour").unwrap();
        assert!(colour.message.contains("unknown field"), "{colour:?}");
    }

    #[test]
    fn syntax_errors_are_all_reported_with_lines() {
        let problems = parse("[daemon\nshutdown_timeout_secs = = 3\n").unwrap_err();
        assert!(!problems.is_empty());
        assert!(problems.iter().all(|p| p.line.is_some()), "{problems:#?}");
        assert_eq!(problems[0].line, Some(1));
    }

    #[test]
    fn socket_path_longer_than_sun_path_is_refused() {
        let long = format!("/run/{}/control.sock", "x".repeat(120));
        let problems = parse(&format!("[control]\nsocket = {long:?}\n")).unwrap_err();
        assert_eq!(keys(&problems), vec!["control.socket"]);
        assert!(problems[0].message.contains("at most 107"));
    }

    #[test]
    fn relative_paths_are_refused() {
        let problems = parse("[daemon]\ndata_dir = \"var/lib\"\n[control]\nsocket = \"x.sock\"\n").unwrap_err();
        assert_eq!(keys(&problems), vec!["daemon.data_dir", "control.socket"]);
    }

    #[test]
    fn hotword_lists_are_bounded_and_printable() {
        let ok = parse("[speech]\nhotwords = [\"房地产\", \"Callbox\"]\nhotword_mode = \"prompt\"\n").unwrap();
        assert_eq!(ok.speech.hotwords.len(), 2);
        assert_eq!(ok.speech.hotword_mode, crate::speech::hotwords::HotwordMode::Prompt);
        let long = "x".repeat(33);
        for bad in [
            format!("hotwords = [\"{long}\"]"),
            "hotwords = [\" \"]".to_owned(),
            "hotwords = [\"a\\u0007b\"]".to_owned(),
            format!("hotwords = [{}]", vec!["\"a\""; 65].join(", ")),
        ] {
            let problems = parse(&format!("[speech]\n{bad}\n")).unwrap_err();
            assert_eq!(keys(&problems), vec!["speech.hotwords"], "{bad}");
        }
        let problems = parse("[speech]\nhotword_bias = 11.0\nhotword_mode = \"shout\"\n").unwrap_err();
        let mut found = keys(&problems);
        found.sort_unstable();
        assert_eq!(found, vec!["speech.hotword_bias", "speech.hotword_mode"]);
    }

    #[test]
    fn a_campaign_adds_its_own_terms_to_the_common_ones() {
        let text =
            "[speech]\nhotwords = [\"房地产\"]\n[speech.campaigns.autumn-loans]\nhotwords = [\"安心贷\", \"房地产\"]\n\
                    [speech.campaigns.\"秋季 保险\"]\nhotwords = [\"平安福\"]\n";
        let speech = parse(text).unwrap().speech;
        assert_eq!(speech.hotwords_for(Some("autumn-loans")), ["房地产", "安心贷"]);
        assert_eq!(speech.for_campaign(Some("秋季 保险")).decode_options().hotwords, ["房地产", "平安福"]);
        assert_eq!(speech.hotwords_for(Some("unknown")), ["房地产"]);
        assert_eq!(speech.hotwords_for(None), ["房地产"]);

        let sixty = (0..60).map(|i| format!("\"t{i}\"")).collect::<Vec<_>>().join(", ");
        let five = (0..5).map(|i| format!("\"c{i}\"")).collect::<Vec<_>>().join(", ");
        for (bad, key) in [
            (
                format!("[speech]\nhotwords = [{sixty}]\n[speech.campaigns.a]\nhotwords = [{five}]\n"),
                "speech.campaigns.a.hotwords",
            ),
            ("[speech.campaigns.a]\nhotwords = [\" \"]\n".to_owned(), "speech.campaigns.a.hotwords"),
            (
                format!("[speech.campaigns.{}]\nhotwords = []\n", "x".repeat(65)),
                &*format!("speech.campaigns.{}", "x".repeat(65)),
            ),
            ("[speech.campaigns.a]\nterms = [\"x\"]\n".to_owned(), "speech.campaigns.a.terms"),
        ] {
            let problems = parse(&bad).unwrap_err();
            assert_eq!(keys(&problems), vec![key], "{bad}");
        }
    }

    #[test]
    fn fallback_temperatures_are_few_rising_and_bounded() {
        let ok = parse("[speech]\nfallback_temperatures = [0.2, 0.6]\n").unwrap();
        assert_eq!(ok.speech.fallback_temperatures, vec![0.2, 0.6]);
        assert_eq!(ok.speech.decode_options().fallback_temperatures, vec![0.2, 0.6]);
        assert!(parse("[speech]\nfallback_temperatures = []\n").unwrap().speech.fallback_temperatures.is_empty());
        for bad in ["[0.0]", "[0.4, 0.2]", "[2.0]", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]"] {
            let problems = parse(&format!("[speech]\nfallback_temperatures = {bad}\n")).unwrap_err();
            assert_eq!(keys(&problems), vec!["speech.fallback_temperatures"], "{bad}");
        }
    }

    #[test]
    fn missing_and_empty_files_give_defaults_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let loaded = load(&missing).unwrap();
        assert_eq!(loaded.config, Config::default());
        assert!(matches!(loaded.source, ConfigSource::Defaults { ref reason, .. } if reason == "does not exist"));
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "\n\n").unwrap();
        assert!(
            matches!(load(&empty).unwrap().source, ConfigSource::Defaults { ref reason, .. } if reason == "is empty")
        );
    }

    #[test]
    fn oversized_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            load(&big),
            Err(ConfigError::Unreadable { source: crate::fsio::ReadError::TooLarge { .. }, .. })
        ));
        // Neither a device nor a FIFO is read (the old code read /dev/zero until OOM).
        assert!(matches!(
            load(Path::new("/dev/zero")),
            Err(ConfigError::Unreadable { source: crate::fsio::ReadError::NotRegular { .. }, .. })
        ));
    }

    #[test]
    fn a_daemon_on_a_file_does_not_reload_from_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callbox.toml");
        let on_file = ConfigSource::File { path: path.clone() };
        assert!(matches!(load_for_reload(&path, &on_file), Err(ConfigError::WouldDropFile { .. })));
        std::fs::write(&path, "  \n").unwrap();
        let refused = load_for_reload(&path, &on_file).unwrap_err();
        assert!(refused.to_string().contains("is empty"), "{refused}");
        // A daemon that started on defaults may keep doing so.
        let on_defaults = ConfigSource::Defaults { path: path.clone(), reason: "does not exist".into() };
        assert!(load_for_reload(&path, &on_defaults).is_ok());
    }

    #[test]
    fn alsa_channel_map_is_checked_against_the_device() {
        let text =
            "[alsa]\ndevice = \"hw:0\"\nchannels = 2\nmap = [\n{ channel = 0, line = \"1\", leg = \"agent\" },\n\
            { channel = 0, line = \"1\", leg = \"customer\" },\n{ channel = 2, line = \"a b\", leg = \"agent\" },\n\
            { channel = 1, line = \"1\", leg = \"agent\" }]\n";
        let problems = parse(text).unwrap_err();
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(problems.iter().all(|p| p.key == "alsa.map"), "{problems:#?}");
        for expected in ["channel 0 is mapped twice", "beyond alsa.channels = 2", "line \"a b\"", "two agent channels"]
        {
            assert!(messages.iter().any(|m| m.contains(expected)), "{expected}: {messages:?}");
        }
        let unmapped = parse("[alsa]\ndevice = \"hw:0\"\n").unwrap_err();
        assert!(unmapped[0].message.contains("at least one channel"), "{unmapped:?}");
        let ok = parse("[alsa]\ndevice = \"hw:0\"\nmap = [{ channel = 1, line = \"sales-3\", leg = \"customer\" }]\n");
        assert_eq!(ok.unwrap().alsa.map[0].line, "sales-3");
    }

    #[test]
    fn restart_required_changes_are_named() {
        let old = Config::default();
        let mut new = old.clone();
        new.control.socket = Some("/run/other.sock".into());
        new.log.level = LogLevel::Debug;
        assert_eq!(old.restart_required_changes(&new), vec!["control.socket"]);
    }

    /// Collects dotted paths of every leaf key in a TOML table.
    fn leaf_paths(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(t) => leaf_paths(t, &path, out),
                _ => out.push(path),
            }
        }
    }

    #[test]
    fn installed_default_file_is_valid_and_documents_every_key() {
        let installed = include_str!("../../packaging/callbox.toml");
        let parsed = parse(installed).expect("packaging/callbox.toml must be valid");
        // Defaults in the installed file match the built-in ones except for the
        // explicit system paths the file spells out.
        assert_eq!(parsed.log, LogConfig::default());
        assert_eq!(parsed.storage, StorageConfig::default());
        assert_eq!(parsed.daemon.shutdown_timeout_secs, DaemonConfig::default().shutdown_timeout_secs);

        let mut every = Config::default();
        every.daemon.data_dir = Some("/x".into());
        every.daemon.worker_threads = Some(1);
        every.control.socket = Some("/x".into());
        every.audiosocket.listeners =
            vec![AudioSocketListener { address: "127.0.0.1:9092".parse().unwrap(), leg: crate::audio::Leg::Customer }];
        every.audiosocket.allowed_peers = vec!["127.0.0.1".parse().unwrap()];
        every.spool.dir = Some("/x".into());
        every.alsa.device = Some("hw:0".into());
        every.understanding.rules_file = Some("/x".into());
        every.alsa.map = vec![AlsaChannel { channel: 0, line: "1".into(), leg: crate::audio::Leg::Agent }];
        let every: toml::Table = toml::from_str(&toml::to_string(&every).unwrap()).unwrap();
        let mut wanted = Vec::new();
        leaf_paths(&every, "", &mut wanted);

        // Commented-out keys count as documented: strip one leading "# " per line.
        let uncommented: String = installed
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|rest| rest.contains(" = ")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let documented: toml::Table = toml::from_str(&uncommented).expect("uncommented file parses");
        let mut have = Vec::new();
        leaf_paths(&documented, "", &mut have);
        let missing: Vec<_> = wanted.iter().filter(|k| !have.contains(k)).collect();
        assert!(missing.is_empty(), "keys not documented in packaging/callbox.toml: {missing:?}");
    }

    #[test]
    fn the_hq_section_is_checked_whole_and_never_sends_in_clear_over_a_network() {
        let problems = |text: &str| -> Vec<String> {
            match parse(text) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.iter().map(ToString::to_string).collect(),
            }
        };
        assert!(problems("[hq]\n").is_empty(), "off by default");
        let p = problems(
            "[hq]\nbrokers = [\"mqtt://10.0.0.5:1883\", \"mqtts://hq\"]\nsite = \"a/b\"\nkeepalive_secs = 1\n",
        );
        let text = p.join("\n");
        for expected in
            ["sends in clear", "hq.site", "hq.box_id", "hq.ca_file", "hq.cert_file", "hq.key_file", "hq.keepalive_secs"]
        {
            assert!(text.contains(expected), "{expected} missing in:\n{text}");
        }
        let ok = "[hq]\nbrokers = [\"mqtt://127.0.0.1:1883\"]\nsite = \"s1\"\nbox_id = \"b1\"\n";
        assert!(problems(ok).is_empty(), "{:?}", problems(ok));
        let no_store = format!("{ok}[store]\nenabled = false\n");
        assert!(problems(&no_store).join(" ").contains("store.enabled must be true"));
        assert_eq!(BrokerUrl::parse("mqtts://hq.example").map(|b| b.port), Ok(8883));
        assert_eq!(BrokerUrl::parse("mqtts://[::1]:9").map(|b| (b.host, b.port)), Ok(("::1".into(), 9)));
        assert!(BrokerUrl::parse("http://x").is_err() && BrokerUrl::parse("mqtts://x:0").is_err());
    }
}
