//! Band-limited resampling to the pipeline rate (rubato's synchronous FFT
//! resampler: exact rational ratios such as 8 kHz → 16 kHz, no linear
//! interpolation artefacts).
//!
//! Streaming: feed any number of samples, get what is ready; `finish` flushes
//! the filter's tail. The filter delay is removed, so output sample `n`
//! corresponds to input time `n / out_rate`.

use rubato::{FftFixedInOut, Resampler as _};

/// Input frames per FFT block: 10 ms at 8 kHz. Small keeps live latency low.
const CHUNK_FRAMES: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    #[error("cannot resample {from} Hz to {to} Hz: {detail}")]
    Setup { from: u32, to: u32, detail: String },
}

/// A mono streaming resampler from 16-bit PCM to f32 in [-1, 1].
pub struct StreamResampler {
    inner: Option<FftFixedInOut<f32>>,
    pending: Vec<f32>,
    /// Output samples still to drop to compensate the filter delay.
    to_skip: usize,
    input_total: u64,
    output_total: u64,
    ratio: f64,
    out_block: Vec<Vec<f32>>,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let ratio = f64::from(to) / f64::from(from);
        if from == to {
            return Ok(Self {
                inner: None,
                pending: vec![],
                to_skip: 0,
                input_total: 0,
                output_total: 0,
                ratio,
                out_block: vec![],
            });
        }
        let inner = FftFixedInOut::<f32>::new(from as usize, to as usize, CHUNK_FRAMES, 1)
            .map_err(|e| ResampleError::Setup { from, to, detail: e.to_string() })?;
        let to_skip = inner.output_delay();
        let out_block = inner.output_buffer_allocate(true);
        Ok(Self { inner: Some(inner), pending: vec![], to_skip, input_total: 0, output_total: 0, ratio, out_block })
    }

    /// Feeds samples; returns the output that is ready.
    pub fn push(&mut self, samples: &[i16]) -> Vec<f32> {
        self.input_total += samples.len() as u64;
        let Some(inner) = self.inner.as_mut() else {
            return samples.iter().copied().map(super::pcm_to_f32).collect();
        };
        self.pending.extend(samples.iter().copied().map(super::pcm_to_f32));
        let mut out = Vec::new();
        let block = inner.input_frames_next();
        let mut consumed = 0;
        while self.pending.len() - consumed >= block {
            let input = [&self.pending[consumed..consumed + block]];
            // Sizes come from the resampler itself, so processing cannot fail.
            if let Ok((_, written)) = inner.process_into_buffer(&input, &mut self.out_block, None) {
                out.extend_from_slice(&self.out_block[0][..written]);
            }
            consumed += block;
        }
        self.pending.drain(..consumed);
        self.emit(out)
    }

    /// Flushes the tail; the total output is then `round(input × ratio)` samples.
    pub fn finish(&mut self) -> Vec<f32> {
        let expected = (self.input_total as f64 * self.ratio).round() as u64;
        let Some(block) = self.inner.as_ref().map(|r| r.input_frames_next()) else { return vec![] };
        // Push silence through until the delayed tail is out. The delay is a
        // fraction of one FFT block, so a few rounds suffice; the cap is a guard.
        let zeros = vec![0i16; block];
        let mut out = Vec::new();
        for _ in 0..64 {
            if self.output_total >= expected {
                break;
            }
            out.extend(self.push(&zeros));
        }
        let excess = self.output_total.saturating_sub(expected) as usize;
        out.truncate(out.len().saturating_sub(excess));
        out
    }

    fn emit(&mut self, mut out: Vec<f32>) -> Vec<f32> {
        let skip = self.to_skip.min(out.len());
        out.drain(..skip);
        self.to_skip -= skip;
        self.output_total += out.len() as u64;
        out
    }
}

/// Resamples a whole recording at once.
pub fn resample_all(samples: &[i16], from: u32, to: u32) -> Result<Vec<f32>, ResampleError> {
    let mut r = StreamResampler::new(from, to)?;
    let mut out = r.push(samples);
    out.extend(r.finish());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn sine(freq: f64, rate: u32, secs: f64, amplitude: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n).map(|i| (amplitude * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()).round() as i16).collect()
    }

    /// Energy at `freq` by correlating with a quadrature pair (a one-bin DFT).
    fn amplitude_at(x: &[f32], freq: f64, rate: u32) -> f64 {
        let (mut re, mut im) = (0.0, 0.0);
        for (i, &s) in x.iter().enumerate() {
            let phase = 2.0 * PI * freq * i as f64 / f64::from(rate);
            re += f64::from(s) * phase.cos();
            im += f64::from(s) * phase.sin();
        }
        2.0 * (re * re + im * im).sqrt() / x.len() as f64
    }

    #[test]
    fn a_sine_keeps_its_frequency_and_level_from_8_to_16_khz() {
        let input = sine(1000.0, 8000, 1.0, 16384.0);
        let out = resample_all(&input, 8000, 16_000).unwrap();
        assert_eq!(out.len(), 16_000);
        // Skip the edges where the filter ramps.
        let middle = &out[1600..14_400];
        let level = amplitude_at(middle, 1000.0, 16_000);
        assert!((level - 0.5).abs() < 0.01, "level {level}");
        // Nothing at the neighbouring frequencies or the image at 7 kHz.
        for other in [500.0, 2000.0, 7000.0] {
            let leak = amplitude_at(middle, other, 16_000);
            assert!(leak < 0.005, "{other} Hz: {leak}");
        }
    }

    #[test]
    fn streaming_in_odd_pieces_equals_one_shot() {
        let input = sine(440.0, 8000, 0.5, 8000.0);
        let whole = resample_all(&input, 8000, 16_000).unwrap();
        let mut r = StreamResampler::new(8000, 16_000).unwrap();
        let mut pieces = Vec::new();
        for chunk in input.chunks(37) {
            pieces.extend(r.push(chunk));
        }
        pieces.extend(r.finish());
        assert_eq!(pieces.len(), whole.len());
        let max_diff = pieces.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-5, "{max_diff}");
    }

    #[test]
    fn the_filter_delay_is_removed() {
        // An impulse at 100 ms must come out at 100 ms.
        let mut input = vec![0i16; 8000];
        input[800] = 20_000;
        let out = resample_all(&input, 8000, 16_000).unwrap();
        let peak = out.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0;
        assert!((peak as i64 - 1600).abs() <= 1, "peak at {peak}");
    }

    #[test]
    fn same_rate_passes_through() {
        let out = resample_all(&[0, 16384, -16384], 16_000, 16_000).unwrap();
        assert_eq!(out, vec![0.0, 0.5, -0.5]);
    }
}
