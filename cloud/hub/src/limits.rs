//! What the fleet may ask of one hub: how many batch bodies it reads at once, how many
//! long polls and reports each device may hold or send, and each device's quotas of
//! streams and bytes a day. A request past a limit is answered 429 with `Retry-After`
//! (the device sends it again later and loses nothing); a stream past the quota is
//! refused for good (422). Limits and counts are this hub's own: hubs sharing a
//! database each apply them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits, with documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Batch bodies (up to 64 MiB each) read and stored at once.
    pub max_concurrent_ingest: usize,
    /// Long polls of one kind (desired state, queries) one device holds open at once.
    pub max_polls_per_device: usize,
    /// Reports one device may send a minute (a burst of up to 10 passes at once).
    pub reports_per_minute: u32,
    /// Distinct (pipeline, sink) streams one device may ship to.
    pub max_streams_per_device: usize,
    /// Bytes one device may ship a day (UTC), as sent.
    pub max_bytes_per_device_day: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_concurrent_ingest: 16,
            max_polls_per_device: 2,
            reports_per_minute: 60,
            max_streams_per_device: 64,
            max_bytes_per_device_day: 4 << 30,
        }
    }
}

/// Which streams a device may ship to: a batch to any other is refused for good (422).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamRule {
    /// The `hub` sinks of the device's desired deployment, and any stream it has
    /// shipped to before (an outbox may still hold an earlier deployment's batches).
    Deployed,
    /// `PIPELINE/SINK`, each part a glob (`*` for any, `plant-*`).
    Pattern(glob::Pattern, glob::Pattern),
}

impl std::str::FromStr for StreamRule {
    type Err = String;

    /// `deployed`, or `PIPELINE/SINK` globs.
    fn from_str(text: &str) -> Result<StreamRule, String> {
        let text = text.trim();
        if text == "deployed" {
            return Ok(StreamRule::Deployed);
        }
        let (pipeline, sink) = text.split_once('/').ok_or_else(|| {
            format!("'{text}' is not a stream rule: write `deployed` or PIPELINE/SINK (globs, e.g. plant-*/*)")
        })?;
        let glob = |part: &str| {
            glob::Pattern::new(part).map_err(|e| format!("'{text}': `{part}` is not a glob: {e}"))
        };
        Ok(StreamRule::Pattern(glob(pipeline)?, glob(sink)?))
    }
}

impl StreamRule {
    /// Every stream.
    pub fn any() -> StreamRule {
        StreamRule::Pattern(
            glob::Pattern::new("*").expect("a glob"),
            glob::Pattern::new("*").expect("a glob"),
        )
    }
}

/// Reports a device may send at once before the rate applies.
const REPORT_BURST: f64 = 10.0;

/// A request past a limit: try again after this long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Busy {
    /// Why.
    pub message: String,
    /// When to try again.
    pub retry_after: Duration,
}

/// Counts requests against [`RequestLimits`].
pub struct Limiter {
    limits: RequestLimits,
    ingest: Arc<Semaphore>,
    polls: Arc<Mutex<HashMap<String, usize>>>,
    reports: Mutex<HashMap<String, Bucket>>,
    usage: Mutex<HashMap<String, Usage>>,
}

/// A device's report allowance: a token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// What a device shipped: bytes on one day, and the streams it ships to (read from the
/// database once, then kept).
#[derive(Debug, Default)]
struct Usage {
    day: i64,
    bytes: u64,
    streams: Option<HashSet<(String, String)>>,
}

