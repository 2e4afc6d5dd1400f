//! Loading and running one model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use botfleet_protocol::tensor::{DataType, TensorSpec};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec,
    Tensor as TractTensor, TypedRunnableModel, tvec,
};
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

use crate::tensor::{Tensor, TensorData};

type Plan = TypedRunnableModel;

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
}

/// An input or output of the ONNX graph as declared in the file (`-1`: symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphPort {
    pub name: String,
    pub datatype: Option<DataType>,
    pub shape: Option<Vec<i64>>,
}

/// A loaded, optimised model, ready to run from many threads at once.
#[derive(Debug, Clone)]
pub struct Model {
    plan: Arc<Plan>,
    inputs: Vec<InputPort>,
    outputs: Vec<String>,
    load_time: Duration,
}

#[derive(Debug, Clone)]
struct InputPort {
    spec: TensorSpec,
    shape: Vec<usize>,
}

fn to_datum(dt: DataType) -> Option<DatumType> {
    Some(match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Int8 => DatumType::I8,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
    })
}

fn from_datum(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::I8 => DataType::Int8,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        _ => return None,
    })
}

fn chain(err: &tract_onnx::prelude::TractError) -> String {
    format!("{err:#}")
}

fn parse(
    bytes: &[u8],
    ignore_value_info: bool,
) -> Result<tract_onnx::prelude::InferenceModel, String> {
    tract_onnx::onnx()
        .with_ignore_value_info(ignore_value_info)
        .model_for_read(&mut &bytes[..])
        .map_err(|e| chain(&e))
}

/// Reads the declared inputs and outputs of an ONNX file without optimising it.
pub fn inspect(bytes: &[u8]) -> Result<(Vec<GraphPort>, Vec<GraphPort>), EngineError> {
    let model = parse(bytes, false)
        .or_else(|_| parse(bytes, true))
        .map_err(EngineError::NotOnnx)?;
    let port = |fact: &InferenceFact, name: String| GraphPort {
        name,
        datatype: fact.datum_type.concretize().and_then(from_datum),
        shape: (!fact.shape.is_open()).then(|| {
            fact.shape
                .dims()
                .map(|d| d.concretize().and_then(|d| d.as_i64()).unwrap_or(-1))
                .collect()
        }),
    };
    let ports = |outlets: &[tract_onnx::prelude::OutletId], input: bool| {
        outlets
            .iter()
            .enumerate()
            .map(|(ix, outlet)| {
                let name = model.node(outlet.node).name.clone();
                let fact = if input {
                    model.input_fact(ix).cloned().unwrap_or_default()
                } else {
                    model.output_fact(ix).cloned().unwrap_or_default()
                };
                port(&fact, name)
            })
            .collect::<Vec<_>>()
    };
    let inputs = ports(
        model
            .input_outlets()
            .map_err(|e| EngineError::NotOnnx(chain(&e)))?,
        true,
    );
    let outputs = ports(
        model
            .output_outlets()
            .map_err(|e| EngineError::NotOnnx(chain(&e)))?,
        false,
    );
    Ok((inputs, outputs))
}

