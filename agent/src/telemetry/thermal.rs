//! Thermal zones by name: `{root}/sys/class/thermal/thermal_zone*/{type,temp}`.
//!
//! The kernel's thermal sysfs ABI (Documentation/ABI/testing/sysfs-class-thermal); jetson_stats
//! reads the same files through `/sys/devices/virtual/thermal` (jtop/core/temperature.py),
//! which `/sys/class/thermal` links to. Temperatures are millidegrees Celsius.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::read;

/// Jetson reports an offline sensor as -256 °C (jtop/core/temperature.py,
/// `TEMPERATURE_OFFLINE`); anything outside this range is not a real reading.
const PLAUSIBLE_C: std::ops::RangeInclusive<f32> = -60.0..=200.0;

/// Zones are at most a few dozen; a broken tree must not make the message large.
const MAX_ZONES: usize = 64;

/// The thermal zones found at start-up.
#[derive(Debug, Default)]
pub struct ThermalZones {
    /// (name, temp file)
    zones: Vec<(String, PathBuf)>,
}

impl ThermalZones {
    pub fn discover(root: &Path) -> Self {
        let base = root.join("sys/class/thermal");
        let mut zones: Vec<(String, PathBuf)> = Vec::new();
        for entry in read::dir_names(&base)
            .into_iter()
            .filter(|n| n.starts_with("thermal_zone"))
        {
            let dir = base.join(&entry);
            let Some(name) = read::opt_text(&dir.join("type")).and_then(|t| read::clean_name(&t))
            else {
                continue;
            };
            // PMIC-Die reads a fixed 100 °C on Jetson TX/Xavier (jetson_stats skips it too).
            if name.contains("PMIC") {
                continue;
            }
            let name = unique(&zones, name);
            zones.push((name, dir.join("temp")));
            if zones.len() == MAX_ZONES {
                break;
            }
        }
        if zones.is_empty() {
            tracing::debug!(path = %base.display(), "no thermal zones; temperatures from zones absent");
        }
        Self { zones }
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// Current readings in °C; offline or unreadable zones are left out.
    pub fn read(&self) -> BTreeMap<String, f32> {
        self.zones
            .iter()
            .filter_map(|(name, path)| Some((name.clone(), millideg(read::int(path).ok()?)?)))
            .collect()
    }
}

/// A name not yet taken: `GPU-therm`, `GPU-therm-1`, …
fn unique(zones: &[(String, PathBuf)], name: String) -> String {
    let taken = |n: &str| zones.iter().any(|(z, _)| z == n);
    if !taken(&name) {
        return name;
    }
    (1..)
        .map(|i| format!("{name}-{i}"))
        .find(|n| !taken(n))
        .unwrap_or(name)
}

/// Millidegrees → °C, `None` when implausible.
pub fn millideg(value: i64) -> Option<f32> {
    let c = value as f32 / 1000.0;
    PLAUSIBLE_C.contains(&c).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_and_absurd_readings_are_dropped() {
        assert_eq!(millideg(48_500), Some(48.5));
        assert_eq!(millideg(-256_000), None);
        assert_eq!(millideg(i64::MAX), None);
    }

    #[test]
    fn a_missing_thermal_tree_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let zones = ThermalZones::discover(dir.path());
        assert!(zones.is_empty() && zones.read().is_empty());
    }

    #[test]
    fn duplicate_zone_names_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        for (i, t) in [(0, 48_000), (1, 52_000)] {
            let z = dir
                .path()
                .join(format!("sys/class/thermal/thermal_zone{i}"));
            std::fs::create_dir_all(&z).unwrap();
            std::fs::write(z.join("type"), "soc-thermal\n").unwrap();
            std::fs::write(z.join("temp"), format!("{t}\n")).unwrap();
        }
        let temps = ThermalZones::discover(dir.path()).read();
        assert_eq!(temps.get("soc-thermal"), Some(&48.0));
        assert_eq!(temps.get("soc-thermal-1"), Some(&52.0));
    }
}
