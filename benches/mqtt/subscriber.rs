//! The second plain subscriber: a minimal rumqttc client that counts messages and exits.
//! It runs as this benchmark's own executable started again with
//! [`ROLE_VARIABLE`] set, so that it is a process of its own whose CPU and memory can be
//! read like `mosquitto_sub`'s.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Set to `port,qos,count,filter` to make the executable a subscriber.
pub const ROLE_VARIABLE: &str = "MQTT_BENCH_SUBSCRIBER";

/// Parses the role variable and subscribes until `count` messages arrived.
pub fn run(spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.splitn(4, ',').collect();
    let [port, qos, count, filter] = parts.as_slice() else {
        bail!("{ROLE_VARIABLE}={spec}: expected port,qos,count,filter");
    };
    let port: u16 = port.parse().context("port")?;
    let qos = match *qos {
        "0" => QoS::AtMostOnce,
        "1" => QoS::AtLeastOnce,
        other => bail!("qos {other} is not benchmarked"),
    };
    let count: u64 = count.parse().context("count")?;
    let filter = filter.to_string();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut options =
                MqttOptions::new(format!("bench-subscriber-{port}"), "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            eventloop.network_options.set_tcp_nodelay(true);
            client.subscribe(filter, qos).await?;
            let mut received = 0u64;
            while received < count {
                if let Event::Incoming(Packet::Publish(_)) = eventloop
                    .poll()
                    .await
                    .context("the subscriber lost the broker")?
                {
                    received += 1;
                }
            }
            Ok(())
        })
}
