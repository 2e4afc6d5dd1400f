//! OIP v2 request and answer tensors: JSON values (flat or nested arrays) and binary data
//! (see [`super::binary`]) to engine tensors, and back.

use std::fmt;

use axum::http::StatusCode;
use botfleet_engine::{Tensor, TensorData};
use botfleet_protocol::tensor::DataType;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, bad_request, binary};

/// Tensor values as sent: a flat or nested JSON array of numbers (or booleans).
#[derive(Debug, Default)]
pub(super) struct FlatValues(Vec<f64>);

impl<'de> Deserialize<'de> for FlatValues {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Flatten<'a>(&'a mut Vec<f64>);

        impl<'de> de::DeserializeSeed<'de> for Flatten<'_> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for Flatten<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a boolean, or a (nested) array of them")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
                self.0.push(v);
                Ok(())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
                self.0.push(v as f64);
                Ok(())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
                self.0.push(v as f64);
                Ok(())
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
                self.0.push(f64::from(u8::from(v)));
                Ok(())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
                Ok(())
            }
        }

        let mut out = Vec::new();
        deserializer.deserialize_any(Flatten(&mut out))?;
        Ok(FlatValues(out))
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct InferRequest {
    #[serde(default)]
    pub(super) id: Option<String>,
    pub(super) inputs: Vec<InputTensor>,
    #[serde(default)]
    pub(super) outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    pub(super) parameters: RequestParameters,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RequestParameters {
    /// Every output as binary data unless the output says otherwise.
    #[serde(default)]
    pub(super) binary_data_output: bool,
}

#[derive(Debug, Deserialize)]
pub(super) struct InputTensor {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) datatype: DataType,
    #[serde(default)]
    pub(super) data: Option<FlatValues>,
    #[serde(default)]
    pub(super) parameters: InputParameters,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct InputParameters {
    /// This input's bytes are in the binary part of the body.
    #[serde(default)]
    pub(super) binary_data_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RequestedOutput {
    pub(super) name: String,
    #[serde(default)]
    pub(super) parameters: OutputParameters,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct OutputParameters {
    #[serde(default)]
    pub(super) binary_data: Option<bool>,
}

#[derive(Debug, Serialize)]
pub(super) struct OutputTensor {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) datatype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) parameters: Option<serde_json::Value>,
}

/// One input as the engine takes it, from JSON values or from the binary part of the body.
pub(super) fn input_to_engine(
    t: InputTensor,
    binary: &mut binary::Chunks,
) -> Result<Tensor, ApiError> {
    match (t.parameters.binary_data_size, t.data) {
        (Some(size), None) => {
            let data = binary::take_input(binary, &t.name, t.datatype, &t.shape, size)
                .map_err(|e| bad_request(e.to_string()))?;
            Ok(Tensor {
                name: t.name,
                shape: t.shape,
                data,
            })
        }
        (None, Some(values)) => to_engine(t.name, t.shape, t.datatype, values),
        (Some(_), Some(_)) => Err(bad_request(format!(
            "input {:?}: both \"data\" and binary_data_size; send one",
            t.name
        ))),
        (None, None) => Err(bad_request(format!(
            "input {:?}: no \"data\" and no binary_data_size",
            t.name
        ))),
    }
}

fn to_engine(
    name: String,
    shape: Vec<usize>,
    datatype: DataType,
    values: FlatValues,
) -> Result<Tensor, ApiError> {
    let v = values.0;
    let bad = |what: &str| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("input {name:?}: values are not all {what}"),
        )
    };
    let ints = |lo: f64, hi: f64| v.iter().all(|x| x.fract() == 0.0 && *x >= lo && *x <= hi);
    let data = match datatype {
        DataType::Fp32 => TensorData::Fp32(v.iter().map(|&x| x as f32).collect()),
        DataType::Fp64 => TensorData::Fp64(v),
        DataType::Int64 if ints(i64::MIN as f64, i64::MAX as f64) => {
            TensorData::Int64(v.iter().map(|&x| x as i64).collect())
        }
        DataType::Int32 if ints(f64::from(i32::MIN), f64::from(i32::MAX)) => {
            TensorData::Int32(v.iter().map(|&x| x as i32).collect())
        }
        DataType::Int8 if ints(-128.0, 127.0) => {
            TensorData::Int8(v.iter().map(|&x| x as i8).collect())
        }
        DataType::Uint8 if ints(0.0, 255.0) => {
            TensorData::Uint8(v.iter().map(|&x| x as u8).collect())
        }
        DataType::Bool if ints(0.0, 1.0) => TensorData::Bool(v.iter().map(|&x| x != 0.0).collect()),
        DataType::Fp16 => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("input {name:?}: FP16 is not supported over JSON; send FP32"),
            ));
        }
        other => return Err(bad(&format!("{} values", other.as_str()))),
    };
    Ok(Tensor { name, shape, data })
}

/// An output as JSON values, or (`binary`) as bytes appended to `body`.
pub(super) fn to_output(t: Tensor, binary: bool, body: &mut Vec<u8>) -> OutputTensor {
    let datatype = t.data.datatype().as_str();
    if binary {
        let before = body.len();
        binary::encode(&t.data, body);
        return OutputTensor {
            name: t.name,
            shape: t.shape,
            datatype,
            data: None,
            parameters: Some(json!({ "binary_data_size": body.len() - before })),
        };
    }
    let data = match t.data {
        TensorData::Bool(v) => json!(v),
        TensorData::Uint8(v) => json!(v),
        TensorData::Int8(v) => json!(v),
        TensorData::Int32(v) => json!(v),
        TensorData::Int64(v) => json!(v),
        TensorData::Fp32(v) => json!(v),
        TensorData::Fp64(v) => json!(v),
    };
    OutputTensor {
        name: t.name,
        shape: t.shape,
        datatype,
        data: Some(data),
        parameters: None,
    }
}
