//! The signed model manifest.
//!
//! A manifest describes one model artifact: which slot it is for, its monotonic release,
//! the artifact's exact size and SHA-256, its tensor signature, the hardware it may run on,
//! the benchmark gate it must pass on the robot, where it came from, and when it expires.
//!
//! It travels as a [`SignedManifest`]: the manifest's exact JSON bytes (base64) plus
//! Ed25519 signatures over those bytes. Nothing re-serialises the manifest before checking,
//! so no canonical form is needed. [`SignedManifest::verify`] is the only way to obtain a
//! [`Verified`] manifest, and the rest of botfleet accepts nothing else for installation.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::engine::EnginePolicy;
use crate::evaluation::Evaluation;
use crate::ids::SlotName;
use crate::tensor::TensorSpec;

/// The manifest schema this crate writes and understands.
pub const MANIFEST_SCHEMA: u32 = 1;
/// Largest manifest payload accepted, in bytes (before base64).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Digest of a whole buffer (tests and small files; artifacts are hashed while streaming).
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest (64 lowercase hex digits): {0:?}")]
pub struct DigestParseError(String);

impl FromStr for Sha256Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DigestParseError(s.chars().take(80).collect());
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Onnx,
}

/// How the model's weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// 32-bit float weights.
    Fp32,
    /// 16-bit float weights.
    Fp16,
    /// INT8 with QuantizeLinear/DequantizeLinear pairs (static).
    Int8Qdq,
    /// INT8 weights, activations quantized at run time (`MatMulInteger`/`ConvInteger`).
    Int8Dynamic,
}

/// The artifact the manifest describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Exact size in bytes; a download stops at this many bytes.
    pub size: u64,
    pub sha256: Sha256Digest,
    pub format: ModelFormat,
    pub quantization: Quantization,
}

/// Where a model may run. Empty lists mean "any".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compatibility {
    /// CPU architectures as Rust names them (`aarch64`, `x86_64`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Board models (`/proc/device-tree/model` prefixes), e.g. `NVIDIA Jetson Orin Nano`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boards: Vec<String>,
    /// Oldest agent version that can run it (`major.minor.patch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
}

/// A fixed input and the output it must give, checked on the robot before a swap.
///
/// The input is not shipped: both sides generate it from `seed` with [`reference_input`],
/// so the manifest stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub seed: u64,
    /// Expected output values, flattened, per output name.
    pub outputs: BTreeMap<String, Vec<f32>>,
    /// Largest absolute difference allowed per value.
    pub tolerance: f32,
}

/// What a candidate must show on the robot before it may serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Untimed runs before measuring.
    pub warmup_runs: u32,
    /// Timed runs; p50/p99 come from these.
    pub runs: u32,
    /// Budget for the median latency on the robot, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p50_ms: Option<f64>,
    /// Budget for the p99 latency on the robot, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<f64>,
    /// Budget for the peak resident memory of loading and running the model, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Allowed p99 regression against the model serving the slot now, as a fraction
    /// (0.2 = 20 % slower is still accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_regression: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// After the swap: the share of failed requests (0.05 = 5 %) that rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// After the swap: the p99 of live requests, in milliseconds, that rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_serving_p99_ms: Option<f64>,
    /// The accuracy gate: an evaluation set the model's answers must agree with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
}

impl Gate {
    /// Seed of the input the robot benchmarks and warms up with: the reference seed, so the
    /// timed runs see the input whose output was checked.
    pub fn input_seed(&self) -> u64 {
        self.reference.as_ref().map_or(0, |r| r.seed)
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            warmup_runs: 3,
            runs: 20,
            max_p50_ms: None,
            max_p99_ms: None,
            max_memory_mb: None,
            max_regression: None,
            reference: None,
            max_error_rate: None,
            max_serving_p99_ms: None,
            evaluation: None,
        }
    }
}

