//! Call understanding: what the call center acts on, from transcripts. Pure cores only;
//! the daemon feeds them utterances from the speech path's bus.

pub mod call;
pub mod emotion;
pub mod intent;
pub mod live;
pub mod pii;
pub mod rules;
pub mod state;