fn concrete_shape(spec: &TensorSpec) -> Result<Vec<usize>, EngineError> {
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
    /// Loads `bytes` with the input shapes of `inputs` (which fix symbolic dimensions).
    ///
    /// Some exported models carry value_info that tract's analysis rejects; those load when
    /// it is ignored, so a failed analysis is retried that way once.
    pub fn load(bytes: &[u8], inputs: &[TensorSpec]) -> Result<Self, EngineError> {
        let started = Instant::now();
        match Self::load_once(bytes, inputs, false) {
            Ok(plan) => Ok(plan),
            Err(EngineError::Optimise(first)) => {
                tracing::debug!(error = %first, "analysis failed; retrying without value_info");
                Self::load_once(bytes, inputs, true).map_err(|second| match second {
                    EngineError::Optimise(_) => EngineError::Optimise(first),
                    other => other,
                })
            }
            Err(other) => Err(other),
        }
        .map(|mut model| {
            model.load_time = started.elapsed();
            model
        })
    }

    fn load_once(
        bytes: &[u8],
        inputs: &[TensorSpec],
        ignore_value_info: bool,
    ) -> Result<Self, EngineError> {
        let mut model = parse(bytes, ignore_value_info).map_err(EngineError::NotOnnx)?;
        // tract parses an op it does not know into a placeholder that only fails later, with
        // a message about typing; name the operator instead.
        let unsupported: Vec<String> = model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<UnimplementedOp>())
            .map(|n| format!("node {:?} is {}", n.name, n.op().name()))
            .collect();
        if !unsupported.is_empty() {
            return Err(EngineError::UnsupportedOp { nodes: unsupported });
        }
        let graph_inputs: Vec<String> = model
            .input_outlets()
            .map_err(|e| EngineError::NotOnnx(chain(&e)))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let mut ports = Vec::with_capacity(graph_inputs.len());
        for (ix, name) in graph_inputs.iter().enumerate() {
            let spec = inputs.iter().find(|s| &s.name == name).ok_or_else(|| {
                EngineError::SignatureMismatch {
                    graph: graph_inputs.clone(),
                    signature: inputs.iter().map(|s| s.name.clone()).collect(),
                }
            })?;
            let shape = concrete_shape(spec)?;
            let datum = to_datum(spec.datatype).ok_or_else(|| EngineError::BadSignature {
                name: name.clone(),
                message: format!("datatype {} is not supported", spec.datatype.as_str()),
            })?;
            model
                .set_input_fact(ix, InferenceFact::dt_shape(datum, shape.clone()))
                .map_err(|e| EngineError::BadSignature {
                    name: name.clone(),
                    message: chain(&e),
                })?;
            ports.push(InputPort {
                spec: spec.clone(),
                shape,
            });
        }
        if inputs.len() != graph_inputs.len() {
            return Err(EngineError::SignatureMismatch {
                graph: graph_inputs,
                signature: inputs.iter().map(|s| s.name.clone()).collect(),
            });
        }
        let typed = model
            .into_optimized()
            .map_err(|e| EngineError::Optimise(chain(&e)))?;
        let outputs = typed
            .output_outlets()
            .map_err(|e| EngineError::Optimise(chain(&e)))?
            .iter()
            .map(|o| {
                typed
                    .outlet_label(*o)
                    .unwrap_or(&typed.node(o.node).name)
                    .to_owned()
            })
            .collect();
        let plan = typed
            .into_runnable()
            .map_err(|e| EngineError::Optimise(chain(&e)))?;
        Ok(Self {
            plan,
            inputs: ports,
            outputs,
            load_time: Duration::ZERO,
        })
    }

    /// The input signature this model was loaded with, in graph order.
    pub fn inputs(&self) -> impl Iterator<Item = &TensorSpec> {
        self.inputs.iter().map(|p| &p.spec)
    }

    /// Output names, in graph order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Checks `inputs` against the signature and puts them in graph order.
    fn order_inputs(&self, mut inputs: Vec<Tensor>) -> Result<TVec<TValue>, EngineError> {
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
        let mut out = tvec!();
        for port in &self.inputs {
            let pos = inputs
                .iter()
                .position(|t| t.name == port.spec.name)
                .ok_or_else(|| EngineError::MissingInput {
                    name: port.spec.name.clone(),
                })?;
            let t = inputs.swap_remove(pos);
            let name = t.name;
            if t.data.datatype() != port.spec.datatype {
                return Err(EngineError::WrongDatatype {
                    name,
                    got: t.data.datatype().as_str(),
                    want: port.spec.datatype.as_str(),
                });
            }
            if t.shape != port.shape {
                return Err(EngineError::WrongShape {
                    name,
                    got: t.shape,
                    want: port.shape.clone(),
                });
            }
            let want: usize = port.shape.iter().product();
            if t.data.len() != want {
                return Err(EngineError::WrongLength {
                    name,
                    got: t.data.len(),
                    want,
                    shape: t.shape,
                });
            }
            let shape = &port.shape;
            let tensor = match &t.data {
                TensorData::Bool(v) => TractTensor::from_shape(shape, v),
                TensorData::Uint8(v) => TractTensor::from_shape(shape, v),
                TensorData::Int8(v) => TractTensor::from_shape(shape, v),
                TensorData::Int32(v) => TractTensor::from_shape(shape, v),
                TensorData::Int64(v) => TractTensor::from_shape(shape, v),
                TensorData::Fp32(v) => TractTensor::from_shape(shape, v),
                TensorData::Fp64(v) => TractTensor::from_shape(shape, v),
            }
            .map_err(|e| EngineError::Run(chain(&e)))?;
            out.push(tensor.into_tvalue());
        }
        Ok(out)
    }

    /// Runs one inference. Blocking and CPU-bound: call it off the async executor.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let inputs = self.order_inputs(inputs)?;
        let outputs = self
            .plan
            .run(inputs)
            .map_err(|e| EngineError::Run(chain(&e)))?;
        outputs
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, name)| to_tensor(name, &value))
            .collect()
    }
}

fn to_tensor(name: &str, value: &TValue) -> Result<Tensor, EngineError> {
    fn slice<T: tract_onnx::prelude::Datum + Clone>(v: &TValue) -> Result<Vec<T>, String> {
        v.to_plain_array_view::<T>()
            .map(|view| view.iter().cloned().collect())
            .map_err(|e| chain(&e))
    }
    let data = match value.datum_type() {
        DatumType::Bool => slice::<bool>(value).map(TensorData::Bool),
        DatumType::U8 => slice::<u8>(value).map(TensorData::Uint8),
        DatumType::I8 => slice::<i8>(value).map(TensorData::Int8),
        DatumType::I32 => slice::<i32>(value).map(TensorData::Int32),
        DatumType::I64 => slice::<i64>(value).map(TensorData::Int64),
        DatumType::F32 => slice::<f32>(value).map(TensorData::Fp32),
        DatumType::F64 => slice::<f64>(value).map(TensorData::Fp64),
        other => Err(format!("{other:?}")),
    }
    .map_err(|datum| EngineError::UnsupportedOutput {
        name: name.to_owned(),
        datum,
    })?;
    Ok(Tensor {
        name: name.to_owned(),
        shape: value.shape().to_vec(),
        data,
    })
}
