//! The `callbox` command line: the daemon (`run`) and the technician commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{self, ConfigSource};
use crate::control::client::{self, ask, refused, unexpected, ClientError};
use crate::control::protocol::{ReloadReport, Request, Response, StatusReport};
use crate::doctor::{self, Verdict};
use crate::exit::{self, Failure};
use crate::paths::{PathEnv, DEFAULT_CONFIG_PATH};
use crate::render::{print_json, show};

#[derive(Debug, Parser)]
#[command(
    name = "callbox",
    version,
    about = "Call-analysis appliance daemon and its technician CLI",
    long_about = "callbox runs beside the PBX: it takes call audio in, transcribes and \
                  classifies it, and raises real-time events. `callbox run` is the daemon \
                  (started by systemd); the other commands talk to it through its local \
                  control socket or check the installation.",
    after_help = "Exit codes: 0 ok, 1 a check failed, 64 usage, 69 daemon not reachable, \
                  70 a component failed, 71 OS resource unavailable, 75 shutdown deadline \
                  passed, 76 protocol error, 77 permission denied, 78 invalid config, \
                  130 forced exit on a second signal."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "CALLBOX_CONFIG", default_value = DEFAULT_CONFIG_PATH, value_name = "PATH")]
    pub config: PathBuf,
    /// Control socket of the daemon to talk to (default: from the config, else the system daemon's).
    #[arg(long, global = true, env = "CALLBOX_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd: Type=notify).
    Run {
        /// Run as root even on a data directory that belongs to another user (the
        /// service's): files it creates there will be root's.
        #[arg(long)]
        as_root: bool,
    },
    /// Show the main job on a sample call: a private daemon takes a two-leg call over
    /// AudioSocket in real time and prints what it understood, live.
    Demo {
        /// Stereo WAV to stream (agent left, customer right; default: the sample call
        /// `models/build.sh` makes beside the models).
        #[arg(long, value_name = "FILE")]
        call: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
        /// Language the sample is spoken in ("auto" to detect).
        #[arg(long, value_name = "LANG", default_value = "en")]
        lang: String,
        /// AudioSocket sample rate: 16000 (slin16) or 8000 (narrowband telephone).
        #[arg(long, value_name = "HZ", default_value_t = 16000)]
        rate: u32,
        /// One JSON object per line: the daemon's monitor items with latency_secs.
        #[arg(long)]
        json: bool,
    },
    /// Follow the running daemon's calls: utterances (masked), intents, events, call ends.
    Watch {
        /// The monitor items as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// A customer's tags across calls, looked up by caller number (kept only as a keyed
    /// hash); `customer forget NUMBER` erases them (admins).
    #[command(args_conflicts_with_subcommands = true)]
    Customer {
        #[command(subcommand)]
        action: Option<crate::cli_store::CustomerCommand>,
        #[arg(value_name = "NUMBER", required = true)]
        number: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stored calls (the encrypted call store): list, show, export.
    #[command(subcommand)]
    Calls(crate::cli_store::CallsCommand),
    /// The call store's tamper-evident audit trail: verify, show.
    #[command(subcommand)]
    Audit(crate::cli_store::AuditCommand),
    /// The call store's master key: rotate.
    #[command(subcommand)]
    Keys(crate::cli_store::KeysCommand),
    /// The call store: stats.
    #[command(subcommand)]
    Store(crate::cli_store::StoreCommand),
    /// The headquarters uplink: status, outbox; `hq listen` acts as HQ.
    #[command(subcommand)]
    Hq(crate::cli_hq::HqCommand),
    /// Show version, uptime, configuration and component health of the running daemon.
    Status {
        /// Print the daemon's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon re-read its configuration (admins only).
    Reload {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start or stop a call on an ALSA capture line, or tell the daemon a call's caller and
    /// outcome (for PBX hooks and technicians).
    #[command(subcommand)]
    Call(CallCommand),
    /// Validate or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check a compliance/business rule file (every problem at once; exit 78 if any).
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Check the installation on site: config, data directory, clock, daemon.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Transcribe WAV recordings offline: VAD, ASR and prosody per leg, as the daemon does.
    Transcribe {
        /// WAV files (PCM16, µ-law or A-law; 8-48 kHz; mono or stereo = agent left).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// One JSON object per file.
        #[arg(long)]
        json: bool,
        /// Language code or "auto" (default: speech.language from the config).
        #[arg(long, value_name = "LANG")]
        lang: Option<String>,
        /// Models folder (default: speech.models_dir, $CALLBOX_MODELS_DIR, /usr/share/callbox/models).
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
    },
    /// Analyse calls offline: utterances (masked), customer intents, rule hits and events.
    Analyze {
        /// WAV recordings (stereo: agent left), transcripts as JSON lines (leg, start_secs,
        /// end_secs, text), or folders of them.
        #[arg(required = true, value_name = "FILE|DIR")]
        files: Vec<PathBuf>,
        /// One JSON object per call.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
        /// Rule file (default: the shipped rules, packaging/rules.toml).
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
    },
    /// Classify utterances into intents (label, confidence, top 3), as the daemon does.
    Classify {
        /// The utterance (words are joined with spaces).
        #[arg(value_name = "TEXT", required_unless_present = "file")]
        text: Vec<String>,
        /// One utterance per line instead; one result per line out.
        #[arg(long, value_name = "FILE", conflicts_with = "text")]
        file: Option<PathBuf>,
        /// One JSON object per utterance.
        #[arg(long)]
        json: bool,
        /// Models folder (default: speech.models_dir, $CALLBOX_MODELS_DIR, /usr/share/callbox/models).
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
    },
    /// Measure the speech path on this machine and print the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write man pages for callbox and each subcommand into a directory.
    #[command(hide = true)]
    Manpages {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Intent classification latency per utterance (featurize + model) on one core.
    Intent {
        /// One utterance per line (default: the model's held-out split, models/cache/intent/eval.tsv).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
    },
    /// ASR speed per recording: encoder and decoder time, real-time factor, at 16 kHz and
    /// as 8 kHz µ-law telephone audio.
    Asr {
        /// WAV files (default: the recordings in ../shared/data/speech listed in transcripts.tsv).
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Runs per file (the first is reported separately as warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
        /// Each file's first channel as one utterance, without VAD (cut at the largest
        /// bucket); JSON rows then carry the token ids, for models/whisper/compare_runtimes.py.
        #[arg(long)]
        whole: bool,
        /// Also decode every clip as one window, in groups of N decoded together (as the
        /// ASR scheduler batches waiting utterances), against one at a time: time and text.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        batch: u16,
    },
    /// The real daemon under steady load for N minutes: two-leg AudioSocket calls (the
    /// sample call, both legs talking in turns) streamed in real time on loopback, the
    /// daemon's RSS and utterance latency printed every minute; with bounds, exit 1 when
    /// one is broken (peak RSS, growth after every slot has run a call, a call that did not finish).
    Soak {
        #[arg(long, default_value_t = 60)]
        minutes: u32,
        /// Simultaneous calls (call slots, staggered over one call's length).
        #[arg(long, default_value_t = 4)]
        calls: usize,
        /// AudioSocket sample rate: 8000 (slin) or 16000 (slin16).
        #[arg(long, default_value_t = 8000)]
        rate: u32,
        /// The two-leg (stereo) call to stream (default: the models' sample call).
        #[arg(long, value_name = "WAV")]
        call: Option<PathBuf>,
        #[arg(long, default_value = "en")]
        language: String,
        #[arg(long, value_name = "MB")]
        max_rss_mb: Option<f64>,
        #[arg(long, value_name = "PERCENT")]
        max_growth_pct: Option<f64>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
    },
    /// How many simultaneous two-leg calls this box carries: a private daemon takes N calls
    /// at once over AudioSocket (streamed in real time, the legs talking in turns), N
    /// doubling until utterance end → understood p99 breaks the budget, then the gap
    /// halved. Run it when the box carries no calls; `--save` makes the daemon hold
    /// admission to the result (<data dir>/capacity.json, read at start and on reload).
    Capacity {
        /// Mono WAV clips that take turns on the two legs (default: the models' sample call).
        #[arg(long, value_name = "DIR", conflicts_with = "call")]
        clips: Option<PathBuf>,
        /// A stereo two-leg call (agent left, customer right) instead.
        #[arg(long, value_name = "WAV")]
        call: Option<PathBuf>,
        /// AudioSocket sample rate: 8000 (slin) or 16000 (slin16).
        #[arg(long, default_value_t = 8000)]
        rate: u32,
        #[arg(long, default_value = "en")]
        language: String,
        /// The p99 of utterance end → understood utterance a step must keep, seconds.
        #[arg(long, default_value_t = 1.5)]
        budget_secs: f64,
        /// How long each step streams (at least two calls' length).
        #[arg(long, default_value_t = 90)]
        step_secs: u64,
        #[arg(long, default_value_t = 1)]
        start: usize,
        #[arg(long, default_value_t = 64)]
        max_calls: usize,
        /// Save the rating in the daemon's data directory.
        #[arg(long)]
        save: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        models: Option<PathBuf>,
    },
    /// The encrypted call store: calls written per second (durably, each with its
    /// utterances) and the latency of one call's audited, decrypted read.
    Store {
        /// Where to put the throw-away store (default: a new folder in the temp folder).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        #[arg(long, default_value_t = 20)]
        utterances: usize,
        #[arg(long, default_value_t = 500)]
        reads: usize,
        /// Calls per transaction (group commit); 1 = a transaction per call.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Stream calls as the daemon does instead: through the store thread, this many
        /// calls at a time, one utterance per write; the store in --dir is kept and added to.
        #[arg(long, value_name = "CALLS", requires = "dir")]
        stream: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// The headquarters outbox: messages per second to a broker and back (HQ acks after
    /// its commit), and alert latency (event → HQ) while a backlog drains.
    Outbox {
        /// The broker (mqtt://127.0.0.1:PORT: a local mosquitto); with mqtts:// both ends
        /// use the one identity given.
        #[command(flatten)]
        broker: crate::cli_hq::BrokerArgs,
        /// Call summaries queued before the link starts (the backlog).
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// Alerts raised while the backlog drains.
        #[arg(long, default_value_t = 200)]
        alerts: usize,
        #[arg(long, default_value_t = 10)]
        alert_every_ms: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallCommand {
    /// A call begins on LINE (an alsa.map line name); prints its call id.
    Start {
        line: String,
        #[arg(long)]
        json: bool,
    },
    /// The call on LINE ends.
    Stop {
        line: String,
        #[arg(long)]
        json: bool,
    },
    /// For the PBX/CRM sidecar: who the caller of CALL (its id) is, its campaign, and
    /// whether it converted.
    Info {
        #[arg(value_name = "CALL")]
        call: String,
        /// The caller number; the daemon keeps only its keyed hash.
        #[arg(long, value_name = "NUMBER")]
        caller: Option<String>,
        /// The call's campaign: kept with the call, and the ASR favours the campaign's
        /// hotwords (`[speech.campaigns.NAME]`) from the call's next utterance on.
        #[arg(long, value_name = "NAME")]
        campaign: Option<String>,
        /// The call ended in a sale (tags the customer `converted`).
        #[arg(long)]
        converted: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Parse and compile FILE: synonyms resolved, regexes compiled, ids unique.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Report every problem in the configuration file at once (exit 78 if invalid).
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (file merged over defaults) as TOML.
    Show,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => exit::OK,
                _ => exit::USAGE,
            };
        }
    };
    match cli.command {
        Command::Run { as_root } => crate::daemon::run(&cli.config, as_root),
        Command::Demo { ref call, ref models, ref lang, rate, json } => crate::demo::run(
            &cli.config,
            crate::demo::DemoOptions { call: call.clone(), models: models.clone(), language: lang.clone(), rate, json },
        ),
        Command::Watch { json } => watch(&socket_for(&cli), json).unwrap_or_else(Failure::report),
        Command::Customer { action: Some(crate::cli_store::CustomerCommand::Forget { ref number, json }), .. } => {
            crate::cli_store::customer_forget(&socket_for(&cli), number, json).unwrap_or_else(Failure::report)
        }
        Command::Customer { action: None, ref number, json } => {
            customer_request(&socket_for(&cli), Request::Customer { caller: number.clone().unwrap_or_default() }, json)
                .unwrap_or_else(Failure::report)
        }
        Command::Calls(ref command) => {
            crate::cli_store::calls(&socket_for(&cli), command).unwrap_or_else(Failure::report)
        }
        Command::Audit(ref command) => {
            crate::cli_store::audit(&socket_for(&cli), command).unwrap_or_else(Failure::report)
        }
        Command::Keys(ref command) => {
            crate::cli_store::keys(&socket_for(&cli), command).unwrap_or_else(Failure::report)
        }
        Command::Store(ref command) => {
            crate::cli_store::store(&socket_for(&cli), command).unwrap_or_else(Failure::report)
        }
        Command::Hq(ref command) => crate::cli_hq::hq(&socket_for(&cli), command).unwrap_or_else(Failure::report),
        Command::Call(CallCommand::Info { ref call, ref caller, ref campaign, converted, json }) => customer_request(
            &socket_for(&cli),
            Request::CallInfo {
                call: call.clone(),
                caller: caller.clone(),
                campaign: campaign.clone(),
                converted: converted.then_some(true),
            },
            json,
        )
        .unwrap_or_else(Failure::report),
        Command::Status { json } => status(&socket_for(&cli), json).unwrap_or_else(Failure::report),
        Command::Reload { json } => reload(&socket_for(&cli), json).unwrap_or_else(Failure::report),
        Command::Call(CallCommand::Start { ref line, json }) => {
            call_request(&socket_for(&cli), Request::CallStart { line: line.clone() }, json)
                .unwrap_or_else(Failure::report)
        }
        Command::Call(CallCommand::Stop { ref line, json }) => {
            call_request(&socket_for(&cli), Request::CallStop { line: line.clone() }, json)
                .unwrap_or_else(Failure::report)
        }
        Command::Config(ConfigCommand::Check { json }) => config_check(&cli.config, json),
        Command::Rules(RulesCommand::Check { ref file }) => rules_check(file),
        Command::Config(ConfigCommand::Show) => config_show(&cli.config),
        Command::Doctor { json } => doctor(&cli, json),
        Command::Transcribe { ref files, json, ref lang, ref models } => {
            crate::offline::transcribe(&cli.config, files, json, lang.as_deref(), models.as_deref())
                .unwrap_or_else(Failure::report)
        }
        Command::Analyze { ref files, json, ref models, ref rules } => {
            crate::offline::analyze(&cli.config, files, json, models.as_deref(), rules.as_deref())
                .unwrap_or_else(Failure::report)
        }
        Command::Classify { ref text, ref file, json, ref models } => {
            crate::offline::classify(&cli.config, text, file.as_deref(), json, models.as_deref())
                .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Intent { ref file, runs, json, ref models }) => {
            crate::offline::bench_intent(&cli.config, file.as_deref(), runs, json, models.as_deref())
                .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Asr { ref files, runs, json, ref models, whole, batch }) => {
            crate::offline::bench_asr(&cli.config, files, runs, json, models.as_deref(), whole, usize::from(batch))
                .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Soak {
            minutes,
            calls,
            rate,
            ref call,
            ref language,
            max_rss_mb,
            max_growth_pct,
            json,
            ref models,
        }) => {
            let (models, call) = crate::offline::soak_inputs(&cli.config, models.as_deref(), call.as_deref());
            crate::offline::bench_soak(&crate::offline::BenchSoak {
                minutes,
                calls,
                rate,
                models,
                call,
                language: language.clone(),
                max_rss_mb,
                max_growth_pct,
                json,
            })
            .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Capacity {
            ref clips,
            ref call,
            rate,
            ref language,
            budget_secs,
            step_secs,
            start,
            max_calls,
            save,
            json,
            ref models,
        }) => {
            let (models, sample_call) = crate::offline::soak_inputs(&cli.config, models.as_deref(), call.as_deref());
            let config = crate::config::load_lenient(&cli.config);
            let source = match clips {
                Some(dir) => crate::offline::CallSource::Clips(dir.clone()),
                None => crate::offline::CallSource::Stereo(sample_call),
            };
            let save_to = save.then(|| {
                config.daemon.data_dir.clone().unwrap_or_else(|| crate::paths::PathEnv::from_process().data_dir())
            });
            crate::offline::bench_capacity(&crate::offline::BenchCapacity {
                source,
                rate,
                language: language.clone(),
                models,
                asr_workers: config.speech.asr_workers,
                asr_batch: config.speech.asr_batch,
                budget_secs,
                step_secs,
                start,
                max_calls,
                save_to,
                json,
            })
            .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Outbox { ref broker, messages, alerts, alert_every_ms, json }) => {
            crate::offline::bench_outbox(&crate::offline::BenchOutbox {
                broker: broker.broker.clone(),
                ca: broker.ca.clone(),
                cert: broker.cert.clone(),
                key: broker.key.clone(),
                messages,
                alerts,
                alert_every_ms,
                json,
            })
            .unwrap_or_else(Failure::report)
        }
        Command::Bench(BenchCommand::Store { ref dir, calls, utterances, reads, batch, stream, json }) => {
            match (stream, dir) {
                (Some(concurrent), Some(dir)) => {
                    crate::offline::bench_store_stream(dir, calls, utterances, concurrent, json)
                }
                _ => crate::offline::bench_store(dir.as_deref(), calls, utterances, reads, batch, json),
            }
            .unwrap_or_else(Failure::report)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let out = &mut std::io::stdout();
            match shell {
                Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "callbox", out),
                Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "callbox", out),
                Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "callbox", out),
            }
            exit::OK
        }
        Command::Manpages { out_dir } => {
            match std::fs::create_dir_all(&out_dir).and_then(|()| clap_mangen::generate_to(Cli::command(), &out_dir)) {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("callbox: cannot write man pages to {}: {e}", out_dir.display());
                    exit::FAILURE
                }
            }
        }
    }
}

/// The socket to reach: `--socket`, else the config's, else the first that exists
/// of the system daemon's and the caller's own.
fn socket_for(cli: &Cli) -> PathBuf {
    if let Some(socket) = &cli.socket {
        return socket.clone();
    }
    let configured = match config::load(&cli.config) {
        Ok(loaded) => loaded.config.control.socket,
        Err(config::ConfigError::Invalid { best_effort, .. }) => best_effort.control.socket,
        // A file that cannot be read at all (not UTF-8, a device): say so, or the user
        // reads "not running" about a daemon that may well be.
        Err(e) => {
            eprintln!("callbox: warning: {e}; trying the default control socket");
            None
        }
    };
    if let Some(socket) = configured {
        return socket;
    }
    let candidates = PathEnv::from_process().client_socket_candidates();
    candidates.iter().find(|p| p.exists()).unwrap_or(&candidates[0]).clone()
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::new(e.exit_code(), e.to_string())
    }
}

/// The daemon said no: its reason, and the exit code for the kind of refusal.
fn status(socket: &Path, json: bool) -> Result<u8, Failure> {
    let report = match ask(socket, Request::Status {})? {
        Response::Status(report) => report,
        other => return Err(unexpected(&other)),
    };
    show(&report, json, |r| render_status(r));
    Ok(exit::OK)
}

fn render_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let uptime = r.uptime_secs;
    let state = match r.state {
        crate::control::protocol::DaemonState::Running => "running",
        crate::control::protocol::DaemonState::Stopping => "stopping",
    };
    out += &format!(
        "callbox {} {state} (pid {}), up {}h {:02}m {:02}s since {}\n",
        r.version,
        r.pid,
        uptime / 3600,
        (uptime % 3600) / 60,
        uptime % 60,
        r.started_at
    );
    out += &format!("config:     {} (generation {})\n", r.config, r.config_generation);
    if let Some(reload) = &r.last_reload {
        out += &format!(
            "last reload: {} {}\n",
            reload.at,
            if reload.ok { "ok" } else { "FAILED, previous configuration kept" }
        );
        for p in &reload.problems {
            out += &format!("  {p}\n");
        }
    }
    out += &format!("socket:     {}\n", r.control_socket);
    out += &format!("data dir:   {}\n", r.data_dir);
    out += &format!("log level:  {} ({})\n", r.log_level, if r.log_to_journal { "journal" } else { "stderr" });
    let watchdog = r.watchdog_interval_ms.map(|ms| format!("ping every {ms} ms")).unwrap_or_else(|| "off".into());
    out += &format!("systemd:    notify {}, watchdog {watchdog}\n", if r.systemd_notify { "on" } else { "off" });
    if !r.audiosocket_listeners.is_empty() {
        out += &format!("audiosocket: {}\n", r.audiosocket_listeners.join(", "));
    }
    out += &format!(
        "calls:      {} active of at most {} ({}), {} since start, {} refused ({} at the limit)\n",
        r.calls.active.len(),
        r.calls.max_calls,
        r.calls.limit_source,
        r.calls.total_started,
        r.calls.total_refused,
        r.calls.refused_at_capacity
    );
    if let Some(warning) = &r.calls.limit_warning {
        out += &format!("            warning: {warning}\n");
    }
    for call in &r.calls.active {
        let legs: Vec<String> = call
            .legs
            .iter()
            .map(|l| {
                format!(
                    "{:?} {}.{:03}s{}",
                    l.leg,
                    l.audio_ms / 1000,
                    l.audio_ms % 1000,
                    if l.open { "" } else { " (closed)" }
                )
            })
            .collect();
        out += &format!("  {}  {}\n", call.call, legs.join(", ").to_lowercase());
    }
    if let Some(sp) = &r.speech {
        out += &format!(
            "speech:     models {}; {} legs open, {} in all; {} utterances; {:.1} s of audio in ended legs, {:.1} s of ASR; {} errors\n",
            sp.models_dir, sp.legs_open, sp.legs_total, sp.utterances, sp.audio_secs, sp.asr_secs, sp.errors
        );
        let q = &sp.asr_queue;
        out += &format!(
            "asr queue:  {} of {} workers busy, {} utterances waiting (oldest {:.2} s); longest wait so far {:.2} s; \
             up to {} decoded together (most so far {})\n",
            q.busy, q.slots, q.waiting, q.oldest_wait_secs, q.max_wait_secs, q.batch_limit, q.largest_batch
        );
    }
    out += "components:\n";
    for c in &r.components {
        out += &format!("  {:<10} {:<9} {} (since {})\n", c.name, c.state.as_str(), c.detail, c.since);
    }
    out += &format!("you:        uid {}, {:?}\n", r.caller.uid, r.caller.role).to_lowercase();
    out
}

