//! Device facts (retained `info`) and periodic measurements (`telemetry`).
//!
//! Every probe is optional: a fact that cannot be read is absent, never zero, and the
//! probe says why once, at debug level, when the [`Sampler`] starts. Sources:
//! - [`host`]: sysinfo (CPU, load, memory, swap, disk, network, hardware monitors);
//! - [`thermal`]: thermal zones by name;
//! - [`nvml`]: discrete NVIDIA GPUs where libnvidia-ml loads;
//! - [`jetson`] and [`power`]: the Jetson integrated GPU, memory controller, INA3221 power
//!   rails and nvpmodel mode from sysfs (NVML does not support Jetson);
//! - [`process`]: the agent's own CPU and memory.
//!
//! The Jetson, thermal and machine-id readers take a root path (`[telemetry] root`), so
//! tests run them against fixture trees shaped like real boards.

pub mod engines;
pub mod host;
pub mod info;
pub mod jetson;
pub mod nvml;
pub mod power;
pub mod process;
pub mod read;
pub mod thermal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use botfleet_protocol::engine::EnginesInfo;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{Info, JetsonInfo, TELEMETRY_SCHEMA, Telemetry};
use botfleet_protocol::{DeviceId, SlotName};
use jiff::Timestamp;
use sysinfo::System;

use crate::config::TelemetryConfig;
use crate::slots::Slots;

pub use info::label_value;

/// The board model of this machine (`/proc/device-tree/model`).
pub fn board() -> Option<String> {
    jetson::board_model(Path::new("/"))
}

/// The board model under `root`.
pub fn board_at(root: &Path) -> Option<String> {
    jetson::board_model(root)
}

/// The probes found at start-up and the state rates need between samples.
#[derive(Debug)]
pub struct Sampler {
    device: DeviceId,
    root: PathBuf,
    host: host::Host,
    thermal: thermal::ThermalZones,
    jetson: jetson::Jetson,
    nvml: nvml::NvmlProbe,
    process: process::SelfUsage,
    /// The artifact serving each slot at the previous sample, to count swaps.
    serving: BTreeMap<SlotName, Sha256Digest>,
    /// What the engine probe found at start.
    engines: Option<EnginesInfo>,
}

impl Sampler {
    pub fn new(device: DeviceId, data_dir: &Path, config: &TelemetryConfig) -> Self {
        if board_at(&config.root).is_none() {
            tracing::debug!("no /proc/device-tree/model; board absent");
        }
        Self {
            device,
            root: config.root.clone(),
            host: host::Host::new(data_dir),
            thermal: thermal::ThermalZones::discover(&config.root),
            jetson: jetson::Jetson::discover(&config.root),
            nvml: nvml::NvmlProbe::open(config.nvml),
            process: process::SelfUsage::default(),
            serving: BTreeMap::new(),
            engines: None,
        }
    }

    /// The static facts, with derived labels under the `configured` ones.
    pub fn info(&self, configured: &BTreeMap<String, String>) -> Info {
        let mut info = info::host_info(&self.device, &self.root);
        info.board = board_at(&self.root);
        info.jetson = self.jetson.info();
        info.gpus = self.nvml.info();
        info.engines = self.engines.clone().map(|mut engines| {
            engines.gpu_compute_capability = self.compute_capability(info.jetson.as_ref());
            engines
        });
        info.labels = info::labels(
            &info.arch,
            info.board.as_deref(),
            info.jetson.as_ref(),
            &info.gpus,
            configured,
        );
        if let Some(engines) = &info.engines {
            engines::add_labels(&mut info.labels, engines, configured);
        }
        info
    }

    /// Sets what the engine probe found, for the info document.
    pub fn set_engines(&mut self, engines: EnginesInfo) {
        self.engines = Some(engines);
    }

    /// The GPU's compute capability: NVML on a discrete GPU, the integrated GPU's name on a
    /// Jetson.
    pub fn compute_capability(&self, jetson: Option<&JetsonInfo>) -> Option<String> {
        self.nvml.compute_capability().or_else(|| {
            jetson
                .and_then(|j| j.gpu.as_deref())
                .and_then(engines::jetson_compute_capability)
                .map(str::to_owned)
        })
    }

    /// What compiled engines depend on here besides the model: part of their cache key.
    pub fn engine_hardware(&self) -> String {
        let jetson = self.jetson.info();
        let gpu = self
            .nvml
            .info()
            .first()
            .map(|g| g.name.clone())
            .or_else(|| jetson.as_ref().and_then(|j| j.gpu.clone()));
        [
            gpu,
            self.compute_capability(jetson.as_ref()),
            jetson::power_mode(&self.root),
        ]
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect::<Vec<_>>()
        .join("|")
    }

