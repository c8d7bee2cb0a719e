//! Process modules end to end: the real `weir` runs the example echo module (and shell
//! and Python modules) as local processes, and the tests kill them, make them unhealthy,
//! crash-loop them, and check what reaches the sink, `/metrics` and `weir status`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::{Running, http_get, metric_value, read_json_lines, repo, text, weir};

/// The example echo module, linked statically (glibc's static libc) so that the same
/// binary runs as a process module and in a `FROM scratch` image. It is built once into
/// its own target directory (`cargo nextest` builds test targets, not other packages'
/// binaries), so the flags do not disturb the workspace build.
pub fn echo_module() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target_dir = repo().join("target/static-modules");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let built = std::process::Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "weir-echo-module",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ])
                .arg("--target-dir")
                .arg(&target_dir)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(repo())
                .output()
                .expect("cargo runs");
            assert!(
                built.status.success(),
                "static build of the echo module: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            target_dir.join("x86_64-unknown-linux-gnu/debug/weir-echo-module")
        })
        .clone()
}

/// A copy of the echo module under a name no other process has, so the test can find
/// (and kill) exactly its own module.
fn private_echo(dir: &Path) -> PathBuf {
    let unique = dir.join(format!("echo-{}", std::process::id()));
    std::fs::copy(echo_module(), &unique).expect("the echo module can be copied");
    unique
}

/// A pipeline: `rows` generated readings (from 2 devices in turn), paced in real time at
/// `interval`, through a module configured by `module_yaml`, into `out.jsonl` (and its
/// dead letters into `dead.jsonl`).
fn pipeline(dir: &Path, rows: u32, interval: &str, module_yaml: &str) -> PathBuf {
    named_pipeline(dir, "modtest", rows, interval, module_yaml)
}

/// [`pipeline`] with a name of its own (a container module's name derives from it).
pub fn named_pipeline(
    dir: &Path,
    name: &str,
    rows: u32,
    interval: &str,
    module_yaml: &str,
) -> PathBuf {
    let file = dir.join("pipeline.yaml");
    let yaml = format!(
        r#"version: 1
name: {name}
sources:
  readings:
    kind: generator
    config:
      devices: 2
      interval: {interval}
      count: {rows}
      realtime: true
      batch_rows: 4
      start: 2026-01-01T00:00:00Z
      fields:
        temperature: {{shape: sine, base: 20, amplitude: 2, period: 1m}}
transforms:
  module:
    kind: module
    inputs: [readings]
    config:
{module_yaml}
sinks:
  out:
    kind: file
    inputs: [module]
    config: {{path: out.jsonl, format: json}}
  dead:
    kind: file
    inputs: [module.dead_letter]
    config: {{path: dead.jsonl, format: json}}
"#
    );
    std::fs::write(&file, yaml).expect("the pipeline is written");
    file
}

/// The (device, ts) of every row in a JSON-lines file, checking there are no repeats.
pub fn distinct_rows(path: &Path) -> BTreeSet<(String, String)> {
    let rows = read_json_lines(path);
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|row| (row["device"].to_string(), row["ts"].to_string()))
        .collect();
    let distinct: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(distinct.len(), keys.len(), "no row is duplicated");
    distinct
}

