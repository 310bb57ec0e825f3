//! `callbox run`: start-up order, the components, and what a reload does.
//!
//! Start-up: logging → config (exit 78 on any problem) → runtime → signal handlers →
//! systemd notifier → data directory → customer store → models → control socket (exit 71
//! on failure) → spawn components → READY=1. Everything after READY is the supervisor's.
//! SIGTERM/SIGINT are caught from the handlers' installation on: during start-up (model
//! loading takes seconds) a stop request ends the start cleanly with exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::calls::registry::CallRegistry;
use crate::config::{self, LoadedConfig, ReloadReport, RunningConfig};
use crate::control::server::{self, ControlContext, ReloadReply};
use crate::exit;
use crate::health::{HealthBoard, Stage, StagedShutdown};
use crate::logging::{self, utc_timestamp};
use crate::notify::{self, Notification, Notifier};
use crate::paths::PathEnv;
use crate::speech::live::SpeechService;
use crate::speech::SpeechModels;
use crate::storage;
use crate::supervisor::{self, Component, Signals, SupervisorHooks};
use crate::understanding::live::{Understanding, UnderstandingModels};
use crate::understanding::rules::load_rules;

const COMPONENT: &str = "daemon";

/// Runs the daemon in the foreground; returns the process exit code.
/// `as_root`: allow a root run on a data directory that belongs to another user.
pub fn run(config_path: &Path, as_root: bool) -> u8 {
    logging::init(config::LogLevel::Info);
    let loaded = match config::load(config_path) {
        Ok(loaded) => loaded,
        Err(e) => {
            for line in e.problem_lines() {
                log::error!(component = COMPONENT; "{line}");
            }
            log::error!(component = COMPONENT; "not starting: fix the configuration (check it with `callbox config check --config {}`)", config_path.display());
            return exit::CONFIG;
        }
    };
    logging::init(loaded.config.log.level);
    if loaded.config.speech.log_transcripts {
        log::warn!(component = COMPONENT; "speech.log_transcripts is no longer honoured: transcripts never go to the log; use `callbox watch`");
    }
    if let config::ConfigSource::Defaults { path, reason } = &loaded.source {
        log::warn!(component = COMPONENT; "config file {} {reason}; running on built-in defaults", path.display());
    }

    limit_malloc_arenas();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("callbox");
    if let Some(threads) = loaded.config.daemon.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!(component = COMPONENT; "cannot start the async runtime: {e}");
            return exit::OS_ERROR;
        }
    };
    let code = runtime.block_on(run_async(loaded, as_root));
    // Abandoned blocking work (a stuck probe) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    log::logger().flush();
    code
}

/// glibc gives each thread that allocates its own heap arena (up to 8 per core), and every
/// leg has a thread: freed ASR activations then sit in many arenas at once. One arena
/// (`bench soak --calls 4`: peak RSS 594 MB by default, 451 MB with two arenas, 379 MB with
/// one; utterance latency p50 0.65 s / p99 1.3 s in all three): allocation is a small part
/// of an utterance's work. Before any thread starts; `MALLOC_ARENA_MAX` in the environment
/// wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a glibc tunable; called before the runtime's threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn run_async(loaded: LoadedConfig, as_root: bool) -> u8 {
    // First: from here on a stop request is ours to handle, never the default action.
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            log::error!(component = COMPONENT; "cannot install signal handlers: {e}");
            return exit::OS_ERROR;
        }
    };
    let started = tokio::select! {
        started = start(loaded, as_root) => started,
        sig = signals.stop_requested() => {
            log::info!(component = COMPONENT; "received {} while starting; stopped before taking any call", sig.name());
            return exit::OK;
        }
    };
    match started {
        Ok(started) => started.supervise(signals).await,
        Err(code) => code,
    }
}

/// Everything the supervisor needs, once start-up is done.
struct Started {
    components: Vec<Component>,
    shutdown_timeout: Duration,
    watchdog_interval: Option<Duration>,
    stages: StagedShutdown,
    reload_rx: mpsc::Receiver<ReloadReply>,
    hooks: DaemonHooks,
}

impl Started {
    async fn supervise(self, signals: Signals) -> u8 {
        let Started { components, shutdown_timeout, watchdog_interval, stages, reload_rx, mut hooks } = self;
        let signals = (signals, stages);
        supervisor::supervise(components, shutdown_timeout, watchdog_interval, signals, reload_rx, &mut hooks).await
    }
}

