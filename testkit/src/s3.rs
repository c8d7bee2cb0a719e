//! A real S3-compatible server per test: moto's standalone server (PyPI `moto[server]`)
//! on a free loopback port, holding its buckets in memory until it is dropped, behind a
//! proxy that a test can cut to make the store unreachable without losing what it holds.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    moto: Child,
    /// moto's own port; clients go through the proxy.
    moto_port: u16,
    proxy: Proxy,
}

impl S3Server {
    /// Starts a server and waits until it answers.
    pub fn start() -> S3Server {
        require_moto();
        let moto_port = free_port();
        let mut moto = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(moto_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's S3 server");
        let deadline = Instant::now() + WAIT;
        while request(moto_port, "GET", "/").is_err() {
            if let Ok(Some(status)) = moto.try_wait() {
                panic!("moto's S3 server exited ({status}) on port {moto_port}");
            }
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not answer on port {moto_port} within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            moto,
            moto_port,
            proxy: Proxy::start(moto_port),
        }
    }

    /// The server's URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.port)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status =
            request(self.moto_port, "PUT", &format!("/{bucket}")).expect("the S3 server answers");
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// Makes the server unreachable: connections open now are cut, new ones are closed
    /// at once. What it holds is kept.
    pub fn cut(&self) {
        let mut open = self.proxy.open.lock().unwrap_or_else(|e| e.into_inner());
        self.proxy.cut.store(true, Ordering::SeqCst);
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Makes the server reachable again after [`S3Server::cut`].
    pub fn restore(&self) {
        self.proxy.cut.store(false, Ordering::SeqCst);
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
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.cut();
        self.proxy.closed.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.proxy.port));
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// A TCP proxy to moto that keeps its listening port while it is cut, so no other test
/// can take that port meanwhile.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    /// Both ends of every proxied connection, to cut them.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let proxy = Proxy {
            port,
            cut: Arc::default(),
            closed: Arc::default(),
            open: Arc::default(),
        };
        let (cut, closed, open) = (proxy.cut.clone(), proxy.closed.clone(), proxy.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if closed.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // Checked and recorded under the lock `cut` takes: a connection is
                // either refused here or cut there, never missed by both.
                let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                if cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    continue;
                }
                let ends = [client.try_clone(), server.try_clone()];
                if let [Ok(a), Ok(b)] = ends {
                    open.extend([a, b]);
                }
                drop(open);
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        proxy
    }
}

/// Copies `from` to `to` on a thread of its own, closing both when either ends.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// One unsigned request to moto (it does not check signatures): its status code.
fn request(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:.80}")))
}
