//! A deployment's target condition as an admin writes it; a parsed one is matched too.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use weir_hub::condition::Condition;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(condition) = Condition::parse(text) {
        let tags = BTreeMap::from([
            ("site".to_owned(), "north".to_owned()),
            ("fleet".to_owned(), "blue".to_owned()),
        ]);
        let _ = condition.matches(&tags);
    }
});
