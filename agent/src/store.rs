//! The on-disk model store.
//!
//! ```text
//! {data_dir}/models/{sha256}      committed artifacts, read-only, named by content
//! {data_dir}/partial/{sha256}     downloads in progress
//! {data_dir}/state.json           the active model per slot (signed manifests)
//! ```
//! Every write of a committed file goes temp → fsync → rename → fsync(dir), so a power cut
//! leaves either the old or the new file, never a torn one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use botfleet_protocol::SignedManifest;
use botfleet_protocol::SlotName;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::Desired;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Store failures, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: content does not match its name (sha256 {actual})")]
    Tampered { path: PathBuf, actual: Sha256Digest },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What serves each slot, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub slots: BTreeMap<SlotName, InstalledModel>,
    /// Per slot, the signed manifest (payload digest) taken out of service by a rollback:
    /// not installed again until the desired state names another one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blocked: BTreeMap<SlotName, Sha256Digest>,
}

impl State {
    /// Artifacts that must stay in the store: every slot's current and previous model.
    pub fn referenced(&self) -> Vec<Sha256Digest> {
        self.slots
            .values()
            .flat_map(|m| std::iter::once(m.sha256).chain(m.previous.as_ref().map(|p| p.sha256)))
            .collect()
    }
}

/// One installed model: its signed manifest (re-verified at every start) and when it began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledModel {
    pub manifest: SignedManifest,
    pub sha256: Sha256Digest,
    pub since: Timestamp,
    /// The rollout that installed it, for the events a later rollback reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<botfleet_protocol::RolloutId>,
    /// The model it replaced, kept on disk for an instant rollback (one level deep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<InstalledModel>>,
    /// The engine the gate chose for it (absent: tract, from before there were engines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<botfleet_protocol::engine::EngineKind>,
}

/// The model store under one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (and creates) the store.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for dir in [root.join("models"), root.join("partial")] {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("models").join(sha.to_hex())
    }

    pub fn partial_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("partial").join(sha.to_hex())
    }

    /// Where the accuracy gate's evaluation set of the artifact `sha` is kept (collected
    /// with the artifact).
    pub fn evaluation_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{}.evaluation", sha.to_hex()))
    }

    /// The evaluation set of artifact `sha`, when the store has it with digest `want`.
    pub fn read_evaluation(&self, sha: &Sha256Digest, want: &Sha256Digest) -> Option<Vec<u8>> {
        let bytes = fs::read(self.evaluation_path(sha)).ok()?;
        (Sha256Digest::of(&bytes) == *want).then_some(bytes)
    }

    pub fn has(&self, sha: &Sha256Digest) -> bool {
        self.model_path(sha).is_file()
    }

    /// Moves a fully downloaded and checked file into the store, read-only.
    pub fn commit(&self, sha: &Sha256Digest) -> Result<PathBuf, StoreError> {
        let from = self.partial_path(sha);
        let to = self.model_path(sha);
        let mut perms = fs::metadata(&from).map_err(io(&from))?.permissions();
        perms.set_readonly(true);
        fs::set_permissions(&from, perms).map_err(io(&from))?;
        fs::rename(&from, &to).map_err(io(&to))?;
        sync_dir(&self.root.join("models"))?;
        Ok(to)
    }

    /// Moves a downloaded and checked evaluation set (in `partial/{set}`) to its model.
    pub fn commit_evaluation(
        &self,
        set: &Sha256Digest,
        model: &Sha256Digest,
    ) -> Result<PathBuf, StoreError> {
        let from = self.partial_path(set);
        let to = self.evaluation_path(model);
        fs::rename(&from, &to).map_err(io(&to))?;
        sync_dir(&self.root.join("models"))?;
        Ok(to)
    }

    /// Where compiled engines for the artifact `sha` live (TensorRT plans and timing
    /// caches), one folder per `key` (engine, library versions, GPU): collected with the
    /// artifact.
    pub fn engine_cache(&self, sha: &Sha256Digest, key: &str) -> PathBuf {
        self.root.join("engines").join(sha.to_hex()).join(key)
    }

    /// Removes committed artifacts that `keep` does not name, partial downloads of them
    /// and their compiled engines; returns how many files (or engine folders) went.
    pub fn collect_garbage(
        &self,
        keep: &[Sha256Digest],
        downloading: Option<&Sha256Digest>,
    ) -> usize {
        let mut removed = 0;
        for dir in ["models", "partial", "engines"] {
            let Ok(entries) = fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let stem = name.to_string_lossy();
                let digest = stem
                    .split('.')
                    .next()
                    .and_then(|d| d.parse::<Sha256Digest>().ok());
                let wanted = digest.is_some_and(|d| keep.contains(&d) || downloading == Some(&d));
                if wanted {
                    continue;
                }
                let path = entry.path();
                let gone = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if gone.is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Reads a committed artifact and checks it still has the digest it is named by.
    pub fn read_checked(&self, sha: &Sha256Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.model_path(sha);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&path))?;
        let actual = Sha256Digest::from_bytes(Sha256::digest(&bytes).into());
        if actual != *sha {
            return Err(StoreError::Tampered { path, actual });
        }
        Ok(bytes)
    }

    fn desired_path(&self) -> PathBuf {
        self.root.join("desired.json")
    }

    /// The last desired state received, if any. Its manifests are verified again before use.
    pub fn load_desired(&self) -> Result<Option<Desired>, StoreError> {
        let path = self.desired_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keeps the desired state for the next start.
    pub fn save_desired(&self, desired: &Desired) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(desired).map_err(|source| StoreError::Corrupt {
            path: self.desired_path(),
            source,
        })?;
        write_atomic(&self.desired_path(), &bytes)
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The persisted state; empty on first start.
    pub fn load_state(&self) -> Result<State, StoreError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Persists `state` crash-safely.
    pub fn save_state(&self, state: &State) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| StoreError::Corrupt {
            path: self.state_path(),
            source,
        })?;
        write_atomic(&self.state_path(), &bytes)
    }
}