/// Where the model came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The float model this one was derived from (quantized, pruned, converted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_sha256: Option<Sha256Digest>,
    /// Figures the pipeline measured (accuracy, agreement with the parent, …), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// The model manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub slot: SlotName,
    /// Model name, for people.
    pub name: String,
    /// Version label, for people.
    pub version: String,
    /// Monotonic release number within the slot; agents refuse to go back.
    pub release: u64,
    pub artifact: Artifact,
    /// Inputs with concrete shapes: symbolic dimensions of the graph are fixed to these.
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    #[serde(default)]
    pub compatibility: Compatibility,
    pub gate: Gate,
    /// Which engines the gate may pick from; absent: tract, as before there were engines.
    #[serde(default, skip_serializing_if = "EnginePolicy::is_default")]
    pub engines: EnginePolicy,
    #[serde(default)]
    pub provenance: Provenance,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// A signed permission to install this release although a higher one is installed:
    /// how a deliberate rollback to an older model gets past anti-rollback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
}

/// A key id: the first 8 bytes of SHA-256 of the public key, in hex.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        Self(hex::encode(&Sha256::digest(key.as_bytes())[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One signature over the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    pub key_id: KeyId,
    /// Ed25519 signature, base64.
    pub sig: String,
}

/// A manifest as it travels: exact bytes plus signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest's JSON bytes, base64.
    pub payload: String,
    pub signatures: Vec<ManifestSignature>,
}

/// Why a manifest was refused. Each variant is a distinct reason an agent reports.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest payload is not valid base64")]
    PayloadEncoding,
    #[error("manifest payload is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    PayloadTooLarge(usize),
    #[error("no signature by a trusted key verifies (signed by: {signed_by})")]
    Untrusted { signed_by: String },
    #[error("manifest payload is not a valid manifest: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("manifest schema {0} is not supported (this build knows {MANIFEST_SCHEMA})")]
    Schema(u32),
    #[error("manifest expired at {expires_at} (now {now})")]
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
}

/// Whether [`SignedManifest::verify`] checks the expiry.
#[derive(Debug, Clone, Copy)]
pub enum ExpiryCheck {
    /// For a new install: refuse a manifest that expired before `now`.
    At(Timestamp),
    /// For re-loading what is already installed: a wrong clock must never stop serving.
    Skip,
}

/// A value whose signature was checked. Only this module can make one.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified<T> {
    inner: T,
    signed_by: Vec<KeyId>,
}

impl<T> Verified<T> {
    /// Key ids whose signatures verified.
    pub fn signed_by(&self) -> &[KeyId] {
        &self.signed_by
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key must look like `{prefix}<base64 of 32 bytes>`")]
    Format { prefix: &'static str },
    #[error("not a valid Ed25519 public key")]
    Invalid,
}

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "ed25519-secret:";

fn decode_key_bytes(text: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let raw = text
        .trim()
        .strip_prefix(prefix)
        .ok_or(KeyError::Format { prefix })?;
    B64.decode(raw)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or(KeyError::Format { prefix })
}

/// Parses a public key written as `ed25519:<base64>`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = decode_key_bytes(text, PUBLIC_PREFIX)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Invalid)
}

/// Writes a public key as `ed25519:<base64>`.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX}{}", B64.encode(key.as_bytes()))
}

/// The public keys an agent trusts, with how many distinct ones must sign.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, VerifyingKey>,
    threshold: usize,
}

impl TrustedKeys {
    /// Trusts `keys`; one valid signature suffices.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (KeyId::of(&k), k)).collect(),
            threshold: 1,
        }
    }

    /// Parses keys written as `ed25519:<base64>`.
    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Self, KeyError> {
        let keys = texts
            .into_iter()
            .map(parse_public_key)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(keys))
    }

    /// Requires `threshold` distinct trusted keys to sign (at least 1).
    pub fn with_threshold(mut self, threshold: usize) -> Self {
        self.threshold = threshold.max(1);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }
}

