//! A bounded in-memory history of each device's telemetry, for the dashboard's plots.
//!
//! Bounded three ways: points older than [`WINDOW`] are dropped, each device keeps at most
//! [`MAX_POINTS`] (an hour at a 5 s interval), and at most [`MAX_DEVICES`] devices are kept
//! (the one heard from least recently goes first). A point is the few figures the plots
//! show, not the whole telemetry message. Pure: the caller passes the time.

use std::collections::{BTreeMap, VecDeque};

use botfleet_protocol::messages::Telemetry;
use botfleet_protocol::{DeviceId, SlotName};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

/// How far back the history goes.
pub const WINDOW: SignedDuration = SignedDuration::from_secs(3600);
/// Points kept per device.
pub const MAX_POINTS: usize = 720;
/// Devices kept.
pub const MAX_DEVICES: usize = 1000;
/// Temperature sensors kept per point (the first by name).
const MAX_SENSORS: usize = 8;
/// Slots kept per point (the first by name).
const MAX_SLOTS: usize = 8;

/// Inference figures of one slot over one telemetry interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotPoint {
    pub requests: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// One telemetry sample, as plotted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Server time the sample arrived: one clock for every device, never going back.
    pub at: Timestamp,
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub temperatures_c: BTreeMap<String, f32>,
    /// The busiest GPU's load; absent when the device measures none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_load_percent: Option<f32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub inference: BTreeMap<SlotName, SlotPoint>,
}

impl Point {
    fn new(telemetry: &Telemetry, at: Timestamp) -> Self {
        Self {
            at,
            cpu_percent: telemetry.cpu_percent,
            memory_used_bytes: telemetry.memory_used_bytes,
            memory_total_bytes: telemetry.memory_total_bytes,
            temperatures_c: telemetry
                .temperatures_c
                .iter()
                .take(MAX_SENSORS)
                .map(|(name, c)| (name.clone(), *c))
                .collect(),
            gpu_load_percent: telemetry
                .gpus
                .iter()
                .filter_map(|g| g.load_percent)
                .reduce(f32::max),
            inference: telemetry
                .inference
                .iter()
                .take(MAX_SLOTS)
                .map(|(slot, s)| {
                    let point = SlotPoint {
                        requests: s.requests,
                        p50_ms: s.p50_ms,
                        p99_ms: s.p99_ms,
                    };
                    (slot.clone(), point)
                })
                .collect(),
        }
    }
}

/// Every device's recent points.
#[derive(Debug, Default)]
pub struct History {
    by_device: BTreeMap<DeviceId, VecDeque<Point>>,
}

impl History {
    /// Adds one sample that arrived at `now`.
    pub fn record(&mut self, device: &DeviceId, telemetry: &Telemetry, now: Timestamp) {
        if !self.by_device.contains_key(device) && self.by_device.len() >= MAX_DEVICES {
            self.evict_stalest();
        }
        let points = self.by_device.entry(device.clone()).or_default();
        // The wall clock may step back; the series stays ordered.
        let at = points.back().map_or(now, |last| now.max(last.at));
        points.push_back(Point::new(telemetry, at));
        let oldest = at.checked_sub(WINDOW).unwrap_or(Timestamp::MIN);
        while points.len() > MAX_POINTS || points.front().is_some_and(|p| p.at < oldest) {
            points.pop_front();
        }
    }

    /// The points of `device` after `since` (all kept when `None`), oldest first.
    pub fn since(&self, device: &DeviceId, since: Option<Timestamp>) -> Option<Vec<Point>> {
        let points = self.by_device.get(device)?;
        Some(
            points
                .iter()
                .filter(|p| since.is_none_or(|s| p.at > s))
                .cloned()
                .collect(),
        )
    }

    fn evict_stalest(&mut self) {
        let stalest = self
            .by_device
            .iter()
            .min_by_key(|(_, points)| points.back().map(|p| p.at))
            .map(|(id, _)| id.clone());
        if let Some(id) = stalest {
            self.by_device.remove(&id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn telemetry(cpu: f32) -> Telemetry {
        serde_json::from_value(serde_json::json!({
            "at": "2026-01-01T00:00:00Z", "uptime_s": 1, "cpu_percent": cpu,
            "memory_used_bytes": 1, "memory_total_bytes": 2,
        }))
        .unwrap()
    }

    fn device(n: usize) -> DeviceId {
        DeviceId::new(format!("robot-{n}")).unwrap()
    }

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn points_stay_ordered_and_within_the_cap() {
        let mut h = History::default();
        for i in 0..(MAX_POINTS + 10) {
            let at = t0() + SignedDuration::from_secs(i as i64);
            h.record(&device(1), &telemetry(i as f32), at);
        }
        let points = h.since(&device(1), None).unwrap();
        assert_eq!(points.len(), MAX_POINTS);
        assert!(points.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(points[0].cpu_percent, 10.0);
    }

    #[test]
    fn points_older_than_the_window_are_dropped_and_since_filters() {
        let mut h = History::default();
        h.record(&device(1), &telemetry(1.0), t0());
        h.record(
            &device(1),
            &telemetry(2.0),
            t0() + SignedDuration::from_secs(10),
        );
        h.record(
            &device(1),
            &telemetry(3.0),
            t0() + WINDOW + SignedDuration::from_secs(5),
        );
        let all = h.since(&device(1), None).unwrap();
        assert_eq!(all.len(), 2);
        let after = h.since(&device(1), Some(all[0].at)).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].cpu_percent, 3.0);
    }

    #[test]
    fn a_clock_stepping_back_keeps_the_series_ordered() {
        let mut h = History::default();
        h.record(&device(1), &telemetry(1.0), t0());
        h.record(
            &device(1),
            &telemetry(2.0),
            t0() - SignedDuration::from_secs(30),
        );
        let points = h.since(&device(1), None).unwrap();
        assert_eq!(points[1].at, t0());
    }

    #[test]
    fn the_device_heard_from_least_recently_is_evicted_first() {
        let mut h = History::default();
        for n in 0..MAX_DEVICES {
            h.record(
                &device(n),
                &telemetry(0.0),
                t0() + SignedDuration::from_secs(n as i64),
            );
        }
        h.record(
            &device(0),
            &telemetry(0.0),
            t0() + SignedDuration::from_secs(10_000),
        );
        h.record(
            &device(MAX_DEVICES),
            &telemetry(0.0),
            t0() + SignedDuration::from_secs(10_001),
        );
        assert_eq!(h.by_device.len(), MAX_DEVICES);
        assert!(h.since(&device(0), None).is_some());
        assert!(h.since(&device(1), None).is_none());
    }
}
