//! Helpers for running the `weir` binary and reading what it prints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `weir` command with quiet logs unless the test sets RUST_LOG itself, keeping its
/// checkpoints in a state directory of this test's own (nextest runs each test in a
/// process of its own), so tests that run the same pipeline never share state while
/// the runs of one test do.
pub fn weir() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .env("RUST_LOG", "warn")
        .env("WEIR_STATE_DIR", test_state_dir())
        .stdin(Stdio::null());
    command
}

/// This test process's state directory, under Cargo's temporary directory for tests.
pub fn test_state_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("weir-state-{}", std::process::id()))
}

/// Runs `weir` with `args` to completion.
pub fn run(args: &[&str]) -> Output {
    weir().args(args).output().expect("weir starts")
}

/// Standard output and error of a finished run, as text.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A running `weir` whose standard error is read line by line on a thread.
pub struct Running {
    pub child: Child,
    pub stderr_lines: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
}

impl Running {
    /// Starts `weir` with `args`, logging at `info` so the test can see progress.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Running {
        let mut command = weir();
        command
            .env("RUST_LOG", "info")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("weir starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            stderr_lines: rx,
            stderr_seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a stderr line containing `needle`; returns the line.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends a signal by name (`TERM`, `INT`) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait works") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The metrics address the runtime printed when it started.
    pub fn metrics_addr(&mut self) -> String {
        let line = self
            .wait_for_log("metrics: listening on http://", Duration::from_secs(30))
            .expect("the runtime announces its metrics address");
        let start = line.find("http://").expect("a url") + "http://".len();
        let rest = &line[start..];
        rest[..rest.find('/').expect("a path")].to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 request on loopback with `headers` (`Name: value`) and `body`;
/// returns the status code and the body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects to the runtime");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("sets a timeout");
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream
        .write_all(request.as_bytes())
        .expect("sends the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reads the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_owned())
}

/// A plain HTTP/1.0 GET on loopback; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connects to the runtime");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("sets a timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sends the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reads the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
pub fn metric_value(body: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(metric) && line[metric.len()..].starts_with(['{', ' ']))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Reads a JSON-lines file into values, sorted by their text so order does not matter.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    rows.sort_by_key(|row| row.to_string());
    rows
}
