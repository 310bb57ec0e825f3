//! The local control channel: a Unix socket speaking one JSON object per line.
//!
//! `protocol` is the closed message set and the bounded framer (no IO);
//! `auth` maps a peer's credentials to a role; `server` is the daemon side,
//! `client` the CLI side; `convert` turns internal types into the protocol's own, in
//! one place.

pub mod admission;
pub mod auth;
pub mod client;
pub mod convert;
pub mod protocol;
pub mod server;
mod status;