fn rules_check(file: &Path) -> u8 {
    match crate::understanding::rules::load_rules(Some(file)) {
        Ok(set) => {
            println!("{}: {} rules, valid", file.display(), set.len());
            exit::OK
        }
        Err(problems) => {
            eprintln!("{} problem(s) in {}:", problems.len(), file.display());
            for p in problems {
                eprintln!("  {p}");
            }
            exit::CONFIG
        }
    }
}

fn call_request(socket: &Path, request: Request, json: bool) -> Result<u8, Failure> {
    let reply = match ask(socket, request)? {
        Response::Call(reply) => reply,
        other => return Err(unexpected(&other)),
    };
    show(&reply, json, |r| {
        format!("call {} {} on line {}\n", r.call, if r.started { "started" } else { "ended" }, r.line)
    });
    Ok(exit::OK)
}

fn customer_request(socket: &Path, request: Request, json: bool) -> Result<u8, Failure> {
    let reply = match ask(socket, request)? {
        Response::Customer(reply) => reply,
        other => return Err(unexpected(&other)),
    };
    show(&reply, json, |r| render_customer(r.customer.as_ref()));
    Ok(exit::OK)
}

fn render_customer(customer: Option<&crate::control::protocol::CustomerRecord>) -> String {
    let stamp = |ms| crate::logging::utc_timestamp(unix_ms(ms));
    let Some(c) = customer else { return "no customer known\n".into() };
    let mut out = format!(
        "customer {} ({} calls; first {}, last {})\n",
        c.customer,
        c.calls,
        stamp(c.first_unix_ms),
        stamp(c.last_unix_ms)
    );
    for t in &c.tags {
        out += &format!("  {:<18} {} calls, last {}\n", t.tag, t.calls, stamp(t.last_unix_ms));
    }
    out
}

