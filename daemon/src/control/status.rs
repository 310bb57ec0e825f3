//! `status`: what the daemon reports about itself, read from the subsystems' handles.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::protocol::{AsrQueueReport, CallerInfo, DaemonState, SpeechReport, StatusReport};
use crate::calls::registry::CallRegistry;
use crate::config::RunningConfig;
use crate::health::HealthBoard;
use crate::logging::{self, utc_timestamp};
use crate::speech::live::SpeechService;

/// Everything `status` reads besides the configuration and the health board.
#[derive(Clone)]
pub struct StatusSources {
    pub started_at: SystemTime,
    pub started: Instant,
    pub data_dir: PathBuf,
    /// The socket path actually bound (the config may leave it to the defaults).
    pub socket_path: PathBuf,
    pub watchdog_interval: Option<Duration>,
    pub systemd_notify: bool,
    pub calls: CallRegistry,
    pub audiosocket_listeners: Vec<String>,
    pub speech: Option<SpeechService>,
}

impl StatusSources {
    /// The status report as `caller` sees it now.
    pub fn report(
        &self,
        running: &RunningConfig,
        health: &HealthBoard,
        stopping: bool,
        caller: CallerInfo,
    ) -> StatusReport {
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            state: if stopping { DaemonState::Stopping } else { DaemonState::Running },
            started_at: utc_timestamp(self.started_at),
            uptime_secs: self.started.elapsed().as_secs(),
            config: running.source.clone().into(),
            config_generation: running.generation,
            last_reload: running.last_reload.clone().map(Into::into),
            log_level: log::max_level().to_string().to_lowercase(),
            log_to_journal: logging::to_journal(),
            systemd_notify: self.systemd_notify,
            watchdog_interval_ms: self.watchdog_interval.map(|d| d.as_millis() as u64),
            control_socket: self.socket_path.display().to_string(),
            data_dir: self.data_dir.display().to_string(),
            components: health.snapshot().into_iter().map(Into::into).collect(),
            audiosocket_listeners: self.audiosocket_listeners.clone(),
            calls: self.calls.snapshot().into(),
            speech: self.speech.as_ref().map(speech_report),
            caller,
        }
    }
}

fn speech_report(service: &SpeechService) -> SpeechReport {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &service.stats;
    SpeechReport {
        models_dir: service.models().dir.display().to_string(),
        legs_open: s.legs_open.load(Relaxed),
        legs_total: s.legs_total.load(Relaxed),
        utterances: s.utterances.load(Relaxed),
        audio_secs: s.audio_ms.load(Relaxed) as f64 / 1000.0,
        asr_secs: s.asr_ms.load(Relaxed) as f64 / 1000.0,
        errors: s.errors.load(Relaxed),
        asr_queue: {
            let q = service.models().asr_pool.report();
            AsrQueueReport {
                slots: q.slots,
                busy: q.busy,
                waiting: q.waiting,
                oldest_wait_secs: q.oldest_wait_secs,
                max_wait_secs: q.max_wait_secs,
                batch_limit: q.batch_limit,
                largest_batch: q.largest_batch,
            }
        },
    }
}
