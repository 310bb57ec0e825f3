//! `callbox bench soak`: the real daemon under a steady load of two-leg AudioSocket calls
//! for N minutes, its resident memory printed every minute, with optional bounds a CI run
//! checks (peak RSS, growth after every slot has run a call, every call finished).
//!
//! The load ([`super::load`], shared with `bench capacity`): `--calls` call slots, each
//! streaming the sample two-leg call (agent and customer talking in turns) in real time,
//! back to back with a fresh call id, the slots staggered over one call's length so
//! utterance ends spread out as on a real box.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load::{percentile, LatencyParts, Load, Observed, TwoLegCall};
use crate::exit::{self, Failure};
use crate::private_daemon::PrivateDaemon;

/// How often the daemon's RSS is read (the peak is the largest of these).
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub struct BenchSoak {
    pub minutes: u32,
    pub calls: usize,
    pub rate: u32,
    pub models: PathBuf,
    pub call: PathBuf,
    pub language: String,
    pub max_rss_mb: Option<f64>,
    pub max_growth_pct: Option<f64>,
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Minute {
    minute: u32,
    rss_mb: f64,
    peak_rss_mb: f64,
    calls_finished: usize,
    utterances: usize,
    /// Utterance end (in the audio) → the understood utterance on the bus, seconds.
    latency_p50_secs: f64,
    latency_p99_secs: f64,
}

/// The daemon's resident memory now, in MB (`/proc/PID/status`).
fn rss_mb(pid: u32) -> f64 {
    super::memory_mb(&format!("/proc/{pid}/status")).0
}

pub fn bench_soak(opts: &BenchSoak) -> Result<u8, Failure> {
    let fail = |message: String| Failure::new(exit::FAILURE, message);
    if opts.minutes == 0 || opts.calls == 0 {
        return Err(Failure::new(exit::USAGE, "--minutes and --calls must be at least 1"));
    }
    let call = TwoLegCall::from_stereo(&opts.call, opts.rate).map_err(fail)?;
    let mut daemon =
        PrivateDaemon::start(&opts.models, &opts.language, 0, crate::config::DEFAULT_ASR_BATCH).map_err(fail)?;
    let pid = daemon.pid();
    let say = |line: String| {
        if !opts.json {
            println!("{line}");
        }
    };
    say(format!(
        "daemon ready in {:.1} s, RSS {:.0} MB; {} call slots of {:.0} s two-leg calls at {} Hz for {} min",
        daemon.ready_secs,
        rss_mb(pid),
        opts.calls,
        call.secs,
        opts.rate,
        opts.minutes
    ));

    let call = Arc::new(call);
    let duration = Duration::from_secs(u64::from(opts.minutes) * 60);
    let begun = Instant::now();
    let mut load = Load::start(&daemon, &call, opts.calls, duration);
    let mut minutes: Vec<Minute> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut all_latencies: Vec<f64> = Vec::new();
    let mut parts = LatencyParts::default();
    let mut utterances = 0usize;
    let mut peak = 0.0f64;
    let mut next_sample = Instant::now();
    let mut next_minute = begun + Duration::from_secs(60);
    loop {
        if let Some(code) = daemon.exited() {
            load.finish();
            return Err(fail(format!("the daemon exited ({code}) during the soak; its log:\n{}", daemon.log_tail())));
        }
        let now = Instant::now();
        if now >= next_sample {
            peak = peak.max(rss_mb(pid));
            next_sample = now + SAMPLE_EVERY;
        }
        if now >= next_minute && minutes.len() < opts.minutes as usize {
            let rss = rss_mb(pid);
            peak = peak.max(rss);
            latencies.sort_by(f64::total_cmp);
            let minute = Minute {
                minute: minutes.len() as u32 + 1,
                rss_mb: rss,
                peak_rss_mb: peak,
                calls_finished: load.finished(),
                utterances,
                latency_p50_secs: percentile(&latencies, 50.0),
                latency_p99_secs: percentile(&latencies, 99.0),
            };
            say(format!(
                "minute {:>3}: RSS {:>5.0} MB (peak {:>5.0}), {:>3} calls finished, {:>4} utterances, utterance end → \
                 understood p50 {:.2} s p99 {:.2} s",
                minute.minute,
                minute.rss_mb,
                minute.peak_rss_mb,
                minute.calls_finished,
                minute.utterances,
                minute.latency_p50_secs,
                minute.latency_p99_secs
            ));
            minutes.push(minute);
            latencies.clear();
            utterances = 0;
            next_minute += Duration::from_secs(60);
        }
        if minutes.len() >= opts.minutes as usize && load.done() {
            break;
        }
        if let Some(Observed::Utterance { latency_secs, parts: daemon_parts }) = load.poll(Duration::from_millis(200)) {
            parts.add(latency_secs, daemon_parts.as_ref());
            latencies.push(latency_secs);
            all_latencies.push(latency_secs);
            utterances += 1;
        }
    }
    let end = load.finish();
    let (started, finished, total_utterances) = (end.started, end.finished, all_latencies.len());
    let final_rss = rss_mb(pid);
    drop(daemon);

    all_latencies.sort_by(f64::total_cmp);
    // The warm-up lasts until every slot has run a whole call (allocator arenas, plan
    // scratch for each window length, every ASR worker's batch at its widest): growth is
    // the last minute's RSS against the first minute after that, both under load.
    let (baseline_minute, baseline, warm) = warmed_up(&minutes, opts.calls).unwrap_or((0, final_rss, false));
    let last = minutes.last().map_or(final_rss, |m| m.rss_mb);
    let growth_pct = if baseline > 0.0 { (last - baseline) / baseline * 100.0 } else { 0.0 };
    let errors = end.stream_errors;
    let mut problems = Vec::new();
    if finished < started {
        problems.push(format!("{} of {started} calls did not finish", started - finished));
    }
    if !errors.is_empty() {
        problems.push(format!("{} legs could not be streamed: {}", errors.len(), errors[0]));
    }
    if let Some(max) = opts.max_rss_mb.filter(|&max| peak > max) {
        problems.push(format!("peak RSS {peak:.0} MB is over the bound of {max:.0} MB"));
    }
    if let Some(max) = opts.max_growth_pct.filter(|&max| growth_pct > max) {
        problems
            .push(format!("RSS grew {growth_pct:.1} % after minute {baseline_minute}, over the bound of {max:.1} %"));
    }
    if opts.json {
        let report = serde_json::json!({
            "minutes": minutes,
            "calls": { "slots": opts.calls, "started": started, "finished": finished },
            "utterances": total_utterances,
            "latency_secs": { "p50": percentile(&all_latencies, 50.0), "p99": percentile(&all_latencies, 99.0) },
            "latency_parts": parts.breakdown(),
            "rss_mb": { "baseline_minute": baseline_minute, "baseline": baseline, "last_minute": last, "after_drain": final_rss, "peak": peak, "growth_pct": growth_pct },
            "problems": problems,
        });
        println!("{report}");
    } else {
        println!(
            "{finished} of {started} calls finished, {total_utterances} utterances (end → understood p50 {:.2} s, p99 \
             {:.2} s); RSS {baseline:.0} MB after minute {baseline_minute} ({}), {last:.0} MB after the last \
             ({growth_pct:+.1} %), \
             {final_rss:.0} MB idle after the drain, peak {peak:.0} MB",
            percentile(&all_latencies, 50.0),
            percentile(&all_latencies, 99.0),
            if warm { "every slot had run a call" } else { "not every slot had run a call yet: no growth measured" },
        );
        if let Some(parts) = parts.breakdown() {
            println!("where the latency went, {parts}");
        }
        for p in &problems {
            println!("FAILED: {p}");
        }
    }
    Ok(if problems.is_empty() { exit::OK } else { exit::FAILURE })
}

/// The minute (1-based) the growth is measured from, its RSS, and whether the load had
/// warmed up by then: the first minute by whose end every slot had finished a call, else
/// the last minute (a soak shorter than a call's warm-up measures no growth rather than
/// the warm-up's).
fn warmed_up(minutes: &[Minute], slots: usize) -> Option<(u32, f64, bool)> {
    match minutes.iter().find(|m| m.calls_finished >= slots) {
        Some(m) => Some((m.minute, m.rss_mb, true)),
        None => minutes.last().map(|m| (m.minute, m.rss_mb, false)),
    }
}

/// The models folder and the sample call a soak uses: `--models`, else the configured one
/// (a checkout's `models/cache` when the packaged folder is absent).
pub fn soak_inputs(config_path: &Path, models: Option<&Path>, call: Option<&Path>) -> (PathBuf, PathBuf) {
    let models = crate::demo::models_dir(config_path, models);
    let models = std::path::absolute(&models).unwrap_or(models);
    let call = call.map_or_else(|| crate::demo::default_call(&models), Path::to_path_buf);
    (models, call)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(minute: u32, rss_mb: f64, calls_finished: usize) -> Minute {
        Minute { minute, rss_mb, calls_finished, ..Default::default() }
    }

    #[test]
    fn growth_is_measured_from_the_first_minute_every_slot_has_run_a_call() {
        // A 52-s call on 4 slots staggered over its length: the last slot ends in minute 2.
        let minutes = [minute(1, 300.0, 1), minute(2, 340.0, 5), minute(3, 341.0, 9), minute(4, 342.0, 13)];
        assert_eq!(warmed_up(&minutes, 4), Some((2, 340.0, true)));
        assert_eq!(warmed_up(&minutes, 1), Some((1, 300.0, true)));
        // Never warmed up: the last minute, so no growth is claimed from the warm-up.
        assert_eq!(warmed_up(&minutes, 20), Some((4, 342.0, false)));
        assert_eq!(warmed_up(&[], 4), None);
    }
}
