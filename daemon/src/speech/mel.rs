//! Whisper's log-mel front end: 25 ms Hann frames every 10 ms (n_fft 400, hop 160 at
//! 16 kHz), power spectrum, 80 Slaney mel bands, log10, floor at max − 8, then (x + 4) / 4.
//! Matches openai-whisper's `log_mel_spectrogram` (torch.stft with centred, reflect-padded
//! frames, the last frame dropped); tests compare it with values the reference computed.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

pub const SAMPLE_RATE: u32 = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
const N_BINS: usize = N_FFT / 2 + 1;

/// Log-mel spectrogram frames, band-major like Whisper's input: `data[band * frames + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub bands: usize,
    pub frames: usize,
    pub data: Vec<f32>,
}

pub struct MelFrontEnd {
    bands: usize,
    /// `bands × N_BINS` weights, row-major.
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl MelFrontEnd {
    pub fn new(bands: usize) -> Self {
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        // Periodic Hann, as torch.hann_window(400).
        let window = (0..N_FFT)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        Self { bands, filters: slaney_mel_filters(SAMPLE_RATE, N_FFT, bands), window, fft }
    }

    /// Frames for `samples` followed by `padding` zero samples (Whisper pads the audio, not
    /// the spectrogram, so the padding's own frames shape the max − 8 floor).
    pub fn log_mel(&self, samples: &[f32], padding: usize) -> LogMel {
        let total = samples.len() + padding;
        let frames = total / HOP; // torch.stft gives total/HOP + 1 frames; Whisper drops the last
        let half = N_FFT / 2;
        // Centred frames over the reflect-padded signal, as torch.stft(center=True).
        let at = |i: isize| -> f32 {
            let n = total as isize;
            let j = if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            };
            usize::try_from(j).ok().and_then(|j| samples.get(j)).copied().unwrap_or(0.0)
        };
        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; N_BINS];
        let mut data = vec![0f32; self.bands * frames];
        for t in 0..frames {
            let start = (t * HOP) as isize - half as isize;
            for (k, slot) in frame.iter_mut().enumerate() {
                *slot = at(start + k as isize) * self.window[k];
            }
            // Lengths come from make_*_vec, so process cannot fail.
            if self.fft.process_with_scratch(&mut frame, &mut spectrum, &mut scratch).is_err() {
                continue;
            }
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for band in 0..self.bands {
                let weights = &self.filters[band * N_BINS..(band + 1) * N_BINS];
                let energy: f32 = weights.iter().zip(&power).map(|(w, p)| w * p).sum();
                data[band * frames + t] = energy.max(1e-10).log10();
            }
        }
        let max = data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in &mut data {
            *v = ((*v).max(max - 8.0) + 4.0) / 4.0;
        }
        LogMel { bands: self.bands, frames, data }
    }
}

fn hz_to_mel(hz: f64) -> f64 {
    // Slaney's scale (librosa's default): linear below 1 kHz, logarithmic above.
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// librosa.filters.mel(sr, n_fft, n_mels, fmin=0, fmax=sr/2, htk=False, norm="slaney"),
/// which is what Whisper's mel_filters.npz holds.
pub fn slaney_mel_filters(sample_rate: u32, n_fft: usize, bands: usize) -> Vec<f32> {
    let bins = n_fft / 2 + 1;
    let nyquist = f64::from(sample_rate) / 2.0;
    let fft_freqs: Vec<f64> = (0..bins).map(|i| nyquist * i as f64 / (bins - 1) as f64).collect();
    let (mel_min, mel_max) = (hz_to_mel(0.0), hz_to_mel(nyquist));
    let points: Vec<f64> =
        (0..bands + 2).map(|i| mel_to_hz(mel_min + (mel_max - mel_min) * i as f64 / (bands + 1) as f64)).collect();
    let mut filters = vec![0f32; bands * bins];
    for band in 0..bands {
        let (lo, centre, hi) = (points[band], points[band + 1], points[band + 2]);
        let norm = 2.0 / (hi - lo);
        for (bin, &f) in fft_freqs.iter().enumerate() {
            let rising = (f - lo) / (centre - lo);
            let falling = (hi - f) / (hi - centre);
            filters[band * bins + bin] = (rising.min(falling).max(0.0) * norm) as f32;
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/whisper_mel_reference.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    #[test]
    fn filter_bank_matches_whispers_mel_filters() {
        let r = reference();
        let filters = slaney_mel_filters(16_000, N_FFT, 80);
        let sums = floats(&r["filters"]["band_sums"]);
        let peaks = floats(&r["filters"]["band_peaks"]);
        let peak_bins: Vec<u64> =
            r["filters"]["band_peak_bins"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        for band in 0..80 {
            let row = &filters[band * N_BINS..(band + 1) * N_BINS];
            let sum: f32 = row.iter().sum();
            let (bin, peak) = row.iter().enumerate().fold((0, 0f32), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
            assert!(
                (sum - sums[band]).abs() <= 1e-5 * sums[band].max(1e-3),
                "band {band}: sum {sum} vs {}",
                sums[band]
            );
            assert!((peak - peaks[band]).abs() <= 1e-5 * peaks[band].max(1e-3), "band {band}: peak {peak}");
            assert_eq!(bin as u64, peak_bins[band], "band {band}");
        }
    }

    #[test]
    fn log_mel_of_a_real_clip_matches_the_reference_implementation() {
        let r = reference();
        let clip = format!("speech/{}", r["clip"].as_str().unwrap());
        let wav = crate::audio::wav::parse(&crate::testdata::shared(&clip)).unwrap();
        let audio: Vec<f32> = wav.channels[0].iter().copied().map(crate::audio::pcm_to_f32).collect();
        let window = r["window_secs"].as_u64().unwrap() as usize * 16_000;
        let audio = &audio[..audio.len().min(window)];
        let mel = MelFrontEnd::new(80).log_mel(audio, window - audio.len());
        assert_eq!(mel.frames as u64, r["frames"].as_u64().unwrap());
        let every = r["every"].as_u64().unwrap() as usize;
        let mut worst = 0f32;
        for (i, frame) in r["sampled_frames"].as_array().unwrap().iter().enumerate() {
            let t = i * every;
            for (band, want) in floats(frame).into_iter().enumerate() {
                worst = worst.max((mel.data[band * mel.frames + t] - want).abs());
            }
        }
        // Reference values are rounded to 1e-5; f32 FFT versus numpy's f64 adds a little more.
        assert!(worst < 2e-3, "largest difference {worst}");
        let mean = mel.data.iter().sum::<f32>() / mel.data.len() as f32;
        assert!((mean - r["mean"].as_f64().unwrap() as f32).abs() < 1e-4, "mean {mean}");
    }

    #[test]
    fn silence_is_floored_and_the_padding_counts_as_frames() {
        let mel = MelFrontEnd::new(80).log_mel(&[], 16_000);
        assert_eq!(mel.frames, 100);
        // All-zero input: log10(1e-10) = −10 everywhere → (−10 + 4) / 4.
        assert!(mel.data.iter().all(|&v| (v + 1.5).abs() < 1e-6));
    }
}
