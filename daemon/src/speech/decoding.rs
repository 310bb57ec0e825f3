//! Whisper's decoding rules, pure: which token may come next in timestamp mode, when a
//! decoding loops (repetition cut-off, doubled utterance, zlib compression ratio), which of
//! several decodings to keep (temperature fallback), and the seeded sampler. `whisper` runs
//! the model and asks these.

use serde::Serialize;

use super::hotwords::HotwordMode;
use super::TranscriptStop;

/// Logit bias for a hotword's next token: e^2 ≈ 7× the odds, enough to turn a near miss
/// the audio supports, not enough to write a term the audio does not (a common choice for
/// shallow contextual biasing; not tuned on our evaluation clips).
pub const DEFAULT_HOTWORD_BIAS: f32 = 2.0;

/// Whisper's and faster-whisper's settings, not tuned here: temperatures tried in turn after
/// a greedy decoding that loops or is improbable, and the zlib compression ratio above which
/// a text is taken to be looping. Off by default: on the shared clips it doubled the ASR
/// time (RTF 0.155 → 0.349) for no gain in CER (README, "Decoding choices").
pub const WHISPER_FALLBACK_TEMPERATURES: &[f32] = &[0.2, 0.4, 0.6, 0.8, 1.0];
pub const COMPRESSION_RATIO_THRESHOLD: f32 = 2.4;
/// Bounds `speech.fallback_temperatures` (each decoding costs a whole decoder pass).
pub const MAX_FALLBACKS: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeOptions {
    /// Language code ("zh", "en", …) or "auto" to detect it per utterance.
    pub language: String,
    /// Tokens allowed per second of audio, plus a small constant; stops runaway decoding.
    pub max_tokens_per_sec: f32,
    /// Whisper's rule: no-speech probability above this and average log-probability below
    /// `logprob_threshold` mean the segment is not speech.
    pub no_speech_threshold: f32,
    pub logprob_threshold: f32,
    /// Silence (seconds) always left after the audio inside the encoder window: with none,
    /// Whisper tends to loop on the last words.
    pub tail_margin_secs: f32,
    /// Terms to favour (`speech.hotwords`), how, and the logit bias in bias mode.
    pub hotwords: Vec<String>,
    pub hotword_mode: HotwordMode,
    pub hotword_bias: f32,
    /// Temperatures for the decodings after a greedy one that loops (a cut repetition, the
    /// token budget run out, a text compressing better than `compression_ratio_threshold`)
    /// or whose average log-probability is under `logprob_threshold`. Empty: greedy only.
    pub fallback_temperatures: Vec<f32>,
    pub compression_ratio_threshold: f32,
    /// Decode with Whisper's timestamp tokens (as most of its training text was) and end
    /// the text where the audio ends, instead of `<|notimestamps|>`. On by default: the
    /// demo's four looping lines then end by themselves instead of being cut, for the same
    /// CER on the shared clips (one 8-kHz clip aside) and a little less ASR time: RTF 0.181 →
    /// 0.175 on the shared clips, 0.156 → 0.139 on the demo (README, "Decoding choices").
    pub timestamps: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            language: "zh".into(),
            max_tokens_per_sec: 12.0,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
            tail_margin_secs: 1.0,
            hotwords: Vec::new(),
            hotword_mode: HotwordMode::Bias,
            hotword_bias: DEFAULT_HOTWORD_BIAS,
            fallback_temperatures: Vec::new(),
            compression_ratio_threshold: COMPRESSION_RATIO_THRESHOLD,
            timestamps: true,
        }
    }
}

/// Which tokens may come next: text, end-of-text, timestamps in an index range (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Allowed {
    pub(super) text: bool,
    pub(super) end: bool,
    pub(super) stamps: Option<(u32, u32)>,
}

impl Allowed {
    /// Without timestamps: any text, or the end (not first).
    pub(super) fn plain(first: bool) -> Self {
        Self { text: true, end: !first, stamps: None }
    }
}

