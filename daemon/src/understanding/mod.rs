//! Call understanding: what the call center acts on, from transcripts. Pure cores
//! (`call`, `core`, `emotion`, `intent`, `lexicon`, `rules`, `state`) and one shell, `live`, the
//! daemon's component that feeds them from the speech path's bus.

pub mod call;
pub mod core;
pub mod emotion;
pub mod intent;
pub mod lexicon;
pub mod live;
pub mod rules;
pub mod state;
