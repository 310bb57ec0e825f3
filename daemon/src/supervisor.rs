//! The supervisor: owns every long-running component and the daemon's lifecycle.
//!
//! [`SupervisorCore`] is the decision logic, pure: `handle(event, now)` returns
//! actions. [`supervise`] is the IO shell: one `select!` over signals, component
//! exits, the watchdog tick, the shutdown deadline and reload requests; it
//! performs the actions. Invariants:
//! - a component that ends while the daemon runs is a failure: the daemon shuts
//!   down in order and exits 70 (systemd restarts it), it never limps on;
//! - shutdown is staged ([`Stage`]): inputs stop first; each later stage is told to stop
//!   once every component of the stages before it has ended (speech workers flush into
//!   understanding, understanding into the stores); at the deadline it exits 75 naming
//!   what was abandoned;
//! - a second SIGTERM/SIGINT during shutdown exits 130 at once.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use log::Level;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::exit;
use crate::health::{Stage, StagedShutdown};
use crate::notify::Notification;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Terminate,
    Interrupt,
    Hangup,
}

impl Sig {
    pub fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Hangup => "SIGHUP",
        }
    }
}

/// How a component's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Failed(String),
    Panicked(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Signal(Sig),
    ComponentEnded { name: &'static str, outcome: Outcome },
    WatchdogTick,
    DeadlineReached,
    ReloadRequested,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Log(Level, String),
    Notify(Notification),
    /// Tell the components of `stage` to finish and return (the earlier stages have).
    StopStage(Stage),
    /// Re-read the config and apply it if valid.
    Reload,
    /// Answer pending reload requests that the daemon is shutting down.
    RefuseReload,
    Exit(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { deadline: Instant, exit_code: u8 },
}

/// The lifecycle state machine. No IO, no clock of its own.
#[derive(Debug)]
pub struct SupervisorCore {
    phase: Phase,
    /// Components still running, with the stage they stop in.
    running: BTreeMap<&'static str, Stage>,
    /// The latest stage told to stop.
    stopped: Option<Stage>,
    shutdown_timeout: Duration,
}

impl SupervisorCore {
    pub fn new(components: impl IntoIterator<Item = (&'static str, Stage)>, shutdown_timeout: Duration) -> Self {
        Self { phase: Phase::Running, running: components.into_iter().collect(), stopped: None, shutdown_timeout }
    }

    /// A reload may change the deadline; it applies to the next shutdown.
    pub fn set_shutdown_timeout(&mut self, timeout: Duration) {
        self.shutdown_timeout = timeout;
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining { deadline, .. } => Some(deadline),
            Phase::Running => None,
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        use Action::*;
        match (self.phase, event) {
            (_, Event::WatchdogTick) => vec![Notify(Notification::Watchdog)],

            (Phase::Running, Event::Signal(sig @ (Sig::Terminate | Sig::Interrupt))) => self.begin_shutdown(
                now,
                exit::OK,
                Log(
                    Level::Info,
                    format!("received {}; shutting down (deadline {}s)", sig.name(), self.shutdown_timeout.as_secs()),
                ),
                "stopping".into(),
            ),
            (Phase::Running, Event::Signal(Sig::Hangup) | Event::ReloadRequested) => vec![Reload],
            (Phase::Running, Event::ComponentEnded { name, outcome }) => {
                self.running.remove(name);
                let reason = match outcome {
                    Outcome::Finished => format!("component {name} stopped unexpectedly"),
                    Outcome::Failed(e) => format!("component {name} failed: {e}"),
                    Outcome::Panicked(p) => format!("component {name} panicked: {p}"),
                };
                let status = format!("failed: {reason}");
                let mut actions = self.begin_shutdown(
                    now,
                    exit::COMPONENT_FAILED,
                    Log(Level::Error, format!("{reason}; shutting down")),
                    status,
                );
                actions.extend(self.exit_if_done());
                actions
            }
            (Phase::Running, Event::DeadlineReached) => vec![],

            (Phase::Draining { .. }, Event::Signal(sig @ (Sig::Terminate | Sig::Interrupt))) => vec![
                Log(Level::Warn, format!("received {} again during shutdown; exiting at once", sig.name())),
                Exit(exit::FORCED),
            ],
            (Phase::Draining { .. }, Event::Signal(Sig::Hangup) | Event::ReloadRequested) => vec![RefuseReload],
            (Phase::Draining { deadline, exit_code }, Event::ComponentEnded { name, outcome }) => {
                self.running.remove(name);
                let mut actions = Vec::new();
                match outcome {
                    Outcome::Finished => actions.push(Log(Level::Debug, format!("component {name} stopped"))),
                    Outcome::Failed(e) | Outcome::Panicked(e) => {
                        actions.push(Log(Level::Error, format!("component {name} failed while stopping: {e}")));
                        self.phase = Phase::Draining { deadline, exit_code: exit_code.max(exit::COMPONENT_FAILED) };
                    }
                }
                actions.extend(self.advance());
                actions.extend(self.exit_if_done());
                actions
            }
            (Phase::Draining { exit_code, .. }, Event::DeadlineReached) => {
                let left: Vec<String> =
                    self.running.iter().map(|(name, stage)| format!("{name} (stage {})", stage.name())).collect();
                let code = if exit_code == exit::OK { exit::SHUTDOWN_TIMEOUT } else { exit_code };
                vec![
                    Log(
                        Level::Error,
                        format!(
                            "shutdown deadline of {}s passed; abandoning components still running: {}",
                            self.shutdown_timeout.as_secs(),
                            left.join(", ")
                        ),
                    ),
                    Exit(code),
                ]
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant, exit_code: u8, log: Action, status: String) -> Vec<Action> {
        let deadline = now + self.shutdown_timeout;
        self.phase = Phase::Draining { deadline, exit_code };
        let mut actions =
            vec![log, Action::Notify(Notification::Stopping), Action::Notify(Notification::Status(status))];
        actions.extend(self.advance());
        actions
    }

    /// Stops every stage whose predecessors have all ended (stages without components
    /// pass at once).
    fn advance(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let next = match self.stopped {
                None => Some(Stage::Inputs),
                Some(stage) => stage.next(),
            };
            let Some(next) = next else { break };
            if self.running.values().any(|&stage| stage < next) {
                break;
            }
            self.stopped = Some(next);
            actions.push(Action::StopStage(next));
        }
        actions
    }

    fn exit_if_done(&self) -> Vec<Action> {
        match self.phase {
            Phase::Draining { exit_code, .. } if self.running.is_empty() => {
                vec![Action::Log(Level::Info, "all components stopped".into()), Action::Exit(exit_code)]
            }
            _ => vec![],
        }
    }
}

pub type ComponentFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// A long-running part of the daemon. It must return when the [`ShutdownSignal`] of its
/// stage fires, and only then; returning earlier (or an error, or a panic) is a failure.
///
/// [`ShutdownSignal`]: crate::health::ShutdownSignal
pub struct Component {
    pub name: &'static str,
    pub stage: Stage,
    pub task: ComponentFuture,
}

impl Component {
    pub fn new<F, E>(name: &'static str, stage: Stage, task: F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Self { name, stage, task: Box::pin(async move { task.await.map_err(|e| e.to_string()) }) }
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the first moment of `run` (before the models
/// load and long before READY), so a stop request is never met by the default action.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next SIGTERM or SIGINT (a SIGHUP before the supervisor runs is kept for it).
    pub async fn stop_requested(&mut self) -> Sig {
        tokio::select! {
            Some(_) = self.term.recv() => Sig::Terminate,
            Some(_) = self.int.recv() => Sig::Interrupt,
        }
    }
}

/// The side effects the shell delegates: reload and notifications. Kept behind
/// a trait so the shell is testable in-process with fakes for the edges.
pub trait SupervisorHooks: Send {
    /// What a client sends to ask for a reload (carries its reply handle).
    type ReloadRequest: Send;
    fn notify(&mut self, notification: &Notification);
    /// Holds a client's request until the reload it asked for is done or refused.
    fn queue_reload(&mut self, request: Self::ReloadRequest);
    /// Performs a reload; returns the new shutdown timeout when one was applied.
    fn reload(&mut self) -> Option<Duration>;
    /// Tells pending reload requesters the daemon is stopping.
    fn refuse_reload(&mut self);
}

/// Runs components until shutdown; returns the process exit code.
pub async fn supervise<H: SupervisorHooks>(
    components: Vec<Component>,
    shutdown_timeout: Duration,
    watchdog_interval: Option<Duration>,
    (mut signals, stages): (Signals, StagedShutdown),
    mut reload_requests: mpsc::Receiver<H::ReloadRequest>,
    hooks: &mut H,
) -> u8 {
    let mut core = SupervisorCore::new(components.iter().map(|c| (c.name, c.stage)), shutdown_timeout);
    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    for component in components {
        let handle = tasks.spawn(component.task);
        names.insert(handle.id(), component.name);
    }
    let mut watchdog = tokio::time::interval(watchdog_interval.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);

    loop {
        let deadline = core.deadline().unwrap_or(far_future);
        let event = tokio::select! {
            Some(_) = signals.term.recv() => Event::Signal(Sig::Terminate),
            Some(_) = signals.int.recv() => Event::Signal(Sig::Interrupt),
            Some(_) = signals.hup.recv() => Event::Signal(Sig::Hangup),
            Some(joined) = tasks.join_next_with_id() => {
                let (id, outcome) = match joined {
                    Ok((id, Ok(()))) => (id, Outcome::Finished),
                    Ok((id, Err(e))) => (id, Outcome::Failed(e)),
                    Err(e) => (e.id(), Outcome::Panicked(panic_message(e))),
                };
                Event::ComponentEnded { name: names.get(&id).copied().unwrap_or("unknown"), outcome }
            }
            _ = watchdog.tick(), if watchdog_interval.is_some() => Event::WatchdogTick,
            _ = tokio::time::sleep_until(deadline), if core.is_stopping() => Event::DeadlineReached,
            Some(request) = reload_requests.recv() => {
                hooks.queue_reload(request);
                Event::ReloadRequested
            }
        };
        for action in core.handle(event, Instant::now()) {
            match action {
                Action::Log(level, message) => log::log!(level, component = "supervisor"; "{message}"),
                Action::Notify(n) => hooks.notify(&n),
                Action::StopStage(stage) => {
                    log::debug!(component = "supervisor"; "stopping stage {}", stage.name());
                    stages.trigger(stage);
                }
                Action::Reload => {
                    if let Some(timeout) = hooks.reload() {
                        core.set_shutdown_timeout(timeout);
                    }
                }
                Action::RefuseReload => hooks.refuse_reload(),
                Action::Exit(code) => {
                    tasks.abort_all();
                    return code;
                }
            }
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn exits(actions: &[Action]) -> Option<u8> {
        actions.iter().find_map(|a| match a {
            Action::Exit(c) => Some(*c),
            _ => None,
        })
    }

    #[test]
    fn sigterm_drains_then_exits_zero() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs), ("storage", Stage::Inputs)], T);
        let a = core.handle(Event::Signal(Sig::Terminate), now);
        assert!(a.contains(&Action::Notify(Notification::Stopping)));
        assert!(a.contains(&Action::StopStage(Stage::Inputs)));
        assert_eq!(core.deadline(), Some(now + T));
        assert_eq!(exits(&a), None);
        let ended = |name| Event::ComponentEnded { name, outcome: Outcome::Finished };
        assert_eq!(exits(&core.handle(ended("control"), now)), None);
        assert_eq!(exits(&core.handle(ended("storage"), now)), Some(exit::OK));
    }

    #[test]
    fn second_signal_exits_at_once() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs)], T);
        core.handle(Event::Signal(Sig::Interrupt), now);
        assert_eq!(exits(&core.handle(Event::Signal(Sig::Terminate), now)), Some(exit::FORCED));
    }

    #[test]
    fn deadline_abandons_the_rest_and_names_it() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs), ("storage", Stage::Inputs)], T);
        core.handle(Event::Signal(Sig::Terminate), now);
        let a = core.handle(Event::DeadlineReached, now + T);
        assert_eq!(exits(&a), Some(exit::SHUTDOWN_TIMEOUT));
        assert!(
            matches!(&a[0], Action::Log(Level::Error, m) if m.contains("control (stage inputs), storage (stage inputs)"))
        );
    }

    #[test]
    fn a_component_ending_while_running_is_a_failure() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs), ("storage", Stage::Inputs)], T);
        let a =
            core.handle(Event::ComponentEnded { name: "storage", outcome: Outcome::Failed("disk gone".into()) }, now);
        assert!(matches!(&a[0], Action::Log(Level::Error, m) if m.contains("component storage failed: disk gone")));
        assert!(a.contains(&Action::StopStage(Stage::Inputs)));
        let a = core.handle(Event::ComponentEnded { name: "control", outcome: Outcome::Finished }, now);
        assert_eq!(exits(&a), Some(exit::COMPONENT_FAILED));
    }

    #[test]
    fn reload_runs_while_running_and_is_refused_while_stopping() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs)], T);
        assert_eq!(core.handle(Event::Signal(Sig::Hangup), now), vec![Action::Reload]);
        core.handle(Event::Signal(Sig::Terminate), now);
        assert_eq!(core.handle(Event::ReloadRequested, now), vec![Action::RefuseReload]);
    }

    fn stops(actions: &[Action]) -> Vec<Stage> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StopStage(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn stages_stop_in_order_each_after_the_ones_before_have_ended() {
        let now = Instant::now();
        let mut core = SupervisorCore::new(
            [
                ("audiosocket", Stage::Inputs),
                ("control", Stage::Inputs),
                ("speech", Stage::Speech),
                ("understanding", Stage::Understanding),
                ("customers", Stage::Stores),
            ],
            T,
        );
        let ended = |name| Event::ComponentEnded { name, outcome: Outcome::Finished };
        assert_eq!(stops(&core.handle(Event::Signal(Sig::Terminate), now)), [Stage::Inputs]);
        assert_eq!(stops(&core.handle(ended("control"), now)), []);
        assert_eq!(stops(&core.handle(ended("audiosocket"), now)), [Stage::Speech]);
        // A later stage that ends early (it failed) does not let the stage before it skip.
        let a = core.handle(Event::ComponentEnded { name: "customers", outcome: Outcome::Failed("disk".into()) }, now);
        assert_eq!(stops(&a), []);
        assert_eq!(stops(&core.handle(ended("speech"), now)), [Stage::Understanding]);
        let a = core.handle(ended("understanding"), now);
        assert_eq!(stops(&a), [Stage::Stores]);
        assert_eq!(exits(&a), Some(exit::COMPONENT_FAILED));
    }

    #[test]
    fn stages_without_components_pass_at_once() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("customers", Stage::Stores)], T);
        let a = core.handle(Event::Signal(Sig::Terminate), now);
        assert_eq!(stops(&a), Stage::ALL);
    }

    #[test]
    fn the_deadline_names_what_was_abandoned_and_its_stage() {
        let now = Instant::now();
        let mut core = SupervisorCore::new([("control", Stage::Inputs), ("speech", Stage::Speech)], T);
        core.handle(Event::Signal(Sig::Terminate), now);
        core.handle(Event::ComponentEnded { name: "control", outcome: Outcome::Finished }, now);
        let a = core.handle(Event::DeadlineReached, now + T);
        assert!(matches!(&a[0], Action::Log(Level::Error, m) if m.contains("speech (stage speech)")), "{a:?}");
        assert_eq!(exits(&a), Some(exit::SHUTDOWN_TIMEOUT));
    }

    #[derive(Default)]
    struct Recorder(Vec<Notification>);
    impl SupervisorHooks for Recorder {
        type ReloadRequest = ();
        fn queue_reload(&mut self, _: ()) {}
        fn notify(&mut self, n: &Notification) {
            self.0.push(n.clone());
        }
        fn reload(&mut self) -> Option<Duration> {
            None
        }
        fn refuse_reload(&mut self) {}
    }

    #[tokio::test]
    async fn a_panicking_component_stops_the_others_and_exits_70() {
        let stages = StagedShutdown::default();
        let signal = stages.signal(Stage::Inputs);
        let mut waiter = stages.signal(Stage::Stores);
        let healthy = Component::new("healthy", Stage::Stores, async move {
            waiter.wait().await;
            Ok::<(), String>(())
        });
        let crashing = Component::new("crashing", Stage::Inputs, async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if signal.is_triggered() {
                return Ok(());
            }
            panic!("decoder state corrupted");
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        });
        let (_tx, rx) = mpsc::channel::<()>(1);
        let mut hooks = Recorder::default();
        let signals = Signals::install().unwrap();
        let code = supervise(vec![healthy, crashing], T, None, (signals, stages), rx, &mut hooks).await;
        assert_eq!(code, exit::COMPONENT_FAILED);
        assert!(hooks.0.contains(&Notification::Stopping));
        assert!(hooks.0.iter().any(|n| matches!(n, Notification::Status(s) if s.contains("decoder state corrupted"))));
    }
}
