//! The server's MQTT session: one task owns the rumqttc event loop; everything else
//! publishes through a cheap [`Publisher`] handle and never sees rumqttc.
//!
//! - MQTT 3.1.1, stable client id, clean session off, explicit packet size cap.
//! - Connection errors: full-jitter exponential backoff (1 s doubling to 30 s); rumqttc has
//!   none of its own.
//! - Every CONNACK: subscribe (QoS 1) to status, info, telemetry and events of every device.
//!   The first SUBACK makes the link [`LinkState::Ready`]; a refused subscription is fatal.
//! - Incoming messages are decoded (`inbound`) and folded into the [`Fleet`]; anything
//!   malformed or foreign is logged and dropped.

use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::messages::Desired;
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use jiff::Timestamp;
use rand::Rng as _;
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use rumqttc::{SubscribeFilter, SubscribeReasonCode};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::inbound::decode;

const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Requests (publishes, subscribes) queued for the event loop.
const REQUEST_CAPACITY: usize = 256;
/// Topic kinds the server listens to.
const INBOUND: [TopicKind; 4] = [
    TopicKind::Status,
    TopicKind::Info,
    TopicKind::Telemetry,
    TopicKind::Events,
];

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not (yet) subscribed; the last connection error, if any.
    Connecting { last_error: Option<String> },
    /// Connected and subscribed; `connection` counts CONNACKs since start.
    Ready { connection: u64 },
}

/// Fatal link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the broker refused the subscriptions {filters:?}")]
    SubscribeRefused { filters: Vec<String> },
}

/// Why a publish did not get queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot encode the {kind} message for {device}")]
    Encode {
        kind: &'static str,
        device: DeviceId,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the {kind} message for {device} is {size} bytes, over the {MAX_PACKET_BYTES}-byte MQTT packet limit"
    )]
    TooLarge {
        kind: &'static str,
        device: DeviceId,
        size: usize,
    },
    #[error("the MQTT link is gone")]
    LinkGone(#[source] rumqttc::ClientError),
    #[error("the MQTT fan-out has stopped (the server is shutting down)")]
    FanOutStopped,
}

/// Full-jitter exponential backoff after `failures` consecutive failures (≥ 1).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let cap = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// Publishes server → device messages.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
}

impl Publisher {
    /// Publishes `doc` as the retained desired document of `device` (QoS 1).
    pub async fn publish_desired(
        &self,
        device: &DeviceId,
        doc: &Desired,
    ) -> Result<(), PublishError> {
        let payload = encode_desired(device, doc)?;
        self.client
            .publish(
                self.topics.device(device, TopicKind::Desired),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .map_err(PublishError::LinkGone)
    }
}

impl Publisher {
    /// Publishes a one-off `command` to `device` (QoS 1, not retained).
    pub async fn publish_command(
        &self,
        device: &DeviceId,
        command: &botfleet_protocol::messages::Command,
    ) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(command).map_err(|source| PublishError::Encode {
            kind: "command",
            device: device.clone(),
            source,
        })?;
        self.client
            .publish(
                self.topics.device(device, TopicKind::Commands),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .map_err(PublishError::LinkGone)
    }
}

/// The desired document's bytes, refused when over the packet limit.
pub fn encode_desired(device: &DeviceId, doc: &Desired) -> Result<Vec<u8>, PublishError> {
    let payload = serde_json::to_vec(doc).map_err(|source| PublishError::Encode {
        kind: "desired",
        device: device.clone(),
        source,
    })?;
    // Topic and headers fit easily in the slack of 1 KiB.
    if payload.len() + 1024 > MAX_PACKET_BYTES {
        return Err(PublishError::TooLarge {
            kind: "desired",
            device: device.clone(),
            size: payload.len(),
        });
    }
    Ok(payload)
}

/// Connection settings of the link.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    /// TLS and credentials (none for the embedded broker).
    pub security: crate::tls::MqttSecurity,
}

/// The task that owns the MQTT session.
pub struct Link {
    eventloop: EventLoop,
    client: AsyncClient,
    topics: Topics,
    fleet: Arc<Fleet>,
    state: watch::Sender<LinkState>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Sets the session up; nothing connects before [`Link::run`].
    pub fn new(
        options: &LinkOptions,
        topics: Topics,
        fleet: Arc<Fleet>,
    ) -> (Self, Publisher, watch::Receiver<LinkState>) {
        let mut mqtt = MqttOptions::new(&options.client_id, &options.host, options.port);
        mqtt.set_clean_session(false)
            .set_keep_alive(options.keep_alive)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_request_channel_capacity(REQUEST_CAPACITY);
        options.security.apply(&mut mqtt);
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_CAPACITY);
        let (state, state_rx) = watch::channel(LinkState::Connecting { last_error: None });
        let publisher = Publisher {
            client: client.clone(),
            topics: topics.clone(),
        };
        let link = Self {
            eventloop,
            client,
            topics,
            fleet,
            state,
        };
        (link, publisher, state_rx)
    }

    /// Polls the session until `cancel`, then disconnects cleanly.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), LinkError> {
        let mut failures = 0u32;
        let mut connections = 0u64;
        loop {
            let polled = tokio::select! {
                () = cancel.cancelled() => break,
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    connections += 1;
                    tracing::info!(
                        session_present = ack.session_present,
                        "MQTT connected; subscribing"
                    );
                    self.subscribe();
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        return Err(LinkError::SubscribeRefused {
                            filters: self.filters().into_iter().map(|f| f.path).collect(),
                        });
                    }
                    self.state.send_replace(LinkState::Ready {
                        connection: connections,
                    });
                }
                Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                    self.handle(&publish.topic, &publish.payload);
                }
                Ok(_) => {}
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures);
                    tracing::warn!(error = %err, retry_in = ?delay, "MQTT connection failed");
                    self.state.send_replace(LinkState::Connecting {
                        last_error: Some(err.to_string()),
                    });
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.disconnect().await;
        Ok(())
    }

    fn filters(&self) -> Vec<SubscribeFilter> {
        INBOUND
            .iter()
            .map(|&kind| SubscribeFilter::new(self.topics.all_devices(kind), QoS::AtLeastOnce))
            .collect()
    }

    /// Queues the subscription without waiting: this task is the one that drains the queue.
    fn subscribe(&self) {
        if let Err(err) = self.client.try_subscribe_many(self.filters()) {
            // Only a full queue; the next reconnect subscribes again.
            tracing::error!(error = %err, "cannot queue the MQTT subscription");
        }
    }

    fn handle(&self, topic: &str, payload: &[u8]) {
        match decode(&self.topics, topic, payload) {
            Ok(Some((device, message))) => self.fleet.apply(&device, message, Timestamp::now()),
            Ok(None) => tracing::debug!(topic, "empty retained message ignored"),
            Err(err) => match std::error::Error::source(&err) {
                Some(cause) => tracing::warn!(error = %err, %cause, "MQTT message dropped"),
                None => tracing::warn!(error = %err, "MQTT message dropped"),
            },
        }
    }

    /// Sends DISCONNECT and lets the event loop flush it, briefly.
    async fn disconnect(&mut self) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let flushed = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if flushed.is_err() {
            tracing::debug!("MQTT disconnect not flushed in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_under_a_doubling_cap() {
        for failures in 1..40 {
            let cap = BACKOFF_BASE
                .saturating_mul(1 << (failures - 1).min(16))
                .min(BACKOFF_MAX);
            for _ in 0..50 {
                assert!(backoff(failures) <= cap);
            }
        }
        assert!(backoff(u32::MAX) <= BACKOFF_MAX);
    }
}
