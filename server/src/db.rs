//! The server's embedded database: one redb file, `{data_dir}/botfleet.redb`.
//!
//! redb is pure Rust, ACID (copy-on-write B-trees, a commit is atomic and durable when it
//! returns) and keeps a single file, so a kill -9 leaves either the old or the new state,
//! never half of one. Rollouts and the idempotency keys of the requests that made them live
//! here as JSON values, one row per rollout or key; each device's run in a rollout (its
//! progress and the marks the server gave it) is a row of its own, keyed by rollout and
//! device, so an event rewrites one small row, not the rollout (at 100,000 devices a
//! rollout is tens of megabytes). A rollout is written before any device is commanded for
//! it, so a restart never commands a device twice for the same step. A rollout row that
//! still holds its devices (written before they had rows) is split when it is loaded.
//!
//! Models (metadata and signed manifest; the artifact bytes stay content-addressed files)
//! are keyed `{slot}/{version}`; devices (last status, info, telemetry, presence, operator
//! labels) by device id; channels by name. Captured samples (the record of each file the
//! blob store holds) are keyed (capture time, digest), so a time range is one range read,
//! with an index by digest; data sets by id. Tables a database lacks are created when it is opened, so a file
//! written by an older server of this schema opens as it is.

use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};

use botfleet_protocol::manifest::Sha256Digest;
use jiff::Timestamp;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::channels::Channel;
use crate::data::{Dataset, SampleRecord};
use crate::devices::DeviceView;
use crate::registry::StoredModel;
use botfleet_protocol::{DeviceId, RolloutId};

use crate::rollouts::{DeviceRun, IdempotencyKey, Remembered, Rollout};

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const ROLLOUTS: Table = TableDefinition::new("rollouts");
/// One row per device of a rollout, keyed (rollout id, device id).
const ROLLOUT_DEVICES: TableDefinition<'static, (&'static str, &'static str), &'static [u8]> =
    TableDefinition::new("rollout_devices");
const IDEMPOTENCY: Table = TableDefinition::new("idempotency_keys");
const MODELS: Table = TableDefinition::new("models");
const DEVICES: Table = TableDefinition::new("devices");
const CHANNELS: Table = TableDefinition::new("channels");
/// Sample records keyed (captured_at in nanoseconds since the epoch, SHA-256 hex).
const SAMPLES: TableDefinition<'static, (i128, &'static str), &'static [u8]> =
    TableDefinition::new("samples");
/// Each stored sample's capture time, by SHA-256 hex: the key of its `samples` row.
const SAMPLE_DIGESTS: TableDefinition<'static, &'static str, i128> =
    TableDefinition::new("sample_digests");
const DATASETS: Table = TableDefinition::new("datasets");

/// redb's page cache (reads and the write buffer together). Its default, 1 GiB, would let
/// the cache grow with every page a busy fleet rewrites (a rollout of 10,000 devices is one
/// row of megabytes, saved again on each tick); the server reads the file only at start,
/// so a small cache costs nothing, and a larger write spills to the file before the commit.
const CACHE_BYTES: usize = 8 << 20;

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("database {operation} failed")]
    Storage {
        operation: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("database row {table}/{key} cannot be decoded (written by a newer server?)")]
    Decode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a database row")]
    Encode(#[source] serde_json::Error),
}

fn storage(operation: &'static str) -> impl Fn(redb::Error) -> DbError {
    move |source| DbError::Storage {
        operation,
        source: Box::new(source),
    }
}

/// What of a rollout changed and is written: the rollout's own row (everything but its
/// devices) and the rows of the devices named. Encoded where the rollout lives, so that
/// saving never clones it.
#[derive(Debug)]
pub struct RolloutRow {
    pub id: RolloutId,
    /// The rollout's own row; `None` when only devices changed.
    pub head: Option<Vec<u8>>,
    pub devices: Vec<(DeviceId, Vec<u8>)>,
}

impl RolloutRow {
    /// The rollout's own row and every device's.
    pub fn whole(rollout: &Rollout) -> Result<Self, DbError> {
        Ok(Self {
            id: rollout.id.clone(),
            head: Some(serde_json::to_vec(rollout).map_err(DbError::Encode)?),
            devices: Self::runs(rollout.devices.iter())?,
        })
    }

