//! Guards: a hot robot, or one on a low battery that is not charging, does not benchmark a
//! new model now. The gate runs the candidate flat out for many runs; on a robot already
//! throttling, or about to run out of charge, that costs what the robot needs to do its job
//! (and the figures would be wrong anyway). The install is put off and looked at again every
//! [`GuardsConfig::recheck_s`](crate::config::GuardsConfig) seconds, reported as `deferred`.
//!
//! Temperatures are the thermal zones the telemetry reads; the battery is the kernel's
//! power-supply class (`{root}/sys/class/power_supply/*/{type,capacity,status}`, type
//! `Battery`; Documentation/ABI/testing/sysfs-class-power).

use std::path::{Path, PathBuf};

use crate::config::GuardsConfig;
use crate::telemetry::read;
use crate::telemetry::thermal::ThermalZones;

/// Why a guard holds the gate back.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    /// `thermal` or `battery`.
    pub guard: &'static str,
    pub message: String,
}

/// One battery as read now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Battery {
    pub percent: u8,
    pub charging: bool,
}

/// The sensors found at start, and the limits.
#[derive(Debug)]
pub struct Guards {
    thermal: ThermalZones,
    batteries: Vec<PathBuf>,
    config: GuardsConfig,
}

impl Guards {
    pub fn discover(root: &Path, config: &GuardsConfig) -> Self {
        let base = root.join("sys/class/power_supply");
        let batteries = read::dir_names(&base)
            .into_iter()
            .map(|name| base.join(name))
            .filter(|dir| read::opt_text(&dir.join("type")).as_deref() == Some("Battery"))
            .collect();
        Self {
            thermal: ThermalZones::discover(root),
            batteries,
            config: config.clone(),
        }
    }

    /// Reads the sensors and judges them.
    pub fn check(&self) -> Option<Trip> {
        let temps = self.thermal.read();
        let batteries: Vec<Battery> = self
            .batteries
            .iter()
            .filter_map(|dir| {
                let percent = read::int(&dir.join("capacity")).ok()?;
                let status = read::opt_text(&dir.join("status")).unwrap_or_default();
                Some(Battery {
                    percent: u8::try_from(percent.clamp(0, 100)).ok()?,
                    charging: matches!(status.as_str(), "Charging" | "Full"),
                })
            })
            .collect();
        judge(
            temps.iter().map(|(name, c)| (name.as_str(), *c)),
            &batteries,
            &self.config,
        )
    }

    pub fn recheck(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.recheck_s.max(1))
    }
}

/// The hottest zone over `max_temp_c`, else a discharging battery under
/// `min_battery_percent`; a limit of 0 is off.
pub fn judge<'a>(
    temps: impl IntoIterator<Item = (&'a str, f32)>,
    batteries: &[Battery],
    config: &GuardsConfig,
) -> Option<Trip> {
    if config.max_temp_c > 0.0 {
        let hottest = temps
            .into_iter()
            .filter(|(_, c)| *c >= config.max_temp_c)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((zone, c)) = hottest {
            return Some(Trip {
                guard: "thermal",
                message: format!(
                    "{zone} is at {c:.1} °C, at or over {:.1} °C",
                    config.max_temp_c
                ),
            });
        }
    }
    if config.min_battery_percent > 0 {
        let low = batteries
            .iter()
            .filter(|b| !b.charging && b.percent < config.min_battery_percent)
            .min_by_key(|b| b.percent);
        if let Some(b) = low {
            return Some(Trip {
                guard: "battery",
                message: format!(
                    "battery at {} %, under {} % and not charging",
                    b.percent, config.min_battery_percent
                ),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GuardsConfig {
        GuardsConfig {
            max_temp_c: 85.0,
            min_battery_percent: 20,
            recheck_s: 30,
        }
    }

    #[test]
    fn the_hottest_zone_over_the_limit_trips_and_a_cool_robot_passes() {
        let trip = judge([("CPU-therm", 86.5), ("GPU-therm", 91.0)], &[], &config()).unwrap();
        assert_eq!(trip.guard, "thermal");
        assert_eq!(trip.message, "GPU-therm is at 91.0 °C, at or over 85.0 °C");
        assert_eq!(judge([("CPU-therm", 84.9)], &[], &config()), None);
        let off = GuardsConfig {
            max_temp_c: 0.0,
            ..config()
        };
        assert_eq!(judge([("CPU-therm", 120.0)], &[], &off), None);
    }

    #[test]
    fn a_low_battery_trips_only_while_it_is_not_charging() {
        let low = Battery {
            percent: 12,
            charging: false,
        };
        let trip = judge([], &[low], &config()).unwrap();
        assert_eq!(trip.guard, "battery");
        assert!(trip.message.contains("12 %"), "{}", trip.message);
        let charging = Battery {
            charging: true,
            ..low
        };
        assert_eq!(judge([], &[charging], &config()), None);
        let fine = Battery {
            percent: 20,
            charging: false,
        };
        assert_eq!(judge([], &[fine], &config()), None);
    }

    #[test]
    fn sensors_are_read_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let zone = root.path().join("sys/class/thermal/thermal_zone0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("type"), "CPU-therm\n").unwrap();
        std::fs::write(zone.join("temp"), "90500\n").unwrap();
        let battery = root.path().join("sys/class/power_supply/BAT0");
        std::fs::create_dir_all(&battery).unwrap();
        std::fs::write(battery.join("type"), "Battery\n").unwrap();
        std::fs::write(battery.join("capacity"), "9\n").unwrap();
        std::fs::write(battery.join("status"), "Discharging\n").unwrap();
        let mains = root.path().join("sys/class/power_supply/AC");
        std::fs::create_dir_all(&mains).unwrap();
        std::fs::write(mains.join("type"), "Mains\n").unwrap();
        let guards = Guards::discover(root.path(), &config());
        assert_eq!(guards.check().map(|t| t.guard), Some("thermal"));
        std::fs::write(zone.join("temp"), "40000\n").unwrap();
        assert_eq!(guards.check().map(|t| t.guard), Some("battery"));
        std::fs::write(battery.join("status"), "Charging\n").unwrap();
        assert_eq!(guards.check(), None);
    }
}
