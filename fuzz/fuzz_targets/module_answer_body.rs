//! A module's answer (or a source module's push) within the default module limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_engine::ipc::decode_within;
use weir_modules::config::ModuleConfig;

fuzz_target!(|data: &[u8]| {
    let limits = ModuleConfig::default().answer_limits();
    if let Ok((_, batches)) = decode_within(data, &limits) {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows as u64 <= limits.max_rows);
    }
});
