//! The messages on each topic (see [`crate::topics`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ids::{CommandId, DeviceId, RolloutId, SlotName};
use crate::manifest::{Sha256Digest, SignedManifest};

/// Retained presence and state of a device. The last will is the same document with
/// `online: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    pub agent_version: String,
    /// The model serving each slot now.
    #[serde(default)]
    pub active: BTreeMap<SlotName, ActiveModel>,
    /// The last `desired` generation this agent has fully processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<u64>,
    pub at: Timestamp,
}

/// The model serving one slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveModel {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub since: Timestamp,
}

/// Retained static facts about a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub agent_version: String,
    pub hostname: String,
    /// CPU architecture as Rust names it (`aarch64`, `x86_64`).
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    /// `/proc/device-tree/model` on boards that have one (Jetson).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// Labels for selectors: derived (arch, board, …) plus configured ones.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Periodic measurements (QoS 0, not retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub at: Timestamp,
    pub uptime_s: u64,
    /// Whole-machine CPU use in percent of all cores.
    pub cpu_percent: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_1m: Option<f64>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Free space on the filesystem holding the model store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    /// Inference counters per slot over the last interval.
    #[serde(default)]
    pub inference: BTreeMap<SlotName, SlotStats>,
}

/// Inference counters of one slot over one telemetry interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStats {
    pub requests: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// Retained desired state of one device, written by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// Increases with every change the server makes for this device.
    pub generation: u64,
    pub slots: BTreeMap<SlotName, DesiredModel>,
}

/// The model a slot should serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredModel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
    pub manifest: SignedManifest,
    /// Where to download the artifact; the manifest's digest decides whether it is right.
    pub artifact_url: String,
}

/// One step of a rollout on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
    pub slot: SlotName,
    /// The artifact this event is about.
    pub sha256: Sha256Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    pub at: Timestamp,
    #[serde(flatten)]
    pub stage: Stage,
}

/// Rollout stages as a device reports them. `Active` and `Rejected`/`Failed` are terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// The device saw a new desired model for the slot.
    Received,
    /// The signature verified with a trusted key and the manifest fits this device.
    Verified { key_ids: Vec<String> },
    /// Download started (or resumed at `offset`).
    Downloading { total_bytes: u64, offset: u64 },
    /// All bytes arrived and match size and digest.
    Downloaded { bytes: u64, millis: u64 },
    /// tract loaded and optimised the model.
    Loaded { millis: u64 },
    /// The benchmark gate ran.
    Benchmarked(BenchReport),
    /// The model serves the slot now.
    Active {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<Sha256Digest>,
        swap_micros: u64,
    },
    /// The device refused the model; the previous one keeps serving.
    Rejected {
        reason: RejectReason,
        message: String,
    },
    /// Something went wrong that may pass (network, disk); the previous model keeps serving.
    Failed { message: String },
}

impl Stage {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Stage::Active { .. } | Stage::Rejected { .. } | Stage::Failed { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::Verified { .. } => "verified",
            Stage::Downloading { .. } => "downloading",
            Stage::Downloaded { .. } => "downloaded",
            Stage::Loaded { .. } => "loaded",
            Stage::Benchmarked(_) => "benchmarked",
            Stage::Active { .. } => "active",
            Stage::Rejected { .. } => "rejected",
            Stage::Failed { .. } => "failed",
        }
    }
}

/// Why a device refused a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// No trusted key signed the manifest.
    Untrusted,
    /// The manifest is malformed or of an unknown schema.
    BadManifest,
    Expired,
    /// The manifest's release is lower than the installed one.
    Downgrade,
    /// Architecture or board do not match.
    Incompatible,
    /// The downloaded bytes differ in size from the manifest.
    SizeMismatch,
    /// The downloaded bytes differ in SHA-256 from the manifest.
    DigestMismatch,
    /// tract cannot load or run the artifact.
    NotLoadable,
    /// The benchmark gate was missed (latency budget or regression).
    GateMissed,
    /// The reference output check failed.
    WrongOutput,
}

/// Numbers from the on-device benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub runs: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// p99 of the model serving the slot, measured in the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incumbent_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_max_abs_err: Option<f32>,
    pub passed: bool,
}

/// A one-off operation for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: CommandId,
    #[serde(flatten)]
    pub kind: CommandKind,
}

/// What a [`Command`] asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum CommandKind {
    /// Publish status, info and telemetry now.
    ReportNow,
}
