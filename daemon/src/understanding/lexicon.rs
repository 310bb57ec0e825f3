//! English text sentiment from VADER's lexicon (MIT, C.J. Hutto; `models/convert.py`
//! extracts it): the core of VADER's scoring — word valences, negation of the three words
//! before, ALL-CAPS emphasis, "but" shifting weight to what follows — normalised to a
//! compound score in -1..1. The Chinese model has never seen English; this has.

use std::collections::HashMap;

use crate::speech::{ModelSet, SpeechError};

/// Compound scores within ±this are neutral (VADER's own threshold).
const NEUTRAL_BAND: f32 = 0.05;
/// VADER's normalisation constant: compound = sum / sqrt(sum² + ALPHA).
const ALPHA: f32 = 15.0;
const NEGATION_FACTOR: f32 = -0.74;
const CAPS_BOOST: f32 = 0.733;
/// Longest lexicon file accepted (VADER's is ~7,500 lines, ~90 kB).
const MAX_TABLE_BYTES: usize = 4 * 1024 * 1024;
const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nobody",
    "nothing",
    "neither",
    "nor",
    "nowhere",
    "cannot",
    "cant",
    "dont",
    "don't",
    "doesnt",
    "doesn't",
    "didnt",
    "didn't",
    "isnt",
    "isn't",
    "arent",
    "aren't",
    "wasnt",
    "wasn't",
    "wont",
    "won't",
    "wouldnt",
    "wouldn't",
    "shouldnt",
    "shouldn't",
    "couldnt",
    "couldn't",
    "aint",
    "ain't",
    "without",
    "hardly",
];

pub struct SentimentLexicon {
    valence: HashMap<String, f32>,
}

impl SentimentLexicon {
    pub fn load(set: &ModelSet) -> Result<Self, SpeechError> {
        let entry = set.for_task("sentiment-lexicon")?;
        let bytes = set.read_verified(entry, "table")?;
        if bytes.len() > MAX_TABLE_BYTES {
            return Err(SpeechError::model(&entry.name, "lexicon larger than 4 MiB"));
        }
        let text = String::from_utf8(bytes).map_err(|_| SpeechError::model(&entry.name, "lexicon is not UTF-8"))?;
        Self::parse(&text).map_err(|line| SpeechError::model(&entry.name, format!("lexicon line {line} is malformed")))
    }

    /// `word<TAB>valence` lines; Err(line number) on the first malformed one.
    pub fn parse(table: &str) -> Result<Self, usize> {
        let mut valence = HashMap::new();
        for (i, line) in table.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let (word, value) = line.split_once('\t').ok_or(i + 1)?;
            let value: f32 = value.trim().parse().map_err(|_| i + 1)?;
            if !value.is_finite() {
                return Err(i + 1);
            }
            valence.insert(word.to_lowercase(), value);
        }
        Ok(Self { valence })
    }

    /// The compound score, -1 (most negative) .. 1.
    pub fn compound(&self, text: &str) -> f32 {
        let tokens: Vec<&str> = text
            .split_whitespace()
            .map(|t| t.trim_matches(|c: char| !c.is_alphanumeric() && c != '\''))
            .filter(|t| !t.is_empty())
            .collect();
        let lower: Vec<String> = tokens.iter().map(|t| t.to_lowercase()).collect();
        let shouting = tokens.iter().any(|t| is_caps(t)) && !tokens.iter().all(|t| is_caps(t));
        let but_at = lower.iter().position(|t| t == "but");
        let mut sum = 0.0f32;
        for (i, word) in lower.iter().enumerate() {
            let Some(&base) = self.valence.get(word) else { continue };
            let mut v = base;
            if shouting && is_caps(tokens[i]) {
                v += CAPS_BOOST * v.signum();
            }
            if lower[i.saturating_sub(3)..i].iter().any(|w| NEGATIONS.contains(&w.as_str())) {
                v *= NEGATION_FACTOR;
            }
            // "but": what comes before counts half, what follows half again as much.
            match but_at {
                Some(b) if i < b => v *= 0.5,
                Some(b) if i > b => v *= 1.5,
                _ => {}
            }
            sum += v;
        }
        sum / (sum * sum + ALPHA).sqrt()
    }

    /// `negative`, `neutral` or `positive`, as the Chinese sentiment model labels them.
    pub fn label(&self, text: &str) -> &'static str {
        match self.compound(text) {
            c if c >= NEUTRAL_BAND => "positive",
            c if c <= -NEUTRAL_BAND => "negative",
            _ => "neutral",
        }
    }
}

fn is_caps(token: &str) -> bool {
    token.chars().filter(|c| c.is_alphabetic()).count() > 1 && token.chars().all(|c| !c.is_lowercase())
}

/// Whether a transcript is written in Latin script (English) rather than Chinese: more
/// ASCII letters than CJK characters.
pub fn is_latin_script(text: &str) -> bool {
    let latin = text.chars().filter(char::is_ascii_alphabetic).count();
    let cjk = text.chars().filter(|&c| ('\u{4E00}'..='\u{9FFF}').contains(&c)).count();
    latin > cjk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lexicon() -> SentimentLexicon {
        SentimentLexicon::parse("good\t1.9\ngreat\t3.1\nterrible\t-2.1\nscam\t-2.5\nhate\t-2.7\nthanks\t1.9\n").unwrap()
    }

    #[test]
    fn valences_negation_caps_and_but_move_the_score() {
        let l = lexicon();
        assert_eq!(l.label("this is good"), "positive");
        assert_eq!(l.label("this is not good"), "negative", "negation within three words flips");
        assert_eq!(l.label("stop calling me"), "neutral", "no lexicon word");
        assert_eq!(l.label("this is a SCAM"), "negative");
        assert!(l.compound("this is a SCAM") < l.compound("this is a scam"), "caps emphasise");
        assert!(l.compound("good but terrible") < 0.0, "after `but` counts more");
        let c = l.compound("great great great great great great");
        assert!(c > 0.9 && c < 1.0, "{c}");
    }

    #[test]
    fn malformed_tables_name_the_line_and_scripts_are_told_apart() {
        assert_eq!(SentimentLexicon::parse("good\t1.9\nbad\n").err(), Some(2));
        assert_eq!(SentimentLexicon::parse("good\tNaN\n").err(), Some(1));
        assert!(is_latin_script("I want a real person"));
        assert!(!is_latin_script("我要人工 OK"));
    }
}
