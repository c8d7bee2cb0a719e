//! Shipping the `hub` sinks' batches to the hub the agent answers to.

use async_trait::async_trait;
use weir_outbox::{ShipError, Stored, Uplink};

use crate::HubClient;

/// Ships each batch to `POST /api/v1/devices/{device}/data/{pipeline}/{sink}/{seq}`,
/// as this device.
pub struct HubUplink {
    client: HubClient,
    device: String,
}

impl HubUplink {
    /// Ships through `client` as `device`.
    pub fn new(client: HubClient, device: String) -> Self {
        HubUplink { client, device }
    }
}

/// Whether the hub's `status` for a batch is its last word on it: a 4xx says the batch
/// itself is refused, except 401 and 403 (credentials, which an operator fixes), 408
/// (a timeout) and 429 (too many requests), which pass.
fn refused_for_good(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 408 | 429)
}

#[async_trait]
impl Uplink for HubUplink {
    async fn ship(&self, batch: &Stored) -> Result<(), ShipError> {
        let (pipeline, sink) = batch.stream.split_once('/').ok_or_else(|| {
            ShipError::Refused(format!("'{}' is not a pipeline/sink stream", batch.stream))
        })?;
        self.client
            .ship(
                &self.device,
                (pipeline, sink, batch.seq),
                batch.appended_ms,
                batch.payload.clone(),
            )
            .await
            .map(drop)
            .map_err(|e| match e.status() {
                Some(status) if refused_for_good(status) => ShipError::Refused(e.to_string()),
                _ => ShipError::Retry(e.to_string()),
            })
    }

    fn describe(&self) -> String {
        format!(
            "the hub at {} as device '{}'",
            self.client.url(),
            self.device
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_of_the_batch_itself_is_for_good() {
        for status in [400, 404, 413, 415, 422] {
            assert!(refused_for_good(status), "{status}");
        }
        for status in [401, 403, 408, 429, 500, 502, 503] {
            assert!(!refused_for_good(status), "{status}");
        }
    }
}
