//! A batch body as a device may send it to the hub: decoded within the hub's limits
//! (refused, or rows within them), never an abort or an allocation past the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_engine::ipc::decode_within;
use weir_hub::data::INGEST_LIMITS;

fuzz_target!(|data: &[u8]| {
    // Arrow panics on some malformed streams; `decode_within` catches those panics and
    // refuses the stream, as the hub and the runtime run it. libfuzzer's panic hook
    // would abort first: the default hook lets the catch work, and a panic anywhere
    // else still ends the run as a crash.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    if let Ok((_, batches)) = decode_within(data, &INGEST_LIMITS) {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows as u64 <= INGEST_LIMITS.max_rows);
    }
});