fn unix_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn watch(socket: &Path, json: bool) -> Result<u8, Failure> {
    let printed = client::watch(socket, |line| {
        match line {
            client::WatchLine::Item(item) if json => match serde_json::to_string(&item) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("callbox: cannot print JSON: {e}"),
            },
            client::WatchLine::Item(item) => println!("{}", crate::render::monitor_item(&item, None)),
            client::WatchLine::Error(e) => eprintln!("callbox: {}", e.message),
        }
        true
    });
    match printed? {
        Ok(()) => {
            eprintln!("callbox: the daemon closed the stream");
            Ok(exit::OK)
        }
        Err(Response::Error(reply)) => Err(refused(reply)),
        Err(other) => Err(unexpected(&other)),
    }
}

fn reload(socket: &Path, json: bool) -> Result<u8, Failure> {
    let report = match ask(socket, Request::Reload {})? {
        Response::Reload(report) => report,
        other => return Err(unexpected(&other)),
    };
    show(&report, json, render_reload);
    Ok(if report.ok { exit::OK } else { exit::CONFIG })
}

fn render_reload(r: &ReloadReport) -> String {
    let mut out = if r.ok {
        format!("reloaded: configuration generation {}\n", r.generation)
    } else {
        format!("reload refused; still running generation {}:\n", r.generation)
    };
    for p in &r.problems {
        out += &format!("  {p}\n");
    }
    if !r.restart_required.is_empty() {
        out += &format!("restart needed for: {}\n", r.restart_required.join(", "));
    }
    out
}

