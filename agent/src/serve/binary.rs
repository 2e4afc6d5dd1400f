//! The binary tensor data extension of KServe and Triton: the body is a JSON header of
//! `Inference-Header-Content-Length` bytes followed by raw little-endian tensors, in the
//! order of the inputs (or outputs) that declare `"binary_data_size"`. Images cost about
//! ten bytes a value as JSON text and four as FP32 bytes, and need no number parsing.

use std::collections::VecDeque;

use axum::http::HeaderMap;
use botfleet_engine::TensorData;
use botfleet_protocol::tensor::DataType;
use bytes::{Bytes, BytesMut};

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

/// A request body as the connection delivered it: its chunks, not copied into one buffer.
#[derive(Debug, Default)]
pub struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` bytes (`n` ≤ [`Self::len`]) as one buffer: no copy when they lie in
    /// one chunk.
    pub fn split_to(&mut self, n: usize) -> Bytes {
        if let Some(first) = self.chunks.front_mut()
            && first.len() >= n
        {
            let head = first.split_to(n);
            if first.is_empty() {
                self.chunks.pop_front();
            }
            self.len -= n;
            return head;
        }
        let mut head = BytesMut::with_capacity(n);
        self.drain(n, |piece| head.extend_from_slice(piece));
        head.freeze()
    }

    /// Everything as one buffer.
    pub fn into_bytes(mut self) -> Bytes {
        let n = self.len;
        self.split_to(n)
    }

    /// Hands the first `n` bytes (`n` ≤ [`Self::len`]) to `sink` chunk by chunk.
    fn drain(&mut self, mut n: usize, mut sink: impl FnMut(&[u8])) {
        while n > 0 {
            let Some(first) = self.chunks.front_mut() else {
                return;
            };
            let piece = first.split_to(n.min(first.len()));
            if first.is_empty() {
                self.chunks.pop_front();
            }
            n -= piece.len();
            self.len -= piece.len();
            sink(&piece);
        }
    }
}

/// Splits a request body into its JSON header and binary part (empty without the header).
pub fn split(headers: &HeaderMap, mut body: Chunks) -> Result<(Bytes, Chunks), BinaryError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body.into_bytes(), Chunks::default()));
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
    let json = body.split_to(declared);
    Ok((json, body))
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
    rest: &mut Chunks,
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
    Ok(decode(datatype, rest, len))
}

/// Checks that every binary byte was claimed by an input.
pub fn finish(rest: &Chunks) -> Result<(), BinaryError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(BinaryError::Trailing { bytes: rest.len() })
    }
}

/// Decodes the first `len` bytes of `rest` (whole elements: checked by the caller) into
/// values, straight from the connection's chunks (an element may straddle two).
fn decode(datatype: DataType, rest: &mut Chunks, len: usize) -> TensorData {
    fn le<const N: usize, T>(rest: &mut Chunks, len: usize, f: fn([u8; N]) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(len / N);
        let mut carry = [0u8; N];
        let mut held = 0;
        rest.drain(len, |mut piece| {
            if held > 0 {
                let take = (N - held).min(piece.len());
                carry[held..held + take].copy_from_slice(&piece[..take]);
                held += take;
                piece = &piece[take..];
                if held < N {
                    return;
                }
                out.push(f(carry));
                held = 0;
            }
            let whole = piece.chunks_exact(N);
            let tail = whole.remainder();
            out.extend(whole.map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            }));
            carry[..tail.len()].copy_from_slice(tail);
            held = tail.len();
        });
        out
    }
    match datatype {
        DataType::Bool => TensorData::Bool(le(rest, len, |[b]: [u8; 1]| b != 0)),
        DataType::Uint8 => TensorData::Uint8(le(rest, len, |[b]: [u8; 1]| b)),
        DataType::Int8 => TensorData::Int8(le(rest, len, i8::from_le_bytes)),
        DataType::Int32 => TensorData::Int32(le(rest, len, i32::from_le_bytes)),
        DataType::Int64 => TensorData::Int64(le(rest, len, i64::from_le_bytes)),
        DataType::Fp64 => TensorData::Fp64(le(rest, len, f64::from_le_bytes)),
        // FP16 never gets here: element_size refused it.
        DataType::Fp32 | DataType::Fp16 => TensorData::Fp32(le(rest, len, f32::from_le_bytes)),
    }
}

/// The tensor's values as little-endian bytes, appended to `out`.
pub fn encode(data: &TensorData, out: &mut Vec<u8>) {
    fn le<const N: usize, T: Copy>(v: &[T], out: &mut Vec<u8>, f: fn(T) -> [u8; N]) {
        // Sized up front, then filled in place: a plain copy on little-endian machines.
        let start = out.len();
        out.resize(start + v.len() * N, 0);
        for (dst, &x) in out[start..].chunks_exact_mut(N).zip(v) {
            dst.copy_from_slice(&f(x));
        }
    }
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Uint8(v) => out.extend_from_slice(v),
        TensorData::Int8(v) => le(v, out, i8::to_le_bytes),
        TensorData::Int32(v) => le(v, out, i32::to_le_bytes),
        TensorData::Int64(v) => le(v, out, i64::to_le_bytes),
        TensorData::Fp32(v) => le(v, out, f32::to_le_bytes),
        TensorData::Fp64(v) => le(v, out, f64::to_le_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` as a body cut at `cuts` (as a connection may deliver it).
    fn chunks(bytes: &[u8], cuts: &[usize]) -> Chunks {
        let mut body = Chunks::default();
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            body.push(Bytes::copy_from_slice(&bytes[at..cut]));
            at = cut;
        }
        body
    }

    #[test]
    fn values_split_across_chunks_decode_as_if_the_body_were_one_buffer() {
        let values: Vec<f32> = (0..7).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut raw = b"{\"h\":1}".to_vec();
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        raw.extend(9i64.to_le_bytes());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, "7".parse().unwrap());
        // Every way of cutting the body in two and in three places, elements straddling.
        for a in 0..raw.len() {
            for b in [a, a + 1, a + 3, raw.len()] {
                let cuts: Vec<usize> = [a, b.min(raw.len())].into();
                let (json, mut rest) = split(&headers, chunks(&raw, &cuts)).unwrap();
                assert_eq!(&json[..], b"{\"h\":1}", "cuts {cuts:?}");
                let f = take_input(&mut rest, "x", DataType::Fp32, &[7], 28).unwrap();
                assert_eq!(f, TensorData::Fp32(values.clone()), "cuts {cuts:?}");
                let i = take_input(&mut rest, "n", DataType::Int64, &[1], 8).unwrap();
                assert_eq!(i, TensorData::Int64(vec![9]), "cuts {cuts:?}");
                finish(&rest).unwrap();
            }
        }
    }

    #[test]
    fn a_size_past_the_body_is_refused_and_bytes_left_over_are_named() {
        let raw = [0u8; 12];
        let mut rest = chunks(&raw, &[5]);
        let e = take_input(&mut rest, "x", DataType::Fp32, &[4], 16).unwrap_err();
        assert!(e.to_string().contains("runs past the body"), "{e}");
        take_input(&mut rest, "x", DataType::Fp32, &[2], 8).unwrap();
        let e = finish(&rest).unwrap_err();
        assert!(e.to_string().contains("4 bytes"), "{e}");
    }

    #[test]
    fn outputs_encode_as_little_endian_bytes() {
        let mut out = vec![1];
        encode(&TensorData::Fp32(vec![1.5, -2.0]), &mut out);
        encode(&TensorData::Int32(vec![-1]), &mut out);
        let mut want = vec![1];
        want.extend(1.5f32.to_le_bytes());
        want.extend((-2.0f32).to_le_bytes());
        want.extend((-1i32).to_le_bytes());
        assert_eq!(out, want);
    }
}