/// Decodes a signed payload and checks its signatures against `trusted`: the one signature
/// check of this crate, shared by manifests and signed orders. Returns the payload bytes
/// and the distinct trusted keys that signed them.
pub(crate) fn verify_signatures(
    payload: &str,
    signatures: &[ManifestSignature],
    trusted: &TrustedKeys,
) -> Result<(Vec<u8>, Vec<KeyId>), ManifestError> {
    // base64 grows 4/3: refuse before decoding anything huge.
    if payload.len() > MAX_MANIFEST_BYTES / 3 * 4 + 4 {
        return Err(ManifestError::PayloadTooLarge(payload.len() / 4 * 3));
    }
    let bytes = B64
        .decode(payload)
        .map_err(|_| ManifestError::PayloadEncoding)?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::PayloadTooLarge(bytes.len()));
    }
    let mut signed_by: Vec<KeyId> = Vec::new();
    for sig in signatures {
        let Some(key) = trusted.keys.get(&sig.key_id) else {
            continue;
        };
        if signed_by.contains(&sig.key_id) {
            continue; // each key counts once
        }
        let Some(signature) = B64
            .decode(&sig.sig)
            .ok()
            .and_then(|s| ed25519_dalek::Signature::from_slice(&s).ok())
        else {
            continue;
        };
        if key.verify_strict(&bytes, &signature).is_ok() {
            signed_by.push(sig.key_id.clone());
        }
    }
    if signed_by.len() < trusted.threshold.max(1) {
        let ids: Vec<&str> = signatures.iter().map(|s| s.key_id.as_str()).collect();
        return Err(ManifestError::Untrusted {
            signed_by: if ids.is_empty() {
                "nobody".to_owned()
            } else {
                ids.join(", ")
            },
        });
    }
    Ok((bytes, signed_by))
}

impl<T> Verified<T> {
    /// Wraps a value whose signatures [`verify_signatures`] checked.
    pub(crate) fn checked(inner: T, signed_by: Vec<KeyId>) -> Self {
        Self { inner, signed_by }
    }
}

impl SignedManifest {
    /// Checks the signatures against `trusted`, then parses and checks the manifest.
    pub fn verify(
        &self,
        trusted: &TrustedKeys,
        expiry: ExpiryCheck,
    ) -> Result<Verified<Manifest>, ManifestError> {
        let (bytes, signed_by) = verify_signatures(&self.payload, &self.signatures, trusted)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(ManifestError::Malformed)?;
        if manifest.schema != MANIFEST_SCHEMA {
            return Err(ManifestError::Schema(manifest.schema));
        }
        if let ExpiryCheck::At(now) = expiry
            && manifest.expires_at <= now
        {
            return Err(ManifestError::Expired {
                expires_at: manifest.expires_at,
                now,
            });
        }
        Ok(Verified {
            inner: manifest,
            signed_by,
        })
    }

    /// What the manifest claims, read without any check: never a reason to trust it.
    pub fn claims(&self) -> Option<Manifest> {
        let bytes = B64.decode(&self.payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Identity of this signed document: SHA-256 of the payload.
    pub fn payload_digest(&self) -> Sha256Digest {
        Sha256Digest::of(self.payload.as_bytes())
    }
}

/// Holds the server's signing key.
pub struct ManifestSigner {
    key: SigningKey,
    key_id: KeyId,
}

impl fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ManifestSigner {
    /// A signer from the 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&secret);
        let key_id = KeyId::of(&key.verifying_key());
        Self { key, key_id }
    }

    /// Parses a secret key written as `ed25519-secret:<base64>`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode_key_bytes(text, SECRET_PREFIX).map(Self::from_secret)
    }

    /// Writes the secret key as `ed25519-secret:<base64>`.
    pub fn to_secret_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(self.key.to_bytes()))
    }

    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Serialises `manifest` once and signs exactly those bytes.
    pub fn sign(&self, manifest: &Manifest) -> Result<SignedManifest, serde_json::Error> {
        let (payload, signatures) = self.sign_json(manifest)?;
        Ok(SignedManifest {
            payload,
            signatures,
        })
    }

    /// Serialises `value` once; returns those bytes in base64 and the signature over them.
    pub(crate) fn sign_json<T: Serialize>(
        &self,
        value: &T,
    ) -> Result<(String, Vec<ManifestSignature>), serde_json::Error> {
        let bytes = serde_json::to_vec(value)?;
        let sig = self.key.sign(&bytes);
        Ok((
            B64.encode(&bytes),
            vec![ManifestSignature {
                key_id: self.key_id.clone(),
                sig: B64.encode(sig.to_bytes()),
            }],
        ))
    }
}

/// The deterministic reference input for `seed`: `len` values uniform in [0, 1).
///
/// SplitMix64, so the server (which records the expected output) and every agent
/// (which checks it) generate the same bytes on any architecture.
pub fn reference_input(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 high bits → exactly representable in f32.
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}