    /// The rollout's own row and those of `devices`.
    pub fn head<'a>(
        rollout: &Rollout,
        devices: impl IntoIterator<Item = &'a DeviceId>,
    ) -> Result<Self, DbError> {
        Ok(Self {
            head: Some(serde_json::to_vec(rollout).map_err(DbError::Encode)?),
            ..Self::devices(rollout, devices)?
        })
    }

    /// The rows of `devices` (those of them the rollout targets).
    pub fn devices<'a>(
        rollout: &Rollout,
        devices: impl IntoIterator<Item = &'a DeviceId>,
    ) -> Result<Self, DbError> {
        let runs = devices
            .into_iter()
            .filter_map(|id| rollout.devices.get_key_value(id));
        Ok(Self {
            id: rollout.id.clone(),
            head: None,
            devices: Self::runs(runs)?,
        })
    }

    fn runs<'a>(
        runs: impl Iterator<Item = (&'a DeviceId, &'a DeviceRun)>,
    ) -> Result<Vec<(DeviceId, Vec<u8>)>, DbError> {
        runs.map(|(id, run)| {
            Ok((
                id.clone(),
                serde_json::to_vec(run).map_err(DbError::Encode)?,
            ))
        })
        .collect()
    }
}

/// What the database held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub rollouts: Vec<Rollout>,
    pub keys: Vec<(IdempotencyKey, Remembered)>,
}

/// The database handle (cheap to share behind an `Arc`; redb serialises writers).
#[derive(Debug)]
pub struct Db {
    // Declared first so the file is closed before `open` is dropped.
    db: Database,
    /// Dropped with the handle: [`Db::released`] resolves once the file is closed.
    open: tokio::sync::watch::Sender<()>,
}

