//! Process exit codes. Values follow sysexits(3) so that systemd's
//! `RestartPreventExitStatus=` and shell scripts can tell failures apart.
//! Documented for users in README.md ("Exit codes"); keep both in step.

/// Clean exit (including a graceful shutdown that finished inside its deadline).
pub const OK: u8 = 0;
/// A check reported at least one failure (`callbox doctor`), or a generic runtime failure.
pub const FAILURE: u8 = 1;
/// The command line was malformed (EX_USAGE).
pub const USAGE: u8 = 64;
/// An input file is not a usable recording (EX_DATAERR; `transcribe`).
pub const DATA_ERROR: u8 = 65;
/// The daemon is not reachable through its control socket, or the speech models are
/// missing or fail their check (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// A supervised component failed; the daemon stopped in order (EX_SOFTWARE).
pub const COMPONENT_FAILED: u8 = 70;
/// An operating-system resource could not be set up: socket, data dir, runtime (EX_OSERR).
pub const OS_ERROR: u8 = 71;
/// Graceful shutdown overran its deadline and the rest was abandoned (EX_TEMPFAIL).
pub const SHUTDOWN_TIMEOUT: u8 = 75;
/// The daemon answered something this CLI does not understand (EX_PROTOCOL).
pub const PROTOCOL: u8 = 76;
/// The daemon refused the caller (EX_NOPERM).
pub const NO_PERMISSION: u8 = 77;
/// The configuration is invalid (EX_CONFIG); systemd must not restart on it.
pub const CONFIG: u8 = 78;
/// A second SIGTERM/SIGINT arrived during graceful shutdown: exit at once (128 + SIGINT).
pub const FORCED: u8 = 130;

/// A command that could not do its job: what to tell the user and the exit code that says
/// which kind of failure it was. CLI commands return `Result<u8, Failure>` and use `?`;
/// `cli::main` prints the message once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    /// One or more lines, without the `callbox: ` prefix.
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// Prints the message to stderr and gives the exit code.
    pub fn report(self) -> u8 {
        eprintln!("callbox: {}", self.message);
        self.code
    }
}
