//! Footprint and cold start of the real `botfleet-agent` binary (the release build next to
//! this one), connected to a real server with its embedded broker, telemetry every 10 s.
//! Each fixture is rolled out for real (signed, downloaded, gated, persisted); then the
//! agent is killed and exec'd again, timed to its first successful inference.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use botfleet_e2e::process::{AgentProcess, agent_binary};
use botfleet_e2e::{BrokerKind, Fleet};
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
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
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
    Ok(json!({
        "cpu_percent": 100.0 * (cpu1 - cpu0) / window.as_secs_f64(),
        "rss_mib": rss as f64 / 1024.0,
        "peak_rss_mib": hwm as f64 / 1024.0,
        "window_s": window.as_secs_f64(),
    }))
}

pub async fn run(fixtures: &[Fixture], window: Duration, restarts: usize) -> Result<Value> {
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
        let b = bodies(&f.input)?;
        let mut cold_ms = Vec::new();
        for _ in 0..restarts {
            agent.kill().await?;
            let started = Instant::now();
            agent = AgentProcess::spawn(&config, None).await?;
            let deadline = started + Duration::from_secs(120);
            loop {
                if post(&http, &url, &b.binary, Some(b.header_len))
                    .await
                    .is_ok()
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{}: no successful inference within 120 s of exec", f.name);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cold_ms.push(started.elapsed().as_secs_f64() * 1e3);
            agent.drain_lines();
        }
        let loaded = idle(&agent, window).await?;
        println!("footprint with {}: {loaded}", f.name);
        per_fixture.push(
            json!({"fixture": f.name, "idle": loaded, "cold_start_ms": Summary::of(&cold_ms)}),
        );
    }
    agent.kill().await?;
    fleet.shutdown(vec![]).await?;
    Ok(json!({
        "telemetry_interval_s": 10,
        "no_model": no_model,
        "fixtures": per_fixture,
    }))
}
