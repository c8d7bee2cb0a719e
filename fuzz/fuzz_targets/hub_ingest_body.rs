//! A batch body as a device may send it to the hub: decoded within the hub's limits
//! (refused, or rows within them), never an abort or an allocation past the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_engine::ipc::decode_within;
use weir_hub::data::INGEST_LIMITS;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, batches)) = decode_within(data, &INGEST_LIMITS) {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows as u64 <= INGEST_LIMITS.max_rows);
    }
});
