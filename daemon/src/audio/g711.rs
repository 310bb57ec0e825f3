//! ITU-T G.711 µ-law and A-law decoding to 16-bit linear PCM.
//!
//! Computed from the standard's segment/mantissa layout (as in the reference
//! g711.c), then tabulated once: decoding is a table lookup per sample.

use std::sync::OnceLock;

fn ulaw_formula(code: u8) -> i16 {
    let u = !code;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if u & 0x80 != 0 { -magnitude } else { magnitude }) as i16
}

fn alaw_formula(code: u8) -> i16 {
    let a = code ^ 0x55;
    let segment = (a >> 4) & 0x07;
    let mut magnitude = i32::from(a & 0x0f) << 4;
    magnitude += if segment == 0 { 8 } else { 0x108 };
    if segment > 1 {
        magnitude <<= segment - 1;
    }
    // In A-law a set sign bit means positive.
    (if a & 0x80 != 0 { magnitude } else { -magnitude }) as i16
}

fn table(formula: fn(u8) -> i16) -> [i16; 256] {
    let mut t = [0i16; 256];
    for (code, slot) in t.iter_mut().enumerate() {
        *slot = formula(code as u8);
    }
    t
}

static ULAW: OnceLock<[i16; 256]> = OnceLock::new();
static ALAW: OnceLock<[i16; 256]> = OnceLock::new();

pub fn decode_ulaw(bytes: &[u8]) -> Vec<i16> {
    let t = ULAW.get_or_init(|| table(ulaw_formula));
    bytes.iter().map(|&b| t[usize::from(b)]).collect()
}

pub fn decode_alaw(bytes: &[u8]) -> Vec<i16> {
    let t = ALAW.get_or_init(|| table(alaw_formula));
    bytes.iter().map(|&b| t[usize::from(b)]).collect()
}

/// G.711 µ-law encoding (bias 0x84, segment search), for making telephone-band test and
/// benchmark audio from wideband recordings.
pub fn encode_ulaw(samples: &[i16]) -> Vec<u8> {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    samples
        .iter()
        .map(|&s| {
            let s = i32::from(s);
            let sign = if s < 0 { 0x80 } else { 0 };
            let magnitude = s.abs().min(CLIP) + BIAS;
            let exponent = (7 - (magnitude.leading_zeros() as i32 - 17)).clamp(0, 7);
            let mantissa = (magnitude >> (exponent + 3)) & 0x0f;
            !((sign | (exponent << 4) | mantissa) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        // Reference values of the ITU-T G.711 µ-law expansion.
        let cases =
            [(0xff, 0), (0x7f, 0), (0x80, 32124), (0x00, -32124), (0xfe, 8), (0x7e, -8), (0xf0, 120), (0x8f, 16764)];
        for (code, linear) in cases {
            assert_eq!(decode_ulaw(&[code]), vec![linear], "µ-law {code:#04x}");
        }
    }

    #[test]
    fn alaw_known_values() {
        let cases = [(0xd5, 8), (0x55, -8), (0xaa, 32256), (0x2a, -32256), (0x80, 5504), (0xd4, 24), (0xc5, 264)];
        for (code, linear) in cases {
            assert_eq!(decode_alaw(&[code]), vec![linear], "A-law {code:#04x}");
        }
    }

    /// All 256 codes of both laws against sox, an independent implementation.
    #[test]
    fn every_code_matches_sox() {
        let dir = tempfile::tempdir().unwrap();
        let codes: Vec<u8> = (0..=255).collect();
        let input = dir.path().join("codes.raw");
        std::fs::write(&input, &codes).unwrap();
        for (encoding, ours) in [("mu-law", decode_ulaw(&codes)), ("a-law", decode_alaw(&codes))] {
            let output = dir.path().join(format!("{encoding}.raw"));
            let mut args: Vec<&std::ffi::OsStr> =
                ["-t", "raw", "-e", encoding, "-b", "8", "-r", "8000", "-c", "1"].map(std::ffi::OsStr::new).to_vec();
            args.push(input.as_os_str());
            args.extend(["-t", "raw", "-e", "signed", "-b", "16", "-L"].map(std::ffi::OsStr::new));
            args.push(output.as_os_str());
            crate::testdata::sox(&args);
            let bytes = std::fs::read(&output).unwrap();
            let theirs: Vec<i16> = bytes.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
            assert_eq!(ours, theirs, "{encoding}");
        }
    }

    #[test]
    fn both_laws_are_odd_symmetric_and_monotonic_within_a_sign() {
        let u = decode_ulaw(&(0..=255).collect::<Vec<u8>>());
        let a = decode_alaw(&(0..=255).collect::<Vec<u8>>());
        for code in 0..128usize {
            assert_eq!(u[code], -u[code + 128], "µ-law {code}");
            assert_eq!(a[code], -a[code + 128], "A-law {code}");
        }
        // µ-law codes 0x80..0xff run from the largest positive value down to 0.
        assert!(u[128..].windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn ulaw_encoding_round_trips_within_its_quantisation_step() {
        for s in (-32768i32..=32767).step_by(7) {
            let s = s as i16;
            let back = decode_ulaw(&encode_ulaw(&[s]))[0];
            // µ-law steps grow with level: 1/16 of the magnitude bounds the error.
            let tolerance = (i32::from(s).abs() / 16).max(8) + 132;
            assert!((i32::from(back) - i32::from(s)).abs() <= tolerance, "{s} -> {back}");
        }
        // Every code decodes and re-encodes to itself (0x7f and 0xff are both zero).
        for code in 0u8..=255 {
            let again = encode_ulaw(&decode_ulaw(&[code]))[0];
            assert!(again == code || decode_ulaw(&[again]) == decode_ulaw(&[code]), "{code:#x}");
        }
    }
}
