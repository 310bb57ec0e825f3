//! Logging: to the systemd journal (with structured fields) when stderr is
//! connected to it, to stderr otherwise. One filter serves both: `RUST_LOG` when
//! set (per-module directives allowed), else the config's `log.level`, which a
//! reload may change.
//!
//! Structured fields come from `log`'s key-values: `component` on every line a
//! component writes, `call_id` where there is a call. In the journal they are
//! COMPONENT=, CALL_ID=; on stderr `[component]` and `key=value` suffixes.

use std::io::Write;
use std::sync::{OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::kv::{Key, Value, VisitSource};
use log::{Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

use crate::config::LogLevel;

enum Sink {
    Journal(JournalLog),
    Stderr,
}

struct Logger {
    sink: Sink,
    filter: RwLock<env_filter::Filter>,
    /// `RUST_LOG` was set at start: the config's level is then ignored.
    env_override: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Where journald listens for native-protocol datagrams (fixed by systemd).
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

fn filter_for(level: LogLevel) -> env_filter::Filter {
    env_filter::Builder::new().filter_level(level.to_filter()).build()
}

/// Installs the process logger. Calling it again (tests in one process) only
/// updates the level.
pub fn init(level: LogLevel) {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty());
    let mut rust_log_error = None;
    let from_env = rust_log.as_deref().and_then(|spec| match env_filter::Builder::new().try_parse(spec) {
        Ok(builder) => Some(builder.build()),
        Err(e) => {
            rust_log_error = Some(format!("ignoring RUST_LOG={spec:?}: {e}; using log.level from the config"));
            None
        }
    });
    let env_override = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| filter_for(level));
    let max = filter.filter();
    // stderr is the journal's stream and journald's socket is there: lines sent
    // to a missing socket would be lost, so both must hold.
    let sink = if systemd_journal_logger::connected_to_journal() && std::path::Path::new(JOURNAL_SOCKET).exists() {
        match JournalLog::new() {
            Ok(journal) => Sink::Journal(journal.with_syslog_identifier("callbox".into())),
            Err(_) => Sink::Stderr,
        }
    } else {
        Sink::Stderr
    };
    let logger = Logger { sink, filter: RwLock::new(filter), env_override };
    if LOGGER.set(logger).is_ok() {
        if let Some(logger) = LOGGER.get() {
            // set_logger only fails if another logger was installed first; then
            // that one keeps working and ours is unused, which is harmless.
            let _ = log::set_logger(logger);
        }
        log::set_max_level(max);
        if let Some(message) = rust_log_error {
            log::warn!(component = "logging"; "{message}");
        }
    } else {
        set_config_level(level);
    }
}

/// Applies a (reloaded) config level unless `RUST_LOG` overrides it.
pub fn set_config_level(level: LogLevel) {
    let Some(logger) = LOGGER.get() else { return };
    if logger.env_override {
        return;
    }
    let filter = filter_for(level);
    log::set_max_level(filter.filter());
    if let Ok(mut current) = logger.filter.write() {
        *current = filter;
    }
}

/// Whether log lines go to the journal (for `status`).
pub fn to_journal() -> bool {
    matches!(LOGGER.get().map(|l| &l.sink), Some(Sink::Journal(_)))
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.read().map(|f| f.enabled(metadata)).unwrap_or(true)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.read().map(|f| f.matches(record)).unwrap_or(true) {
            return;
        }
        match &self.sink {
            Sink::Journal(journal) => {
                // The journal keeps fields apart, but journalctl shows them as text:
                // the same escaping as on stderr, so no field can fake a line or reverse one.
                let message = escaped_message(record);
                let mut fields = FieldList::default();
                let _ = record.key_values().visit(&mut fields);
                let pairs: Vec<(&str, &str)> = fields.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                journal.log(
                    &Record::builder()
                        .level(record.level())
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .args(format_args!("{message}"))
                        .key_values(&pairs)
                        .build(),
                );
            }
            Sink::Stderr => {
                let line = format_stderr_line(record, SystemTime::now());
                // A closed stderr must not take the daemon down.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {
        if let Sink::Journal(journal) = &self.sink {
            journal.flush();
        }
    }
}

/// The record's message with control and bidi characters escaped (see `escape`).
fn escaped_message(record: &Record<'_>) -> String {
    let message = record.args().to_string();
    crate::escape::escape_controls(&message).into_owned()
}

/// Every key-value of a record, values escaped.
#[derive(Default)]
struct FieldList(Vec<(String, String)>);

impl<'kvs> VisitSource<'kvs> for FieldList {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push((key.as_str().to_owned(), crate::escape::escape_controls(&value.to_string()).into_owned()));
        Ok(())
    }
}

#[derive(Default)]
struct Fields {
    component: Option<String>,
    rest: String,
}

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let value = value.to_string();
        let value = crate::escape::escape_controls(&value);
        if key.as_str() == "component" {
            self.component = Some(value.into_owned());
        } else {
            self.rest.push_str(&format!(" {key}={value}"));
        }
        Ok(())
    }
}

fn format_stderr_line(record: &Record<'_>, now: SystemTime) -> String {
    let mut fields = Fields::default();
    let _ = record.key_values().visit(&mut fields);
    let component = fields.component.as_deref().unwrap_or_else(|| record.target());
    format!("{} {:<5} [{component}] {}{}\n", utc_timestamp(now), record.level(), escaped_message(record), fields.rest)
}

/// RFC 3339 UTC with milliseconds, without a date-time dependency.
pub fn utc_timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-11-21T23:32:05.250Z
        let t = UNIX_EPOCH + Duration::from_millis(1_795_303_925_250);
        assert_eq!(utc_timestamp(t), "2026-11-21T23:32:05.250Z");
        // Leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn stderr_line_carries_component_and_fields() {
        let kvs: &[(&str, &str)] = &[("component", "control"), ("call_id", "c-42")];
        let line = format_stderr_line(
            &Record::builder()
                .level(log::Level::Warn)
                .target("callbox::control")
                .args(format_args!("peer refused"))
                .key_values(&kvs)
                .build(),
            UNIX_EPOCH,
        );
        assert_eq!(line, "1970-01-01T00:00:00.000Z WARN  [control] peer refused call_id=c-42\n");
    }

    #[test]
    fn a_field_cannot_forge_a_line() {
        let kvs: &[(&str, &str)] = &[("component", "spool"), ("call_id", "x\u{202E}y")];
        let line = format_stderr_line(
            &Record::builder()
                .level(log::Level::Info)
                .args(format_args!("{}: done", "a.wav\n1970-01-01T00:00:00.000Z ERROR [supervisor] forged"))
                .key_values(&kvs)
                .build(),
            UNIX_EPOCH,
        );
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains("a.wav\\n1970"), "{line}");
        assert!(line.ends_with("call_id=x\\u{202e}y\n"), "{line}");
        // Backslashes stay: an escaped file name reads the same in the log.
        assert!(escaped_message(&Record::builder().args(format_args!("a\\nb")).build()) == "a\\nb");
    }
}
