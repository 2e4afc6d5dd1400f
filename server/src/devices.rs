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

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{
    ActiveModel, BenchReport, Event, Info, Stage, Status, TELEMETRY_SCHEMA, Telemetry,
};
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
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
    /// The engine serving each slot, from the last status (an agent that names none has
    /// only tract).
    #[serde(default)]
    pub serving_engines: BTreeMap<SlotName, EngineKind>,
    /// The device's latest benchmark per slot, with the figures of every engine it measured.
    /// Boxed, so that a device's one-entry map is a small B-tree node, not eleven reports.
    #[serde(default)]
    pub benchmarks: BTreeMap<SlotName, Box<DeviceBench>>,
    /// The unknown telemetry schema already logged for this device.
    #[serde(skip)]
    unknown_schema_logged: Option<u32>,
}

/// A device's benchmark of one model, from its `benchmarked` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceBench {
    /// When the device measured it.
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
    pub sha256: Sha256Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    pub report: BenchReport,
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
            serving_engines: BTreeMap::new(),
            benchmarks: BTreeMap::new(),
            unknown_schema_logged: None,
        }
    }

    fn derive_engines(&mut self) {
        self.serving_engines = self
            .status
            .iter()
            .flat_map(|s| s.active.iter())
            .map(|(slot, m)| (slot.clone(), m.engine.unwrap_or(EngineKind::Tract)))
            .collect();
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
    /// Boxed: a view is over a kilobyte, and a B-tree node holds eleven inline, most of
    /// them empty slots in a fleet of thousands.
    by_id: BTreeMap<DeviceId, Box<DeviceView>>,
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
                view.derive_engines();
                (view.device_id.clone(), Box::new(view))
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
            .or_insert_with(|| Box::new(DeviceView::new(id.clone())));
        view.last_seen = Some(now);
        view
    }

    /// The devices changed since the last call, to be written to the database.
    pub fn take_dirty(&mut self) -> Vec<DeviceView> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .iter()
            .filter_map(|id| self.by_id.get(id).map(|view| (**view).clone()))
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
        let view = (**view).clone();
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
        view.derive_engines();
        returned
    }

    /// A rollout event: proof of life, and a benchmark is kept as the slot's latest unless a
    /// later one is already there. `true` when the device view changed beyond `last_seen`.
    pub fn apply_event(&mut self, id: &DeviceId, event: &Event, now: Timestamp) -> bool {
        let view = self.entry(id, now);
        let Stage::Benchmarked(report) = &event.stage else {
            return false;
        };
        if view
            .benchmarks
            .get(&event.slot)
            .is_some_and(|known| known.at > event.at)
        {
            return false;
        }
        let bench = DeviceBench {
            at: event.at,
            rollout_id: event.rollout_id.clone(),
            sha256: event.sha256,
            release: event.release,
            report: report.clone(),
        };
        view.benchmarks.insert(event.slot.clone(), Box::new(bench));
        true
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

    pub fn list(&self) -> Vec<DeviceView> {
        self.by_id.values().map(|view| (**view).clone()).collect()
    }

    pub fn get(&self, id: &DeviceId) -> Option<DeviceView> {
        self.by_id.get(id).map(|view| (**view).clone())
    }

    /// Devices and their effective labels, for selectors; `None` for a device that has
    /// neither reported an info nor been labelled by an operator.
    pub fn labels(&self) -> impl Iterator<Item = (&DeviceId, Option<&BTreeMap<String, String>>)> {
        self.by_id.iter().map(|(id, view)| (id, known_labels(view)))
    }

    /// The labels selectors see for `id`, once it reported them or an operator set some.
    pub fn labels_of(&self, id: &DeviceId) -> Option<&BTreeMap<String, String>> {
        known_labels(self.by_id.get(id)?)
    }

    /// Whether `id` is online, as its retained status and last will say.
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.by_id.get(id).is_some_and(|v| v.online)
    }

    /// What `id` serves in `slot`, from its last status.
    pub fn active(&self, id: &DeviceId, slot: &SlotName) -> Option<&ActiveModel> {
        self.by_id.get(id)?.status.as_ref()?.active.get(slot)
    }
}

