//! Rule files: any text gives a rule set or its problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = callbox::understanding::rules::RuleSet::parse(text);
});