#[derive(Serialize)]
struct CheckOutcome {
    valid: bool,
    source: Option<ConfigSource>,
    problems: Vec<String>,
}

fn config_check(path: &Path, json: bool) -> u8 {
    let outcome = match config::load(path) {
        Ok(loaded) => CheckOutcome { valid: true, source: Some(loaded.source), problems: vec![] },
        Err(e) => CheckOutcome { valid: false, source: None, problems: e.problem_lines() },
    };
    if json {
        print_json(&outcome);
    } else if let Some(source) = &outcome.source {
        println!("{source}: ok");
        if let ConfigSource::Defaults { path, reason } = source {
            println!(
                "note: {} {reason}. A first start runs on the built-in defaults, but a daemon already \
                 running on a file refuses to reload from it (that would drop the file's settings).",
                path.display()
            );
        }
    } else {
        eprintln!("{} problem(s) in {}:", outcome.problems.len(), path.display());
        for p in &outcome.problems {
            eprintln!("  {p}");
        }
    }
    if outcome.valid {
        exit::OK
    } else {
        exit::CONFIG
    }
}

fn config_show(path: &Path) -> u8 {
    match config::load(path) {
        Ok(loaded) => match toml::to_string(&loaded.config) {
            Ok(text) => {
                println!("# effective configuration: {}\n{text}", loaded.source);
                exit::OK
            }
            Err(e) => {
                eprintln!("callbox: cannot render the configuration: {e}");
                exit::FAILURE
            }
        },
        Err(e) => {
            for line in e.problem_lines() {
                eprintln!("{line}");
            }
            exit::CONFIG
        }
    }
}

fn doctor(cli: &Cli, json: bool) -> u8 {
    let env = PathEnv::from_process();
    let socket = socket_for(cli);
    let checks = doctor::run(&cli.config, |c| c.daemon.data_dir.clone().unwrap_or_else(|| env.data_dir()), &socket);
    if json {
        print_json(&checks);
    } else {
        let mut out = std::io::stdout().lock();
        for c in &checks {
            let verdict = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            let _ = writeln!(out, "{verdict}  {:<18} {}", c.name, c.detail);
        }
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        exit::FAILURE
    } else {
        exit::OK
    }
}
