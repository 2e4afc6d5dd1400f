//! The MQTT session. One task owns the connection; everything else talks to it through
//! [`Publisher`] (outgoing) and the channels in [`Incoming`].
//!
//! Sessions: MQTT 3.1.1 with `clean_session = false` and the device id as client id.
//! Mosquitto and rumqttd both keep such a persistent session (subscriptions and QoS 1
//! messages for us) while we are away; MQTT 5 session expiry would say the same more
//! precisely, but rumqttc's v5 client is the less mature one. When the broker answers
//! CONNACK with `session_present = false` (a broker restarted without persistence, or an
//! expired session) we subscribe again; we also do on the first connection of a process.
//!
//! Delivery: events, status and info go through the on-disk [`Outbox`] and are removed
//! only on the PUBACK of their packet. This task picks each entry's packet id itself and
//! hands the publish to rumqttc's `pending` queue, so a PUBACK maps to exactly one entry;
//! rumqttc resends unacknowledged packets itself on a resumed session, and after a lost
//! session (or an agent restart) the whole outbox is published again. Telemetry is QoS 0,
//! never in the outbox, and the first thing dropped when the request queue is full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use botfleet_protocol::messages::{Command, Desired, Event, Info, Status, Telemetry};
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS,
    Request,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, Reconnect};
use crate::config::Settings;
use crate::outbox::{EntryKind, Limits, Outbox, OutboxError};
use crate::store::Store;

/// A connection that stays up this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Requests queued towards the broker while it is unreachable.
const REQUEST_QUEUE: usize = 256;
/// Outbox entries in flight at once; also the packet ids this task hands out (1..=WINDOW),
/// below rumqttc's in-flight limit (100).
const WINDOW: u16 = 32;

fn lock(outbox: &Mutex<Outbox>) -> MutexGuard<'_, Outbox> {
    outbox.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends typed messages on this device's topics.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
    device: DeviceId,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    /// Telemetry samples dropped because the request queue was full.
    link_drops: Arc<AtomicU64>,
}

impl Publisher {
    /// Appends to the outbox (durably) and wakes the link; never blocks on the network.
    fn durable<T: Serialize>(&self, kind: EntryKind, message: &T) {
        let payload = match serde_json::to_vec(message) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, ?kind, "cannot serialise message");
                return;
            }
        };
        // The error says what happened: a too-large message is dropped (and counted), a
        // failed write (full disk) keeps the message in memory, still published.
        if let Err(e) = lock(&self.outbox).push(kind, payload) {
            warn!(error = %e, ?kind, "outbox");
        }
        self.wake.notify_one();
    }

    pub fn event(&self, event: &Event) {
        self.durable(EntryKind::Event, event);
    }

    pub fn status(&self, status: &Status) {
        self.durable(EntryKind::Status, status);
    }

    pub fn info(&self, info: &Info) {
        self.durable(EntryKind::Info, info);
    }

    /// QoS 0, best effort; carries the count of dropped messages.
    pub fn telemetry(&self, telemetry: &Telemetry) {
        let mut telemetry = telemetry.clone();
        telemetry.dropped_messages = Some(self.dropped());
        let payload = match serde_json::to_vec(&telemetry) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot serialise telemetry");
                return;
            }
        };
        let topic = self.topics.device(&self.device, TopicKind::Telemetry);
        if self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
            .is_err()
        {
            let n = self.link_drops.fetch_add(1, Ordering::Relaxed) + 1;
            debug!(dropped = n, "link backlog full; telemetry dropped");
        }
    }

    /// Messages dropped since start: outbox overflow and telemetry the link had no room for.
    pub fn dropped(&self) -> u64 {
        lock(&self.outbox).dropped() + self.link_drops.load(Ordering::Relaxed)
    }

    /// Entries waiting for the broker's acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        lock(&self.outbox).len()
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
    reconnect: Reconnect,
    desired_tx: watch::Sender<Option<Desired>>,
    commands_tx: mpsc::Sender<Command>,
    connected_tx: watch::Sender<u64>,
    /// The retained status published on a clean stop (the broker sends the will otherwise).
    offline: Vec<u8>,
    /// Where a received desired state is kept before it is acknowledged.
    store: Store,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    /// Packet id → outbox entry, for entries handed to rumqttc and not yet acknowledged.
    inflight: HashMap<u16, u64>,
}

