//! Footprint and cold start of the real `botfleet-agent` binary (the release build next to
//! this one), connected to a real server with its embedded broker, telemetry every 10 s.
//! Each fixture is rolled out for real (signed, downloaded, gated, persisted); then the
//! agent is killed and exec'd again, timed to its first successful inference.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use botfleet_e2e::process::{AgentProcess, agent_binary};
use botfleet_e2e::{BrokerKind, Fleet};
use botfleet_engine::{Engines, LoadOptions, OnnxRuntimeSettings};
use botfleet_protocol::engine::{EngineKind, EnginesInfo};
use botfleet_protocol::messages::Stage;
use serde_json::{Value, json};

use crate::fixtures::Fixture;
use crate::serving::{bodies, post};
use crate::stats::Summary;

/// CPU seconds (user + system) and (VmRSS, VmHWM) in KiB of a process, from /proc.
pub fn usage(pid: u32) -> Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .context("stat")?
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key| kib_field(&status, key).unwrap_or(0);
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

/// The number after `key` in a `/proc` file of `Key:   123 kB` lines.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory of a process (`self` or a pid) in KiB, from `smaps_rollup`: anonymous
/// (heap, stacks: weights, plans, buffers) and the rest (mapped files: code of the binary
/// and of the libraries it opened, which the kernel can drop and read again).
pub fn resident(pid: &str) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib = |key| kib_field(&text, key).with_context(|| format!("{key} in smaps_rollup"));
    let (rss, anon) = (kib("Rss:")?, kib("Anonymous:")?);
    Ok((anon, rss.saturating_sub(anon)))
}

/// The model's own memory and load time on `engine`, in this (fresh) process: resident
/// memory before the load, after it and after one inference; `bench/fixtures.json` is read,
/// no other model is loaded. Printed as one JSON line (run by `footprint` as a child).
pub fn model_memory(
    library: Option<std::path::PathBuf>,
    fixture: &str,
    engine: EngineKind,
) -> Result<()> {
    let entry = crate::fixtures::entry(fixture)?;
    let bytes = std::fs::read(&entry.path).with_context(|| entry.path.display().to_string())?;
    // As the daemon has them: ONNX Runtime known from a probe, its library opened by the
    // first load (so the load pays for it, as at the agent's start).
    let engines = if engine == EngineKind::Tract {
        Engines::tract_only()
    } else {
        let settings = OnnxRuntimeSettings {
            library,
            ..OnnxRuntimeSettings::default()
        };
        let info = EnginesInfo {
            available: vec![engine],
            ..EnginesInfo::default()
        };
        Engines::from_info(&settings, info)
    };
    let before = resident("self")?;
    let started = Instant::now();
    let model = engines.load(engine, &bytes, &entry.inputs, &LoadOptions::default())?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let loaded = resident("self")?;
    let input = botfleet_engine::reference_inputs(&model, 42)?;
    let started = Instant::now();
    model.run(input)?;
    let first_run_ms = started.elapsed().as_secs_f64() * 1e3;
    let ran = resident("self")?;
    println!(
        "{}",
        json!({
            "fixture": fixture, "engine": engine, "load_ms": load_ms, "first_run_ms": first_run_ms,
            "anon_kib": [before.0, loaded.0, ran.0], "file_kib": [before.1, loaded.1, ran.1],
        })
    );
    Ok(())
}

/// `model_memory` in a child of this binary, and the child's wall time from spawn to exit:
/// the least a process can do from `exec` to a first inference of this model on `engine`.
async fn measure_model(fixture: &str, engine: EngineKind) -> Result<Value> {
    let started = Instant::now();
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "model-memory",
            "--fixture",
            fixture,
            "--engine",
            engine.as_str(),
        ])
        .output()
        .await?;
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "model-memory {fixture} on {engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut v: Value = serde_json::from_slice(&out.stdout).context("model-memory output")?;
    v["process_ms"] = json!(wall_ms);
    Ok(v)
}

