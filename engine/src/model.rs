//! The engine seam: one `Model` whatever backend runs it.
//!
//! Callers load through [`crate::Engines::load`] (or [`Model::load`] for tract) and get the
//! same behaviour from every backend: the input signature checked the same way, the same
//! typed errors, the same output tensors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::tensor::{DataType, TensorSpec};

use crate::tensor::Tensor;
use crate::tract::TractModel;

/// What can go wrong loading or running a model. Callers decide by variant.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("not a loadable ONNX model: {0}")]
    NotOnnx(String),
    #[error("the model's inputs are {graph:?} but the signature names {signature:?}")]
    SignatureMismatch {
        graph: Vec<String>,
        signature: Vec<String>,
    },
    #[error("input {name:?}: {message}")]
    BadSignature { name: String, message: String },
    #[error("unsupported operator: {}", nodes.join(", "))]
    UnsupportedOp { nodes: Vec<String> },
    #[error("tract cannot optimise the model: {0}")]
    Optimise(String),
    #[error("input {name:?} is missing")]
    MissingInput { name: String },
    #[error("input {name:?} is not an input of this model (inputs: {expected:?})")]
    UnknownInput { name: String, expected: Vec<String> },
    #[error("input {name:?} has datatype {got} but the model takes {want}")]
    WrongDatatype {
        name: String,
        got: &'static str,
        want: &'static str,
    },
    #[error("input {name:?} has shape {got:?} but the model takes {want:?}")]
    WrongShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("input {name:?} has {got} values but shape {shape:?} needs {want}")]
    WrongLength {
        name: String,
        got: usize,
        want: usize,
        shape: Vec<usize>,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("output {name:?} has a datatype the engine cannot return ({datum})")]
    UnsupportedOutput { name: String, datum: String },
    /// The engine is not usable on this machine (no library, no provider, no GPU).
    #[error("engine {engine} is not available: {reason}")]
    Unavailable { engine: EngineKind, reason: String },
    /// ONNX Runtime refused to build a session for the model.
    #[error("ONNX Runtime ({engine}) cannot load the model: {message}")]
    Session { engine: EngineKind, message: String },
}

/// An input or output of the ONNX graph as declared in the file (`-1`: symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphPort {
    pub name: String,
    pub datatype: Option<DataType>,
    pub shape: Option<Vec<i64>>,
}

/// A loaded model, ready to run from many threads at once.
#[derive(Debug, Clone)]
pub struct Model {
    backend: Backend,
    inputs: Vec<InputPort>,
    outputs: Vec<String>,
    load_time: Duration,
}

#[derive(Debug, Clone)]
enum Backend {
    Tract(TractModel),
    #[cfg(feature = "onnxruntime")]
    OnnxRuntime(Arc<crate::onnxruntime::OrtModel>),
}

/// One graph input with the concrete shape the signature gives it.
#[derive(Debug, Clone)]
pub(crate) struct InputPort {
    pub(crate) spec: TensorSpec,
    pub(crate) shape: Vec<usize>,
}

impl InputPort {
    /// The signature's entry for each graph input, in graph order; both must name the same.
    pub(crate) fn match_signature(
        graph: &[String],
        signature: &[TensorSpec],
    ) -> Result<Vec<InputPort>, EngineError> {
        let mismatch = || EngineError::SignatureMismatch {
            graph: graph.to_vec(),
            signature: signature.iter().map(|s| s.name.clone()).collect(),
        };
        if graph.len() != signature.len() {
            return Err(mismatch());
        }
        graph
            .iter()
            .map(|name| {
                let spec = signature
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(mismatch)?;
                Ok(InputPort {
                    spec: spec.clone(),
                    shape: concrete_shape(spec)?,
                })
            })
            .collect()
    }
}

pub(crate) fn concrete_shape(spec: &TensorSpec) -> Result<Vec<usize>, EngineError> {
    spec.shape
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| EngineError::BadSignature {
            name: spec.name.clone(),
            message: format!(
                "shape {:?} must be concrete (every dimension ≥ 1)",
                spec.shape
            ),
        })
}

impl Model {
    /// Loads `bytes` on tract with the input shapes of `inputs` (which fix symbolic
    /// dimensions).
    pub fn load(bytes: &[u8], inputs: &[TensorSpec]) -> Result<Self, EngineError> {
        let started = Instant::now();
        let (plan, inputs, outputs) = TractModel::load(bytes, inputs)?;
        Ok(Self {
            backend: Backend::Tract(plan),
            inputs,
            outputs,
            load_time: started.elapsed(),
        })
    }

    #[cfg(feature = "onnxruntime")]
    pub(crate) fn from_onnxruntime(
        model: crate::onnxruntime::OrtModel,
        inputs: Vec<InputPort>,
        outputs: Vec<String>,
        load_time: Duration,
    ) -> Self {
        Self {
            backend: Backend::OnnxRuntime(Arc::new(model)),
            inputs,
            outputs,
            load_time,
        }
    }

    /// The engine running this model.
    pub fn engine(&self) -> EngineKind {
        match &self.backend {
            Backend::Tract(_) => EngineKind::Tract,
            #[cfg(feature = "onnxruntime")]
            Backend::OnnxRuntime(m) => m.engine(),
        }
    }

    /// The input signature this model was loaded with, in graph order.
    pub fn inputs(&self) -> impl Iterator<Item = &TensorSpec> {
        self.inputs.iter().map(|p| &p.spec)
    }

    /// Output names, in graph order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Load time, including optimisation (tract) or session creation and any TensorRT
    /// engine build (ONNX Runtime).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Checks `inputs` against the signature and puts them in graph order.
    fn order_inputs(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let expected = || self.inputs.iter().map(|p| p.spec.name.clone()).collect();
        if let Some(extra) = inputs
            .iter()
            .find(|t| !self.inputs.iter().any(|p| p.spec.name == t.name))
        {
            return Err(EngineError::UnknownInput {
                name: extra.name.clone(),
                expected: expected(),
            });
        }
        let mut out = Vec::with_capacity(self.inputs.len());
        for port in &self.inputs {
            let pos = inputs
                .iter()
                .position(|t| t.name == port.spec.name)
                .ok_or_else(|| EngineError::MissingInput {
                    name: port.spec.name.clone(),
                })?;
            let t = inputs.swap_remove(pos);
            if t.data.datatype() != port.spec.datatype {
                return Err(EngineError::WrongDatatype {
                    name: t.name,
                    got: t.data.datatype().as_str(),
                    want: port.spec.datatype.as_str(),
                });
            }
            if t.shape != port.shape {
                return Err(EngineError::WrongShape {
                    name: t.name,
                    got: t.shape,
                    want: port.shape.clone(),
                });
            }
            let want: usize = port.shape.iter().product();
            if t.data.len() != want {
                return Err(EngineError::WrongLength {
                    name: t.name,
                    got: t.data.len(),
                    want,
                    shape: t.shape,
                });
            }
            out.push(t);
        }
        Ok(out)
    }

    /// Runs one inference. Blocking and CPU-bound: call it off the async executor.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let inputs = self.order_inputs(inputs)?;
        match &self.backend {
            Backend::Tract(plan) => plan.run(inputs, &self.outputs),
            #[cfg(feature = "onnxruntime")]
            Backend::OnnxRuntime(m) => m.run(inputs, &self.outputs),
        }
    }
}