/// Start-up up to READY=1. Dropped half-way (a stop request), it leaves nothing
/// half-written: the store is opened whole or not at all, and models are only read.
async fn start(loaded: LoadedConfig, as_root: bool) -> Result<Started, u8> {
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::OS_ERROR);
        }
    };
    let watchdog_interval = notify::watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let env = PathEnv::from_process();
    let cfg = &loaded.config;
    let data_dir = cfg.daemon.data_dir.clone().unwrap_or_else(|| env.data_dir());
    let socket_path = cfg.control.socket.clone().unwrap_or_else(|| env.daemon_socket());

    if !as_root {
        if let Err(e) = storage::check_root_run(&data_dir) {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::NO_PERMISSION);
        }
    }
    if let Err(e) = storage::prepare(&data_dir) {
        log::error!(component = COMPONENT; "{e}");
        return Err(exit::OS_ERROR);
    }
    let audiosocket = match crate::inputs::audiosocket::bind(&cfg.audiosocket).await {
        Ok(listeners) => listeners,
        Err(e) => {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::OS_ERROR);
        }
    };
    if let Some(spool) = &cfg.spool.dir {
        if let Err(e) = crate::inputs::spool::prepare(spool) {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::OS_ERROR);
        }
    }
    // Customer tags across calls: the key and the database live in the data directory.
    let (customers, customer_store) = match crate::customers::Customers::open(&data_dir) {
        Ok(opened) => opened,
        Err(e) => {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::OS_ERROR);
        }
    };
    // The headquarters link's TLS identity: a missing or world-readable key stops the
    // start here, with its path.
    let hq_tls = match crate::uplink::link::tls_for(&cfg.hq) {
        Ok(tls) => tls,
        Err(e) => {
            log::error!(component = "hq"; "{e}");
            return Err(exit::CONFIG);
        }
    };
    // The encrypted call store: its master key (systemd credential or key file) is checked
    // here; a missing or wrong key stops the start (exit 71), never a silent new key.
    let vault = if cfg.store.enabled {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let (dir, cred, store_cfg) = (data_dir.clone(), credentials, cfg.store.clone());
        let audio_floor = cfg.storage.stop_audio_below_mb;
        // The outbox is written only when there is a headquarters to send it to.
        let outbox = cfg.hq.enabled().then(|| crate::store::OutboxSettings {
            quotas: cfg.hq.quota_mb.bytes(),
            site: cfg.hq.site.clone(),
            box_id: cfg.hq.box_id.clone(),
            window_secs: cfg.hq.interval_secs,
            models_version: crate::uplink::link::models_version(cfg),
        });
        let opened = tokio::task::spawn_blocking(move || {
            crate::store::live::CallVault::open(&dir, cred.as_deref(), &store_cfg, audio_floor, outbox)
        })
        .await;
        match opened {
            Ok(Ok(opened)) => Some(opened),
            Ok(Err(e)) => {
                log::error!(component = "store"; "{e}");
                return Err(exit::OS_ERROR);
            }
            Err(e) => {
                log::error!(component = "store"; "opening the call store panicked: {e}");
                return Err(exit::OS_ERROR);
            }
        }
    } else {
        None
    };
    let (vault, vault_thread) = match vault {
        Some((vault, thread)) => (Some(vault), Some(thread)),
        None => (None, None),
    };
    let speech = match load_speech(cfg).await {
        // With store.keep_audio every leg's worker also hands its audio to the store.
        Ok(speech) => speech.map(|s| match vault.as_ref().filter(|v| v.keep_audio()) {
            Some(vault) => s.keeping_audio(vault.clone()),
            None => s,
        }),
        Err(code) => return Err(code),
    };
    let understanding = match &speech {
        Some(service) => match load_understanding(cfg, service, customers.clone(), vault.clone()).await {
            Ok(u) => Some(u),
            Err(code) => return Err(code),
        },
        None => None,
    };
    let bound = match server::bind(&socket_path, &cfg.control.technician_group) {
        Ok(bound) => bound,
        Err(e) => {
            log::error!(component = COMPONENT; "{e}");
            return Err(exit::OS_ERROR);
        }
    };

    let shutdown_timeout = Duration::from_secs(cfg.daemon.shutdown_timeout_secs);
    let running = RunningConfig {
        config: loaded.config.clone(),
        source: loaded.source.clone(),
        generation: 1,
        last_reload: None,
    };
    let (config_tx, config_rx) = watch::channel(Arc::new(running));
    // Reload requests are rare; 8 pending is plenty and senders wait beyond that.
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadReply>(8);
    let health = HealthBoard::default();
    let stages = StagedShutdown::default();
    let shutdown = stages.signal(Stage::Inputs);
    let calls = CallRegistry::new(cfg.calls.max_concurrent);
    calls.set_limit(call_limit(cfg, &data_dir));
    let audiosocket_listeners: Vec<String> =
        audiosocket.iter().map(|l| format!("{} ({:?})", l.address, l.leg).to_lowercase()).collect();
    let capture = cfg.alsa.device.is_some().then(crate::inputs::alsa::request_queue);

    let status = server::StatusSources {
        started_at: SystemTime::now(),
        started: tokio::time::Instant::now(),
        data_dir: data_dir.clone(),
        socket_path: bound.path().to_owned(),
        watchdog_interval,
        systemd_notify: notifier.is_enabled(),
        calls: calls.clone(),
        audiosocket_listeners,
        speech: speech.clone(),
    };
    let uplink = crate::uplink::link::UplinkHandle::default();
    let ctx = ControlContext {
        config: config_rx.clone(),
        health: health.clone(),
        status,
        line_requests: capture.as_ref().map(|(requests, _)| requests.clone()),
        customers: customers.clone(),
        vault: vault.clone(),
        uplink: cfg.hq.enabled().then(|| uplink.clone()),
        monitor: understanding.as_ref().map(Understanding::bus),
        speech: speech.clone(),
        reload_tx,
    };
    let mut components = vec![
        Component::new("control", Stage::Inputs, server::serve(bound, ctx, shutdown.clone())),
        Component::new(
            "storage",
            Stage::Inputs,
            storage::monitor(data_dir.clone(), config_rx.clone(), calls.clone(), health.clone(), shutdown.clone()),
        ),
        Component::new(
            "customers",
            Stage::Stores,
            crate::customers::run(customer_store, health.clone(), stages.signal(Stage::Stores)),
        ),
    ];
    if let Some(thread) = vault_thread {
        let run = crate::store::live::run(thread, config_rx.clone(), health.clone(), stages.signal(Stage::Stores));
        components.push(Component::new("store", Stage::Stores, run));
    }
    if let (true, Some(vault)) = (cfg.hq.enabled(), &vault) {
        // Customers' tag changes reach HQ through the call store's outbox.
        if let Err(e) = customers.send_tag_changes_to(vault.clone()).await {
            log::error!(component = "customers"; "{e}");
        }
        // In the last stage with the store: what understanding finishes while stopping is
        // still sent if the link is up; anything unacknowledged stays in the outbox.
        let run = crate::uplink::link::run(
            vault.clone(),
            hq_tls.clone(),
            config_rx.clone(),
            uplink.clone(),
            calls.clone(),
            health.clone(),
            stages.signal(Stage::Stores),
        );
        components.push(Component::new("hq", Stage::Stores, run));
    }
    if !audiosocket.is_empty() {
        let serve = crate::inputs::audiosocket::serve(
            audiosocket,
            config_rx.clone(),
            calls.clone(),
            speech.clone(),
            health.clone(),
            shutdown.clone(),
        );
        components.push(Component::new("audiosocket", Stage::Inputs, serve));
    }
    if let Some(spool) = cfg.spool.dir.clone() {
        let (config, calls, speech) = (config_rx.clone(), calls.clone(), speech.clone());
        let stores = crate::inputs::spool::Stores { customers: Some(customers.clone()), vault: vault.clone() };
        let watch = crate::inputs::spool::watch(spool, config, calls, stores, speech, health.clone(), shutdown.clone());
        components.push(Component::new("spool", Stage::Inputs, watch));
    }
    if let Some(service) = &speech {
        let run = crate::speech::live::run(service.clone(), health.clone(), stages.signal(Stage::Speech));
        components.push(Component::new("speech", Stage::Speech, run));
    }
    if let (Some(understanding), Some(service)) = (understanding, &speech) {
        let run = crate::understanding::live::run(
            understanding,
            service.subscribe(),
            config_rx.clone(),
            calls.clone(),
            health.clone(),
            stages.signal(Stage::Understanding),
        );
        components.push(Component::new("understanding", Stage::Understanding, run));
    }
    if let Some((_, requests)) = capture {
        let (config, calls, speech) = (config_rx.clone(), calls.clone(), speech.clone());
        let run = crate::inputs::alsa::capture(
            cfg.alsa.clone(),
            config,
            calls,
            speech,
            requests,
            health.clone(),
            shutdown.clone(),
        );
        components.push(Component::new("alsa", Stage::Inputs, run));
    }

    let mut hooks = DaemonHooks {
        notifier,
        config_tx,
        calls,
        pending: Vec::new(),
        config_path: loaded.source.path().to_owned(),
        data_dir: data_dir.clone(),
    };
    hooks.notify(&Notification::Ready);
    hooks.notify(&Notification::Status(format!(
        "running; control socket {}; data in {}",
        socket_path.display(),
        data_dir.display()
    )));
    log::info!(component = COMPONENT;
        "callbox {} running (pid {}); config: {}; watchdog: {}",
        env!("CARGO_PKG_VERSION"), std::process::id(), loaded.source,
        watchdog_interval.map(|d| format!("every {} ms", d.as_millis())).unwrap_or_else(|| "off".into()));

    Ok(Started { components, shutdown_timeout, watchdog_interval, stages, reload_rx, hooks })
}

