//! The rule engine for compliance QA and business rules, sans-IO.
//!
//! Rules come from TOML (packaging/rules.toml is the shipped default; later pushed from
//! headquarters). Each rule has a condition over one utterance and its call context; the
//! fields of a condition must all hold (`all`, `any`, `not` combine conditions):
//! `role`; `keywords_any` / `keywords_all` / `keywords_none` (an entry `@name` stands for
//! the synonym list `name`); `regex`; `near` (two words within N characters);
//! `silence_over_secs` (the gap before this utterance, either leg); `rate_over_cpm`
//! (Chinese characters, or words of other scripts, per minute); `talk_over` (starts before the other leg's last utterance
//! ended); `emotion`, `intent` (any of); `within_first_secs` (from the call's first
//! utterance). A rule fires when its condition has held on `min_count` utterances (default
//! 1), once per call. A `required` rule instead fires when no matching utterance has come
//! `by_secs` after the call's start (checked on every utterance, on `tick`, and at the end).
//!
//! Evaluated incrementally: `CallRules::utterance` runs on every utterance as it arrives.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::audio::Leg;

/// Longest rule file accepted.
pub const MAX_RULES_BYTES: usize = 1 << 20;

/// The shipped rule set, used when no rule file is configured.
pub const DEFAULT_RULES: &str = include_str!("../../../packaging/rules.toml");

/// Reads a rule file (size-bounded before it is read), or the shipped rules when `None`.
/// Every problem comes back at once, each naming its rule.
pub fn load_rules(file: Option<&Path>) -> Result<RuleSet, Vec<String>> {
    let Some(path) = file else { return RuleSet::parse(DEFAULT_RULES) };
    let text = crate::fsio::read_text_bounded(path, MAX_RULES_BYTES as u64, crate::fsio::Links::Follow)
        .map_err(|e| vec![e.to_string()])?;
    RuleSet::parse(&text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Near {
    pub a: String,
    pub b: String,
    /// Largest distance in characters between the end of one and the start of the other.
    pub within: usize,
}

/// A condition: every field that is set must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cond {
    pub all: Option<Vec<Cond>>,
    pub any: Option<Vec<Cond>>,
    pub not: Option<Box<Cond>>,
    pub role: Option<Leg>,
    pub keywords_any: Option<Vec<String>>,
    pub keywords_all: Option<Vec<String>>,
    pub keywords_none: Option<Vec<String>>,
    pub regex: Option<String>,
    pub near: Option<Near>,
    pub silence_over_secs: Option<f64>,
    pub rate_over_cpm: Option<f64>,
    pub talk_over: Option<bool>,
    pub emotion: Option<Vec<String>>,
    pub intent: Option<Vec<String>>,
    pub within_first_secs: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    #[serde(default)]
    pub description: String,
    pub severity: Severity,
    /// The event this rule raises (e.g. `supervisor_alert`), if any.
    pub event: Option<String>,
    pub when: Cond,
    #[serde(default = "one")]
    pub min_count: u32,
    /// A required rule: fires if nothing matched `when` by this many seconds into the call.
    pub by_secs: Option<f64>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub synonyms: BTreeMap<String, Vec<String>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
}

/// A condition with synonyms expanded and regexes compiled.
#[derive(Debug, Clone)]
enum Check {
    All(Vec<Check>),
    Any(Vec<Check>),
    Not(Box<Check>),
    Role(Leg),
    KeywordsAny(Vec<String>),
    KeywordsAll(Vec<String>),
    KeywordsNone(Vec<String>),
    Regex(regex::Regex),
    Near(Vec<String>, Vec<String>, usize),
    SilenceOver(f64),
    RateOver(f64),
    TalkOver(bool),
    Emotion(Vec<String>),
    Intent(Vec<String>),
    WithinFirst(f64),
}

#[derive(Debug, Clone)]
struct Rule {
    id: String,
    description: String,
    severity: Severity,
    event: Option<String>,
    check: Check,
    min_count: u32,
    by_secs: Option<f64>,
}

/// A validated, compiled rule set; shared by every call.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// A digest of the rule file (12 hex digits): which rules judged a call, for HQ.
    version: String,
}

