//! `callbox bench capacity`: how many simultaneous two-leg calls this box carries.
//!
//! A private daemon (this binary's `run`, the configured ASR pool) takes N calls at once
//! over AudioSocket on loopback, streamed in real time with both legs talking in turns;
//! N doubles from `--start` until a step breaks the budget, then the gap is halved
//! ([`crate::calls::capacity::next_step`]). A step passes when every call finished, the
//! p99 of utterance end → understood utterance is within the budget and no frame had to
//! wait more than [`MAX_LAG`] to be taken (a real PBX would have dropped it). The rated
//! capacity is the largest passing N; `--save` writes it where the daemon reads it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::load::{percentile, LatencyParts, Load, Observed, TwoLegCall};
use crate::calls::capacity::{next_step, rated_calls, Rating, Step};
use crate::exit::{self, Failure};
use crate::private_daemon::PrivateDaemon;

/// A frame this late was held back by the daemon: Asterisk would have dropped audio.
const MAX_LAG: Duration = Duration::from_millis(500);

/// Where the load comes from.
pub enum CallSource {
    /// A stereo two-leg recording (agent left, customer right).
    Stereo(PathBuf),
    /// Mono recordings taking turns on the two legs.
    Clips(PathBuf),
}

pub struct BenchCapacity {
    pub source: CallSource,
    pub rate: u32,
    pub language: String,
    pub models: PathBuf,
    pub asr_workers: u32,
    pub asr_batch: u32,
    pub budget_secs: f64,
    pub step_secs: u64,
    pub start: usize,
    pub max_calls: usize,
    /// Where to save the rating (the daemon's data directory), if asked to.
    pub save_to: Option<PathBuf>,
    pub json: bool,
}

pub fn bench_capacity(opts: &BenchCapacity) -> Result<u8, Failure> {
    let fail = |message: String| Failure::new(exit::FAILURE, message);
    if opts.start == 0 || opts.max_calls < opts.start || opts.budget_secs.is_nan() || opts.budget_secs <= 0.0 {
        return Err(Failure::new(exit::USAGE, "need 1 ≤ --start ≤ --max-calls and a positive --budget-secs"));
    }
    let (call, load_name) = match &opts.source {
        CallSource::Stereo(path) => (TwoLegCall::from_stereo(path, opts.rate), path.display().to_string()),
        CallSource::Clips(dir) => (
            TwoLegCall::from_clips(dir, opts.rate, Duration::from_millis(800)),
            format!("the clips in {} taking turns", dir.display()),
        ),
    };
    let call = Arc::new(call.map_err(fail)?);
    let load_name = format!("{load_name} ({:.0}-s two-leg calls at {} Hz)", call.secs, opts.rate);
    let models_version = crate::speech::manifest::ModelSet::open(&opts.models)
        .map(|m| m.version)
        .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("{}: {e}", opts.models.display())))?;
    let mut daemon =
        PrivateDaemon::start(&opts.models, &opts.language, opts.asr_workers, opts.asr_batch).map_err(fail)?;
    let say = |line: String| {
        if !opts.json {
            println!("{line}");
        }
    };
    let asr_workers = crate::speech::scheduler::slots_for(opts.asr_workers as usize);
    say(format!(
        "daemon ready in {:.1} s ({asr_workers} ASR workers, batches of up to {}); load: {load_name}; budget: p99 \
         utterance end → understood ≤ {:.2} s",
        daemon.ready_secs, opts.asr_batch, opts.budget_secs
    ));
    // The first transcriptions of each window length are slower (plan scratch, caches):
    // one call first, not counted.
    let warm_up = Load::start(&daemon, &call, 1, Duration::from_secs_f64(call.secs + 0.5));
    run_step(&mut daemon, warm_up, 1, opts.budget_secs)?;

    let step_length = Duration::from_secs(opts.step_secs).max(Duration::from_secs_f64(2.0 * call.secs + 1.0));
    say(format!(
        " calls  started  finished  utterances  p50 (s)  p99 (s)  lag (s)  result  [{} s per step]",
        step_length.as_secs()
    ));
    let mut steps: Vec<Step> = Vec::new();
    while let Some(calls) = next_step(&steps, opts.start, opts.max_calls) {
        let load = Load::start(&daemon, &call, calls, step_length);
        let step = run_step(&mut daemon, load, calls, opts.budget_secs)?;
        say(format!(
            "{:>6}  {:>7}  {:>8}  {:>10}  {:>7.2}  {:>7.2}  {:>7.2}  {}",
            step.calls,
            step.calls_started,
            step.calls_finished,
            step.utterances,
            step.p50_secs,
            step.p99_secs,
            step.max_lag_secs,
            step.failed.as_deref().map_or_else(|| "pass".to_owned(), |why| format!("FAIL: {why}"))
        ));
        if let Some(parts) = &step.parts {
            say(format!("        {parts}"));
        }
        steps.push(step);
    }
    drop(daemon);

    let rating = Rating {
        rated_calls: rated_calls(&steps),
        budget_secs: opts.budget_secs,
        measured_at_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        cpu: cpu_model(),
        models_version,
        asr_workers,
        asr_batch: opts.asr_batch as usize,
        load: load_name,
        steps,
    };
    let saved = match &opts.save_to {
        Some(dir) => Some(crate::calls::registry::write_rating(dir, &rating).map_err(|e| {
            let hint = "run it as root or as the daemon's user; the daemon's first start makes the data directory";
            Failure::new(exit::OS_ERROR, format!("cannot save the rating in {}: {e} ({hint})", dir.display()))
        })?),
        None => None,
    };
    if opts.json {
        println!("{}", serde_json::to_string(&rating).map_err(|e| fail(e.to_string()))?);
        return Ok(exit::OK);
    }
    let at_rated = rating.steps.iter().find(|s| s.calls == rating.rated_calls);
    match at_rated {
        Some(s) => println!(
            "rated capacity: {} simultaneous two-leg calls (p50 {:.2} s, p99 {:.2} s ≤ {:.2} s) on {} cores ({})",
            rating.rated_calls, s.p50_secs, s.p99_secs, rating.budget_secs, rating.cores, rating.cpu
        ),
        None => println!(
            "rated capacity: 0 — not even {} call kept p99 within {:.2} s on this box",
            opts.start, rating.budget_secs
        ),
    }
    match saved {
        Some(path) => {
            println!("saved to {}; `callbox reload` (or a restart) makes the daemon hold to it", path.display())
        }
        None => println!("not saved (add --save to make the daemon hold to it)"),
    }
    Ok(exit::OK)
}