/// Whisper's first timestamp is at most 1 s in (its `max_initial_timestamp`).
const MAX_INITIAL_STAMP: u32 = 50;
/// A segment ending this close to the audio's end (0.5 s) is the last one.
const LAST_SEGMENT_STAMPS: u32 = 25;

/// Timestamp mode: Whisper's rules (`ApplyTimestampRules`: the text opens with a timestamp
/// in the first second; timestamps come in pairs between segments and never go back; a
/// segment is never empty) over the tokens generated so far, plus one of ours: no segment
/// starts, and none follows one that ends, within 0.5 s of the audio's end — the rest of the
/// window is the silence margin, where Whisper repeats itself. `audio_end` and `window_end`
/// are timestamp indices; `stamp` tells a timestamp's index.
pub(super) fn timestamp_rule(
    generated: &[u32],
    stamp: impl Fn(u32) -> Option<u32>,
    audio_end: u32,
    window_end: u32,
) -> Allowed {
    let n = generated.len();
    let Some(&last) = generated.last() else {
        return Allowed { text: false, end: false, stamps: Some((0, MAX_INITIAL_STAMP.min(audio_end))) };
    };
    let penultimate_is_stamp = n < 2 || stamp(generated[n - 2]).is_some();
    match stamp(last) {
        // A pair (end, start) or the opening stamp: no third timestamp.
        Some(_) if penultimate_is_stamp => Allowed { text: true, end: true, stamps: None },
        // A segment just ended: another may start (at or after it) or the text ends.
        Some(at) => {
            let latest_start = audio_end.saturating_sub(LAST_SEGMENT_STAMPS);
            let stamps = (at < latest_start).then_some((at, latest_start));
            Allowed { text: false, end: true, stamps }
        }
        // Inside a segment: more text, the end, or the segment's closing stamp after its start.
        None => {
            let opened = generated.iter().rev().find_map(|&t| stamp(t)).map_or(0, |s| s + 1);
            Allowed { text: true, end: true, stamps: (opened <= window_end).then_some((opened, window_end)) }
        }
    }
}

/// One decoding's outcome, before the fallback rule picks among them.
pub(super) struct Decoding {
    pub(super) text: String,
    pub(super) tokens: Vec<u32>,
    pub(super) avg_logprob: f32,
    pub(super) no_speech_prob: f32,
    pub(super) stop: TranscriptStop,
    pub(super) temperature: f32,
    pub(super) compression_ratio: f32,
}

impl Decoding {
    /// A loop: cut (a repetition, the budget run out) or a text that compresses too well.
    fn loops(&self, opts: &DecodeOptions) -> bool {
        self.stop != TranscriptStop::EndOfText || self.compression_ratio > opts.compression_ratio_threshold
    }

    /// Whisper's rule: decode again if looping or improbable, unless it is likely silence
    /// (then the no-speech test decides and another decoding would not change it).
    pub(super) fn needs_fallback(&self, opts: &DecodeOptions) -> bool {
        self.no_speech_prob <= opts.no_speech_threshold
            && (self.loops(opts) || self.avg_logprob < opts.logprob_threshold)
    }
}

/// The decoding to keep: the last one tried if it passed, else (all failed) the most
/// probable of those that do not loop, else the most probable — faster-whisper's choice.
pub(super) fn choose(mut tried: Vec<Decoding>, opts: &DecodeOptions) -> Option<Decoding> {
    if tried.last().is_some_and(|d| !d.needs_fallback(opts)) {
        return tried.pop();
    }
    let any_clean = tried.iter().any(|d| !d.loops(opts));
    tried.into_iter().filter(|d| !any_clean || !d.loops(opts)).max_by(|a, b| a.avg_logprob.total_cmp(&b.avg_logprob))
}

/// Bytes of UTF-8 text over bytes of its zlib stream (level 6, as Python's `zlib.compress`):
/// Whisper's measure of a looping text.
pub fn compression_ratio(text: &str) -> f32 {
    if text.is_empty() {
        return 0.0;
    }
    let packed = miniz_oxide::deflate::compress_to_vec_zlib(text.as_bytes(), 6);
    text.len() as f32 / packed.len().max(1) as f32
}

