//! A robot's sample upload: its token, its size, its digest, its contents, its device;
//! only then the blob, and only after the blob its record (a listed sample always has its
//! file). Each refusal is an [`UploadError`] whose status the robot acts on.

use std::sync::atomic::{AtomicU64, Ordering};

use botfleet_protocol::DeviceId;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::sample::{self, SampleError};
use bytes::Bytes;
use jiff::Timestamp;

use super::record::SampleRecord;
use super::store::{StoreError, sample_key};
use super::{DataError, DataService};
use crate::db::DbError;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "a sample upload needs its device's token: `Authorization: Bearer <token>` (`botfleet-server device-token ID` prints it)"
    )]
    NoToken,
    #[error("the token is not valid for device {0}")]
    BadToken(DeviceId),
    #[error("the token is device {holder}'s: it may upload only its own samples, not {device}'s")]
    OtherDevice { holder: DeviceId, device: DeviceId },
    #[error("the sample is over the limit of {limit} bytes (data.max_sample_bytes)")]
    TooLarge { limit: u64 },
    #[error("{0:?} is not a SHA-256 digest (64 hex digits)")]
    BadDigest(String),
    #[error("the body's SHA-256 is {actual}, not {expected} as the path says")]
    DigestMismatch {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error(transparent)]
    Malformed(#[from] SampleError),
    #[error("the sample's header names device {header}, not {path} as the path says")]
    DeviceMismatch { header: DeviceId, path: DeviceId },
    #[error("the upload was cut: {0}")]
    Body(String),
    #[error(
        "the server holds as many uploads as data.max_upload_buffer_bytes allows: keep the sample and send it again later"
    )]
    Busy,
    #[error("the sample could not be stored")]
    Store(#[source] StoreError),
    #[error("the sample could not be recorded")]
    Db(#[source] DbError),
    #[error("a database task failed: {0}")]
    Task(String),
}

/// What became of an upload the server took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored now (201).
    New,
    /// Stored already, the same digest (200).
    Already,
}

/// Why uploads were refused, as `/metrics` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthorized,
    Forbidden,
    TooLarge,
    Malformed,
    DigestMismatch,
    DeviceMismatch,
    Incomplete,
    Busy,
    StoreFailed,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Unauthorized,
        Refusal::Forbidden,
        Refusal::TooLarge,
        Refusal::Malformed,
        Refusal::DigestMismatch,
        Refusal::DeviceMismatch,
        Refusal::Incomplete,
        Refusal::Busy,
        Refusal::StoreFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed",
            Refusal::DigestMismatch => "digest_mismatch",
            Refusal::DeviceMismatch => "device_mismatch",
            Refusal::Incomplete => "incomplete",
            Refusal::Busy => "busy",
            Refusal::StoreFailed => "store_failed",
        }
    }
}

impl UploadError {
    pub fn refusal(&self) -> Refusal {
        match self {
            UploadError::NoToken | UploadError::BadToken(_) => Refusal::Unauthorized,
            UploadError::OtherDevice { .. } => Refusal::Forbidden,
            UploadError::TooLarge { .. } => Refusal::TooLarge,
            UploadError::BadDigest(_) | UploadError::Malformed(_) => Refusal::Malformed,
            UploadError::DigestMismatch { .. } => Refusal::DigestMismatch,
            UploadError::DeviceMismatch { .. } => Refusal::DeviceMismatch,
            UploadError::Body(_) => Refusal::Incomplete,
            UploadError::Busy => Refusal::Busy,
            UploadError::Store(_) | UploadError::Db(_) | UploadError::Task(_) => {
                Refusal::StoreFailed
            }
        }
    }
}

/// Upload counters since start.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub duplicate: AtomicU64,
    pub stored_bytes: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl Counters {
    pub fn refuse(&self, why: Refusal) {
        if let Some(n) = self.refused.get(why as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each refusal reason and its count.
    pub fn refused(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .zip(&self.refused)
            .map(|(why, n)| (why, n.load(Ordering::Relaxed)))
    }
}

impl DataService {
    /// Whether `token` may write `device`'s samples: 401 without a token or with one that
    /// is not genuine, 403 with another device's.
    pub fn authorize(&self, device: &DeviceId, token: Option<&str>) -> Result<(), UploadError> {
        let token = token.ok_or(UploadError::NoToken)?;
        match self.secret.holder(token) {
            Some(holder) if &holder == device => Ok(()),
            Some(holder) => Err(UploadError::OtherDevice {
                holder,
                device: device.clone(),
            }),
            None => Err(UploadError::BadToken(device.clone())),
        }
    }

    /// Whether `device`'s sample `sha256` is stored.
    pub async fn has(&self, device: &DeviceId, sha256: Sha256Digest) -> Result<bool, DataError> {
        match self.record(sha256).await {
            Ok(record) => Ok(&record.device == device),
            Err(DataError::NoSample(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// Checks and stores one uploaded sample file (the caller checked the token and the
    /// size): digest, contents, device; the blob, then the record.
    pub async fn upload(
        &self,
        device: &DeviceId,
        sha256: Sha256Digest,
        file: Bytes,
    ) -> Result<Stored, UploadError> {
        let actual = Sha256Digest::of(&file);
        if actual != sha256 {
            return Err(UploadError::DigestMismatch {
                expected: sha256,
                actual,
            });
        }
        let decoded = sample::decode(&file)?;
        if &decoded.header.device != device {
            return Err(UploadError::DeviceMismatch {
                header: decoded.header.device,
                path: device.clone(),
            });
        }
        match self.record(sha256).await {
            Ok(_) => {
                self.counters.duplicate.fetch_add(1, Ordering::Relaxed);
                return Ok(Stored::Already);
            }
            Err(DataError::NoSample(_)) => {}
            Err(DataError::Db(e)) => return Err(UploadError::Db(e)),
            Err(other) => return Err(UploadError::Task(other.to_string())),
        }
        let bytes = file.len() as u64;
        self.store
            .put(&sample_key(&sha256), file)
            .await
            .map_err(UploadError::Store)?;
        let record = SampleRecord::new(sha256, decoded.header, bytes, Timestamp::now());
        let db = self.db.clone();
        let inserted = tokio::task::spawn_blocking(move || db.insert_sample(&record))
            .await
            .map_err(|e| UploadError::Task(e.to_string()))?
            .map_err(UploadError::Db)?;
        Ok(if inserted {
            self.counters.stored.fetch_add(1, Ordering::Relaxed);
            self.counters
                .stored_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            Stored::New
        } else {
            self.counters.duplicate.fetch_add(1, Ordering::Relaxed);
            Stored::Already
        })
    }
}