/// One utterance as the rules see it (text already PII-masked).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleInput {
    /// Position of the utterance in its call, for the hits' evidence.
    pub index: usize,
    pub leg: Leg,
    /// Seconds from the call's start.
    pub start_secs: f64,
    pub end_secs: f64,
    pub text: String,
    /// Every intent the model gave the utterance (a reply may carry two); empty when none.
    pub intents: Vec<String>,
    pub emotion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleHit {
    pub rule: String,
    pub severity: Severity,
    pub event: Option<String>,
    pub reason: String,
    /// The utterances behind the hit (indices in the call).
    pub utterances: Vec<usize>,
}

impl RuleSet {
    /// Parses and checks a rule file; every problem at once, each with its rule id.
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        if text.len() > MAX_RULES_BYTES {
            return Err(vec![format!("rule file larger than {MAX_RULES_BYTES} bytes")]);
        }
        let file: RulesFile = toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_owned()])?;
        let mut set = Self::compile_indexed(&file)
            .map_err(|problems| problems.into_iter().map(|(rule, p)| at_line(text, rule, p)).collect::<Vec<_>>())?;
        set.version = crate::hex::encode(&ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()[..6]);
        Ok(set)
    }

    pub fn compile(file: &RulesFile) -> Result<Self, Vec<String>> {
        Self::compile_indexed(file).map_err(|problems| problems.into_iter().map(|(_, p)| p).collect())
    }

    /// Every problem with the index of the rule it belongs to.
    fn compile_indexed(file: &RulesFile) -> Result<Self, Vec<(usize, String)>> {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for (i, spec) in file.rules.iter().enumerate() {
            if file.rules[..i].iter().any(|r| r.id == spec.id) {
                problems.push((i, format!("rule {}: the id is used twice", spec.id)));
            }
            if spec.min_count == 0 {
                problems.push((i, format!("rule {}: min_count must be at least 1", spec.id)));
            }
            let mut errs = Vec::new();
            let check = compile_cond(&spec.when, &file.synonyms, &mut errs);
            problems.extend(errs.into_iter().map(|e| (i, format!("rule {}: {e}", spec.id))));
            rules.push(Rule {
                id: spec.id.clone(),
                description: spec.description.clone(),
                severity: spec.severity,
                event: spec.event.clone(),
                check,
                min_count: spec.min_count,
                by_secs: spec.by_secs,
            });
        }
        if problems.is_empty() {
            Ok(Self { rules, version: "compiled".into() })
        } else {
            Err(problems)
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// "line N: rule ID: …", N being the line of the rule's `[[rule]]` header, so a rule-file
/// problem reads like a config problem (line, key, message).
fn at_line(text: &str, rule: usize, problem: String) -> String {
    let headers = text.lines().enumerate().filter(|(_, l)| l.trim_start().starts_with("[[rule]]"));
    match headers.map(|(n, _)| n).nth(rule) {
        Some(n) => format!("line {}: {problem}", n + 1),
        None => problem,
    }
}

fn expand(words: &[String], synonyms: &BTreeMap<String, Vec<String>>, errs: &mut Vec<String>) -> Vec<String> {
    let errs_before = errs.len();
    let mut out = Vec::new();
    for w in words {
        match w.strip_prefix('@') {
            Some(name) => match synonyms.get(name) {
                Some(list) => out.extend(list.iter().map(|s| normalise(s))),
                None => errs.push(format!("no synonym list `{name}`")),
            },
            None => out.push(normalise(w)),
        }
    }
    if errs.len() == errs_before && (out.iter().any(String::is_empty) || out.is_empty()) {
        errs.push("an empty keyword list or keyword".into());
    }
    out
}

fn compile_cond(c: &Cond, syn: &BTreeMap<String, Vec<String>>, errs: &mut Vec<String>) -> Check {
    let errs_before = errs.len();
    let mut parts = Vec::new();
    if let Some(all) = &c.all {
        parts.push(Check::All(all.iter().map(|x| compile_cond(x, syn, errs)).collect()));
    }
    if let Some(any) = &c.any {
        if any.is_empty() {
            errs.push("`any` with no conditions".into());
        }
        parts.push(Check::Any(any.iter().map(|x| compile_cond(x, syn, errs)).collect()));
    }
    if let Some(not) = &c.not {
        parts.push(Check::Not(Box::new(compile_cond(not, syn, errs))));
    }
    if let Some(role) = c.role {
        parts.push(Check::Role(role));
    }
    if let Some(w) = &c.keywords_any {
        parts.push(Check::KeywordsAny(expand(w, syn, errs)));
    }
    if let Some(w) = &c.keywords_all {
        parts.push(Check::KeywordsAll(expand(w, syn, errs)));
    }
    if let Some(w) = &c.keywords_none {
        parts.push(Check::KeywordsNone(expand(w, syn, errs)));
    }
    if let Some(re) = &c.regex {
        match regex::RegexBuilder::new(re).size_limit(1 << 20).build() {
            Ok(r) => parts.push(Check::Regex(r)),
            // regex's messages draw a caret under the pattern over several lines: keep one.
            Err(e) => errs.push(format!("regex {re:?}: {}", e.to_string().lines().last().unwrap_or("invalid"))),
        }
    }
    if let Some(n) = &c.near {
        let (a, b) = (expand(std::slice::from_ref(&n.a), syn, errs), expand(std::slice::from_ref(&n.b), syn, errs));
        parts.push(Check::Near(a, b, n.within));
    }
    if let Some(s) = c.silence_over_secs {
        parts.push(Check::SilenceOver(s));
    }
    if let Some(r) = c.rate_over_cpm {
        parts.push(Check::RateOver(r));
    }
    if let Some(t) = c.talk_over {
        parts.push(Check::TalkOver(t));
    }
    if let Some(e) = &c.emotion {
        parts.push(Check::Emotion(e.clone()));
    }
    if let Some(i) = &c.intent {
        parts.push(Check::Intent(i.clone()));
    }
    if let Some(s) = c.within_first_secs {
        parts.push(Check::WithinFirst(s));
    }
    if parts.is_empty() && errs.len() == errs_before {
        errs.push("a condition with nothing to check".into());
    }
    match parts.len() {
        1 => parts.remove(0),
        _ => Check::All(parts),
    }
}

/// Lower-case, without spaces and punctuation: ASR spaces and commas words at random.
/// `%` stays: without it "100%" would match "$1.00".
fn normalise(text: &str) -> String {
    text.chars().filter(|c| c.is_alphanumeric() || *c == '%').flat_map(char::to_lowercase).collect()
}

/// What a condition sees besides the utterance.
struct Context<'a> {
    input: &'a RuleInput,
    /// The normalised text.
    text: &'a str,
    /// Seconds of silence before this utterance (since the last utterance of either leg).
    gap: Option<f64>,
    /// The other leg's last utterance end, for talk-over.
    other_end: Option<f64>,
}

fn holds(check: &Check, cx: &Context) -> bool {
    let contains = |w: &String| cx.text.contains(w.as_str());
    match check {
        Check::All(cs) => cs.iter().all(|c| holds(c, cx)),
        Check::Any(cs) => cs.iter().any(|c| holds(c, cx)),
        Check::Not(c) => !holds(c, cx),
        Check::Role(leg) => cx.input.leg == *leg,
        Check::KeywordsAny(ws) => ws.iter().any(contains),
        Check::KeywordsAll(ws) => ws.iter().all(contains),
        Check::KeywordsNone(ws) => !ws.iter().any(contains),
        Check::Regex(re) => re.is_match(&cx.input.text),
        Check::Near(a, b, within) => near(cx.text, a, b, *within),
        Check::SilenceOver(secs) => cx.gap.is_some_and(|g| g > *secs),
        Check::RateOver(cpm) => {
            let minutes = (cx.input.end_secs - cx.input.start_secs) / 60.0;
            // The units prosody reports: a Chinese character or a word of another script.
            let units = crate::speech::prosody::spoken_units(&cx.input.text) as f64;
            minutes > 0.0 && units / minutes > *cpm
        }
        Check::TalkOver(want) => cx.other_end.is_some_and(|end| cx.input.start_secs < end) == *want,
        Check::Emotion(es) => cx.input.emotion.as_ref().is_some_and(|e| es.contains(e)),
        Check::Intent(is) => cx.input.intents.iter().any(|i| is.contains(i)),
        Check::WithinFirst(secs) => cx.input.start_secs <= *secs,
    }
}

/// Whether some occurrence of an `a` word and of a `b` word are at most `within`
/// characters apart (counted between the end of the first and the start of the second).
fn near(text: &str, a: &[String], b: &[String], within: usize) -> bool {
    let spans = |words: &[String]| -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for w in words {
            for (at, _) in text.match_indices(w.as_str()) {
                let start = text[..at].chars().count();
                out.push((start, start + w.chars().count()));
            }
        }
        out
    };
    let (sa, sb) = (spans(a), spans(b));
    sa.iter().any(|&(a0, a1)| {
        sb.iter().any(|&(b0, b1)| {
            let gap = if a1 <= b0 { b0 - a1 } else { a0.saturating_sub(b1) };
            gap <= within
        })
    })
}

