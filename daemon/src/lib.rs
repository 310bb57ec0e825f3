//! callbox: the call-analysis appliance daemon and its technician CLI.
//!
//! See ARCHITECTURE.md at the repository root for the map of this crate.

pub mod audio;
pub mod calls;
pub mod cli;
pub mod cli_hq;
pub mod cli_store;
pub mod config;
pub mod control;
pub mod cpu;
pub mod customers;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod escape;
pub mod exit;
pub mod fsio;
pub mod health;
pub mod hex;
pub mod inputs;
pub mod logging;
pub mod notify;
pub mod offline;
pub mod paths;
pub mod pii;
pub mod private_daemon;
pub mod render;
pub mod speech;
pub mod storage;
pub mod store;
pub mod supervisor;
#[cfg(test)]
mod testdata;
pub mod transcribe;
pub mod understanding;
pub mod uplink;
