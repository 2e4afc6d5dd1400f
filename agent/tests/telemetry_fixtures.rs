//! The Jetson readers against fake roots shaped like a real AGX Orin and AGX Xavier
//! (`tests/fixtures/sysfs`, provenance in its README), and against a broken one.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use botfleet_agent::config::TelemetryConfig;
use botfleet_agent::slots::Slots;
use botfleet_agent::telemetry::Sampler;
use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::GpuSource;

fn fixture(board: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(board)
}

fn sampler(root: &Path) -> (Sampler, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let config = TelemetryConfig {
        root: root.to_owned(),
        nvml: false,
    };
    let sampler = Sampler::new(DeviceId::new("robot-1").unwrap(), data.path(), &config);
    (sampler, data)
}

#[test]
fn an_orin_reports_its_board_release_gpu_rails_and_power_mode() {
    let (mut sampler, _data) = sampler(&fixture("orin"));
    let info = sampler.info(&BTreeMap::from([("site".to_owned(), "lab".to_owned())]));
    assert_eq!(
        info.board.as_deref(),
        Some("NVIDIA Jetson AGX Orin Developer Kit")
    );
    let jetson = info.jetson.as_ref().unwrap();
    assert_eq!(jetson.l4t.as_deref(), Some("35.4.1"));
    assert_eq!(jetson.jetpack.as_deref(), Some("5.1.2"));
    assert_eq!(jetson.gpu.as_deref(), Some("ga10b"));
    assert_eq!(
        info.machine_id.as_deref(),
        Some("0f3c5d7e9a1b4c6d8e0f1a2b3c4d5e6f")
    );
    for (k, v) in [
        ("board", "nvidia-jetson-agx-orin-developer-kit"),
        ("l4t", "35.4.1"),
        ("jetpack", "5.1.2"),
        ("gpu", "ga10b"),
        ("accelerator", "true"),
        ("site", "lab"),
    ] {
        assert_eq!(info.labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    assert_eq!(info.device.as_ref().map(|d| d.as_str()), Some("robot-1"));

    let t = sampler.sample(&Slots::default());
    assert_eq!(t.gpus.len(), 1, "{:?}", t.gpus);
    let gpu = &t.gpus[0];
    assert_eq!(gpu.source, GpuSource::JetsonSysfs);
    assert_eq!(gpu.name.as_deref(), Some("ga10b"));
    assert_eq!(gpu.load_percent, Some(25.3));
    assert_eq!(gpu.freq_mhz, Some(612));
    assert_eq!(gpu.max_freq_mhz, Some(816));
    // 816 MHz allowed of 1300 MHz available: the power mode caps the GPU clock.
    assert_eq!(gpu.throttle, ["freq_capped"]);
    assert_eq!(gpu.temperature_c, Some(47.0));
    assert_eq!(gpu.power_mw, Some(5008 * 1264 / 1000));
    assert_eq!(gpu.memory_used_bytes, None, "iGPU memory is system memory");
    // Offline zones (-256 °C) are absent, the others named as the board names them.
    assert_eq!(t.temperatures_c.get("cpu-thermal"), Some(&48.5));
    assert_eq!(t.temperatures_c.get("tj-thermal"), Some(&49.0));
    assert!(!t.temperatures_c.contains_key("cv0-thermal"));
    let board = t.board.as_ref().unwrap();
    assert_eq!(board.power_mode.as_deref(), Some("MODE_30W"));
    assert_eq!(board.emc_freq_mhz, Some(3199));
    assert_eq!(
        board.emc_load_percent, None,
        "no activity monitor on this image"
    );
    assert_eq!(
        board.rails_mw,
        BTreeMap::from([
            ("VDD_CPU_CV".to_owned(), 5008 * 480 / 1000),
            ("VDD_GPU_SOC".to_owned(), 5008 * 1264 / 1000),
            ("VDDQ_VDD2_1V8AO".to_owned(), 4992 * 168 / 1000),
            ("VIN_SYS_5V0".to_owned(), 5000 * 936 / 1000),
        ]),
        "NC channels and the shunt sum are skipped"
    );
}

#[test]
fn a_xavier_reports_iio_power_rails_and_memory_controller_load() {
    let (mut sampler, _data) = sampler(&fixture("xavier"));
    let info = sampler.info(&BTreeMap::new());
    assert_eq!(info.board.as_deref(), Some("Jetson-AGX"));
    assert_eq!(info.labels["board"], "jetson-agx");
    assert_eq!(info.labels["jetpack"], "4.6.1");
    assert_eq!(info.labels["gpu"], "gv11b");

    let t = sampler.sample(&Slots::default());
    let gpu = &t.gpus[0];
    assert_eq!(gpu.name.as_deref(), Some("gv11b"));
    assert_eq!(gpu.load_percent, Some(99.6));
    assert_eq!(gpu.freq_mhz, Some(1377));
    assert!(gpu.throttle.is_empty(), "running at the top clock");
    assert_eq!(gpu.temperature_c, Some(40.0));
    assert_eq!(gpu.power_mw, Some(4652));
    assert!(
        !t.temperatures_c.contains_key("PMIC-Die"),
        "PMIC-Die is a constant"
    );
    assert_eq!(t.temperatures_c.get("Tdiode_tegra"), Some(&38.25));
    let board = t.board.as_ref().unwrap();
    assert_eq!(board.power_mode.as_deref(), Some("MAXN"));
    assert_eq!(board.emc_freq_mhz, Some(2133));
    assert_eq!(board.emc_load_percent, Some(12.0));
    assert_eq!(board.rails_mw.get("SYS5V"), Some(&2028));
    assert_eq!(board.rails_mw.len(), 6);
}

/// A copy of the Orin tree with every value replaced by garbage, truncated or huge.
fn broken_orin() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("orin");
    let mut stack = vec![src.clone()];
    let garbage: [&[u8]; 5] = [
        b"",
        b"\xff\xfe\x00garbage",
        b"99999999999999999999999999999",
        b"-1",
        b"12",
    ];
    let mut i = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(&src).unwrap().to_owned();
            let to = dir.path().join(&rel);
            if e.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&to).unwrap();
                stack.push(e.path());
            } else {
                let name = rel.file_name().unwrap().to_string_lossy();
                // Keep names so the probes are found; break what they read.
                let keep = name == "name" || name == "type" || name.ends_with("_label");
                let bytes = if keep {
                    std::fs::read(e.path()).unwrap()
                } else {
                    i += 1;
                    garbage[i % garbage.len()].to_vec()
                };
                std::fs::write(&to, bytes).unwrap();
            }
        }
    }
    dir
}