impl Db {
    /// Opens (or creates) the database file and its tables.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| DbError::Open {
                path: path.to_owned(),
                source: Box::new(e.into()),
            })?;
        let txn = db.begin_write().map_err(|e| storage("begin")(e.into()))?;
        for table in [ROLLOUTS, IDEMPOTENCY, MODELS, DEVICES, CHANNELS, DATASETS] {
            txn.open_table(table)
                .map_err(|e| storage("create table")(e.into()))?;
        }
        txn.open_table(ROLLOUT_DEVICES)
            .map_err(|e| storage("create table")(e.into()))?;
        txn.open_table(SAMPLES)
            .map_err(|e| storage("create table")(e.into()))?;
        txn.open_table(SAMPLE_DIGESTS)
            .map_err(|e| storage("create table")(e.into()))?;
        txn.commit().map_err(|e| storage("commit")(e.into()))?;
        Ok(Self {
            db,
            open: tokio::sync::watch::Sender::new(()),
        })
    }

    /// Resolves once the last handle is dropped and the file is closed, so another
    /// `Db::open` of the same path can succeed. Holding the future keeps nothing open.
    pub fn released(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut open = self.open.subscribe();
        async move { while open.changed().await.is_ok() {} }
    }

    /// Everything stored. Rollout rows that still hold their devices are split first.
    pub fn load(&self) -> Result<Loaded, DbError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| storage("begin")(e.into()))?;
        let mut loaded = Loaded::default();
        let table = txn
            .open_table(ROLLOUTS)
            .map_err(|e| storage("open")(e.into()))?;
        let mut unsplit = Vec::new();
        for row in table.iter().map_err(|e| storage("read")(e.into()))? {
            let (key, value) = row.map_err(|e| storage("read")(e.into()))?;
            let rollout: Rollout =
                serde_json::from_slice(value.value()).map_err(|source| DbError::Decode {
                    table: "rollouts",
                    key: key.value().to_owned(),
                    source,
                })?;
            if !rollout.devices.is_empty() {
                unsplit.push(RolloutRow::whole(&rollout)?);
            }
            loaded.rollouts.push(rollout);
        }
        let table = txn
            .open_table(ROLLOUT_DEVICES)
            .map_err(|e| storage("open")(e.into()))?;
        let index: std::collections::HashMap<String, usize> = (loaded.rollouts.iter())
            .enumerate()
            .map(|(at, r)| (r.id.as_str().to_owned(), at))
            .collect();
        for row in table.iter().map_err(|e| storage("read")(e.into()))? {
            let (key, value) = row.map_err(|e| storage("read")(e.into()))?;
            let (rollout_id, device_id) = key.value();
            let decode = |source| DbError::Decode {
                table: "rollout_devices",
                key: format!("{rollout_id}/{device_id}"),
                source,
            };
            let run: DeviceRun = serde_json::from_slice(value.value()).map_err(decode)?;
            // A row without its rollout, or with an id this server refuses, is skipped.
            let rollout = index
                .get(rollout_id)
                .and_then(|&at| loaded.rollouts.get_mut(at));
            if let (Some(rollout), Ok(device)) = (rollout, DeviceId::new(device_id)) {
                rollout.devices.entry(device).or_insert(run);
            }
        }
        let table = txn
            .open_table(IDEMPOTENCY)
            .map_err(|e| storage("open")(e.into()))?;
        for row in table.iter().map_err(|e| storage("read")(e.into()))? {
            let (key, value) = row.map_err(|e| storage("read")(e.into()))?;
            let decode = |source| DbError::Decode {
                table: "idempotency_keys",
                key: key.value().to_owned(),
                source,
            };
            let remembered = serde_json::from_slice(value.value()).map_err(decode)?;
            // Keys were validated when they were stored; a bad one is skipped, not fatal.
            if let Ok(id) = IdempotencyKey::new(key.value()) {
                loaded.keys.push((id, remembered));
            }
        }
        drop(txn);
        if !unsplit.is_empty() {
            self.save(&unsplit, &[])?;
        }
        Ok(loaded)
    }

    /// Writes rollouts and keys in one durable transaction.
    pub fn save(
        &self,
        rollouts: &[RolloutRow],
        keys: &[(String, Remembered)],
    ) -> Result<(), DbError> {
        if rollouts.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let txn = self
            .db
            .begin_write()
            .map_err(|e| storage("begin")(e.into()))?;
        {
            let mut table = txn
                .open_table(ROLLOUTS)
                .map_err(|e| storage("open")(e.into()))?;
            for row in rollouts {
                if let Some(head) = &row.head {
                    table
                        .insert(row.id.as_str(), head.as_slice())
                        .map_err(|e| storage("write")(e.into()))?;
                }
            }
            let mut table = txn
                .open_table(ROLLOUT_DEVICES)
                .map_err(|e| storage("open")(e.into()))?;
            for row in rollouts {
                for (device, run) in &row.devices {
                    table
                        .insert((row.id.as_str(), device.as_str()), run.as_slice())
                        .map_err(|e| storage("write")(e.into()))?;
                }
            }
            let mut table = txn
                .open_table(IDEMPOTENCY)
                .map_err(|e| storage("open")(e.into()))?;
            for (key, remembered) in keys {
                let bytes = serde_json::to_vec(remembered).map_err(DbError::Encode)?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| storage("write")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| storage("commit")(e.into()))
    }

    /// Every row of `table`, decoded.
    fn rows<T: DeserializeOwned>(
        &self,
        table: Table,
        name: &'static str,
    ) -> Result<Vec<T>, DbError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| storage("begin")(e.into()))?;
        let opened = txn
            .open_table(table)
            .map_err(|e| storage("open")(e.into()))?;
        let mut out = Vec::new();
        for row in opened.iter().map_err(|e| storage("read")(e.into()))? {
            let (key, value) = row.map_err(|e| storage("read")(e.into()))?;
            let decoded =
                serde_json::from_slice(value.value()).map_err(|source| DbError::Decode {
                    table: name,
                    key: key.value().to_owned(),
                    source,
                })?;
            out.push(decoded);
        }
        Ok(out)
    }

    /// Writes `rows` (key, value) into `table` in one durable transaction.
    fn put<'a, T: Serialize + 'a>(
        &self,
        table: Table,
        rows: impl IntoIterator<Item = (String, &'a T)>,
    ) -> Result<(), DbError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| storage("begin")(e.into()))?;
        {
            let mut opened = txn
                .open_table(table)
                .map_err(|e| storage("open")(e.into()))?;
            for (key, value) in rows {
                let bytes = serde_json::to_vec(value).map_err(DbError::Encode)?;
                opened
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| storage("write")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| storage("commit")(e.into()))
    }

    /// Every model record.
    pub fn load_models(&self) -> Result<Vec<StoredModel>, DbError> {
        self.rows(MODELS, "models")
    }

    /// Stores a model record (durable when this returns).
    pub fn save_model(&self, model: &StoredModel) -> Result<(), DbError> {
        let key = format!("{}/{}", model.slot, model.version);
        self.put(MODELS, [(key, model)])
    }

    /// Every channel.
    pub fn load_channels(&self) -> Result<Vec<Channel>, DbError> {
        self.rows(CHANNELS, "channels")
    }

    /// Stores channels in one transaction (durable when this returns).
    pub fn save_channels(&self, channels: &[Channel]) -> Result<(), DbError> {
        if channels.is_empty() {
            return Ok(());
        }
        self.put(
            CHANNELS,
            channels.iter().map(|c| (c.name.as_str().to_owned(), c)),
        )
    }

    /// Removes a channel (durable when this returns).
    pub fn delete_channel(&self, name: &str) -> Result<(), DbError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| storage("begin")(e.into()))?;
        txn.open_table(CHANNELS)
            .map_err(|e| storage("open")(e.into()))?
            .remove(name)
            .map_err(|e| storage("write")(e.into()))?;
        txn.commit().map_err(|e| storage("commit")(e.into()))
    }

    /// Every device.
    pub fn load_devices(&self) -> Result<Vec<DeviceView>, DbError> {
        self.rows(DEVICES, "devices")
    }

    /// Stores devices in one transaction (durable when this returns).
    pub fn save_devices(&self, devices: &[DeviceView]) -> Result<(), DbError> {
        if devices.is_empty() {
            return Ok(());
        }
        self.put(
            DEVICES,
            devices.iter().map(|d| (d.device_id.as_str().to_owned(), d)),
        )
    }
}

