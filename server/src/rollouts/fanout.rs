//! Publishing what rollouts decided, after the decision is durable and answered.
//!
//! A step (a new rollout's first wave, the next wave, a rollback) writes its rollout to
//! the database and its desired documents to disk, under the desired lock, and then only
//! queues what MQTT must carry. This task publishes the queue in order, so an HTTP request
//! (and the lock) never waits on a wave of thousands of retained QoS 1 publishes.
//!
//! A queued desired document is read from the store when it is published, not when it was
//! queued: every commit queues its devices after it, so the last publish of a device is
//! always its newest document, whoever else (a reconnect, a returning device) queued it.
//! What is queued but not yet out when the server stops is on disk, and the republish after
//! the next MQTT session carries it.

use std::time::Instant;

use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::create::{LOG_WAVES_FROM, RolloutService};
use crate::link::PublishError;

/// Desired documents read from the store per lock.
const READ_BATCH: usize = 256;

/// One message to publish.
#[derive(Debug)]
pub enum Outbound {
    /// The device's current desired document (retained).
    Desired(DeviceId),
    /// A one-off command (a signed rollback order).
    Command(DeviceId, Command),
}

/// Where steps queue their messages.
pub type Queue = mpsc::UnboundedSender<Vec<Outbound>>;

/// The receiving end, handed to [`RolloutService::run_fanout`].
#[derive(Debug)]
pub struct FanOut {
    queue: mpsc::UnboundedReceiver<Vec<Outbound>>,
}

/// A new queue and its receiving end.
pub fn channel() -> (Queue, FanOut) {
    let (tx, queue) = mpsc::unbounded_channel();
    (tx, FanOut { queue })
}

impl RolloutService {
    /// Publishes queued messages in order until cancelled. Only a link that is gone for
    /// good (the MQTT task ended) stops it with an error.
    pub async fn run_fanout(
        &self,
        mut fanout: FanOut,
        cancel: CancellationToken,
    ) -> Result<(), PublishError> {
        loop {
            let batch = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                batch = fanout.queue.recv() => match batch {
                    Some(batch) => batch,
                    None => return Ok(()),
                },
            };
            let started = Instant::now();
            let count = batch.len();
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                published = self.publish(batch) => published?,
            }
            if count >= LOG_WAVES_FROM {
                tracing::info!(
                    count,
                    took_ms = started.elapsed().as_millis(),
                    "desired documents and commands published"
                );
            }
        }
    }

    async fn publish(&self, batch: Vec<Outbound>) -> Result<(), PublishError> {
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            // Read a run of documents under the lock, publish them without it.
            let mut ready = Vec::with_capacity(READ_BATCH);
            {
                let desired = self.desired.lock().await;
                while ready.len() < READ_BATCH {
                    let Some(next) = batch.next() else { break };
                    match next {
                        Outbound::Desired(device) => {
                            if let Some(doc) = desired.get(&device) {
                                ready.push(Ready::Desired(device, doc.clone()));
                            }
                        }
                        Outbound::Command(device, command) => {
                            ready.push(Ready::Command(device, command));
                        }
                    }
                }
            }
            for message in ready {
                let (device, sent) = match message {
                    Ready::Desired(device, doc) => {
                        let sent = self.publisher.publish_desired(&device, &doc).await;
                        if sent.is_ok() {
                            tracing::debug!(%device, generation = doc.generation, "desired state published");
                        }
                        (device, sent)
                    }
                    Ready::Command(device, command) => {
                        let sent = self.publisher.publish_command(&device, &command).await;
                        if sent.is_ok() {
                            tracing::info!(%device, command = %command.command_id, "command published");
                        }
                        (device, sent)
                    }
                };
                match sent {
                    Ok(()) => {}
                    Err(err @ PublishError::LinkGone(_)) => return Err(err),
                    // Sizes were checked when the rollout was made; one bad message must
                    // not hold up the rest of the wave.
                    Err(err) => tracing::error!(%device, error = %err, "message not published"),
                }
            }
        }
        Ok(())
    }
}

enum Ready {
    Desired(DeviceId, botfleet_protocol::messages::Desired),
    Command(DeviceId, Command),
}
