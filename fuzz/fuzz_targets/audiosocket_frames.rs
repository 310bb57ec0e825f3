//! AudioSocket frames as a PBX (or anyone reaching the port) sends them, in arbitrary
//! chunks: the decoder must never panic, never hold more than one frame's bytes beyond
//! its bound, and end every frame it yields within the bound.
#![no_main]
use callbox::audio::audiosocket::{encode, Frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let max = 320 + usize::from(split) * 16;
    let mut decoder = FrameDecoder::new(max);
    let chunk = usize::from(split % 31) + 1;
    for piece in rest.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    // What was decoded encodes back to a frame the decoder takes again.
                    let mut again = FrameDecoder::new(max.max(65_535));
                    again.push(&encode(&frame));
                    assert!(matches!(again.next_frame(), Ok(Some(_))), "{frame:?} does not round-trip");
                    if matches!(frame, Frame::Hangup) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