#[derive(Debug, Clone, Default)]
struct RuleState {
    matched: Vec<usize>,
    fired: bool,
}

/// One call's rule state: fed utterances (and time) in order, returns hits as they happen.
#[derive(Debug, Clone)]
pub struct CallRules {
    set: std::sync::Arc<RuleSet>,
    states: Vec<RuleState>,
    last_end: BTreeMap<Leg, f64>,
}

impl CallRules {
    pub fn new(set: std::sync::Arc<RuleSet>) -> Self {
        let states = vec![RuleState::default(); set.rules.len()];
        Self { set, states, last_end: BTreeMap::new() }
    }

    /// Evaluates every rule on one utterance; returns the rules that fire now.
    pub fn utterance(&mut self, input: &RuleInput) -> Vec<RuleHit> {
        let text = normalise(&input.text);
        let last_any = self.last_end.values().copied().fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
        let cx = Context {
            input,
            text: &text,
            gap: last_any.map(|end| input.start_secs - end),
            other_end: self.last_end.get(&input.leg.other()).copied(),
        };
        let mut hits = self.deadlines(input.start_secs);
        for (rule, state) in self.set.rules.iter().zip(self.states.iter_mut()) {
            if state.fired || !holds(&rule.check, &cx) {
                continue;
            }
            state.matched.push(input.index);
            if rule.by_secs.is_some() {
                // A required rule is satisfied: it can no longer fire.
                state.fired = true;
            } else if state.matched.len() >= rule.min_count as usize {
                state.fired = true;
                let reason = if rule.min_count > 1 {
                    format!("{} ({} times)", describe(rule), state.matched.len())
                } else {
                    describe(rule)
                };
                hits.push(hit(rule, reason, state.matched.clone()));
            }
        }
        let end = self.last_end.entry(input.leg).or_insert(input.end_secs);
        *end = end.max(input.end_secs);
        hits
    }

