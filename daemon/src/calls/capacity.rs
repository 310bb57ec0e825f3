//! The box's rated capacity and the call limit the daemon enforces from it (pure).
//!
//! `callbox bench capacity --save` measures how many simultaneous two-leg calls this box
//! carries with utterance end → understood p99 within the budget, and writes a [`Rating`]
//! to `<data_dir>/capacity.json`. The daemon reads it at start and on reload: the limit
//! is then the smaller of `calls.max_concurrent` and the rating, so a box never admits a
//! call that would push every call's events past the budget. A rating measured on other
//! hardware (core count), other models or another ASR pool size describes another box:
//! it is set aside with a warning until the benchmark is run again.

use serde::{Deserialize, Serialize};

/// Where the rating lives in the data directory.
pub const RATING_FILE: &str = "capacity.json";
/// A rating file is a few kilobytes; anything much larger is not one.
pub const MAX_RATING_BYTES: u64 = 256 * 1024;

/// One load step of the benchmark: `calls` simultaneous calls for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub calls: usize,
    pub calls_started: usize,
    pub calls_finished: usize,
    pub utterances: usize,
    pub p50_secs: f64,
    pub p99_secs: f64,
    /// The latest a frame went out behind real time (the daemon held the stream back).
    pub max_lag_secs: f64,
    /// Why the step failed; None when it passed.
    pub failed: Option<String>,
    /// Where the utterances' time went (a rating saved before it was measured: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<LatencyBreakdown>,
}

/// The median and the 99th percentile of one part of the latency, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub p50_secs: f64,
    pub p99_secs: f64,
}

/// Utterance end → understood, taken apart: where a box under load spends the budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyBreakdown {
    /// End of the words → the VAD closes the utterance: the hangover, the leg's VAD
    /// keeping up with its audio, and the sockets both ways.
    pub to_close: Spread,
    /// The hangover alone (audio heard after the words).
    pub hangover: Spread,
    /// Waiting for an ASR worker.
    pub asr_queue: Spread,
    /// In an ASR worker, and of that the utterance's own encoder (the rest is its decoder
    /// steps and the encoders of utterances that joined its batch).
    pub asr: Spread,
    pub encoder: Spread,
    /// The text models (intent, sentiment).
    pub text: Spread,
    /// The rest after the close: prosody, hand-offs between threads and tasks, the rules.
    pub other: Spread,
}

impl std::fmt::Display for LatencyBreakdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            ("to close", self.to_close),
            ("hangover", self.hangover),
            ("ASR queue", self.asr_queue),
            ("ASR", self.asr),
            ("its encoder", self.encoder),
            ("text", self.text),
            ("other", self.other),
        ];
        let shown: Vec<String> =
            parts.iter().map(|(name, s)| format!("{name} {:.2}/{:.2}", s.p50_secs, s.p99_secs)).collect();
        write!(f, "p50/p99 s: {}", shown.join(", "))
    }
}

/// What `bench capacity` measured, as saved for the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    /// The most simultaneous calls that passed (0: not even one call kept the budget).
    pub rated_calls: usize,
    pub budget_secs: f64,
    pub measured_at_unix_ms: u64,
    pub daemon_version: String,
    /// The box it was measured on: logical cores, the CPU model, the models' version,
    /// the ASR pool size and its batch limit (a rating saved before batching: 1).
    pub cores: usize,
    pub cpu: String,
    pub models_version: String,
    pub asr_workers: usize,
    #[serde(default = "unbatched")]
    pub asr_batch: usize,
    /// What was streamed (the call's source, its rate).
    pub load: String,
    pub steps: Vec<Step>,
}

/// The facts of the running box a rating must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxFacts {
    pub cores: usize,
    pub models_version: String,
    pub asr_workers: usize,
    pub asr_batch: usize,
}

fn unbatched() -> usize {
    1
}

impl Rating {
    /// Why the rating does not describe this box, if it does not.
    pub fn mismatch(&self, here: &BoxFacts) -> Option<String> {
        let mut differences = Vec::new();
        if self.cores != here.cores {
            differences.push(format!("{} cores then, {} now", self.cores, here.cores));
        }
        if self.models_version != here.models_version {
            differences.push(format!("models {} then, {} now", self.models_version, here.models_version));
        }
        if self.asr_workers != here.asr_workers {
            differences.push(format!("{} ASR workers then, {} now", self.asr_workers, here.asr_workers));
        }
        if self.asr_batch != here.asr_batch {
            differences.push(format!("ASR batches of up to {} then, {} now", self.asr_batch, here.asr_batch));
        }
        (!differences.is_empty()).then(|| differences.join(", "))
    }
}

/// The rating in brief, as HQ is told it (`birth`): enough to compare boxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingSummary {
    pub rated_calls: usize,
    pub budget_ms: u64,
    /// Utterance end → understood at the rated capacity, and with one call.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub one_call_p50_ms: u64,
    pub one_call_p99_ms: u64,
    pub measured_at_unix_ms: u64,
    pub cpu: String,
    pub cores: usize,
    /// False when it was measured on another box as it is now (then set aside).
    pub in_force: bool,
}

