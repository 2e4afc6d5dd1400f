//! The MQTT session. One task owns the connection; everything else talks to it through
//! [`Publisher`] (outgoing) and the channels in [`Incoming`].

use std::time::{Duration, Instant};

use botfleet_protocol::messages::{Command, Desired, Event, Info, Status, Telemetry};
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::store::Store;

/// A connection that stays up this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Requests queued towards the broker while it is unreachable.
const REQUEST_QUEUE: usize = 256;

/// Sends typed messages on this device's topics.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
    device: DeviceId,
}

impl Publisher {
    fn send<T: Serialize>(&self, kind: TopicKind, message: &T) {
        let payload = match serde_json::to_vec(message) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, topic = kind.as_str(), "cannot serialise message");
                return;
            }
        };
        let qos = if kind.at_least_once() {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let topic = self.topics.device(&self.device, kind);
        // Never blocks: while the broker is away requests queue up to REQUEST_QUEUE,
        // beyond that they are dropped and counted in the log.
        if let Err(e) = self
            .client
            .try_publish(topic, qos, kind.retained(), payload)
        {
            warn!(error = %e, topic = kind.as_str(), "link backlog full; message dropped");
        }
    }

    pub fn event(&self, event: &Event) {
        self.send(TopicKind::Events, event);
    }

    pub fn status(&self, status: &Status) {
        self.send(TopicKind::Status, status);
    }

    pub fn info(&self, info: &Info) {
        self.send(TopicKind::Info, info);
    }

    pub fn telemetry(&self, telemetry: &Telemetry) {
        self.send(TopicKind::Telemetry, telemetry);
    }
}

/// What arrives from the server.
#[derive(Debug)]
pub struct Incoming {
    /// The newest desired state (retained; `None` until one arrives).
    pub desired: watch::Receiver<Option<Desired>>,
    pub commands: mpsc::Receiver<Command>,
    /// Ticks on every (re)connection, so state gets published again.
    pub connected: watch::Receiver<u64>,
}

/// The MQTT session task and its handles.
pub struct Link {
    eventloop: EventLoop,
    client: AsyncClient,
    topics: Topics,
    device: DeviceId,
    backoff: Backoff,
    desired_tx: watch::Sender<Option<Desired>>,
    commands_tx: mpsc::Sender<Command>,
    connected_tx: watch::Sender<u64>,
    /// The retained status published on a clean stop (the broker sends the will otherwise).
    offline: Vec<u8>,
    /// Where a received desired state is kept before it is acknowledged.
    store: Store,
}

/// Builds the session. Nothing connects until [`Link::run`] polls.
/// `last_desired` is the desired state persisted by an earlier run: the reconciler starts
/// from it before (or without) any broker.
pub fn new(
    settings: &Settings,
    will: &Status,
    last_desired: Option<Desired>,
    store: Store,
) -> (Link, Publisher, Incoming) {
    let offline = serde_json::to_vec(will).unwrap_or_default();
    let mut options = MqttOptions::new(
        settings.device_id.as_str(),
        settings.broker.host.clone(),
        settings.broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(settings.config.mqtt.keep_alive_s))
        // Persistent session: QoS 1 messages for us are kept by the broker while we are away.
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_last_will(LastWill::new(
            settings
                .topics
                .device(&settings.device_id, TopicKind::Status),
            offline.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let (desired_tx, desired) = watch::channel(last_desired);
    let (commands_tx, commands) = mpsc::channel(16);
    let (connected_tx, connected) = watch::channel(0);
    let publisher = Publisher {
        client: client.clone(),
        topics: settings.topics.clone(),
        device: settings.device_id.clone(),
    };
    let link = Link {
        eventloop,
        client,
        topics: settings.topics.clone(),
        device: settings.device_id.clone(),
        backoff: Backoff::new(
            Duration::from_millis(settings.config.mqtt.backoff_initial_ms),
            Duration::from_millis(settings.config.mqtt.backoff_max_ms),
        ),
        desired_tx,
        commands_tx,
        connected_tx,
        offline,
        store,
    };
    (
        link,
        publisher,
        Incoming {
            desired,
            commands,
            connected,
        },
    )
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Polls the connection until `cancel`; reconnects with backoff; never gives up.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut connected_at: Option<Instant> = None;
        loop {
            let polled = tokio::select! {
                () = cancel.cancelled() => break,
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    info!(session_present = ack.session_present, "connected to broker");
                    connected_at = Some(Instant::now());
                    self.subscribe();
                    self.connected_tx.send_modify(|n| *n += 1);
                }
                Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                    self.dispatch(&publish.topic, &publish.payload);
                    // Acknowledged only now: a desired state is on disk before the broker
                    // forgets it, so a crash in between gets it redelivered.
                    if let Err(e) = self.client.try_ack(&publish) {
                        warn!(error = %e, "cannot queue the acknowledgement");
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    if connected_at
                        .take()
                        .is_some_and(|at| at.elapsed() >= STABLE_AFTER)
                    {
                        self.backoff.reset();
                    }
                    let delay = self.backoff.next_delay();
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // A clean DISCONNECT suppresses the will, so mark ourselves offline first.
        let status = self.topics.device(&self.device, TopicKind::Status);
        let _ = self
            .client
            .try_publish(status, QoS::AtLeastOnce, true, self.offline.clone());
        let _ = self.client.try_disconnect();
        let drain = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = self.eventloop.poll().await {
                if matches!(event, MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        });
        let _ = drain.await;
    }

    /// Subscribes on every connection: after a clean-session reconnect the broker has
    /// forgotten our subscriptions, and subscribing again is harmless otherwise.
    fn subscribe(&self) {
        for kind in [TopicKind::Desired, TopicKind::Commands] {
            let topic = self.topics.device(&self.device, kind);
            if let Err(e) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                warn!(error = %e, "cannot queue subscription");
            }
        }
    }

    fn dispatch(&self, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = self.topics.parse(topic) else {
            warn!(topic, "message on a foreign topic ignored");
            return;
        };
        if device != self.device {
            warn!(topic, "message for another device ignored");
            return;
        }
        match kind {
            TopicKind::Desired if payload.is_empty() => {
                // A deleted retained message is not "uninstall everything".
                debug!("empty desired state ignored");
            }
            TopicKind::Desired => match serde_json::from_slice::<Desired>(payload) {
                Ok(desired) => {
                    let newer = self.desired_tx.borrow().as_ref().is_none_or(|current| {
                        desired.generation > current.generation || desired != *current
                    });
                    if newer {
                        info!(generation = desired.generation, "desired state received");
                        if let Err(e) = self.store.save_desired(&desired) {
                            warn!(error = %e, "cannot keep the desired state for the next start");
                        }
                        self.desired_tx.send_replace(Some(desired));
                    }
                }
                Err(e) => warn!(error = %e, "malformed desired state ignored"),
            },
            TopicKind::Commands => match serde_json::from_slice::<Command>(payload) {
                Ok(command) => {
                    if self.commands_tx.try_send(command).is_err() {
                        warn!("command queue full; command dropped");
                    }
                }
                Err(e) => warn!(error = %e, "malformed command ignored"),
            },
            other => debug!(
                topic = other.as_str(),
                "message on an agent-owned topic ignored"
            ),
        }
    }
}