/// A small, seedable generator for sampling (splitmix64): decoding must be reproducible,
/// and this is all the randomness it needs.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// If the tail of `tokens` is one pattern repeated (a single token 6 times, a 2–7 token
/// pattern 3 times, an 8–64 token phrase twice back to back), the length to keep:
/// everything up to the end of the first occurrence of the repeated phrase. Checked after
/// every token, so a loop stops as soon as it shows.
///
/// The repeated stretch is followed back to where the loop began, not only to where a
/// tail-aligned copy starts: "It is $99.00 a month. It is $99.00 a month. It is $" keeps
/// "It is $99.00 a month.", where cutting at the first tail-aligned copy of "99.00 a month.
/// It is $" used to leave the doubled tail "… a month. It is $".
pub fn repetition_cut(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    for period in 1..=64usize {
        let repeats = match period {
            1 => 6,
            2..=7 => 3,
            _ => 2,
        };
        let span = period * repeats;
        // Spans do not grow with the period (3 × 7 > 2 × 8): skip, never stop early.
        if span > n {
            continue;
        }
        if let Some(start) = periodic_start(tokens, period, span) {
            return Some(start + period);
        }
    }
    None
}

/// A finished utterance that is one phrase of 4+ tokens said twice and nothing else —
/// Whisper's doubling of a short greeting on phone audio — keeps one copy. Shorter phrases
/// said twice (好的好的, 对对) are what people say. Only for a decoding that ended by itself:
/// a doubled start may go on with other words.
pub fn doubled_utterance(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    (n >= 8 && n % 2 == 0 && tokens[..n / 2] == tokens[n / 2..]).then_some(n / 2)
}

/// Where a stretch of period `period` that covers at least the last `span` tokens begins,
/// followed back as far as it goes; `None` when the last `span` tokens are not periodic.
fn periodic_start(tokens: &[u32], period: usize, span: usize) -> Option<usize> {
    let n = tokens.len();
    let tail = &tokens[n - span..];
    if !tail.chunks(period).all(|c| c == &tail[..period]) {
        return None;
    }
    let mut start = n - span;
    while start > 0 && tokens[start - 1] == tokens[start - 1 + period] {
        start -= 1;
    }
    Some(start)
}

#[cfg(test)]
mod tests {
    use super::{
        choose, compression_ratio, doubled_utterance, repetition_cut, timestamp_rule, Allowed, DecodeOptions, Decoding,
        SplitMix64, TranscriptStop,
    };

    fn decoding(text: &str, avg_logprob: f32, stop: TranscriptStop, temperature: f32) -> Decoding {
        Decoding {
            compression_ratio: compression_ratio(text),
            text: text.into(),
            tokens: Vec::new(),
            avg_logprob,
            no_speech_prob: 0.01,
            stop,
            temperature,
        }
    }

    #[test]
    fn a_looping_text_compresses_past_whispers_threshold_and_speech_does_not() {
        let opts = DecodeOptions::default();
        let looped = "我们这个产品是保本的，".repeat(6);
        assert!(compression_ratio(&looped) > opts.compression_ratio_threshold, "{}", compression_ratio(&looped));
        for said in ["您好，请问是王先生吗？我们这边是做理财产品的。", "It is $99.00 a month.", "好的好的"]
        {
            assert!(compression_ratio(said) < opts.compression_ratio_threshold, "{said}: {}", compression_ratio(said));
        }
        assert_eq!(compression_ratio(""), 0.0);
    }

