//! A captured sample: what one inference request gave a robot's model, as the robot keeps
//! it in its spool and uploads it.
//!
//! One sample is one file, in this layout:
//!
//! ```text
//! "BFSAMPL1"              8 bytes, the format and its version
//! header length           u32, little endian, at most MAX_HEADER_BYTES
//! header                  JSON (SampleHeader), that many bytes
//! tensor bytes            each input, then each output, in the header's order, raw and
//!                         little endian, exactly as many bytes as the header says
//! ```
//!
//! A sample's id is the SHA-256 of the whole file ([`Sha256Digest::of`]), so an upload
//! sent twice is stored once. [`decode`] checks every length against the file, so a
//! truncated, padded or inconsistent file is refused with the reason.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;
use crate::ids::{DeviceId, SlotName};
use crate::manifest::Sha256Digest;
use crate::tensor::DataType;

/// The first bytes of every sample file.
pub const MAGIC: &[u8; 8] = b"BFSAMPL1";
/// The sample header schema this build writes and reads.
pub const SAMPLE_SCHEMA: u32 = 1;
/// The largest header taken.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Tensors per side (inputs or outputs) at most.
pub const MAX_TENSORS: usize = 64;

/// Why a request was captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureRule {
    /// One request in every `sample_every`.
    Sampled,
    /// The top-1 probability of the watched output was under the configured threshold.
    LowConfidence,
    /// A value of the watched output was outside the configured range.
    OutOfRange,
    /// A shadowed candidate answered otherwise than the serving model.
    Disagreement,
    /// A signed capture order asked for the next requests of the slot.
    OnDemand,
}

impl CaptureRule {
    pub const ALL: [CaptureRule; 5] = [
        CaptureRule::Sampled,
        CaptureRule::LowConfidence,
        CaptureRule::OutOfRange,
        CaptureRule::Disagreement,
        CaptureRule::OnDemand,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CaptureRule::Sampled => "sampled",
            CaptureRule::LowConfidence => "low_confidence",
            CaptureRule::OutOfRange => "out_of_range",
            CaptureRule::Disagreement => "disagreement",
            CaptureRule::OnDemand => "on_demand",
        }
    }
}

impl std::fmt::Display for CaptureRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CaptureRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CaptureRule::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown capture rule {s:?} (sampled, low_confidence, out_of_range, disagreement, on_demand)"
                )
            })
    }
}

/// The model that answered (or, for a disagreement, the shadowed candidate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleModel {
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
}

/// One tensor of a sample: its name, type and shape; its bytes follow the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
}

impl SampleTensor {
    /// The bytes its values take, or `None` when the shape overflows.
    pub fn byte_len(&self) -> Option<usize> {
        let elements = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        elements.checked_mul(element_bytes(self.datatype))
    }
}

/// Bytes per element (BOOL is one byte, 0 or 1).
pub fn element_bytes(datatype: DataType) -> usize {
    match datatype {
        DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
        DataType::Fp16 => 2,
        DataType::Int32 | DataType::Fp32 => 4,
        DataType::Int64 | DataType::Fp64 => 8,
    }
}

/// What a sample file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleHeader {
    pub schema: u32,
    pub device: DeviceId,
    pub slot: SlotName,
    /// The model that served the request.
    pub model: SampleModel,
    pub engine: EngineKind,
    pub captured_at: Timestamp,
    pub rule: CaptureRule,
    /// What made the rule fire, in words (`top-1 0.41 < 0.6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a disagreement: the shadowed candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<SampleModel>,
    /// The serving model's time on this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    pub inputs: Vec<SampleTensor>,
    pub outputs: Vec<SampleTensor>,
    /// For a disagreement: the candidate's outputs, after the serving model's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidate_outputs: Vec<SampleTensor>,
}

impl SampleHeader {
    /// Every tensor in file order: inputs, outputs, then the candidate's outputs.
    pub fn tensors(&self) -> impl Iterator<Item = &SampleTensor> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .chain(&self.candidate_outputs)
    }
}

