//! One process of simulated devices, for fleets larger than one process can hold (the
//! fleet benchmark starts several): connects `--count` devices named
//! `{id-prefix}{index}` (`--first` on, zero-padded to `--width`) to `--url`, prints
//! `ready COUNT SECONDS` once all are connected, and serves until its stdin closes.

use std::time::Instant;

use anyhow::{Context, Result};
use botfleet_e2e::sim_fleet::{SimSpec, connect_batched, raise_open_files};
use botfleet_e2e::simulated::Behaviour;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Simulated botfleet devices, one MQTT session each")]
struct Args {
    /// The broker, `mqtt://host:port`.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = botfleet_protocol::topics::DEFAULT_PREFIX)]
    topic_prefix: String,
    /// The server's public key, as `GET /api/v1/keys` gives it.
    #[arg(long)]
    trusted_key: String,
    #[arg(long)]
    id_prefix: String,
    #[arg(long, default_value_t = 0)]
    first: usize,
    #[arg(long)]
    count: usize,
    /// Digits of the zero-padded index.
    #[arg(long, default_value_t = 6)]
    width: usize,
    /// Every device succeeds and reports this benchmark p99.
    #[arg(long, default_value_t = 2.0)]
    p99_ms: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let limit = raise_open_files()?;
    let spec = SimSpec {
        mqtt_url: args.url,
        topic_prefix: args.topic_prefix,
        trusted_key: args.trusted_key,
        id_prefix: args.id_prefix,
        first: args.first,
        count: args.count,
        width: args.width,
        p99_ms: args.p99_ms,
    };
    let names: Vec<String> = spec.names().collect();
    let started = Instant::now();
    let behaviour = Behaviour::Succeed {
        p99_ms: spec.p99_ms,
    };
    let agents = connect_batched(
        &spec.mqtt_url,
        &spec.topic_prefix,
        &names,
        &spec.trusted_key,
        behaviour,
    )
    .await
    .with_context(|| {
        format!(
            "connecting {} devices from {} (open-file limit {limit})",
            spec.count, spec.first
        )
    })?;
    println!(
        "ready {} {:.3}",
        agents.len(),
        started.elapsed().as_secs_f64()
    );
    // Serve until the parent closes our stdin (or exits); anything it writes is ignored.
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await
        .context("the stdin reader panicked")?
        .context("reading stdin")?;
    drop(agents);
    Ok(())
}
