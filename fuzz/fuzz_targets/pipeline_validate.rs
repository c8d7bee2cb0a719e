//! Pipeline YAML, as a user writes it, through `weir validate`: it may be refused with
//! diagnostics, never crash.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weir_engine::Registry;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(weir_operators::registry::builtin)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "SET").then(|| "value".to_owned());
    let _ = weir_pipelines::validate_str(
        Path::new("fuzz.yaml"),
        text,
        registry(),
        &env,
        Path::new("/nonexistent"),
    );
});
