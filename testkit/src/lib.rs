//! Test fixtures shared by Weir's test suites and benchmarks.
//!
//! - [`Broker`]: a real Mosquitto on a free loopback port, with a generated config, that a
//!   test can restart or stop; and [`Subscriber`], a `mosquitto_sub` that records what it
//!   receives.
//! - [`flood`]: a rumqttc publisher that sends a list of messages as fast as the broker
//!   takes them, for load tests and benchmarks.
//! - [`Pki`]: a certificate authority with a broker and a client certificate, generated
//!   for one test and written as PEM files.
//!
//! - [`S3Server`]: a real S3-compatible server (moto's) on a free loopback port.
//!
//! - [`noise`]: reproducible pseudo-random values for synthetic series.
//!
//! Every wait is bounded by [`WAIT`], so a broken peer fails a test instead of hanging it.
//! The broker and S3 fixtures panic when Mosquitto or moto is not installed: `.ci/run` installs it, and
//! a silently skipped broker test would hide exactly the regressions it exists for.

mod flood;
mod mosquitto;
mod pki;
mod s3;

pub use flood::{FloodError, flood};
pub use mosquitto::{Broker, Subscriber, require_mosquitto};
pub use pki::Pki;
pub use s3::{S3Server, require_moto};

use std::time::Duration;

/// How long any one condition in a test may take to come true.
pub const WAIT: Duration = Duration::from_secs(15);

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("the loopback interface has a free port")
}

/// A reproducible pseudo-random value in [0, 1) for row `row` of stream `stream`
/// (SplitMix64's finaliser over the two), so synthetic series need no generator state.
pub fn noise(row: u64, stream: u64) -> f64 {
    let mut x =
        row.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64
}
