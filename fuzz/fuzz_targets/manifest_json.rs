//! The models manifest: parsed or refused; an accepted one never names a file outside
//! the models folder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(manifest) = callbox::speech::manifest::Manifest::parse(text) {
        for model in &manifest.models {
            for file in model.files.values() {
                let path = std::path::Path::new(&file.path);
                assert!(!path.is_absolute() && !path.components().any(|c| c.as_os_str() == ".."));
            }
        }
    }
});
