//! The benchmark gate, run in a child process.
//!
//! A malformed or hostile ONNX file can panic, abort or exhaust memory inside an engine. So
//! the candidate is first loaded, checked against its reference output and benchmarked on
//! every candidate engine (together with the serving model, for a fair comparison) in a
//! separate process of the agent binary (`botfleet-agent __gate`), with an address-space
//! limit and a wall-clock deadline. A TensorRT engine is built there too, into the store's
//! cache, while the incumbent keeps serving. The daemon only loads a model itself once the
//! child has shown it loads and passes, on the engine the parent chose from the figures.
//!
//! The same child answers the start-up probe of ONNX Runtime, so the daemon never maps the
//! library unless a model is to run on it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use botfleet_engine::{
    BenchStats, Engines, LoadOptions, Model, OnnxRuntimeSettings, benchmark, evaluate,
    reference_error, reference_inputs,
};
use botfleet_protocol::engine::{EngineKind, EnginesInfo};
use botfleet_protocol::evaluation::{Agreement, Evaluation, EvaluationSet};
use botfleet_protocol::manifest::Gate;
use botfleet_protocol::tensor::TensorSpec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The first argument that turns the agent binary into a gate child.
pub const CHILD_ARG: &str = "__gate";

/// What the child is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum ChildRequest {
    /// Load ONNX Runtime and try its providers: what engines does this robot have?
    Probe { onnxruntime: OnnxRuntimeSettings },
    /// Measure a candidate model.
    Gate(Box<GateRequest>),
}

/// What the child is asked to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateRequest {
    pub candidate: ModelFile,
    /// Engines to measure the candidate on, in order of preference (the candidate file's
    /// own `engine` is ignored).
    pub engines: Vec<EngineKind>,
    pub gate: Gate,
    /// The model serving the slot, benchmarked in the same run (on the engine it serves
    /// on) when the gate compares.
    pub incumbent: Option<ModelFile>,
    /// Address-space limit of the child, in bytes (not applied when a GPU engine runs:
    /// CUDA reserves far more address space than it uses).
    pub memory_limit_bytes: u64,
    pub onnxruntime: OnnxRuntimeSettings,
    /// The accuracy gate's evaluation set (the manifest's `gate.evaluation` says what to
    /// measure on it), checked by the parent against its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<PathBuf>,
}

/// A model on disk with the input signature it is loaded with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
    /// Seed of the benchmark input (the reference seed when there is one).
    pub seed: u64,
    /// The engine to load it on.
    #[serde(default = "tract")]
    pub engine: EngineKind,
    /// Where TensorRT keeps engines for this file, per engine kind (`{dir}/{engine}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_cache: Option<PathBuf>,
}

fn tract() -> EngineKind {
    EngineKind::Tract
}

impl ModelFile {
    fn load_options(&self, engine: EngineKind) -> LoadOptions {
        LoadOptions {
            tensorrt_cache: self
                .engine_cache
                .as_ref()
                .filter(|_| engine.is_tensorrt())
                .map(|d| d.join(engine.as_str())),
        }
    }
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

/// What one engine made of the candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineRun {
    pub engine: EngineKind,
    pub load_ms: u64,
    #[serde(flatten)]
    pub result: EngineResult,
}

/// The outcome on one engine; the parent judges it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum EngineResult {
    Measured {
        stats: Stats,
        reference_max_abs_err: Option<f32>,
        peak_rss_bytes: Option<u64>,
        /// A TensorRT engine was found in the cache rather than built.
        cached: bool,
        /// Answers on the evaluation set that agreed with the parent's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agreement: Option<Agreement>,
    },
    /// The engine refused the candidate.
    NotLoadable { message: String },
    /// It loads but cannot produce the reference outputs.
    WrongOutput { message: String },
}

/// What the child found.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum GateReport {
    Measured {
        /// Each engine of the request, in its order.
        engines: Vec<EngineRun>,
        incumbent: Option<Stats>,
    },
    /// The candidate took the measuring down (a panic inside an engine).
    NotLoadable { message: String },
    /// Engines found on this robot (answer to [`ChildRequest::Probe`]).
    Engines { info: EnginesInfo },
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
    request: &ChildRequest,
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
            let limit = match request {
                ChildRequest::Gate(g) => g.memory_limit_bytes,
                ChildRequest::Probe { .. } => 0,
            };
            return Err(GateError::OutOfMemory {
                limit_mib: limit / (1024 * 1024),
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
    let request: ChildRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("malformed gate request: {e}");
            return 2;
        }
    };
    // A panic inside an engine (a failed allocation under the limit, an assertion on a
    // broken graph) becomes a report, not a backtrace the parent has to dig a reason out of.
    std::panic::set_hook(Box::new(|_| {}));
    let report = match &request {
        ChildRequest::Probe { onnxruntime } => GateReport::Engines {
            info: Engines::probe(onnxruntime).info().clone(),
        },
        ChildRequest::Gate(request) => {
            if !uses_gpu(request)
                && let Err(e) = rlimit::setrlimit(
                    rlimit::Resource::AS,
                    request.memory_limit_bytes,
                    request.memory_limit_bytes,
                )
            {
                eprintln!("cannot limit memory: {e}");
                return 2;
            }
            std::panic::catch_unwind(|| measure(request)).unwrap_or_else(|payload| {
                panic_report(payload.as_ref(), request.memory_limit_bytes)
            })
        }
    };
    match serde_json::to_writer(std::io::stdout(), &report) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write the gate report: {e}");
            2
        }
    }
}

