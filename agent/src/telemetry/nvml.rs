//! Discrete NVIDIA GPUs through NVML. Nothing links libnvidia-ml: `Nvml::init` loads it at
//! run time and fails where it is missing (every Jetson, every machine without the driver).
//! Each failure is classified by its error variant and logged once; the GPU fields are
//! then absent.

use botfleet_protocol::messages::{GpuInfo, GpuSource, GpuTelemetry};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

/// Why NVML gives nothing on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// `[telemetry] nvml = false`.
    Disabled,
    /// libnvidia-ml is not installed (or a symbol is missing: too old).
    NoLibrary,
    /// The library is there, the kernel driver is not.
    NoDriver,
    NoPermission,
    /// NVML answers "not supported" (integrated GPUs such as Jetson).
    NotSupported,
    /// NVML works but sees no GPU.
    NoDevice,
    Other,
}

impl Unavailable {
    pub fn classify(err: &NvmlError) -> Self {
        match err {
            NvmlError::LibloadingError(_)
            | NvmlError::LibraryNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::FunctionNotFound => Self::NoLibrary,
            NvmlError::DriverNotLoaded | NvmlError::LibRmVersionMismatch => Self::NoDriver,
            NvmlError::NoPermission => Self::NoPermission,
            NvmlError::NotSupported => Self::NotSupported,
            NvmlError::NotFound | NvmlError::GpuLost => Self::NoDevice,
            _ => Self::Other,
        }
    }
}

/// A working NVML with at least one GPU, or nothing.
#[derive(Debug)]
pub struct NvmlProbe {
    nvml: Option<(Nvml, u32)>,
}

impl NvmlProbe {
    pub fn open(enabled: bool) -> Self {
        match Self::try_open(enabled) {
            Ok(found) => Self { nvml: Some(found) },
            Err((why, err)) => {
                tracing::debug!(
                    ?why,
                    error = err.as_deref().unwrap_or("-"),
                    "no NVML; discrete GPU fields absent"
                );
                Self { nvml: None }
            }
        }
    }

    fn try_open(enabled: bool) -> Result<(Nvml, u32), (Unavailable, Option<String>)> {
        if !enabled {
            return Err((Unavailable::Disabled, None));
        }
        let fail = |e: NvmlError| (Unavailable::classify(&e), Some(e.to_string()));
        let nvml = Nvml::init().map_err(fail)?;
        let count = nvml.device_count().map_err(fail)?;
        if count == 0 {
            return Err((Unavailable::NoDevice, None));
        }
        Ok((nvml, count.min(16)))
    }

    pub fn is_present(&self) -> bool {
        self.nvml.is_some()
    }

    pub fn info(&self) -> Vec<GpuInfo> {
        let Some((nvml, count)) = &self.nvml else {
            return Vec::new();
        };
        let driver = nvml.sys_driver_version().ok();
        (0..*count)
            .filter_map(|i| nvml.device_by_index(i).ok())
            .map(|d| GpuInfo {
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
                memory_total_bytes: d.memory_info().ok().map(|m| m.total),
                driver_version: driver.clone(),
            })
            .collect()
    }

    /// The first GPU's CUDA compute capability, `major.minor`.
    pub fn compute_capability(&self) -> Option<String> {
        let (nvml, _) = self.nvml.as_ref()?;
        let cc = nvml
            .device_by_index(0)
            .ok()?
            .cuda_compute_capability()
            .ok()?;
        Some(format!("{}.{}", cc.major, cc.minor))
    }

    pub fn sample(&self) -> Vec<GpuTelemetry> {
        let Some((nvml, count)) = &self.nvml else {
            return Vec::new();
        };
        (0..*count)
            .filter_map(|i| nvml.device_by_index(i).ok())
            .map(|d| {
                let memory = d.memory_info().ok();
                GpuTelemetry {
                    source: GpuSource::Nvml,
                    name: d.name().ok(),
                    load_percent: d.utilization_rates().ok().map(|u| u.gpu as f32),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: memory.as_ref().map(|m| m.total),
                    temperature_c: d.temperature(TemperatureSensor::Gpu).ok().map(|t| t as f32),
                    power_mw: d.power_usage().ok().map(u64::from),
                    freq_mhz: d.clock_info(Clock::Graphics).ok(),
                    max_freq_mhz: d.max_clock_info(Clock::Graphics).ok(),
                    throttle: d
                        .current_throttle_reasons()
                        .map(throttle_names)
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

/// The throttle reasons that mean "slowed down", not "idle" or "as configured".
fn throttle_names(reasons: ThrottleReasons) -> Vec<String> {
    [
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake"),
    ]
    .into_iter()
    .filter(|(flag, _)| reasons.contains(*flag))
    .map(|(_, name)| name.to_owned())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_failures_are_classified_by_variant() {
        assert_eq!(
            Unavailable::classify(&NvmlError::DriverNotLoaded),
            Unavailable::NoDriver
        );
        assert_eq!(
            Unavailable::classify(&NvmlError::NotSupported),
            Unavailable::NotSupported
        );
        assert_eq!(
            Unavailable::classify(&NvmlError::NoPermission),
            Unavailable::NoPermission
        );
        assert_eq!(
            Unavailable::classify(&NvmlError::FunctionNotFound),
            Unavailable::NoLibrary
        );
        assert_eq!(
            Unavailable::classify(&NvmlError::Unknown),
            Unavailable::Other
        );
    }

    #[test]
    fn disabled_nvml_is_absent_without_touching_the_library() {
        let probe = NvmlProbe::open(false);
        assert!(!probe.is_present());
        assert!(probe.info().is_empty() && probe.sample().is_empty());
    }

    #[test]
    fn only_slowdowns_count_as_throttling() {
        let names =
            throttle_names(ThrottleReasons::GPU_IDLE | ThrottleReasons::HW_THERMAL_SLOWDOWN);
        assert_eq!(names, ["hw_thermal"]);
    }
}