/// temp → fsync → rename → fsync(dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    // "mid-state-write", "mid-desired-write": a crash with the temp file written, not renamed.
    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
        crate::failpoint::hit(&format!("mid-{stem}-write"));
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_reopen_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_state().unwrap(), State::default());
        let signer = botfleet_protocol::ManifestSigner::from_secret([1; 32]);
        let _ = signer;
        let state = State {
            slots: BTreeMap::from([(
                SlotName::new("vision").unwrap(),
                InstalledModel {
                    manifest: SignedManifest {
                        payload: "e30=".into(),
                        signatures: vec![],
                    },
                    sha256: Sha256Digest::of(b"x"),
                    since: Timestamp::UNIX_EPOCH,
                    rollout_id: None,
                    previous: None,
                    engine: None,
                },
            )]),
            blocked: BTreeMap::new(),
        };
        store.save_state(&state).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.load_state().unwrap(), state);
    }

    #[test]
    fn garbage_collection_keeps_what_is_referenced_and_what_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let [a, b, c] = [b"a", b"b", b"c"].map(|x| Sha256Digest::of(x));
        for sha in [a, b, c] {
            fs::write(store.partial_path(&sha), b"x").unwrap();
            store.commit(&sha).unwrap();
        }
        fs::write(store.partial_path(&c), b"half").unwrap();
        fs::write(
            dir.path()
                .join("partial")
                .join(format!("{}.meta", a.to_hex())),
            b"{}",
        )
        .unwrap();
        assert_eq!(store.collect_garbage(&[a], Some(&c)), 1, "only b goes");
        assert!(store.has(&a) && !store.has(&b) && store.has(&c));
        assert!(store.partial_path(&c).exists());
    }

    #[test]
    fn garbage_collection_removes_the_compiled_engines_of_the_models_it_removes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let [kept, removed, downloading] = [b"a", b"b", b"c"].map(|x| Sha256Digest::of(x));
        for sha in [kept, removed] {
            fs::write(store.partial_path(&sha), b"x").unwrap();
            store.commit(&sha).unwrap();
        }
        let keys = [
            "onnxruntime-tensorrt-fp16-ort1.20-trt10.3-sm87",
            "onnxruntime-cuda-sm87",
        ];
        let plan = |sha: &Sha256Digest, key: &str| store.engine_cache(sha, key).join("plan.engine");
        for sha in [kept, removed, downloading] {
            for key in keys {
                fs::create_dir_all(store.engine_cache(&sha, key)).unwrap();
                fs::write(plan(&sha, key), b"serialized engine").unwrap();
            }
        }
        let stray = dir.path().join("engines").join("not-a-digest");
        fs::create_dir_all(&stray).unwrap();

        assert_eq!(
            store.collect_garbage(&[kept], Some(&downloading)),
            3,
            "the removed model, its engine folder and the stray folder"
        );
        assert!(!store.has(&removed));
        let engines = dir.path().join("engines");
        assert!(!engines.join(removed.to_hex()).exists());
        assert!(!stray.exists());
        for sha in [kept, downloading] {
            for key in keys {
                assert_eq!(fs::read(plan(&sha, key)).unwrap(), b"serialized engine");
            }
        }
        assert!(store.has(&kept));
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(matches!(
            store.load_state(),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_committed_file_that_changed_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sha = Sha256Digest::of(b"model bytes");
        fs::write(store.partial_path(&sha), b"model bytes").unwrap();
        store.commit(&sha).unwrap();
        assert_eq!(store.read_checked(&sha).unwrap(), b"model bytes");
        let path = store.model_path(&sha);
        let mut perms = fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(&path, perms).unwrap();
        fs::write(&path, b"evil bytes!").unwrap();
        assert!(matches!(
            store.read_checked(&sha),
            Err(StoreError::Tampered { .. })
        ));
    }
}
