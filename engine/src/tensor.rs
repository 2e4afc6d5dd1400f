//! Plain tensors at the engine's edge, so callers never see tract types.

use botfleet_protocol::tensor::DataType;

/// Element data of a tensor, flattened in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Int8(Vec<i8>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::Uint8(v) => v.len(),
            TensorData::Int8(v) => v.len(),
            TensorData::Int32(v) => v.len(),
            TensorData::Int64(v) => v.len(),
            TensorData::Fp32(v) => v.len(),
            TensorData::Fp64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32, for comparisons against a reference.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
            TensorData::Uint8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            TensorData::Int8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            TensorData::Int32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Int64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Fp32(v) => v.clone(),
            TensorData::Fp64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// `len` zeros of `datatype`, or `None` for a type the engine does not feed.
    pub fn zeros(datatype: DataType, len: usize) -> Option<Self> {
        Some(match datatype {
            DataType::Bool => TensorData::Bool(vec![false; len]),
            DataType::Uint8 => TensorData::Uint8(vec![0; len]),
            DataType::Int8 => TensorData::Int8(vec![0; len]),
            DataType::Int32 => TensorData::Int32(vec![0; len]),
            DataType::Int64 => TensorData::Int64(vec![0; len]),
            DataType::Fp32 => TensorData::Fp32(vec![0.0; len]),
            DataType::Fp64 => TensorData::Fp64(vec![0.0; len]),
            DataType::Fp16 => return None,
        })
    }
}

/// A named tensor going into or coming out of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}
