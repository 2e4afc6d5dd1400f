//! The binary tensor data extension of KServe and Triton: the body is a JSON header of
//! `Inference-Header-Content-Length` bytes followed by raw little-endian tensors, in the
//! order of the inputs (or outputs) that declare `"binary_data_size"`. Images cost about
//! ten bytes a value as JSON text and four as FP32 bytes, and need no number parsing.

use axum::http::HeaderMap;
use botfleet_engine::TensorData;
use botfleet_protocol::tensor::DataType;
use bytes::Bytes;

/// The header that announces a binary body: the length of its JSON part.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Why a binary request body was refused (each is a 400 for the caller).
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("header {HEADER_LENGTH}: {value:?} is not a byte count")]
    HeaderLength { value: String },
    #[error("header {HEADER_LENGTH} says {declared} bytes of JSON but the body has only {body}")]
    HeaderPastBody { declared: usize, body: usize },
    #[error(
        "input {input:?}: binary_data_size is {declared} bytes, but shape {shape:?} of {datatype} needs {expected}"
    )]
    SizeMismatch {
        input: String,
        shape: Vec<usize>,
        datatype: &'static str,
        declared: u64,
        expected: u64,
    },
    #[error("input {input:?}: binary_data_size {declared} runs past the body ({left} bytes left)")]
    PastBody {
        input: String,
        declared: u64,
        left: usize,
    },
    #[error("{bytes} bytes of binary data after the last input that declares any")]
    Trailing { bytes: usize },
    #[error("input {input:?}: {datatype} is not supported as binary data")]
    Unsupported {
        input: String,
        datatype: &'static str,
    },
    #[error("input {input:?}: shape {shape:?} is too large")]
    ShapeOverflow { input: String, shape: Vec<usize> },
}

/// Splits a request body into its JSON header and binary part (empty without the header).
pub fn split(headers: &HeaderMap, body: Bytes) -> Result<(Bytes, Bytes), BinaryError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, Bytes::new()));
    };
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let declared: usize = text
        .trim()
        .parse()
        .map_err(|_| BinaryError::HeaderLength { value: text })?;
    if declared > body.len() {
        return Err(BinaryError::HeaderPastBody {
            declared,
            body: body.len(),
        });
    }
    let mut json = body;
    let binary = json.split_off(declared);
    Ok((json, binary))
}

/// Bytes per element on the wire, for the types the engine feeds.
fn element_size(datatype: DataType) -> Option<u64> {
    match datatype {
        DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
        DataType::Int32 | DataType::Fp32 => Some(4),
        DataType::Int64 | DataType::Fp64 => Some(8),
        DataType::Fp16 => None,
    }
}

/// Reads the next input's bytes from `rest` (advancing it) and decodes them, after
/// checking the declared size against shape × element size.
pub fn take_input(
    rest: &mut Bytes,
    input: &str,
    datatype: DataType,
    shape: &[usize],
    declared: u64,
) -> Result<TensorData, BinaryError> {
    let size = element_size(datatype).ok_or_else(|| BinaryError::Unsupported {
        input: input.to_owned(),
        datatype: datatype.as_str(),
    })?;
    let expected = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| BinaryError::ShapeOverflow {
            input: input.to_owned(),
            shape: shape.to_vec(),
        })?;
    if declared != expected {
        return Err(BinaryError::SizeMismatch {
            input: input.to_owned(),
            shape: shape.to_vec(),
            datatype: datatype.as_str(),
            declared,
            expected,
        });
    }
    let len = usize::try_from(declared)
        .ok()
        .filter(|n| *n <= rest.len())
        .ok_or_else(|| BinaryError::PastBody {
            input: input.to_owned(),
            declared,
            left: rest.len(),
        })?;
    let bytes = rest.split_to(len);
    Ok(decode(datatype, &bytes))
}

/// Checks that every binary byte was claimed by an input.
pub fn finish(rest: &Bytes) -> Result<(), BinaryError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(BinaryError::Trailing { bytes: rest.len() })
    }
}

fn decode(datatype: DataType, bytes: &[u8]) -> TensorData {
    fn le<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    match datatype {
        DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
        DataType::Int8 => TensorData::Int8(le(bytes, i8::from_le_bytes)),
        DataType::Int32 => TensorData::Int32(le(bytes, i32::from_le_bytes)),
        DataType::Int64 => TensorData::Int64(le(bytes, i64::from_le_bytes)),
        DataType::Fp64 => TensorData::Fp64(le(bytes, f64::from_le_bytes)),
        // FP16 never gets here: element_size refused it.
        DataType::Fp32 | DataType::Fp16 => TensorData::Fp32(le(bytes, f32::from_le_bytes)),
    }
}

/// The tensor's values as little-endian bytes, appended to `out`.
pub fn encode(data: &TensorData, out: &mut Vec<u8>) {
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Uint8(v) => out.extend_from_slice(v),
        TensorData::Int8(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Int32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Int64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Fp32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Fp64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
    }
}