/// The limit on simultaneous calls: `calls.max_concurrent`, lowered to the box's rated
/// capacity (`<data_dir>/capacity.json`) when that was measured on this box as it is now.
fn call_limit(cfg: &config::Config, data_dir: &Path) -> crate::calls::capacity::CallLimit {
    use crate::calls::capacity;
    let rating = crate::calls::registry::read_rating(&data_dir.join(capacity::RATING_FILE));
    let here = capacity::BoxFacts {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        models_version: crate::uplink::link::models_version(cfg),
        asr_workers: crate::speech::scheduler::slots_for(cfg.speech.asr_workers as usize),
        asr_batch: cfg.speech.asr_batch as usize,
    };
    capacity::call_limit(cfg.calls.max_concurrent, cfg.calls.use_rated_capacity, &rating, &here)
}

/// Loads the speech models when an input is configured and speech is on; the exit code
/// (69) when they cannot be loaded, after saying which file and what to do.
async fn load_speech(cfg: &config::Config) -> Result<Option<SpeechService>, u8> {
    let has_input = !cfg.audiosocket.listeners.is_empty() || cfg.spool.dir.is_some() || cfg.alsa.device.is_some();
    if !cfg.speech.enabled || !has_input {
        if has_input {
            log::warn!(component = "speech"; "speech.enabled = false: calls are taken but not transcribed");
        }
        return Ok(None);
    }
    let dir = cfg.speech.models_dir();
    let buckets = cfg.speech.encoder_buckets_secs.clone();
    let (asr_workers, asr_batch) = (cfg.speech.asr_workers, cfg.speech.asr_batch);
    log::info!(component = "speech"; "loading the speech models from {}", dir.display());
    let started = std::time::Instant::now();
    let load_dir = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        SpeechModels::load(&load_dir, &buckets).and_then(|m| m.with_asr_scheduler(asr_workers, asr_batch))
    })
    .await;
    match loaded {
        Ok(Ok(models)) => {
            log::info!(component = "speech"; "models from {} loaded in {:.1} s", dir.display(), started.elapsed().as_secs_f64());
            Ok(Some(SpeechService::new(models)))
        }
        Ok(Err(e)) => {
            log::error!(component = "speech"; "cannot load the speech models: {e}");
            log::error!(component = "speech"; "{}; or set speech.enabled = false", crate::paths::how_to_get_models(&dir));
            Err(exit::UNAVAILABLE)
        }
        Err(e) => {
            log::error!(component = "speech"; "loading the speech models panicked: {e}");
            Err(exit::UNAVAILABLE)
        }
    }
}