    /// Time passes (seconds from the call's start): required rules past their deadline fire.
    pub fn tick(&mut self, now_secs: f64) -> Vec<RuleHit> {
        self.deadlines(now_secs)
    }

    /// The call ended: required rules still unmet fire.
    pub fn end(&mut self) -> Vec<RuleHit> {
        self.deadlines(f64::INFINITY)
    }

    fn deadlines(&mut self, now_secs: f64) -> Vec<RuleHit> {
        let mut hits = Vec::new();
        for (rule, state) in self.set.rules.iter().zip(self.states.iter_mut()) {
            if let Some(by) = rule.by_secs {
                if !state.fired && now_secs > by {
                    state.fired = true;
                    hits.push(hit(rule, format!("{} (not within the first {by} s)", describe(rule)), vec![]));
                }
            }
        }
        hits
    }
}

fn describe(rule: &Rule) -> String {
    if rule.description.is_empty() {
        rule.id.clone()
    } else {
        rule.description.clone()
    }
}

fn hit(rule: &Rule, reason: String, utterances: Vec<usize>) -> RuleHit {
    RuleHit { rule: rule.id.clone(), severity: rule.severity, event: rule.event.clone(), reason, utterances }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rules(toml: &str) -> Arc<RuleSet> {
        Arc::new(RuleSet::parse(toml).unwrap_or_else(|e| panic!("{e:?}")))
    }

    fn say(index: usize, leg: Leg, start: f64, end: f64, text: &str) -> RuleInput {
        RuleInput { index, leg, start_secs: start, end_secs: end, text: text.into(), intents: vec![], emotion: None }
    }

    /// Fires `rule` on a fresh call over `utterances`; returns the ids of what fired.
    fn fired(set: &Arc<RuleSet>, utterances: &[RuleInput]) -> Vec<String> {
        let mut call = CallRules::new(set.clone());
        let mut out: Vec<String> = utterances.iter().flat_map(|u| call.utterance(u)).map(|h| h.rule).collect();
        out.extend(call.end().into_iter().map(|h| h.rule));
        out
    }

    fn one_rule(when: &str) -> Arc<RuleSet> {
        rules(&format!("[[rule]]\nid = \"r\"\nseverity = \"warning\"\nwhen = {when}\n"))
    }

    #[test]
    fn a_percent_sign_is_part_of_a_keyword() {
        assert_eq!(normalise("保证 100 %收益, OK"), "保证100%收益ok");
        assert_eq!(normalise("It is $1.00 million"), "itis100million");
        assert!(!normalise("It is $1.00 million").contains(&normalise("100%")));
    }

    #[test]
    fn every_operator_on_its_own() {
        use Leg::{Agent as A, Customer as C};
        let cases: &[(&str, Vec<RuleInput>, bool)] = &[
            ("{ keywords_any = [\"保本\", \"稳赚\"] }", vec![say(0, A, 0.0, 2.0, "这个产品稳，赚不亏")], true),
            ("{ keywords_any = [\"保本\"] }", vec![say(0, A, 0.0, 2.0, "风险自担")], false),
            ("{ keywords_all = [\"退\", \"钱\"] }", vec![say(0, C, 0.0, 2.0, "我要退这个钱")], true),
            ("{ keywords_all = [\"退\", \"钱\"] }", vec![say(0, C, 0.0, 2.0, "我要退")], false),
            ("{ keywords_none = [\"谢谢\"] }", vec![say(0, C, 0.0, 2.0, "好的")], true),
            ("{ keywords_none = [\"谢谢\"] }", vec![say(0, C, 0.0, 2.0, "好的谢谢")], false),
            ("{ regex = '1\\d{2}' }", vec![say(0, C, 0.0, 2.0, "房间 123")], true),
            ("{ regex = '^\\d+$' }", vec![say(0, C, 0.0, 2.0, "abc")], false),
            ("{ near = { a = \"收益\", b = \"保证\", within = 3 } }", vec![say(0, A, 0.0, 2.0, "保证年化收益")], true),
            (
                "{ near = { a = \"收益\", b = \"保证\", within = 3 } }",
                vec![say(0, A, 0.0, 2.0, "保证您满意 我们的收益")],
                false,
            ),
            ("{ role = \"agent\" }", vec![say(0, C, 0.0, 2.0, "x")], false),
            ("{ role = \"customer\" }", vec![say(0, C, 0.0, 2.0, "x")], true),
            ("{ silence_over_secs = 5 }", vec![say(0, A, 0.0, 1.0, "a"), say(1, C, 7.0, 8.0, "b")], true),
            ("{ silence_over_secs = 5 }", vec![say(0, A, 0.0, 1.0, "a"), say(1, C, 4.0, 8.0, "b")], false),
            // 30 characters in 6 s = 300 per minute.
            ("{ rate_over_cpm = 250 }", vec![say(0, A, 0.0, 6.0, &"快".repeat(30))], true),
            ("{ rate_over_cpm = 350 }", vec![say(0, A, 0.0, 6.0, &"快".repeat(30))], false),
            // 14 words in 6 s is 140 a minute however many letters they have.
            (
                "{ rate_over_cpm = 250 }",
                vec![say(
                    0,
                    A,
                    0.0,
                    6.0,
                    "Hello, this is Lisa from Sunrise. This call is recorded for quality purposes.",
                )],
                false,
            ),
            ("{ talk_over = true }", vec![say(0, A, 0.0, 5.0, "a"), say(1, C, 4.0, 6.0, "b")], true),
            ("{ talk_over = true }", vec![say(0, A, 0.0, 5.0, "a"), say(1, C, 5.5, 6.0, "b")], false),
            ("{ within_first_secs = 30 }", vec![say(0, A, 40.0, 41.0, "a")], false),
            ("{ within_first_secs = 30 }", vec![say(0, A, 20.0, 21.0, "a")], true),
        ];
        for (when, utterances, expected) in cases {
            let got = !fired(&one_rule(when), utterances).is_empty();
            assert_eq!(got, *expected, "{when} on {utterances:?}");
        }
    }

    #[test]
    fn intent_emotion_and_combinations() {
        let mut u = say(0, Leg::Customer, 0.0, 2.0, "你们这服务太差了");
        u.intents = vec!["complaint".into()];
        u.emotion = Some("negative".into());
        let both = "{ all = [{ intent = [\"complaint\"] }, { emotion = [\"negative\"] }], role = \"customer\" }";
        assert_eq!(fired(&one_rule(both), std::slice::from_ref(&u)), ["r"]);
        let either = "{ any = [{ intent = [\"refusal\"] }, { emotion = [\"hesitant\"] }] }";
        assert!(fired(&one_rule(either), std::slice::from_ref(&u)).is_empty());
        let not = "{ not = { intent = [\"complaint\"] } }";
        assert!(fired(&one_rule(not), std::slice::from_ref(&u)).is_empty());
        u.intents = vec!["human_request".into(), "complaint".into()];
        assert_eq!(fired(&one_rule(both), std::slice::from_ref(&u)), ["r"], "a second intent counts too");
        u.intents = vec![];
        assert_eq!(fired(&one_rule(not), &[u]), ["r"], "no intent is not a complaint");
    }

    #[test]
    fn counts_across_the_call_fire_once_at_the_threshold() {
        let set = rules(
            "[[rule]]\nid = \"lead\"\nseverity = \"info\"\nevent = \"high_value_lead\"\nmin_count = 3\n\
             when = { role = \"customer\", keywords_any = [\"定制\"] }\n",
        );
        let mut call = CallRules::new(set);
        let c = |i| say(i, Leg::Customer, i as f64 * 10.0, i as f64 * 10.0 + 2.0, "能不能定制");
        assert!(call.utterance(&c(0)).is_empty());
        assert!(call.utterance(&say(1, Leg::Agent, 12.0, 13.0, "可以定制")).is_empty(), "agent does not count");
        assert!(call.utterance(&c(2)).is_empty());
        let hits = call.utterance(&c(3));
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].event.as_deref(), hits[0].utterances.clone()), (Some("high_value_lead"), vec![0, 2, 3]));
        assert!(hits[0].reason.contains("3 times"));
        assert!(call.utterance(&c(4)).is_empty(), "once per call");
    }

    #[test]
    fn a_required_disclosure_fires_only_when_its_deadline_passes_unmet() {
        let set = rules(
            "[synonyms]\nnotice = [\"录音\", \"recorded\"]\n\
             [[rule]]\nid = \"notice\"\nseverity = \"warning\"\nby_secs = 30\n\
             when = { role = \"agent\", keywords_any = [\"@notice\"] }\n",
        );
        // Said in time: never fires.
        let ok = [say(0, Leg::Agent, 2.0, 5.0, "本次通话将被录音"), say(1, Leg::Customer, 40.0, 41.0, "好")];
        assert!(fired(&set, &ok).is_empty());
        // Not said: fires when time passes 30 s (on a tick or the next utterance), once.
        let mut call = CallRules::new(set.clone());
        assert!(call.utterance(&say(0, Leg::Agent, 1.0, 3.0, "您好")).is_empty());
        assert!(call.tick(29.0).is_empty());
        let hits = call.tick(31.0);
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert!(call.utterance(&say(1, Leg::Agent, 35.0, 36.0, "本次通话将被录音")).is_empty());
        assert!(call.end().is_empty());
        // A call that ends early without it: fires at the end.
        assert_eq!(fired(&set, &[say(0, Leg::Agent, 1.0, 3.0, "您好")]), ["notice"]);
    }

    #[test]
    fn a_bad_rule_file_reports_every_problem_with_its_rule() {
        let text = "[[rule]]\nid = \"a\"\nseverity = \"info\"\nwhen = { regex = \"(\" }\n\
                    [[rule]]\nid = \"a\"\nseverity = \"info\"\nmin_count = 0\nwhen = { keywords_any = [\"@missing\"] }\n\
                    [[rule]]\nid = \"c\"\nseverity = \"info\"\nwhen = {}\n";
        let problems = RuleSet::parse(text).unwrap_err();
        for expected in [
            "line 1: rule a: regex",
            "line 5: rule a: the id is used twice",
            "line 5: rule a: min_count",
            "no synonym list `missing`",
            "line 10: rule c: a condition with nothing",
        ] {
            assert!(problems.iter().any(|p| p.contains(expected)), "{expected}: {problems:#?}");
        }
        assert!(RuleSet::parse("[[rule]]\nid = \"x\"\nseverity = \"loud\"\nwhen = { role = \"agent\" }\n").is_err());
        assert!(RuleSet::parse("[[rule]]\nid = \"x\"\nseverity = \"info\"\nwhen = { colour = 1 }\n").is_err());
    }

    #[test]
    fn the_shipped_rules_catch_promises_dnc_and_a_missing_notice() {
        let set = Arc::new(RuleSet::parse(include_str!("../../../packaging/rules.toml")).unwrap());
        let call = [
            say(0, Leg::Agent, 1.0, 4.0, "您好 我是理财顾问小王"),
            say(1, Leg::Agent, 5.0, 9.0, "这个产品保本，年化收益百分之八"),
            say(2, Leg::Customer, 10.0, 12.0, "别再给我打电话了"),
        ];
        let mut state = CallRules::new(set);
        let mut hits: Vec<RuleHit> = call.iter().flat_map(|u| state.utterance(u)).collect();
        hits.extend(state.end());
        let ids: Vec<&str> = hits.iter().map(|h| h.rule.as_str()).collect();
        for expected in ["agent_forbidden_promise", "customer_do_not_call", "agent_recording_notice"] {
            assert!(ids.contains(&expected), "{expected} not in {ids:?}");
        }
        let promise = hits.iter().find(|h| h.rule == "agent_forbidden_promise").unwrap();
        assert_eq!((promise.event.as_deref(), promise.utterances.as_slice()), (Some("supervisor_alert"), &[1][..]));
    }
}
