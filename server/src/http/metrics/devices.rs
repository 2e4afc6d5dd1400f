//! Device families of `GET /metrics`: presence for the whole fleet, and per-device gauges
//! (CPU, memory, GPU, temperatures) for online devices only, within cardinality limits.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use botfleet_protocol::engine::EngineKind;

use crate::devices::DeviceView;

/// Bounds on the number of labeled series (`[metrics]` in the server configuration).
pub use crate::config::MetricsConfig as Limits;

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// An `f32` as the decimal it was written as (25.3, not 25.299999237060547).
fn wide(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

fn header(body: &mut String, name: &str, help: &str) {
    let _ = writeln!(body, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// One per-device family: `value` picks zero or more (extra labels, value) per device.
fn per_device<F>(body: &mut String, name: &str, help: &str, devices: &[&DeviceView], value: F)
where
    F: Fn(&DeviceView) -> Vec<(String, f64)>,
{
    let mut lines = String::new();
    for d in devices {
        for (labels, v) in value(d) {
            if v.is_finite() {
                let _ = writeln!(lines, "{name}{{device=\"{}\"{labels}}} {v}", d.device_id);
            }
        }
    }
    if !lines.is_empty() {
        header(body, name, help);
        body.push_str(&lines);
    }
}

/// Online devices by the engine serving each slot: one series per slot and engine, so the
/// count stays small whatever the fleet's size.
fn engines(online: &[&DeviceView], body: &mut String) {
    let mut counts: BTreeMap<(&str, EngineKind), usize> = BTreeMap::new();
    for d in online {
        for (slot, engine) in &d.serving_engines {
            *counts.entry((slot.as_str(), *engine)).or_default() += 1;
        }
    }
    header(
        body,
        "botfleet_devices_engine",
        "Online devices by the engine serving each slot.",
    );
    for ((slot, engine), n) in counts {
        let _ = writeln!(
            body,
            "botfleet_devices_engine{{slot=\"{}\",engine=\"{engine}\"}} {n}",
            escape(slot)
        );
    }
}

/// Appends the device families for `devices` to `body`.
pub fn render(devices: &[DeviceView], limits: &Limits, body: &mut String) {
    let online: Vec<&DeviceView> = devices.iter().filter(|d| d.online).collect();
    header(body, "botfleet_devices", "Known devices by presence.");
    let _ = writeln!(
        body,
        "botfleet_devices{{state=\"online\"}} {}",
        online.len()
    );
    let _ = writeln!(
        body,
        "botfleet_devices{{state=\"offline\"}} {}",
        devices.len() - online.len()
    );
    engines(&online, body);
    let shown = &online[..online.len().min(limits.max_devices)];
    header(
        body,
        "botfleet_device_series_omitted",
        "Online devices left out of per-device series by the cardinality limit.",
    );
    let _ = writeln!(
        body,
        "botfleet_device_series_omitted {}",
        online.len() - shown.len()
    );
    let single = |v: Option<f64>| v.map(|v| (String::new(), v)).into_iter().collect();
    per_device(
        body,
        "botfleet_device_cpu_percent",
        "Whole-machine CPU use in percent.",
        shown,
        |d| single(d.telemetry.as_ref().map(|t| wide(t.cpu_percent))),
    );
    per_device(
        body,
        "botfleet_device_memory_used_bytes",
        "Memory in use.",
        shown,
        |d| single(d.telemetry.as_ref().map(|t| t.memory_used_bytes as f64)),
    );
    per_device(
        body,
        "botfleet_device_agent_rss_bytes",
        "Resident memory of the agent process.",
        shown,
        |d| {
            single(
                d.telemetry
                    .as_ref()
                    .and_then(|t| t.agent_rss_bytes)
                    .map(|v| v as f64),
            )
        },
    );
    let gpu = |pick: fn(&botfleet_protocol::messages::GpuTelemetry) -> Option<f64>| {
        move |d: &DeviceView| -> Vec<(String, f64)> {
            d.telemetry
                .iter()
                .flat_map(|t| t.gpus.iter().enumerate())
                .take(limits.max_gpus_per_device)
                .filter_map(|(i, g)| Some((format!(",gpu=\"{i}\""), pick(g)?)))
                .collect()
        }
    };
    per_device(
        body,
        "botfleet_device_gpu_load_percent",
        "GPU load in percent (NVML, or Jetson sysfs).",
        shown,
        gpu(|g| g.load_percent.map(wide)),
    );
    per_device(
        body,
        "botfleet_device_gpu_temperature_celsius",
        "GPU temperature.",
        shown,
        gpu(|g| g.temperature_c.map(wide)),
    );
    per_device(
        body,
        "botfleet_device_gpu_power_milliwatts",
        "GPU power draw.",
        shown,
        gpu(|g| g.power_mw.map(|p| p as f64)),
    );
    per_device(
        body,
        "botfleet_device_temperature_celsius",
        "Temperatures by sensor (the first sensors by name, up to the limit).",
        shown,
        |d| {
            d.telemetry
                .iter()
                .flat_map(|t| t.temperatures_c.iter())
                .take(limits.max_sensors_per_device)
                .map(|(name, c)| (format!(",sensor=\"{}\"", escape(name)), wide(*c)))
                .collect()
        },
    );
}

#[cfg(test)]
mod tests {
    use botfleet_protocol::DeviceId;
    use botfleet_protocol::messages::Telemetry;
    use jiff::Timestamp;

    use super::*;
    use crate::devices::Devices;

    fn fleet(n: usize) -> Vec<DeviceView> {
        let mut devices = Devices::default();
        let now = Timestamp::UNIX_EPOCH;
        for i in 0..n {
            let id = DeviceId::new(format!("robot-{i}")).unwrap();
            let status = serde_json::from_str(
                r#"{"online":true,"agent_version":"0.1.0","at":"2026-01-01T00:00:00Z"}"#,
            )
            .unwrap();
            devices.apply_status(&id, status, now);
            let t: Telemetry = serde_json::from_str(
                r#"{"at":"2026-01-01T00:00:00Z","uptime_s":1,"cpu_percent":12.5,
                "memory_used_bytes":100,"memory_total_bytes":200,
                "temperatures_c":{"a\"b":40.0,"c":41.0,"d":42.0},
                "gpus":[{"source":"jetson_sysfs","load_percent":25.3,"temperature_c":47.0}]}"#,
            )
            .unwrap();
            devices.apply_telemetry(&id, t, now);
        }
        devices.list()
    }

    #[test]
    fn online_devices_get_cpu_gpu_and_temperature_series() {
        let mut body = String::new();
        render(&fleet(1), &Limits::default(), &mut body);
        for line in [
            "botfleet_devices{state=\"online\"} 1",
            "botfleet_device_cpu_percent{device=\"robot-0\"} 12.5",
            "botfleet_device_gpu_load_percent{device=\"robot-0\",gpu=\"0\"} 25.3",
            "botfleet_device_temperature_celsius{device=\"robot-0\",sensor=\"a\\\"b\"} 40",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "{line} missing from\n{body}"
            );
        }
        assert!(!body.contains("gpu_power"), "absent figures make no series");
    }

    #[test]
    fn online_devices_are_counted_by_the_engine_serving_each_slot() {
        let mut devices = Devices::default();
        let now = Timestamp::UNIX_EPOCH;
        let engines = [
            ("robot-0", Some("onnxruntime-cpu"), true),
            ("robot-1", Some("onnxruntime-cpu"), true),
            ("robot-2", None, true),
            ("robot-3", Some("onnxruntime-cuda"), false),
        ];
        for (id, engine, online) in engines {
            let mut model = serde_json::json!({"name": "m", "version": "1", "release": 1,
                "sha256": botfleet_protocol::manifest::Sha256Digest::of(b"m"),
                "since": "2026-01-01T00:00:00Z"});
            if let Some(engine) = engine {
                model["engine"] = engine.into();
            }
            let status = serde_json::from_value(serde_json::json!({"online": online,
                "agent_version": "0.2.0", "at": "2026-01-01T00:00:00Z",
                "active": {"orientation": model}}))
            .unwrap();
            devices.apply_status(&DeviceId::new(id).unwrap(), status, now);
        }
        let mut body = String::new();
        render(&devices.list(), &Limits::default(), &mut body);
        let series: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("botfleet_devices_engine{"))
            .collect();
        assert_eq!(
            series,
            [
                "botfleet_devices_engine{slot=\"orientation\",engine=\"tract\"} 1",
                "botfleet_devices_engine{slot=\"orientation\",engine=\"onnxruntime-cpu\"} 2",
            ],
            "offline devices serve nothing; an old agent serves on tract"
        );
        assert!(body.contains("# TYPE botfleet_devices_engine gauge"));
    }

    #[test]
    fn series_stay_within_the_cardinality_limits() {
        let limits = Limits {
            max_devices: 2,
            max_sensors_per_device: 1,
            max_gpus_per_device: 1,
        };
        let mut body = String::new();
        render(&fleet(5), &limits, &mut body);
        let count = |prefix: &str| body.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(count("botfleet_device_cpu_percent{"), 2);
        assert_eq!(count("botfleet_device_temperature_celsius{"), 2);
        assert!(body.contains("botfleet_device_series_omitted 3"));
        assert!(body.contains("botfleet_devices{state=\"online\"} 5"));
    }
}
