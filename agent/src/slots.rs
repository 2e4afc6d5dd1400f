//! The models serving each slot. A swap replaces an `Arc` atomically: requests that
//! already hold the old model finish on it, new requests get the new one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use arc_swap::ArcSwapOption;
use botfleet_engine::Model;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{ActiveModel, SlotStats};
use botfleet_protocol::{Manifest, SlotName, Verified};
use jiff::Timestamp;

/// Latency samples kept per slot and telemetry interval.
const MAX_SAMPLES: usize = 16_384;

/// A model that serves (or served) a slot.
#[derive(Debug)]
pub struct ServingModel {
    pub model: Model,
    pub manifest: Verified<Manifest>,
    pub since: Timestamp,
    /// What this model did since it began serving, for the post-swap health window.
    health: Mutex<Window>,
}

/// A serving model's record since its swap.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub requests: u64,
    pub errors: u64,
    pub p99_ms: Option<f64>,
}

impl ServingModel {
    pub fn new(model: Model, manifest: Verified<Manifest>, since: Timestamp) -> Self {
        Self {
            model,
            manifest,
            since,
            health: Mutex::default(),
        }
    }

    /// Requests, errors and p99 since this model began serving.
    pub fn health(&self) -> Health {
        let w = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lat = w.latencies_ms.clone();
        lat.sort_by(f64::total_cmp);
        Health {
            requests: w.requests,
            errors: w.errors,
            p99_ms: percentile(&lat, 99.0),
        }
    }

    pub fn sha256(&self) -> Sha256Digest {
        self.manifest.artifact.sha256
    }

    pub fn active(&self) -> ActiveModel {
        ActiveModel {
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            release: self.manifest.release,
            sha256: self.sha256(),
            since: self.since,
            engine: Some(self.model.engine()),
        }
    }
}

#[derive(Debug, Default)]
struct Window {
    requests: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
}

impl Window {
    fn add(&mut self, latency_ms: Option<f64>) {
        self.requests += 1;
        match latency_ms {
            Some(ms) if self.latencies_ms.len() < MAX_SAMPLES => self.latencies_ms.push(ms),
            Some(_) => {}
            None => self.errors += 1,
        }
    }
}

/// Nearest-rank percentile of sorted values; `None` without values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| botfleet_engine::percentile(sorted, p))
}

/// One slot: its current model and its counters.
#[derive(Debug, Default)]
pub struct Slot {
    current: ArcSwapOption<ServingModel>,
    window: Mutex<Window>,
    /// Where sampled requests are copied while a candidate is shadowed.
    shadow: ArcSwapOption<crate::shadow::Tap>,
}

impl Slot {
    pub fn current(&self) -> Option<Arc<ServingModel>> {
        self.current.load_full()
    }

    /// The shadow tap, while a candidate is shadowed on this slot.
    pub fn tap(&self) -> Option<Arc<crate::shadow::Tap>> {
        self.shadow.load_full()
    }

    /// Counts one request answered by `model` (`None`: it failed).
    pub fn record(&self, model: &ServingModel, latency_ms: Option<f64>) {
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(latency_ms);
        model
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(latency_ms);
    }

    fn drain(&self) -> SlotStats {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        let mut lat = w.latencies_ms;
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| percentile(&lat, p);
        SlotStats {
            requests: w.requests,
            errors: w.errors,
            p50_ms: pct(50.0),
            p99_ms: pct(99.0),
            // Filled in by the telemetry sampler, which sees the serving models.
            active_version: None,
            swaps: None,
        }
    }
}

/// All slots of this robot.
#[derive(Debug, Default)]
pub struct Slots {
    slots: RwLock<BTreeMap<SlotName, Arc<Slot>>>,
}

impl Slots {
    /// The slot called `name`, if it ever had a model.
    pub fn get(&self, name: &str) -> Option<Arc<Slot>> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| Arc::clone(v))
    }

    pub fn current(&self, slot: &SlotName) -> Option<Arc<ServingModel>> {
        self.get(slot.as_str()).and_then(|s| s.current())
    }

    /// Makes `model` serve `slot`; returns the model it replaced.
    pub fn swap(&self, slot: &SlotName, model: Arc<ServingModel>) -> Option<Arc<ServingModel>> {
        let entry = {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(slots.entry(slot.clone()).or_default())
        };
        entry.current.swap(Some(model))
    }

    /// Starts (`Some`) or ends (`None`) copying `slot`'s requests to a shadow.
    pub fn set_shadow(&self, slot: &SlotName, tap: Option<Arc<crate::shadow::Tap>>) {
        let entry = {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(slots.entry(slot.clone()).or_default())
        };
        entry.shadow.store(tap);
    }

    /// The model serving each slot now.
    pub fn active(&self) -> BTreeMap<SlotName, ActiveModel> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .filter_map(|(name, slot)| slot.current().map(|m| (name.clone(), m.active())))
            .collect()
    }

    /// Counters since the last call, per slot.
    pub fn drain_stats(&self) -> BTreeMap<SlotName, SlotStats> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .map(|(name, slot)| (name.clone(), slot.drain()))
            .collect()
    }
}
