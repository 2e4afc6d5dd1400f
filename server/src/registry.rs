//! The model registry: signed model records and their artifacts.
//!
//! ```text
//! {data_dir}/artifacts/{sha256}            the model bytes, content-addressed
//! {data_dir}/botfleet.redb, table models   the record: metadata + signed manifest
//! ```
//! The artifact is written first (temp → fsync → rename), then the record is committed to
//! the database; a crash in between leaves an unreferenced artifact, never a record without
//! its bytes. All records are loaded at start; uploads are serialised at the commit step only, so two
//! pipelines can upload at once while release numbers stay unique and monotonic per slot.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use botfleet_protocol::engine::EnginePolicy;
use botfleet_protocol::manifest::{
    Artifact, KeyId, Manifest, ModelFormat, Quantization, Sha256Digest, SignedManifest,
};
use botfleet_protocol::{ManifestSigner, SlotName};
use bytes::Bytes;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};
use crate::files::{self, Replace};
use crate::intake::{self, IntakeError, ModelMetadata, ModelVersion};

/// Why the registry refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error(
        "{slot}/{version} already exists with other bytes (sha256 {existing}); upload a new version"
    )]
    VersionTaken {
        slot: SlotName,
        version: ModelVersion,
        existing: Sha256Digest,
    },
    #[error("release {requested} of slot {slot} is not newer than its release {highest}")]
    ReleaseNotNewer {
        slot: SlotName,
        requested: u64,
        highest: u64,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the model records cannot be read or written")]
    Db(#[from] DbError),
    #[error("cannot sign the manifest")]
    Sign(#[source] serde_json::Error),
    #[error("a model check task failed: {0}")]
    Task(String),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RegistryError + use<> {
    let path = path.to_owned();
    move |source| RegistryError::Io {
        action,
        path,
        source,
    }
}

/// A model record as stored in the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    pub slot: SlotName,
    pub name: String,
    pub version: ModelVersion,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub size: u64,
    pub quantization: Quantization,
    pub key_id: KeyId,
    pub manifest: Manifest,
    pub signed_manifest: SignedManifest,
    pub created_at: Timestamp,
}

/// A model record as the API shows it: the stored record plus where to download it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    #[serde(flatten)]
    pub stored: StoredModel,
    pub artifact_url: String,
    /// Where robots download the accuracy gate's evaluation set, when the model has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation_url: Option<String>,
}

/// What an upload became.
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// A new record.
    Created(ModelRecord),
    /// The same slot, version and bytes were uploaded before (a pipeline retry).
    Existing(ModelRecord),
}

/// The next release of a slot: `requested` if newer than every release, else the next one.
pub fn next_release(
    slot: &SlotName,
    existing: impl Iterator<Item = u64>,
    requested: Option<u64>,
) -> Result<u64, RegistryError> {
    let highest = existing.max().unwrap_or(0);
    match requested {
        None => Ok(highest + 1),
        Some(r) if r > highest => Ok(r),
        Some(requested) => Err(RegistryError::ReleaseNotNewer {
            slot: slot.clone(),
            requested,
            highest,
        }),
    }
}

type Key = (SlotName, ModelVersion);

