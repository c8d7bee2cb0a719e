//! A real Mosquitto broker per test, and `mosquitto_sub` / `mosquitto_pub` as independent
//! MQTT peers.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::{Pki, WAIT, free_port};

/// Where Debian's `mosquitto` package installs the broker.
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Settings every test broker gets.
///
/// - The default kinds of log line plus subscriptions (one line each, never one per
///   message), so tests can see when a subscription is in place.
/// - No Nagle delay. On this project's CI machines a small packet (a 4-byte PUBACK) was
///   seen held back by Nagle's algorithm behind an earlier segment whose ACK never came
///   through on loopback, stalling a QoS 1 publisher for over 10 seconds.
const BROKER_DEFAULTS: &str = "log_type error\nlog_type warning\nlog_type notice\n\
                               log_type information\nlog_type subscribe\nset_tcp_nodelay true\n";

/// Fails the test, saying how to fix it, when Mosquitto is not installed.
pub fn require_mosquitto() {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is not installed: apt-get install mosquitto mosquitto-clients"
    );
}

/// A Mosquitto process with its own config and database in a test's directory, killed
/// when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    tls: bool,
    dir: PathBuf,
    conf: PathBuf,
    /// What `mosquitto_pub` and `mosquitto_sub` need to reach this broker (TLS files).
    client_args: Vec<OsString>,
}

impl Broker {
    /// Starts a broker with a plain listener; `extra` is appended to its config (e.g.
    /// `allow_anonymous true`).
    pub fn start(dir: &Path, extra: &str) -> Broker {
        Self::launch(dir, "", extra, false, Vec::new())
    }

