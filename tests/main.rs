//! The integration tests, as one binary with a module per area: each test binary links
//! the whole crate with tract, and on 2 cores (and under qemu for arm64) linking nine of
//! them cost CI more than running them. `cargo nextest run` still runs every test as its
//! own process; `--skip speech::` leaves out the model-heavy area (cross/build-arm64.sh).

// Test code states its expectations with unwrap/expect; the crate's lints deny them elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod alsa;
mod audiosocket;
mod config_cli;
mod control_access;
mod customers;
mod daemon_lifecycle;
mod hq;
mod intent;
mod layers;
mod speech;
mod spool;
mod store;
