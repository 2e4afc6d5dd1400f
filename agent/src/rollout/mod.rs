//! The reconciler: desired state → verify → download → load → benchmark → swap, with an
//! event for every stage. Decisions live in [`plan`]; this module does the I/O.

pub mod plan;
mod recover;
mod steps;

pub use recover::Request;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use botfleet_engine::{Engines, LoadOptions, Model, reference_inputs};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{Desired, DesiredModel, Event, RejectReason, Stage};
use botfleet_protocol::{
    DeviceId, ExpiryCheck, Manifest, ManifestError, RolloutId, SlotName, TrustedKeys, Verified,
};
use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, instrument, warn};

use crate::backoff::Backoff;
use crate::fetch::Limits;
use crate::link::Publisher;
use crate::slots::{ServingModel, Slots};
use crate::store::{InstalledModel, State, Store};
use plan::Refusal;

/// How one install attempt ended, short of success.
enum Outcome {
    /// The model is refused for good (until the desired state changes).
    Rejected(Refusal),
    /// Something that may pass; retried later.
    Failed(String),
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Self {
        Outcome::Rejected(r)
    }
}

/// Everything the reconciler needs.
#[derive(Debug)]
pub struct Reconciler {
    pub device: DeviceId,
    pub trusted: TrustedKeys,
    pub store: Store,
    pub slots: Arc<Slots>,
    pub publisher: Publisher,
    pub http: reqwest::Client,
    pub server_url: String,
    pub limits: Limits,
    pub gate: GateSettings,
    /// The engines this robot has (from the start-up probe).
    pub engines: Arc<Engines>,
    /// What compiled engines depend on besides the model (library versions, GPU, power
    /// mode): part of their cache folder's name, so a change rebuilds them.
    pub engine_key: String,
    pub board: Option<String>,
    /// The generation of the last desired state fully processed.
    pub processed: watch::Sender<Option<u64>>,
    pub state: State,
    /// How long a new model is watched after its swap; zero: not at all.
    pub health_window: Duration,
    /// Where health watchers send their verdicts (the reconciler reads the other end).
    pub requests_tx: mpsc::Sender<Request>,
    /// Running health watchers; dropped (aborted) with the reconciler.
    pub watchers: JoinSet<()>,
}

/// How the benchmark child is run.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub program: PathBuf,
    pub memory_limit_bytes: u64,
    pub timeout: Duration,
}

/// Loads what `state` says was serving, re-checking signature and content. A slot that fails
/// is logged and left empty; the others serve.
pub async fn restore(
    store: &Store,
    trusted: &TrustedKeys,
    engines: &Arc<Engines>,
    engine_key: &str,
    slots: &Slots,
    state: &State,
) {
    for (slot, installed) in &state.slots {
        match restore_one(store, trusted, engines, engine_key, installed).await {
            Ok(model) => {
                info!(slot = %slot, version = %model.manifest.version, sha256 = %model.sha256().short(), "restored model");
                slots.swap(slot, Arc::new(model));
            }
            Err(e) => {
                error!(slot = %slot, error = %e, "cannot restore the installed model; slot is empty")
            }
        }
    }
}