/// The intent and sentiment models (beside the speech models) and the rules; exit 69 for
/// missing models, 78 for an invalid rule file.
async fn load_understanding(
    cfg: &config::Config,
    speech: &SpeechService,
    customers: crate::customers::Customers,
    vault: Option<crate::store::live::CallVault>,
) -> Result<Understanding, u8> {
    let dir = speech.models().dir.clone();
    let load_dir = dir.clone();
    let models = match tokio::task::spawn_blocking(move || UnderstandingModels::load(&load_dir)).await {
        Ok(Ok(models)) => models,
        Ok(Err(e)) => {
            log::error!(component = "understanding"; "cannot load the intent/sentiment models: {e}; {}", crate::paths::how_to_get_models(&dir));
            return Err(exit::UNAVAILABLE);
        }
        Err(e) => {
            log::error!(component = "understanding"; "loading the models panicked: {e}");
            return Err(exit::UNAVAILABLE);
        }
    };
    match load_rules(cfg.understanding.rules_file.as_deref()) {
        Ok(rules) => Ok(Understanding::new(models, rules, Some(customers), vault)),
        Err(problems) => {
            for p in problems {
                log::error!(component = "understanding"; "rules: {p}");
            }
            log::error!(component = "understanding"; "not starting: fix the rule file (check it with `callbox rules check FILE`)");
            Err(exit::CONFIG)
        }
    }
}

