//! Arbitrary UTF-8 as transcripts and names: the PII masker, the intent featurizer and
//! the log escaper. No panic; masking is idempotent; escaped text has no control or bidi
//! character left.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (masked, _) = callbox::pii::mask(text);
    let (twice, _) = callbox::pii::mask(&masked);
    assert_eq!(masked, twice, "masking is not idempotent");
    let _ = callbox::understanding::intent::features(text);
    assert!(callbox::escape::is_printable(&callbox::escape::escape_controls(text)));
    assert!(callbox::escape::is_printable(&callbox::escape::escape_bytes(data)));
});