    /// Starts a broker that lets in only `user` with `password` (a password file made with
    /// `mosquitto_passwd`).
    pub fn start_with_password(dir: &Path, user: &str, password: &str) -> Broker {
        let passwords = dir.join("passwords");
        let status = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwords)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd failed");
        let extra = format!(
            "allow_anonymous false\npassword_file {}",
            passwords.display()
        );
        Self::start(dir, &extra)
    }

    /// Starts a broker with a TLS listener using `pki`'s broker certificate. With
    /// `require_client_cert`, clients must present a certificate signed by the authority.
    pub fn start_tls(dir: &Path, pki: &Pki, require_client_cert: bool, extra: &str) -> Broker {
        let listener = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}\n",
            pki.ca_file.display(),
            pki.server_cert.display(),
            pki.server_key.display(),
        );
        let client_args = [
            "--cafile".into(),
            pki.ca_file.clone().into_os_string(),
            "--cert".into(),
            pki.client_cert.clone().into_os_string(),
            "--key".into(),
            pki.client_key.clone().into_os_string(),
        ]
        .into();
        Self::launch(dir, &listener, extra, true, client_args)
    }

    fn launch(
        dir: &Path,
        listener: &str,
        extra: &str,
        tls: bool,
        client_args: Vec<OsString>,
    ) -> Broker {
        require_mosquitto();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{listener}user root\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\n{BROKER_DEFAULTS}{extra}\n",
                dir.display()
            ),
        )
        .expect("the broker config can be written");
        let mut broker = Broker {
            child: None,
            port,
            tls,
            dir: dir.to_owned(),
            conf,
            client_args,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("mosquitto.log"))
            .expect("the broker log can be created");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}; see {}",
                self.port,
                self.dir.join("mosquitto.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:port`, or `mqtts://localhost:port` for a TLS broker (the name
    /// its certificate carries).
    pub fn url(&self) -> String {
        if self.tls {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }

    /// Stops the broker gracefully (it saves its database) and starts it again on the
    /// same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the broker gracefully: SIGTERM, then a kill if it does not exit in time.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Starts the broker again after [`Broker::stop`].
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Publishes each payload as one message on `topic`, with `mosquitto_pub`.
    pub async fn publish(&self, topic: &str, payloads: &[&str], qos: u8) {
        let mut child = tokio::process::Command::new("mosquitto_pub")
            .args(self.peer_args())
            .args(["-q", &qos.to_string(), "-t", topic, "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub starts");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let text: String = payloads.iter().map(|p| format!("{p}\n")).collect();
        stdin
            .write_all(text.as_bytes())
            .await
            .expect("mosquitto_pub reads its input");
        drop(stdin);
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("mosquitto_pub finishes")
            .expect("mosquitto_pub runs");
        assert!(status.success(), "mosquitto_pub failed");
    }

    /// Subscribes to `filter` with `mosquitto_sub`, recording every message; returns
    /// once the broker has the subscription. `session` names a persistent session (a
    /// client id, with clean_session false) so messages queue while it is away.
    pub fn subscribe(&self, filter: &str, qos: u8, session: Option<&str>) -> Subscriber {
        let before = self.subscriptions_to(filter);
        let mut command = Command::new("mosquitto_sub");
        command
            .args(self.peer_args())
            .args(["-q", &qos.to_string(), "-t", filter])
            // mosquitto_sub flushes after each message it prints.
            .args(["-F", "%t %p"]);
        if let Some(id) = session {
            command.args(["-c", "-i", id]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let writer = messages.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (topic, payload) = line.split_once(' ').unwrap_or((&line, ""));
                writer
                    .lock()
                    .expect("subscriber lock")
                    .push((topic.to_owned(), payload.to_owned()));
            }
        });
        self.wait_subscribed(filter, before);
        Subscriber { child, messages }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// How many times a client subscribed to exactly `filter` since the broker started,
    /// from its log.
    pub fn subscriptions_to(&self, filter: &str) -> usize {
        let log = self.log();
        // Subscription lines read `<time>: <client id> <qos> <filter>`.
        log.lines()
            .filter(|line| {
                line.strip_suffix(filter)
                    .and_then(|rest| rest.strip_suffix(' '))
                    .and_then(|rest| rest.rsplit_once(' '))
                    .is_some_and(|(_, qos)| matches!(qos, "0" | "1" | "2"))
            })
            .count()
    }

    /// Waits until the broker logged more than `before` subscriptions to `filter`.
    pub fn wait_subscribed(&self, filter: &str, before: usize) {
        let deadline = Instant::now() + WAIT;
        while self.subscriptions_to(filter) <= before {
            assert!(
                Instant::now() < deadline,
                "nothing subscribed to {filter}; see {}",
                self.dir.join("mosquitto.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn peer_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "-h".into(),
            if self.tls { "localhost" } else { "127.0.0.1" }.into(),
            "-p".into(),
            self.port.to_string().into(),
            // As the broker and Weir's client: see BROKER_DEFAULTS.
            "--nodelay".into(),
        ];
        args.extend(self.client_args.iter().cloned());
        args
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `mosquitto_sub` process recording (topic, payload) pairs, killed when dropped.
pub struct Subscriber {
    child: Child,
    messages: Arc<Mutex<Vec<(String, String)>>>,
}

impl Subscriber {
    /// Every message so far, as (topic, payload), in arrival order.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.messages.lock().expect("subscriber lock").clone()
    }

    /// Waits until at least `count` messages arrived, and returns them all.
    pub async fn wait_for(&self, count: usize) -> Vec<(String, String)> {
        self.wait_until(&format!("{count} messages"), |messages| {
            messages.len() >= count
        })
        .await
    }

    /// Waits until at least `count` messages arrived, however long that takes as long as
    /// messages keep coming: fails only when none arrived for [`WAIT`]. For long streams.
    pub async fn wait_for_stream(&self, count: usize) -> Vec<(String, String)> {
        let mut seen = 0;
        let mut deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.messages.lock().expect("subscriber lock").len();
            if arrived >= count {
                return self.messages();
            }
            if arrived > seen {
                seen = arrived;
                deadline = tokio::time::Instant::now() + WAIT;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream stalled at {arrived} of {count} messages: none for {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `done` holds for the messages so far, and returns them all.
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let messages = self.messages();
            if done(&messages) {
                return messages;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; got {} messages, the last: {:?}",
                messages.len(),
                messages.iter().rev().take(3).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
