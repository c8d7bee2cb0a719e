//! A fast MQTT publisher for floods: a minimal rumqttc client that publishes a list of
//! messages as fast as the broker takes them and returns only once the broker has them
//! all.
//!
//! `mosquitto_pub -l` cannot serve at QoS 1: at the end of its input it disconnects
//! while messages still wait in its queue, and Mosquitto drops them (it logs the client
//! as "disconnected due to out of memory"). paho-mqtt's packet ids wrap at 65,535
//! outstanding messages, which a flood reaches.

use std::error::Error;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Unacknowledged messages the publisher keeps in flight at QoS 1.
const IN_FLIGHT: u16 = 100;

/// What can stop a flood: the broker went away, or a request was refused.
pub type FloodError = Box<dyn Error + Send + Sync>;

/// Publishes every (topic, payload) of `messages`, in order, at `qos` (0 or 1) to the
/// broker on 127.0.0.1:`port` as client `client_id`. Returns the number of messages the
/// broker acknowledged (QoS 1) or that were written out (QoS 0), once that is all of
/// them.
pub async fn flood(
    port: u16,
    client_id: &str,
    messages: Vec<(String, String)>,
    qos: u8,
) -> Result<u64, FloodError> {
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => return Err(format!("a flood is sent at QoS 0 or 1, not {other}").into()),
    };
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(IN_FLIGHT)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    eventloop.network_options.set_tcp_nodelay(true);
    let total = messages.len() as u64;
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client.publish(topic, qos, false, payload).await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut done = 0u64;
    while done < total {
        match eventloop
            .poll()
            .await
            .map_err(|e| format!("the flood publisher lost the broker: {e}"))?
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
