//! Per-interval metrics for HQ (the `aggregates` lane): what finished calls add to their
//! window's counters, and the counters' merge. Numerators and denominators only (sums,
//! counts, histogram buckets), never a bare ratio, so HQ can re-aggregate by any subset of
//! the key. Pure: the store keeps the open windows in `calls.sqlite` and emits a window's
//! counters once it has closed.
//!
//! A call counts in the window in which the box finished it (its summary, in the `calls`
//! lane, carries its own start and end). Each key is emitted once: a window closed is never
//! reopened, so a clock set back puts later calls in the open window instead.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the latency histograms' buckets; one more bucket counts the rest.
pub const LATENCY_BUCKETS_MS: [u32; 14] = [25, 50, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000];

/// What makes an aggregate unique: HQ stores one per key (a resend is the same key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateKey {
    pub site: String,
    #[serde(rename = "box")]
    pub box_id: String,
    pub window_start_unix_ms: i64,
    pub window_secs: u32,
    /// The agent's pseudonym (as in the call summaries).
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    /// The rule set's version (a digest of the rule file) the calls were checked with.
    pub rules_version: String,
    /// The models' version (a digest of the model manifest's files).
    pub models_version: String,
}

impl AggregateKey {
    /// When the window closes (ms since the epoch).
    pub fn window_end_unix_ms(&self) -> i64 {
        self.window_start_unix_ms + i64::from(self.window_secs) * 1000
    }
}

/// A histogram of latencies in ms over `LATENCY_BUCKETS_MS` (+1 overflow bucket), with the
/// count, sum and max: merged by adding, so HQ can re-aggregate and read percentiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    pub count: u64,
    pub sum_ms: f64,
    pub max_ms: f64,
    /// Counts per bucket: `buckets[i]` holds values ≤ `LATENCY_BUCKETS_MS[i]` (and above
    /// the bound before it); the last holds the values above the last bound.
    pub buckets: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { count: 0, sum_ms: 0.0, max_ms: 0.0, buckets: vec![0; LATENCY_BUCKETS_MS.len() + 1] }
    }
}

impl Histogram {
    pub fn record(&mut self, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        let bucket = LATENCY_BUCKETS_MS.iter().position(|b| ms <= f64::from(*b)).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.fit();
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum_ms += ms;
        self.max_ms = self.max_ms.max(ms);
    }

    pub fn merge(&mut self, other: &Histogram) {
        self.fit();
        for (i, n) in other.buckets.iter().enumerate().take(self.buckets.len()) {
            self.buckets[i] += n;
        }
        self.count += other.count;
        self.sum_ms += other.sum_ms;
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// The bucket bound under which `q` (0..=1) of the values fall: an upper estimate
    /// (the max for the overflow bucket); None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BUCKETS_MS.get(i).map_or(self.max_ms, |b| f64::from(*b).min(self.max_ms)));
            }
        }
        Some(self.max_ms)
    }

    /// A stored histogram of another length (read back) gets this version's buckets.
    fn fit(&mut self) {
        self.buckets.resize(LATENCY_BUCKETS_MS.len() + 1, 0);
    }
}

/// The window's counters: sums over the calls the box finished in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    pub calls: u64,
    /// Calls converted by the time they were counted.
    pub converted: u64,
    /// Calls of earlier windows the PBX/CRM said were converted during this one (so the
    /// conversions of a key are `converted` + `converted_after_end` over all its windows).
    pub converted_after_end: u64,
    pub duration_secs: f64,
    /// Seconds of speech per leg.
    pub talk_secs: BTreeMap<String, f64>,
    /// Seconds in which no leg spoke.
    pub silence_secs: f64,
    /// Seconds in which both legs spoke at once.
    pub talk_over_secs: f64,
    pub utterances: u64,
    /// Intent label → customer utterances with it.
    pub intents: BTreeMap<String, u64>,
    pub emotions: BTreeMap<String, u64>,
    pub events: BTreeMap<String, u64>,
    /// Rule id → severity → hits.
    pub rule_hits: BTreeMap<String, BTreeMap<String, u64>>,
    /// Whisper's compute time per utterance.
    pub asr_ms: Histogram,
    /// The text models' time per utterance (intent, emotion), from the transcript to the facts.
    pub understanding_ms: Histogram,
}