impl Db {
    /// Records a stored sample (durable when this returns); `false` when a sample of that
    /// digest was recorded already (the first record stays).
    pub fn insert_sample(&self, record: &SampleRecord) -> Result<bool, DbError> {
        let sha = record.sha256.to_hex();
        let at = record.captured_at.as_nanosecond();
        let bytes = serde_json::to_vec(record).map_err(DbError::Encode)?;
        let txn = self
            .db
            .begin_write()
            .map_err(|e| storage("begin")(e.into()))?;
        {
            let mut digests = txn
                .open_table(SAMPLE_DIGESTS)
                .map_err(|e| storage("open")(e.into()))?;
            let known = digests
                .get(sha.as_str())
                .map_err(|e| storage("read")(e.into()))?
                .is_some();
            if known {
                return Ok(false);
            }
            digests
                .insert(sha.as_str(), at)
                .map_err(|e| storage("write")(e.into()))?;
            txn.open_table(SAMPLES)
                .map_err(|e| storage("open")(e.into()))?
                .insert((at, sha.as_str()), bytes.as_slice())
                .map_err(|e| storage("write")(e.into()))?;
        }
        txn.commit().map_err(|e| storage("commit")(e.into()))?;
        Ok(true)
    }

    /// The record of the sample with digest `sha256`.
    pub fn sample(&self, sha256: &Sha256Digest) -> Result<Option<SampleRecord>, DbError> {
        let sha = sha256.to_hex();
        let txn = self
            .db
            .begin_read()
            .map_err(|e| storage("begin")(e.into()))?;
        let at = txn
            .open_table(SAMPLE_DIGESTS)
            .map_err(|e| storage("open")(e.into()))?
            .get(sha.as_str())
            .map_err(|e| storage("read")(e.into()))?
            .map(|v| v.value());
        let Some(at) = at else {
            return Ok(None);
        };
        let table = txn
            .open_table(SAMPLES)
            .map_err(|e| storage("open")(e.into()))?;
        let row = table
            .get((at, sha.as_str()))
            .map_err(|e| storage("read")(e.into()))?;
        row.map(|value| decode_sample(at, &sha, value.value()))
            .transpose()
    }