/// Builds the session. Nothing connects until [`Link::run`] polls.
/// `last_desired` is the desired state persisted by an earlier run: the reconciler starts
/// from it before (or without) any broker.
pub fn new(
    settings: &Settings,
    will: &Status,
    last_desired: Option<Desired>,
    store: Store,
) -> Result<(Link, Publisher, Incoming), OutboxError> {
    let mqtt = &settings.config.mqtt;
    let outbox = Outbox::open(
        &store.root().join("outbox"),
        Limits {
            max_entries: mqtt.outbox_max_entries,
            max_bytes: mqtt.outbox_max_bytes,
        },
    )?;
    if !outbox.is_empty() {
        info!(
            entries = outbox.len(),
            "unacknowledged messages from an earlier run will be sent again"
        );
    }
    let outbox = Arc::new(Mutex::new(outbox));
    let offline = serde_json::to_vec(will).unwrap_or_default();
    let mut options = MqttOptions::new(
        settings.device_id.as_str(),
        settings.broker.host.clone(),
        settings.broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(mqtt.keep_alive_s))
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
    settings.mqtt_security.apply(&mut options);
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let (desired_tx, desired) = watch::channel(last_desired);
    let (commands_tx, commands) = mpsc::channel(16);
    let (connected_tx, connected) = watch::channel(0);
    let wake = Arc::new(Notify::new());
    let publisher = Publisher {
        client: client.clone(),
        topics: settings.topics.clone(),
        device: settings.device_id.clone(),
        outbox: Arc::clone(&outbox),
        wake: Arc::clone(&wake),
        link_drops: Arc::default(),
    };
    let link = Link {
        eventloop,
        client,
        topics: settings.topics.clone(),
        device: settings.device_id.clone(),
        reconnect: Reconnect::new(
            Backoff::new(
                Duration::from_millis(mqtt.backoff_initial_ms),
                Duration::from_millis(mqtt.backoff_max_ms),
            ),
            STABLE_AFTER,
        ),
        desired_tx,
        commands_tx,
        connected_tx,
        offline,
        store,
        outbox,
        wake,
        inflight: HashMap::new(),
    };
    Ok((
        link,
        publisher,
        Incoming {
            desired,
            commands,
            connected,
        },
    ))
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
        let mut connections = 0u64;
        self.hand_out();
        loop {
            let polled = tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {
                    self.hand_out();
                    continue;
                }
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    connections += 1;
                    info!(session_present = ack.session_present, "connected to broker");
                    self.reconnect.connected();
                    if !ack.session_present {
                        // rumqttc dropped what it held for the old session: send it all again.
                        self.inflight.clear();
                    }
                    if !ack.session_present || connections == 1 {
                        self.subscribe();
                    }
                    self.hand_out();
                    self.connected_tx.send_modify(|n| *n += 1);
                }
                Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = self.inflight.remove(&ack.pkid) {
                        lock(&self.outbox).remove(seq);
                        self.hand_out();
                    }
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
                    let delay = self.reconnect.lost();
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.stop().await;
    }

    /// Hands outbox entries that are not yet with rumqttc to its `pending` queue, each
    /// under a free packet id, oldest first, at most [`WINDOW`] at a time.
    fn hand_out(&mut self) {
        let outbox = lock(&self.outbox);
        // A packet id stays taken until its PUBACK, even when its entry was compacted away
        // meanwhile: rumqttc still holds that packet.
        let handed: std::collections::HashSet<u64> = self.inflight.values().copied().collect();
        let free: Vec<u16> = (1..=WINDOW)
            .filter(|id| !self.inflight.contains_key(id))
            .collect();
        let mut free = free.into_iter();
        for entry in outbox.entries().filter(|e| !handed.contains(&e.seq)) {
            let Some(pkid) = free.next() else { break };
            let (kind, retain) = match entry.kind {
                EntryKind::Event => (TopicKind::Events, false),
                EntryKind::Status => (TopicKind::Status, true),
                EntryKind::Info => (TopicKind::Info, true),
            };
            let mut publish = Publish::new(
                self.topics.device(&self.device, kind),
                QoS::AtLeastOnce,
                entry.payload.clone(),
            );
            publish.retain = retain;
            publish.pkid = pkid;
            self.eventloop.pending.push_back(Request::Publish(publish));
            self.inflight.insert(pkid, entry.seq);
        }
    }

    /// A clean stop: mark ourselves offline (a clean DISCONNECT suppresses the will),
    /// disconnect, and give the broker a moment to take both.
    async fn stop(&mut self) {
        let status = self.topics.device(&self.device, TopicKind::Status);
        let mut offline = Publish::new(status, QoS::AtLeastOnce, self.offline.clone());
        offline.retain = true;
        offline.pkid = WINDOW + 1;
        self.eventloop.pending.push_back(Request::Publish(offline));
        let _ = self.client.try_disconnect();
        let drain = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = self.eventloop.poll().await {
                match event {
                    MqttEvent::Incoming(Packet::PubAck(ack)) => {
                        if let Some(seq) = self.inflight.remove(&ack.pkid) {
                            lock(&self.outbox).remove(seq);
                        }
                    }
                    MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                    _ => {}
                }
            }
        });
        let _ = drain.await;
    }

    /// Subscribes (QoS 1) to this device's desired state and commands.
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
                // A deleted retained message (or a broker that lost it) is not "uninstall
                // everything": the persisted desired state stays.
                info!("empty desired state ignored; keeping the last one");
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
