//! Data capture: copies of live requests the robot's own policy says to keep, spooled on
//! disk and uploaded to the server (docs/data-loop.md, "On the robot").
//!
//! - [`settings`]: `[capture]` and `[upload]`; capture is off unless a slot is named.
//! - [`rules`]: which requests are kept (`sampled`, `low_confidence`, `out_of_range`,
//!   `disagreement`, `on_demand`) and the per-slot rate bound.
//! - The serving path asks [`Capture::plan`] before the run (copy the inputs or not) and
//!   hands the copy over with [`Plan::finish`] after it, through a bounded queue, never
//!   waiting: a full queue or the rate bound drops the copy (counted as `dropped_rate`).
//!   A shadow offers disagreements through [`Disagreements`].
//! - [`order`]: the signed capture order (`on_demand`), verified and put into effect.
//! - [`writer`]: the thread that encodes copies and writes them to the [`spool`].
//! - [`upload`]: the task that sends the spool to the server, oldest first, throttled, only
//!   inside the upload windows and never while the link is [`metered`].

pub mod metered;
pub mod order;
pub mod rules;
pub mod settings;
pub mod spool;
pub mod upload;
pub mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use botfleet_engine::Tensor;
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::DataTelemetry;
use botfleet_protocol::sample::{CaptureRule, SampleModel};
use botfleet_protocol::{CaptureOrder, DeviceId, SlotName};
use jiff::Timestamp;
use tokio::sync::watch;

pub use metered::Metered;
pub use order::{OrderRefusal, accept_order};
pub use rules::Fired;
pub use settings::{CaptureConfig, CaptureSlotConfig, DataSettings, SlotPolicy, UploadConfig};

use rules::TokenBucket;
use spool::Spool;
use upload::{UploadState, Uploader};

/// Copies waiting for the writer thread, at most; more are dropped, not queued.
const QUEUE: usize = 1024;
/// Tensor bytes waiting for the writer thread, at most (camera frames are large).
const QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// The model that answered a request, as a sample names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub slot: SlotName,
    pub model: SampleModel,
    pub engine: EngineKind,
}

impl Served {
    pub fn of(model: &crate::slots::ServingModel) -> Self {
        Self {
            slot: model.manifest.slot.clone(),
            model: SampleModel {
                version: model.manifest.version.clone(),
                release: model.manifest.release,
                sha256: model.sha256(),
            },
            engine: model.model.engine(),
        }
    }
}

/// One copy on its way to the writer.
#[derive(Debug, Clone)]
pub struct Pending {
    pub served: Served,
    pub captured_at: Timestamp,
    pub fired: Fired,
    pub latency_ms: Option<f64>,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
    pub candidate: Option<SampleModel>,
    pub candidate_outputs: Vec<Tensor>,
}

impl Pending {
    /// The bytes its tensors take.
    fn size(&self) -> usize {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .chain(&self.candidate_outputs)
            .map(|t| t.data.len() * botfleet_protocol::sample::element_bytes(t.data.datatype()))
            .sum()
    }
}

/// The serving path's end of the writer's queue: bounded by count and by bytes, and never
/// waited on.
#[derive(Debug)]
struct Queue {
    tx: SyncSender<Pending>,
    /// Tensor bytes queued now; the writer takes back what it is done with.
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Queue {
    /// Queues `pending` unless the queue is full; `false` when it was dropped.
    fn offer(&self, pending: Pending) -> bool {
        let size = pending.size();
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        // One copy larger than the whole budget still goes when nothing else waits.
        if before > 0 && before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(pending) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.bytes.fetch_sub(size, Ordering::Relaxed);
                false
            }
        }
    }
}

/// What capture counted since the agent started.
#[derive(Debug, Default)]
pub struct Counters {
    captured: [AtomicU64; CaptureRule::ALL.len()],
    dropped_rate: AtomicU64,
    dropped_write: AtomicU64,
}

impl Counters {
    fn rule_index(rule: CaptureRule) -> usize {
        CaptureRule::ALL
            .iter()
            .position(|r| *r == rule)
            .unwrap_or_default()
    }

