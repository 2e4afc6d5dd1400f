//! The messages on each topic (see [`crate::topics`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineBench, EngineKind, EnginesInfo};
use crate::ids::{CommandId, DeviceId, EventId, RolloutId, SlotName};
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
    /// The K3s node this robot runs, once a join was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sNode>,
    /// Per slot, a model that passed its gate and waits to be swapped in, and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deferred: BTreeMap<SlotName, DeferredModel>,
}

/// A model loaded, gated and ready, whose swap waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeferredModel {
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
    /// Since when it waits.
    pub since: Timestamp,
    pub deferral: Deferral,
}

/// Why a swap waits, and until when at the latest as far as the robot knows now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Deferral {
    /// The robot's own software holds swaps (`POST /v1/holds` on the agent's local API).
    Held {
        holds: Vec<HoldInfo>,
        /// When the last of them expires unless renewed.
        until: Timestamp,
    },
    /// The desired model may only be swapped in within a daily window of local time.
    Window {
        window: InstallWindow,
        /// When the window opens next.
        opens_at: Timestamp,
    },
    /// The candidate runs beside the serving model on copies of live requests; it is
    /// promoted only if its answers agree (`ShadowSpec`).
    Shadow {
        /// Requests to compare.
        requests: u32,
        /// When the shadow ends at the latest (judged on what was compared by then).
        until: Timestamp,
    },
    /// The desired state says "install on command": downloaded and gated, the swap waits
    /// for a desired document that names the same model without `on_command`.
    Command,
    /// The robot is too hot, or on a low battery that is not charging, to benchmark a
    /// candidate now (`thermal`, `battery`); download done, gate put off.
    Guard {
        guard: String,
        message: String,
        /// When the robot looks again.
        recheck_at: Timestamp,
    },
}

impl Deferral {
    /// When the robot looks again, at the latest.
    pub fn until(&self) -> Timestamp {
        match self {
            Deferral::Held { until, .. } => *until,
            Deferral::Window { opens_at, .. } => *opens_at,
            Deferral::Guard { recheck_at, .. } => *recheck_at,
            Deferral::Shadow { until, .. } => *until,
            // No deadline: the robot waits for the server's word.
            Deferral::Command => Timestamp::MAX,
        }
    }
}

impl std::fmt::Display for Deferral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deferral::Held { holds, until } => {
                let holders: Vec<&str> = holds.iter().map(|h| h.holder.as_str()).collect();
                write!(f, "held by {} (until {until})", holders.join(", "))
            }
            Deferral::Window { window, opens_at } => {
                write!(f, "waiting for the window {window} (opens {opens_at})")
            }
            Deferral::Shadow { requests, until } => {
                write!(
                    f,
                    "shadowing live requests ({requests} to compare, until {until})"
                )
            }
            Deferral::Guard { guard, message, .. } => {
                write!(f, "benchmark put off by the {guard} guard: {message}")
            }
            Deferral::Command => {
                f.write_str("downloaded and gated; waiting for the install command")
            }
        }
    }
}

/// Before promotion, run the candidate on copies of live requests beside the serving model
/// (at the lowest CPU priority, never delaying or changing an answer) and compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// Requests to compare before the verdict.
    pub requests: u32,
    /// The longest the shadow runs (s); the verdict then goes on what was compared.
    pub seconds: u64,
    /// Share (0..=1) of compared requests whose answers must agree.
    pub min_agreement: f64,
    /// `top1_agreement` (the index of the largest value of `output`), `within_tolerance`,
    /// or `box_iou` (the boxes of a detector's `output`, read and matched by `boxes`).
    #[serde(default)]
    pub metric: crate::evaluation::AgreementMetric,
    /// For `box_iou`: the box format, scores, and the score and IoU thresholds (absent:
    /// corners, the 5th value as the score, 0.5 and 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<crate::evaluation::BoxSpec>,
    /// Largest absolute difference per value, for `within_tolerance`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub tolerance: Option<f32>,
    /// The output compared (absent: the model's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Copy one request in this many (1: every one).
    #[serde(default = "one_u32")]
    pub sample_every: u32,
    /// The candidate's p99 on the shadowed requests may be at most this many times the
    /// serving model's on the same requests (absent: latency not judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
}

fn one_u32() -> u32 {
    1
}

