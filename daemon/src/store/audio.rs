//! A leg's audio as the store keeps it: G.711 µ-law at the leg's own rate (8 bits a
//! sample: half of 16-bit PCM, and what a telephone line carries anyway), cut into chunks
//! of a few seconds so that a call's audio is persisted as it comes and a crash loses at
//! most one chunk per leg. Pure: samples in, chunks out.

use crate::audio::g711;
use crate::audio::Leg;

/// Seconds of audio per stored chunk.
pub const CHUNK_SECS: u32 = 5;

/// A stretch of one leg's audio.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioChunk {
    pub leg: Leg,
    /// From 0, per leg; the chunk's place in the leg (part of its nonce and AAD).
    pub index: u32,
    /// The leg's last chunk (sealed as such: a leg cut short by a crash is visible).
    pub last: bool,
    pub rate: u32,
    /// Where the chunk starts, in seconds from the leg's first sample.
    pub start_secs: f64,
    pub mulaw: Vec<u8>,
}

impl AudioChunk {
    pub fn end_secs(&self) -> f64 {
        self.start_secs + self.mulaw.len() as f64 / f64::from(self.rate.max(1))
    }

    /// The record index: the leg in the high bits, so both legs share one index space.
    pub fn record_index(&self) -> u64 {
        record_index(self.leg, self.index)
    }
}

pub fn record_index(leg: Leg, index: u32) -> u64 {
    let code: u64 = match leg {
        Leg::Customer => 0,
        Leg::Agent => 1,
    };
    code << 32 | u64::from(index)
}

/// Cuts one leg's samples into µ-law chunks.
pub struct AudioChunker {
    leg: Leg,
    rate: u32,
    offset_secs: f64,
    buffer: Vec<u8>,
    next_index: u32,
    samples_out: u64,
}

impl AudioChunker {
    /// `offset_secs`: where the leg's first sample sits in the call.
    pub fn new(leg: Leg, rate: u32, offset_secs: f64) -> Self {
        Self { leg, rate: rate.max(1), offset_secs, buffer: Vec::new(), next_index: 0, samples_out: 0 }
    }

    fn chunk_len(&self) -> usize {
        (self.rate * CHUNK_SECS) as usize
    }

    /// Takes samples; returns every chunk they complete.
    pub fn push(&mut self, samples: &[i16]) -> Vec<AudioChunk> {
        self.buffer.extend(g711::encode_ulaw(samples));
        let mut out = Vec::new();
        while self.buffer.len() >= self.chunk_len() {
            let rest = self.buffer.split_off(self.chunk_len());
            let full = std::mem::replace(&mut self.buffer, rest);
            out.push(self.cut(full, false));
        }
        out
    }

    /// The leg's last chunk (possibly empty: it still says the leg ended).
    pub fn finish(mut self) -> AudioChunk {
        let rest = std::mem::take(&mut self.buffer);
        self.cut(rest, true)
    }

    fn cut(&mut self, mulaw: Vec<u8>, last: bool) -> AudioChunk {
        let chunk = AudioChunk {
            leg: self.leg,
            index: self.next_index,
            last,
            rate: self.rate,
            start_secs: self.offset_secs + self.samples_out as f64 / f64::from(self.rate),
            mulaw,
        };
        self.next_index += 1;
        self.samples_out += chunk.mulaw.len() as u64;
        chunk
    }
}

/// A WAV file (format 7, G.711 µ-law, mono) around µ-law bytes: what `calls audio` writes,
/// readable by sox, Audacity and callbox itself.
pub fn mulaw_wav(rate: u32, mulaw: &[u8]) -> Vec<u8> {
    let data = u32::try_from(mulaw.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(58 + mulaw.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(50 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&18u32.to_le_bytes());
    out.extend_from_slice(&7u16.to_le_bytes()); // WAVE_FORMAT_MULAW
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes()); // bytes per second
    out.extend_from_slice(&1u16.to_le_bytes()); // block align
    out.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(&0u16.to_le_bytes()); // no extra format bytes
    out.extend_from_slice(b"fact");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&data.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    out.extend_from_slice(mulaw);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_sample_once_in_order_and_the_last_is_marked() {
        let mut c = AudioChunker::new(Leg::Agent, 8000, 1.5);
        let samples: Vec<i16> = (0..93_000).map(|i| ((i % 200) * 100 - 10_000) as i16).collect();
        let mut chunks = Vec::new();
        for block in samples.chunks(1234) {
            chunks.extend(c.push(block));
        }
        chunks.push(c.finish());
        assert_eq!(chunks.len(), 3, "two full 5-s chunks and the rest");
        assert_eq!(chunks.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(chunks.iter().map(|c| c.last).collect::<Vec<_>>(), [false, false, true]);
        assert_eq!(chunks.iter().map(|c| c.start_secs).collect::<Vec<_>>(), [1.5, 6.5, 11.5]);
        assert!((chunks[2].end_secs() - (1.5 + 93_000.0 / 8000.0)).abs() < 1e-9);
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.mulaw.clone()).collect();
        assert_eq!(all, g711::encode_ulaw(&samples));
        assert_ne!(record_index(Leg::Agent, 0), record_index(Leg::Customer, 0));
    }

    #[test]
    fn the_wav_reads_back_through_callbox_s_own_reader() {
        let samples: Vec<i16> = (0..800).map(|i| (i * 37 % 2000 - 1000) as i16).collect();
        let wav = mulaw_wav(8000, &g711::encode_ulaw(&samples));
        let read = crate::audio::wav::parse(&wav).unwrap();
        assert_eq!((read.sample_rate, read.encoding), (8000, crate::audio::wav::Encoding::Ulaw));
        assert_eq!(read.channels, [g711::decode_ulaw(&g711::encode_ulaw(&samples))]);
    }
}
