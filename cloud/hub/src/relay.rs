//! Queries an admin forwards to a device: each waits in the device's queue until the
//! device's query poll takes it, and the device's answer goes back to the admin request
//! that is waiting for it.
//!
//! The relay lives in one hub's memory. A device is reachable through the hub that holds
//! its query poll; an admin asking another hub of a shared database is told the device
//! is not connected there.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::protocol::ForwardedQuery;

/// A device whose last query poll ended longer ago than this, with none open now, is not
/// connected: an agent polls again as soon as a poll ends.
pub const CONNECTED_GRACE: Duration = Duration::from_secs(5);

/// What a device answered to a forwarded query: the status, media type and body its own
/// API gave, with its row count and truncation headers.
#[derive(Debug)]
pub struct DeviceAnswer {
    /// The HTTP status of the device's answer.
    pub status: u16,
    /// Its media type.
    pub content_type: String,
    /// How many rows it holds, when it holds rows.
    pub row_count: Option<String>,
    /// Whether the rows were cut at the device's limit.
    pub truncated: Option<String>,
    /// The answer itself.
    pub body: Bytes,
}

#[derive(Default)]
struct DeviceQueue {
    pending: VecDeque<ForwardedQuery>,
    answers: HashMap<String, oneshot::Sender<DeviceAnswer>>,
    wake: Arc<Notify>,
    open_polls: usize,
    last_poll_end: Option<Instant>,
}

/// The hub's forwarded queries, per device.
#[derive(Default)]
pub struct QueryRelay {
    devices: Mutex<HashMap<String, DeviceQueue>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl QueryRelay {
    fn with<R>(&self, device: &str, act: impl FnOnce(&mut DeviceQueue) -> R) -> R {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        act(devices.entry(device.to_owned()).or_default())
    }

    /// Whether `device` holds a query poll on this hub, or ended one within
    /// [`CONNECTED_GRACE`].
    pub fn is_connected(&self, device: &str) -> bool {
        let devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        devices.get(device).is_some_and(|queue| {
            queue.open_polls > 0
                || queue
                    .last_poll_end
                    .is_some_and(|end| end.elapsed() <= CONNECTED_GRACE)
        })
    }

    /// Queues `request` for `device`; the receiver gets the device's answer.
    pub fn forward(
        &self,
        device: &str,
        request: weir_query::QueryRequest,
    ) -> (String, oneshot::Receiver<DeviceAnswer>) {
        let id = format!(
            "q{}",
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (sender, receiver) = oneshot::channel();
        self.with(device, |queue| {
            queue.pending.push_back(ForwardedQuery {
                id: id.clone(),
                request,
            });
            queue.answers.insert(id.clone(), sender);
            // A permit is kept when no poll waits, so the next poll takes it at once.
            queue.wake.notify_one();
        });
        (id, receiver)
    }

    /// Forgets query `id` of `device`, whose asker gave up.
    pub fn cancel(&self, device: &str, id: &str) {
        self.with(device, |queue| {
            queue.pending.retain(|query| query.id != id);
            queue.answers.remove(id);
        });
    }

    /// The queries waiting for `device`, waiting up to `wait` for one to arrive.
    pub async fn take(&self, device: &str, wait: Duration) -> Vec<ForwardedQuery> {
        let deadline = Instant::now() + wait;
        let wake = self.with(device, |queue| {
            queue.open_polls += 1;
            queue.wake.clone()
        });
        // Counted out however the poll ends: answered, timed out, or dropped because the
        // device's connection went away.
        let _open = OpenPoll {
            relay: self,
            device,
        };
        loop {
            let taken: Vec<ForwardedQuery> =
                self.with(device, |queue| queue.pending.drain(..).collect());
            if !taken.is_empty() {
                return taken;
            }
            if tokio::time::timeout_at(deadline, wake.notified())
                .await
                .is_err()
            {
                return Vec::new();
            }
        }
    }

    /// Hands `answer` to whoever waits for query `id` of `device`. False when nobody
    /// does (an unknown id, or the asker gave up).
    pub fn answer(&self, device: &str, id: &str, answer: DeviceAnswer) -> bool {
        self.with(device, |queue| queue.answers.remove(id))
            .is_some_and(|sender| sender.send(answer).is_ok())
    }
}

/// One open query poll of a device, counted out when it ends.
struct OpenPoll<'a> {
    relay: &'a QueryRelay,
    device: &'a str,
}

impl Drop for OpenPoll<'_> {
    fn drop(&mut self) {
        self.relay.with(self.device, |queue| {
            queue.open_polls = queue.open_polls.saturating_sub(1);
            queue.last_poll_end = Some(Instant::now());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &'static str) -> DeviceAnswer {
        DeviceAnswer {
            status: 200,
            content_type: "text/csv".into(),
            row_count: None,
            truncated: None,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn a_forwarded_query_reaches_the_devices_poll_and_its_answer_comes_back() {
        let relay = Arc::new(QueryRelay::default());
        assert!(!relay.is_connected("d1"));
        let poll = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.take("d1", Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        let (id, answered) = relay.forward("d1", weir_query::QueryRequest::new("SELECT 1"));
        let taken = poll.await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].id.as_str(), taken[0].request.sql.as_str()),
            (id.as_str(), "SELECT 1")
        );
        assert!(relay.is_connected("d1"), "its poll ended just now");
        assert!(relay.answer("d1", &id, answer("x\n1\n")));
        assert_eq!(answered.await.unwrap().body, "x\n1\n");
        assert!(!relay.answer("d1", &id, answer("again")), "answered once");
    }

    #[tokio::test]
    async fn a_query_forwarded_between_polls_waits_for_the_next_one() {
        let relay = QueryRelay::default();
        let (id, _answered) = relay.forward("d1", weir_query::QueryRequest::new("SELECT 1"));
        let taken = relay.take("d1", Duration::from_millis(10)).await;
        assert_eq!(taken[0].id, id);
        // Nothing else is waiting: the next poll times out empty.
        assert!(relay.take("d1", Duration::from_millis(10)).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_is_connected_while_it_polls_and_shortly_after() {
        let relay = Arc::new(QueryRelay::default());
        let poll = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.take("d1", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(relay.is_connected("d1"));
        poll.await.unwrap();
        tokio::time::advance(CONNECTED_GRACE + Duration::from_secs(1)).await;
        assert!(!relay.is_connected("d1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_dropped_midway_still_counts_out() {
        let relay = Arc::new(QueryRelay::default());
        let poll = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.take("d1", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        poll.abort();
        let _ = poll.await;
        tokio::time::advance(CONNECTED_GRACE + Duration::from_secs(1)).await;
        assert!(
            !relay.is_connected("d1"),
            "the aborted poll is not open any more"
        );
    }

    #[tokio::test]
    async fn a_cancelled_query_is_neither_taken_nor_answered() {
        let relay = QueryRelay::default();
        let (id, _answered) = relay.forward("d1", weir_query::QueryRequest::new("SELECT 1"));
        relay.cancel("d1", &id);
        assert!(relay.take("d1", Duration::from_millis(10)).await.is_empty());
        assert!(!relay.answer("d1", &id, answer("late")));
    }
}
