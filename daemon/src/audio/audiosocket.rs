//! Asterisk AudioSocket framing, sans-IO.
//!
//! Wire format (Asterisk's `res_audiosocket`): a 3-byte header — kind (1 byte),
//! payload length (u16, big-endian) — then the payload. Kinds: 0x00 hangup,
//! 0x01 UUID (16 bytes), 0x03 DTMF (one ASCII digit), 0x10 audio as signed
//! 16-bit little-endian PCM at 8 kHz, 0x11–0x18 the same at 12, 16, 24, 32,
//! 44.1, 48, 96 and 192 kHz, 0xff error (optional application error code).
//!
//! [`FrameDecoder`] accepts bytes in any split and yields whole frames. A
//! frame's length is checked when its header arrives, so an oversized frame
//! is refused before its payload is buffered.

/// Audio payloads longer than this are refused: Asterisk sends 20 ms frames
/// (320 bytes at 8 kHz, 3840 at 96 kHz); 8 KiB leaves room without letting a
/// peer make us buffer 64 KiB per connection.
pub const DEFAULT_MAX_PAYLOAD: usize = 8192;

pub const KIND_HANGUP: u8 = 0x00;
pub const KIND_UUID: u8 = 0x01;
pub const KIND_DTMF: u8 = 0x03;
pub const KIND_AUDIO_8K: u8 = 0x10;
pub const KIND_ERROR: u8 = 0xff;

const HEADER_LEN: usize = 3;

/// Sample rate of an audio frame kind, if it is one.
pub fn audio_rate(kind: u8) -> Option<u32> {
    Some(match kind {
        0x10 => 8_000,
        0x11 => 12_000,
        0x12 => 16_000,
        0x13 => 24_000,
        0x14 => 32_000,
        0x15 => 44_100,
        0x16 => 48_000,
        0x17 => 96_000,
        0x18 => 192_000,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hangup,
    Uuid([u8; 16]),
    Dtmf(char),
    Audio {
        sample_rate: u32,
        samples: Vec<i16>,
    },
    /// Asterisk reports an error; the payload is an optional error code.
    Error(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("frame of kind {kind:#04x} declares {len} bytes; the limit is {max}")]
    Oversize { kind: u8, len: usize, max: usize },
    #[error("UUID frame with {0} bytes instead of 16")]
    BadUuid(usize),
    #[error("DTMF frame with {0} bytes instead of 1")]
    BadDtmf(usize),
    #[error("audio frame with an odd byte count ({0})")]
    OddAudio(usize),
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: usize,
    buf: Vec<u8>,
    /// Start of the first unread byte in `buf`: frames are decoded in place and
    /// the consumed prefix is dropped once per `push`, not once per frame.
    start: usize,
    /// Set once a frame is refused: the stream cannot be resynchronised.
    failed: bool,
}

impl FrameDecoder {
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload, buf: Vec::new(), start: 0, failed: false }
    }

    /// Appends received bytes. Call [`Self::next_frame`] until it returns `Ok(None)`.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes of an incomplete frame held back (a connection closing with
    /// some is an abrupt close mid-frame).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let unread = &self.buf[self.start..];
        if self.failed || unread.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = unread[0];
        let len = usize::from(u16::from_be_bytes([unread[1], unread[2]]));
        let mut check = match kind {
            KIND_HANGUP | KIND_ERROR => Ok(()),
            KIND_UUID if len != 16 => Err(FrameError::BadUuid(len)),
            KIND_DTMF if len != 1 => Err(FrameError::BadDtmf(len)),
            KIND_UUID | KIND_DTMF => Ok(()),
            k if audio_rate(k).is_some() && len % 2 != 0 => Err(FrameError::OddAudio(len)),
            k if audio_rate(k).is_some() => Ok(()),
            k => Err(FrameError::UnknownKind(k)),
        };
        if check.is_ok() && len > self.max_payload {
            check = Err(FrameError::Oversize { kind, len, max: self.max_payload });
        }
        if let Err(e) = check {
            self.failed = true;
            self.buf = Vec::new();
            self.start = 0;
            return Err(e);
        }
        if unread.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &unread[HEADER_LEN..HEADER_LEN + len];
        let frame = match kind {
            KIND_HANGUP => Frame::Hangup,
            KIND_ERROR => Frame::Error(payload.to_vec()),
            KIND_UUID => {
                let mut id = [0u8; 16];
                id.copy_from_slice(payload);
                Frame::Uuid(id)
            }
            KIND_DTMF => Frame::Dtmf(char::from(payload[0])),
            _ => Frame::Audio {
                sample_rate: audio_rate(kind).unwrap_or(8_000),
                samples: payload.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect(),
            },
        };
        self.start += HEADER_LEN + len;
        Ok(Some(frame))
    }
}

