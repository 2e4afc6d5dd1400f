//! Whole-machine figures through sysinfo: CPU (total and per core), load, memory and swap,
//! the data directory's filesystem, network rates and hardware-monitor temperatures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sysinfo::{Components, Disks, Networks, System};

use super::read;
use super::thermal;

/// What one host sample measured; `None` where the probe is unavailable.
#[derive(Debug, Default)]
pub struct HostSample {
    pub cpu_percent: Option<f32>,
    pub cpu_per_core: Vec<f32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub swap_used_bytes: Option<u64>,
    pub swap_total_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    pub net_rx_bytes_per_s: Option<u64>,
    pub net_tx_bytes_per_s: Option<u64>,
    pub temperatures_c: BTreeMap<String, f32>,
}

/// The sysinfo handles, kept between samples (rates need two readings).
#[derive(Debug)]
pub struct Host {
    sys: Option<System>,
    disks: Option<Disks>,
    networks: Option<(Networks, Instant)>,
    components: Option<Components>,
    cpu_read: Instant,
    data_dir: PathBuf,
}

impl Host {
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
        let networks = Networks::new_with_refreshed_list()
            .map_err(|e| tracing::debug!(error = %e, "no network figures"))
            .ok()
            .map(|n| (n, Instant::now()));
        let components = Components::new_with_refreshed_list()
            .map_err(|e| tracing::debug!(error = %e, "no hardware monitors"))
            .ok()
            .filter(|c| {
                let any = !c.is_empty();
                if !any {
                    tracing::debug!("no hardware-monitor temperature sensors");
                }
                any
            });
        Self {
            sys,
            disks,
            networks,
            components,
            cpu_read: Instant::now(),
            data_dir: data_dir
                .canonicalize()
                .unwrap_or_else(|_| data_dir.to_owned()),
        }
    }

    pub fn sample(&mut self) -> HostSample {
        let mut s = HostSample::default();
        if let Some(sys) = &mut self.sys {
            sys.refresh_memory();
            // CPU use is a difference of two readings; too close together it is noise
            // (the first sample right after start-up), so it is left out then.
            if self.cpu_read.elapsed() >= sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
                sys.refresh_cpu_usage();
                self.cpu_read = Instant::now();
                s.cpu_percent = Some(sys.global_cpu_usage());
                s.cpu_per_core = sys.cpus().iter().map(|c| c.usage()).collect();
            }
            s.memory_used_bytes = Some(sys.used_memory());
            s.memory_total_bytes = Some(sys.total_memory());
            s.swap_used_bytes = Some(sys.used_swap());
            s.swap_total_bytes = Some(sys.total_swap());
        }
        // The filesystem holding the store: the longest mount point that prefixes data_dir.
        if let Some(disks) = &mut self.disks {
            disks.refresh(true);
            if let Some(d) = disks
                .iter()
                .filter(|d| self.data_dir.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
            {
                s.disk_free_bytes = Some(d.available_space());
                s.disk_total_bytes = Some(d.total_space());
            }
        }
        if let Some((networks, last)) = &mut self.networks {
            // Interfaces that went away are dropped; new ones count from their first reading.
            networks.refresh(true);
            let now = Instant::now();
            let secs = now.duration_since(*last).as_secs_f64();
            *last = now;
            let (rx, tx) = networks
                .iter()
                .filter(|(name, _)| name.as_os_str() != "lo")
                .fold((0u64, 0u64), |(rx, tx), (_, n)| {
                    (
                        rx.saturating_add(n.received()),
                        tx.saturating_add(n.transmitted()),
                    )
                });
            if secs > 0.0 {
                s.net_rx_bytes_per_s = Some((rx as f64 / secs) as u64);
                s.net_tx_bytes_per_s = Some((tx as f64 / secs) as u64);
            }
        }
        if let Some(components) = &mut self.components {
            components.refresh(true);
            for c in components.iter() {
                let (Some(name), Some(t)) = (read::clean_name(c.label()), c.temperature()) else {
                    continue;
                };
                if t.is_finite() && thermal::millideg((t * 1000.0) as i64).is_some() {
                    s.temperatures_c.insert(name, t);
                }
            }
        }
        s
    }
}

/// Mounted filesystems and their sizes, for the static info (at most 32).
pub fn disks() -> Vec<botfleet_protocol::messages::DiskInfo> {
    let Ok(disks) = Disks::new_with_refreshed_list() else {
        return Vec::new();
    };
    let mut out: Vec<botfleet_protocol::messages::DiskInfo> = Vec::new();
    for d in disks.iter() {
        let mount_point = d.mount_point().to_string_lossy().into_owned();
        if out.iter().any(|o| o.mount_point == mount_point) {
            continue;
        }
        out.push(botfleet_protocol::messages::DiskInfo {
            mount_point,
            total_bytes: d.total_space(),
        });
        if out.len() == 32 {
            break;
        }
    }
    out
}
