//! Audio in: codecs, containers, resampling and the PBX-facing protocols.
//!
//! Everything here is sans-IO except the adapters named as such: each input
//! (AudioSocket, ALSA, spool) turns its wire or file format into per-leg PCM at
//! its own rate, and `resample` brings it to the 16 kHz that VAD and ASR take.

pub mod audiosocket;
pub mod g711;
pub mod resample;
pub mod wav;

use serde::{Deserialize, Serialize};

/// 16-bit PCM to the −1..1 floats the speech path works in.
pub fn pcm_to_f32(sample: i16) -> f32 {
    f32::from(sample) / 32768.0
}

/// −1..1 floats back to 16-bit PCM, clipped.
pub fn f32_to_pcm(sample: f32) -> i16 {
    (sample * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

/// Which side of a call a stream carries; they are analysed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Leg {
    Agent,
    Customer,
}

impl Leg {
    /// The other side of the same call.
    pub fn other(self) -> Self {
        match self {
            Self::Agent => Self::Customer,
            Self::Customer => Self::Agent,
        }
    }

    /// Lower-case name, as in the config and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Customer => "customer",
        }
    }
}