/// Why a sample file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error("not a sample file (its first bytes are not BFSAMPL1)")]
    Magic,
    #[error("sample header length {0} is over the limit of {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge(usize),
    #[error("sample file ends inside its {0}")]
    Truncated(&'static str),
    #[error("sample header is not valid: {0}")]
    Header(String),
    #[error("sample schema {0} is not supported (this build knows {SAMPLE_SCHEMA})")]
    Schema(u32),
    #[error("sample has {0} tensors on one side; at most {MAX_TENSORS}")]
    TooManyTensors(usize),
    #[error("tensor {0:?} has a shape whose size overflows")]
    Shape(String),
    #[error("sample tensors take {declared} bytes but the file holds {actual} after its header")]
    Length { declared: usize, actual: usize },
}

/// Writes a sample file: `data` holds each tensor's raw bytes in [`SampleHeader::tensors`]
/// order. Refuses a header whose tensors do not match `data`, as [`decode`] would.
pub fn encode(header: &SampleHeader, data: &[&[u8]]) -> Result<Vec<u8>, SampleError> {
    let json = serde_json::to_vec(header).map_err(|e| SampleError::Header(e.to_string()))?;
    if json.len() > MAX_HEADER_BYTES {
        return Err(SampleError::HeaderTooLarge(json.len()));
    }
    let declared = tensor_bytes(header)?;
    let actual: usize = data.iter().map(|d| d.len()).sum();
    let lengths_match = header.tensors().count() == data.len()
        && header
            .tensors()
            .zip(data)
            .all(|(t, d)| t.byte_len() == Some(d.len()));
    if declared != actual || !lengths_match {
        return Err(SampleError::Length { declared, actual });
    }
    let header_len =
        u32::try_from(json.len()).map_err(|_| SampleError::HeaderTooLarge(json.len()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len() + actual);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&json);
    for d in data {
        out.extend_from_slice(d);
    }
    Ok(out)
}

fn tensor_bytes(header: &SampleHeader) -> Result<usize, SampleError> {
    for side in [&header.inputs, &header.outputs, &header.candidate_outputs] {
        if side.len() > MAX_TENSORS {
            return Err(SampleError::TooManyTensors(side.len()));
        }
    }
    header.tensors().try_fold(0usize, |sum, t| {
        t.byte_len()
            .and_then(|n| sum.checked_add(n))
            .ok_or_else(|| SampleError::Shape(t.name.chars().take(64).collect()))
    })
}

/// A sample file read and checked: its header, and where each tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub header: SampleHeader,
    /// Byte ranges in the file, in [`SampleHeader::tensors`] order.
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// Reads only the header of a sample file's first bytes (the server parses the header before
/// the rest has arrived): the header and the file length it implies.
pub fn decode_header(prefix: &[u8]) -> Result<(SampleHeader, usize), SampleError> {
    if prefix.len() < MAGIC.len() {
        return Err(SampleError::Truncated("magic"));
    }
    if &prefix[..MAGIC.len()] != MAGIC {
        return Err(SampleError::Magic);
    }
    let len_at = MAGIC.len();
    let len_bytes: [u8; 4] = prefix
        .get(len_at..len_at + 4)
        .and_then(|b| b.try_into().ok())
        .ok_or(SampleError::Truncated("header length"))?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(SampleError::HeaderTooLarge(header_len));
    }
    let start = len_at + 4;
    let json = prefix
        .get(start..start + header_len)
        .ok_or(SampleError::Truncated("header"))?;
    let header: SampleHeader =
        serde_json::from_slice(json).map_err(|e| SampleError::Header(e.to_string()))?;
    if header.schema != SAMPLE_SCHEMA {
        return Err(SampleError::Schema(header.schema));
    }
    let body = tensor_bytes(&header)?;
    let total = (start + header_len)
        .checked_add(body)
        .ok_or_else(|| SampleError::Shape("(all)".into()))?;
    Ok((header, total))
}

