//! The ONNX Runtime backend, through `ort` with `load-dynamic`: nothing links against
//! ONNX Runtime, the library is opened at run time (JetPack's onnxruntime-gpu on a Jetson,
//! the PyPI wheel's `libonnxruntime.so` on x86), so the cross build and the package stay
//! as they are and a robot without it keeps tract.
//!
//! `ort` allows one environment per process; it lives in [`RUNTIME`] once loaded. A session
//! runs one request at a time (`Session::run` takes `&mut`), so each model holds a small
//! pool of sessions.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use botfleet_protocol::engine::{EngineKind, EnginesInfo, OnnxRuntimeInfo};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use crate::engines::{LoadOptions, OnnxRuntimeSettings, library_dirs, library_version};
use crate::model::{EngineError, InputPort, Model};
use crate::tensor::{Tensor, TensorData};

/// The loaded library and its one environment.
pub(crate) struct Runtime {
    env: Environment,
    info: OnnxRuntimeInfo,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("info", &self.info).finish()
    }
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

const NO_LIBRARY: &str = "no library configured ([engine.onnxruntime] library or ORT_DYLIB_PATH)";

/// The process's ONNX Runtime, loaded on first use from the configured library.
pub(crate) fn runtime(settings: &OnnxRuntimeSettings) -> Result<&'static Runtime, String> {
    // No library named is not an attempt: it must not stand for the process, where a later
    // caller (another agent in the same test process) names one.
    if RUNTIME.get().is_none() && settings.library_path().is_none() {
        return Err(NO_LIBRARY.to_owned());
    }
    RUNTIME
        .get_or_init(|| {
            // A library that makes `ort` panic is as unusable as one that is missing.
            std::panic::catch_unwind(|| open(settings))
                .unwrap_or_else(|_| Err("loading ONNX Runtime panicked".to_owned()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn open(settings: &OnnxRuntimeSettings) -> Result<Runtime, String> {
    let path = settings
        .library_path()
        .ok_or_else(|| NO_LIBRARY.to_owned())?;
    // `ort` resolves a relative path against the executable; ours are the operator's.
    let path = std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
    let env = builder
        .with_name("botfleet")
        .with_telemetry(false)
        .build()
        .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
    let version = version_of(&path);
    let mut providers = Vec::new();
    for (name, available) in [
        (ep::TensorRT::NAME, ep::TensorRT::is_available()),
        (ep::CUDA::NAME, ep::CUDA::is_available()),
        (ep::CPU::NAME, ep::CPU::is_available()),
    ] {
        if available.unwrap_or(false) {
            providers.push(name.to_owned());
        }
    }
    Ok(Runtime {
        env,
        info: OnnxRuntimeInfo {
            version,
            library: path.display().to_string(),
            providers,
        },
    })
}

/// The version from the library's build string (`ORT Build Info: git-branch=rel-1.20.0, …`),
/// else from its file name.
fn version_of(path: &Path) -> String {
    let from_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split(".so.").nth(1))
        .map(str::to_owned);
    let build = ort::info();
    build
        .split(|c: char| c == ',' || c.is_whitespace())
        .find_map(|part| part.strip_prefix("git-branch=rel-"))
        .map(str::to_owned)
        .or(from_name)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Fills `info` with what ONNX Runtime can run here: each provider is tried on a tiny
/// model, so a CUDA provider without a GPU or without its CUDA libraries is not listed.
pub(crate) fn probe(settings: &OnnxRuntimeSettings, info: &mut EnginesInfo) {
    let runtime = match runtime(settings) {
        Ok(r) => r,
        Err(reason) => {
            info.unavailable.insert("onnxruntime".to_owned(), reason);
            return;
        }
    };
    info.onnxruntime = Some(runtime.info.clone());
    let dirs = library_dirs(Some(Path::new(&runtime.info.library)));
    info.cuda = library_version(&dirs, "libcudart.so");
    info.tensorrt = library_version(&dirs, "libnvinfer.so");
    let probe_inputs = [TensorSpec {
        name: "x".into(),
        datatype: DataType::Fp32,
        shape: vec![1, 4],
    }];
    let bytes = identity_model();
    for engine in [
        EngineKind::OnnxruntimeCpu,
        EngineKind::OnnxruntimeCuda,
        EngineKind::OnnxruntimeTensorrt,
        EngineKind::OnnxruntimeTensorrtFp16,
        EngineKind::OnnxruntimeTensorrtInt8,
    ] {
        if settings.disabled.contains(&engine) {
            info.unavailable.insert(
                engine.as_str().to_owned(),
                "disabled in configuration".into(),
            );
            continue;
        }
        let provider = provider_name(engine);
        if !runtime.info.providers.iter().any(|p| p == provider) {
            // Absent from the library is only worth saying for the base engines.
            if matches!(
                engine,
                EngineKind::OnnxruntimeCuda | EngineKind::OnnxruntimeTensorrt
            ) {
                info.unavailable.insert(
                    engine.as_str().to_owned(),
                    format!("the ONNX Runtime library has no {provider}"),
                );
            }
            continue;
        }
        let tried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load(
                runtime,
                settings,
                engine,
                &bytes,
                &probe_inputs,
                &LoadOptions::default(),
            )
            .and_then(|m| {
                let x = Tensor {
                    name: "x".into(),
                    shape: vec![1, 4],
                    data: TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]),
                };
                m.run(vec![x])
            })
        }));
        match tried {
            Ok(Ok(out))
                if out.first().map(|t| t.data.to_f32()) == Some(vec![1.0, 2.0, 3.0, 4.0]) =>
            {
                info.available.push(engine);
            }
            Ok(Ok(_)) => {
                info.unavailable.insert(
                    engine.as_str().to_owned(),
                    "wrong answer on the probe model".into(),
                );
            }
            Ok(Err(e)) => {
                info.unavailable
                    .insert(engine.as_str().to_owned(), e.to_string());
            }
            Err(_) => {
                info.unavailable
                    .insert(engine.as_str().to_owned(), "the probe panicked".into());
            }
        }
    }
}