    /// Visits sample records captured in `[since, until)`, oldest or newest first, until
    /// `visit` says stop.
    pub fn scan_samples(
        &self,
        since: Option<Timestamp>,
        until: Option<Timestamp>,
        newest_first: bool,
        mut visit: impl FnMut(SampleRecord) -> ControlFlow<()>,
    ) -> Result<(), DbError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| storage("begin")(e.into()))?;
        let table = txn
            .open_table(SAMPLES)
            .map_err(|e| storage("open")(e.into()))?;
        // "" sorts before every digest: (t, "") is the first key at time t.
        let low = since.map_or(Bound::Unbounded, |t| {
            Bound::Included((t.as_nanosecond(), ""))
        });
        let high = until.map_or(Bound::Unbounded, |t| {
            Bound::Excluded((t.as_nanosecond(), ""))
        });
        let range = table
            .range::<(i128, &str)>((low, high))
            .map_err(|e| storage("read")(e.into()))?;
        let mut step = |row: Result<_, redb::StorageError>| -> Result<ControlFlow<()>, DbError> {
            let (key, value): (
                redb::AccessGuard<'_, (i128, &str)>,
                redb::AccessGuard<'_, &[u8]>,
            ) = row.map_err(|e| storage("read")(e.into()))?;
            let (at, sha) = key.value();
            Ok(visit(decode_sample(at, sha, value.value())?))
        };
        if newest_first {
            for row in range.rev() {
                if step(row)?.is_break() {
                    break;
                }
            }
        } else {
            for row in range {
                if step(row)?.is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Stores a data set's record (durable when this returns).
    pub fn save_dataset(&self, dataset: &Dataset) -> Result<(), DbError> {
        self.put(DATASETS, [(dataset.id.clone(), dataset)])
    }

    /// Every data set's record.
    pub fn load_datasets(&self) -> Result<Vec<Dataset>, DbError> {
        self.rows(DATASETS, "datasets")
    }

    /// One data set's record.
    pub fn dataset(&self, id: &str) -> Result<Option<Dataset>, DbError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| storage("begin")(e.into()))?;
        let table = txn
            .open_table(DATASETS)
            .map_err(|e| storage("open")(e.into()))?;
        let row = table.get(id).map_err(|e| storage("read")(e.into()))?;
        row.map(|value| {
            serde_json::from_slice(value.value()).map_err(|source| DbError::Decode {
                table: "datasets",
                key: id.to_owned(),
                source,
            })
        })
        .transpose()
    }
}

