//! Jetson power rails from the INA3221 monitors on the I²C bus, as jetson_stats finds them
//! (jtop/core/power.py, `find_all_i2c_power_monitor`):
//! `{root}/sys/bus/i2c/devices/*/name` containing `ina3221`, then
//! - JetPack 5+ (hwmon driver): `hwmon/hwmon*/in{N}_label`, `in{N}_input` (mV),
//!   `curr{N}_input` (mA); labels `NC` are unconnected and channel 7 is the shunt sum;
//! - JetPack 4 (iio driver): `iio:device*/rail_name_{N}`, `in_power{N}_input` (mW).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::read;

/// Boards have two or three monitors of three channels.
const MAX_RAILS: usize = 32;

#[derive(Debug, Clone)]
enum Source {
    /// Voltage (mV) and current (mA) files.
    VoltCurr { volt: PathBuf, curr: PathBuf },
    /// A power file (mW).
    Power(PathBuf),
}

/// The rails found at start-up.
#[derive(Debug, Default)]
pub struct Rails {
    rails: Vec<(String, Source)>,
}

impl Rails {
    pub fn discover(root: &Path) -> Self {
        let base = root.join("sys/bus/i2c/devices");
        let mut rails = Vec::new();
        for device in read::dir_names(&base) {
            let dir = base.join(&device);
            let is_ina = read::opt_text(&dir.join("name")).is_some_and(|n| n.contains("ina3221"));
            if !is_ina {
                continue;
            }
            for sub in read::dir_names(&dir) {
                if sub == "hwmon" {
                    let hwmon = dir.join("hwmon");
                    for h in read::dir_names(&hwmon) {
                        hwmon_rails(&hwmon.join(h), &mut rails);
                    }
                } else if sub.starts_with("iio:device") {
                    iio_rails(&dir.join(&sub), &mut rails);
                }
            }
        }
        rails.truncate(MAX_RAILS);
        if rails.is_empty() {
            tracing::debug!(path = %base.display(), "no INA3221 power monitor; rails absent");
        }
        Self { rails }
    }

    /// Power per rail in mW; rails that cannot be read now are left out.
    pub fn read(&self) -> BTreeMap<String, u64> {
        self.rails
            .iter()
            .filter_map(|(name, source)| Some((name.clone(), read_mw(source)?)))
            .collect()
    }

    /// The GPU's own rail (`VDD_GPU_SOC` on AGX Orin, `GPU` on Xavier), not shared ones
    /// such as `VDD_CPU_GPU_CV`.
    pub fn gpu_mw(&self) -> Option<u64> {
        self.rails
            .iter()
            .find(|(name, _)| name.contains("GPU") && !name.contains("CPU"))
            .and_then(|(_, source)| read_mw(source))
    }
}

fn read_mw(source: &Source) -> Option<u64> {
    match source {
        Source::VoltCurr { volt, curr } => {
            let mv = read::opt_u64(volt)?;
            let ma = read::opt_u64(curr)?;
            Some(mv.checked_mul(ma)? / 1000)
        }
        Source::Power(path) => read::opt_u64(path),
    }
}

fn hwmon_rails(dir: &Path, rails: &mut Vec<(String, Source)>) {
    for file in read::dir_names(dir) {
        let Some(n) = file
            .strip_prefix("in")
            .and_then(|f| f.strip_suffix("_label"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(label) = read::opt_text(&dir.join(&file)).and_then(|l| read::clean_name(&l))
        else {
            continue;
        };
        if n == 7 || label == "NC" || label.contains("sum of shunt") {
            continue;
        }
        rails.push((
            label,
            Source::VoltCurr {
                volt: dir.join(format!("in{n}_input")),
                curr: dir.join(format!("curr{n}_input")),
            },
        ));
    }
}

fn iio_rails(dir: &Path, rails: &mut Vec<(String, Source)>) {
    for file in read::dir_names(dir) {
        let Some(n) = file
            .strip_prefix("rail_name_")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(label) = read::opt_text(&dir.join(&file)).and_then(|l| read::clean_name(&l))
        else {
            continue;
        };
        rails.push((label, Source::Power(dir.join(format!("in_power{n}_input")))));
    }
}
