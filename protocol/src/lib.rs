//! botfleet's wire contract, shared by `botfleet-agent` and `botfleet-server`.
//!
//! - [`topics`]: every MQTT topic string, built and parsed in one place.
//! - [`messages`]: what travels on each topic (status, info, telemetry, desired, events, commands).
//! - [`manifest`]: the signed model manifest; [`manifest::SignedManifest::verify`] is the only
//!   way to a [`manifest::Verified`] manifest.
//! - [`ids`]: validated names that become topic levels and file names.
//!
//! This crate does no I/O: no async runtime, no MQTT client.

pub mod ids;
pub mod manifest;
pub mod messages;
pub mod tensor;
pub mod topics;

pub use ids::{CommandId, DeviceId, IdError, RolloutId, SlotName};
pub use manifest::{
    ExpiryCheck, Manifest, ManifestError, ManifestSigner, SignedManifest, TrustedKeys, Verified,
};
pub use topics::{TopicKind, Topics};

/// Largest MQTT packet either side sends or accepts, in bytes.
pub const MAX_PACKET_BYTES: usize = 512 * 1024;