/// When the agent's log lines with these texts were written, in ms after `exec`.
fn phases(lines: &[String], exec: jiff::Timestamp) -> Value {
    let at = |needle: &str| {
        lines.iter().find(|l| l.contains(needle)).and_then(|l| {
            let stamp: jiff::Timestamp = l.split_whitespace().next()?.parse().ok()?;
            Some(stamp.duration_since(exec).as_secs_f64() * 1e3)
        })
    };
    json!({
        "starting": at("botfleet-agent starting"),
        "engines": at("engines available="),
        "restored": at("restored model"),
        "started": at("botfleet-agent started"),
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Idle CPU (% of one core) over `window`, and RSS at its end (MiB).
async fn idle(agent: &AgentProcess, window: Duration) -> Result<Value> {
    let pid = agent.pid().context("agent pid")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, _, _) = usage(pid)?;
    tokio::time::sleep(window).await;
    let (cpu1, rss, hwm) = usage(pid)?;
    let (anon, file) = resident(&pid.to_string())?;
    Ok(json!({
        "cpu_percent": 100.0 * (cpu1 - cpu0) / window.as_secs_f64(),
        "rss_mib": rss as f64 / 1024.0,
        "anon_mib": anon as f64 / 1024.0,
        "file_mib": file as f64 / 1024.0,
        "peak_rss_mib": hwm as f64 / 1024.0,
        "window_s": window.as_secs_f64(),
    }))
}

/// The engine serving the model at `url` (OIP v2 model metadata).
async fn serving_engine(http: &reqwest::Client, url: &str) -> Result<EngineKind> {
    let v: Value = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    serde_json::from_value(v["parameters"]["engine"].clone())
        .with_context(|| format!("no engine in {v}"))
}

/// Starts `binary` on `config` (the caller has stopped the agent before) and polls `url`
/// until an inference succeeds: the agent, ms from `exec` to that answer, and when its
/// start-up lines were logged.
async fn cold_start(
    binary: &std::path::Path,
    config: &botfleet_agent::Config,
    http: &reqwest::Client,
    url: &str,
    b: &crate::serving::Bodies,
) -> Result<(AgentProcess, (f64, Value))> {
    let exec = jiff::Timestamp::now();
    let started = Instant::now();
    let mut agent = AgentProcess::spawn_binary(binary, config).await?;
    let deadline = started + Duration::from_secs(120);
    loop {
        if post(http, url, &b.binary, Some(b.header_len)).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: no successful inference within 120 s of exec",
                binary.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let phases = phases(&agent.drain_lines(), exec);
    Ok((agent, (ms, phases)))
}

/// `earlier`: another agent build whose cold start is measured too, interleaved.
pub async fn run(
    fixtures: &[Fixture],
    window: Duration,
    restarts: usize,
    earlier: Option<&std::path::Path>,
) -> Result<Value> {
    let fleet = Fleet::start(BrokerKind::Embedded).await?;
    let device = fleet.device_id("bench");
    let port = free_port()?;
    let mut config = fleet.agent_config(&device, &[]);
    config.gate.program = agent_binary()?;
    config.gate.health_window_s = 0;
    config.telemetry_interval_s = 10;
    config.inference.listen = format!("127.0.0.1:{port}").parse()?;
    let url = format!("http://127.0.0.1:{port}/v2/models/bench/infer");
    let http = reqwest::Client::new();
    let mut watch = fleet.watch_events(&device).await?;

    let mut agent = AgentProcess::spawn(&config, None).await?;
    let health = format!("http://127.0.0.1:{port}/v2/health/ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(&health).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("agent API not up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let no_model = idle(&agent, window).await?;
    println!("footprint without a model: {no_model}");

    let mut per_fixture = Vec::new();
    for (i, f) in fixtures.iter().enumerate() {
        let version = format!("{}.0.0", i + 1);
        fleet
            .push_model(
                &f.path,
                json!({"slot": "bench", "name": f.name, "version": version, "inputs": f.specs,
                    "gate": {"warmup_runs": 1, "runs": 5, "max_p99_ms": 60000.0}}),
            )
            .await?;
        let rollout = fleet.roll_out("bench", &version, &[&device]).await?;
        let events = watch
            .until_terminal(&rollout, Duration::from_secs(600))
            .await?;
        if !matches!(events.last().map(|e| &e.stage), Some(Stage::Active { .. })) {
            bail!(
                "{} did not become active: {}",
                f.name,
                botfleet_e2e::describe(&events)
            );
        }
        let engine =
            serving_engine(&http, &format!("http://127.0.0.1:{port}/v2/models/bench")).await?;
        let b = bodies(&f.input)?;
        let mut cold = Vec::new();
        let mut before = Vec::new();
        for _ in 0..restarts {
            // The earlier build first (when asked for), then this one: interleaved, and the
            // agent left running is this build's.
            if let Some(binary) = earlier {
                agent.kill().await?;
                let (a, ms) = cold_start(binary, &config, &http, &url, &b).await?;
                agent = a;
                before.push(ms);
            }
            agent.kill().await?;
            let (a, ms) = cold_start(&agent_binary()?, &config, &http, &url, &b).await?;
            agent = a;
            cold.push(ms);
        }
        let cold_ms: Vec<f64> = cold.iter().map(|(ms, _)| *ms).collect();
        let cold_phases: Vec<Value> = cold.into_iter().map(|(_, p)| p).collect();
        let before_ms: Vec<f64> = before.iter().map(|(ms, _)| *ms).collect();
        let loaded = idle(&agent, window).await?;
        println!("footprint with {} on {engine}: {loaded}", f.name);
        // The same model alone in a fresh process, on the engine the gate chose: what it
        // weighs, and its load (the cold start's reference), three times.
        let mut alone = Vec::new();
        for _ in 0..3 {
            alone.push(measure_model(&f.name, engine).await?);
        }
        per_fixture.push(json!({
            "fixture": f.name, "engine": engine, "idle": loaded,
            "cold_start_ms": Summary::of(&cold_ms), "cold_start_phases_ms": cold_phases,
            "cold_start_before_ms": (!before_ms.is_empty()).then(|| Summary::of(&before_ms)),
            "alone": alone,
        }));
    }
    agent.kill().await?;
    fleet.shutdown(vec![]).await?;
    Ok(json!({
        "telemetry_interval_s": 10,
        "no_model": no_model,
        "fixtures": per_fixture,
    }))
}
