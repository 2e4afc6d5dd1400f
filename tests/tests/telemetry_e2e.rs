//! Telemetry end to end: agent → real Mosquitto → server → `GET /api/v1/devices/{id}`,
//! once with the agent reading a fake AGX Orin root (so every Jetson field travels) and
//! once on this machine as it is (fields it cannot measure are absent, never zero or null).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use botfleet_e2e::{BrokerKind, Fleet};
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

fn orin_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/sysfs/orin")
}

/// A device's info and telemetry as an operator's MQTT client sees them.
struct Listener {
    rx: mpsc::UnboundedReceiver<(TopicKind, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Subscribes to the device's info and telemetry; returns after the SUBACK.
    async fn subscribe(fleet: &Fleet, device: &str) -> Result<Self> {
        let url = reqwest::Url::parse(&fleet.mqtt_url)?;
        let mut options = MqttOptions::new(
            format!("listener-{device}"),
            url.host_str().context("host")?,
            url.port().unwrap_or(1883),
        );
        options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let topics = Topics::new(fleet.prefix.clone())?;
        let id = DeviceId::new(device)?;
        let kinds = [TopicKind::Info, TopicKind::Telemetry];
        for kind in kinds {
            client
                .subscribe(topics.device(&id, kind), QoS::AtLeastOnce)
                .await?;
        }
        let mut acks = 0;
        tokio::time::timeout(LIMIT, async {
            while acks < kinds.len() {
                if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                    acks += 1;
                }
            }
            Ok::<(), anyhow::Error>(())
        })
        .await
        .context("no SUBACK")??;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = eventloop.poll().await {
                let Event::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                let Some((_, kind)) = topics.parse(&p.topic) else {
                    continue;
                };
                if let Ok(v) = serde_json::from_slice(&p.payload)
                    && tx.send((kind, v)).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self { rx, task })
    }

    /// The next message of `kind`.
    async fn next(&mut self, kind: TopicKind) -> Result<Value> {
        tokio::time::timeout(LIMIT, async {
            loop {
                match self.rx.recv().await {
                    Some((k, v)) if k == kind => return Ok(v),
                    Some(_) => continue,
                    None => bail!("listener stopped"),
                }
            }
        })
        .await
        .with_context(|| format!("no {} within {LIMIT:?}", kind.as_str()))?
    }
}

/// The device view once the server has folded telemetry in. The message is already on the
/// broker (the listener saw it); the server's fold has no event of its own to wait on, so
/// this asks the API until it shows, within a limit.
async fn device_with_telemetry(fleet: &Fleet, device: &str) -> Value {
    let path = format!("/api/v1/devices/{device}");
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Ok(view) = fleet.get(&path).await
            && !view["telemetry"].is_null()
            && !view["info"].is_null()
        {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} shows no info and telemetry within {LIMIT:?}"
        );
    }
}

