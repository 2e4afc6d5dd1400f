//! What the server knows about each device, folded from its status, info and telemetry.
//!
//! Pure: no I/O, the caller passes the time a message arrived. A device speaks only for
//! itself: an info or telemetry document naming another device is dropped, and so is
//! telemetry of a schema newer than this server knows (logged once per device).
//!
//! Labels come from two places: the device reports some in its retained `info`, and an
//! operator sets others on the server (`crate::labels`); selectors see both, the operator's
//! winning on a conflict. Every change marks the device dirty, so the caller can write the
//! changed devices to the database (`crate::db`) in one batch.

use std::collections::{BTreeMap, BTreeSet};

use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::{Info, Status, TELEMETRY_SCHEMA, Telemetry};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::labels::{self, LabelError, LabelPatch};

/// One device as the API shows it (and as the database keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device_id: DeviceId,
    /// From the last retained status (the last will sets it false); false before any status.
    pub online: bool,
    pub status: Option<Status>,
    pub info: Option<Info>,
    /// The last telemetry message.
    pub telemetry: Option<Telemetry>,
    /// Server time the last telemetry message arrived.
    pub telemetry_received: Option<Timestamp>,
    /// Server time of the last message from this device.
    pub last_seen: Option<Timestamp>,
    /// The labels of the device's last `info`.
    #[serde(default)]
    pub reported_labels: BTreeMap<String, String>,
    /// The labels an operator set on the server.
    #[serde(default)]
    pub operator_labels: BTreeMap<String, String>,
    /// What selectors match: the reported labels, overridden by the operator's.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The unknown telemetry schema already logged for this device.
    #[serde(skip)]
    unknown_schema_logged: Option<u32>,
}

impl DeviceView {
    fn new(device_id: DeviceId) -> Self {
        Self {
            device_id,
            online: false,
            status: None,
            info: None,
            telemetry: None,
            telemetry_received: None,
            last_seen: None,
            reported_labels: BTreeMap::new(),
            operator_labels: BTreeMap::new(),
            labels: BTreeMap::new(),
            unknown_schema_logged: None,
        }
    }

    fn relabel(&mut self) {
        self.reported_labels = self
            .info
            .as_ref()
            .map(|i| i.labels.clone())
            .unwrap_or_default();
        self.labels = labels::effective(&self.reported_labels, &self.operator_labels);
    }
}

/// Why an operator's label change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelChangeError {
    #[error("no device {0} has reported")]
    UnknownDevice(DeviceId),
    #[error(transparent)]
    Invalid(#[from] LabelError),
}

/// How an operator changes a device's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    /// The whole operator set becomes this.
    Replace(BTreeMap<String, String>),
    /// Keys set and removed; the others stay.
    Patch(LabelPatch),
}

/// Every device heard of.
#[derive(Debug, Default)]
pub struct Devices {
    by_id: BTreeMap<DeviceId, DeviceView>,
    /// Changed since the last [`Devices::take_dirty`].
    dirty: BTreeSet<DeviceId>,
}

impl Devices {
    /// The devices the database held.
    pub fn restore(stored: Vec<DeviceView>) -> Self {
        let by_id = stored
            .into_iter()
            .map(|mut view| {
                view.relabel();
                (view.device_id.clone(), view)
            })
            .collect();
        Self {
            by_id,
            dirty: BTreeSet::new(),
        }
    }

    fn entry(&mut self, id: &DeviceId, now: Timestamp) -> &mut DeviceView {
        self.dirty.insert(id.clone());
        let view = self
            .by_id
            .entry(id.clone())
            .or_insert_with(|| DeviceView::new(id.clone()));
        view.last_seen = Some(now);
        view
    }