/// What one finished call brings to its window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallFacts {
    pub duration_secs: f64,
    pub converted: bool,
    /// Speech spans: (leg, start, end) in seconds from the call's start.
    pub spans: Vec<(String, f64, f64)>,
    pub intents: BTreeMap<String, u32>,
    pub emotions: BTreeMap<String, u32>,
    pub events: BTreeMap<String, u32>,
    /// (rule, severity) per hit.
    pub hits: Vec<(String, String)>,
    pub asr_ms: Vec<f64>,
    pub understanding_ms: Vec<f64>,
}

impl Counters {
    pub fn add_call(&mut self, call: &CallFacts) {
        self.calls += 1;
        self.converted += u64::from(call.converted);
        self.duration_secs = round2(self.duration_secs + call.duration_secs.max(0.0));
        let (talk, silence, over) = talk_profile(call.duration_secs, &call.spans);
        for (leg, secs) in talk {
            let total = self.talk_secs.entry(leg).or_default();
            *total = round2(*total + secs);
        }
        self.silence_secs = round2(self.silence_secs + silence);
        self.talk_over_secs = round2(self.talk_over_secs + over);
        self.utterances += call.spans.len() as u64;
        add_counts(&mut self.intents, &call.intents);
        add_counts(&mut self.emotions, &call.emotions);
        add_counts(&mut self.events, &call.events);
        for (rule, severity) in &call.hits {
            *self.rule_hits.entry(rule.clone()).or_default().entry(severity.clone()).or_default() += 1;
        }
        for ms in &call.asr_ms {
            self.asr_ms.record(*ms);
        }
        for ms in &call.understanding_ms {
            self.understanding_ms.record(*ms);
        }
    }
}

/// The message HQ gets when a window closes: its key and its counters, with the latency
/// percentiles read off the histograms for convenience (HQ re-aggregates from the buckets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntervalReport {
    pub key: AggregateKey,
    pub counters: Counters,
    pub asr_p50_ms: Option<f64>,
    pub asr_p99_ms: Option<f64>,
    pub understanding_p50_ms: Option<f64>,
    pub understanding_p99_ms: Option<f64>,
}

impl IntervalReport {
    pub fn new(key: AggregateKey, counters: Counters) -> Self {
        Self {
            asr_p50_ms: counters.asr_ms.quantile(0.5),
            asr_p99_ms: counters.asr_ms.quantile(0.99),
            understanding_p50_ms: counters.understanding_ms.quantile(0.5),
            understanding_p99_ms: counters.understanding_ms.quantile(0.99),
            key,
            counters,
        }
    }
}

