//! The config file: any text gives a config or a list of problems, never a panic; a
//! config that parses validates clean (parse already ran validation).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = callbox::config::parse(text) {
        assert!(config.validate().is_empty());
    }
});
