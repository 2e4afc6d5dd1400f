//! Capture on the serving path: the open-loop client of the swap section on one slot, in
//! alternating windows with capture off and on. Off: the agent's router without capture
//! (`serve::router`, as an agent without `[capture]`). On: the same slots behind
//! `serve::router_capturing` with the slot's policy keeping every request (`sample_every =
//! 1`, and `min_top1` so the policy reads the outputs too), a rate bound far above the
//! request rate, and the writer thread spooling to a real folder on disk; the uploader is
//! not run (its URL is a closed loopback port). The client switches server at each window;
//! after an on window the next off window waits until the writer has spooled its last copy,
//! so the off windows see no capture work at all and the on windows see all of theirs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use botfleet_agent::bench::local_serving;
use botfleet_agent::capture::{
    self, Capture, CaptureConfig, CaptureSlotConfig, Metered, UploadConfig,
};
use botfleet_agent::serve::router_capturing;
use botfleet_agent::slots::Slots;
use botfleet_protocol::messages::DataTelemetry;
use botfleet_protocol::{DeviceId, SlotName};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::fixtures::Fixture;
use crate::serving::{post, serve_app};
use crate::stats::Summary;
use crate::swap::{Answer, Windowed, finish, one_run, open_loop_to, serve_warm};

/// The largest request body the capturing router takes (as `serving::serve`'s).
const MAX_REQUEST_BYTES: usize = 256 << 20;
/// The writer has caught up once its counts stay put this long.
const SETTLED: Duration = Duration::from_secs(1);
/// The longest wait for the writer to catch up after an on window.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
/// The rate bound: far above any rate measured here (about 16,700 a second).
const MAX_PER_MINUTE: u32 = 1_000_000;
/// The `min_top1` of the policy (logits and probabilities alike mostly stay under it).
const MIN_TOP1: f64 = 0.5;

/// Both fixtures: the float digits model (an 8×8 image, the copy costs nothing) and the
/// camera-frame model (1×3×224×224 FP32, about 600 KB a copy). `rate` is capped, as for the
/// shadow section, at 60 % of one core's throughput on the model.
pub async fn section(
    digits: &Fixture,
    frames: &Fixture,
    rate: f64,
    window: Duration,
    rounds: usize,
    out: &Path,
) -> Result<Value> {
    // Under target/ (the results folder), on the disk, not a tmpfs.
    std::fs::create_dir_all(out)?;
    let mut runs = Vec::new();
    for f in [digits, frames] {
        let used = rate.min(0.6 / one_run(f)?.as_secs_f64().max(1e-6));
        let dir = tempfile::Builder::new()
            .prefix("capture-spool-")
            .tempdir_in(out)?;
        runs.push(run(f, used, window, rounds, dir.path()).await?);
    }
    Ok(json!({ "runs": runs, "rate_requested_per_s": rate }))
}

/// The checked capture settings the agent would run with for this policy.
fn settings(slot: &SlotName, dir: &Path) -> Result<capture::DataSettings> {
    let token_file = dir.join("device.token");
    std::fs::write(&token_file, "not-used")?;
    let policy = CaptureSlotConfig {
        sample_every: 1,
        min_top1: MIN_TOP1,
        max_per_minute: MAX_PER_MINUTE,
        ..CaptureSlotConfig::default()
    };
    // Spool bounds no run here reaches: no sample is deleted to make room.
    let config = CaptureConfig {
        spool_max_bytes: 16 << 30,
        spool_max_samples: 1_000_000,
        spool_max_age_s: 0,
        slots: BTreeMap::from([(slot.clone(), policy)]),
    };
    let upload = UploadConfig {
        url: "http://127.0.0.1:9".into(),
        token_file,
        ..UploadConfig::default()
    };
    capture::settings::validate(&config, &upload, "")?.context("the policy captures nothing")
}

/// Copies the writer is done with: spooled, or dropped on the way.
fn handled(t: &DataTelemetry) -> u64 {
    t.captured.values().sum::<u64>() + t.dropped_rate + t.dropped_write + t.dropped_spool
}

/// Waits until the writer has handled every copy (its counts unchanged for [`SETTLED`]);
/// how long after `since` its last copy was done.
async fn caught_up(capture: &Capture, since: Instant) -> Duration {
    let mut last = handled(&capture.telemetry());
    let mut changed = since;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = handled(&capture.telemetry());
        if now != last {
            last = now;
            changed = Instant::now();
        } else if changed.elapsed() >= SETTLED || since.elapsed() >= CATCH_UP_LIMIT {
            return changed - since;
        }
    }
}

/// The writer thread's name (`botfleet-capture`) as the kernel keeps it: 15 bytes.
const WRITER_COMM: &str = "botfleet-captur";

