//! Whisper's vocabulary: byte-level BPE tokens written with GPT-2's printable stand-ins for
//! bytes, one per line in the model's `tokens.txt`, and the special tokens found by name.

use std::collections::HashMap;

use super::SpeechError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub end_of_text: u32,
    pub start_of_transcript: u32,
    pub transcribe: u32,
    pub no_timestamps: u32,
    pub no_speech: u32,
    /// `<|startofprev|>`: previous-text context follows (hotword prompts).
    pub start_of_prev: Option<u32>,
    /// Every id from here on is special (languages, tasks, timestamps) and never text.
    pub first_special: u32,
    /// `<|0.00|>`: this id and the next ones are timestamps, 20 ms apart.
    pub first_timestamp: Option<u32>,
}

pub struct Vocabulary {
    /// Token id → the bytes it stands for.
    bytes: Vec<Vec<u8>>,
    ids: HashMap<String, u32>,
    /// Text token for each byte string, and the longest one (for `encode_greedy`).
    by_bytes: HashMap<Vec<u8>, u32>,
    longest: usize,
    pub specials: Specials,
    /// Language codes and their token ids, in vocabulary order (for detection).
    pub languages: Vec<(String, u32)>,
    /// The token that is a single space (suppressed as the first token).
    pub blank: Option<u32>,
}

/// GPT-2's table: printable characters stand for the 256 byte values.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(u32::from('¡')..=u32::from('¬'));
    printable.extend(u32::from('®')..=u32::from('ÿ'));
    let mut table = HashMap::with_capacity(256);
    let mut extra = 0;
    for byte in 0u32..256 {
        let ch = if printable.contains(&byte) {
            byte
        } else {
            extra += 1;
            255 + extra
        };
        if let (Some(c), Ok(b)) = (char::from_u32(ch), u8::try_from(byte)) {
            table.insert(c, b);
        }
    }
    table
}

impl Vocabulary {
    pub fn parse(text: &str) -> Result<Self, SpeechError> {
        let table = unicode_to_byte();
        let mut bytes = Vec::new();
        let mut ids = HashMap::new();
        for (id, line) in text.split('\n').enumerate() {
            let id = u32::try_from(id).map_err(|_| SpeechError::Vocabulary("more than 2^32 tokens".into()))?;
            if line.starts_with("<|") && line.ends_with("|>") {
                ids.insert(line.to_owned(), id);
                bytes.push(Vec::new());
            } else {
                bytes.push(line.chars().map(|c| table.get(&c).copied().unwrap_or(b'?')).collect());
            }
        }
        let find = |name: &str| {
            ids.get(name).copied().ok_or_else(|| SpeechError::Vocabulary(format!("no special token {name}")))
        };
        let specials = Specials {
            end_of_text: find("<|endoftext|>")?,
            start_of_transcript: find("<|startoftranscript|>")?,
            transcribe: find("<|transcribe|>")?,
            no_timestamps: find("<|notimestamps|>")?,
            no_speech: find("<|nospeech|>").or_else(|_| find("<|nocaptions|>"))?,
            start_of_prev: find("<|startofprev|>").ok(),
            first_special: find("<|endoftext|>")?,
            first_timestamp: find("<|0.00|>").ok(),
        };
        let mut languages: Vec<(String, u32)> = ids
            .iter()
            .filter(|(name, &id)| {
                id > specials.start_of_transcript
                    && id < specials.transcribe
                    && name.len() <= 8
                    && name[2..name.len() - 2].chars().all(|c| c.is_ascii_lowercase())
            })
            .map(|(name, &id)| (name[2..name.len() - 2].to_owned(), id))
            .collect();
        languages.sort_by_key(|(_, id)| *id);
        let blank = bytes.iter().position(|b| b == b" ").and_then(|id| u32::try_from(id).ok());
        let by_bytes: HashMap<Vec<u8>, u32> = (0..specials.first_special)
            .filter_map(|id| bytes.get(id as usize).filter(|b| !b.is_empty()).map(|b| (b.clone(), id)))
            .collect();
        let longest = by_bytes.keys().map(Vec::len).max().unwrap_or(1);
        Ok(Self { bytes, ids, by_bytes, longest, specials, languages, blank })
    }

    /// The id of `<|xx|>` for a language code such as "zh".
    pub fn language(&self, code: &str) -> Option<u32> {
        self.ids.get(&format!("<|{code}|>")).copied()
    }

    /// Tokens for `text`, the longest known byte string first at each point. Not always
    /// the merges BPE would make, but a spelling the decoder reads and writes alike (for
    /// hotwords). A byte with no token of its own is skipped (byte-level vocabularies have
    /// one for every byte).
    pub fn encode_greedy(&self, text: &str) -> Vec<u32> {
        let raw = text.as_bytes();
        let mut ids = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let found = (1..=self.longest.min(raw.len() - at))
                .rev()
                .find_map(|n| self.by_bytes.get(&raw[at..at + n]).map(|&id| (id, n)));
            match found {
                Some((id, n)) => {
                    ids.push(id);
                    at += n;
                }
                None => at += 1,
            }
        }
        ids
    }

    /// Text of the given ids; special tokens are skipped and broken UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut raw = Vec::new();
        for &id in ids {
            if let Some(b) = self.bytes.get(id as usize) {
                raw.extend_from_slice(b);
            }
        }
        String::from_utf8_lossy(&raw).into_owned()
    }
}
