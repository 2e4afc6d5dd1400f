//! botfleet's wire contract, shared by `botfleet-agent` and `botfleet-server`.
//!
//! - [`topics`]: every MQTT topic string, built and parsed in one place.
//! - [`messages`]: what travels on each topic (status, info, telemetry, desired, events, commands).
//! - [`manifest`]: the signed model manifest; [`manifest::SignedManifest::verify`] is the only
//!   way to a [`manifest::Verified`] manifest.
//! - [`rollback`]: the signed rollback order, verified with the manifest's trusted keys.
//! - [`engine`]: inference engines: the manifest's policy, what a robot has, what the gate measured.
//! - [`evaluation`]: the accuracy gate's evaluation set, which travels with a model.
//! - [`ids`]: validated names that become topic levels and file names.
//!
//! This crate does no I/O: no async runtime, no MQTT client.

pub mod engine;
pub mod evaluation;
pub mod finite;
pub mod ids;
pub mod manifest;
pub mod messages;
pub mod rollback;
pub mod tensor;
pub mod topics;

pub use ids::{CommandId, DeviceId, EventId, IdError, RolloutId, SlotName};
pub use manifest::{
    ExpiryCheck, Manifest, ManifestError, ManifestSigner, SignedManifest, TrustedKeys, Verified,
};
pub use rollback::{RollbackError, RollbackOrder, SignedRollback};
pub use topics::{TopicKind, Topics};

/// Largest MQTT packet either side sends or accepts, in bytes.
pub const MAX_PACKET_BYTES: usize = 512 * 1024;
