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
    // The reply and the agent line land in their own ranges of the model's input.
    let (reply, agent) = text.split_at(text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i));
    let dims = callbox::understanding::intent::DIMS as u32;
    let context_dims = callbox::understanding::intent::CONTEXT_DIMS as u32;
    for (k, v) in callbox::understanding::intent::features_with_context(reply, agent) {
        assert!(k < dims + context_dims && v.is_finite(), "feature {k} = {v}");
    }
    assert!(callbox::escape::is_printable(&callbox::escape::escape_controls(text)));
    assert!(callbox::escape::is_printable(&callbox::escape::escape_bytes(data)));
});