/// Why a shadow specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shadow: {0}")]
pub struct ShadowSpecError(pub &'static str);

impl ShadowSpec {
    pub fn validate(&self) -> Result<(), ShadowSpecError> {
        if self.requests == 0 {
            return Err(ShadowSpecError("requests must be at least 1"));
        }
        if self.seconds == 0 {
            return Err(ShadowSpecError("seconds must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.min_agreement) {
            return Err(ShadowSpecError("min_agreement must be between 0 and 1"));
        }
        if self.sample_every == 0 {
            return Err(ShadowSpecError("sample_every must be at least 1"));
        }
        if self.max_p99_ratio.is_some_and(|r| r <= 0.0) {
            return Err(ShadowSpecError("max_p99_ratio must be above 0"));
        }
        match (&self.metric, &self.boxes) {
            (crate::evaluation::AgreementMetric::BoxIou, Some(boxes)) => {
                if !(boxes.min_iou > 0.0 && boxes.min_iou <= 1.0) {
                    return Err(ShadowSpecError(
                        "boxes.min_iou must be above 0 and at most 1",
                    ));
                }
            }
            (crate::evaluation::AgreementMetric::BoxIou, None) => {}
            (_, Some(_)) => {
                return Err(ShadowSpecError("boxes applies to the box_iou metric only"));
            }
            (_, None) => {}
        }
        Ok(())
    }
}

/// What a shadow came to on the robot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// Requests compared, and how many of them agreed.
    pub samples: u32,
    pub agreed: u32,
    pub metric: crate::evaluation::AgreementMetric,
    /// Requests not copied because the shadow was behind (the serving path never waits).
    pub dropped: u64,
    /// p99 of the candidate and of the serving model on the compared requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_p99_ms: Option<f64>,
    pub passed: bool,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One hold on swaps, as the robot's software placed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldInfo {
    /// Who holds (`nav`, `arm-controller`): one hold per holder.
    pub holder: String,
    pub reason: String,
    /// When it expires unless renewed.
    pub until: Timestamp,
}

/// A daily span of the robot's local time, `HH:MM` to `HH:MM` (end excluded); an end
/// before the start spans midnight (`22:00`–`05:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallWindow {
    pub start: jiff::civil::Time,
    pub end: jiff::civil::Time,
}

/// Why a window was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("an install window is \"HH:MM-HH:MM\" (local time), not {0:?}")]
    Syntax(String),
    #[error("an install window must not be empty (start and end are both {0})")]
    Empty(String),
}

impl InstallWindow {
    /// Whether `at` (local civil time) falls inside.
    pub fn contains(&self, at: jiff::civil::Time) -> bool {
        if self.start < self.end {
            self.start <= at && at < self.end
        } else {
            at >= self.start || at < self.end
        }
    }

    /// `None` when `now` is inside the window; otherwise when it opens next, in `now`'s
    /// time zone.
    pub fn opens_after(&self, now: &jiff::ZonedDateTime) -> Option<Timestamp> {
        if self.contains(now.time()) {
            return None;
        }
        let today = now.date();
        let day = if now.time() < self.start {
            today
        } else {
            today.tomorrow().ok()?
        };
        // Jiff's "compatible" resolution moves a start that a clock change skips to the
        // first instant after the gap.
        let opens = day
            .to_datetime(self.start)
            .to_zoned_datetime(now.time_zone().clone());
        opens.ok().map(|z| z.timestamp())
    }
}

impl std::fmt::Display for InstallWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{}",
            self.start.strftime("%H:%M"),
            self.end.strftime("%H:%M")
        )
    }
}

impl std::str::FromStr for InstallWindow {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || WindowError::Syntax(s.to_owned());
        let (start, end) = s.split_once('-').ok_or_else(syntax)?;
        let time = |t: &str| {
            let t = t.trim();
            let ok = t.len() == 5 && t.as_bytes()[2] == b':';
            ok.then(|| jiff::civil::Time::strptime("%H:%M", t).ok())
                .flatten()
                .ok_or_else(syntax)
        };
        let window = Self {
            start: time(start)?,
            end: time(end)?,
        };
        if window.start == window.end {
            return Err(WindowError::Empty(
                window.start.strftime("%H:%M").to_string(),
            ));
        }
        Ok(window)
    }
}

