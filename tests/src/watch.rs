//! Watches a device's rollout events over MQTT, as an operator's tool would.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use botfleet_protocol::messages::Event;
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// Events of one device, in arrival order.
pub struct EventWatch {
    rx: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
    pub seen: Vec<Event>,
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Client options for `mqtt_url` (`mqtt://host:port`) with the protocol's packet cap.
pub fn mqtt_options(mqtt_url: &str, client_id: impl Into<String>) -> Result<MqttOptions> {
    let url = reqwest::Url::parse(mqtt_url)?;
    let host = url.host_str().context("broker host")?.to_owned();
    let mut options = MqttOptions::new(client_id, host, url.port().unwrap_or(1883));
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    Ok(options)
}

impl EventWatch {
    /// Connects, subscribes to the device's events and waits for the SUBACK.
    pub async fn subscribe(mqtt_url: &str, prefix: &str, device: &str) -> Result<Self> {
        let topics = Topics::new(prefix)?;
        let topic = topics.device(&DeviceId::new(device)?, TopicKind::Events);
        let options = mqtt_options(mqtt_url, format!("watch-{device}"))?;
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        client.subscribe(topic, QoS::AtLeastOnce).await?;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await? {
                    MqttEvent::Incoming(Packet::SubAck(_)) => return Ok::<(), anyhow::Error>(()),
                    _ => continue,
                }
            }
        })
        .await
        .context("no SUBACK within 10 s")??;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = eventloop.poll().await {
                if let MqttEvent::Incoming(Packet::Publish(p)) = event
                    && let Ok(e) = serde_json::from_slice::<Event>(&p.payload)
                    && tx.send(e).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            rx,
            task,
            seen: Vec::new(),
        })
    }

    /// Waits for the terminal event (active, rejected or failed) of `rollout_id`; returns
    /// every event of that rollout in order.
    pub async fn until_terminal(
        &mut self,
        rollout_id: &str,
        limit: Duration,
    ) -> Result<Vec<Event>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("event stream ended"),
                Err(_) => bail!(
                    "no terminal event for {rollout_id} within {limit:?}; saw: {}",
                    crate::describe(&self.seen)
                ),
            };
            let done = event.stage.is_terminal()
                && event
                    .rollout_id
                    .as_ref()
                    .is_some_and(|r| r.as_str() == rollout_id);
            self.seen.push(event);
            if done {
                return Ok(self
                    .seen
                    .iter()
                    .filter(|e| {
                        e.rollout_id
                            .as_ref()
                            .is_some_and(|r| r.as_str() == rollout_id)
                    })
                    .cloned()
                    .collect());
            }
        }
    }
}

impl EventWatch {
    /// Waits for the first event (from now on) that `wanted` accepts; events that belong to
    /// no rollout (a refused command) are only seen this way.
    pub async fn until_event(
        &mut self,
        limit: Duration,
        mut wanted: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("event stream ended"),
                Err(_) => bail!(
                    "no such event within {limit:?}; saw: {}",
                    crate::describe(&self.seen)
                ),
            };
            self.seen.push(event.clone());
            if wanted(&event) {
                return Ok(event);
            }
        }
    }
}

/// Publishes one message as a separate client and waits for the broker's PUBACK:
/// what an attacker (or a buggy tool) with broker access could send.
pub async fn publish_once(
    mqtt_url: &str,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
) -> Result<()> {
    let options = mqtt_options(mqtt_url, format!("publisher-{:08x}", rand::random::<u32>()))?;
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let MqttEvent::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
                return Ok::<(), anyhow::Error>(());
            }
        }
    })
    .await
    .context("no PUBACK within 10 s")??;
    let _ = client.disconnect().await;
    Ok(())
}

/// A device's retained status as the broker delivers it.
pub struct StatusWatch {
    rx: mpsc::UnboundedReceiver<botfleet_protocol::messages::Status>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StatusWatch {
    pub async fn subscribe(mqtt_url: &str, prefix: &str, device: &str) -> Result<Self> {
        let topic = Topics::new(prefix)?.device(&DeviceId::new(device)?, TopicKind::Status);
        let options = mqtt_options(
            mqtt_url,
            format!("status-{device}-{:08x}", rand::random::<u32>()),
        )?;
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        client.subscribe(topic, QoS::AtLeastOnce).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = eventloop.poll().await {
                if let MqttEvent::Incoming(Packet::Publish(p)) = event
                    && let Ok(s) = serde_json::from_slice(&p.payload)
                    && tx.send(s).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self { rx, task })
    }

    /// Waits for a status that satisfies `want`.
    pub async fn until(
        &mut self,
        want: impl Fn(&botfleet_protocol::messages::Status) -> bool,
        limit: Duration,
    ) -> Result<botfleet_protocol::messages::Status> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = None;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(status)) if want(&status) => return Ok(status),
                Ok(Some(status)) => last = Some(status),
                Ok(None) => bail!("status stream ended"),
                Err(_) => bail!("no matching status within {limit:?}; last: {last:?}"),
            }
        }
    }
}
