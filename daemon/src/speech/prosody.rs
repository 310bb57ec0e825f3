//! Prosody of one utterance: pitch (YIN F0 over voiced 40 ms frames), energy, speaking rate
//! and pauses. Pure; the later emotion stage compares these with the same speaker's baseline.

use serde::Serialize;

const RATE: f32 = 16_000.0;
const FRAME: usize = 640; // 40 ms: two periods of the lowest pitch tracked (50 Hz)
const STEP: usize = 320; // 20 ms
const MIN_F0: f32 = 60.0;
const MAX_F0: f32 = 400.0;
/// YIN's absolute threshold on the cumulative-mean-normalised difference.
const YIN_THRESHOLD: f32 = 0.15;
/// Frames quieter than this (dBFS) are silence for pause and voicing purposes.
const SILENCE_DBFS: f32 = -45.0;
const MIN_PAUSE_SECS: f32 = 0.2;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prosody {
    /// Median F0 of voiced frames, Hz (None when nothing was voiced).
    pub f0_median_hz: Option<f32>,
    /// Spread of F0 between the 10th and 90th percentile, in semitones.
    pub f0_range_semitones: Option<f32>,
    pub voiced_ratio: f32,
    /// RMS level of the non-silent frames, dBFS.
    pub energy_dbfs: f32,
    /// Characters (Chinese) or words (other scripts) per minute of the utterance.
    pub rate_per_min: f32,
    pub pauses: usize,
    pub pause_secs: f32,
}

fn dbfs(frame: &[f32]) -> f32 {
    let mean_sq = frame.iter().map(|s| s * s).sum::<f32>() / frame.len().max(1) as f32;
    10.0 * mean_sq.max(1e-12).log10()
}

/// YIN pitch of one frame, or None if unvoiced.
pub fn yin(frame: &[f32]) -> Option<f32> {
    let max_lag = (RATE / MIN_F0) as usize;
    let min_lag = (RATE / MAX_F0) as usize;
    let window = frame.len().checked_sub(max_lag)?;
    let mut diff = vec![0f32; max_lag + 1];
    for (lag, d) in diff.iter_mut().enumerate().skip(1) {
        *d = (0..window).map(|i| (frame[i] - frame[i + lag]).powi(2)).sum();
    }
    let mut running = 0.0;
    let mut cmnd = vec![1f32; max_lag + 1];
    for lag in 1..=max_lag {
        running += diff[lag];
        cmnd[lag] = if running > 0.0 { diff[lag] * lag as f32 / running } else { 1.0 };
    }
    let mut lag = min_lag;
    while lag < max_lag {
        if cmnd[lag] < YIN_THRESHOLD {
            while lag + 1 < max_lag && cmnd[lag + 1] < cmnd[lag] {
                lag += 1;
            }
            // Parabolic interpolation around the dip.
            let (a, b, c) = (cmnd[lag - 1], cmnd[lag], cmnd[lag + 1]);
            let denom = a - 2.0 * b + c;
            let shift = if denom.abs() > 1e-9 { 0.5 * (a - c) / denom } else { 0.0 };
            return Some(RATE / (lag as f32 + shift));
        }
        lag += 1;
    }
    None
}

/// Units spoken: CJK characters count one each, other runs of letters/digits one per word.
pub fn spoken_units(text: &str) -> usize {
    let mut units = 0;
    let mut in_word = false;
    for c in text.chars() {
        if ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c) {
            units += 1;
            in_word = false;
        } else if c.is_alphanumeric() {
            if !in_word {
                units += 1;
            }
            in_word = true;
        } else {
            in_word = false;
        }
    }
    units
}

pub fn analyse(audio: &[f32], text: &str) -> Prosody {
    let mut f0s = Vec::new();
    let mut loud_energy = Vec::new();
    let (mut frames, mut pauses, mut pause_frames, mut run) = (0usize, 0usize, 0usize, 0usize);
    let pause_min_frames = (MIN_PAUSE_SECS * RATE / STEP as f32) as usize;
    let mut seen_speech = false;
    let mut start = 0;
    while start + FRAME <= audio.len() {
        let frame = &audio[start..start + FRAME];
        frames += 1;
        let level = dbfs(frame);
        if level > SILENCE_DBFS {
            // Only pauses between speech count, not leading or trailing silence.
            if seen_speech && run >= pause_min_frames {
                pauses += 1;
                pause_frames += run;
            }
            run = 0;
            seen_speech = true;
            loud_energy.push(level);
            if let Some(f0) = yin(frame) {
                f0s.push(f0);
            }
        } else {
            run += 1;
        }
        start += STEP;
    }
    f0s.sort_by(f32::total_cmp);
    let pct = |p: f32| f0s[((f0s.len() - 1) as f32 * p).round() as usize];
    let secs = audio.len() as f32 / RATE;
    Prosody {
        f0_median_hz: (!f0s.is_empty()).then(|| pct(0.5)),
        f0_range_semitones: (!f0s.is_empty()).then(|| 12.0 * (pct(0.9) / pct(0.1)).log2()),
        voiced_ratio: if frames == 0 { 0.0 } else { f0s.len() as f32 / frames as f32 },
        energy_dbfs: if loud_energy.is_empty() {
            dbfs(audio)
        } else {
            // Mean power of the loud frames, back in dB.
            10.0 * (loud_energy.iter().map(|d| 10f32.powf(d / 10.0)).sum::<f32>() / loud_energy.len() as f32).log10()
        },
        rate_per_min: if secs > 0.0 { spoken_units(text) as f32 * 60.0 / secs } else { 0.0 },
        pauses,
        pause_secs: pause_frames as f32 * STEP as f32 / RATE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f32, secs: f32, amp: f32) -> Vec<f32> {
        (0..(secs * RATE) as usize).map(|i| amp * (2.0 * std::f32::consts::PI * freq * i as f32 / RATE).sin()).collect()
    }

    #[test]
    fn yin_finds_the_pitch_of_a_voice_like_tone() {
        for f in [110.0, 180.0, 240.0] {
            // A fundamental with two harmonics, like a vowel.
            let x: Vec<f32> = tone(f, 0.04, 0.3)
                .iter()
                .zip(tone(2.0 * f, 0.04, 0.15))
                .zip(tone(3.0 * f, 0.04, 0.1))
                .map(|((a, b), c)| a + b + c)
                .collect();
            let got = yin(&x).unwrap();
            assert!((got - f).abs() / f < 0.02, "{f} Hz → {got}");
        }
        assert_eq!(yin(&vec![0.0; FRAME]), None);
    }

    #[test]
    fn pauses_energy_and_rate() {
        let mut x = tone(150.0, 1.0, 0.1);
        x.extend(vec![0.0; 8000]); // a 0.5 s pause
        x.extend(tone(150.0, 0.5, 0.1));
        let p = analyse(&x, "你好，我想问一下价格");
        assert_eq!(p.pauses, 1);
        assert!((p.pause_secs - 0.5).abs() < 0.06, "{}", p.pause_secs);
        // A 0.1 sine is −23 dBFS.
        assert!((p.energy_dbfs + 23.0).abs() < 0.5, "{}", p.energy_dbfs);
        assert!((p.f0_median_hz.unwrap() - 150.0).abs() < 3.0);
        // 9 characters in 2 s.
        assert!((p.rate_per_min - 270.0).abs() < 1.0, "{}", p.rate_per_min);
        assert_eq!(spoken_units("ok, 我们 price-check 2"), 6);
    }
}