fn provider_name(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::OnnxruntimeCuda => ep::CUDA::NAME,
        EngineKind::OnnxruntimeTensorrt
        | EngineKind::OnnxruntimeTensorrtFp16
        | EngineKind::OnnxruntimeTensorrtInt8 => ep::TensorRT::NAME,
        _ => ep::CPU::NAME,
    }
}

/// A model loaded into ONNX Runtime sessions.
pub(crate) struct OrtModel {
    engine: EngineKind,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("engine", &self.engine)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

pub(crate) fn load(
    runtime: &Runtime,
    settings: &OnnxRuntimeSettings,
    engine: EngineKind,
    bytes: &[u8],
    inputs: &[TensorSpec],
    options: &LoadOptions,
) -> Result<Model, EngineError> {
    let started = Instant::now();
    let session_error = |message: String| EngineError::Session { engine, message };
    let count = if engine.is_gpu() {
        // The GPU runs one request at a time anyway; more sessions only cost its memory.
        1
    } else {
        settings.sessions.max(1)
    };
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        sessions.push(session(runtime, settings, engine, bytes, options).map_err(session_error)?);
    }
    let first = &sessions[0];
    let graph_inputs: Vec<String> = first.inputs().iter().map(|o| o.name().to_owned()).collect();
    let ports = InputPort::match_signature(&graph_inputs, inputs)?;
    for (port, outlet) in ports.iter().zip(first.inputs()) {
        check_input(port, outlet.dtype())?;
    }
    let outputs = first
        .outputs()
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let model = OrtModel {
        engine,
        sessions: sessions.into_iter().map(Mutex::new).collect(),
        next: AtomicUsize::new(0),
    };
    Ok(Model::from_onnxruntime(
        model,
        ports,
        outputs,
        started.elapsed(),
    ))
}

