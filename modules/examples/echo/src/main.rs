//! The example module: answers every batch with itself. It is what the tests build into
//! a `FROM scratch` image, what `pipelines/examples/module-echo.yaml` runs as a process,
//! and what the module benchmark measures the protocol's cost with.
//!
//! Settings the tests use to make it misbehave on purpose:
//! - `ECHO_FAIL_EVERY=N`: fails (HTTP 500) every N-th batch on its first attempt;
//! - `ECHO_UNHEALTHY_AFTER=N`: reports itself unhealthy after N batches;
//! - `ECHO_EXIT_CODE=N`: exits with code N at once (a crash loop);
//! - `ECHO_ALLOCATE_MB=N`: fills N MiB of memory before serving (an OOM kill under a
//!   lower memory limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use weir_module_sdk::arrow_array::RecordBatch;
use weir_module_sdk::{BatchInfo, Health, ModuleError, serve_with};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let setting = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(code) = setting("ECHO_EXIT_CODE") {
        eprintln!("echo module: exiting with code {code} as ECHO_EXIT_CODE asks");
        return std::process::ExitCode::from(code.min(255) as u8);
    }
    // Touch every page, so the memory is really used and not just reserved.
    let ballast: Vec<u8> = vec![1; setting("ECHO_ALLOCATE_MB").unwrap_or(0) as usize * 1024 * 1024];
    let fail_every = setting("ECHO_FAIL_EVERY").filter(|n| *n > 0);
    let unhealthy_after = setting("ECHO_UNHEALTHY_AFTER");
    let health = Health::default();
    let seen = Arc::new(AtomicU64::new(0));
    let handler_health = health.clone();
    let handler =
        move |batch: RecordBatch, info: &BatchInfo| -> Result<Vec<RecordBatch>, ModuleError> {
            let count = seen.fetch_add(1, Ordering::Relaxed) + 1;
            if unhealthy_after.is_some_and(|n| count >= n) {
                handler_health.set(false);
            }
            if fail_every.is_some_and(|n| info.attempt == 1 && count.is_multiple_of(n)) {
                return Err(ModuleError::Failed(format!(
                    "failing batch {} on purpose",
                    info.batch_id
                )));
            }
            Ok(vec![batch])
        };
    let served = serve_with(handler, health).await;
    drop(ballast);
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("echo module: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