/// Reads and checks a whole sample file.
pub fn decode(file: &[u8]) -> Result<Decoded, SampleError> {
    let (header, total) = decode_header(file)?;
    let header_end = total - tensor_bytes(&header)?;
    if file.len() != total {
        return Err(SampleError::Length {
            declared: total - header_end,
            actual: file.len().saturating_sub(header_end),
        });
    }
    let mut at = header_end;
    let mut ranges = Vec::new();
    for t in header.tensors() {
        let n = t
            .byte_len()
            .ok_or_else(|| SampleError::Shape(t.name.clone()))?;
        ranges.push(at..at + n);
        at += n;
    }
    Ok(Decoded { header, ranges })
}

/// The size of the header prefix [`decode_header`] needs at most.
pub const fn max_prefix() -> usize {
    MAGIC.len() + 4 + MAX_HEADER_BYTES
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
mod tests {
    use super::*;

    pub(crate) fn header() -> SampleHeader {
        SampleHeader {
            schema: SAMPLE_SCHEMA,
            device: "robot-1".parse().unwrap(),
            slot: "digits".parse().unwrap(),
            model: SampleModel {
                version: "1".into(),
                release: 1,
                sha256: Sha256Digest::of(b"model"),
            },
            engine: EngineKind::Tract,
            captured_at: Timestamp::UNIX_EPOCH,
            rule: CaptureRule::LowConfidence,
            detail: Some("top-1 0.41 < 0.6".into()),
            candidate: None,
            latency_ms: Some(1.5),
            inputs: vec![SampleTensor {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 2],
            }],
            outputs: vec![SampleTensor {
                name: "y".into(),
                datatype: DataType::Int64,
                shape: vec![1],
            }],
            candidate_outputs: vec![],
        }
    }

    #[test]
    fn a_sample_round_trips_and_names_its_ranges() {
        let x: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let y = 7i64.to_le_bytes();
        let file = encode(&header(), &[&x, &y]).unwrap();
        let decoded = decode(&file).unwrap();
        assert_eq!(decoded.header, header());
        assert_eq!(&file[decoded.ranges[0].clone()], &x[..]);
        assert_eq!(&file[decoded.ranges[1].clone()], &y[..]);
        let (_, total) = decode_header(&file[..file.len() - 3]).unwrap();
        assert_eq!(total, file.len());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let x = [0u8; 8];
        let y = [0u8; 8];
        assert!(matches!(
            encode(&header(), &[&x]),
            Err(SampleError::Length { .. })
        ));
        let file = encode(&header(), &[&x, &y]).unwrap();
        assert_eq!(
            decode(&file[..file.len() - 1]),
            Err(SampleError::Length {
                declared: 16,
                actual: 15
            })
        );
        let mut padded = file.clone();
        padded.push(0);
        assert!(matches!(decode(&padded), Err(SampleError::Length { .. })));
        assert_eq!(decode(b"GIF89a.."), Err(SampleError::Magic));
        assert_eq!(decode(b"BFS"), Err(SampleError::Truncated("magic")));
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&(MAX_HEADER_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&big), Err(SampleError::HeaderTooLarge(_))));
        let mut huge = header();
        huge.inputs[0].shape = vec![usize::MAX, 2];
        let json = serde_json::to_vec(&huge).unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&(json.len() as u32).to_le_bytes());
        file.extend_from_slice(&json);
        assert!(matches!(decode(&file), Err(SampleError::Shape(_))));
    }

    #[test]
    fn rules_parse_by_their_names() {
        for rule in CaptureRule::ALL {
            assert_eq!(rule.as_str().parse::<CaptureRule>().unwrap(), rule);
            assert_eq!(
                serde_json::to_value(rule).unwrap(),
                serde_json::json!(rule.as_str())
            );
        }
        assert!("often".parse::<CaptureRule>().is_err());
    }
}
