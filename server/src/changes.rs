//! "Something changed" notices for live views: a rollout was saved, a device reported.
//!
//! The notices are small on purpose: they carry ids, never state. A dashboard that gets
//! one fetches the JSON it shows again, so a missed notice (a slow reader, a restart)
//! costs a refetch, never a wrong picture.

use botfleet_protocol::{DeviceId, RolloutId};
use serde::Serialize;
use tokio::sync::broadcast;

/// How many notices a slow reader may fall behind before it is told to refetch everything.
const BACKLOG: usize = 1024;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A rollout's state or a device's progress in it changed.
    Rollout { id: RolloutId },
    /// A device's status, info or telemetry arrived.
    Device { id: DeviceId },
}

/// The sending side; cheap to share, sending never waits.
#[derive(Debug, Clone)]
pub struct Changes {
    tx: broadcast::Sender<Change>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Changes {
    /// Tells every current reader; with no reader the notice is dropped, which is fine.
    pub fn notify(&self, change: Change) {
        let _ = self.tx.send(change);
    }

    /// Rollouts that were just saved.
    pub fn rollouts<'a>(&self, ids: impl IntoIterator<Item = &'a RolloutId>) {
        for id in ids {
            self.notify(Change::Rollout { id: id.clone() });
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }
}