    /// One telemetry message; drains the slots' inference counters.
    pub fn sample(&mut self, slots: &Slots) -> Telemetry {
        let host = self.host.sample();
        let mut temperatures_c = host.temperatures_c;
        let zones = self.thermal.read();
        let gpu_temp = zones
            .iter()
            .find(|(name, _)| name.to_ascii_lowercase().starts_with("gpu"))
            .map(|(_, t)| *t);
        temperatures_c.extend(zones);
        // NVML where it works; otherwise the Jetson integrated GPU from sysfs.
        let mut gpus = self.nvml.sample();
        if gpus.is_empty() {
            gpus.extend(self.jetson.gpu(gpu_temp));
        }
        let (agent_cpu_percent, agent_rss_bytes) = self.process.sample();
        let load = System::load_average().ok();
        Telemetry {
            at: Timestamp::now(),
            uptime_s: System::uptime().unwrap_or_default(),
            cpu_percent: host.cpu_percent.unwrap_or_default(),
            load_1m: load.as_ref().map(|l| l.one),
            memory_used_bytes: host.memory_used_bytes.unwrap_or_default(),
            memory_total_bytes: host.memory_total_bytes.unwrap_or_default(),
            disk_free_bytes: host.disk_free_bytes,
            inference: self.inference(slots),
            schema: TELEMETRY_SCHEMA,
            device: Some(self.device.clone()),
            cpu_per_core: host.cpu_per_core,
            load_5m: load.as_ref().map(|l| l.five),
            load_15m: load.as_ref().map(|l| l.fifteen),
            swap_used_bytes: host.swap_used_bytes,
            swap_total_bytes: host.swap_total_bytes,
            disk_total_bytes: host.disk_total_bytes,
            net_rx_bytes_per_s: host.net_rx_bytes_per_s,
            net_tx_bytes_per_s: host.net_tx_bytes_per_s,
            temperatures_c,
            gpus,
            board: self.jetson.board(),
            agent_cpu_percent,
            agent_rss_bytes,
            // Filled in by the link, which does the dropping.
            dropped_messages: None,
            data: None,
        }
    }

    /// Counters per slot with the serving version and the swaps seen since the last sample
    /// (a swap is a change of the serving artifact between two samples).
    fn inference(
        &mut self,
        slots: &Slots,
    ) -> BTreeMap<SlotName, botfleet_protocol::messages::SlotStats> {
        let active = slots.active();
        let mut stats = slots.drain_stats();
        for (slot, model) in &active {
            let swapped = swapped(&mut self.serving, slot, model.sha256);
            let entry = stats.entry(slot.clone()).or_insert_with(|| {
                botfleet_protocol::messages::SlotStats {
                    requests: 0,
                    errors: 0,
                    p50_ms: None,
                    p99_ms: None,
                    active_version: None,
                    swaps: None,
                }
            });
            entry.active_version = Some(model.version.clone());
            entry.swaps = Some(u64::from(swapped));
        }
        stats
    }
}

/// Records what serves `slot` now; true if it differs from the previous sample's.
fn swapped(
    serving: &mut BTreeMap<SlotName, Sha256Digest>,
    slot: &SlotName,
    now: Sha256Digest,
) -> bool {
    serving
        .insert(slot.clone(), now)
        .is_some_and(|before| before != now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_is_a_change_of_the_serving_artifact_between_samples() {
        let slot = SlotName::new("orientation").unwrap();
        let a: Sha256Digest = "aa".repeat(32).parse().unwrap();
        let b: Sha256Digest = "bb".repeat(32).parse().unwrap();
        let mut serving = BTreeMap::new();
        assert!(
            !swapped(&mut serving, &slot, a),
            "the first model is no swap"
        );
        assert!(!swapped(&mut serving, &slot, a));
        assert!(swapped(&mut serving, &slot, b));
        assert!(!swapped(&mut serving, &slot, b));
    }

    #[test]
    fn telemetry_reads_memory_and_the_data_dir_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = TelemetryConfig {
            nvml: false,
            ..TelemetryConfig::default()
        };
        let mut s = Sampler::new(DeviceId::new("robot-1").unwrap(), dir.path(), &config);
        let t = s.sample(&Slots::default());
        assert!(t.memory_total_bytes >= t.memory_used_bytes && t.memory_used_bytes > 0);
        let (free, total) = (t.disk_free_bytes.unwrap(), t.disk_total_bytes.unwrap());
        assert!(free <= total);
        assert_eq!(t.schema, TELEMETRY_SCHEMA);
    }
}
