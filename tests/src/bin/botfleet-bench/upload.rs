//! Upload throughput against the cap: a real botfleet-server in this process (loopback, a
//! temporary data folder, the embedded broker) and, per cap, a robot's spool filled with
//! the same number of real camera-frame samples (the fixture's input and its outputs,
//! encoded by the agent's writer, `botfleet_protocol::sample::encode`), then the agent's
//! uploader (`capture::start` with `[upload] max_bytes_per_s`) run until the server has
//! taken every one. Each cap gets samples of its own (their capture times differ), so the
//! server stores every upload anew.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use botfleet_agent::bench::local_serving;
use botfleet_agent::capture::spool::unix_ns;
use botfleet_agent::capture::writer::sample_file;
use botfleet_agent::capture::{
    self, CaptureConfig, CaptureSlotConfig, Fired, Metered, Pending, Served, UploadConfig,
};
use botfleet_engine::{Tensor, reference_inputs};
use botfleet_protocol::sample::CaptureRule;
use botfleet_protocol::{DeviceId, SlotName};
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::fixtures::Fixture;

/// Beyond the time the cap needs, the most a run may take.
const MARGIN: Duration = Duration::from_secs(60);

/// One sample's tensors: the model's input and its outputs.
type Frame = (Vec<Tensor>, Vec<Tensor>);

pub async fn run(frames: &Fixture, samples: usize, caps: &[u64], out: &Path) -> Result<Value> {
    // Under target/ (the results folder), on the disk.
    std::fs::create_dir_all(out)?;
    let dir = tempfile::Builder::new().prefix("upload-").tempdir_in(out)?;
    let mut config = botfleet_server::Config {
        data_dir: dir.path().join("server"),
        http_listen: "127.0.0.1:0".parse()?,
        topic_prefix: "botfleet-bench/upload".into(),
        ..Default::default()
    };
    config.mqtt.url = String::new();
    config.mqtt.embedded_listen = "127.0.0.1:0".parse()?;
    config.mqtt.client_id = "botfleet-bench-upload".into();
    let server = botfleet_server::start(config)
        .await
        .context("starting botfleet-server")?;
    let device = DeviceId::new("bench-robot")?;
    let token_file = dir.path().join("device.token");
    std::fs::write(&token_file, server.device_token(device.as_str()))?;

    // Distinct inputs (one seed each) and what the model answers for them.
    let mut tensors: Vec<Frame> = Vec::with_capacity(samples);
    for seed in 0..samples as u64 {
        let inputs = reference_inputs(&frames.model, seed)?;
        let outputs = frames.model.run(inputs.clone())?;
        tensors.push((inputs, outputs));
    }
    let slot = SlotName::new("camera")?;
    let serving = local_serving(slot.clone(), frames.model.clone(), &frames.bytes, "1")?;
    let served = Served::of(&serving);
    let mut runs = Vec::new();
    for &cap in caps {
        let robot = dir.path().join(format!("robot-{cap}"));
        let upload = UploadConfig {
            url: server.base_url(),
            token_file: token_file.clone(),
            max_bytes_per_s: cap,
            interval_s: 1,
            ..UploadConfig::default()
        };
        let v = one_cap(&device, &slot, &served, &tensors, &upload, &robot).await?;
        println!(
            "upload cap {cap} B/s: {} samples, {:.0} B/s",
            v["uploaded"], v["bytes_per_s"]
        );
        runs.push(v);
    }
    server.shutdown().await?;
    Ok(json!({
        "fixture": frames.name,
        "samples": samples,
        "runs": runs,
    }))
}

/// One robot's spool filled with `tensors` as samples, then uploaded under `upload`'s cap.
async fn one_cap(
    device: &DeviceId,
    slot: &SlotName,
    served: &Served,
    tensors: &[Frame],
    upload: &UploadConfig,
    robot: &Path,
) -> Result<Value> {
    let policy = CaptureSlotConfig {
        sample_every: 1,
        ..CaptureSlotConfig::default()
    };
    let config = CaptureConfig {
        slots: BTreeMap::from([(slot.clone(), policy)]),
        ..CaptureConfig::default()
    };
    let settings =
        capture::settings::validate(&config, upload, "")?.context("the policy captures nothing")?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let started = capture::start(device, robot, &settings, Metered::open(robot), http)?;
    let spool = Arc::clone(started.capture.spool());
    let mut bytes = 0u64;
    for (inputs, outputs) in tensors {
        let pending = Pending {
            served: served.clone(),
            captured_at: Timestamp::now(),
            fired: Fired::new(CaptureRule::Sampled, "one in every 1 requests".to_owned()),
            latency_ms: Some(10.0),
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            candidate: None,
            candidate_outputs: Vec::new(),
        };
        let file = sample_file(device, &pending).map_err(anyhow::Error::msg)?;
        bytes += spool
            .write(unix_ns(pending.captured_at), &file, Timestamp::now())?
            .bytes;
    }
    let n = tensors.len() as u64;
    let spooled = spool.stats().samples;
    anyhow::ensure!(spooled == n, "{spooled} of {n} samples spooled");

    let cap = upload.max_bytes_per_s;
    let limit = if cap > 0 {
        Duration::from_secs_f64(bytes as f64 / cap as f64 * 2.0) + MARGIN
    } else {
        MARGIN
    };
    let uploader = started.uploader;
    let mut state = uploader.subscribe();
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let task = tokio::spawn(uploader.run(cancel.clone()));
    let finished = tokio::time::timeout(limit, state.wait_for(|s| s.uploaded + s.refused >= n))
        .await
        .is_ok();
    let seconds = t.elapsed().as_secs_f64();
    let last = state.borrow().clone();
    cancel.cancel();
    task.await?;
    let sent = last.uploaded_bytes;
    let per_s = sent as f64 / seconds.max(1e-9);
    Ok(json!({
        "cap_bytes_per_s": cap,
        "samples": n,
        "spooled_bytes": bytes,
        "sample_bytes": bytes / n.max(1),
        "uploaded": last.uploaded,
        "refused": last.refused,
        "attempts": last.attempts,
        "finished": finished,
        "bytes": sent,
        "seconds": seconds,
        "bytes_per_s": per_s,
        "achieved_over_cap": (cap > 0).then(|| per_s / cap as f64),
        "samples_per_s": last.uploaded as f64 / seconds.max(1e-9),
        "least_seconds": (cap > 0).then(|| bytes as f64 / cap as f64),
        "spool_left": spool.stats().samples,
    }))
}
