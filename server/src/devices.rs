//! What the server knows about each device, folded from its status, info and telemetry.
//!
//! Pure: no I/O, the caller passes the time a message arrived.

use std::collections::BTreeMap;

use botfleet_protocol::DeviceId;
use botfleet_protocol::messages::{Info, Status, Telemetry};
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
    /// Server time of the last message from this device.
    pub last_seen: Option<Timestamp>,
}

impl DeviceView {
    fn new(device_id: DeviceId) -> Self {
        Self {
            device_id,
            online: false,
            status: None,
            info: None,
            telemetry: None,
            last_seen: None,
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
        self.entry(id, now).info = Some(info);
    }

    pub fn apply_telemetry(&mut self, id: &DeviceId, telemetry: Telemetry, now: Timestamp) {
        self.entry(id, now).telemetry = Some(telemetry);
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
