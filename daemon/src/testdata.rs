//! Unit tests' access to what lives outside the crate: the real recordings in
//! `../shared/data` beside the checkout, and sox as an independent reference. When either
//! is missing the test fails with what to install or where the data belongs, not a panic
//! deep inside a parser.

use std::path::PathBuf;
use std::process::Command;

/// A file under `../shared/data/` beside the checkout.
pub fn shared_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(relative)
}

/// The bytes of a file under `../shared/data/`.
pub fn shared(relative: &str) -> Vec<u8> {
    let path = shared_path(relative);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "this test reads {} ({e}): the shared data set belongs beside the checkout as ../shared \
             (see README, 'The two commands')",
            path.display()
        )
    })
}

/// Runs sox with `args`; fails with what to install when sox is missing.
pub fn sox(args: &[&std::ffi::OsStr]) {
    let status = Command::new("sox")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("this test compares with sox, which cannot run ({e}): apt-get install sox"));
    assert!(status.success(), "sox {args:?} failed: {status}");
}