/// The limit on simultaneous calls and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLimit {
    pub max_calls: usize,
    /// Said in the hang-up reason and in `status`.
    pub source: String,
    /// Something the technician should act on (no rating, a stale one).
    pub warning: Option<String>,
    /// The box's rating, when there is one.
    pub rating: Option<RatingSummary>,
}

impl Rating {
    pub fn summary(&self, in_force: bool) -> RatingSummary {
        let ms = |secs: f64| (secs * 1000.0).round() as u64;
        let at = |calls: usize| self.steps.iter().find(|s| s.calls == calls && s.failed.is_none());
        let (rated, one) = (at(self.rated_calls), at(1));
        RatingSummary {
            rated_calls: self.rated_calls,
            budget_ms: ms(self.budget_secs),
            p50_ms: rated.map_or(0, |s| ms(s.p50_secs)),
            p99_ms: rated.map_or(0, |s| ms(s.p99_secs)),
            one_call_p50_ms: one.map_or(0, |s| ms(s.p50_secs)),
            one_call_p99_ms: one.map_or(0, |s| ms(s.p99_secs)),
            measured_at_unix_ms: self.measured_at_unix_ms,
            cpu: self.cpu.clone(),
            cores: self.cores,
            in_force,
        }
    }
}

/// What the daemon found in `<data_dir>/capacity.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum RatingFile {
    Missing,
    Unreadable(String),
    Found(Box<Rating>),
}

/// The call limit from the configured cap and the box's rating.
pub fn call_limit(max_concurrent: usize, use_rating: bool, rating: &RatingFile, here: &BoxFacts) -> CallLimit {
    let configured = |warning: Option<String>| CallLimit {
        max_calls: max_concurrent,
        source: "calls.max_concurrent".into(),
        warning,
        rating: None,
    };
    if !use_rating {
        return configured(None);
    }
    let rating = match rating {
        RatingFile::Missing => {
            return configured(Some(
                "this box's capacity is not rated: run `callbox bench capacity --save` when it carries no calls".into(),
            ))
        }
        RatingFile::Unreadable(why) => {
            return configured(Some(format!("the capacity rating is not used: {why}")));
        }
        RatingFile::Found(rating) => rating,
    };
    if let Some(why) = rating.mismatch(here) {
        return CallLimit {
            rating: Some(rating.summary(false)),
            ..configured(Some(format!(
                "the capacity rating describes another box ({why}): run `callbox bench capacity --save` again"
            )))
        };
    }
    // A box that cannot keep the budget even for one call still takes one: refusing every
    // call would be worse than late events, and the warning says so.
    let rated = rating.rated_calls.max(1);
    let warning = (rating.rated_calls == 0).then(|| {
        format!(
            "even one call missed the {:.1}-s latency budget in `bench capacity`: one call at a time",
            rating.budget_secs
        )
    });
    let summary = Some(rating.summary(true));
    if rated >= max_concurrent {
        return CallLimit { warning, rating: summary, ..configured(None) };
    }
    CallLimit {
        max_calls: rated,
        source: format!("the box's rated capacity, `callbox bench capacity` of {}", day_of(rating.measured_at_unix_ms)),
        warning,
        rating: summary,
    }
}

