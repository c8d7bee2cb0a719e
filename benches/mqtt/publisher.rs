//! The benchmark's publisher: a minimal rumqttc client that publishes every line of a
//! file as one message and returns only once the broker has them all.
//!
//! `mosquitto_pub -l` cannot serve at QoS 1: at the end of its input it disconnects
//! while messages still wait in its queue, and Mosquitto drops them (it logs the
//! client as "disconnected due to out of memory").

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Publishes each line of `input` on `topic` at `qos` to the broker on 127.0.0.1:`port`,
/// on its own thread; the handle yields once every message is acknowledged (QoS 1) or
/// written out (QoS 0).
pub fn spawn(
    port: u16,
    topic: &str,
    qos: u8,
    input: &Path,
) -> Result<std::thread::JoinHandle<Result<u64>>> {
    let lines: Vec<String> = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .lines()
        .map(str::to_owned)
        .collect();
    let topic = topic.to_owned();
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => bail!("qos {other} is not benchmarked"),
    };
    Ok(std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(publish(port, topic, qos, lines))
    }))
}

async fn publish(port: u16, topic: String, qos: QoS, lines: Vec<String>) -> Result<u64> {
    let mut options = MqttOptions::new(format!("bench-publisher-{port}"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    eventloop.network_options.set_tcp_nodelay(true);
    let total = lines.len() as u64;
    let sender = tokio::spawn(async move {
        for line in lines {
            client.publish(topic.clone(), qos, false, line).await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut done = 0u64;
    while done < total {
        match eventloop
            .poll()
            .await
            .context("the publisher lost the broker")?
        {
            Event::Incoming(Packet::PubAck(_)) if qos == QoS::AtLeastOnce => done += 1,
            Event::Outgoing(Outgoing::Publish(_)) if qos == QoS::AtMostOnce => done += 1,
            _ => {}
        }
    }
    let client = sender.await??;
    client.disconnect().await?;
    // Let the disconnect go out.
    while let Ok(event) = eventloop.poll().await {
        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(done)
}