/// CPU seconds the capture writer threads (`botfleet-capture`) have used so far, from
/// `/proc/self/task/*/stat` (user + system, in clock ticks of 1/100 s).
fn writer_cpu_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let path = task.path();
        let is_writer =
            std::fs::read_to_string(path.join("comm")).is_ok_and(|name| name.trim() == WRITER_COMM);
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // After the `(comm)` field, from 0: state, …, utime at 11, stime at 12.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if is_writer {
            ticks += field(11).unwrap_or(0) + field(12).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0
}

/// Bytes of `f`'s input tensors, as a sample carries them.
fn input_bytes(f: &Fixture) -> usize {
    f.input
        .iter()
        .map(|t| t.data.len() * botfleet_protocol::sample::element_bytes(t.data.datatype()))
        .sum()
}

async fn run(f: &Fixture, rate: f64, window: Duration, rounds: usize, dir: &Path) -> Result<Value> {
    let slot = SlotName::new("bench")?;
    let model = local_serving(slot.clone(), f.model.clone(), &f.bytes, "serving")?;
    let slots = Arc::new(Slots::default());
    slots.swap(&slot, Arc::new(model));
    let settings = settings(&slot, dir)?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let device = DeviceId::new("bench-robot")?;
    // The uploader is made but never run.
    let started = capture::start(&device, dir, &settings, Metered::open(dir), http)?;
    let capture = started.capture;
    let (plain, b, client) = serve_warm(&slots, f).await?;
    let base = serve_app(router_capturing(
        Arc::clone(&slots),
        MAX_REQUEST_BYTES,
        Some(Arc::clone(&capture)),
    ))
    .await?;
    let captured = format!("{base}/v2/models/bench/infer");
    for _ in 0..5 {
        post(&client, &captured, &b.binary, Some(b.header_len))
            .await?
            .bytes()
            .await?;
    }
    caught_up(&capture, Instant::now()).await;
    let before = capture.telemetry();
    let writer_before = writer_cpu_s();

    let (url, urls) = watch::channel(plain.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let stop = tokio_util::sync::CancellationToken::new();
    let load = open_loop_to(urls, &b, &client, rate, &stop, tx);
    // (start, end, capture on) of each window, off and on alternating.
    let mut windows = Vec::new();
    let mut catch_up_s = Vec::new();
    for round in 0..rounds * 2 {
        let on = round % 2 == 1;
        url.send_replace(if on { captured.clone() } else { plain.clone() });
        let start = Instant::now();
        tokio::time::sleep(window).await;
        windows.push((start, Instant::now(), on));
        if on {
            url.send_replace(plain.clone());
            let ended = Instant::now();
            catch_up_s.push(caught_up(&capture, ended).await.as_secs_f64());
        }
    }
    let answers = finish(&stop, load, &mut rx).await?;
    let after = capture.telemetry();
    let writer_s = writer_cpu_s() - writer_before;
    let Windowed {
        failed,
        changed,
        off_ms,
        on_ms,
    } = Windowed::of(&answers, &windows);
    let on_s: f64 = windows
        .iter()
        .filter(|(_, _, on)| *on)
        .map(|(s, e, _)| (*e - *s).as_secs_f64())
        .sum();
    let spooled = (after.captured.values().sum::<u64>())
        .saturating_sub(before.captured.values().sum::<u64>());
    let spool_bytes = after.spool_bytes.saturating_sub(before.spool_bytes);
    let dropped = after.dropped_rate.saturating_sub(before.dropped_rate);
    println!(
        "capture {}: {} requests, {failed} failed, {spooled} spooled, {dropped} dropped",
        f.name,
        answers.len()
    );
    Ok(json!({
        "fixture": f.name,
        "input_bytes": input_bytes(f),
        "rate_per_s": rate,
        "window_s": window.as_secs_f64(),
        "rounds": rounds,
        "requests": answers.len(),
        "failed": failed,
        "changed": changed,
        "off_ms": Summary::of(&off_ms),
        "on_ms": Summary::of(&on_ms),
        "on_requests": on_ms.len(),
        "spooled": spooled,
        "spool_bytes": spool_bytes,
        "spooled_bytes_per_s": spool_bytes as f64 / on_s.max(1e-9),
        "dropped": dropped,
        "dropped_write": after.dropped_write.saturating_sub(before.dropped_write),
        "dropped_spool": after.dropped_spool.saturating_sub(before.dropped_spool),
        "catch_up_s": Summary::of(&catch_up_s),
        "writer_cpu_s": writer_s,
        "writer_cpu_ms_per_sample": writer_s * 1e3 / (spooled.max(1) as f64),
        "writer_core_share": writer_s / on_s.max(1e-9),
        "policy": {
            "sample_every": 1,
            "min_top1": MIN_TOP1,
            "max_per_minute": MAX_PER_MINUTE,
        },
    }))
}