/// The UTC day of a unix-millisecond time, as YYYY-MM-DD.
fn day_of(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64;
    // Civil from days (Howard Hinnant's algorithm), so no clock or date crate is needed.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The rated capacity the search settles on: the largest passing step below the smallest
/// failing one (steps are tried in any order).
pub fn rated_calls(steps: &[Step]) -> usize {
    let first_failure = steps.iter().filter(|s| s.failed.is_some()).map(|s| s.calls).min().unwrap_or(usize::MAX);
    steps.iter().filter(|s| s.failed.is_none() && s.calls < first_failure).map(|s| s.calls).max().unwrap_or(0)
}

/// The next number of calls to try after `steps`, or None when the rating is settled:
/// doubling from `start` until a step fails or `max` passes, then halving the gap between
/// the largest pass and the smallest failure.
pub fn next_step(steps: &[Step], start: usize, max: usize) -> Option<usize> {
    let start = start.clamp(1, max.max(1));
    let Some(last) = steps.last() else { return Some(start) };
    let passed = rated_calls(steps);
    let failed = steps.iter().filter(|s| s.failed.is_some()).map(|s| s.calls).min();
    match failed {
        None if last.calls >= max => None,
        None => Some((last.calls * 2).min(max)),
        // Settled when the largest pass sits right below the smallest failure.
        Some(failed) if failed <= passed + 1 => None,
        Some(failed) => Some(passed + (failed - passed) / 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(calls: usize, pass: bool) -> Step {
        Step {
            parts: None,
            calls,
            calls_started: calls,
            calls_finished: calls,
            utterances: 10,
            p50_secs: 0.5,
            p99_secs: if pass { 1.0 } else { 2.0 },
            max_lag_secs: 0.0,
            failed: (!pass).then(|| "p99 2.0 s over the budget".into()),
        }
    }

    fn run(start: usize, max: usize, capacity: usize) -> (usize, Vec<usize>) {
        let mut steps = Vec::new();
        while let Some(calls) = next_step(&steps, start, max) {
            assert!(steps.len() < 20, "the search does not end: {steps:?}");
            steps.push(step(calls, calls <= capacity));
        }
        (rated_calls(&steps), steps.iter().map(|s| s.calls).collect())
    }

    #[test]
    fn the_search_doubles_then_halves_the_gap() {
        assert_eq!(run(1, 64, 11), (11, vec![1, 2, 4, 8, 16, 12, 10, 11]));
        assert_eq!(run(1, 64, 64), (64, vec![1, 2, 4, 8, 16, 32, 64]));
        assert_eq!(run(1, 20, 100), (20, vec![1, 2, 4, 8, 16, 20]));
        assert_eq!(run(1, 64, 0), (0, vec![1]));
        assert_eq!(run(4, 64, 2), (2, vec![4, 2, 3]));
        assert_eq!(run(4, 64, 0), (0, vec![4, 2, 1]));
        assert_eq!(run(2, 64, 5), (5, vec![2, 4, 8, 6, 5]));
    }

    fn rating(calls: usize) -> Rating {
        Rating {
            rated_calls: calls,
            budget_secs: 1.5,
            measured_at_unix_ms: 1_796_256_000_000,
            daemon_version: "0.1.0".into(),
            cores: 2,
            cpu: "x".into(),
            models_version: "m1".into(),
            asr_workers: 2,
            asr_batch: 4,
            load: "call.wav at 8000 Hz".into(),
            steps: vec![step(1, true), step(4, true), step(6, true), step(8, false)],
        }
    }

    fn here() -> BoxFacts {
        BoxFacts { cores: 2, models_version: "m1".into(), asr_workers: 2, asr_batch: 4 }
    }

    #[test]
    fn a_matching_rating_lowers_the_limit_and_says_so() {
        let limit = call_limit(32, true, &RatingFile::Found(Box::new(rating(6))), &here());
        assert_eq!(limit.max_calls, 6);
        assert_eq!(limit.source, "the box's rated capacity, `callbox bench capacity` of 2026-12-03");
        assert_eq!(limit.warning, None);
        let summary = limit.rating.unwrap();
        assert_eq!(
            (summary.rated_calls, summary.p99_ms, summary.one_call_p50_ms, summary.in_force),
            (6, 1000, 500, true)
        );
        // The configured cap still wins when it is lower.
        assert_eq!(call_limit(4, true, &RatingFile::Found(Box::new(rating(6))), &here()).max_calls, 4);
        // And the rating is ignored when the operator says so.
        assert_eq!(call_limit(32, false, &RatingFile::Found(Box::new(rating(6))), &here()).max_calls, 32);
    }

    #[test]
    fn a_rating_of_another_box_or_none_leaves_the_cap_with_a_warning() {
        let other = BoxFacts { cores: 4, models_version: "m2".into(), asr_workers: 2, asr_batch: 4 };
        let limit = call_limit(32, true, &RatingFile::Found(Box::new(rating(6))), &other);
        assert_eq!(limit.max_calls, 32);
        let warning = limit.warning.unwrap();
        assert!(warning.contains("2 cores then, 4 now, models m1 then, m2 now"), "{warning}");
        assert!(!limit.rating.unwrap().in_force);
        let missing = call_limit(32, true, &RatingFile::Missing, &here());
        assert_eq!((missing.max_calls, missing.source.as_str()), (32, "calls.max_concurrent"));
        assert!(missing.warning.unwrap().contains("bench capacity --save"));
        let bad = call_limit(32, true, &RatingFile::Unreadable("line 1: EOF".into()), &here());
        assert!(bad.warning.unwrap().contains("line 1: EOF"));
    }

    #[test]
    fn a_rating_saved_before_batching_describes_an_unbatched_box() {
        let mut saved = serde_json::to_value(rating(6)).unwrap();
        saved.as_object_mut().unwrap().remove("asr_batch");
        let old: Rating = serde_json::from_value(saved).unwrap();
        assert_eq!(old.asr_batch, 1);
        let limit = call_limit(32, true, &RatingFile::Found(Box::new(old)), &here());
        assert_eq!(limit.max_calls, 32);
        assert!(limit.warning.unwrap().contains("ASR batches of up to 1 then, 4 now"));
    }

    #[test]
    fn a_box_rated_at_zero_still_takes_one_call() {
        let limit = call_limit(32, true, &RatingFile::Found(Box::new(rating(0))), &here());
        assert_eq!(limit.max_calls, 1);
        assert!(limit.warning.unwrap().contains("one call at a time"));
    }

    #[test]
    fn days_are_civil_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_796_256_000_000), "2026-12-03");
    }
}
