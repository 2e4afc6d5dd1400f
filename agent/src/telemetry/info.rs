//! The retained `info` document: static facts and the labels selectors match on.

use std::collections::BTreeMap;
use std::path::Path;

use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::{GpuInfo, Info, JetsonInfo};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use super::read;

/// Label values must be usable in selectors: lowercase, anything but `[a-z0-9._-]` → '-'.
pub fn label_value(s: &str) -> String {
    s.trim()
        .chars()
        .take(63)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Derived labels (`arch`, `board`, `l4t`, `jetpack`, `gpu`, `accelerator`) under the
/// configured ones: a configured label wins.
pub fn labels(
    arch: &str,
    board: Option<&str>,
    jetson: Option<&JetsonInfo>,
    gpus: &[GpuInfo],
    configured: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("arch".to_owned(), arch.to_owned())]);
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v.map(label_value).filter(|v| !v.is_empty()) {
            labels.insert(k.to_owned(), v);
        }
    };
    put("board", board);
    put("l4t", jetson.and_then(|j| j.l4t.as_deref()));
    put("jetpack", jetson.and_then(|j| j.jetpack.as_deref()));
    let gpu = jetson
        .and_then(|j| j.gpu.as_deref())
        .or_else(|| gpus.first().map(|g| g.name.as_str()));
    put("gpu", gpu);
    put(
        "accelerator",
        Some(if gpu.is_some() { "true" } else { "false" }),
    );
    labels.extend(configured.clone());
    labels
}

/// `{root}/etc/machine-id`: 32 hex digits (machine-id(5)); anything else is absent.
pub fn machine_id(root: &Path) -> Option<String> {
    let id = read::opt_text(&root.join("etc/machine-id"))?;
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// The facts sysinfo knows about this machine.
pub fn host_info(device: &DeviceId, root: &Path) -> Info {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .map_err(|e| tracing::debug!(error = %e, "sysinfo unavailable"))
    .ok();
    let cores = sys
        .as_ref()
        .map(|s| s.cpus().len())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    Info {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: System::host_name().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_owned(),
        os: System::long_os_version().ok(),
        kernel: System::kernel_version().ok(),
        cpu_model: sys
            .as_ref()
            .and_then(|s| s.cpus().first())
            .map(|c| c.brand().trim().to_owned())
            .filter(|b| !b.is_empty()),
        cpu_cores: u32::try_from(cores).unwrap_or(u32::MAX),
        memory_total_bytes: sys.as_ref().map_or(0, System::total_memory),
        board: None,
        labels: BTreeMap::new(),
        device: Some(device.clone()),
        machine_id: machine_id(root),
        disks: super::host::disks(),
        jetson: None,
        gpus: Vec::new(),
        engines: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_names_become_selector_friendly_labels() {
        assert_eq!(
            label_value("NVIDIA Jetson Orin Nano Developer Kit"),
            "nvidia-jetson-orin-nano-developer-kit"
        );
    }

    #[test]
    fn configured_labels_win_over_derived_ones() {
        let configured = BTreeMap::from([("gpu".to_owned(), "custom".to_owned())]);
        let jetson = JetsonInfo {
            l4t: Some("35.4.1".into()),
            jetpack: Some("5.1.2".into()),
            gpu: Some("ga10b".into()),
        };
        let l = labels(
            "aarch64",
            Some("Jetson-AGX"),
            Some(&jetson),
            &[],
            &configured,
        );
        assert_eq!(l["gpu"], "custom");
        assert_eq!(l["jetpack"], "5.1.2");
        assert_eq!(l["board"], "jetson-agx");
        assert_eq!(l["accelerator"], "true");
        let plain = labels("x86_64", None, None, &[], &BTreeMap::new());
        assert_eq!(plain.get("accelerator").map(String::as_str), Some("false"));
        assert!(!plain.contains_key("board") && !plain.contains_key("gpu"));
    }
}
