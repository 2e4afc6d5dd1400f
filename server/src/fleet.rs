//! The server's in-memory picture of the fleet: devices and rollouts, fed by the MQTT link,
//! read by the HTTP API. Each part sits behind its own short-held lock.
//!
//! Changed devices are written to the database in batches ([`Fleet::run_device_writer`],
//! every [`DEVICE_WRITE_EVERY`]): a busy fleet sends telemetry all the time, and one commit
//! per message would spend the disk on fsyncs. An operator's label change is written before
//! its answer ([`Fleet::save_devices`]), together with whatever else was pending.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use botfleet_protocol::DeviceId;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::changes::{Change, Changes};
use crate::channels::Channels;
use crate::db::{Db, DbError};
use crate::devices::{DeviceView, Devices, LabelChange, LabelChangeError};
use crate::history::History;
use crate::inbound::Inbound;
use crate::rollouts::{Applied, Rollouts};

/// How often changed devices are written to the database.
pub const DEVICE_WRITE_EVERY: Duration = Duration::from_millis(250);

/// Why an operator's label change (or a device write) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Refused(#[from] LabelChangeError),
    #[error("the devices cannot be stored")]
    Store(#[source] DbError),
    #[error("a database task failed: {0}")]
    Task(String),
}

/// Devices and rollouts.
#[derive(Debug)]
pub struct Fleet {
    devices: Mutex<Devices>,
    rollouts: Mutex<Rollouts>,
    /// Channels, and the devices that may have to follow one now.
    channels: Mutex<Channels>,
    /// Recent telemetry per device, for the dashboard's plots.
    history: Mutex<History>,
    /// Notices for live views (the dashboard's event stream).
    pub changes: Changes,
    db: Arc<Db>,
    /// Devices that just came online (offline or unknown before): the server checks that
    /// their desired document still reaches them.
    returned: tokio::sync::broadcast::Sender<DeviceId>,
    /// Held while dirty devices are taken and written, so an older batch never lands after a
    /// newer one.
    writing: tokio::sync::Mutex<()>,
}

/// Returned devices a slow reader may fall behind by.
const RETURNED_BACKLOG: usize = 1024;

/// Locks `m`; a panic elsewhere while holding it leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// A fleet picture starting from what the database held.
    pub fn restore(rollouts: Rollouts, devices: Devices, channels: Channels, db: Arc<Db>) -> Self {
        Self {
            devices: Mutex::new(devices),
            rollouts: Mutex::new(rollouts),
            channels: Mutex::new(channels),
            history: Mutex::default(),
            changes: Changes::default(),
            db,
            returned: tokio::sync::broadcast::channel(RETURNED_BACKLOG).0,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Devices as they come online. A reader that falls behind (a whole fleet reconnecting
    /// at once) misses some: the republish after the server's own reconnect covers those.
    pub fn returned(&self) -> tokio::sync::broadcast::Receiver<DeviceId> {
        self.returned.subscribe()
    }

    pub fn devices(&self) -> MutexGuard<'_, Devices> {
        lock(&self.devices)
    }

    pub fn rollouts(&self) -> MutexGuard<'_, Rollouts> {
        lock(&self.rollouts)
    }

    pub fn channels(&self) -> MutexGuard<'_, Channels> {
        lock(&self.channels)
    }

    pub fn history(&self) -> MutexGuard<'_, History> {
        lock(&self.history)
    }

    /// Folds one message from `device` in.
    pub fn apply(&self, device: &DeviceId, message: Inbound, now: Timestamp) {
        // Events reach live views when the rollout they change is saved (and a benchmark
        // at once: it changes the device view too).
        let mut device_changed = !matches!(message, Inbound::Event(_));
        match message {
            Inbound::Status(status) => {
                self.rollouts().observe_status(device, &status);
                if self.devices().apply_status(device, *status, now) {
                    let _ = self.returned.send(device.clone());
                }
            }
            Inbound::Info(info) => {
                self.devices().apply_info(device, *info, now);
                // Its labels may have changed: it may follow another channel now.
                self.channels().touch(device);
            }
            Inbound::Telemetry(t) => {
                self.history().record(device, &t, now);
                self.devices().apply_telemetry(device, *t, now);
            }
            Inbound::Event(event) => {
                device_changed = self.devices().apply_event(device, &event, now);
                let applied = self.rollouts().apply(&event);
                let rollout = event.rollout_id.as_ref().map(|r| r.as_str()).unwrap_or("-");
                match applied {
                    Applied::Recorded => tracing::info!(
                        %device, rollout, slot = %event.slot, stage = event.stage.name(),
                        "rollout event"
                    ),
                    Applied::Duplicate => {
                        tracing::debug!(%device, rollout, stage = event.stage.name(), "duplicate event")
                    }
                    other => tracing::info!(
                        %device, rollout, stage = event.stage.name(), why = ?other,
                        "event not part of a known rollout; ignored"
                    ),
                }
            }
        }
        if device_changed {
            self.changes.notify(Change::Device { id: device.clone() });
        }
    }

    /// Writes every changed device to the database; durable when this returns.
    pub async fn save_devices(&self) -> Result<usize, LabelError> {
        let _writing = self.writing.lock().await;
        let batch = self.devices().take_dirty();
        if batch.is_empty() {
            return Ok(0);
        }
        let db = self.db.clone();
        let (result, batch) = tokio::task::spawn_blocking(move || (db.save_devices(&batch), batch))
            .await
            .map_err(|e| LabelError::Task(e.to_string()))?;
        match result {
            Ok(()) => Ok(batch.len()),
            Err(err) => {
                // Written next time; nothing is lost while the server runs.
                self.devices()
                    .mark_dirty(batch.into_iter().map(|d| d.device_id));
                Err(LabelError::Store(err))
            }
        }
    }

    /// Changes a device's operator labels and stores them before answering.
    pub async fn change_labels(
        &self,
        id: &DeviceId,
        change: LabelChange,
    ) -> Result<DeviceView, LabelError> {
        let view = self.devices().change_labels(id, change)?;
        self.channels().touch(id);
        self.changes.notify(Change::Device { id: id.clone() });
        self.save_devices().await?;
        tracing::info!(device = %id, labels = ?view.operator_labels, "operator labels set");
        Ok(view)
    }

    /// Writes changed devices every [`DEVICE_WRITE_EVERY`] until cancelled, then once more.
    pub async fn run_device_writer(&self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(DEVICE_WRITE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                () = cancel.cancelled() => true,
                _ = tick.tick() => false,
            };
            let pending = stop || self.devices().is_dirty();
            if pending && let Err(err) = self.save_devices().await {
                tracing::error!(error = %err, "devices not written to the database; retrying");
            }
            if stop {
                return;
            }
        }
    }
}
