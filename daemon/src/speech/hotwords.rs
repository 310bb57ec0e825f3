//! Operator terms the ASR should favour (product, company and place names), pure.
//!
//! Two ways to feed them to Whisper, chosen by `speech.hotword_mode`:
//! - **bias**: while decoding, the next token of every term whose beginning the transcript
//!   has just produced (the first token always) gets `bias` added to its logit, so a term
//!   the audio supports wins over a near miss (佛地产 → 房地产) at no extra decoder step;
//! - **prompt**: the terms go before the transcript as Whisper's previous-text context
//!   (`<|startofprev|>` terms `<|startoftranscript|>` …), as faster-whisper's `hotwords`
//!   does; it costs one decoder step per prompt token on every utterance.

use serde::{Deserialize, Serialize};

use super::tokens::Vocabulary;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HotwordMode {
    #[default]
    Bias,
    Prompt,
}

/// Most terms and characters per term an operator list may hold (config checks it).
pub const MAX_TERMS: usize = 64;
pub const MAX_TERM_CHARS: usize = 32;
/// Prompt tokens at most (Whisper's own limit is half its 448-token context).
const MAX_PROMPT_TOKENS: usize = 64;

/// The terms as token sequences, as the decoder might write them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Hotwords {
    /// Each term once as written and, for terms in Latin script, once after a space
    /// (Whisper writes a word inside a sentence with its leading space).
    pub sequences: Vec<Vec<u32>>,
    /// The context for prompt mode (the terms after a space, as one text).
    pub prompt: Vec<u32>,
}

impl Hotwords {
    pub fn new(vocab: &Vocabulary, terms: &[String]) -> Self {
        let mut sequences = Vec::new();
        for term in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            sequences.push(vocab.encode_greedy(term));
            if term.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                sequences.push(vocab.encode_greedy(&format!(" {term}")));
            }
        }
        sequences.retain(|s| !s.is_empty());
        sequences.sort();
        sequences.dedup();
        let joined: Vec<&str> = terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).collect();
        let mut prompt =
            if joined.is_empty() { Vec::new() } else { vocab.encode_greedy(&format!(" {}", joined.join(" "))) };
        // The last tokens are the ones nearest the transcript: keep those.
        let excess = prompt.len().saturating_sub(MAX_PROMPT_TOKENS);
        prompt.drain(..excess);
        Self { sequences, prompt }
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Raises, by `bias`, the next token of every term the transcript has begun (and the
    /// first token of every term). A token raised by several terms is raised once.
    pub fn bias(&self, generated: &[u32], logits: &mut [f32], bias: f32) {
        let mut raised: Vec<u32> = Vec::new();
        for term in &self.sequences {
            for k in 0..term.len() {
                if generated.ends_with(&term[..k]) && !raised.contains(&term[k]) {
                    raised.push(term[k]);
                }
            }
        }
        for id in raised {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        // A toy byte-level vocabulary in GPT-2's printable form: single letters, a few
        // merges, then the specials.
        let mut lines: Vec<String> = "abcdefghijklmnopqrstuvwxyz".chars().map(String::from).collect();
        lines.extend(["Ġ", "ab", "abc", "Ġab", "cd"].map(String::from));
        lines.extend(
            [
                "<|endoftext|>",
                "<|startoftranscript|>",
                "<|en|>",
                "<|transcribe|>",
                "<|startofprev|>",
                "<|nospeech|>",
                "<|notimestamps|>",
            ]
            .map(String::from),
        );
        Vocabulary::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn terms_become_the_longest_tokens_with_and_without_a_leading_space() {
        let v = vocab();
        let h = Hotwords::new(&v, &["abcd".into(), " ".into()]);
        // "abc" (28) + "d" (3); " ab" (29) + "cd" (30).
        assert_eq!(h.sequences, vec![vec![28, 3], vec![29, 30]]);
        assert_eq!(h.prompt, vec![29, 30]);
        assert!(Hotwords::new(&v, &[]).is_empty());
    }

    #[test]
    fn the_next_token_of_a_begun_term_is_raised_once() {
        let v = vocab();
        let h = Hotwords::new(&v, &["abcd".into()]);
        let mut logits = vec![0.0f32; 40];
        // Nothing begun: only the first tokens ("abc", " ab").
        h.bias(&[1, 2], &mut logits, 2.0);
        let raised: Vec<usize> = (0..40).filter(|&i| logits[i] > 0.0).collect();
        assert_eq!(raised, vec![28, 29]);
        // After "abc": its continuation "d" too.
        let mut logits = vec![0.0f32; 40];
        h.bias(&[5, 28], &mut logits, 2.0);
        assert_eq!((logits[3], logits[28], logits[29], logits[30]), (2.0, 2.0, 2.0, 0.0));
    }
}
