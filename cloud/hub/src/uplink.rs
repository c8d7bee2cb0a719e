//! Shipping the `hub` sinks' batches to the hub the agent answers to.

use async_trait::async_trait;
use weir_outbox::{Stored, Uplink};

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

#[async_trait]
impl Uplink for HubUplink {
    async fn ship(&self, batch: &Stored) -> Result<(), String> {
        let (pipeline, sink) = batch
            .stream
            .split_once('/')
            .ok_or_else(|| format!("'{}' is not a pipeline/sink stream", batch.stream))?;
        self.client
            .ship(
                &self.device,
                (pipeline, sink, batch.seq),
                batch.appended_ms,
                batch.payload.clone(),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        format!(
            "the hub at {} as device '{}'",
            self.client.url(),
            self.device
        )
    }
}
