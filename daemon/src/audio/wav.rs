//! WAV (RIFF/WAVE) reading for PBX call recordings: 16-bit PCM, µ-law and
//! A-law, any channel count up to 2, rates from 8 to 48 kHz. Pure: bytes in,
//! per-channel 16-bit samples out, or an error saying exactly what is wrong.

use std::io::Read;

use super::g711;

/// Longest recording accepted, so a hostile or broken file cannot exhaust memory.
pub const MAX_SECONDS: u32 = 4 * 3600;

const FORMAT_PCM: u16 = 0x0001;
const FORMAT_ALAW: u16 = 0x0006;
const FORMAT_ULAW: u16 = 0x0007;
const FORMAT_EXTENSIBLE: u16 = 0xfffe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Pcm16,
    Ulaw,
    Alaw,
}

/// A decoded recording: one sample vector per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Wav {
    pub sample_rate: u32,
    pub encoding: Encoding,
    pub channels: Vec<Vec<i16>>,
}

impl Wav {
    pub fn duration_secs(&self) -> f64 {
        self.channels.first().map_or(0.0, |c| c.len() as f64 / f64::from(self.sample_rate))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WavError {
    #[error("not a WAV file: no RIFF/WAVE header")]
    NotWav,
    #[error("truncated: {0}")]
    Truncated(&'static str),
    #[error("no fmt chunk before the data chunk")]
    MissingFormat,
    #[error("no data chunk")]
    MissingData,
    #[error(
        "unsupported sample format {format:#06x} with {bits} bits (supported: 16-bit PCM, 8-bit µ-law, 8-bit A-law)"
    )]
    Unsupported { format: u16, bits: u16 },
    #[error("{0} channels; recordings must be mono or stereo")]
    Channels(u16),
    #[error("sample rate {0} Hz is outside 8000-48000")]
    SampleRate(u32),
    #[error("longer than {MAX_SECONDS} s")]
    TooLong,
    #[error("read failed: {0}")]
    Io(String),
}

impl WavError {
    fn io(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[derive(Clone, Copy)]
struct Format {
    encoding: Encoding,
    channels: u16,
    sample_rate: u32,
}

impl Format {
    fn frame_bytes(&self) -> usize {
        usize::from(self.channels) * if self.encoding == Encoding::Pcm16 { 2 } else { 1 }
    }
}

fn parse_format(chunk: &[u8]) -> Result<Format, WavError> {
    let short = WavError::Truncated("fmt chunk shorter than 16 bytes");
    let mut format = u16_at(chunk, 0).ok_or(short.clone())?;
    let channels = u16_at(chunk, 2).ok_or(short.clone())?;
    let sample_rate = u32_at(chunk, 4).ok_or(short.clone())?;
    let bits = u16_at(chunk, 14).ok_or(short)?;
    if format == FORMAT_EXTENSIBLE {
        // The sub-format GUID starts with the plain format code.
        format = u16_at(chunk, 24).ok_or(WavError::Truncated("WAVE_FORMAT_EXTENSIBLE without sub-format"))?;
    }
    let encoding = match (format, bits) {
        (FORMAT_PCM, 16) => Encoding::Pcm16,
        (FORMAT_ULAW, 8) => Encoding::Ulaw,
        (FORMAT_ALAW, 8) => Encoding::Alaw,
        _ => return Err(WavError::Unsupported { format, bits }),
    };
    if !(1..=2).contains(&channels) {
        return Err(WavError::Channels(channels));
    }
    if !(8000..=48_000).contains(&sample_rate) {
        return Err(WavError::SampleRate(sample_rate));
    }
    Ok(Format { encoding, channels, sample_rate })
}

/// Longest `fmt ` chunk body read; the formats we take need 26 bytes, and anything
/// beyond is skipped unread so a hostile header cannot make us allocate.
const MAX_FORMAT_BYTES: u64 = 64;

/// A recording read as a stream: the header is parsed at once, the samples come in
/// blocks, so memory stays flat whatever the recording's length. Never reads past the
/// `len` bytes it was given (a file that grows while read is cut there).
pub struct WavReader<R> {
    inner: R,
    pub sample_rate: u32,
    pub encoding: Encoding,
    pub channels: u16,
    frames: u64,
    frames_left: u64,
    buffer: Vec<u8>,
}

impl<R: Read> WavReader<R> {
    /// Parses the header of a `len`-byte stream, stopping at the first sample.
    pub fn new(mut inner: R, len: u64) -> Result<Self, WavError> {
        let mut riff = [0u8; 12];
        if len < 12 || read_full(&mut inner, &mut riff)? < 12 || &riff[0..4] != b"RIFF" || &riff[8..12] != b"WAVE" {
            return Err(WavError::NotWav);
        }
        let mut at: u64 = 12;
        let mut format = None;
        while at + 8 <= len {
            let mut header = [0u8; 8];
            if read_full(&mut inner, &mut header)? < 8 {
                return Err(WavError::Truncated("chunk runs past the end of the file"));
            }
            let id = &header[0..4];
            let declared = u64::from(u32::from_le_bytes([header[4], header[5], header[6], header[7]]));
            let body_start = at + 8;
            if id == b"data" {
                let fmt: Format = format.ok_or(WavError::MissingFormat)?;
                // 0xFFFFFFFF (or 0) is what streaming writers leave: the data runs to the end.
                let data_len =
                    if declared == u64::from(u32::MAX) || declared == 0 { len - body_start } else { declared };
                if body_start + data_len > len {
                    return Err(WavError::Truncated("data chunk runs past the end of the file"));
                }
                let frame_bytes = fmt.frame_bytes();
                let frames = data_len / frame_bytes as u64;
                if frames > u64::from(MAX_SECONDS) * u64::from(fmt.sample_rate) {
                    return Err(WavError::TooLong);
                }
                return Ok(Self {
                    inner,
                    sample_rate: fmt.sample_rate,
                    encoding: fmt.encoding,
                    channels: fmt.channels,
                    frames,
                    frames_left: frames,
                    buffer: Vec::new(),
                });
            }
            if body_start + declared > len {
                return Err(WavError::Truncated("chunk runs past the end of the file"));
            }
            // Chunks are padded to even length; a missing last pad byte is tolerated.
            let mut skip = declared + (declared & 1);
            if id == b"fmt " {
                let mut body = vec![0u8; declared.min(MAX_FORMAT_BYTES) as usize];
                let got = read_full(&mut inner, &mut body)?;
                body.truncate(got);
                format = Some(parse_format(&body)?);
                skip -= got as u64;
            }
            std::io::copy(&mut (&mut inner).take(skip), &mut std::io::sink()).map_err(WavError::io)?;
            at = body_start + declared + (declared & 1);
        }
        Err(if format.is_some() { WavError::MissingData } else { WavError::MissingFormat })
    }

    /// Frames (samples per channel) in the whole recording.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn duration_secs(&self) -> f64 {
        self.frames as f64 / f64::from(self.sample_rate)
    }

    /// The next block of at most `max_frames` frames, one vector per channel; empty
    /// vectors once every frame was read.
    pub fn read_block(&mut self, max_frames: usize) -> Result<Vec<Vec<i16>>, WavError> {
        let channels = usize::from(self.channels);
        let frames = (max_frames as u64).min(self.frames_left) as usize;
        let bytes_per_sample = if self.encoding == Encoding::Pcm16 { 2 } else { 1 };
        self.buffer.resize(frames * channels * bytes_per_sample, 0);
        if read_full(&mut self.inner, &mut self.buffer)? < self.buffer.len() {
            return Err(WavError::Truncated("the file ended before its data chunk did"));
        }
        self.frames_left -= frames as u64;
        let interleaved: Vec<i16> = match self.encoding {
            Encoding::Pcm16 => self.buffer.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect(),
            Encoding::Ulaw => g711::decode_ulaw(&self.buffer),
            Encoding::Alaw => g711::decode_alaw(&self.buffer),
        };
        let mut out = vec![Vec::with_capacity(frames); channels];
        for frame in interleaved.chunks_exact(channels) {
            for (channel, &sample) in out.iter_mut().zip(frame) {
                channel.push(sample);
            }
        }
        Ok(out)
    }

    /// Every remaining frame at once (short clips only: memory grows with the length).
    pub fn read_to_end(mut self) -> Result<Wav, WavError> {
        let frames = usize::try_from(self.frames_left).map_err(|_| WavError::TooLong)?;
        let channels = self.read_block(frames)?;
        Ok(Wav { sample_rate: self.sample_rate, encoding: self.encoding, channels })
    }
}

/// Reads until `buf` is full or the stream ends; how many bytes were read.
fn read_full(inner: &mut impl Read, buf: &mut [u8]) -> Result<usize, WavError> {
    let mut filled = 0;
    while filled < buf.len() {
        match inner.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WavError::io(e)),
        }
    }
    Ok(filled)
}

