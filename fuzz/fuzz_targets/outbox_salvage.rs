//! What a damaged outbox file may hold, scanned for intact batches: every frame it
//! keeps reads back as it was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_outbox::frame::{Frame, salvage};

fuzz_target!(|data: &[u8]| {
    let found = salvage(data);
    for frame in &found.frames {
        let bytes = frame.to_bytes();
        let (again, used) = Frame::parse(&bytes).expect("a kept frame reads back");
        assert_eq!(used, bytes.len());
        assert_eq!(&again, frame);
    }
});