/// A held long poll; dropping it frees the slot.
pub struct PollSlot {
    polls: Arc<Mutex<HashMap<String, usize>>>,
    /// `kind/device`.
    device: String,
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut polls = lock(&self.polls);
        if let Some(open) = polls.get_mut(&self.device) {
            *open -= 1;
            if *open == 0 {
                polls.remove(&self.device);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limiter {
    /// A limiter of `limits`.
    pub fn new(limits: RequestLimits) -> Limiter {
        Limiter {
            limits,
            ingest: Arc::new(Semaphore::new(limits.max_concurrent_ingest.max(1))),
            polls: Arc::default(),
            reports: Mutex::default(),
            usage: Mutex::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    /// A slot for one batch body, or [`Busy`] when as many are being taken as allowed.
    pub fn ingest(&self) -> Result<OwnedSemaphorePermit, Busy> {
        self.ingest.clone().try_acquire_owned().map_err(|_| Busy {
            message: format!(
                "the hub is taking {} batches already; send this one again shortly",
                self.limits.max_concurrent_ingest
            ),
            retry_after: Duration::from_secs(1),
        })
    }

    /// A slot for a long poll of `kind` by `device`, or [`Busy`] when it holds as many
    /// as allowed.
    pub fn poll(&self, device: &str, kind: &str) -> Result<PollSlot, Busy> {
        let key = format!("{kind}/{device}");
        let mut polls = lock(&self.polls);
        let open = polls.entry(key.clone()).or_default();
        if *open >= self.limits.max_polls_per_device {
            return Err(Busy {
                message: format!(
                    "device '{device}' holds {} long polls for its {kind} already; close one \
                     first",
                    *open
                ),
                retry_after: Duration::from_secs(5),
            });
        }
        *open += 1;
        Ok(PollSlot {
            polls: self.polls.clone(),
            device: key,
        })
    }

    /// Counts a report of `device` at `now_ms`, or [`Busy`] past its rate.
    pub fn report(&self, device: &str, now_ms: i64) -> Result<(), Busy> {
        let per_ms = f64::from(self.limits.reports_per_minute) / 60_000.0;
        let mut reports = lock(&self.reports);
        let bucket = reports.entry(device.to_owned()).or_insert(Bucket {
            tokens: REPORT_BURST,
            at_ms: now_ms,
        });
        let elapsed = (now_ms - bucket.at_ms).max(0) as f64;
        bucket.tokens = (bucket.tokens + elapsed * per_ms).min(REPORT_BURST);
        bucket.at_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = if per_ms > 0.0 {
            ((1.0 - bucket.tokens) / per_ms).ceil() as u64
        } else {
            60_000
        };
        Err(Busy {
            message: format!(
                "device '{device}' sends more than {} reports a minute",
                self.limits.reports_per_minute
            ),
            retry_after: Duration::from_millis(wait_ms).max(Duration::from_secs(1)),
        })
    }

    /// Whether `rules` let `device` ship to `stream`; `deployed` says whether its
    /// desired deployment has that `hub` sink.
    pub fn accepts(
        &self,
        rules: &[StreamRule],
        device: &str,
        (pipeline, sink): (&str, &str),
        deployed: bool,
    ) -> bool {
        rules.iter().any(|rule| match rule {
            StreamRule::Deployed => {
                deployed
                    || lock(&self.usage).get(device).is_some_and(|usage| {
                        usage.streams.as_ref().is_some_and(|streams| {
                            streams.contains(&(pipeline.to_owned(), sink.to_owned()))
                        })
                    })
            }
            StreamRule::Pattern(pipelines, sinks) => {
                pipelines.matches(pipeline) && sinks.matches(sink)
            }
        })
    }

    /// Whether `device` knows its streams here yet (see [`Limiter::know_streams`]).
    pub fn knows_streams(&self, device: &str) -> bool {
        lock(&self.usage)
            .get(device)
            .is_some_and(|usage| usage.streams.is_some())
    }

    /// Tells the limiter which streams `device` shipped to before (from the database).
    pub fn know_streams(&self, device: &str, streams: impl IntoIterator<Item = (String, String)>) {
        let mut usage = lock(&self.usage);
        let entry = usage.entry(device.to_owned()).or_default();
        entry
            .streams
            .get_or_insert_with(HashSet::new)
            .extend(streams);
    }

    /// Charges a batch of `bytes` for `device`'s `stream` on `day` (days since the
    /// epoch). Past the bytes a day: [`Quota::Later`]; a new stream past the streams
    /// allowed: [`Quota::Refused`].
    pub fn charge(
        &self,
        device: &str,
        (pipeline, sink): (&str, &str),
        bytes: u64,
        day: i64,
    ) -> Result<(), Quota> {
        let mut usage = lock(&self.usage);
        let entry = usage.entry(device.to_owned()).or_default();
        if entry.day != day {
            entry.day = day;
            entry.bytes = 0;
        }
        let streams = entry.streams.get_or_insert_with(HashSet::new);
        let stream = (pipeline.to_owned(), sink.to_owned());
        if !streams.contains(&stream) && streams.len() >= self.limits.max_streams_per_device {
            return Err(Quota::Refused(format!(
                "device '{device}' ships to {} streams already, the most a device may; \
                 {pipeline}/{sink} would be one more",
                streams.len()
            )));
        }
        if entry.bytes.saturating_add(bytes) > self.limits.max_bytes_per_device_day {
            return Err(Quota::Later(Busy {
                message: format!(
                    "device '{device}' shipped {} today, its quota of {} a day",
                    bytesize::ByteSize(entry.bytes),
                    bytesize::ByteSize(self.limits.max_bytes_per_device_day)
                ),
                retry_after: Duration::from_secs(15 * 60),
            }));
        }
        entry.bytes += bytes;
        streams.insert(stream);
        Ok(())
    }
}

/// A batch past a device's quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quota {
    /// Past its bytes a day: later.
    Later(Busy),
    /// A stream past the streams allowed: never.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            max_concurrent_ingest: 2,
            max_polls_per_device: 2,
            reports_per_minute: 60,
            max_streams_per_device: 2,
            max_bytes_per_device_day: 1000,
        }
    }

    #[test]
    fn ingest_slots_are_bounded_and_freed() {
        let limiter = Limiter::new(limits());
        let first = limiter.ingest().unwrap();
        let _second = limiter.ingest().unwrap();
        assert!(limiter.ingest().is_err());
        drop(first);
        assert!(limiter.ingest().is_ok());
    }

    #[test]
    fn long_polls_are_bounded_per_device() {
        let limiter = Limiter::new(limits());
        let a1 = limiter.poll("a", "desired state").unwrap();
        let _a2 = limiter.poll("a", "desired state").unwrap();
        assert!(limiter.poll("a", "desired state").is_err());
        assert!(
            limiter.poll("a", "queries").is_ok(),
            "another kind has its own"
        );
        assert!(
            limiter.poll("b", "desired state").is_ok(),
            "another device has its own"
        );
        drop(a1);
        assert!(limiter.poll("a", "desired state").is_ok());
    }

    #[test]
    fn reports_pass_in_a_burst_then_at_the_rate() {
        let limiter = Limiter::new(limits());
        for _ in 0..10 {
            limiter.report("a", 0).unwrap();
        }
        let busy = limiter.report("a", 0).unwrap_err();
        assert_eq!(busy.retry_after, Duration::from_secs(1));
        assert!(limiter.report("b", 0).is_ok());
        // One a second comes back.
        assert!(limiter.report("a", 1000).is_ok());
        assert!(limiter.report("a", 1000).is_err());
    }

    #[test]
    fn streams_are_accepted_by_rule() {
        let limiter = Limiter::new(limits());
        let rules: Vec<StreamRule> = ["deployed", "lab-*/*"]
            .iter()
            .map(|rule| rule.parse().unwrap())
            .collect();
        assert!(limiter.accepts(&rules, "a", ("plant", "uplink"), true));
        assert!(!limiter.accepts(&rules, "a", ("plant", "uplink"), false));
        assert!(limiter.accepts(&rules, "a", ("lab-3", "x"), false));
        // Shipped before: still accepted after the deployment moved on.
        limiter.know_streams("a", [("plant".to_owned(), "old".to_owned())]);
        assert!(limiter.accepts(&rules, "a", ("plant", "old"), false));
        assert!(limiter.accepts(&[StreamRule::any()], "b", ("any", "thing"), false));
        assert!("plant".parse::<StreamRule>().is_err());
        assert!("[/x".parse::<StreamRule>().is_err());
    }

    #[test]
    fn quotas_count_streams_and_bytes_a_day() {
        let limiter = Limiter::new(limits());
        limiter.know_streams("a", [("p".to_owned(), "old".to_owned())]);
        limiter.charge("a", ("p", "old"), 400, 1).unwrap();
        limiter.charge("a", ("p", "new"), 400, 1).unwrap();
        assert!(matches!(
            limiter.charge("a", ("p", "third"), 1, 1),
            Err(Quota::Refused(_))
        ));
        assert!(matches!(
            limiter.charge("a", ("p", "old"), 201, 1),
            Err(Quota::Later(_))
        ));
        // A new day starts the bytes over.
        limiter.charge("a", ("p", "old"), 900, 2).unwrap();
    }
}
