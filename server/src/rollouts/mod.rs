//! Rollouts: which model goes to which devices, and how each device is doing.
//!
//! [`Rollouts`] is pure state (no I/O): the rollout records, their event folds and the
//! idempotency keys of the requests that made them. It lives in memory behind this one
//! struct, so it can move to a database without touching its callers.
//! [`create::RolloutService`] does the I/O: desired documents on disk and over MQTT.

pub mod create;
mod fold;
mod selector;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::Event;
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use fold::{DeviceProgress, Outcome, ProgressView};
pub use selector::{Selector, SelectorError};

/// The body of `POST /api/v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub slot: SlotName,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// Whom a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    Devices(BTreeSet<DeviceId>),
    Selector(Selector),
}

/// Why a request names no valid target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("pass exactly one of `devices` and `selector`, not both")]
    Both,
    #[error("pass one of `devices` (a list of device ids) or `selector` (\"key=value,...\")")]
    Neither,
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

impl RolloutRequest {
    pub fn targets(&self) -> Result<Targets, TargetError> {
        match (&self.devices, &self.selector) {
            (Some(_), Some(_)) => Err(TargetError::Both),
            (None, None) => Err(TargetError::Neither),
            (Some(devices), None) => Ok(Targets::Devices(devices.iter().cloned().collect())),
            (None, Some(selector)) => Ok(Targets::Selector(selector.parse()?)),
        }
    }
}

/// The answer to a rollout request (the same again for a replayed idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreatedRollout {
    pub rollout_id: RolloutId,
    pub devices: Vec<DeviceId>,
}

/// An `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why an idempotency key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct IdempotencyKeyError;

impl IdempotencyKey {
    pub fn new(value: &str) -> Result<Self, IdempotencyKeyError> {
        let ok = (1..=255).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdempotencyKeyError)
        }
    }
}

/// What a retried request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The key is new (or absent): do the work.
    Fresh,
    /// Same key, same request: answer what was answered then, do nothing again.
    Same(CreatedRollout),
    /// Same key, another request: refuse.
    Conflict,
}

/// Whole-rollout state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    InProgress,
    /// Every device reached a terminal outcome.
    Completed,
}

/// Devices per outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pending: usize,
    pub in_progress: usize,
    pub active: usize,
    pub rejected: usize,
    pub failed: usize,
}

/// A rollout as the API shows it; the list leaves `devices` out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub rollout_id: RolloutId,
    pub slot: SlotName,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub created_at: Timestamp,
    pub state: RolloutState,
    pub summary: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<BTreeMap<DeviceId, ProgressView>>,
}

/// The model a rollout ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutModel {
    pub slot: SlotName,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
}

/// One rollout and the progress of each of its devices.
#[derive(Debug, Clone)]
pub struct Rollout {
    id: RolloutId,
    model: RolloutModel,
    created_at: Timestamp,
    devices: BTreeMap<DeviceId, DeviceProgress>,
}

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Recorded,
    Duplicate,
    /// The event names no rollout, or one this server does not know.
    UnknownRollout,
    /// The device is not a target of the rollout it names.
    NotTargeted,
    /// The event is about another artifact than the rollout's.
    OtherArtifact,
}

impl Rollout {
    pub fn new(
        id: RolloutId,
        model: RolloutModel,
        created_at: Timestamp,
        devices: impl IntoIterator<Item = DeviceId>,
    ) -> Self {
        Self {
            id,
            model,
            created_at,
            devices: devices
                .into_iter()
                .map(|d| (d, DeviceProgress::default()))
                .collect(),
        }
    }

    fn apply(&mut self, event: &Event) -> Applied {
        if event.sha256 != self.model.sha256 || event.slot != self.model.slot {
            return Applied::OtherArtifact;
        }
        let Some(progress) = self.devices.get_mut(&event.device) else {
            return Applied::NotTargeted;
        };
        if progress.apply(event.at, &event.stage) {
            Applied::Recorded
        } else {
            Applied::Duplicate
        }
    }

    fn view(&self, with_devices: bool) -> RolloutView {
        let mut summary = Summary::default();
        for progress in self.devices.values() {
            match progress.outcome() {
                Outcome::Pending => summary.pending += 1,
                Outcome::InProgress => summary.in_progress += 1,
                Outcome::Active => summary.active += 1,
                Outcome::Rejected => summary.rejected += 1,
                Outcome::Failed => summary.failed += 1,
            }
        }
        let done = self.devices.values().all(|p| p.outcome().is_terminal());
        RolloutView {
            rollout_id: self.id.clone(),
            slot: self.model.slot.clone(),
            version: self.model.version.clone(),
            release: self.model.release,
            sha256: self.model.sha256,
            created_at: self.created_at,
            state: if done {
                RolloutState::Completed
            } else {
                RolloutState::InProgress
            },
            summary,
            devices: with_devices.then(|| {
                self.devices
                    .iter()
                    .map(|(id, p)| (id.clone(), p.view()))
                    .collect()
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Remembered {
    request: RolloutRequest,
    response: CreatedRollout,
}

/// Every rollout, and the idempotency keys that made them.
#[derive(Debug, Default)]
pub struct Rollouts {
    by_id: BTreeMap<RolloutId, Rollout>,
    by_key: HashMap<IdempotencyKey, Remembered>,
}

impl Rollouts {
    /// What a request with `key` should get.
    pub fn replay(&self, key: &IdempotencyKey, request: &RolloutRequest) -> Replay {
        match self.by_key.get(key) {
            None => Replay::Fresh,
            Some(seen) if &seen.request == request => Replay::Same(seen.response.clone()),
            Some(_) => Replay::Conflict,
        }
    }

    /// Records a new rollout.
    pub fn insert(&mut self, rollout: Rollout) {
        self.by_id.insert(rollout.id.clone(), rollout);
    }

    /// Remembers that `key` and `request` made the rollout answered by `response`.
    pub fn remember(
        &mut self,
        key: IdempotencyKey,
        request: RolloutRequest,
        response: &CreatedRollout,
    ) {
        self.by_key.insert(
            key,
            Remembered {
                request,
                response: response.clone(),
            },
        );
    }

    /// Folds one event into the rollout it names.
    pub fn apply(&mut self, event: &Event) -> Applied {
        match event
            .rollout_id
            .as_ref()
            .and_then(|id| self.by_id.get_mut(id))
        {
            Some(rollout) => rollout.apply(event),
            None => Applied::UnknownRollout,
        }
    }

    pub fn get(&self, id: &RolloutId) -> Option<RolloutView> {
        self.by_id.get(id).map(|r| r.view(true))
    }

    /// All rollouts, oldest first, without per-device detail.
    pub fn list(&self) -> Vec<RolloutView> {
        let mut all: Vec<_> = self.by_id.values().map(|r| r.view(false)).collect();
        all.sort_by_key(|v| v.created_at);
        all
    }
}

#[cfg(test)]
mod tests;
