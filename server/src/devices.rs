//! What the server knows about each device, folded from its status, info and telemetry.
//!
//! Pure: no I/O, the caller passes the time a message arrived. A device speaks only for
//! itself: an info or telemetry document naming another device is dropped, and so is
//! telemetry of a schema newer than this server knows (logged once per device).

use std::collections::BTreeMap;

use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::{Info, Status, TELEMETRY_SCHEMA, Telemetry};
use jiff::Timestamp;
use serde::Serialize;

/// One device as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
            unknown_schema_logged: None,
        }
    }
}

/// Every device heard of.
#[derive(Debug, Default)]
pub struct Devices {
    by_id: BTreeMap<DeviceId, DeviceView>,
}

impl Devices {
    fn entry(&mut self, id: &DeviceId, now: Timestamp) -> &mut DeviceView {
        let view = self
            .by_id
            .entry(id.clone())
            .or_insert_with(|| DeviceView::new(id.clone()));
        view.last_seen = Some(now);
        view
    }

    /// The status as delivered last. Not ordered by its `at`: a last will carries the time
    /// the agent connected, older than the statuses it published since, yet it is newer news.
    pub fn apply_status(&mut self, id: &DeviceId, status: Status, now: Timestamp) {
        let view = self.entry(id, now);
        view.online = status.online;
        view.status = Some(status);
    }

    pub fn apply_info(&mut self, id: &DeviceId, info: Info, now: Timestamp) {
        if let Some(claimed) = info.device.as_ref().filter(|d| *d != id) {
            tracing::warn!(device = %id, %claimed, "info names another device; dropped");
            return;
        }
        self.entry(id, now).info = Some(info);
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

    /// Devices and their labels (from the retained info), for selectors.
    pub fn labels(&self) -> impl Iterator<Item = (&DeviceId, Option<&BTreeMap<String, String>>)> {
        self.by_id
            .iter()
            .map(|(id, view)| (id, view.info.as_ref().map(|i| &i.labels)))
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
}
