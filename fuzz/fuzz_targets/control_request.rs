//! The control socket: bytes in arbitrary chunks through the line framer, each line
//! through the request decoder. No panic; no line beyond the bound.
#![no_main]
use callbox::control::protocol::{decode_request, Framed, LineFramer};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split % 64) + 1;
    let mut framer = LineFramer::new(MAX);
    for piece in rest.chunks(chunk) {
        let mut piece = piece;
        loop {
            match framer.push(piece) {
                Framed::NeedMore => break,
                Framed::TooLong => return,
                Framed::Line { line, consumed } => {
                    assert!(line.len() <= MAX);
                    let _ = decode_request(&line);
                    piece = &piece[consumed..];
                    framer = LineFramer::new(MAX);
                }
            }
        }
    }
});
