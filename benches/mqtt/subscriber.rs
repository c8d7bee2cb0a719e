//! The plain rumqttc subscriber: a minimal client that counts messages and exits. It
//! runs as this benchmark's own executable started again with [`ROLE_VARIABLE`] set, so
//! that it is a process of its own whose CPU and memory can be read like
//! `mosquitto_sub`'s.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Set to `port,qos,count,session,filter` to make the executable a subscriber. With a
/// `session` (a client id) the client keeps a persistent session under that id, and a
/// `count` of 0 only makes the session and its subscription, then leaves.
pub const ROLE_VARIABLE: &str = "MQTT_BENCH_SUBSCRIBER";

/// Parses the role variable and subscribes until `count` messages arrived.
pub fn run(spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.splitn(5, ',').collect();
    let [port, qos, count, session, filter] = parts.as_slice() else {
        bail!("{ROLE_VARIABLE}={spec}: expected port,qos,count,session,filter");
    };
    let port: u16 = port.parse().context("port")?;
    let qos = match *qos {
        "0" => QoS::AtMostOnce,
        "1" => QoS::AtLeastOnce,
        other => bail!("qos {other} is not benchmarked"),
    };
    let count: u64 = count.parse().context("count")?;
    let filter = filter.to_string();
    let client_id = match *session {
        "" => format!("bench-subscriber-{port}"),
        id => id.to_owned(),
    };
    let persistent = !session.is_empty();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_clean_session(!persistent);
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            eventloop.network_options.set_tcp_nodelay(true);
            let mut received = 0u64;
            loop {
                match eventloop
                    .poll()
                    .await
                    .context("the subscriber lost the broker")?
                {
                    // A resumed session keeps its subscription, as Weir's source does.
                    Event::Incoming(Packet::ConnAck(ack)) if !ack.session_present => {
                        client.subscribe(filter.clone(), qos).await?;
                    }
                    Event::Incoming(Packet::SubAck(_)) if count == 0 => break,
                    Event::Incoming(Packet::Publish(_)) => received += 1,
                    _ => {}
                }
                if count > 0 && received >= count {
                    break;
                }
            }
            client.disconnect().await?;
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
            Ok(())
        })
}