/// Records and artifacts.
#[derive(Debug)]
pub struct Registry {
    artifacts: PathBuf,
    db: Arc<Db>,
    public_url: String,
    signer: Arc<ManifestSigner>,
    /// The engine policy of uploads whose metadata names none (`intake.engines`).
    default_engines: EnginePolicy,
    records: RwLock<BTreeMap<Key, StoredModel>>,
    commit: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens (or creates) the artifact store under `data_dir` and loads every record from
    /// the database.
    pub fn open(
        data_dir: &Path,
        db: Arc<Db>,
        public_url: String,
        signer: Arc<ManifestSigner>,
        default_engines: EnginePolicy,
    ) -> Result<Self, RegistryError> {
        let artifacts = data_dir.join("artifacts");
        files::create_dir(&artifacts).map_err(io_err("create", &artifacts))?;
        let stale = files::remove_stale_temps(&artifacts).map_err(io_err("clean", &artifacts))?;
        if stale > 0 {
            tracing::info!(stale, "removed unfinished artifact writes");
        }
        let mut records = BTreeMap::new();
        for record in db.load_models()? {
            if !artifacts.join(record.sha256.to_hex()).is_file() {
                tracing::error!(slot = %record.slot, version = %record.version, sha256 = %record.sha256, "artifact missing; downloads of this model will fail");
            }
            records.insert((record.slot.clone(), record.version.clone()), record);
        }
        tracing::info!(models = records.len(), "model registry loaded");
        Ok(Self {
            artifacts,
            db,
            public_url,
            signer,
            default_engines,
            records: RwLock::new(records),
            commit: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Key, StoredModel>> {
        self.records
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn show(&self, stored: &StoredModel) -> ModelRecord {
        ModelRecord {
            artifact_url: self.artifact_url(&stored.sha256),
            evaluation_url: stored
                .manifest
                .gate
                .evaluation
                .as_ref()
                .map(|e| self.artifact_url(&e.sha256)),
            stored: stored.clone(),
        }
    }

    /// The key that signs manifests and rollback orders.
    pub fn signer(&self) -> &ManifestSigner {
        &self.signer
    }

    pub fn artifact_url(&self, digest: &Sha256Digest) -> String {
        format!("{}/artifacts/{}", self.public_url, digest.to_hex())
    }

    /// Every record, by slot then release.
    pub fn list(&self) -> Vec<ModelRecord> {
        let mut all: Vec<_> = self.read().values().map(|s| self.show(s)).collect();
        all.sort_by(|a, b| {
            (&a.stored.slot, a.stored.release).cmp(&(&b.stored.slot, b.stored.release))
        });
        all
    }

    pub fn get(&self, slot: &SlotName, version: &ModelVersion) -> Option<ModelRecord> {
        self.read()
            .get(&(slot.clone(), version.clone()))
            .map(|s| self.show(s))
    }

    /// The file of a known artifact (a model or a model's evaluation set).
    pub fn artifact_path(&self, digest: &Sha256Digest) -> Option<PathBuf> {
        let known = self.read().values().any(|r| {
            &r.sha256 == digest
                || r.manifest
                    .gate
                    .evaluation
                    .as_ref()
                    .is_some_and(|e| &e.sha256 == digest)
        });
        known.then(|| self.artifacts.join(digest.to_hex()))
    }

    /// The earlier upload of the same slot and version: `Ok(Some)` with the same bytes,
    /// an error with other bytes.
    fn earlier(
        &self,
        meta: &ModelMetadata,
        sha256: &Sha256Digest,
    ) -> Result<Option<ModelRecord>, RegistryError> {
        let records = self.read();
        match records.get(&(meta.slot.clone(), meta.version.clone())) {
            None => Ok(None),
            Some(r) if &r.sha256 == sha256 => Ok(Some(self.show(r))),
            Some(r) => Err(RegistryError::VersionTaken {
                slot: r.slot.clone(),
                version: r.version.clone(),
                existing: r.sha256,
            }),
        }
    }

    /// Checks, signs and stores an upload, with the evaluation set of its accuracy gate.
    pub async fn add(
        &self,
        meta: ModelMetadata,
        bytes: Bytes,
        evaluation: Option<Bytes>,
    ) -> Result<Intake, RegistryError> {
        match (&meta.evaluation, &evaluation) {
            (Some(_), None) => {
                return Err(IntakeError::Field {
                    field: "evaluation",
                    reason: "the metadata asks for an accuracy gate but no `evaluation` part \
                             (the evaluation set) was sent"
                        .into(),
                }
                .into());
            }
            (None, Some(_)) => {
                return Err(IntakeError::Field {
                    field: "evaluation",
                    reason: "an `evaluation` part was sent; say what the robots must measure \
                             on it in the metadata: \"evaluation\": {\"metric\": \
                             \"top1_agreement\", \"min_agreement\": 0.95}"
                        .into(),
                }
                .into());
            }
            _ => {}
        }
        let sha256 = Sha256Digest::of(&bytes);
        let size = bytes.len() as u64;
        if let Some(record) = self.earlier(&meta, &sha256)? {
            return Ok(Intake::Existing(record));
        }
        tracing::info!(slot = %meta.slot, version = %meta.version, sha256 = %sha256.short(), size, "checking uploaded model");
        let checked = {
            let bytes = bytes.clone();
            let inputs = meta.inputs.clone();
            let (seed, tolerance) = (intake::seed_of(&sha256), meta.tolerance);
            let want_reference = meta.gate.reference.is_none();
            let accuracy = meta.evaluation.clone().zip(evaluation.clone());
            tokio::task::spawn_blocking(move || {
                let checked = intake::check_model(
                    &bytes,
                    inputs.as_deref(),
                    seed,
                    tolerance,
                    want_reference,
                )?;
                let evaluation = accuracy
                    .map(|(gate, set)| intake::check_evaluation(&set, &gate, &bytes, &checked))
                    .transpose()?;
                Ok::<_, IntakeError>((checked, evaluation))
            })
            .await
            .map_err(|e| RegistryError::Task(e.to_string()))??
        };
        let (checked, checked_evaluation) = checked;

        let _commit = self.commit.lock().await;
        // Another upload of the same version may have committed while this one was checked.
        if let Some(record) = self.earlier(&meta, &sha256)? {
            return Ok(Intake::Existing(record));
        }
        let release = {
            let records = self.read();
            let slot_releases = records
                .values()
                .filter(|r| r.slot == meta.slot)
                .map(|r| r.release);
            next_release(&meta.slot, slot_releases, meta.release)?
        };
        let artifact = Artifact {
            size,
            sha256,
            format: ModelFormat::Onnx,
            quantization: meta.quantization,
        };
        let now = Timestamp::now();
        let manifest = intake::build_manifest(
            &meta,
            release,
            artifact,
            checked,
            checked_evaluation,
            now,
            &self.default_engines,
        )?;
        let signed_manifest = self.signer.sign(&manifest).map_err(RegistryError::Sign)?;
        let stored = StoredModel {
            slot: meta.slot.clone(),
            name: manifest.name.clone(),
            version: meta.version.clone(),
            release,
            sha256,
            size,
            quantization: meta.quantization,
            key_id: self.signer.key_id().clone(),
            manifest,
            signed_manifest,
            created_at: now,
        };
        self.write(&stored, bytes, evaluation).await?;
        self.records
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                (stored.slot.clone(), stored.version.clone()),
                stored.clone(),
            );
        tracing::info!(slot = %stored.slot, version = %stored.version, release, sha256 = %sha256.short(), "model signed and stored");
        Ok(Intake::Created(self.show(&stored)))
    }

    /// Writes the artifact and its evaluation set (unless the same bytes are there
    /// already), then the record.
    async fn write(
        &self,
        stored: &StoredModel,
        bytes: Bytes,
        evaluation: Option<Bytes>,
    ) -> Result<(), RegistryError> {
        let mut writes = vec![(self.artifacts.join(stored.sha256.to_hex()), bytes)];
        if let (Some(gate), Some(set)) = (&stored.manifest.gate.evaluation, evaluation) {
            writes.push((self.artifacts.join(gate.sha256.to_hex()), set));
        }
        let (db, record) = (self.db.clone(), stored.clone());
        let result = tokio::task::spawn_blocking(move || {
            for (path, bytes) in &writes {
                if !path.is_file() {
                    files::write_atomic(path, bytes, 0o644, Replace::Allow)
                        .map_err(io_err("write", path))?;
                }
            }
            db.save_model(&record).map_err(RegistryError::from)
        })
        .await;
        result.map_err(|e| RegistryError::Task(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_grow_from_one_and_explicit_ones_must_be_newer() {
        let slot = SlotName::new("s").unwrap();
        assert_eq!(next_release(&slot, [].into_iter(), None).unwrap(), 1);
        assert_eq!(next_release(&slot, [1, 4, 2].into_iter(), None).unwrap(), 5);
        assert_eq!(
            next_release(&slot, [1, 4].into_iter(), Some(10)).unwrap(),
            10
        );
        assert!(matches!(
            next_release(&slot, [1, 4].into_iter(), Some(4)),
            Err(RegistryError::ReleaseNotNewer { highest: 4, .. })
        ));
    }
}
