//! The server's in-memory picture of the fleet: devices and rollouts, fed by the MQTT link,
//! read by the HTTP API. Each part sits behind its own short-held lock.

use std::sync::{Mutex, MutexGuard, PoisonError};

use botfleet_protocol::DeviceId;
use jiff::Timestamp;

use crate::devices::Devices;
use crate::inbound::Inbound;
use crate::rollouts::{Applied, Rollouts};

/// Devices and rollouts.
#[derive(Debug, Default)]
pub struct Fleet {
    devices: Mutex<Devices>,
    rollouts: Mutex<Rollouts>,
}

/// Locks `m`; a panic elsewhere while holding it leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// A fleet picture starting from rollouts loaded from the database.
    pub fn with_rollouts(rollouts: Rollouts) -> Self {
        Self {
            devices: Mutex::default(),
            rollouts: Mutex::new(rollouts),
        }
    }

    pub fn devices(&self) -> MutexGuard<'_, Devices> {
        lock(&self.devices)
    }

    pub fn rollouts(&self) -> MutexGuard<'_, Rollouts> {
        lock(&self.rollouts)
    }

    /// Folds one message from `device` in.
    pub fn apply(&self, device: &DeviceId, message: Inbound, now: Timestamp) {
        match message {
            Inbound::Status(status) => {
                self.rollouts().observe_status(device, &status);
                self.devices().apply_status(device, status, now);
            }
            Inbound::Info(info) => self.devices().apply_info(device, info, now),
            Inbound::Telemetry(t) => self.devices().apply_telemetry(device, *t, now),
            Inbound::Event(event) => {
                self.devices().touch(device, now);
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
    }
}