impl Serialize for InstallWindow {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstallWindow {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The model serving one slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveModel {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub since: Timestamp,
    /// The engine serving it (absent from an agent that had only tract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
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
    /// The device this document describes; the server drops it if the topic says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// `/etc/machine-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Mounted filesystems and their sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskInfo>,
    /// Present on NVIDIA Jetson boards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetson: Option<JetsonInfo>,
    /// Discrete NVIDIA GPUs as NVML reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuInfo>,
    /// The inference engines this robot can run models on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines: Option<EnginesInfo>,
}

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub mount_point: String,
    pub total_bytes: u64,
}

/// What a Jetson board says about itself; each part is absent where it cannot be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JetsonInfo {
    /// L4T release from `/etc/nv_tegra_release`, e.g. `35.4.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4t: Option<String>,
    /// JetPack version derived from the L4T release, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetpack: Option<String>,
    /// The integrated GPU's device-tree name (`ga10b` on Orin, `gv11b` on Xavier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
}

/// A discrete GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
}

/// The telemetry schema this build writes. A server drops telemetry of a newer schema.
pub const TELEMETRY_SCHEMA: u32 = 1;

fn telemetry_schema_v1() -> u32 {
    1
}

/// Periodic measurements (QoS 0, not retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub at: Timestamp,
    pub uptime_s: u64,
    /// Whole-machine CPU use in percent of all cores.
    #[serde(deserialize_with = "crate::finite::f32")]
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
    /// Schema version ([`TELEMETRY_SCHEMA`]); messages without one are version 1.
    #[serde(default = "telemetry_schema_v1")]
    pub schema: u32,
    /// The device measured; the server drops the message if the topic says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// CPU use per core, in percent.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::finite::vec"
    )]
    pub cpu_per_core: Vec<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_5m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_15m: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_total_bytes: Option<u64>,
    /// Size of the filesystem holding the model store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
    /// Received bytes per second over all non-loopback interfaces since the last sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_rx_bytes_per_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_bytes_per_s: Option<u64>,
    /// Temperatures by sensor name (hardware monitors and thermal zones), in °C.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::finite::map"
    )]
    pub temperatures_c: BTreeMap<String, f32>,
    /// GPUs: NVML where it works, else the Jetson integrated GPU from sysfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuTelemetry>,
    /// Board-level figures of a Jetson (memory controller, power rails, power mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<BoardTelemetry>,
    /// The agent's own CPU use (percent of one core) since the last sample.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub agent_cpu_percent: Option<f32>,
    /// The agent's resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_rss_bytes: Option<u64>,
    /// Messages the agent dropped since it started (outbox full, link backlog full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_messages: Option<u64>,
    /// Data capture, the spool and its upload; absent while capture is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataTelemetry>,
}

/// Data capture counters since the agent started, and the spool as it is now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataTelemetry {
    /// Samples written to the spool, by rule (`sampled`, `low_confidence`, …).
    #[serde(default)]
    pub captured: BTreeMap<String, u64>,
    /// Copies not kept because the rate bound was reached or the writer was busy.
    #[serde(default)]
    pub dropped_rate: u64,
    /// Samples not written because the disk refused them (full, read-only).
    #[serde(default)]
    pub dropped_write: u64,
    /// Spooled samples deleted, oldest first, to stay within the spool's bytes, count or age.
    #[serde(default)]
    pub dropped_spool: u64,
    /// Samples in the spool now, and their bytes.
    pub spool_samples: u64,
    pub spool_bytes: u64,
    /// Samples the server took (stored, or already had), and the bytes sent for them.
    #[serde(default)]
    pub uploaded: u64,
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// Samples the server refused (deleted from the spool; the reason is logged).
    #[serde(default)]
    pub refused: u64,
    /// Whether the robot's software said its link is metered (uploads wait).
    #[serde(default)]
    pub metered: bool,
    /// Why uploads wait now, if they do (`metered`, `outside the upload windows`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_waiting: Option<String>,
}

/// Where GPU figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    Nvml,
    JetsonSysfs,
}

/// One GPU's figures; each is absent where it cannot be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuTelemetry {
    pub source: GpuSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub load_percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub temperature_c: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freq_mhz: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_freq_mhz: Option<u32>,
    /// Why clocks are held down right now (`sw_power_cap`, `hw_thermal`, `freq_capped`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle: Vec<String>,
}

/// Jetson board figures; each is absent where it cannot be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BoardTelemetry {
    /// External memory controller clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emc_freq_mhz: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub emc_load_percent: Option<f32>,
    /// Power per INA3221 rail, in milliwatts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rails_mw: BTreeMap<String, u64>,
    /// The nvpmodel power mode (`MAXN`, `15W`, …; the mode number if unnamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mode: Option<String>,
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
    /// The version serving the slot at the end of the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// Model swaps seen during the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swaps: Option<u64>,
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
    /// Where to download the evaluation set the manifest's gate names (its digest decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation_url: Option<String>,
    /// Swap it in only within this daily window of the robot's local time; download and
    /// gate run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<InstallWindow>,
    /// Shadow it on live requests after its gate, before its swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// Download and gate at once, then wait: the swap happens once a desired document
    /// names the same model without this flag (the operator's install command).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_command: bool,
}

