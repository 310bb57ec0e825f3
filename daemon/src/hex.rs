//! Lower-case hexadecimal: digests, key ids, call ids, audio on the control socket. One
//! encoder instead of a `format!("{b:02x}")` per byte at each place that needs one.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The bytes of an even-length hex string (either case); None for anything else.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    text.as_bytes().chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_byte_round_trips_and_matches_format() {
        let all: Vec<u8> = (0..=255).collect();
        let text = super::encode(&all);
        assert_eq!(text, all.iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_eq!(super::decode(&text).unwrap(), all);
        assert_eq!(super::decode("FF00").unwrap(), [255, 0]);
        for bad in ["f", "zz", "0g", "abc"] {
            assert!(super::decode(bad).is_none(), "{bad}");
        }
    }
}
