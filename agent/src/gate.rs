//! The benchmark gate, run in a child process.
//!
//! A malformed or hostile ONNX file can panic, abort or exhaust memory inside tract. So the
//! candidate is first loaded, checked against its reference output and benchmarked (together
//! with the serving model, for a fair comparison) in a separate process of the agent binary
//! (`botfleet-agent __gate`), with an address-space limit and a wall-clock deadline. The
//! daemon only loads a model itself once the child has shown it loads and passes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use botfleet_engine::{BenchStats, Model, benchmark, reference_error, reference_inputs};
use botfleet_protocol::manifest::{Gate, Reference};
use botfleet_protocol::tensor::TensorSpec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The first argument that turns the agent binary into a gate child.
pub const CHILD_ARG: &str = "__gate";

/// What the child is asked to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateRequest {
    pub candidate: ModelFile,
    pub gate: Gate,
    /// The model serving the slot, benchmarked in the same run when the gate compares.
    pub incumbent: Option<ModelFile>,
    /// Address-space limit of the child, in bytes.
    pub memory_limit_bytes: u64,
}

/// A model on disk with the input signature it is loaded with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
    /// Seed of the benchmark input (the reference seed when there is one).
    pub seed: u64,
}

/// Latency figures, serialisable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub runs: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl From<BenchStats> for Stats {
    fn from(s: BenchStats) -> Self {
        Self {
            runs: s.runs,
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            mean_ms: s.mean_ms,
        }
    }
}

impl From<Stats> for BenchStats {
    fn from(s: Stats) -> Self {
        Self {
            runs: s.runs,
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            mean_ms: s.mean_ms,
        }
    }
}

/// What the child found.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum GateReport {
    Measured {
        load_ms: u64,
        candidate: Stats,
        incumbent: Option<Stats>,
        reference_max_abs_err: Option<f32>,
        peak_rss_bytes: Option<u64>,
    },
    /// tract refused the candidate.
    NotLoadable { message: String },
    /// The candidate loads but cannot produce the reference outputs.
    WrongOutput { message: String },
}

/// Why the child gave no report.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot start the benchmark process {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("benchmark process I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("benchmark process exceeded its {0:?} deadline and was killed")]
    TimedOut(Duration),
    #[error("benchmark process ran out of memory (limit {limit_mib} MiB): {stderr}")]
    OutOfMemory { limit_mib: u64, stderr: String },
    #[error("benchmark process died ({status}); last words: {stderr}")]
    Died { status: String, stderr: String },
    #[error("benchmark process answered nonsense: {0}")]
    Garbled(String),
}

/// Runs the gate in a child process of `program`.
pub async fn run_in_child(
    program: &std::path::Path,
    request: &GateRequest,
    deadline: Duration,
) -> Result<GateReport, GateError> {
    let mut child = tokio::process::Command::new(program)
        .arg(CHILD_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| GateError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let input = serde_json::to_vec(request).map_err(|e| GateError::Garbled(e.to_string()))?;
    crate::failpoint::hit("mid-benchmark");
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| GateError::Garbled("no stdin".into()))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| GateError::Garbled("no stdout".into()))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| GateError::Garbled("no stderr".into()))?;
    let talk = async {
        stdin.write_all(&input).await?;
        drop(stdin);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o?;
        e?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(deadline, talk).await {
        Ok(r) => r?,
        Err(_) => return Err(GateError::TimedOut(deadline)), // kill_on_drop reaps it
    };
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(nothing)");
        // Rust aborts (no unwinding) when an allocation fails outside tract's own checks.
        if last.starts_with("memory allocation of") {
            return Err(GateError::OutOfMemory {
                limit_mib: request.memory_limit_bytes / (1024 * 1024),
                stderr: last.chars().take(300).collect(),
            });
        }
        return Err(GateError::Died {
            status: status.to_string(),
            stderr: last.chars().take(300).collect(),
        });
    }
    serde_json::from_slice(&out).map_err(|e| GateError::Garbled(e.to_string()))
}

/// The child's side: read a request from stdin, limit memory, measure, answer on stdout.
/// Returns the process exit code.
pub fn child_main() -> u8 {
    let mut input = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
        eprintln!("cannot read the gate request: {e}");
        return 2;
    }
    let request: GateRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("malformed gate request: {e}");
            return 2;
        }
    };
    if let Err(e) = rlimit::setrlimit(
        rlimit::Resource::AS,
        request.memory_limit_bytes,
        request.memory_limit_bytes,
    ) {
        eprintln!("cannot limit memory: {e}");
        return 2;
    }
    // A panic inside tract (a failed allocation under the limit, an assertion on a broken
    // graph) becomes a report, not a backtrace the parent has to dig a reason out of.
    std::panic::set_hook(Box::new(|_| {}));
    let report = std::panic::catch_unwind(|| measure(&request))
        .unwrap_or_else(|payload| panic_report(payload.as_ref(), request.memory_limit_bytes));
    match serde_json::to_writer(std::io::stdout(), &report) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write the gate report: {e}");
            2
        }
    }
}

fn load(file: &ModelFile) -> Result<Model, String> {
    let bytes = std::fs::read(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
    Model::load(&bytes, &file.inputs).map_err(|e| e.to_string())
}

/// Loads, checks and benchmarks; pure computation, no policy (the parent judges).
pub fn measure(request: &GateRequest) -> GateReport {
    let started = std::time::Instant::now();
    let candidate = match load(&request.candidate) {
        Ok(m) => m,
        Err(message) => return GateReport::NotLoadable { message },
    };
    let load_ms = started.elapsed().as_millis() as u64;
    let gate = &request.gate;
    let reference_max_abs_err = match gate
        .reference
        .as_ref()
        .map(|r: &Reference| reference_error(&candidate, r))
    {
        None => None,
        Some(Ok(err)) => Some(err),
        Some(Err(e)) => {
            return GateReport::WrongOutput {
                message: e.to_string(),
            };
        }
    };
    let bench = |model: &Model, seed: u64| {
        reference_inputs(model, seed)
            .and_then(|inputs| benchmark(model, &inputs, gate.warmup_runs, gate.runs))
            .map(Stats::from)
    };
    let candidate_stats = match bench(&candidate, request.candidate.seed) {
        Ok(s) => s,
        Err(e) => {
            return GateReport::NotLoadable {
                message: e.to_string(),
            };
        }
    };
    drop(candidate);
    // The serving model loaded fine before; if it no longer does, the comparison is skipped.
    let incumbent = request
        .incumbent
        .as_ref()
        .and_then(|file| load(file).ok().and_then(|m| bench(&m, file.seed).ok()));
    GateReport::Measured {
        load_ms,
        candidate: candidate_stats,
        incumbent,
        reference_max_abs_err,
        peak_rss_bytes: peak_rss(),
    }
}

/// The report for a panic while measuring. A panic payload is only text; an allocation
/// failure is the one kind the parent must tell apart (memory, not a broken file).
fn panic_report(payload: &(dyn std::any::Any + Send), limit_bytes: u64) -> GateReport {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    let text: String = text.chars().take(300).collect();
    let message = if text.contains("allocate") {
        format!(
            "out of memory: tract needed more than the {} MiB limit ({text})",
            limit_bytes / (1024 * 1024)
        )
    } else {
        format!("tract panicked: {text}")
    };
    GateReport::NotLoadable { message }
}

/// VmHWM of this process, where /proc tells it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
