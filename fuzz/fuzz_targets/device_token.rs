//! A device token header as anyone may send it to the hub.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_hub::identity::DeviceToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = DeviceToken::parse(text);
});