/// One step of a rollout on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event, kept across resends and agent restarts: the server counts a
    /// replay (outbox after a restart, QoS 1 redelivery) as a duplicate by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<EventId>,
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
    /// The model was taken out of service after it had been active (health window or an
    /// operator's rollback); `to` serves the slot again.
    RolledBack { to: Sha256Digest, reason: String },
    /// The model passed its gate and is ready; its swap waits (a hold from the robot's
    /// software, an install window). Reported again when the reason changes.
    Deferred { deferral: Deferral },
    /// The shadow on live requests ended (`passed`: it goes on to its swap).
    Shadowed(ShadowReport),
}

impl Stage {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Stage::Active { .. }
                | Stage::Rejected { .. }
                | Stage::Failed { .. }
                | Stage::RolledBack { .. }
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
            Stage::RolledBack { .. } => "rolled_back",
            Stage::Failed { .. } => "failed",
            Stage::Deferred { .. } => "deferred",
            Stage::Shadowed(_) => "shadowed",
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
    /// The accuracy gate failed: answers on the evaluation set disagree with the parent's.
    Inaccurate,
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub reference_max_abs_err: Option<f32>,
    /// Peak resident memory of the benchmark process (load + runs), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    pub passed: bool,
    /// The engine the figures above are for: the one chosen, or the best one tried when
    /// none passed (absent from an agent that had only tract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    /// The engine the incumbent's figure was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incumbent_engine: Option<EngineKind>,
    /// Every engine measured in the same run, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<EngineBench>,
    /// The accuracy gate's figure on the engine above (share of the evaluation set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
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
    /// Join this robot to a K3s cluster as an agent node; the outcome is reported in
    /// [`Status::k3s`].
    K3sJoin {
        /// The K3s server, `https://host:6443`.
        server_url: String,
        token: K3sToken,
        /// Extra node labels; the agent puts them under its own prefix.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        node_labels: BTreeMap<String, String>,
    },
    /// Stop and disable the K3s agent and remove the files the join wrote.
    K3sLeave,
    /// Replace the join token and restart the K3s agent.
    K3sRotateToken { token: K3sToken },
    /// Put the slot's previous model back (kept on the robot, so no download) and refuse
    /// the model it replaces until the desired state names another one.
    Rollback {
        slot: SlotName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// [`CommandKind::Rollback`] with the server's signed order: the only rollback an
    /// agent carries out (an unsigned one is refused with an event).
    SignedRollback {
        order: crate::rollback::SignedRollback,
    },
    /// Keep copies of the next requests of a slot, as the signed order says (the robot's
    /// capture policy must allow on-demand capture for the slot).
    SignedCapture {
        order: crate::capture::SignedCapture,
    },
}

/// A K3s join token. Its `Debug` form never shows the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct K3sToken(pub String);

impl std::fmt::Debug for K3sToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("K3sToken(<redacted>)")
    }
}

/// The K3s agent node on a robot, as the robot last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct K3sNode {
    /// The command that led here.
    pub command_id: CommandId,
    pub at: Timestamp,
    #[serde(flatten)]
    pub state: K3sState,
}

/// Where a K3s join, leave or token rotation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum K3sState {
    /// `k3s-agent.service` is active with our configuration.
    Joined {
        node_name: String,
        server_url: String,
        k3s_version: String,
        /// `default-runtime: nvidia` was set (the NVIDIA container runtime is installed).
        nvidia_runtime: bool,
    },
    /// The K3s agent is stopped and disabled and our files are gone.
    Left,
    /// The operation failed; `reason` says what to do about it.
    Failed { reason: K3sFailure, message: String },
}

/// Why a K3s operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum K3sFailure {
    /// The robot cannot run a K3s agent (no `k3s` binary, no cgroup memory controller).
    Preflight,
    /// The request itself is unusable (server URL, labels).
    BadRequest,
    /// The server refused the join token.
    TokenRejected,
    /// Another node already registered this node name ("Node password rejected").
    DuplicateNodeName,
    /// The K3s server cannot be reached.
    ServerUnreachable,
    /// The K3s agent did not become active in time, for a reason not recognised.
    NotActive,
    /// Writing files or talking to systemd failed.
    System,
}