struct DaemonHooks {
    notifier: Notifier,
    config_tx: watch::Sender<Arc<RunningConfig>>,
    calls: CallRegistry,
    /// Clients waiting for the outcome of the next reload.
    pending: Vec<ReloadReply>,
    config_path: PathBuf,
    /// Where the capacity rating is read on reload (the data directory needs a restart).
    data_dir: PathBuf,
}

impl SupervisorHooks for DaemonHooks {
    type ReloadRequest = ReloadReply;

    fn queue_reload(&mut self, request: ReloadReply) {
        self.pending.push(request);
    }

    fn notify(&mut self, notification: &Notification) {
        if let Err(e) = self.notifier.send(notification) {
            log::warn!(component = "supervisor"; "cannot notify systemd ({}): {e}", notification.payload().replace('\n', " "));
        }
    }

    fn reload(&mut self) -> Option<Duration> {
        self.notify(&Notification::Reloading { monotonic_usec: notify::monotonic_usec() });
        let current = self.config_tx.borrow().clone();
        let at = utc_timestamp(SystemTime::now());
        let (next, report, applied) = match config::load_for_reload(&self.config_path, &current.source) {
            Ok(loaded) => {
                let restart_required: Vec<String> =
                    current.config.restart_required_changes(&loaded.config).into_iter().map(String::from).collect();
                let generation = current.generation + 1;
                logging::set_config_level(loaded.config.log.level);
                self.calls.set_limit(call_limit(&loaded.config, &self.data_dir));
                log::info!(component = "supervisor"; "configuration reloaded from {} (generation {generation})", loaded.source);
                if !restart_required.is_empty() {
                    log::warn!(component = "supervisor"; "changed keys take effect only after a restart: {}", restart_required.join(", "));
                }
                let report = ReloadReport { at, ok: true, generation, problems: vec![], restart_required };
                let timeout = Duration::from_secs(loaded.config.daemon.shutdown_timeout_secs);
                let next = RunningConfig {
                    config: loaded.config,
                    source: loaded.source,
                    generation,
                    last_reload: Some(report.clone()),
                };
                (next, report, Some(timeout))
            }
            Err(e) => {
                let problems = e.problem_lines();
                for line in &problems {
                    log::error!(component = "supervisor"; "reload refused: {line}");
                }
                log::error!(component = "supervisor"; "keeping the running configuration (generation {})", current.generation);
                let report =
                    ReloadReport { at, ok: false, generation: current.generation, problems, restart_required: vec![] };
                let next = RunningConfig { last_reload: Some(report.clone()), ..(*current).clone() };
                (next, report, None)
            }
        };
        self.config_tx.send_replace(Arc::new(next));
        for reply in self.pending.drain(..) {
            let _ = reply.send(Ok(report.clone()));
        }
        self.notify(&Notification::Ready);
        let status = if report.ok {
            format!("running; configuration generation {}", report.generation)
        } else {
            format!("running; reload failed with {} problem(s), previous configuration kept", report.problems.len())
        };
        self.notify(&Notification::Status(status));
        applied
    }

    fn refuse_reload(&mut self) {
        for reply in self.pending.drain(..) {
            let _ = reply.send(Err("the daemon is shutting down".into()));
        }
    }
}