fn session(
    runtime: &Runtime,
    settings: &OnnxRuntimeSettings,
    engine: EngineKind,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Session, String> {
    let mut providers = Vec::new();
    if engine.is_tensorrt() {
        let mut trt = ep::TensorRT::default()
            .with_device_id(settings.device_id)
            .with_fp16(engine == EngineKind::OnnxruntimeTensorrtFp16)
            .with_int8(engine == EngineKind::OnnxruntimeTensorrtInt8);
        if let Some(dir) = &options.tensorrt_cache {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let dir = dir.display().to_string();
            trt = trt
                .with_engine_cache(true)
                .with_engine_cache_path(&dir)
                .with_timing_cache(true)
                .with_timing_cache_path(&dir);
        }
        providers.push(trt.build().error_on_failure());
    }
    if engine.is_gpu() {
        // Nodes TensorRT does not take run on CUDA, not on the CPU.
        providers.push(
            ep::CUDA::default()
                .with_device_id(settings.device_id)
                .build()
                .error_on_failure(),
        );
    }
    let builder = Session::builder(&runtime.env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| e.to_string())?
        .with_intra_threads(settings.intra_threads.max(1))
        .map_err(|e| e.to_string())?
        .with_inter_threads(1)
        .map_err(|e| e.to_string())?;
    let mut builder = if providers.is_empty() {
        builder
    } else {
        builder
            .with_execution_providers(providers)
            .map_err(|e| e.to_string())?
    };
    builder.commit_from_memory(bytes).map_err(|e| e.to_string())
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

/// The signature's datatype and shape must fit what the graph declares.
fn check_input(port: &InputPort, declared: &ValueType) -> Result<(), EngineError> {
    let bad = |message: String| EngineError::BadSignature {
        name: port.spec.name.clone(),
        message,
    };
    let ValueType::Tensor { ty, shape, .. } = declared else {
        return Err(bad(format!("the graph input is not a tensor ({declared})")));
    };
    match datatype_of(*ty) {
        Some(dt) if dt == port.spec.datatype => {}
        _ => {
            return Err(bad(format!(
                "the signature says {} but the graph takes {ty}",
                port.spec.datatype.as_str()
            )));
        }
    }
    let dims: &[i64] = shape;
    let fits = dims.len() == port.shape.len()
        && dims
            .iter()
            .zip(&port.shape)
            .all(|(&d, &s)| d < 0 || usize::try_from(d).is_ok_and(|d| d == s));
    if !fits {
        return Err(bad(format!(
            "shape {:?} does not fit the graph's {dims:?}",
            port.shape
        )));
    }
    Ok(())
}

impl OrtModel {
    pub(crate) fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Runs one inference on inputs already checked and put in graph order.
    pub(crate) fn run(
        &self,
        inputs: Vec<Tensor>,
        outputs: &[String],
    ) -> Result<Vec<Tensor>, EngineError> {
        let run_error = |e: ort::Error| EngineError::Run(e.to_string());
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for t in inputs {
            values.push((t.name, to_value(t.shape, t.data).map_err(run_error)?));
        }
        let mut session = self.session();
        let results = session.run(values).map_err(run_error)?;
        outputs
            .iter()
            .map(|name| {
                let value = results
                    .get(name.as_str())
                    .ok_or_else(|| EngineError::Run(format!("output {name:?} was not produced")))?;
                from_value(name, value)
            })
            .collect()
    }

    /// The first free session, else the next one in turn (waiting for it). Sequential
    /// requests all land on the first session, whose weights and arena stay warm in the
    /// cache; the others take only the requests that overlap.
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        for session in &self.sessions {
            if let Ok(guard) = session.try_lock() {
                return guard;
            }
        }
        let n = self.sessions.len();
        self.sessions[self.next.fetch_add(1, Ordering::Relaxed) % n]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn to_value(shape: Vec<usize>, data: TensorData) -> Result<DynValue, ort::Error> {
    Ok(match data {
        TensorData::Bool(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint8(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int8(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int32(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int64(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp32(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp64(v) => OrtTensor::from_array((shape, v))?.into_dyn(),
    })
}

fn from_value(name: &str, value: &DynValue) -> Result<Tensor, EngineError> {
    let unsupported = |datum: String| EngineError::UnsupportedOutput {
        name: name.to_owned(),
        datum,
    };
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(unsupported(value.dtype().to_string()));
    };
    fn extract<T: ort::value::PrimitiveTensorElementType + Clone>(
        value: &DynValue,
    ) -> Result<(Vec<usize>, Vec<T>), ort::Error> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let shape = shape.iter().map(|&d| d.max(0) as usize).collect();
        Ok((shape, data.to_vec()))
    }
    let run_error = |e: ort::Error| EngineError::Run(e.to_string());
    let (shape, data) = match ty {
        TensorElementType::Bool => extract::<bool>(value).map(|(s, d)| (s, TensorData::Bool(d))),
        TensorElementType::Uint8 => extract::<u8>(value).map(|(s, d)| (s, TensorData::Uint8(d))),
        TensorElementType::Int8 => extract::<i8>(value).map(|(s, d)| (s, TensorData::Int8(d))),
        TensorElementType::Int32 => extract::<i32>(value).map(|(s, d)| (s, TensorData::Int32(d))),
        TensorElementType::Int64 => extract::<i64>(value).map(|(s, d)| (s, TensorData::Int64(d))),
        TensorElementType::Float32 => extract::<f32>(value).map(|(s, d)| (s, TensorData::Fp32(d))),
        TensorElementType::Float64 => extract::<f64>(value).map(|(s, d)| (s, TensorData::Fp64(d))),
        other => return Err(unsupported(other.to_string())),
    }
    .map_err(run_error)?;
    Ok(Tensor {
        name: name.to_owned(),
        shape,
        data,
    })
}

/// A one-node ONNX model (`y = Identity(x)`, FP32 `[1, 4]`), encoded by hand: the probe's
/// smallest possible test of a provider.
fn identity_model() -> Vec<u8> {
    fn field(tag: u32, wire: u8, body: &[u8]) -> Vec<u8> {
        let mut out = varint(u64::from(tag << 3 | u32::from(wire)));
        if wire == 2 {
            out.extend(varint(body.len() as u64));
        }
        out.extend_from_slice(body);
        out
    }
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }
    fn int(tag: u32, v: u64) -> Vec<u8> {
        field(tag, 0, &varint(v))
    }
    // ValueInfoProto { name, type: TypeProto { tensor_type: { elem_type: FLOAT, shape: [1, 4] } } }
    let value_info = |name: &str| {
        let dims = [1u64, 4]
            .iter()
            .flat_map(|&d| field(1, 2, &int(1, d)))
            .collect::<Vec<u8>>();
        let tensor = [int(1, 1), field(2, 2, &dims)].concat();
        let ty = field(1, 2, &tensor);
        [field(1, 2, name.as_bytes()), field(2, 2, &ty)].concat()
    };
    let node = [
        field(1, 2, b"x"),
        field(2, 2, b"y"),
        field(4, 2, b"Identity"),
    ]
    .concat();
    let graph = [
        field(1, 2, &node),
        field(2, 2, b"probe"),
        field(11, 2, &value_info("x")),
        field(12, 2, &value_info("y")),
    ]
    .concat();
    let opset = int(2, 13);
    [int(1, 8), field(7, 2, &graph), field(8, 2, &opset)].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_model_is_a_valid_onnx_file() {
        // tract parses it the same way ONNX Runtime does.
        let model = crate::Model::load(
            &identity_model(),
            &[TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 4],
            }],
        )
        .unwrap();
        let x = Tensor {
            name: "x".into(),
            shape: vec![1, 4],
            data: TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]),
        };
        let out = model.run(vec![x]).unwrap();
        assert_eq!(out[0].data.to_f32(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out[0].name, "y");
    }
}