    /// The devices changed since the last call, to be written to the database.
    pub fn take_dirty(&mut self) -> Vec<DeviceView> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .iter()
            .filter_map(|id| self.by_id.get(id).cloned())
            .collect()
    }

    /// Marks devices dirty again (their write failed).
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = DeviceId>) {
        self.dirty.extend(ids);
    }

    /// Whether anything waits to be written.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Changes the operator labels of a device that has reported.
    pub fn change_labels(
        &mut self,
        id: &DeviceId,
        change: LabelChange,
    ) -> Result<DeviceView, LabelChangeError> {
        let view = self
            .by_id
            .get_mut(id)
            .ok_or_else(|| LabelChangeError::UnknownDevice(id.clone()))?;
        view.operator_labels = match change {
            LabelChange::Replace(labels) => {
                labels::validate(&labels)?;
                labels
            }
            LabelChange::Patch(patch) => {
                patch.validate()?;
                patch.apply(&view.operator_labels)
            }
        };
        view.relabel();
        let view = view.clone();
        self.dirty.insert(id.clone());
        Ok(view)
    }

    /// The status as delivered last. Not ordered by its `at`: a last will carries the time
    /// the agent connected, older than the statuses it published since, yet it is newer news.
    /// `true` when the device came online (it was offline or unknown).
    pub fn apply_status(&mut self, id: &DeviceId, status: Status, now: Timestamp) -> bool {
        let view = self.entry(id, now);
        let returned = status.online && !view.online;
        view.online = status.online;
        view.status = Some(status);
        returned
    }

    pub fn apply_info(&mut self, id: &DeviceId, info: Info, now: Timestamp) {
        if let Some(claimed) = info.device.as_ref().filter(|d| *d != id) {
            tracing::warn!(device = %id, %claimed, "info names another device; dropped");
            return;
        }
        let view = self.entry(id, now);
        view.info = Some(info);
        view.relabel();
    }

    pub fn apply_telemetry(&mut self, id: &DeviceId, telemetry: Telemetry, now: Timestamp) {
        if let Some(claimed) = telemetry.device.as_ref().filter(|d| *d != id) {
            tracing::warn!(device = %id, %claimed, "telemetry names another device; dropped");
            return;
        }
        let view = self.entry(id, now);
        if telemetry.schema > TELEMETRY_SCHEMA {
            if view.unknown_schema_logged != Some(telemetry.schema) {
                view.unknown_schema_logged = Some(telemetry.schema);
                tracing::warn!(
                    device = %id,
                    schema = telemetry.schema,
                    known = TELEMETRY_SCHEMA,
                    "telemetry of an unknown schema version ignored; upgrade the server"
                );
            }
            return;
        }
        view.telemetry = Some(telemetry);
        view.telemetry_received = Some(now);
    }

    /// Any other message from the device (rollout events) only proves it is alive.
    pub fn touch(&mut self, id: &DeviceId, now: Timestamp) {
        self.entry(id, now);
    }

    pub fn list(&self) -> Vec<DeviceView> {
        self.by_id.values().cloned().collect()
    }

    pub fn get(&self, id: &DeviceId) -> Option<DeviceView> {
        self.by_id.get(id).cloned()
    }

    /// Devices and their effective labels, for selectors; `None` for a device that has
    /// neither reported an info nor been labelled by an operator.
    pub fn labels(&self) -> impl Iterator<Item = (&DeviceId, Option<&BTreeMap<String, String>>)> {
        self.by_id.iter().map(|(id, view)| {
            let known = view.info.is_some() || !view.operator_labels.is_empty();
            (id, known.then_some(&view.labels))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(online: bool, at: i64) -> Status {
        Status {
            online,
            agent_version: "0.1.0".into(),
            active: BTreeMap::new(),
            desired_generation: None,
            at: Timestamp::from_second(at).unwrap(),
            k3s: None,
        }
    }

    #[test]
    fn the_last_delivered_status_wins_even_an_older_last_will() {
        let id = DeviceId::new("robot-1").unwrap();
        let now = Timestamp::from_second(1_000).unwrap();
        let mut devices = Devices::default();
        devices.apply_status(&id, status(true, 500), now);
        assert!(devices.get(&id).unwrap().online);
        // The will was registered at connect time (100), long before the last status.
        devices.apply_status(&id, status(false, 100), now);
        let view = devices.get(&id).unwrap();
        assert!(!view.online);
        assert_eq!(view.last_seen, Some(now));
    }

    fn telemetry(json: &str) -> Telemetry {
        serde_json::from_str(json).unwrap()
    }

    const T: &str = r#"{"at":"2026-01-01T00:00:00Z","uptime_s":1,"cpu_percent":5.0,"memory_used_bytes":1,"memory_total_bytes":2"#;

    #[test]
    fn telemetry_naming_another_device_or_an_unknown_schema_is_ignored() {
        let id = DeviceId::new("robot-1").unwrap();
        let now = Timestamp::from_second(1_000).unwrap();
        let mut devices = Devices::default();
        devices.apply_telemetry(&id, telemetry(&format!(r#"{T},"device":"robot-2"}}"#)), now);
        assert!(
            devices.get(&id).is_none(),
            "a claim for another device is no sign of life"
        );
        devices.apply_telemetry(&id, telemetry(&format!(r#"{T},"schema":99}}"#)), now);
        devices.apply_telemetry(&id, telemetry(&format!(r#"{T},"schema":99}}"#)), now);
        let view = devices.get(&id).unwrap();
        assert!(view.telemetry.is_none() && view.telemetry_received.is_none());
        assert_eq!(view.unknown_schema_logged, Some(99));
        // Old agents send no schema and no device: version 1, taken from the topic.
        devices.apply_telemetry(&id, telemetry(&format!("{T}}}")), now);
        let view = devices.get(&id).unwrap();
        assert_eq!(view.telemetry.unwrap().schema, 1);
        assert_eq!(view.telemetry_received, Some(now));
    }

    #[test]
    fn a_device_seen_only_through_events_is_listed_offline() {
        let id = DeviceId::new("robot-2").unwrap();
        let mut devices = Devices::default();
        devices.touch(&id, Timestamp::UNIX_EPOCH);
        let list = devices.list();
        assert_eq!(list.len(), 1);
        assert!(!list[0].online && list[0].status.is_none());
    }

    fn info(labels: &[(&str, &str)]) -> Info {
        let mut info: Info = serde_json::from_str(
            r#"{"agent_version":"0.1.0","hostname":"h","arch":"x86_64","cpu_cores":2,"memory_total_bytes":1}"#,
        )
        .unwrap();
        info.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        info
    }

    #[test]
    fn operator_labels_override_reported_ones_and_survive_a_new_info() {
        let id = DeviceId::new("robot-1").unwrap();
        let mut devices = Devices::default();
        let unknown = devices.change_labels(&id, LabelChange::Replace(BTreeMap::new()));
        assert!(matches!(unknown, Err(LabelChangeError::UnknownDevice(_))));
        devices.apply_info(
            &id,
            info(&[("ring", "stable"), ("site", "lab")]),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(devices.take_dirty().len(), 1);
        assert!(devices.take_dirty().is_empty());
        let patch = LabelPatch::parse_args(&["ring=canary"]).unwrap();
        let view = devices
            .change_labels(&id, LabelChange::Patch(patch))
            .unwrap();
        assert_eq!(view.labels["ring"], "canary");
        assert_eq!(view.reported_labels["ring"], "stable");
        assert!(devices.is_dirty());
        // The robot reports again: the operator's label still wins.
        devices.apply_info(&id, info(&[("ring", "beta")]), Timestamp::UNIX_EPOCH);
        let view = devices.get(&id).unwrap();
        assert_eq!(view.labels["ring"], "canary");
        assert!(!view.labels.contains_key("site"));
        let bad = BTreeMap::from([("Ring".to_owned(), "x".to_owned())]);
        assert!(matches!(
            devices.change_labels(&id, LabelChange::Replace(bad)),
            Err(LabelChangeError::Invalid(_))
        ));
        let restored = Devices::restore(devices.list());
        assert_eq!(restored.get(&id), devices.get(&id));
    }
}
