//! Container modules end to end, on the real Docker engine: the echo module built into a
//! `FROM scratch` image by the test itself (a statically linked build, as there is no
//! registry), run by `weir` in a pipeline, killed with `docker kill`, made unhealthy,
//! crash-looped, OOM-killed, and asked for with an image that is not there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::modules::{
    distinct_rows, echo_module, finishes_cleanly, named_pipeline, run_to_end, start,
    wait_for_restart,
};

/// The echo module's image, built once per test process (nextest runs each test in its
/// own process; the second build is a no-op for cargo and a cache hit for Docker).
fn echo_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let binary = echo_module();
        let context = tempfile::tempdir().expect("a temp dir");
        std::fs::copy(&binary, context.path().join("echo")).expect("the binary is copied");
        std::fs::write(
            context.path().join("Dockerfile"),
            "FROM scratch\nCOPY echo /echo\nENTRYPOINT [\"/echo\"]\n",
        )
        .expect("the Dockerfile is written");
        let tag = "weir-test/echo:e2e".to_owned();
        let built = Command::new("docker")
            .args(["build", "-q", "-t", &tag])
            .arg(context.path())
            .output()
            .expect("docker runs");
        assert!(
            built.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        tag
    })
}

/// A pipeline named `name` through the echo image, configured further by `module_yaml`.
fn pipeline(dir: &Path, name: &str, rows: u32, interval: &str, module_yaml: &str) -> PathBuf {
    let module_yaml = format!(
        "      image: {}\n      health: {{interval: 100ms}}\n      backoff: {{initial: 200ms, max: 800ms, jitter: 0}}\n{module_yaml}",
        echo_image()
    );
    named_pipeline(dir, name, rows, interval, &module_yaml)
}

fn rows_exactly_once(path: &Path, expected: usize) {
    assert_eq!(distinct_rows(path).len(), expected, "every row arrives");
}

#[test]
fn a_container_module_passes_every_row_through() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = pipeline(dir.path(), "ctr-echo", 25, "5ms", "");
    let (code, stderr) = run_to_end(&file, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    rows_exactly_once(&dir.path().join("out.jsonl"), 25);
}

#[test]
fn docker_kill_mid_stream_restarts_the_module_without_losing_or_repeating_a_row() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = pipeline(
        dir.path(),
        "ctr-kill",
        150,
        "20ms",
        "      restart: on-failure",
    );
    let mut weir = start(&file);
    let addr = weir.metrics_addr();
    let healthy = weir.wait_for_log("module is running and healthy", Duration::from_secs(60));
    assert!(healthy.is_some(), "{:?}", weir.stderr_seen);
    std::thread::sleep(Duration::from_millis(700));
    // Found by its labels: its name carries the runtime process's tag.
    let listed = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            "label=io.weir.pipeline=ctr-kill",
            "--filter",
            "label=io.weir.module=module",
        ])
        .output()
        .expect("docker runs");
    let id = String::from_utf8_lossy(&listed.stdout).trim().to_owned();
    assert!(!id.is_empty(), "the module's container runs");
    let killed = Command::new("docker")
        .args(["kill", &id])
        .output()
        .expect("docker runs");
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    wait_for_restart(&mut weir, &addr);
    finishes_cleanly(&mut weir);
    rows_exactly_once(&dir.path().join("out.jsonl"), 150);
}

#[test]
fn an_unhealthy_container_module_is_restarted_under_on_unhealthy() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let settings = "      restart: on-unhealthy\n      env: {ECHO_UNHEALTHY_AFTER: \"5\"}";
    let file = pipeline(dir.path(), "ctr-unhealthy", 100, "20ms", settings);
    let mut weir = start(&file);
    let addr = weir.metrics_addr();
    let unhealthy = weir.wait_for_log(
        "stopped for failing its health checks",
        Duration::from_secs(60),
    );
    assert!(unhealthy.is_some(), "{:?}", weir.stderr_seen);
    wait_for_restart(&mut weir, &addr);
    finishes_cleanly(&mut weir);
    rows_exactly_once(&dir.path().join("out.jsonl"), 100);
}

#[test]
fn a_crash_looping_container_module_backs_off_within_tolerance() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let settings = "      restart: always\n      env: {ECHO_EXIT_CODE: \"4\"}";
    let mut weir = start(&pipeline(dir.path(), "ctr-crash", 1000, "100ms", settings));
    // Each exit is logged as it is seen; the gaps between them are the backoff plus the
    // time to create and start a container.
    let mut exits = Vec::new();
    while exits.len() < 5 {
        let line = weir.wait_for_log("module exited with code 4", Duration::from_secs(30));
        assert!(line.is_some(), "{:?}", weir.stderr_seen);
        exits.push(Instant::now());
    }
    let gaps: Vec<f64> = exits
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    // Delays of 0.2 s, 0.4 s, then the 0.8 s cap, each plus a container start.
    for (gap, delay) in gaps.iter().zip([0.2, 0.4, 0.8, 0.8]) {
        assert!((delay - 0.05..delay + 1.0).contains(gap), "gaps {gaps:?}");
    }
    weir.signal("TERM");
    assert!(weir.wait_exit(Duration::from_secs(30)).is_some());
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        "version: 1\nname: ctr-missing\nsources:\n  r:\n    kind: generator\n    config: {count: 5}\n\
         transforms:\n  m:\n    kind: module\n    inputs: [r]\n    config: {image: weir-test/not-built:1, restart: never}\n\
         sinks:\n  s:\n    kind: stdout\n    inputs: [m]\n",
    )
    .expect("written");
    let (code, stderr) = run_to_end(&file, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("image `weir-test/not-built:1` is not on this machine")
            && stderr.contains("docker load"),
        "{stderr}"
    );
}

#[test]
fn a_memory_limit_kill_is_reported_as_oom() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let settings = "      restart: never\n      limits: {memory: 16MiB}\n      env: {ECHO_ALLOCATE_MB: \"64\"}";
    let (code, stderr) = run_to_end(&pipeline(dir.path(), "ctr-oom", 10, "10ms", settings), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("killed for running out of memory (OOM)"),
        "{stderr}"
    );
}