/// Runs one load to its end and judges it.
fn run_step(daemon: &mut PrivateDaemon, mut load: Load, calls: usize, budget_secs: f64) -> Result<Step, Failure> {
    let mut latencies = Vec::new();
    let mut parts = LatencyParts::default();
    while !load.done() {
        if let Some(code) = daemon.exited() {
            load.finish();
            return Err(Failure::new(
                exit::FAILURE,
                format!("the daemon exited ({code}) under {calls} calls; its log:\n{}", daemon.log_tail()),
            ));
        }
        if let Some(Observed::Utterance { latency_secs, parts: daemon_parts }) = load.poll(Duration::from_millis(200)) {
            latencies.push(latency_secs);
            parts.add(latency_secs, daemon_parts.as_ref());
        }
    }
    let end = load.finish();
    latencies.sort_by(f64::total_cmp);
    let (p50_secs, p99_secs) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    let failed = if let Some(error) = end.stream_errors.first() {
        Some(format!("{} legs could not be streamed: {error}", end.stream_errors.len()))
    } else if end.finished < end.started {
        Some(format!("{} of {} calls did not finish", end.started - end.finished, end.started))
    } else if latencies.is_empty() {
        Some("no utterance came back".to_owned())
    } else if p99_secs > budget_secs {
        Some(format!("p99 {p99_secs:.2} s over the budget"))
    } else if end.max_lag_secs > MAX_LAG.as_secs_f64() {
        Some(format!("audio held back {:.2} s (a PBX would drop it)", end.max_lag_secs))
    } else {
        None
    };
    Ok(Step {
        calls,
        calls_started: end.started,
        calls_finished: end.finished,
        utterances: latencies.len(),
        p50_secs,
        p99_secs,
        max_lag_secs: end.max_lag_secs,
        failed,
        parts: parts.breakdown(),
    })
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}