#[test]
fn a_broken_tree_gives_absent_fields_never_a_panic() {
    let root = broken_orin();
    let (mut broken, _data) = sampler(root.path());
    let info = broken.info(&BTreeMap::new());
    assert!(
        info.jetson.as_ref().is_none_or(|j| j.l4t.is_none()),
        "{info:?}"
    );
    assert!(info.machine_id.is_none());
    let t = broken.sample(&Slots::default());
    for gpu in &t.gpus {
        assert!(gpu.load_percent.is_none_or(|l| (0.0..=100.0).contains(&l)));
    }
    for (name, c) in &t.temperatures_c {
        assert!((-60.0..=200.0).contains(c), "{name}: {c}");
    }
    // Non-UTF-8 sensor names are replaced, not refused.
    let weird = tempfile::tempdir().unwrap();
    let zone = weird.path().join("sys/class/thermal/thermal_zone0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("type"), b"gpu\xff-therm").unwrap();
    std::fs::write(zone.join("temp"), b"51000").unwrap();
    let (mut odd, _d) = sampler(weird.path());
    let t = odd.sample(&Slots::default());
    assert_eq!(t.temperatures_c.get("gpu\u{fffd}-therm"), Some(&51.0));
}

#[test]
fn this_machine_without_jetson_files_reports_them_absent_not_zero() {
    let empty = tempfile::tempdir().unwrap();
    let (mut sampler, _data) = sampler(empty.path());
    let info = sampler.info(&BTreeMap::new());
    assert!(info.jetson.is_none() && info.board.is_none() && info.gpus.is_empty());
    assert_eq!(info.labels["accelerator"], "false");
    let t = sampler.sample(&Slots::default());
    assert!(t.gpus.is_empty() && t.board.is_none());
    let json = serde_json::to_value(&t).unwrap();
    for absent in ["gpus", "board"] {
        assert!(
            json.get(absent).is_none(),
            "{absent} must be absent: {json}"
        );
    }
    assert!(t.agent_rss_bytes.is_some_and(|r| r > 0));
    assert!(t.memory_total_bytes > 0);
}