/// Starts `weir run` on `file` with metrics on a free port.
pub fn start(file: &Path) -> Running {
    Running::start(
        &[
            "run",
            "--metrics-addr",
            "127.0.0.1:0",
            file.to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
}

/// Waits until `weir_module_restarts_total` of the `module` operator is at least 1.
pub fn wait_for_restart(weir: &mut Running, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(addr, "/metrics");
        let restarts = metric_value(
            &metrics,
            "weir_module_restarts_total",
            &[("operator", "module")],
        );
        if restarts.unwrap_or(0.0) >= 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no restart: {:?}",
            weir.stderr_seen
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a running `weir` to finish its pipeline successfully.
pub fn finishes_cleanly(weir: &mut Running) {
    assert_eq!(
        weir.wait_exit(Duration::from_secs(90)),
        Some(0),
        "{:?}",
        weir.stderr_seen
    );
}

/// Runs `weir run --no-metrics file` to the end with `envs`; returns its exit code and
/// standard error.
pub fn run_to_end(file: &Path, envs: &[(&str, &std::ffi::OsStr)]) -> (Option<i32>, String) {
    let mut command = weir();
    command.args(["run", "--no-metrics"]).arg(file);
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().expect("weir runs");
    (output.status.code(), text(&output).1)
}

fn pids_of(program: &Path) -> Vec<String> {
    let output = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(program)
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn wait_for_pid(program: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = pids_of(program).into_iter().next() {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} did not start within {timeout:?}", program.display());
}

#[test]
fn the_echo_example_passes_every_row_through_a_process_module() {
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(repo().join("pipelines/examples/module-echo.yaml"))
        .env("WEIR_ECHO_MODULE", echo_module())
        .output()
        .expect("weir runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // The 10 readings (2 devices in turn), each a table row naming its device.
    let rows = stdout.lines().filter(|l| l.contains("| dev-")).count();
    assert_eq!(rows, 10, "{stdout}");
}

/// The module settings of a process module running `program`, plus `more`.
fn process_module(program: &Path, more: &str) -> String {
    format!(
        "      command: [\"{}\"]\n      health: {{interval: 100ms}}\n{more}",
        program.display()
    )
}

#[test]
fn a_killed_module_is_restarted_and_no_batch_is_lost_or_duplicated() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let echo = private_echo(dir.path());
    let settings = "      restart: on-failure\n      backoff: {initial: 200ms}";
    let file = pipeline(dir.path(), 200, "15ms", &process_module(&echo, settings));
    let mut weir = start(&file);
    let addr = weir.metrics_addr();
    let first = wait_for_pid(&echo, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(800));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    wait_for_restart(&mut weir, &addr);
    assert!(
        pids_of(&echo).iter().all(|pid| *pid != first),
        "a new process runs"
    );
    finishes_cleanly(&mut weir);
    // All 200 readings, each exactly once, none dead-lettered.
    assert_eq!(distinct_rows(&dir.path().join("out.jsonl")).len(), 200);
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
}

#[test]
fn process_modules_a_killed_runtime_left_running_are_ended_by_the_next_one() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let echo = private_echo(dir.path());
    let modules = dir.path().join("modules");
    let file = pipeline(dir.path(), 100_000, "50ms", &process_module(&echo, ""));
    let modules_env = modules.to_str().expect("a UTF-8 path");
    // Without util-linux's setpriv on its PATH, the runtime cannot give the module a
    // parent-death signal: the module outlives it.
    let mut killed = Running::start(
        &["run", "--no-metrics", file.to_str().expect("a UTF-8 path")],
        &[("WEIR_MODULE_DIR", modules_env), ("PATH", "/nonexistent")],
    );
    let module = wait_for_pid(&echo, Duration::from_secs(20));
    killed.signal("KILL");
    // Reaped here (a killed process has no exit code).
    assert_eq!(killed.wait_exit(Duration::from_secs(10)), None);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        Path::new(&format!("/proc/{module}")).exists(),
        "the module outlives a SIGKILLed runtime (it has a process group of its own)"
    );
    // Any runtime that starts on the same module directory ends it, and removes what
    // the killed one left there. One that is still running is not touched: this one.
    let mut other = Running::start(
        &["run", "--no-metrics", file.to_str().expect("a UTF-8 path")],
        &[("WEIR_MODULE_DIR", modules_env)],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{module}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&format!("/proc/{module}")).exists(),
        "the leftover still runs"
    );
    let second = wait_for_pid(&echo, Duration::from_secs(20));
    let validated = weir()
        .arg("validate")
        .arg(&file)
        .env("WEIR_MODULE_DIR", modules_env)
        .status()
        .expect("weir validate runs");
    assert!(validated.success());
    assert!(
        Path::new(&format!("/proc/{second}")).exists(),
        "a running runtime's module was ended"
    );
    other.signal("TERM");
    assert_eq!(other.wait_exit(Duration::from_secs(20)), Some(0));
    let left: Vec<_> = std::fs::read_dir(&modules)
        .expect("the module directory")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_process_module_ends_with_a_runtime_killed_by_sigkill() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let echo = private_echo(dir.path());
    let file = pipeline(dir.path(), 100_000, "50ms", &process_module(&echo, ""));
    let mut weir = Running::start(
        &["run", "--no-metrics", file.to_str().expect("a UTF-8 path")],
        &[],
    );
    let module = wait_for_pid(&echo, Duration::from_secs(20));
    weir.signal("KILL");
    assert_eq!(weir.wait_exit(Duration::from_secs(10)), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{module}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&format!("/proc/{module}")).exists(),
        "the module outlived its runtime (setpriv gives it a parent-death signal)"
    );
}

