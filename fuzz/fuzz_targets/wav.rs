//! Recordings dropped into the spool: any bytes give a WAV or an error, never a panic,
//! and reading them as a stream in blocks gives exactly what a whole parse gives.
#![no_main]
use callbox::audio::wav::{parse, WavReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(wav) = &whole {
        let frames = wav.channels.first().map_or(0, Vec::len);
        assert!(wav.channels.iter().all(|c| c.len() == frames), "channels of unequal length");
        let _ = wav.duration_secs();
    }
    let block = 1 + usize::from(data.last().copied().unwrap_or(0));
    let streamed = WavReader::new(data, data.len() as u64).and_then(|mut reader| {
        let mut channels = vec![Vec::new(); usize::from(reader.channels)];
        loop {
            let part = reader.read_block(block)?;
            if part.first().is_none_or(Vec::is_empty) {
                return Ok(channels);
            }
            assert!(part.iter().all(|c| c.len() <= block), "block larger than asked for");
            for (all, piece) in channels.iter_mut().zip(part) {
                all.extend(piece);
            }
        }
    });
    match (whole, streamed) {
        (Ok(wav), Ok(channels)) => assert_eq!(wav.channels, channels),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("whole {a:?} and streamed {b:?} disagree"),
    }
});