    #[test]
    fn the_fallback_rule_keeps_a_passing_decoding_and_else_the_likeliest_clean_one() {
        let opts = DecodeOptions::default();
        let clean = decoding("您好请问是王先生吗", -0.3, TranscriptStop::EndOfText, 0.0);
        assert!(!clean.needs_fallback(&opts));
        // Cut loops, a run-out budget and improbable text all ask for another decoding …
        assert!(decoding("您好", -0.3, TranscriptStop::Repetition, 0.0).needs_fallback(&opts));
        assert!(decoding("您好", -0.3, TranscriptStop::TokenLimit, 0.0).needs_fallback(&opts));
        assert!(decoding("您好", -1.4, TranscriptStop::EndOfText, 0.0).needs_fallback(&opts));
        // … unless it is likely silence: the no-speech test decides that.
        let mut silent = decoding("嗯", -1.4, TranscriptStop::EndOfText, 0.0);
        silent.no_speech_prob = 0.9;
        assert!(!silent.needs_fallback(&opts));

        // The last decoding passed: it is kept.
        let tried = vec![
            decoding("您好", -1.5, TranscriptStop::EndOfText, 0.0),
            decoding("您好王先生", -0.5, TranscriptStop::EndOfText, 0.2),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.2));
        // All failed: the likeliest that does not loop, even if a looping one is likelier.
        let tried = vec![
            decoding("您好", -0.2, TranscriptStop::Repetition, 0.0),
            decoding("您好王", -1.6, TranscriptStop::EndOfText, 0.2),
            decoding("您好王先生", -1.2, TranscriptStop::EndOfText, 0.4),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.4));
        // All loop: the likeliest.
        let tried = vec![
            decoding("您好", -0.9, TranscriptStop::Repetition, 0.0),
            decoding("您好王", -0.4, TranscriptStop::TokenLimit, 0.2),
        ];
        assert_eq!(choose(tried, &opts).map(|d| d.temperature), Some(0.2));
        assert!(choose(Vec::new(), &opts).is_none());
    }

    #[test]
    fn timestamps_open_the_text_pair_up_never_go_back_and_stop_at_the_audios_end() {
        // Text tokens are < 100, timestamps 100 + index; the audio ends at index 150 (3 s) in a
        // 4-s window (index 200).
        let stamp = |t: u32| t.checked_sub(100);
        let rule = |g: &[u32]| timestamp_rule(g, stamp, 150, 200);
        // First a timestamp, within the first second.
        assert_eq!(rule(&[]), Allowed { text: false, end: false, stamps: Some((0, 50)) });
        // After the opening stamp: text (or Whisper's empty end), no second stamp.
        assert_eq!(rule(&[100]), Allowed { text: true, end: true, stamps: None });
        // Inside a segment: its closing stamp lies after its opening one.
        assert_eq!(rule(&[105, 7, 8]), Allowed { text: true, end: true, stamps: Some((6, 200)) });
        // A segment closed at 1.2 s: the next starts there or later, before the last half second.
        assert_eq!(rule(&[105, 7, 8, 160]), Allowed { text: false, end: true, stamps: Some((60, 125)) });
        // A pair: text next.
        assert_eq!(rule(&[105, 7, 8, 160, 160]), Allowed { text: true, end: true, stamps: None });
        // A segment closed within 0.5 s of the audio's end: only the end may follow.
        assert_eq!(rule(&[105, 7, 8, 230]), Allowed { text: false, end: true, stamps: None });
        // No closing stamp fits in the window: text or the end.
        assert_eq!(timestamp_rule(&[100, 7], stamp, 150, 0), Allowed { text: true, end: true, stamps: None });
        // Without timestamps: text, and the end once something was said.
        assert_eq!(Allowed::plain(true), Allowed { text: true, end: false, stamps: None });
        assert_eq!(Allowed::plain(false), Allowed { text: true, end: true, stamps: None });
    }

    #[test]
    fn sampling_is_reproducible_and_uniform_enough() {
        let draws = |seed| {
            let mut rng = SplitMix64(seed);
            (0..4000).map(|_| rng.next_unit()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let d = draws(7);
        assert!(d.iter().all(|u| (0.0..1.0).contains(u)));
        let low = d.iter().filter(|&&u| u < 0.5).count();
        assert!((1800..2200).contains(&low), "{low} of 4000 under 0.5");
    }

    #[test]
    fn a_looping_tail_is_cut_back_to_its_first_occurrence() {
        let mut t = vec![1, 2, 3];
        t.extend([7, 8, 9].repeat(3));
        assert_eq!(repetition_cut(&t), Some(6));
        let mut single = vec![5, 6];
        single.extend([4; 6]);
        assert_eq!(repetition_cut(&single), Some(3));
        // A whole sentence said twice (the 8 kHz loop seen on a podcast clip).
        let sentence: Vec<u32> = (100..112).collect();
        let twice = [vec![1], sentence.clone(), sentence].concat();
        assert_eq!(repetition_cut(&twice), Some(13));
    }

    #[test]
    fn a_doubled_tail_is_followed_back_to_where_the_loop_began() {
        // "It is $99.00 a month. It is $99.00 a month. It is $" (the demo's agent line): the
        // tail-aligned copy is "99.00 a month. It is $"; the loop began at "It is".
        let sentence: Vec<u32> = (10..19).collect();
        let looped = [sentence.clone(), sentence.clone(), sentence[..3].to_vec()].concat();
        assert_eq!(repetition_cut(&looped), Some(9));
        // After words that are not part of the loop, those stay.
        let lead = [vec![1, 2], sentence.clone(), sentence.clone(), sentence[..4].to_vec()].concat();
        assert_eq!(repetition_cut(&lead), Some(11));
        // A short pattern looping mid-word: 1 2 [3 4 5]x3 + 3 → keep through the first 3 4 5.
        let short = [vec![1, 2], [3, 4, 5].repeat(3), vec![3]].concat();
        assert_eq!(repetition_cut(&short), Some(5));
    }

    #[test]
    fn a_short_utterance_said_twice_is_cut_once() {
        // 各位观众晚上好各位观众晚上好: a 1.3-s greeting doubled on 8-kHz audio.
        let greeting = vec![40, 41, 42, 43, 44, 45];
        assert_eq!(doubled_utterance(&[greeting.clone(), greeting.clone()].concat()), Some(6));
        // Four tokens twice is still a doubling; three twice (喂你好喂你好) is left alone, as
        // is a phrase said twice after other words (only a whole-utterance doubling is cut
        // for phrases under 8 tokens).
        assert_eq!(doubled_utterance(&[7, 8, 9, 10, 7, 8, 9, 10]), Some(4));
        assert_eq!(doubled_utterance(&[7, 8, 9, 7, 8, 9]), None);
        assert_eq!(doubled_utterance(&[1, 7, 8, 9, 10, 7, 8, 9, 10]), None);
        assert_eq!(repetition_cut(&[7, 8, 9, 10, 7, 8, 9, 10]), None);
    }

    #[test]
    fn a_phrase_of_eight_to_ten_tokens_said_twice_is_seen_whatever_the_length() {
        // 16–20 tokens: the 3-repeat spans of periods 6 and 7 are longer than the text,
        // which once stopped the search before the 2-repeat periods 8–10.
        let phrase: Vec<u32> = (50..58).collect();
        assert_eq!(repetition_cut(&[phrase.clone(), phrase.clone()].concat()), Some(8));
        let phrase: Vec<u32> = (50..60).collect();
        assert_eq!(repetition_cut(&[phrase.clone(), phrase.clone()].concat()), Some(10));
    }

    #[test]
    fn ordinary_text_and_short_repeats_are_kept() {
        assert_eq!(repetition_cut(&[1, 2, 3, 4, 5, 6, 7]), None);
        // 对对对 (one token three times) is speech, not a loop.
        assert_eq!(repetition_cut(&[9, 4, 4, 4]), None);
        assert_eq!(repetition_cut(&[1, 2, 1, 2]), None);
        // A short phrase said twice is speech too (好的好的).
        assert_eq!(repetition_cut(&[7, 3, 4, 3, 4]), None);
    }
}
