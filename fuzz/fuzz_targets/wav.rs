//! Recordings dropped into the spool: any bytes give a WAV or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(wav) = callbox::audio::wav::parse(data) {
        let frames = wav.channels.first().map_or(0, Vec::len);
        assert!(wav.channels.iter().all(|c| c.len() == frames), "channels of unequal length");
        let _ = wav.duration_secs();
    }
});