    pub fn captured(&self, rule: CaptureRule) {
        self.captured[Self::rule_index(rule)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped_rate(&self) {
        self.dropped_rate.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped_write(&self) {
        self.dropped_write.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples spooled by rule (rules that kept none are left out).
    pub fn captured_by_rule(&self) -> BTreeMap<String, u64> {
        CaptureRule::ALL
            .iter()
            .zip(&self.captured)
            .map(|(rule, n)| (rule.as_str().to_owned(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// An on-demand order standing for a slot.
#[derive(Debug, Default)]
struct Standing {
    left: u32,
    detail: String,
}

/// One capturing slot: its policy and its running state.
#[derive(Debug)]
struct SlotState {
    policy: SlotPolicy,
    /// Requests seen, for `sample_every`.
    seen: AtomicU64,
    bucket: Mutex<TokenBucket>,
    on_demand: Mutex<Standing>,
}

impl SlotState {
    fn bucket(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one request against a standing order; the rule if one stands.
    fn take_on_demand(&self) -> Option<Fired> {
        if !self.policy.on_demand {
            return None;
        }
        let mut standing = self
            .on_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if standing.left == 0 {
            return None;
        }
        standing.left -= 1;
        Some(Fired::new(CaptureRule::OnDemand, standing.detail.clone()))
    }
}

/// The serving path's and the shadows' end of capture; cheap to share.
#[derive(Debug)]
pub struct Capture {
    slots: BTreeMap<String, Arc<SlotState>>,
    queue: Queue,
    counters: Arc<Counters>,
    spool: Arc<Spool>,
    uploads: watch::Receiver<UploadState>,
    metered: Metered,
}

/// Capture, started: the handle and the uploader, which the caller runs as a task.
#[derive(Debug)]
pub struct Started {
    pub capture: Arc<Capture>,
    pub uploader: Uploader,
}

/// Opens the spool under `data_dir`, starts the writer thread and makes the uploader.
pub fn start(
    device: &DeviceId,
    data_dir: &Path,
    settings: &DataSettings,
    metered: Metered,
    http: reqwest::Client,
) -> std::io::Result<Started> {
    let now = Instant::now();
    let spool = Arc::new(Spool::open(
        &data_dir.join(spool::DIR),
        settings.spool,
        Timestamp::now(),
    ));
    let counters = Arc::new(Counters::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let queue = Queue {
        tx,
        bytes: Arc::default(),
        max_bytes: QUEUE_BYTES,
    };
    let writer = writer::Writer {
        device: device.clone(),
        spool: Arc::clone(&spool),
        counters: Arc::clone(&counters),
        log: writer::LogLimit::default(),
        queued: Arc::clone(&queue.bytes),
    };
    std::thread::Builder::new()
        .name("botfleet-capture".into())
        .spawn(move || writer.run(&rx))?;
    let (state_tx, uploads) = watch::channel(UploadState::default());
    let uploader = Uploader::new(
        device.clone(),
        &settings.upload,
        Arc::clone(&spool),
        metered.clone(),
        http,
        state_tx,
    );
    let slots = settings
        .slots
        .iter()
        .map(|(slot, policy)| {
            let state = SlotState {
                policy: policy.clone(),
                seen: AtomicU64::new(0),
                bucket: Mutex::new(TokenBucket::new(policy.max_per_minute, now)),
                on_demand: Mutex::default(),
            };
            (slot.as_str().to_owned(), Arc::new(state))
        })
        .collect();
    let capture = Arc::new(Capture {
        slots,
        queue,
        counters,
        spool,
        uploads,
        metered,
    });
    Ok(Started { capture, uploader })
}

/// What the serving path does for one request: decided before the run.
#[derive(Debug)]
pub struct Plan {
    capture: Arc<Capture>,
    slot: Arc<SlotState>,
    sampled: Option<Fired>,
    on_demand: Option<Fired>,
    /// The rate bound had room: the inputs are copied.
    room: bool,
}

impl Capture {
    /// Before a request of `slot` runs: `None` when no rule can keep it; otherwise whether
    /// to copy its inputs ([`Plan::copies_inputs`]). Counts the request.
    pub fn plan(self: &Arc<Self>, slot: &str) -> Option<Plan> {
        let state = self.slots.get(slot)?;
        let seen = state.seen.fetch_add(1, Ordering::Relaxed);
        let sampled = rules::sampled(state.policy.sample_every, seen);
        let on_demand = state.take_on_demand();
        if sampled.is_none() && on_demand.is_none() && !state.policy.reads_outputs() {
            return None;
        }
        let room = state.bucket().has_room(Instant::now());
        Some(Plan {
            capture: Arc::clone(self),
            slot: Arc::clone(state),
            sampled,
            on_demand,
            room,
        })
    }

    /// Keeps a request a rule fired for: `inputs` is its copy (`None`: the rate bound had no
    /// room when the copy would have been taken), which the slot's rate bound must still let
    /// through; then the sample `pending` makes goes to the writer. Each refusal counts as
    /// dropped.
    fn keep(
        &self,
        slot: &SlotState,
        inputs: Option<Vec<Tensor>>,
        pending: impl FnOnce(Vec<Tensor>) -> Pending,
    ) {
        match inputs {
            Some(inputs) if slot.bucket().take(Instant::now()) => self.offer(pending(inputs)),
            _ => self.counters.dropped_rate(),
        }
    }

    /// Hands a copy to the writer without waiting; a full queue drops it.
    fn offer(&self, pending: Pending) {
        if !self.queue.offer(pending) {
            self.counters.dropped_rate();
        }
    }

    /// Where a shadow of `slot` offers disagreements, if the slot's policy keeps them.
    pub fn disagreements(
        self: &Arc<Self>,
        slot: &SlotName,
        candidate: SampleModel,
    ) -> Option<Disagreements> {
        let state = self.slots.get(slot.as_str())?;
        state.policy.disagreement.then(|| Disagreements {
            capture: Arc::clone(self),
            slot: Arc::clone(state),
            candidate,
        })
    }

    /// Puts a verified order into effect: the next `capture_requests` requests of its slot
    /// are kept (under the rate bound). A newer order replaces a standing one.
    fn stand(&self, order: &CaptureOrder) -> Result<(), String> {
        let Some(state) = self.slots.get(order.slot.as_str()) else {
            return Err(format!(
                "this robot's capture policy does not name slot {}",
                order.slot
            ));
        };
        if !state.policy.on_demand {
            return Err(format!(
                "capture.slots.{}.on_demand is not set on this robot",
                order.slot
            ));
        }
        let detail = match &order.reason {
            Some(reason) => format!(
                "capture order for {} requests: {reason}",
                order.capture_requests
            ),
            None => format!("capture order for {} requests", order.capture_requests),
        };
        *state
            .on_demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Standing {
            left: order.capture_requests,
            detail,
        };
        Ok(())
    }

    /// The `data` part of telemetry.
    pub fn telemetry(&self) -> DataTelemetry {
        let uploads = self.uploads.borrow().clone();
        let spool = self.spool.stats();
        DataTelemetry {
            captured: self.counters.captured_by_rule(),
            dropped_rate: self.counters.dropped_rate.load(Ordering::Relaxed),
            dropped_write: self.counters.dropped_write.load(Ordering::Relaxed),
            dropped_spool: self.spool.dropped(),
            spool_samples: spool.samples,
            spool_bytes: spool.bytes,
            uploaded: uploads.uploaded,
            uploaded_bytes: uploads.uploaded_bytes,
            refused: uploads.refused,
            metered: self.metered.get(),
            upload_waiting: uploads.waiting,
        }
    }

    /// The spool, for tests and the uploader.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }
}

impl Plan {
    /// Whether the serving path copies the inputs before the run.
    pub fn copies_inputs(&self) -> bool {
        self.room
    }

    /// After the run: checks the output rules and offers the copy if a rule fired.
    /// `inputs` is the copy taken when [`Plan::copies_inputs`] said so.
    pub fn finish(
        self,
        inputs: Option<Vec<Tensor>>,
        outputs: &[Tensor],
        served: Served,
        latency_ms: f64,
    ) {
        let Some(fired) = rules::first(&self.slot.policy, self.sampled, self.on_demand, outputs)
        else {
            return;
        };
        let inputs = inputs.filter(|_| self.room);
        self.capture.keep(&self.slot, inputs, |inputs| Pending {
            served,
            captured_at: Timestamp::now(),
            fired,
            latency_ms: Some(latency_ms),
            inputs,
            outputs: outputs.to_vec(),
            candidate: None,
            candidate_outputs: Vec::new(),
        });
    }
}

/// A shadow's end of capture: where a disagreement between the serving model and the
/// candidate goes.
#[derive(Debug)]
pub struct Disagreements {
    capture: Arc<Capture>,
    slot: Arc<SlotState>,
    candidate: SampleModel,
}

impl Disagreements {
    /// Whether the rate bound has room (checked before the inputs are copied).
    pub fn has_room(&self) -> bool {
        self.slot.bucket().has_room(Instant::now())
    }

    /// Offers one disagreement; `inputs` is `None` when [`Disagreements::has_room`] said no
    /// (then it is only counted as dropped).
    pub fn offer(
        &self,
        served: Served,
        inputs: Option<Vec<Tensor>>,
        outputs: Vec<Tensor>,
        candidate_outputs: Vec<Tensor>,
        detail: String,
        latency_ms: f64,
    ) {
        self.capture.keep(&self.slot, inputs, |inputs| Pending {
            served,
            captured_at: Timestamp::now(),
            fired: Fired::new(CaptureRule::Disagreement, detail),
            latency_ms: Some(latency_ms),
            inputs,
            outputs,
            candidate: Some(self.candidate.clone()),
            candidate_outputs,
        });
    }
}

/// An HTTP client for tests (reqwest is built without a default TLS provider).
#[cfg(test)]
pub(crate) fn test_http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[cfg(test)]
mod tests;