fn decode_sample(at: i128, sha: &str, bytes: &[u8]) -> Result<SampleRecord, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode {
        table: "samples",
        key: format!("{at}/{sha}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use botfleet_protocol::manifest::Sha256Digest;
    use botfleet_protocol::{DeviceId, RolloutId, SlotName};

    use super::*;
    use crate::rollouts::{CreatedRollout, RolloutModel, RolloutRequest, Strategy};

    #[test]
    fn rollouts_and_keys_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("botfleet.redb");
        let device = DeviceId::new("robot-1").unwrap();
        let model = RolloutModel {
            slot: SlotName::new("faces").unwrap(),
            version: "1.0.0".into(),
            release: 1,
            sha256: Sha256Digest::of(b"m"),
        };
        let id = RolloutId::new("r-1").unwrap();
        let mut rollout = Rollout::new(
            id.clone(),
            model,
            jiff::Timestamp::UNIX_EPOCH,
            Strategy::default(),
            std::slice::from_ref(&device),
        );
        rollout.step(jiff::Timestamp::UNIX_EPOCH, |_| {
            crate::rollouts::Presence::Online
        });
        let remembered = Remembered {
            request: RolloutRequest {
                slot: SlotName::new("faces").unwrap(),
                version: "1.0.0".into(),
                devices: Some(vec![device.clone()]),
                selector: None,
                channel: None,
                strategy: None,
                supersede: false,
            },
            response: CreatedRollout {
                rollout_id: id.clone(),
                devices: vec![device.clone()],
            },
        };
        {
            let db = Db::open(&path).unwrap();
            db.save(
                &[RolloutRow::whole(&rollout).unwrap()],
                &[("run-1".into(), remembered)],
            )
            .unwrap();
        }
        let loaded = Db::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        let back = &loaded.rollouts[0];
        assert_eq!(back.id, id);
        assert!(back.devices[&device].commanded_at.is_some());
        assert_eq!(loaded.keys.len(), 1);
        assert_eq!(loaded.keys[0].0.as_str(), "run-1");
    }

    #[test]
    fn a_rollout_row_holding_its_devices_is_split_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("botfleet.redb");
        let devices = [
            DeviceId::new("robot-1").unwrap(),
            DeviceId::new("robot-2").unwrap(),
        ];
        let model = RolloutModel {
            slot: SlotName::new("faces").unwrap(),
            version: "1.0.0".into(),
            release: 1,
            sha256: Sha256Digest::of(b"m"),
        };
        let mut rollout = Rollout::new(
            RolloutId::new("r-old").unwrap(),
            model,
            jiff::Timestamp::UNIX_EPOCH,
            Strategy::default(),
            &devices,
        );
        rollout.step(jiff::Timestamp::UNIX_EPOCH, |_| {
            crate::rollouts::Presence::Online
        });
        {
            // The row a server before per-device rows wrote: the devices inside.
            let mut old = serde_json::to_value(&rollout).unwrap();
            old["devices"] = serde_json::to_value(&rollout.devices).unwrap();
            let db = Db::open(&path).unwrap();
            let txn = db.db.begin_write().unwrap();
            txn.open_table(ROLLOUTS)
                .unwrap()
                .insert("r-old", serde_json::to_vec(&old).unwrap().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let db = Db::open(&path).unwrap();
        let loaded = db.load().unwrap();
        assert_eq!(loaded.rollouts[0].devices, rollout.devices);
        let txn = db.db.begin_read().unwrap();
        let head = txn
            .open_table(ROLLOUTS)
            .unwrap()
            .get("r-old")
            .unwrap()
            .unwrap();
        let head: serde_json::Value = serde_json::from_slice(head.value()).unwrap();
        assert!(
            head.get("devices").is_none(),
            "the row was rewritten without them"
        );
        let rows = redb::ReadableTableMetadata::len(&txn.open_table(ROLLOUT_DEVICES).unwrap());
        assert_eq!(rows.unwrap(), 2);
        drop((txn, db));
        let again = Db::open(&path).unwrap().load().unwrap();
        assert_eq!(
            again.rollouts[0].devices, rollout.devices,
            "read from their rows"
        );
    }

    #[test]
    fn samples_are_recorded_once_and_scanned_by_time_either_way() {
        use crate::data::record::tests::record;
        use botfleet_protocol::sample::CaptureRule;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("botfleet.redb")).unwrap();
        let a = record("robot-1", CaptureRule::Sampled, "2026-01-01T10:00:00Z");
        let b = record("robot-2", CaptureRule::Sampled, "2026-01-01T11:00:00Z");
        let c = record("robot-1", CaptureRule::OnDemand, "2026-01-01T12:00:00Z");
        for r in [&b, &a, &c] {
            assert!(db.insert_sample(r).unwrap());
        }
        let mut again = a.clone();
        again.received_at = Timestamp::now();
        assert!(!db.insert_sample(&again).unwrap(), "recorded once");
        assert_eq!(db.sample(&a.sha256).unwrap().unwrap(), a);
        assert!(db.sample(&Sha256Digest::of(b"none")).unwrap().is_none());
        let scan = |since: Option<&str>, until: Option<&str>, newest: bool, limit: usize| {
            let mut seen = Vec::new();
            db.scan_samples(
                since.map(|s| s.parse().unwrap()),
                until.map(|s| s.parse().unwrap()),
                newest,
                |r| {
                    seen.push(r.sha256);
                    if seen.len() == limit {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .unwrap();
            seen
        };
        assert_eq!(scan(None, None, false, 9), [a.sha256, b.sha256, c.sha256]);
        assert_eq!(scan(None, None, true, 2), [c.sha256, b.sha256]);
        assert_eq!(
            scan(
                Some("2026-01-01T11:00:00Z"),
                Some("2026-01-01T12:00:00Z"),
                false,
                9
            ),
            [b.sha256]
        );
    }

    #[test]
    fn a_database_without_the_model_and_device_tables_opens_and_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("botfleet.redb");
        {
            // What a server before models and devices moved here left behind.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ROLLOUTS).unwrap();
            txn.open_table(IDEMPOTENCY).unwrap();
            txn.commit().unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert!(db.load().unwrap().rollouts.is_empty());
        assert!(db.load_models().unwrap().is_empty());
        assert!(db.load_devices().unwrap().is_empty());
    }
}