/// Encodes a frame for sending (hangup, or audio back to Asterisk).
pub fn encode(frame: &Frame) -> Vec<u8> {
    let (kind, payload): (u8, Vec<u8>) = match frame {
        Frame::Hangup => (KIND_HANGUP, vec![]),
        Frame::Uuid(id) => (KIND_UUID, id.to_vec()),
        Frame::Dtmf(c) => (KIND_DTMF, vec![*c as u8]),
        Frame::Error(code) => (KIND_ERROR, code.clone()),
        Frame::Audio { sample_rate, samples } => {
            let kind = (0x10..=0x18).find(|&k| audio_rate(k) == Some(*sample_rate)).unwrap_or(KIND_AUDIO_8K);
            (kind, samples.iter().flat_map(|s| s.to_le_bytes()).collect())
        }
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Formats a UUID frame's bytes the way Asterisk's `${UUID()}` prints them.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let hex = crate::hex::encode(id);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] =
        [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];

    fn audio(n: usize) -> Frame {
        Frame::Audio { sample_rate: 8000, samples: (0..n as i16).map(|i| i * 100 - 3000).collect() }
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Frame> {
        let mut out = vec![];
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn a_frame_split_across_reads_byte_by_byte() {
        let bytes = encode(&audio(160));
        let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        for (i, b) in bytes.iter().enumerate() {
            d.push(&[*b]);
            let frames = drain(&mut d);
            if i + 1 < bytes.len() {
                assert!(frames.is_empty());
            } else {
                assert_eq!(frames, vec![audio(160)]);
            }
        }
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn many_frames_in_one_read() {
        let frames = vec![Frame::Uuid(ID), audio(160), Frame::Dtmf('5'), audio(160), Frame::Hangup];
        let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        d.push(&bytes);
        assert_eq!(drain(&mut d), frames);
    }

    #[test]
    fn wire_bytes_match_asterisk() {
        assert_eq!(encode(&Frame::Hangup), vec![0, 0, 0]);
        assert_eq!(
            encode(&Frame::Audio { sample_rate: 8000, samples: vec![1, -2] }),
            vec![0x10, 0, 4, 1, 0, 0xfe, 0xff]
        );
        assert_eq!(encode(&Frame::Audio { sample_rate: 16000, samples: vec![0] })[0], 0x12);
        assert_eq!(format_uuid(&ID), "12345678-9abc-def0-1122-334455667788");
    }

    #[test]
    fn oversize_is_refused_at_the_header_and_the_stream_stops() {
        let mut d = FrameDecoder::new(320);
        d.push(&[0x10, 0x02, 0x00]); // 512 bytes declared, none sent yet
        assert_eq!(d.next_frame(), Err(FrameError::Oversize { kind: 0x10, len: 512, max: 320 }));
        d.push(&encode(&audio(10)));
        assert_eq!(d.next_frame(), Ok(None), "no resynchronisation after a bad frame");
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn unknown_kinds_and_malformed_payloads_are_refused() {
        for (bytes, err) in [
            (vec![0x42, 0, 0], FrameError::UnknownKind(0x42)),
            (vec![0x01, 0, 3, 1, 2, 3], FrameError::BadUuid(3)),
            (vec![0x03, 0, 2, b'1', b'2'], FrameError::BadDtmf(2)),
            (vec![0x10, 0, 3, 1, 2, 3], FrameError::OddAudio(3)),
        ] {
            let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
            d.push(&bytes);
            assert_eq!(d.next_frame(), Err(err));
        }
    }

    #[test]
    fn an_abrupt_close_leaves_a_partial_frame_pending() {
        let bytes = encode(&audio(160));
        let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        d.push(&bytes[..100]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 100);
    }

    #[test]
    fn every_audio_kind_has_its_rate() {
        let rates: Vec<_> = (0x10..=0x18).map(|k| audio_rate(k).unwrap()).collect();
        assert_eq!(rates, vec![8000, 12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000]);
        assert_eq!(audio_rate(0x19), None);
        let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        d.push(&[0x16, 0, 2, 0x10, 0x00]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Audio { sample_rate: 48000, samples: vec![16] })));
    }

    #[test]
    fn error_frames_carry_their_code() {
        let mut d = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        d.push(&[0xff, 0, 1, 0x02]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Error(vec![2]))));
    }
}
