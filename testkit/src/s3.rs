//! A real S3-compatible server per test: moto's standalone server (PyPI `moto[server]`),
//! on a free loopback port, holding its buckets in memory until it is dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{WAIT, free_port};

/// The credentials the server is given (moto takes any; the client still signs with them).
const ACCESS_KEY_ID: &str = "weir-test";
const SECRET_ACCESS_KEY: &str = "weir-test-secret";
const REGION: &str = "us-east-1";

/// Fails the test, saying how to fix it, when moto's server is not installed.
pub fn require_moto() {
    let installed = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        installed,
        "the S3 tests need moto's server: python3 -m pip install 'moto[server]' (.ci/run does)"
    );
}

/// An S3-compatible server, killed when dropped.
pub struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    /// Starts a server and waits until it answers.
    pub fn start() -> S3Server {
        require_moto();
        let port = free_port();
        let mut server = S3Server {
            child: spawn(port),
            port,
        };
        server.wait_until_it_answers();
        server
    }

    /// Starts the server again on the same port, empty, after [`S3Server::stop`].
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port);
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.request("GET", "/").is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto's S3 server exited ({status}) on port {}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not answer on port {} within {WAIT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .expect("the S3 server answers");
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// What an `object_store` S3 client needs to reach this server, by setting name.
    pub fn settings(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_owned()),
            ("aws_access_key_id", ACCESS_KEY_ID.to_owned()),
            ("aws_secret_access_key", SECRET_ACCESS_KEY.to_owned()),
            ("aws_region", REGION.to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// The same, as the `AWS_*` environment of a process that reaches this server.
    pub fn environment(&self) -> Vec<(String, String)> {
        self.settings()
            .into_iter()
            .map(|(key, value)| {
                let key = match key.as_str() {
                    "aws_endpoint" => "AWS_ENDPOINT_URL".to_owned(),
                    other => other.to_uppercase(),
                };
                (key, value)
            })
            .collect()
    }

    /// Stops the server: requests to it fail from now on.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One unsigned request (moto does not check signatures): its status code.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(WAIT))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:.80}")))
    }
}

/// moto's server on `port`.
fn spawn(port: u16) -> Child {
    Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto's S3 server")
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