/// Parses a whole WAV file held in memory (short clips: tests, the demo call, benchmarks).
pub fn parse(bytes: &[u8]) -> Result<Wav, WavError> {
    WavReader::new(bytes, bytes.len() as u64)?.read_to_end()
}

/// Writes 16-bit PCM WAV bytes, for the tests.
#[cfg(test)]
fn encode_pcm16(sample_rate: u32, channels: &[Vec<i16>]) -> Vec<u8> {
    let n_channels = channels.len() as u16;
    let frames = channels.first().map_or(0, Vec::len);
    let data_len = (frames * channels.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&FORMAT_PCM.to_le_bytes());
    out.extend_from_slice(&n_channels.to_le_bytes());
    out.extend_from_slice(&sample_rate.to_le_bytes());
    out.extend_from_slice(&(sample_rate * u32::from(n_channels) * 2).to_le_bytes());
    out.extend_from_slice(&(n_channels * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..frames {
        for channel in channels {
            out.extend_from_slice(&channel[i].to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testdata;

    const SHARED_ZH: &str = "speech/zh/BAC009S0764W0121.wav";

    #[test]
    fn round_trips_stereo_pcm() {
        let left: Vec<i16> = (0..800).map(|i| (i * 37 % 2000) as i16 - 1000).collect();
        let right: Vec<i16> = left.iter().map(|s| -s).collect();
        let wav = parse(&encode_pcm16(8000, &[left.clone(), right.clone()])).unwrap();
        assert_eq!(wav.sample_rate, 8000);
        assert_eq!(wav.encoding, Encoding::Pcm16);
        assert_eq!(wav.channels, vec![left, right]);
        assert!((wav.duration_secs() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn reads_a_real_recording() {
        let wav = parse(&testdata::shared(SHARED_ZH)).unwrap();
        assert_eq!(wav.sample_rate, 16_000);
        assert_eq!(wav.channels.len(), 1);
        assert!(wav.duration_secs() > 2.0, "{}", wav.duration_secs());
        assert!(wav.channels[0].iter().any(|&s| s.unsigned_abs() > 1000), "silent?");
    }

    /// sox writes the telephone versions the README's CER script uses; read them all.
    #[test]
    fn reads_what_sox_writes_in_every_telephone_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let reference = parse(&testdata::shared(SHARED_ZH)).unwrap();
        let input = testdata::shared_path(SHARED_ZH);
        for (encoding, bits, expect) in
            [("u-law", "8", Encoding::Ulaw), ("a-law", "8", Encoding::Alaw), ("signed", "16", Encoding::Pcm16)]
        {
            let out = dir.path().join(format!("{encoding}.wav"));
            // -D: no dither, so sox writes the same samples to both channels.
            let args = ["-D", "-r", "8000", "-e", encoding, "-b", bits, "-c", "2"];
            let mut all: Vec<&std::ffi::OsStr> = vec![args[0].as_ref(), input.as_os_str()];
            all.extend(args[1..].iter().map(std::ffi::OsStr::new));
            all.push(out.as_os_str());
            testdata::sox(&all);
            let wav = parse(&std::fs::read(&out).unwrap()).unwrap();
            assert_eq!((wav.encoding, wav.sample_rate, wav.channels.len()), (expect, 8000, 2), "{encoding}");
            assert!((wav.duration_secs() - reference.duration_secs()).abs() < 0.01, "{encoding}");
            assert!(wav.channels[0] == wav.channels[1], "{encoding}: sox duplicates mono into both channels");
        }
    }

    #[test]
    fn corrupt_files_say_what_is_wrong() {
        let good = encode_pcm16(8000, &[vec![1, 2, 3, 4]]);
        assert_eq!(parse(b"RIFX....WAVE"), Err(WavError::NotWav));
        assert_eq!(parse(&good[..20]), Err(WavError::Truncated("chunk runs past the end of the file")));
        let mut short_data = good.clone();
        short_data[40..44].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(parse(&short_data), Err(WavError::Truncated("data chunk runs past the end of the file")));
        let mut float = good.clone();
        float[20..22].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(parse(&float), Err(WavError::Unsupported { format: 3, bits: 16 })));
        let mut six = good.clone();
        six[22..24].copy_from_slice(&6u16.to_le_bytes());
        assert_eq!(parse(&six), Err(WavError::Channels(6)));
        let mut slow = good.clone();
        slow[24..28].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(parse(&slow), Err(WavError::SampleRate(100)));
        assert_eq!(parse(&good[..36]), Err(WavError::MissingData));
    }

    #[test]
    fn streaming_writers_open_ended_data_runs_to_the_end() {
        let mut open = encode_pcm16(8000, &[vec![5, 6, 7]]);
        open[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&open).unwrap().channels, vec![vec![5, 6, 7]]);
    }

    #[test]
    fn streams_in_blocks_exactly_what_a_whole_parse_gives() {
        let left: Vec<i16> = (0..1001).map(|i| (i * 53 % 3000) as i16 - 1500).collect();
        let right: Vec<i16> = left.iter().map(|s| s / 2).collect();
        let bytes = encode_pcm16(8000, &[left, right]);
        let whole = parse(&bytes).unwrap();
        let mut reader = WavReader::new(&bytes[..], bytes.len() as u64).unwrap();
        assert_eq!(reader.frames(), 1001);
        let mut streamed = vec![Vec::new(); 2];
        loop {
            let block = reader.read_block(97).unwrap();
            assert!(block[0].len() <= 97 && block[0].len() == block[1].len());
            if block[0].is_empty() {
                break;
            }
            for (all, part) in streamed.iter_mut().zip(block) {
                all.extend(part);
            }
        }
        assert_eq!(streamed, whole.channels);
    }

    #[test]
    fn never_reads_past_the_length_it_was_given() {
        // An open-ended data chunk in a file still growing: only what was there counts.
        let mut open = encode_pcm16(8000, &[vec![5, 6, 7]]);
        open[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let len = open.len() as u64;
        open.extend_from_slice(&[9, 9, 9, 9]);
        let mut reader = WavReader::new(&open[..], len).unwrap();
        assert_eq!(reader.read_block(100).unwrap(), vec![vec![5, 6, 7]]);
        assert_eq!(reader.read_block(100).unwrap(), vec![Vec::<i16>::new()]);
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_truncated() {
        let bytes = encode_pcm16(8000, &[vec![1; 1000]]);
        let mut reader = WavReader::new(&bytes[..1000], bytes.len() as u64).unwrap();
        assert_eq!(reader.read_block(2000), Err(WavError::Truncated("the file ended before its data chunk did")));
    }

    #[test]
    fn a_huge_chunk_before_the_data_is_skipped_not_loaded() {
        // A 1 MiB LIST chunk between fmt and data; the header parse reads it as a stream.
        let good = encode_pcm16(8000, &[vec![7, 8]]);
        let mut bytes = good[..36].to_vec();
        bytes.extend_from_slice(b"LIST");
        bytes.extend_from_slice(&(1u32 << 20).to_le_bytes());
        bytes.resize(bytes.len() + (1 << 20), 0xAB);
        bytes.extend_from_slice(&good[36..]);
        assert_eq!(parse(&bytes).unwrap().channels, vec![vec![7, 8]]);
        let mut oversized_fmt = good.clone();
        oversized_fmt[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&oversized_fmt), Err(WavError::Truncated("chunk runs past the end of the file")));
    }
}