async fn restore_one(
    store: &Store,
    trusted: &TrustedKeys,
    engines: &Arc<Engines>,
    engine_key: &str,
    installed: &InstalledModel,
) -> Result<ServingModel, String> {
    // A wrong clock must never stop serving: no expiry check for what is installed.
    let manifest = installed
        .manifest
        .verify(trusted, ExpiryCheck::Skip)
        .map_err(|e| e.to_string())?;
    let bytes = store
        .read_checked(&manifest.artifact.sha256)
        .map_err(|e| e.to_string())?;
    let inputs = manifest.inputs.clone();
    let engine = installed.engine.unwrap_or(EngineKind::Tract);
    let options = load_options(store, &manifest.artifact.sha256, engine_key, engine);
    let engines = Arc::clone(engines);
    let model = tokio::task::spawn_blocking(move || {
        engines
            .load(engine, &bytes, &inputs, &options)
            .or_else(|e| {
                // The engine it was gated on is gone (library removed, GPU lost): tract
                // always loads what passed the gate, so the slot keeps serving.
                if engine == EngineKind::Tract {
                    return Err(e);
                }
                warn!(%engine, error = %e, "the model's engine is unavailable; serving it on tract");
                Model::load(&bytes, &inputs)
            })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(ServingModel::new(model, manifest, installed.since))
}

/// Where `engine` keeps compiled plans for `sha`, for TensorRT engines.
fn load_options(store: &Store, sha: &Sha256Digest, key: &str, engine: EngineKind) -> LoadOptions {
    LoadOptions {
        tensorrt_cache: engine
            .is_tensorrt()
            .then(|| store.engine_cache(sha, key).join(engine.as_str())),
    }
}

/// One inference before a model takes traffic, so the first request pays no first-run cost.
/// Blocking.
pub fn warm_up(model: &Model, seed: u64) -> Result<(), botfleet_engine::EngineError> {
    model.run(reference_inputs(model, seed)?).map(drop)
}

fn refusal(e: &ManifestError) -> Refusal {
    let reason = match e {
        ManifestError::Untrusted { .. } => RejectReason::Untrusted,
        ManifestError::Expired { .. } => RejectReason::Expired,
        ManifestError::PayloadEncoding
        | ManifestError::PayloadTooLarge(_)
        | ManifestError::Malformed(_)
        | ManifestError::Schema(_) => RejectReason::BadManifest,
    };
    (reason, e.to_string())
}

impl Reconciler {
    /// Applies every new desired state until `cancel`. Failed installs are retried with
    /// backoff; refused ones only when the desired state changes.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Desired>>,
        mut requests: mpsc::Receiver<Request>,
        cancel: CancellationToken,
    ) {
        let mut refused: HashSet<Sha256Digest> = HashSet::new();
        let mut retry = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
        let mut retry_at: Option<tokio::time::Instant> = None;
        // Set when a desired state waits to be applied without waiting for a change: the one
        // kept from the last run, or a newer one that interrupted an install.
        let mut pending = desired.borrow().is_some();
        loop {
            if !pending {
                let wait_retry = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = desired.changed() => {
                        if changed.is_err() { return; }
                        refused.clear();
                        retry.reset();
                    }
                    () = wait_retry => {}
                    request = requests.recv() => {
                        if let Some(request) = request {
                            self.handle(request).await;
                        }
                        continue;
                    }
                }
            }
            pending = false;
            retry_at = None;
            let Some(target) = desired.borrow_and_update().clone() else {
                continue;
            };
            let failed = tokio::select! {
                () = cancel.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() { return; }
                    // Dropping the install cancels its download (the partial file stays for
                    // a resume) or its benchmark child (killed). The swap has no await
                    // point, so it is never cut in half.
                    info!("desired state changed during an install; starting over");
                    refused.clear();
                    retry.reset();
                    pending = true;
                    continue;
                }
                failed = self.apply(&target, &mut refused) => failed,
            };
            if failed {
                let delay = retry.next_delay();
                info!(
                    retry_in_s = delay.as_secs(),
                    "an install failed; will retry"
                );
                retry_at = Some(tokio::time::Instant::now() + delay);
            }
            // Always notifies, so the status (active models) is published after every pass.
            self.processed.send_modify(|processed| {
                if !failed {
                    *processed = Some(target.generation);
                }
            });
        }
    }

    /// Installs every changed slot; returns whether any failed (retryable).
    async fn apply(&mut self, desired: &Desired, refused: &mut HashSet<Sha256Digest>) -> bool {
        let installed: BTreeMap<SlotName, Sha256Digest> = self
            .state
            .slots
            .iter()
            .map(|(k, v)| (k.clone(), v.manifest.payload_digest()))
            .collect();
        let mut failed = false;
        for (slot, model) in plan::changes(desired, &installed, refused, &self.state.blocked) {
            match self.install(slot, model).await {
                Ok(()) => {}
                Err(Outcome::Rejected(_)) => {
                    refused.insert(model.manifest.payload_digest());
                }
                Err(Outcome::Failed(_)) => failed = true,
            }
        }
        failed
    }

    fn emit(
        &self,
        slot: &SlotName,
        rollout_id: Option<&RolloutId>,
        claims: (Sha256Digest, Option<u64>),
        stage: Stage,
    ) {
        self.publisher.event(&Event {
            id: Some(crate::outbox::event_id()),
            device: self.device.clone(),
            rollout_id: rollout_id.cloned(),
            slot: slot.clone(),
            sha256: claims.0,
            release: claims.1,
            at: Timestamp::now(),
            stage,
        });
    }

    #[instrument(skip_all, fields(slot = %slot, rollout = ?model.rollout_id))]
    async fn install(&mut self, slot: &SlotName, model: &DesiredModel) -> Result<(), Outcome> {
        // Before verification we only know what the manifest claims; it names the event.
        let claims = match model.manifest.verify(&self.trusted, ExpiryCheck::Skip) {
            Ok(m) => (m.artifact.sha256, Some(m.release)),
            Err(_) => (model.manifest.payload_digest(), None),
        };
        self.emit(slot, model.rollout_id.as_ref(), claims, Stage::Received);
        let result = self.stages(slot, model, claims).await;
        match &result {
            Ok(()) => {}
            Err(Outcome::Rejected((reason, message))) => {
                warn!(?reason, %message, "model rejected; the previous model keeps serving");
                self.emit(
                    slot,
                    model.rollout_id.as_ref(),
                    claims,
                    Stage::Rejected {
                        reason: *reason,
                        message: message.clone(),
                    },
                );
            }
            Err(Outcome::Failed(message)) => {
                warn!(%message, "install failed; the previous model keeps serving");
                self.emit(
                    slot,
                    model.rollout_id.as_ref(),
                    claims,
                    Stage::Failed {
                        message: message.clone(),
                    },
                );
            }
        }
        result
    }

    async fn stages(
        &mut self,
        slot: &SlotName,
        model: &DesiredModel,
        claims: (Sha256Digest, Option<u64>),
    ) -> Result<(), Outcome> {
        let manifest = model
            .manifest
            .verify(&self.trusted, ExpiryCheck::At(Timestamp::now()))
            .map_err(|e| refusal(&e))?;
        let incumbent = self.slots.current(slot);
        plan::admit(
            &manifest,
            slot,
            std::env::consts::ARCH,
            self.board.as_deref(),
            incumbent.as_ref().map(|m| m.manifest.release),
        )?;
        self.emit(
            slot,
            model.rollout_id.as_ref(),
            claims,
            Stage::Verified {
                key_ids: manifest
                    .signed_by()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            },
        );

        let bytes = self.fetch(slot, model, &manifest, claims).await?;
        let evaluation = self.fetch_evaluation(model, &manifest).await?;

        // Load, check and benchmark in a child process first: a hostile file dies there.
        let report = self
            .gate(&manifest, incumbent.as_deref(), evaluation)
            .await?;
        let (load_ms, report, verdict) = report;
        let engine = verdict.as_ref().ok().copied();
        self.emit(
            slot,
            model.rollout_id.as_ref(),
            claims,
            Stage::Loaded { millis: load_ms },
        );
        self.emit(
            slot,
            model.rollout_id.as_ref(),
            claims,
            Stage::Benchmarked(report),
        );
        verdict?;
        let engine = engine.unwrap_or(EngineKind::Tract);

        // Proven in the child; now load it here on the chosen engine (a TensorRT plan comes
        // from the cache the child filled) and warm it up before it takes traffic.
        let inputs = manifest.inputs.clone();
        let seed = manifest.gate.input_seed();
        let options = load_options(
            &self.store,
            &manifest.artifact.sha256,
            &self.engine_key,
            engine,
        );
        let engines = Arc::clone(&self.engines);
        // At the lowest priority: the serving model keeps the CPU it needs meanwhile.
        let loaded = crate::loader::in_background(move || {
            let model = engines.load(engine, &bytes, &inputs, &options)?;
            warm_up(&model, seed)?;
            Ok::<_, botfleet_engine::EngineError>(model)
        })
        .await
        .map_err(|e| Outcome::Failed(format!("loader crashed: {e}")))?
        .map_err(|e| Outcome::Rejected((RejectReason::NotLoadable, e.to_string())))?;

        self.swap(slot, model, manifest, loaded, claims)
    }

    /// Persists the new active model (keeping the one it replaces for rollback), then swaps
    /// it in and starts watching its health.
    fn swap(
        &mut self,
        slot: &SlotName,
        model: &DesiredModel,
        manifest: Verified<Manifest>,
        loaded: Model,
        claims: (Sha256Digest, Option<u64>),
    ) -> Result<(), Outcome> {
        let since = Timestamp::now();
        let mut next = self.state.clone();
        let previous = next.slots.remove(slot).map(|mut p| {
            p.previous = None; // one level of history is what rollback needs
            Box::new(p)
        });
        next.slots.insert(
            slot.clone(),
            InstalledModel {
                manifest: model.manifest.clone(),
                sha256: manifest.artifact.sha256,
                since,
                rollout_id: model.rollout_id.clone(),
                previous,
                engine: Some(loaded.engine()),
            },
        );
        next.blocked.remove(slot);
        // Persist first: after a crash the robot comes back with what it reported.
        self.store
            .save_state(&next)
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        self.state = next;
        crate::failpoint::hit("mid-swap");
        let version = manifest.version.clone();
        let serving = Arc::new(ServingModel::new(loaded, manifest, since));
        let started = Instant::now();
        let replaced = self.slots.swap(slot, Arc::clone(&serving));
        let swap_micros = started.elapsed().as_micros() as u64;
        info!(%version, engine = %serving.model.engine(), swap_micros, "model active");
        self.emit(
            slot,
            model.rollout_id.as_ref(),
            claims,
            Stage::Active {
                previous: replaced.map(|p| p.sha256()),
                swap_micros,
            },
        );
        self.collect_garbage(None);
        self.watch_health(slot.clone(), serving);
        Ok(())
    }
}
