//! Exponential reconnect backoff with jitter, for anything that reconnects to a shared
//! server: the MQTT operators' broker and `weir agent`'s hub.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The bounds of the reconnect backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffBounds {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

/// A seed for the backoff jitter that differs between clients and between runs.
fn jitter_seed(client_id: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(client_id.as_bytes());
    hasher.finish()
}

/// Exponential reconnect backoff with jitter: each delay is drawn from the upper half of a
/// window that doubles from `initial` up to `max`, so clients that lost the broker together
/// do not all return at the same instant.
pub struct Backoff<R> {
    bounds: BackoffBounds,
    attempt: u32,
    rng: R,
}

impl Backoff<ChaCha8Rng> {
    /// A backoff whose jitter differs between clients (named by `client_id`) and between
    /// runs: for anything that reconnects to a shared server, not only MQTT.
    pub fn for_client(bounds: BackoffBounds, client_id: &str) -> Self {
        Backoff::new(bounds, ChaCha8Rng::seed_from_u64(jitter_seed(client_id)))
    }
}

impl<R: Rng> Backoff<R> {
    /// A backoff that draws its jitter from `rng` (injected, so tests are deterministic).
    pub fn new(bounds: BackoffBounds, rng: R) -> Self {
        Backoff {
            bounds,
            attempt: 0,
            rng,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let window = self
            .bounds
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.bounds.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = window / 2;
        let jitter_ns = self
            .rng
            .random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        window - half + Duration::from_nanos(jitter_ns)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial`, after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let bounds = BackoffBounds {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        let mut backoff = Backoff::new(bounds, ChaCha8Rng::seed_from_u64(7));
        let windows = [1, 2, 4, 8, 16, 30, 30, 30];
        for window in windows {
            let window = Duration::from_secs(window);
            let delay = backoff.next_delay();
            assert!(
                delay >= window / 2 && delay <= window,
                "{delay:?} in {window:?}"
            );
        }
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
        // Jitter: two clients seeded differently do not retry in lock step.
        let mut other = Backoff::new(bounds, ChaCha8Rng::seed_from_u64(8));
        let mut same = Backoff::new(bounds, ChaCha8Rng::seed_from_u64(7));
        let a: Vec<_> = (0..5).map(|_| same.next_delay()).collect();
        let b: Vec<_> = (0..5).map(|_| other.next_delay()).collect();
        assert_ne!(a, b);
    }
}