/// The start of the aligned window holding `now_ms` (windows start at multiples of their
/// length since the epoch, so every box's windows line up), but never before
/// `closed_until_ms` (a window once emitted is not reopened): then the first aligned window
/// from there (aligned to this length, should the length have changed since).
pub fn window_start(now_ms: i64, window_secs: u32, closed_until_ms: i64) -> i64 {
    let len = i64::from(window_secs.max(1)) * 1000;
    let aligned = now_ms.div_euclid(len) * len;
    if aligned >= closed_until_ms {
        aligned
    } else {
        let up = if closed_until_ms.rem_euclid(len) == 0 { 0 } else { len };
        closed_until_ms.div_euclid(len) * len + up
    }
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u32>) {
    for (k, n) in from {
        *into.entry(k.clone()).or_default() += u64::from(*n);
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Speech per leg (spans of a leg merged first, so overlapping utterances of one leg count
/// once), silence (no leg speaking, within the call's duration) and talk-over (two or more
/// legs at once).
fn talk_profile(duration_secs: f64, spans: &[(String, f64, f64)]) -> (BTreeMap<String, f64>, f64, f64) {
    let mut per_leg: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (leg, start, end) in spans {
        if end > start {
            per_leg.entry(leg.clone()).or_default().push((*start, *end));
        }
    }
    let mut talk = BTreeMap::new();
    // Edges of every leg's merged spans: +1 where a leg starts, -1 where it stops.
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for (leg, mut list) in per_leg {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut merged: Vec<(f64, f64)> = Vec::new();
        for (s, e) in list {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        talk.insert(leg, merged.iter().map(|(s, e)| e - s).sum());
        for (s, e) in merged {
            edges.push((s, 1));
            edges.push((e, -1));
        }
    }
    // Ends before starts at the same instant: touching spans do not overlap.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut speaking, mut over, mut active, mut last) = (0.0, 0.0, 0, 0.0);
    for (at, step) in edges {
        if active >= 1 {
            speaking += at - last;
        }
        if active >= 2 {
            over += at - last;
        }
        active += step;
        last = at;
    }
    let silence = (duration_secs - speaking).max(0.0);
    (talk, silence, over)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(leg: &str, s: f64, e: f64) -> (String, f64, f64) {
        (leg.into(), s, e)
    }

    #[test]
    fn talk_silence_and_talk_over_come_from_the_spans() {
        // agent 0-4 and 3-5 (merged 0-5), customer 4.5-8: 0.5 s over, 2 s silent of 10.
        let spans = [span("agent", 0.0, 4.0), span("agent", 3.0, 5.0), span("customer", 4.5, 8.0)];
        let (talk, silence, over) = talk_profile(10.0, &spans);
        assert_eq!(talk["agent"], 5.0);
        assert_eq!(talk["customer"], 3.5);
        assert!((over - 0.5).abs() < 1e-9, "{over}");
        assert!((silence - 2.0).abs() < 1e-9, "{silence}");
        // Touching spans are no talk-over.
        let (_, _, over) = talk_profile(4.0, &[span("agent", 0.0, 2.0), span("customer", 2.0, 4.0)]);
        assert_eq!(over, 0.0);
    }

    #[test]
    fn counters_add_calls_and_keep_numerators_and_denominators() {
        let mut c = Counters::default();
        let mut call = CallFacts {
            duration_secs: 10.0,
            converted: true,
            spans: vec![span("agent", 0.0, 4.0), span("customer", 5.0, 7.0)],
            intents: [("price_question".to_owned(), 1)].into(),
            hits: vec![("promise".into(), "critical".into()), ("promise".into(), "critical".into())],
            asr_ms: vec![120.0, 800.0],
            understanding_ms: vec![30.0],
            ..Default::default()
        };
        c.add_call(&call);
        call.converted = false;
        c.add_call(&call);
        assert_eq!((c.calls, c.converted, c.utterances), (2, 1, 4));
        assert_eq!(c.duration_secs, 20.0);
        assert_eq!(c.silence_secs, 8.0);
        assert_eq!(c.talk_secs["customer"], 4.0);
        assert_eq!(c.intents["price_question"], 2);
        assert_eq!(c.rule_hits["promise"]["critical"], 4);
        assert_eq!(c.asr_ms.count, 4);
        assert_eq!(c.asr_ms.buckets[3], 2, "120 ms falls in the ≤150 bucket");
        assert_eq!(c.asr_ms.quantile(0.5), Some(150.0));
        assert_eq!(c.asr_ms.quantile(0.99), Some(800.0), "the bucket bound, capped by the max");
        let back: Counters = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn histograms_merge_by_adding_and_ignore_nonsense() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for ms in [10.0, 20.0, 30.0] {
            a.record(ms);
        }
        b.record(20_000.0);
        b.record(f64::NAN);
        b.record(-1.0);
        a.merge(&b);
        assert_eq!(a.count, 4);
        assert_eq!(a.buckets[0], 2);
        assert_eq!(*a.buckets.last().unwrap(), 1);
        assert_eq!(a.quantile(1.0), Some(20_000.0));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn windows_align_and_never_reopen() {
        let five_min = 300;
        assert_eq!(window_start(1_000_299_999, five_min, 0), 1_000_200_000);
        assert_eq!(window_start(1_000_500_000, five_min, 0), 1_000_500_000);
        // A clock set back into a window already emitted: the open window instead.
        assert_eq!(window_start(1_000_000_000, five_min, 1_000_200_000), 1_000_200_000);
        // ...and after the window length changed (300 s sent, now 360 s): the next
        // 360-s-aligned start, not an unaligned one.
        assert_eq!(window_start(1_000_000_000, 360, 1_000_200_000), 1_000_440_000);
        let key = AggregateKey {
            site: "s".into(),
            box_id: "b".into(),
            window_start_unix_ms: 1_000_200_000,
            window_secs: five_min,
            agent: None,
            campaign: None,
            script: None,
            rules_version: "r".into(),
            models_version: "m".into(),
        };
        assert_eq!(key.window_end_unix_ms(), 1_000_500_000);
        let json = serde_json::to_value(&key).unwrap();
        assert_eq!(json["box"], "b", "the key names the box as the topic does");
    }
}
