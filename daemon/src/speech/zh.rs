//! Traditional → simplified Chinese for transcripts: Whisper often writes Mandarin in
//! traditional characters, while rules, intents and reports work in simplified. The table is
//! OpenCC's (phrases and characters), built into the models folder by models/build.sh.

use std::collections::HashMap;

use super::manifest::{ModelEntry, ModelSet};
use super::SpeechError;

pub struct TraditionalToSimplified {
    map: HashMap<String, String>,
    /// Longest source entry, in characters; bounds the longest-match search.
    longest: usize,
}

impl TraditionalToSimplified {
    pub fn load(models: &ModelSet, entry: &ModelEntry) -> Result<Self, SpeechError> {
        let bytes = models.read_verified(entry, "table")?;
        let text = String::from_utf8(bytes).map_err(|_| SpeechError::model(&entry.name, "table is not UTF-8"))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut map = HashMap::new();
        let mut longest = 1;
        for line in text.lines() {
            if let Some((from, to)) = line.split_once('\t') {
                longest = longest.max(from.chars().count());
                // Phrases come first in the file; a later character entry never overrides them.
                map.entry(from.to_owned()).or_insert_with(|| to.to_owned());
            }
        }
        Self { map, longest }
    }

    /// Longest match first, so phrase entries (瞭解 → 了解) beat single characters.
    pub fn convert(&self, text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        let mut key = String::new();
        while i < chars.len() {
            let mut matched = false;
            for len in (1..=self.longest.min(chars.len() - i)).rev() {
                key.clear();
                key.extend(&chars[i..i + len]);
                if let Some(to) = self.map.get(&key) {
                    out.push_str(to);
                    i += len;
                    matched = true;
                    break;
                }
            }
            if !matched {
                out.push(chars[i]);
                i += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_win_over_characters_and_other_text_passes_through() {
        let t = TraditionalToSimplified::parse("瞭解\t了解\n換\t换\n瞭\t瞭\n歌\t歌\n廣\t广\n");
        assert_eq!(t.convert("換一首歌"), "换一首歌");
        assert_eq!(t.convert("我不瞭解廣州, ok"), "我不了解广州, ok");
        assert_eq!(t.convert(""), "");
    }
}