/// Every key present has a value: absence is how "not measured" is said.
fn assert_no_nulls(v: &Value, at: &str) {
    match v {
        Value::Null => panic!("{at} is null; an unmeasured field must be absent"),
        Value::Object(m) => m
            .iter()
            .for_each(|(k, v)| assert_no_nulls(v, &format!("{at}.{k}"))),
        Value::Array(a) => a.iter().for_each(|v| assert_no_nulls(v, at)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetson_facts_and_gpu_telemetry_reach_the_device_api_through_mosquitto() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("orin");
    let mut listener = Listener::subscribe(&fleet, &device).await.unwrap();
    let mut config = fleet.agent_config(&device, &[("site", "lab")]);
    config.telemetry.root = orin_root();
    config.telemetry.nvml = false;
    config.telemetry_interval_s = 1;
    let agent = fleet.start_agent_with(config).await.unwrap();

    let on_wire = listener.next(TopicKind::Telemetry).await.unwrap();
    assert_eq!(on_wire["schema"], 1);
    assert_eq!(on_wire["device"], device.as_str());
    assert_no_nulls(&on_wire, "telemetry");

    let view = device_with_telemetry(&fleet, &device).await;
    assert_eq!(view["online"], true);
    let info = &view["info"];
    assert_eq!(info["board"], "NVIDIA Jetson AGX Orin Developer Kit");
    assert_eq!(info["jetson"]["l4t"], "35.4.1");
    assert_eq!(info["jetson"]["jetpack"], "5.1.2");
    assert_eq!(info["jetson"]["gpu"], "ga10b");
    let labels = &info["labels"];
    assert_eq!(labels["board"], "nvidia-jetson-agx-orin-developer-kit");
    assert_eq!(labels["jetpack"], "5.1.2");
    assert_eq!(labels["l4t"], "35.4.1");
    assert_eq!(labels["gpu"], "ga10b");
    assert_eq!(labels["accelerator"], "true");
    assert_eq!(labels["site"], "lab");

    let t = &view["telemetry"];
    let gpu = &t["gpus"][0];
    assert_eq!(gpu["source"], "jetson_sysfs");
    assert_eq!(gpu["load_percent"], 25.3);
    assert_eq!(gpu["freq_mhz"], 612);
    assert_eq!(gpu["temperature_c"], 47.0);
    assert_eq!(gpu["throttle"][0], "freq_capped");
    assert_eq!(t["board"]["power_mode"], "MODE_30W");
    assert_eq!(t["board"]["emc_freq_mhz"], 3199);
    assert_eq!(t["board"]["rails_mw"]["VDD_GPU_SOC"], 6330);
    assert_eq!(t["temperatures_c"]["tj-thermal"], 49.0);
    assert!(
        t["temperatures_c"].get("cv0-thermal").is_none(),
        "offline zone"
    );
    assert!(t["agent_rss_bytes"].as_u64().is_some_and(|r| r > 0));
    assert!(view["telemetry_received"].is_string());

    // The same figures as Prometheus gauges.
    let metrics = reqwest::get(format!("{}/metrics", fleet.server.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("botfleet_device_gpu_load_percent{{device=\"{device}\",gpu=\"0\"}} 25.3");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} not in\n{metrics}"
    );

    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_this_machine_what_cannot_be_measured_is_absent_not_zero() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("host");
    let mut listener = Listener::subscribe(&fleet, &device).await.unwrap();
    let mut config = fleet.agent_config(&device, &[]);
    config.telemetry_interval_s = 1;
    let agent = fleet.start_agent_with(config).await.unwrap();

    let info = listener.next(TopicKind::Info).await.unwrap();
    // The first sample comes right at start-up, too soon for CPU figures; the second has them.
    let first = listener.next(TopicKind::Telemetry).await.unwrap();
    assert_no_nulls(&first, "first telemetry");
    let telemetry = listener.next(TopicKind::Telemetry).await.unwrap();
    assert_no_nulls(&info, "info");
    assert_no_nulls(&telemetry, "telemetry");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    println!("info fields on this machine: {:?}", keys(&info));
    println!("telemetry fields on this machine: {:?}", keys(&telemetry));
    println!("telemetry: {telemetry}");

    let jetson = Path::new("/etc/nv_tegra_release").exists();
    if !jetson {
        assert!(info.get("jetson").is_none(), "{info}");
        assert!(telemetry.get("board").is_none(), "{telemetry}");
        for gpu in telemetry["gpus"].as_array().into_iter().flatten() {
            assert_eq!(gpu["source"], "nvml", "{gpu}");
        }
    }
    if !Path::new("/proc/device-tree/model").exists() {
        assert!(info.get("board").is_none());
        assert!(info["labels"].get("board").is_none());
    }
    let zones = std::fs::read_dir("/sys/class/thermal")
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        })
        .unwrap_or(false);
    let hwmon = Path::new("/sys/class/hwmon").exists();
    if !zones && !hwmon {
        assert!(telemetry.get("temperatures_c").is_none(), "{telemetry}");
    }
    // Always measurable on Linux.
    for key in [
        "memory_total_bytes",
        "agent_rss_bytes",
        "agent_cpu_percent",
        "cpu_per_core",
        "load_1m",
        "net_rx_bytes_per_s",
    ] {
        assert!(telemetry.get(key).is_some(), "{key} missing: {telemetry}");
    }

    let view = device_with_telemetry(&fleet, &device).await;
    assert_eq!(view["info"]["arch"], std::env::consts::ARCH);
    assert_eq!(view["telemetry"]["device"], device.as_str());
    fleet.shutdown(vec![agent]).await.unwrap();
}
