//! Rollouts: which model goes to which devices, and how each device is doing.
//!
//! - `strategy`: waves (stable hashing of device ids), bake time, thresholds, deadline, gate.
//! - `machine`: one rollout as a pure state machine (`step`, pause/resume/abort/roll back).
//! - `fold`: one device's events folded into its progress, whatever the delivery order.
//! - `gate`: the fleet latency gate, each engine's p99s against the same engine's.
//! - `book` ([`Rollouts`]): every rollout and idempotency key, in memory; changed records
//!   are marked dirty so the caller writes them to the database (`crate::db`).
//! - `create` ([`create::RolloutService`]), `operate` and `driver`: the I/O — desired
//!   documents on disk and over MQTT, rollback commands, the database, and the clock that
//!   drives waves and deadlines.
//! - `fanout`: publishes what a step decided, after it is durable, on its own task.

mod book;
pub mod create;
mod driver;
pub mod fanout;
mod fold;
pub mod follow;
mod gate;
mod machine;
pub mod operate;
mod selector;
mod strategy;
mod view;

use std::collections::BTreeSet;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use serde::{Deserialize, Deserializer, Serialize};

use crate::channels::ChannelName;

pub use book::{Applied, Remembered, Rollouts};
pub use machine::{Action, DeviceRun, Presence, Rollout, RolloutState};
pub use selector::{Selector, SelectorError};
pub use strategy::{Strategy, StrategyError};
pub use view::RolloutView;

/// The rollout `POST /api/v1/rollouts` asks for (its body less the `sha256` precondition:
/// [`RolloutBody`]); remembered with its idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub slot: SlotName,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// A channel: the devices that follow it for this slot; its pin once complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    /// Waves, thresholds, deadline, gate; absent: every device at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Take over devices that a live rollout of the same slot still owns.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub supersede: bool,
}

/// The whole body of `POST /api/v1/rollouts`: a [`RolloutRequest`] and, optionally, the
/// SHA-256 the caller expects the version's artifact to have (`"sha256"`). The digest is a
/// precondition checked on every request, a replayed one too; it is not part of the rollout,
/// so it is not remembered with its idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutBody {
    pub request: RolloutRequest,
    pub sha256: Option<Sha256Digest>,
}

impl<'de> Deserialize<'de> for RolloutBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut members = serde_json::Map::deserialize(deserializer)?;
        let sha256 = members
            .remove("sha256")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|err| D::Error::custom(format_args!("sha256: {err}")))?;
        let request = RolloutRequest::deserialize(serde_json::Value::Object(members))
            .map_err(D::Error::custom)?;
        Ok(Self { request, sha256 })
    }
}

/// The version a rollout names is registered with other bytes than the caller expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{slot}/{version} is registered with SHA-256 {registered}, not the requested {requested}; no rollout was made"
)]
pub struct DigestMismatch {
    pub slot: SlotName,
    pub version: String,
    pub registered: Sha256Digest,
    pub requested: Sha256Digest,
}

impl RolloutBody {
    /// Holds when no digest was asked for, or when `registered` (the version's) is it.
    pub fn check_sha256(&self, registered: &Sha256Digest) -> Result<(), DigestMismatch> {
        match self.sha256 {
            Some(requested) if requested != *registered => Err(DigestMismatch {
                slot: self.request.slot.clone(),
                version: self.request.version.clone(),
                registered: *registered,
                requested,
            }),
            _ => Ok(()),
        }
    }
}

/// Whom a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    Devices(BTreeSet<DeviceId>),
    Selector(Selector),
    Channel(ChannelName),
}

/// Why a request names no valid target.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TargetError {
    #[error("pass exactly one of `devices`, `selector` and `channel`")]
    Both,
    #[error(
        "pass one of `devices` (a list of device ids), `selector` (\"key=value,...\") or `channel` (a channel's name)"
    )]
    Neither,
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}

impl RolloutRequest {
    pub fn targets(&self) -> Result<Targets, TargetError> {
        match (&self.devices, &self.selector, &self.channel) {
            (None, None, None) => Err(TargetError::Neither),
            (Some(devices), None, None) => Ok(Targets::Devices(devices.iter().cloned().collect())),
            (None, Some(selector), None) => Ok(Targets::Selector(selector.parse()?)),
            (None, None, Some(channel)) => Ok(Targets::Channel(channel.clone())),
            _ => Err(TargetError::Both),
        }
    }

    /// The strategy asked for (validated), or the default.
    pub fn strategy(&self) -> Result<Strategy, TargetError> {
        let strategy = self.strategy.clone().unwrap_or_default();
        strategy.validate()?;
        Ok(strategy)
    }
}

/// The answer to a rollout request (the same again for a replayed idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedRollout {
    pub rollout_id: RolloutId,
    pub devices: Vec<DeviceId>,
}

/// An `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

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
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// The key is new (or absent): do the work.
    Fresh,
    /// Same key, same request: answer what was answered then, do nothing again.
    Same(CreatedRollout),
    /// Same key, another request: refuse.
    Conflict,
}

/// The model a rollout ships.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutModel {
    pub slot: SlotName,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
}

#[cfg(test)]
mod tests;
