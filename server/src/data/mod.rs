//! The fleet data loop, server half: robots upload captured samples, operators pick them
//! into data sets, the pipeline trains on their exports (docs/data-loop.md).
//!
//! ```text
//!  robot ──PUT samples/{sha256} (device token)──► upload: size, digest, decode, device
//!                                                   ├─► store (object_store: disk or S3)
//!                                                   └─► db (the record, after the blob)
//!  operator ──POST datasets──► dataset::freeze ──► manifest (store) + record (db)
//!  pipeline ──GET datasets/{id}/export──► export::stream_tar (manifest, then each file)
//! ```
//!
//! - `token`: device upload tokens (HMAC-SHA256 of the device id with the device secret).
//! - `store`: the blob store; `record`: what is kept of each sample, filters, summaries.
//! - `dataset`: selections frozen into manifests; `export` streams them as tar;
//!   [`check`] verifies an export as it is written (the CLI's `dataset export`).
//! - `thumbnail`: a sample's first input as a PNG.
//! - `capture`: the signed capture order sent to one robot.

mod capture;
pub mod check;
pub mod dataset;
pub mod export;
pub mod record;
pub mod store;
mod thumbnail;
pub mod token;
mod upload;

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::{DeviceId, ManifestSigner};
use bytes::Bytes;
use jiff::Timestamp;

pub use capture::{CaptureError, CaptureRequest, Captured};
pub use dataset::{Dataset, DatasetError, DatasetRequest};
pub use record::{SampleFilter, SampleRecord, Summarizer, Summary};
pub use store::{BlobStore, StoreError};
pub use thumbnail::ThumbnailError;
pub use token::{DeviceSecret, SecretError};
pub use upload::{Counters, Refusal, Stored, UploadError};

use crate::db::{Db, DbError};
use crate::fleet::Fleet;
use crate::link::Publisher;

/// Why a data request failed on the server's side.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a database task failed: {0}")]
    Task(String),
    #[error("no sample {0}")]
    NoSample(Sha256Digest),
    #[error("no data set {0}")]
    NoDataset(String),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Thumbnail(#[from] ThumbnailError),
    #[error("the stored sample {sha256} is not valid")]
    Corrupt {
        sha256: Sha256Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot encode the data set manifest")]
    Encode(#[source] serde_json::Error),
}

/// How big uploads may be, one and all together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `data.max_sample_bytes`.
    pub sample_bytes: u64,
    /// `data.max_upload_buffer_bytes`.
    pub buffer_bytes: u64,
}

/// Samples, data sets and capture orders: what the HTTP handlers call.
#[derive(Debug)]
pub struct DataService {
    store: BlobStore,
    db: Arc<Db>,
    secret: DeviceSecret,
    max_sample_bytes: u64,
    /// Uploads in memory, in KiB: each holds its size until it is stored or refused.
    buffer: Arc<tokio::sync::Semaphore>,
    fleet: Arc<Fleet>,
    signer: Arc<ManifestSigner>,
    publisher: Publisher,
    /// Uploads taken and refused, for `/metrics`.
    pub counters: Counters,
}

/// Runs a database call off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DbError> + Send + 'static,
) -> Result<T, DataError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DataError::Task(e.to_string()))?
        .map_err(DataError::Db)
}