#[test]
fn an_unhealthy_module_is_restarted_under_on_unhealthy() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let echo = private_echo(dir.path());
    let settings = "      env: {ECHO_UNHEALTHY_AFTER: \"5\"}\n      restart: on-unhealthy\n      \
                    health: {interval: 100ms, retries: 2}\n      backoff: {initial: 100ms}";
    let module = format!("      command: [\"{}\"]\n{settings}", echo.display());
    let file = pipeline(dir.path(), 100, "20ms", &module);
    let mut weir = start(&file);
    let addr = weir.metrics_addr();
    let unhealthy = weir.wait_for_log(
        "stopped for failing its health checks",
        Duration::from_secs(30),
    );
    assert!(unhealthy.is_some(), "{:?}", weir.stderr_seen);
    wait_for_restart(&mut weir, &addr);
    finishes_cleanly(&mut weir);
    // Every row still arrives exactly once.
    assert_eq!(distinct_rows(&dir.path().join("out.jsonl")).len(), 100);
}

#[test]
fn a_crash_looping_module_backs_off_exponentially_and_is_reported_failing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let starts = dir.path().join("starts.txt");
    let module = format!(
        "      command: [sh, -c, \"date +%s.%N >> {}; exit 3\"]\n      restart: on-failure\n      \
         backoff: {{initial: 300ms, multiplier: 2, max: 1200ms, jitter: 0}}",
        starts.display()
    );
    let file = pipeline(dir.path(), 1000, "100ms", &module);
    let mut weir = start(&file);
    let addr = weir.metrics_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    let times: Vec<f64> = loop {
        let times: Vec<f64> = std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if times.len() >= 6 || Instant::now() > deadline {
            break times;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(times.len() >= 6, "{times:?}");
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 0.3 s, 0.6 s, then the 1.2 s cap; each gap is the delay plus a start (< 0.35 s on a loaded machine).
    for (gap, delay) in gaps.iter().zip([0.3, 0.6, 1.2, 1.2, 1.2]) {
        assert!(
            (delay - 0.02..delay + 0.35).contains(gap),
            "gaps {gaps:?}: expected {delay} s"
        );
    }
    // At the cap it is reported failing, with its exit code, and `weir status` says so.
    let status = weir_status(&addr);
    assert!(status.contains("failed"), "{status}");
    assert!(status.contains("exited with code 3"), "{status}");
    let metrics = http_get(&addr, "/metrics");
    let module = ("operator", "module");
    let failed = metric_value(
        &metrics,
        "weir_module_state",
        &[module, ("state", "failed")],
    );
    assert_eq!(failed, Some(1.0), "{metrics}");
    let code = metric_value(&metrics, "weir_module_last_exit_code", &[module]);
    assert_eq!(code, Some(3.0));
    weir.signal("TERM");
    assert!(weir.wait_exit(Duration::from_secs(30)).is_some());
}

fn weir_status(addr: &str) -> String {
    let output = weir()
        .args(["status", "--addr", addr])
        .output()
        .expect("weir status runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    stdout
}

#[test]
fn a_missing_executable_fails_the_pipeline_with_a_clear_error_under_restart_never() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let module = "      command: [./no-such-module, --flag]\n      restart: never";
    let (code, stderr) = run_to_end(&pipeline(dir.path(), 10, "10ms", module), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no-such-module") && stderr.contains("no such file"),
        "{stderr}"
    );
}

#[test]
fn a_process_module_past_its_memory_limit_is_reported_with_the_limit() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let settings = "      restart: never\n      limits: {memory: 64MiB}\n      \
                    env: {ECHO_ALLOCATE_MB: \"256\"}";
    let file = pipeline(
        dir.path(),
        10,
        "10ms",
        &process_module(&echo_module(), settings),
    );
    let (code, stderr) = run_to_end(&file, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    // A process is not OOM-killed: its allocation fails under the address-space limit,
    // and the report names the limit rather than claiming an OOM kill.
    assert!(stderr.contains("64 MiB address-space limit"), "{stderr}");
    assert!(!stderr.contains("OOM"), "{stderr}");
}

/// `weir validate` on a pipeline whose module has `settings`: its standard error.
fn invalid(settings: &str) -> String {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = pipeline(dir.path(), 10, "10ms", settings);
    let output = weir()
        .arg("validate")
        .arg(&file)
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    stderr
}

#[test]
fn module_configs_are_validated_with_every_problem_named() {
    let stderr = invalid("      restart: sometimes\n");
    assert!(
        stderr.contains("transforms.module.config.restart"),
        "{stderr}"
    );
    assert!(stderr.contains("on-unhealthy"), "{stderr}");

    let stderr = invalid(
        "      limits: {cpus: 0.5}\n      backoff: {jitter: 3}\n      \
         create_options: {HostConfig: {Privileged: true}}\n",
    );
    for field in [
        "transforms.module.config.image",
        "transforms.module.config.create_options",
        "transforms.module.config.limits.cpus",
        "transforms.module.config.backoff.jitter",
    ] {
        assert!(stderr.contains(field), "{field} in {stderr}");
    }
}

#[test]
fn a_module_the_devices_policy_refuses_does_not_run() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let echo = private_echo(dir.path());
    let file = pipeline(dir.path(), 10, "5ms", &process_module(&echo, ""));
    let output = weir()
        .args([
            "run",
            "--no-metrics",
            "--module-commands",
            "/opt/weir/modules/*",
        ])
        .arg(&file)
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("transforms.module.config.command"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--module-commands /opt/weir/modules/*"),
        "{stderr}"
    );
    assert!(pids_of(&echo).is_empty(), "the module ran");
    // Allowed by its directory, it runs.
    let allowed = format!("{}/*", dir.path().display());
    let output = weir()
        .args(["run", "--no-metrics", "--module-commands", &allowed])
        .arg(&file)
        .output()
        .expect("weir runs");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
}

#[test]
fn depends_on_and_create_options_mistakes_are_validate_errors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("pipeline.yaml");
    let module = |depends_on: &str| {
        format!(
            "    kind: module\n    inputs: [readings]\n    config:\n      command: [./m]\n      depends_on: {depends_on}\n"
        )
    };
    let yaml = format!(
        "version: 1\nname: deps\nsources:\n  readings:\n    kind: generator\n    config: {{count: 1}}\n\
         transforms:\n  first:\n{}  second:\n{}  third:\n{}  boxed:\n    kind: module\n    \
         inputs: [readings]\n    config:\n      image: weir/none:1\n      \
         create_options: {{HostConfig: {{Memory: lots}}}}\n\
         sinks:\n  out:\n    kind: blackhole\n    inputs: [first, second, third, boxed]\n",
        module("[second]"),
        module("[first]"),
        module("[readings, secnd]"),
    );
    std::fs::write(&file, yaml).expect("written");
    let output = weir()
        .arg("validate")
        .arg(&file)
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    for expected in [
        "transforms.first.config.depends_on",
        "first → second → first",
        "second → first → second",
        "transforms.third.config.depends_on.0",
        "'readings' is a generator node, not a module",
        "transforms.third.config.depends_on.1",
        "no node 'secnd' in this pipeline",
        "second",
        "transforms.boxed.config.create_options",
        "HostConfig.Memory",
    ] {
        assert!(stderr.contains(expected), "{expected} in {stderr}");
    }
}

/// A pipeline through the Python SDK's `scale.py` example with `env`; its exit code and
/// standard error.
fn run_scale(dir: &Path, rows: u32, env: &str) -> (Option<i32>, String) {
    let script = repo().join("modules/sdk/python/examples/scale.py");
    let module = format!(
        "      command: [python3, \"{}\"]\n      env: {env}\n      health: {{interval: 100ms}}",
        script.display()
    );
    let file = pipeline(dir, rows, "5ms", &module);
    let sdk = repo().join("modules/sdk/python");
    run_to_end(&file, &[("PYTHONPATH", sdk.as_os_str())])
}

#[test]
fn a_python_module_built_on_the_python_sdk_transforms_the_rows() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (code, stderr) = run_scale(
        dir.path(),
        20,
        "{SCALE_COLUMN: temperature, SCALE_FACTOR: \"10\"}",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let rows = read_json_lines(&dir.path().join("out.jsonl"));
    assert_eq!(rows.len(), 20);
    for row in rows {
        let t = row["temperature"].as_f64().expect("a temperature");
        assert!((175.0..=225.0).contains(&t), "scaled by 10: {t}");
    }
}

#[test]
fn a_batch_that_times_out_is_retried_on_a_new_instance_never_beside_the_hung_one() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let script = dir.path().join("hangs_once.py");
    // Hangs on the first batch it ever sees (across restarts: the marker stays); then
    // passes every batch through. Each instance logs its pid as it starts and ends one.
    std::fs::write(
        &script,
        r#"import os, time
import weir_module

def handle(batch):
    with open(os.environ["LOG"], "a") as log:
        log.write(f"{os.getpid()} start {os.environ.get('WEIR_MODULE_NAME')}\n")
    if not os.path.exists(os.environ["MARKER"]):
        open(os.environ["MARKER"], "w").close()
        time.sleep(120)
    with open(os.environ["LOG"], "a") as log:
        log.write(f"{os.getpid()} done\n")
    return batch

weir_module.serve_transform(handle)
"#,
    )
    .expect("the module is written");
    let log = dir.path().join("calls.log");
    let module = format!(
        "      command: [python3, \"{}\"]\n      env: {{LOG: \"{}\", MARKER: \"{}\"}}\n      \
         timeout: 1s\n      stop_timeout: 1s\n      health: {{interval: 100ms}}\n      \
         backoff: {{initial: 100ms}}",
        script.display(),
        log.display(),
        dir.path().join("hung").display()
    );
    let file = pipeline(dir.path(), 8, "5ms", &module);
    let sdk = repo().join("modules/sdk/python");
    let (code, stderr) = run_to_end(&file, &[("PYTHONPATH", sdk.as_os_str())]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        distinct_rows(&dir.path().join("out.jsonl")).len(),
        8,
        "every row, once"
    );
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
    let calls = std::fs::read_to_string(&log).expect("the module's log");
    let hung = calls
        .lines()
        .next()
        .expect("a first call")
        .split(' ')
        .next()
        .unwrap();
    assert!(
        !calls.lines().any(|line| line == format!("{hung} done")),
        "the hung instance answered: {calls}"
    );
    // The instance that hung was stopped before any retry went out: no other instance
    // started a batch while it lived, and it is gone.
    let answering: std::collections::BTreeSet<&str> = calls
        .lines()
        .skip(1)
        .map(|line| line.split(' ').next().unwrap())
        .collect();
    assert!(!answering.contains(hung), "{calls}");
    assert!(
        !Path::new(&format!("/proc/{hung}")).exists(),
        "the hung instance still runs"
    );
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
}

#[test]
fn batches_a_module_rejects_go_to_dead_letter_with_the_reason() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // `device` is not a float64 column, so the module answers 400 for every batch.
    let (code, stderr) = run_scale(dir.path(), 8, "{SCALE_COLUMN: device}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(read_json_lines(&dir.path().join("out.jsonl")).is_empty());
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 8, "every row, once");
    let error = dead[0]["error"].as_str().expect("an error column");
    assert!(error.contains("rejected the batch (400"), "{error}");
}

#[test]
fn the_python_sdk_passes_its_own_tests() {
    let output = std::process::Command::new("python3")
        .args(["-m", "unittest", "-q"])
        .current_dir(repo().join("modules/sdk/python"))
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("OK"), "{stderr}");
}

#[test]
fn a_source_module_pushes_batches_into_a_pipeline_that_ends_in_a_sink_module() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let python = repo().join("modules/sdk/python/testdata");
    let sink_out = dir.path().join("sink.txt");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            r#"version: 1
name: source-to-sink
sources:
  counter:
    kind: module
    schema: {{seq: int64, value: float64}}
    config:
      command: [python3, "{source}"]
      env: {{SOURCE_BATCHES: "6"}}
      restart: on-failure
      health: {{interval: 100ms}}
sinks:
  recorder:
    kind: module
    inputs: [counter]
    config:
      command: [python3, "{sink}"]
      env: {{SINK_OUT: "{out}"}}
      health: {{interval: 100ms}}
"#,
            source = python.join("source_module.py").display(),
            sink = python.join("sink_module.py").display(),
            out = sink_out.display(),
        ),
    )
    .expect("written");
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(&file)
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // Batch i is [i/2, -i]: 6 batches of 2 rows, sums i/2 - i, each recorded once.
    let recorded = std::fs::read_to_string(&sink_out).expect("the sink module wrote");
    let mut sums: Vec<f64> = recorded
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields[1], "2", "{line}");
            fields[2].parse().expect("a sum")
        })
        .collect();
    sums.sort_by(f64::total_cmp);
    assert_eq!(sums, [-2.5, -2.0, -1.5, -1.0, -0.5, 0.0]);
}
