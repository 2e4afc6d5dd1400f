//! botfleet's wire contract, shared by `botfleet-agent` and `botfleet-server`.
//!
//! - [`topics`]: every MQTT topic string, built and parsed in one place.
//! - [`messages`]: what travels on each topic (status, info, telemetry, desired, events, commands).
//! - [`manifest`]: the signed model manifest; [`manifest::SignedManifest::verify`] is the only
//!   way to a [`manifest::Verified`] manifest.
//! - [`rollback`]: the signed rollback order, verified with the manifest's trusted keys.
//! - [`capture`]: the signed capture order (keep the next requests of a slot).
//! - [`sample`]: a captured sample's file format (spooled on the robot, uploaded, exported).
//! - [`engine`]: inference engines: the manifest's policy, what a robot has, what the gate measured.
//! - [`evaluation`]: the accuracy gate's evaluation set, which travels with a model.
//! - [`ids`]: validated names that become topic levels and file names.
//!
//! This crate does no I/O: no async runtime, no MQTT client.

pub mod capture;
pub mod engine;
pub mod evaluation;
pub mod finite;
pub mod ids;
pub mod manifest;
pub mod messages;
mod order;
pub mod rollback;
pub mod sample;
pub mod tensor;
pub mod topics;

pub use capture::{CaptureError, CaptureOrder, SignedCapture};
pub use ids::{CommandId, DeviceId, EventId, IdError, RolloutId, SlotName};
pub use manifest::{
    ExpiryCheck, Manifest, ManifestError, ManifestSigner, SignedManifest, TrustedKeys, Verified,
};
pub use rollback::{RollbackError, RollbackOrder, SignedRollback};
pub use topics::{TopicKind, Topics};

/// Largest MQTT packet either side sends or accepts, in bytes.
pub const MAX_PACKET_BYTES: usize = 512 * 1024;
