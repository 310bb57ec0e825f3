//! Spool sidecars (JSON beside a recording): parsed or refused; an accepted call id is
//! always one the control protocol would accept.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sidecar) = callbox::inputs::spool::parse_sidecar(data) {
        if let Some(id) = sidecar.call_id {
            assert!(callbox::calls::check_call_id(&id).is_ok());
            assert!(callbox::escape::is_printable(&id));
        }
    }
});
