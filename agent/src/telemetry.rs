//! Device facts (retained `info`) and periodic measurements (`telemetry`). Every probe is
//! optional: a fact that cannot be read is absent, never zero.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use botfleet_protocol::SlotName;
use botfleet_protocol::messages::{Info, SlotStats, Telemetry};
use jiff::Timestamp;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// The board model from the device tree (Jetson and other ARM boards).
pub fn board() -> Option<String> {
    std::fs::read_to_string("/proc/device-tree/model")
        .ok()
        .map(|s| s.trim_end_matches('\0').trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Label values must be usable in selectors: lowercase, spaces become '-'.
fn label_value(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Reads the static facts once.
pub fn info(labels: &BTreeMap<String, String>) -> Info {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .map_err(|e| tracing::debug!(error = %e, "sysinfo unavailable"))
    .ok();
    let board = board();
    let arch = std::env::consts::ARCH.to_owned();
    let mut all_labels = BTreeMap::from([("arch".to_owned(), arch.clone())]);
    if let Some(b) = &board {
        all_labels.insert("board".to_owned(), label_value(b));
    }
    // Configured labels win over derived ones.
    all_labels.extend(labels.clone());
    let cores = sys
        .as_ref()
        .map(|s| s.cpus().len())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    Info {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: System::host_name().unwrap_or_default(),
        arch,
        os: System::long_os_version().ok(),
        kernel: System::kernel_version().ok(),
        cpu_model: sys
            .as_ref()
            .and_then(|s| s.cpus().first())
            .map(|c| c.brand().trim().to_owned())
            .filter(|b| !b.is_empty()),
        cpu_cores: u32::try_from(cores).unwrap_or(u32::MAX),
        memory_total_bytes: sys.as_ref().map_or(0, System::total_memory),
        board,
        labels: all_labels,
    }
}

/// Keeps the sysinfo handles between samples (CPU use needs two readings).
#[derive(Debug)]
pub struct Sampler {
    sys: Option<System>,
    disks: Option<Disks>,
    data_dir: PathBuf,
}

impl Sampler {
    pub fn new(data_dir: &Path) -> Self {
        let sys = System::new()
            .map_err(|e| tracing::debug!(error = %e, "no CPU/memory figures"))
            .ok()
            .map(|mut sys| {
                sys.refresh_cpu_usage();
                sys
            });
        let disks = Disks::new_with_refreshed_list()
            .map_err(|e| tracing::debug!(error = %e, "no disk figures"))
            .ok();
        Self {
            sys,
            disks,
            data_dir: data_dir
                .canonicalize()
                .unwrap_or_else(|_| data_dir.to_owned()),
        }
    }

    /// One telemetry message; `inference` comes from the serving slots.
    pub fn sample(&mut self, inference: BTreeMap<SlotName, SlotStats>) -> Telemetry {
        if let Some(sys) = &mut self.sys {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
        }
        // The filesystem holding the store: the longest mount point that prefixes data_dir.
        let disk_free_bytes = self.disks.as_mut().and_then(|disks| {
            disks.refresh(true);
            disks
                .iter()
                .filter(|d| self.data_dir.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .map(|d| d.available_space())
        });
        let load = System::load_average().ok();
        Telemetry {
            at: Timestamp::now(),
            uptime_s: System::uptime().unwrap_or_default(),
            cpu_percent: self.sys.as_ref().map_or(0.0, System::global_cpu_usage),
            load_1m: load.map(|l| l.one),
            memory_used_bytes: self.sys.as_ref().map_or(0, System::used_memory),
            memory_total_bytes: self.sys.as_ref().map_or(0, System::total_memory),
            disk_free_bytes,
            inference,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_reports_this_machine_with_derived_and_configured_labels() {
        let labels = BTreeMap::from([("site".to_owned(), "lab".to_owned())]);
        let info = info(&labels);
        assert_eq!(info.arch, std::env::consts::ARCH);
        assert!(info.cpu_cores >= 1);
        assert!(info.memory_total_bytes > 0);
        assert_eq!(info.labels.get("site").map(String::as_str), Some("lab"));
        assert_eq!(info.labels.get("arch"), Some(&info.arch));
    }

    #[test]
    fn telemetry_reads_memory_and_the_data_dir_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path());
        let t = s.sample(BTreeMap::new());
        assert!(t.memory_total_bytes >= t.memory_used_bytes);
        assert!(t.memory_used_bytes > 0);
        assert!(t.disk_free_bytes.is_some());
    }

    #[test]
    fn board_names_become_selector_friendly_labels() {
        assert_eq!(
            label_value("NVIDIA Jetson Orin Nano Developer Kit"),
            "nvidia-jetson-orin-nano-developer-kit"
        );
    }
}
