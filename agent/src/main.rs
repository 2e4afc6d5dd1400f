//! `botfleet-agent`: thin shell around [`botfleet_agent::start`], plus the local
//! provisioning (`k3s`) and measurement (`bench`) sub-commands.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use botfleet_agent::config::{Config, DEFAULT_CONFIG};
use botfleet_agent::k3s::helper::Handoff;
use botfleet_agent::k3s::units::Systemctl;
use botfleet_agent::k3s::{self, Node, Operation};
use botfleet_agent::{bench, logging, notify};
use botfleet_protocol::messages::{K3sState, K3sToken};
use clap::{Parser, Subcommand};

/// botfleet robot agent: signed model rollouts, on-device benchmark gate, hot swap,
/// OIP v2 inference API, telemetry over MQTT.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BOTFLEET_GIT_COMMIT"), ")"))]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "BOTFLEET_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// This robot's id (overrides the file).
    #[arg(long, env = "BOTFLEET_DEVICE_ID", global = true)]
    device_id: Option<String>,
    /// Broker URL, mqtt://host:port (overrides the file).
    #[arg(long, env = "BOTFLEET_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Data directory (overrides the file).
    #[arg(long, env = "BOTFLEET_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// A trusted public key, `ed25519:<base64>` (repeatable; adds to the file's).
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// Inference API address (overrides the file).
    #[arg(long)]
    inference_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Join, leave or inspect the K3s cluster (as root, for provisioning).
    #[command(subcommand)]
    K3s(K3sCmd),
    /// Load an ONNX model and time it on the deterministic reference input.
    Bench {
        #[arg(long)]
        model: PathBuf,
        /// NAME:DATATYPE:DIMS, e.g. x:FP32:1x3x224x224 (repeatable).
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
        #[arg(long, default_value_t = 20)]
        runs: u32,
        #[arg(long, default_value_t = 3)]
        warmup: u32,
        /// Engine to run on: tract, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt,
        /// onnxruntime-tensorrt-fp16, onnxruntime-tensorrt-int8 (ONNX Runtime from
        /// [engine.onnxruntime] library or ORT_DYLIB_PATH).
        #[arg(long, default_value = "tract")]
        engine: botfleet_protocol::engine::EngineKind,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum K3sCmd {
    /// Check that this robot can run a K3s agent.
    Preflight,
    /// Write the drop-in and token, start k3s-agent.service, wait until it is active.
    Join {
        /// K3s server, https://host:6443 (default: k3s.server_url).
        #[arg(long)]
        server: Option<String>,
        /// File holding the join token.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Stop and disable k3s-agent.service and remove our files.
    Leave,
    /// Replace the token and restart k3s-agent.service.
    Rotate {
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Run the request the agent left for the root helper (botfleet-k3s.service).
    Apply,
}

fn main() -> ExitCode {
    // The benchmark gate's child process (see `botfleet_agent::gate`): no CLI, no logging.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == botfleet_agent::gate::CHILD_ARG)
    {
        return ExitCode::from(botfleet_agent::gate::child_main());
    }
    let cli = Cli::parse();
    if cli.print_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    let target = logging::init();
    let mut config = match &cli.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(v) = cli.device_id {
        config.device_id = v;
    }
    if let Some(v) = cli.mqtt_url {
        config.mqtt.url = v;
    }
    if let Some(v) = cli.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = cli.inference_listen {
        config.inference.listen = v;
    }
    config.trusted_keys.extend(cli.trusted_keys);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Sub::Bench {
            model,
            inputs,
            runs,
            warmup,
            engine,
            json,
        }) => bench_main(&config, &model, &inputs, (warmup, runs), engine, json),
        Some(Sub::K3s(cmd)) => runtime.block_on(k3s_main(&config, cmd)),
        None => {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                commit = env!("BOTFLEET_GIT_COMMIT"),
                config = %cli.config.as_deref().map_or("(built-in defaults)".into(), |p| p.display().to_string()),
                log = ?target,
                "botfleet-agent starting"
            );
            runtime.block_on(serve(config))
        }
    }
}

/// The daemon: start, tell systemd, run until SIGTERM or a task dies.
async fn serve(config: Config) -> ExitCode {
    let mut running = match botfleet_agent::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    notify::ready();
    let watchdog = notify::watchdog_period().map(|period| {
        tokio::spawn(notify::watchdog(
            running.heartbeat(),
            period,
            std::time::Duration::from_secs(1),
            notify::ping_systemd,
        ))
    });
    let outcome = tokio::select! {
        () = shutdown_signal() => ExitCode::SUCCESS,
        err = running.failed() => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    };
    notify::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    running.shutdown().await;
    outcome
}

fn bench_main(
    config: &botfleet_agent::config::Config,
    model: &std::path::Path,
    inputs: &[String],
    (warmup, runs): (u32, u32),
    engine: botfleet_protocol::engine::EngineKind,
    json: bool,
) -> ExitCode {
    let specs = match inputs
        .iter()
        .map(|s| bench::parse_input(s))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let engines = if engine == botfleet_protocol::engine::EngineKind::Tract {
        botfleet_engine::Engines::tract_only()
    } else {
        botfleet_engine::Engines::probe(&config.engine.onnxruntime)
    };
    match bench::run(&engines, engine, model, &specs, warmup, runs) {
        Ok(r) if json => match serde_json::to_string(&r) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => {
            println!(
                "{}: load {:.1} ms, {} runs: p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
                r.model, r.load_ms, r.runs, r.p50_ms, r.p99_ms, r.mean_ms
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn k3s_main(config: &Config, cmd: K3sCmd) -> ExitCode {
    let mut labels: BTreeMap<String, String> = config.labels.clone();
    labels.insert("arch".into(), std::env::consts::ARCH.into());
    let node = Node::new(&config.k3s, &config.device_id, labels, Systemctl::default());
    let read_token =
        |path: &PathBuf| std::fs::read_to_string(path).map(|t| K3sToken(t.trim().to_owned()));
    let state = match cmd {
        K3sCmd::Preflight => {
            return match k3s::preflight::check(&node.paths).await {
                Ok(found) => {
                    println!(
                        "k3s {} found; NVIDIA runtime: {}",
                        found.k3s_version, found.nvidia_runtime
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        K3sCmd::Apply => {
            return match Handoff::new(&config.data_dir).serve(&node).await {
                Ok(Some(answer)) => {
                    tracing::info!(command_id = %answer.command_id, state = ?answer.state, "k3s request answered");
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ if config.device_id.is_empty() => {
            tracing::error!("device_id is not set: it is the node name");
            return ExitCode::from(2);
        }
        K3sCmd::Join { server, token_file } => match read_token(&token_file) {
            Ok(token) => {
                let server_url = server.unwrap_or_else(|| config.k3s.server_url.clone());
                node.apply(&Operation::Join {
                    server_url,
                    token,
                    node_labels: BTreeMap::new(),
                })
                .await
            }
            Err(e) => {
                tracing::error!("{}: {e}", token_file.display());
                return ExitCode::from(2);
            }
        },
        K3sCmd::Leave => node.apply(&Operation::Leave).await,
        K3sCmd::Rotate { token_file } => match read_token(&token_file) {
            Ok(token) => node.apply(&Operation::RotateToken { token }).await,
            Err(e) => {
                tracing::error!("{}: {e}", token_file.display());
                return ExitCode::from(2);
            }
        },
    };
    println!("{}", serde_json::to_string(&state).unwrap_or_default());
    match state {
        K3sState::Failed { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping");
}
