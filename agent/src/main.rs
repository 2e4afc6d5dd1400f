//! `botfleet-agent`: thin shell around [`botfleet_agent::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use botfleet_agent::config::{Config, DEFAULT_CONFIG};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// botfleet robot agent: signed model rollouts, on-device benchmark gate, hot swap,
/// OIP v2 inference API, telemetry over MQTT.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "BOTFLEET_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// This robot's id (overrides the file).
    #[arg(long, env = "BOTFLEET_DEVICE_ID")]
    device_id: Option<String>,
    /// Broker URL, mqtt://host:port (overrides the file).
    #[arg(long, env = "BOTFLEET_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Data directory (overrides the file).
    #[arg(long, env = "BOTFLEET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A trusted public key, `ed25519:<base64>` (repeatable; adds to the file's).
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// Inference API address (overrides the file).
    #[arg(long)]
    inference_listen: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_config {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    tracing::info!(config = ?cli.config, "botfleet-agent {}", env!("CARGO_PKG_VERSION"));

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(botfleet_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
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