fn uses_gpu(request: &GateRequest) -> bool {
    request.engines.iter().any(|e| e.is_gpu())
        || request
            .incumbent
            .as_ref()
            .is_some_and(|m| m.engine.is_gpu())
}

fn load(engines: &Engines, file: &ModelFile, engine: EngineKind) -> Result<Model, String> {
    let bytes = std::fs::read(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
    engines
        .load(engine, &bytes, &file.inputs, &file.load_options(engine))
        .map_err(|e| e.to_string())
}

/// Loads, checks and benchmarks on each engine; pure measurement, no policy (the parent
/// judges).
pub fn measure(request: &GateRequest) -> GateReport {
    // The parent listed only engines its probe found; loading ONNX Runtime again here is
    // the cost of measuring on it.
    let engines = Engines::from_info(
        &request.onnxruntime,
        EnginesInfo {
            available: request
                .engines
                .iter()
                .copied()
                .chain(request.incumbent.as_ref().map(|m| m.engine))
                .collect(),
            ..EnginesInfo::default()
        },
    );
    let gate = &request.gate;
    let evaluation = match (&gate.evaluation, &request.evaluation) {
        (None, _) => Ok(None),
        (Some(_), None) => Err("the gate names an evaluation set but none was given".to_owned()),
        (Some(evaluation), Some(path)) => std::fs::read(path)
            .map_err(|e| format!("evaluation set {}: {e}", path.display()))
            .and_then(|bytes| {
                EvaluationSet::parse(&bytes, evaluation.metric).map_err(|e| e.to_string())
            })
            .map(|set| Some((evaluation, set))),
    };
    let bench = |model: &Model, seed: u64| {
        reference_inputs(model, seed)
            .and_then(|inputs| benchmark(model, &inputs, gate.warmup_runs, gate.runs))
            .map(Stats::from)
    };
    let mut runs = Vec::with_capacity(request.engines.len());
    for &engine in &request.engines {
        reset_peak_rss();
        let cached = request
            .candidate
            .load_options(engine)
            .tensorrt_cache
            .is_some_and(|dir| dir_has_files(&dir));
        let started = std::time::Instant::now();
        let loaded = load(&engines, &request.candidate, engine);
        let load_ms = started.elapsed().as_millis() as u64;
        let result = match (loaded, &evaluation) {
            (Err(message), _) => EngineResult::NotLoadable { message },
            (Ok(_), Err(message)) => EngineResult::WrongOutput {
                message: message.clone(),
            },
            (Ok(model), Ok(evaluation)) => measure_one(
                &model,
                gate,
                evaluation.as_ref().map(|(e, set)| (*e, set)),
                request.candidate.seed,
                cached,
                &bench,
            ),
        };
        runs.push(EngineRun {
            engine,
            load_ms,
            result,
        });
    }
    // The serving model loaded fine before; if it no longer does, the comparison is skipped.
    let incumbent = request.incumbent.as_ref().and_then(|file| {
        load(&engines, file, file.engine)
            .ok()
            .and_then(|m| bench(&m, file.seed).ok())
    });
    GateReport::Measured {
        engines: runs,
        incumbent,
    }
}

fn measure_one(
    model: &Model,
    gate: &Gate,
    evaluation: Option<(&Evaluation, &EvaluationSet)>,
    seed: u64,
    cached: bool,
    bench: &dyn Fn(&Model, u64) -> Result<Stats, botfleet_engine::EngineError>,
) -> EngineResult {
    let reference_max_abs_err = match gate.reference.as_ref().map(|r| reference_error(model, r)) {
        None => None,
        Some(Ok(err)) => Some(crate::failpoint::skew_output(model.engine(), err)),
        Some(Err(e)) => {
            return EngineResult::WrongOutput {
                message: e.to_string(),
            };
        }
    };
    let agreement = match evaluation.map(|(e, set)| evaluate(model, e, set)) {
        None => None,
        Some(Ok(agreement)) => Some(agreement),
        Some(Err(e)) => {
            return EngineResult::WrongOutput {
                message: format!("evaluation set: {e}"),
            };
        }
    };
    match bench(model, seed) {
        Ok(stats) => EngineResult::Measured {
            stats,
            reference_max_abs_err,
            peak_rss_bytes: peak_rss(),
            cached,
            agreement,
        },
        Err(e) => EngineResult::NotLoadable {
            message: e.to_string(),
        },
    }
}

fn dir_has_files(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
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
            "out of memory: the engine needed more than the {} MiB limit ({text})",
            limit_bytes / (1024 * 1024)
        )
    } else {
        format!("the engine panicked: {text}")
    };
    GateReport::NotLoadable { message }
}

/// Starts a new peak-RSS window for this process (`VmHWM`), so each engine's figure is
/// its own. Best effort: without it, a later engine's peak includes the earlier ones'.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", b"5");
}

/// VmHWM of this process, where /proc tells it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