impl DataService {
    pub fn new(
        store: BlobStore,
        db: Arc<Db>,
        secret: DeviceSecret,
        limits: Limits,
        fleet: Arc<Fleet>,
        signer: Arc<ManifestSigner>,
        publisher: Publisher,
    ) -> Self {
        let kib = usize::try_from(limits.buffer_bytes.div_ceil(1024)).unwrap_or(usize::MAX);
        Self {
            store,
            db,
            secret,
            max_sample_bytes: limits.sample_bytes,
            buffer: Arc::new(tokio::sync::Semaphore::new(
                kib.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            fleet,
            signer,
            publisher,
            counters: Counters::default(),
        }
    }

    /// The largest sample file taken.
    pub fn max_sample_bytes(&self) -> u64 {
        self.max_sample_bytes
    }

    /// Room in the upload buffer for a body of `bytes`, held until the permit drops; a
    /// buffer without that room refuses at once ([`UploadError::Busy`]), never waits.
    pub fn reserve(&self, bytes: u64) -> Result<tokio::sync::OwnedSemaphorePermit, UploadError> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        Arc::clone(&self.buffer)
            .try_acquire_many_owned(kib)
            .map_err(|_| UploadError::Busy)
    }

    /// The record of sample `sha256`.
    pub async fn record(&self, sha256: Sha256Digest) -> Result<SampleRecord, DataError> {
        let db = self.db.clone();
        blocking(move || db.sample(&sha256))
            .await?
            .ok_or(DataError::NoSample(sha256))
    }

    /// Records matching `filter`, newest first, at most `limit`.
    pub async fn list(
        &self,
        filter: SampleFilter,
        limit: usize,
    ) -> Result<Vec<SampleRecord>, DataError> {
        let db = self.db.clone();
        blocking(move || {
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            db.scan_samples(filter.since, filter.until, true, |record| {
                if filter.matches(&record) {
                    out.push(record);
                }
                if out.len() >= limit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            Ok(out)
        })
        .await
    }

    /// Counts of the samples matching `filter` per device, slot, rule and time bucket.
    pub async fn summary(&self, filter: SampleFilter, bucket_s: u64) -> Result<Summary, DataError> {
        let db = self.db.clone();
        blocking(move || {
            let mut summary = Summarizer::new(bucket_s);
            db.scan_samples(filter.since, filter.until, false, |record| {
                if filter.matches(&record) {
                    summary.add(&record);
                }
                ControlFlow::Continue(())
            })?;
            Ok(summary.finish())
        })
        .await
    }

    /// The sample file: its record, then its bytes a chunk at a time.
    pub async fn file(
        &self,
        sha256: Sha256Digest,
    ) -> Result<
        (
            SampleRecord,
            futures_util::stream::BoxStream<'static, Result<Bytes, StoreError>>,
        ),
        DataError,
    > {
        let record = self.record(sha256).await?;
        let chunks = self.store.stream(&store::sample_key(&sha256)).await?;
        Ok((record, chunks))
    }

    /// The PNG of the sample's first input.
    pub async fn thumbnail(&self, sha256: Sha256Digest) -> Result<Vec<u8>, DataError> {
        let record = self.record(sha256).await?;
        let file = self.store.get(&store::sample_key(&record.sha256)).await?;
        tokio::task::spawn_blocking(move || {
            let decoded =
                botfleet_protocol::sample::decode(&file).map_err(|e| DataError::Corrupt {
                    sha256,
                    source: Box::new(e),
                })?;
            thumbnail::thumbnail(&file, &decoded).map_err(DataError::Thumbnail)
        })
        .await
        .map_err(|e| DataError::Task(e.to_string()))?
    }

    /// Freezes the samples `request` selects into a new data set: the manifest is stored
    /// first, then its record, so a listed data set always has its manifest.
    pub async fn create_dataset(&self, request: DatasetRequest) -> Result<Dataset, DataError> {
        let (name, selection) = request.check()?;
        let selected = match &selection.selector {
            None => None,
            Some(text) => {
                let selector: crate::rollouts::Selector =
                    text.parse().map_err(|e: crate::rollouts::SelectorError| {
                        DatasetError::Selector(e.to_string())
                    })?;
                let devices = self.fleet.devices();
                let matched: BTreeSet<DeviceId> = devices
                    .labels()
                    .filter(|(_, labels)| labels.is_some_and(|l| selector.matches(l)))
                    .map(|(id, _)| id.clone())
                    .collect();
                Some(matched)
            }
        };
        let filter = selection.filter(selected);
        let db = self.db.clone();
        let samples = blocking(move || {
            let mut out = Vec::new();
            db.scan_samples(filter.since, filter.until, false, |record| {
                if filter.matches(&record) {
                    out.push(record);
                }
                if out.len() > dataset::MAX_DATASET_SAMPLES {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            Ok(out)
        })
        .await?;
        if samples.is_empty() {
            return Err(DatasetError::Empty.into());
        }
        if samples.len() > dataset::MAX_DATASET_SAMPLES {
            return Err(DatasetError::TooLarge.into());
        }
        let (dataset, bytes) = dataset::freeze(
            dataset::new_id(),
            name,
            selection,
            samples,
            Timestamp::now(),
        )
        .map_err(DataError::Encode)?;
        self.store
            .put(&store::manifest_key(&dataset.id), Bytes::from(bytes))
            .await?;
        let db = self.db.clone();
        let saved = dataset.clone();
        blocking(move || db.save_dataset(&saved)).await?;
        tracing::info!(dataset = %dataset.id, name = %dataset.name, samples = dataset.samples, digest = %dataset.digest, "data set made");
        Ok(dataset)
    }

    /// Every data set, newest first.
    pub async fn datasets(&self) -> Result<Vec<Dataset>, DataError> {
        let db = self.db.clone();
        let mut all = blocking(move || db.load_datasets()).await?;
        all.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(all)
    }

    /// One data set's record.
    pub async fn dataset(&self, id: &str) -> Result<Dataset, DataError> {
        let db = self.db.clone();
        let key = id.to_owned();
        blocking(move || db.dataset(&key))
            .await?
            .ok_or_else(|| DataError::NoDataset(id.to_owned()))
    }

    /// A data set's record and its manifest's exact bytes, checked against its digest.
    pub async fn manifest(&self, id: &str) -> Result<(Dataset, Bytes), DataError> {
        let dataset = self.dataset(id).await?;
        let bytes = self.store.get(&store::manifest_key(&dataset.id)).await?;
        let actual = Sha256Digest::of(&bytes);
        if actual != dataset.digest {
            return Err(DataError::Corrupt {
                sha256: dataset.digest,
                source: format!("the stored manifest of {} has SHA-256 {actual}", dataset.id)
                    .into(),
            });
        }
        Ok((dataset, bytes))
    }

    /// A data set's export: its record, the tar's exact length and the tar itself.
    pub async fn export(
        &self,
        id: &str,
    ) -> Result<
        (
            Dataset,
            u64,
            impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
        ),
        DataError,
    > {
        let (dataset, bytes) = self.manifest(id).await?;
        let manifest: dataset::Manifest =
            serde_json::from_slice(&bytes).map_err(|e| DataError::Corrupt {
                sha256: dataset.digest,
                source: Box::new(e),
            })?;
        let length = export::tar_length(bytes.len() as u64, &manifest.samples);
        let mtime = u64::try_from(dataset.created_at.as_second()).unwrap_or(0);
        let stream = export::stream_tar(self.store.clone(), bytes, manifest.samples, mtime);
        Ok((dataset, length, stream))
    }
}
