//! Whisper's cross-attention for one decoder layer and one utterance, outside the graph
//! (pure): tract packs a runtime matrix operand again on every product, so in the graph the
//! encoder's keys and values, fixed for the whole utterance, were re-laid out on every
//! decoder step (~4 ms of a 17-ms step on a 6-s window, more on longer ones and for every
//! utterance of a batch). These loops read them once, in order, unpadded.

/// The query `[d]` (projected, not yet scaled) attends, head by head, to `frames` keys and
/// values (`[frames × d]`, heads side by side in each row); the heads' outputs side by side
/// are written to `out` `[d]`. `scores` is scratch, kept by the caller between calls.
pub fn cross_attention(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    heads: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = query.len();
    let d_head = d / heads.max(1);
    if d_head == 0 {
        return;
    }
    let scale = 1.0 / (d_head as f32).sqrt();
    // scores[t * heads + h]: frame by frame, so each key row is read once, in order.
    scores.clear();
    for key in keys.chunks_exact(d) {
        for (qh, kh) in query.chunks_exact(d_head).zip(key.chunks_exact(d_head)) {
            scores.push(dot(qh, kh) * scale);
        }
    }
    for h in 0..heads {
        let max = scores.iter().skip(h).step_by(heads).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut().skip(h).step_by(heads) {
            *s = (*s - max).exp();
            sum += *s;
        }
        for s in scores.iter_mut().skip(h).step_by(heads) {
            *s /= sum;
        }
    }
    out.fill(0.0);
    for (value, weights) in values.chunks_exact(d).zip(scores.chunks_exact(heads)) {
        for ((oh, vh), &p) in out.chunks_exact_mut(d_head).zip(value.chunks_exact(d_head)).zip(weights) {
            for (o, v) in oh.iter_mut().zip(vh) {
                *o += p * v;
            }
        }
    }
}

/// A dot product in eight independent lanes, so the compiler keeps it in SIMD registers
/// (one running sum would be a chain of dependent adds).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        // Fixed-size arrays: no bounds checks in the loop, so it vectorises.
        if let (Ok(x), Ok(y)) = (<&[f32; 8]>::try_from(x), <&[f32; 8]>::try_from(y)) {
            for i in 0..8 {
                lanes[i] += x[i] * y[i];
            }
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook form: per head, softmax(q·Kᵀ/√dh)·V.
    fn reference(query: &[f32], keys: &[f32], values: &[f32], heads: usize) -> Vec<f32> {
        let d = query.len();
        let dh = d / heads;
        let frames = keys.len() / d;
        let mut out = vec![0.0f32; d];
        for h in 0..heads {
            let s: Vec<f64> = (0..frames)
                .map(|t| {
                    (0..dh).map(|j| f64::from(query[h * dh + j]) * f64::from(keys[t * d + h * dh + j])).sum::<f64>()
                        / (dh as f64).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..dh {
                let v: f64 = (0..frames).map(|t| e[t] / sum * f64::from(values[t * d + h * dh + j])).sum();
                out[h * dh + j] = v as f32;
            }
        }
        out
    }

    fn wave(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.37 + seed).sin() * 1.7 + (i as f32 * 0.011).cos()) * 0.9).collect()
    }

    #[test]
    fn each_head_attends_to_its_own_channels_as_the_textbook_form_does() {
        // Whisper base's shape (8 heads of 64) and an odd one (3 heads of 10: a dot-product
        // tail), over a few frames and a window's worth.
        for (heads, d_head, frames) in [(8, 64, 7), (8, 64, 300), (3, 10, 5)] {
            let d = heads * d_head;
            let (q, k, v) = (wave(d, 0.1), wave(frames * d, 1.3), wave(frames * d, 2.9));
            let mut out = vec![f32::NAN; d];
            cross_attention(&q, &k, &v, heads, &mut out, &mut Vec::new());
            let want = reference(&q, &k, &v, heads);
            let worst = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{heads}×{d_head}, {frames} frames: off by {worst}");
        }
    }

    #[test]
    fn identical_keys_average_the_values_and_a_dominant_key_selects_its_value() {
        let heads = 2;
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [0.5; 3 * 4];
        let v = [1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0];
        let mut out = [0.0; 4];
        cross_attention(&q, &k, &v, heads, &mut out, &mut Vec::new());
        for (o, want) in out.iter().zip([2.0, 2.0, 2.0, 2.0]) {
            assert!((o - want).abs() < 1e-6, "{out:?}");
        }
        // Frame 1's key matches head 0's query a thousand times better: head 0 reads frame
        // 1's value, head 1 (whose query sees no difference) still the average.
        let mut k = [0.0; 3 * 4];
        k[4] = 1000.0;
        cross_attention(&q, &k, &v, heads, &mut out, &mut Vec::new());
        assert!((out[0] - 3.0).abs() < 1e-5 && (out[1] - 2.0).abs() < 1e-5, "{out:?}");
        assert!((out[2] - 2.0).abs() < 1e-5 && (out[3] - 2.0).abs() < 1e-5, "{out:?}");
    }
}
