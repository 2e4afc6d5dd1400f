//! The tract backend: pure Rust, on the CPU, always there.

use std::sync::Arc;

use botfleet_protocol::tensor::{DataType, TensorSpec};
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec,
    Tensor as TractTensor, TypedRunnableModel, tvec,
};
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

use crate::model::{EngineError, GraphPort, InputPort};
use crate::tensor::{Tensor, TensorData};

type Plan = TypedRunnableModel;

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

/// A loaded, optimised tract plan; runs from many threads at once.
#[derive(Debug, Clone)]
pub(crate) struct TractModel {
    plan: Arc<Plan>,
}

/// What a load gives the seam: the backend, its input ports in graph order, output names.
pub(crate) type Loaded<B> = (B, Vec<InputPort>, Vec<String>);

impl TractModel {
    /// Loads `bytes` with the input shapes of `inputs` (which fix symbolic dimensions).
    ///
    /// Some exported models carry value_info that tract's analysis rejects; those load when
    /// it is ignored, so a failed analysis is retried that way once.
    pub(crate) fn load(bytes: &[u8], inputs: &[TensorSpec]) -> Result<Loaded<Self>, EngineError> {
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
    }

    fn load_once(
        bytes: &[u8],
        inputs: &[TensorSpec],
        ignore_value_info: bool,
    ) -> Result<Loaded<Self>, EngineError> {
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
        let ports = InputPort::match_signature(&graph_inputs, inputs)?;
        for (ix, port) in ports.iter().enumerate() {
            let datum = to_datum(port.spec.datatype).ok_or_else(|| EngineError::BadSignature {
                name: port.spec.name.clone(),
                message: format!("datatype {} is not supported", port.spec.datatype.as_str()),
            })?;
            model
                .set_input_fact(ix, InferenceFact::dt_shape(datum, port.shape.clone()))
                .map_err(|e| EngineError::BadSignature {
                    name: port.spec.name.clone(),
                    message: chain(&e),
                })?;
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
        Ok((Self { plan }, ports, outputs))
    }

    /// Runs one inference on inputs already checked and put in graph order.
    pub(crate) fn run(
        &self,
        inputs: Vec<Tensor>,
        outputs: &[String],
    ) -> Result<Vec<Tensor>, EngineError> {
        let mut values: TVec<TValue> = tvec!();
        for t in inputs {
            // The request's buffer becomes tract's tensor as it is (no copy).
            let shape = IxDyn(&t.shape);
            let tensor: Result<TractTensor, _> = match t.data {
                TensorData::Bool(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Uint8(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Int8(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Int32(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Int64(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Fp32(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
                TensorData::Fp64(v) => ArrayD::from_shape_vec(shape, v).map(Into::into),
            };
            let tensor = tensor.map_err(|e| EngineError::Run(e.to_string()))?;
            values.push(tensor.into_tvalue());
        }
        let results = self
            .plan
            .run(values)
            .map_err(|e| EngineError::Run(chain(&e)))?;
        results
            .into_iter()
            .zip(outputs)
            .map(|(value, name)| to_tensor(name, &value))
            .collect()
    }
}

fn to_tensor(name: &str, value: &TValue) -> Result<Tensor, EngineError> {
    fn slice<T: tract_onnx::prelude::Datum + Clone>(v: &TValue) -> Result<Vec<T>, String> {
        let view = v.to_plain_array_view::<T>().map_err(|e| chain(&e))?;
        // A dense row-major view (tract's outputs are) is one copy of its slice.
        Ok(match view.as_slice() {
            Some(values) => values.to_vec(),
            None => view.iter().cloned().collect(),
        })
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
