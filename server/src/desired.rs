//! The last desired document of each device, kept in `{data_dir}/desired/{device}.json`.
//!
//! On disk so that generations keep growing across restarts, and so that the server can
//! publish them again when a broker lost its retained messages (rumqttd keeps none).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use botfleet_protocol::messages::{Desired, DesiredModel};
use botfleet_protocol::{DeviceId, SlotName};

use crate::files::{self, Replace};

/// Why a desired document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("cannot read desired documents in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "desired document {path} is not valid (fix or remove it; generations must not go back)"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write desired document {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode a desired document")]
    Encode(#[source] serde_json::Error),
}

/// From this many documents on, [`DesiredStore::write_staged`] flushes them with one
/// `syncfs` rather than one fsync each (which, for a few, would flush more than needed).
const BATCH_FROM: usize = 16;

/// Documents of a wave encoded and written at a time.
const WRITE_PART: usize = 512;

/// Desired documents by device, mirrored on disk.
#[derive(Debug)]
pub struct DesiredStore {
    dir: PathBuf,
    docs: BTreeMap<DeviceId, Desired>,
}

impl DesiredStore {
    /// Loads every `{device}.json` in `dir`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<Self, DesiredError> {
        let read_err = |source| DesiredError::Read {
            path: dir.to_owned(),
            source,
        };
        files::create_dir(dir).map_err(read_err)?;
        files::remove_stale_temps(dir).map_err(read_err)?;
        let mut docs = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            let Some(device) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| DeviceId::new(n).ok())
            else {
                tracing::warn!(path = %path.display(), "ignoring a file that is not {{device}}.json");
                continue;
            };
            let bytes = std::fs::read(&path).map_err(|source| DesiredError::Read {
                path: path.clone(),
                source,
            })?;
            let doc = serde_json::from_slice(&bytes)
                .map_err(|source| DesiredError::Parse { path, source })?;
            docs.insert(device, doc);
        }
        Ok(Self {
            dir: dir.to_owned(),
            docs,
        })
    }

    /// The next document for `device`: one generation up, `slot` set to `model`, the other
    /// slots as they were. Pure; [`Self::commit`] makes it stick.
    pub fn next(&self, device: &DeviceId, slot: &SlotName, model: DesiredModel) -> Desired {
        let (generation, mut slots) = match self.docs.get(device) {
            Some(doc) => (doc.generation, doc.slots.clone()),
            None => (0, BTreeMap::new()),
        };
        slots.insert(slot.clone(), model);
        Desired {
            generation: generation + 1,
            slots,
        }
    }

    /// What `device` is told to run in `slot` now.
    pub fn current(&self, device: &DeviceId, slot: &SlotName) -> Option<&DesiredModel> {
        self.docs.get(device).and_then(|doc| doc.slots.get(slot))
    }

    /// The next document for `device` with `slot` set to `model`, or left out when `None`
    /// (the device keeps what it serves there).
    pub fn next_with(
        &self,
        device: &DeviceId,
        slot: &SlotName,
        model: Option<DesiredModel>,
    ) -> Desired {
        let (generation, mut slots) = match self.docs.get(device) {
            Some(doc) => (doc.generation, doc.slots.clone()),
            None => (0, BTreeMap::new()),
        };
        match model {
            Some(model) => slots.insert(slot.clone(), model),
            None => slots.remove(slot),
        };
        Desired {
            generation: generation + 1,
            slots,
        }
    }

    /// Remembers `doc` for `device` before it is written, so that the next document made
    /// for the device builds on it.
    pub fn stage(&mut self, device: &DeviceId, doc: Desired) {
        self.docs.insert(device.clone(), doc);
    }

    /// Writes the staged documents of `devices` to disk (each atomically, flushed together):
    /// what a wave of thousands of devices needs. Encoded and written [`WRITE_PART`] at a
    /// time, so a wave's bytes are never all in memory at once.
    pub async fn write_staged(&mut self, devices: &[DeviceId]) -> Result<(), DesiredError> {
        if devices.len() < BATCH_FROM {
            for device in devices {
                if let Some(doc) = self.docs.get(device).cloned() {
                    self.commit(device, doc).await?;
                }
            }
            return Ok(());
        }
        let failed = |source| DesiredError::Write {
            path: self.dir.clone(),
            source,
        };
        let mut batch = files::Batch::new(&self.dir);
        for part in devices.chunks(WRITE_PART) {
            let mut files = Vec::with_capacity(part.len());
            for device in part {
                let Some(doc) = self.docs.get(device) else {
                    continue;
                };
                let bytes = serde_json::to_vec_pretty(doc).map_err(DesiredError::Encode)?;
                files.push((self.dir.join(format!("{device}.json")), bytes));
            }
            // A failed part drops the batch on that thread, which removes its temp files.
            batch = tokio::task::spawn_blocking(move || {
                let mut batch = batch;
                batch.write(&files, 0o640).map(|()| batch)
            })
            .await
            .map_err(|join| io::Error::other(join.to_string()))
            .and_then(|r| r)
            .map_err(failed)?;
        }
        tokio::task::spawn_blocking(move || batch.finish())
            .await
            .map_err(|join| io::Error::other(join.to_string()))
            .and_then(|r| r)
            .map_err(failed)
    }

    /// Writes `doc` for `device` to disk (atomically), then remembers it.
    pub async fn commit(&mut self, device: &DeviceId, doc: Desired) -> Result<(), DesiredError> {
        let bytes = serde_json::to_vec_pretty(&doc).map_err(DesiredError::Encode)?;
        let path = self.dir.join(format!("{device}.json"));
        let target = path.clone();
        tokio::task::spawn_blocking(move || {
            files::write_atomic(&target, &bytes, 0o640, Replace::Allow)
        })
        .await
        .map_err(|join| io::Error::other(join.to_string()))
        .and_then(|r| r)
        .map_err(|source| DesiredError::Write { path, source })?;
        self.docs.insert(device.clone(), doc);
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &Desired)> {
        self.docs.iter()
    }

    pub fn get(&self, device: &DeviceId) -> Option<&Desired> {
        self.docs.get(device)
    }
}

#[cfg(test)]
mod tests {
    use botfleet_protocol::manifest::SignedManifest;

    use super::*;

    fn model(url: &str) -> DesiredModel {
        DesiredModel {
            rollout_id: None,
            manifest: SignedManifest {
                payload: String::new(),
                signatures: vec![],
            },
            artifact_url: url.into(),
            evaluation_url: None,
            window: None,
            shadow: None,
            on_command: false,
        }
    }

    #[tokio::test]
    async fn generations_grow_across_reopen_and_other_slots_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let device = DeviceId::new("robot-1").unwrap();
        let a = SlotName::new("a").unwrap();
        let b = SlotName::new("b").unwrap();

        let mut store = DesiredStore::open(dir.path()).unwrap();
        let first = store.next(&device, &a, model("http://x/1"));
        assert_eq!(first.generation, 1);
        store.commit(&device, first).await.unwrap();
        let second = store.next(&device, &b, model("http://x/2"));
        store.commit(&device, second).await.unwrap();

        let store = DesiredStore::open(dir.path()).unwrap();
        let third = store.next(&device, &a, model("http://x/3"));
        assert_eq!(third.generation, 3);
        assert_eq!(third.slots[&a].artifact_url, "http://x/3");
        assert_eq!(third.slots[&b].artifact_url, "http://x/2");
    }

    #[test]
    fn a_corrupt_document_stops_the_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("robot-1.json"), b"{").unwrap();
        assert!(matches!(
            DesiredStore::open(dir.path()),
            Err(DesiredError::Parse { .. })
        ));
    }
}