/// A device's effective labels, once it reported its own or an operator set some.
fn known_labels(view: &DeviceView) -> Option<&BTreeMap<String, String>> {
    let known = view.info.is_some() || !view.operator_labels.is_empty();
    known.then_some(&view.labels)
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
            deferred: Default::default(),
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
        let received = event("robot-2", 1, r#""stage":"received""#);
        assert!(!devices.apply_event(&id, &received, Timestamp::UNIX_EPOCH));
        let list = devices.list();
        assert_eq!(list.len(), 1);
        assert!(!list[0].online && list[0].status.is_none());
    }

    fn event(device: &str, at: i64, stage: &str) -> Event {
        serde_json::from_str(&format!(
            r#"{{"device":"{device}","rollout_id":"r-1","slot":"orientation","sha256":"{}",
                "release":3,"at":"{}",{stage}}}"#,
            Sha256Digest::of(b"model").to_hex(),
            Timestamp::from_second(at).unwrap()
        ))
        .unwrap()
    }

    fn benchmarked(engine: &str, p99: f64) -> String {
        format!(
            r#""stage":"benchmarked","runs":20,"p50_ms":1.0,"p99_ms":{p99},"mean_ms":1.0,
            "passed":true,"engine":"{engine}","incumbent_engine":"tract","incumbent_p99_ms":9.0,
            "engines":[{{"engine":"{engine}","load_ms":900,"p50_ms":1.0,"p99_ms":{p99},"passed":true}},
                       {{"engine":"tract","load_ms":100,"p50_ms":8.0,"p99_ms":9.5,"passed":true}}]"#
        )
    }

    #[test]
    fn the_latest_benchmark_per_slot_and_the_serving_engines_are_kept() {
        let id = DeviceId::new("robot-1").unwrap();
        let now = Timestamp::UNIX_EPOCH;
        let mut devices = Devices::default();
        let cuda = event("robot-1", 20, &benchmarked("onnxruntime-cuda", 2.0));
        assert!(devices.apply_event(&id, &cuda, now));
        // A replay of an older benchmark does not replace it.
        let older = event("robot-1", 10, &benchmarked("onnxruntime-cpu", 5.0));
        assert!(!devices.apply_event(&id, &older, now));
        let view = devices.get(&id).unwrap();
        let bench = &view.benchmarks[&SlotName::new("orientation").unwrap()];
        assert_eq!(bench.report.engine, Some(EngineKind::OnnxruntimeCuda));
        assert_eq!(bench.report.engines.len(), 2);
        assert_eq!(bench.report.engines[1].p99_ms, Some(9.5));
        assert_eq!(bench.release, Some(3));

        let mut with_active: Status = serde_json::from_value(serde_json::json!({
            "online": true, "agent_version": "0.2.0", "at": "2026-01-01T00:00:00Z",
            "active": {
                "orientation": {"name": "m", "version": "1", "release": 3,
                    "sha256": Sha256Digest::of(b"model"), "since": "2026-01-01T00:00:00Z",
                    "engine": "onnxruntime-cuda"},
                "faces": {"name": "f", "version": "1", "release": 1,
                    "sha256": Sha256Digest::of(b"faces"), "since": "2026-01-01T00:00:00Z"}
            }
        }))
        .unwrap();
        devices.apply_status(&id, with_active.clone(), now);
        let engines = devices.get(&id).unwrap().serving_engines;
        let engine = |slot: &str| engines.get(&SlotName::new(slot).unwrap()).copied();
        assert_eq!(engine("orientation"), Some(EngineKind::OnnxruntimeCuda));
        assert_eq!(
            engine("faces"),
            Some(EngineKind::Tract),
            "an old agent: tract"
        );
        with_active.active.clear();
        devices.apply_status(&id, with_active, now);
        assert!(devices.get(&id).unwrap().serving_engines.is_empty());
        let restored = Devices::restore(devices.list());
        assert_eq!(restored.get(&id), devices.get(&id));
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
