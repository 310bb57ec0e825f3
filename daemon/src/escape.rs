//! One printable, lossless form for text that came from outside (file names, ids,
//! peer input) before it reaches a log line, a status reply or a reason file.
//!
//! A newline in a spool file name must not forge a second log line, and a U+202E
//! must not reverse what a technician reads. So control characters, Unicode bidi
//! controls and the backslash itself are written as escapes; bytes that are not
//! UTF-8 become `\xNN`. The result is unambiguous: two different inputs never
//! escape to the same text.

use std::borrow::Cow;

/// Characters that change how the text around them is displayed: the bidi embedding,
/// override and isolate controls and the directional marks.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_bidi_control(c) || c == '\u{2028}' || c == '\u{2029}'
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
    }
}

/// `text` with control and bidi characters escaped; borrowed when nothing needs it.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_where(text, needs_escape)
}

/// For log lines: control and bidi characters escaped, backslashes left as they are,
/// so that a name already escaped (`escape_bytes`) reads the same in the log. A line
/// can then no longer be split or reversed; it is not meant to be decoded back.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    escape_where(text, |c| c != '\\' && needs_escape(c))
}

fn escape_where(text: &str, hazard: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&hazard) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hazard(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Arbitrary bytes (a Unix file name) as escaped text: valid UTF-8 runs as `escape`
/// writes them, every other byte as `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape(chunk.valid()));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A path's file name, escaped losslessly (`?` when it has none).
pub fn file_name(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    path.file_name().map_or_else(|| "?".to_owned(), |n| escape_bytes(n.as_bytes()))
}

/// Whether the text is printable: no control or bidi characters (ids, names).
pub fn is_printable(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() || is_bidi_control(c) || c == '\u{2028}' || c == '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_and_reversals_are_escaped() {
        assert_eq!(escape("a.wav\n2026-01-01 ERROR [supervisor] x"), "a.wav\\n2026-01-01 ERROR [supervisor] x");
        assert_eq!(escape("evil\u{202E}vaw.exe"), "evil\\u{202e}vaw.exe");
        assert_eq!(escape("tab\there\r\u{1b}[31m"), "tab\\there\\r\\u{1b}[31m");
        assert!(matches!(escape("普通的 call-42.wav"), Cow::Borrowed(_)));
    }

    #[test]
    fn escaping_is_lossless() {
        // Without escaping the backslash, "a\\n" and "a\n" would read the same.
        assert_ne!(escape("a\\n"), escape("a\n"));
        assert_eq!(escape_bytes(b"rec\xff\xfe.wav"), "rec\\xff\\xfe.wav");
        assert_ne!(escape_bytes(b"rec\xff.wav"), escape_bytes(b"rec\\xff.wav"));
        assert_eq!(escape_bytes("通话.wav".as_bytes()), "通话.wav");
    }

    #[test]
    fn log_escaping_leaves_backslashes() {
        assert_eq!(escape_controls("a\\nb\nc\u{202E}"), "a\\nb\\nc\\u{202e}");
    }

    #[test]
    fn printable_means_no_controls_or_bidi() {
        assert!(is_printable("call-42 通话"));
        assert!(!is_printable("a\nb"));
        assert!(!is_printable("a\u{202E}b"));
        assert!(!is_printable("a\u{2066}b"));
    }
}
