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
use botfleet_protocol::messages::{
    Deferral, DeferredModel, Desired, DesiredModel, Event, RejectReason, ShadowReport, ShadowSpec,
    Stage,
};
use botfleet_protocol::{
    DeviceId, ExpiryCheck, Manifest, ManifestError, RolloutId, SlotName, TrustedKeys, Verified,
};
use jiff::{SignedDuration, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, instrument, warn};

use crate::backoff::Backoff;
use crate::fetch::Limits;
use crate::holds::Holds;
use crate::link::Publisher;
use crate::slots::{ServingModel, Slots};
use crate::store::{InstalledModel, State, Store};
use plan::Refusal;

/// How one pass over the desired state ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Done,
    /// An install failed and is retried with backoff.
    Failed,
    /// A guard put an install off; looked at again after its recheck time.
    Deferred,
}

/// How one install attempt ended, short of success.
enum Outcome {
    /// The model is refused for good (until the desired state changes).
    Rejected(Refusal),
    /// Something that may pass; retried later.
    Failed(String),
    /// Not now (a guard): looked at again after the guard's recheck time, not counted as
    /// a failure.
    Deferred(Deferral),
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
    /// The robot's holds on swaps.
    pub holds: Holds,
    /// Thermal and battery guards on benchmarking.
    pub guards: crate::guards::Guards,
    /// Models ready and waiting for their swap, by slot (empty at start).
    pub parked: BTreeMap<SlotName, Parked>,
    /// Manifests (payload digests) refused after their shadow, until the desired state
    /// changes.
    pub shadow_refused: HashSet<Sha256Digest>,
    /// What `parked` holds, as the status reports it.
    pub deferred: watch::Sender<BTreeMap<SlotName, DeferredModel>>,
    /// Where a shadow's disagreements go, when the slot's capture policy keeps them.
    pub capture: Option<Arc<crate::capture::Capture>>,
}

/// The longest the reconciler waits before it looks at a deferral again (a clock or time
/// zone change moves a window; holds expire on the wall clock).
const DEFERRAL_RECHECK: Duration = Duration::from_secs(30);

/// A model that passed its gate, loaded and warmed up, whose swap waits.
#[derive(Debug)]
pub struct Parked {
    model: DesiredModel,
    manifest: Verified<Manifest>,
    loaded: Model,
    claims: (Sha256Digest, Option<u64>),
    deferral: Deferral,
    since: Timestamp,
    /// Its rollout has heard why it waits.
    announced: bool,
    /// It runs as a shadow on live requests; its verdict comes as [`Request::Shadowed`].
    shadowing: bool,
}

impl Parked {
    fn report(&self) -> DeferredModel {
        DeferredModel {
            version: self.manifest.version.clone(),
            release: self.manifest.release,
            sha256: self.manifest.artifact.sha256,
            rollout_id: self.model.rollout_id.clone(),
            since: self.since,
            deferral: self.deferral.clone(),
        }
    }
}

/// Whether two deferrals give the same reason (holders or window), whatever their deadlines:
/// a hold renewed every few seconds is not a new event each time.
fn same_reason(a: &Deferral, b: &Deferral) -> bool {
    match (a, b) {
        (Deferral::Held { holds: x, .. }, Deferral::Held { holds: y, .. }) => {
            x.iter().map(|h| &h.holder).eq(y.iter().map(|h| &h.holder))
        }
        (Deferral::Window { window: x, .. }, Deferral::Window { window: y, .. }) => x == y,
        (Deferral::Command, Deferral::Command) => true,
        _ => false,
    }
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
        let mut holds = self.holds.subscribe();
        loop {
            if !pending {
                let wait_retry = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let look_again = self.next_look();
                let wait_parked = async {
                    match look_again {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = wait_parked => {
                        self.release_parked();
                        continue;
                    }
                    changed = holds.changed() => {
                        if changed.is_ok() {
                            self.release_parked();
                        }
                        continue;
                    }
                    changed = desired.changed() => {
                        if changed.is_err() { return; }
                        refused.clear();
                        self.shadow_refused.clear();
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
            let pass = tokio::select! {
                () = cancel.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() { return; }
                    // Dropping the install cancels its download (the partial file stays for
                    // a resume) or its benchmark child (killed). The swap has no await
                    // point, so it is never cut in half.
                    info!("desired state changed during an install; starting over");
                    refused.clear();
                    self.shadow_refused.clear();
                    retry.reset();
                    pending = true;
                    continue;
                }
                pass = self.apply(&target, &mut refused) => pass,
            };
            let failed = pass != Pass::Done;
            match pass {
                Pass::Done => {}
                Pass::Failed => {
                    let delay = retry.next_delay();
                    info!(
                        retry_in_s = delay.as_secs(),
                        "an install failed; will retry"
                    );
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
                Pass::Deferred => {
                    retry_at = Some(tokio::time::Instant::now() + self.guards.recheck());
                }
            }
            // Always notifies, so the status (active models) is published after every pass.
            self.processed.send_modify(|processed| {
                if !failed {
                    *processed = Some(target.generation);
                }
            });
        }
    }

    /// Installs every changed slot; says whether any failed (retryable) or was put off.
    async fn apply(&mut self, desired: &Desired, refused: &mut HashSet<Sha256Digest>) -> Pass {
        // A parked model stays parked while the desired state still names it (its window
        // as the desired state says now); otherwise it is dropped, never swapped in.
        self.parked.retain(|slot, parked| {
            let Some(wanted) = desired.slots.get(slot) else {
                return false;
            };
            let same = wanted.manifest.payload_digest() == parked.model.manifest.payload_digest();
            if same {
                // Another rollout of the same model (another window, or none) takes the wait
                // over: its events carry its id, and it hears why the device waits.
                if wanted.rollout_id != parked.model.rollout_id {
                    parked.announced = false;
                }
                parked.model = wanted.clone();
            } else {
                info!(slot = %slot, "the desired state no longer names the deferred model; dropped");
                if parked.shadowing {
                    self.slots.set_shadow(slot, None);
                }
            }
            same
        });
        refused.extend(self.shadow_refused.iter().copied());
        self.release_parked();
        let mut installed: BTreeMap<SlotName, Sha256Digest> = self
            .state
            .slots
            .iter()
            .map(|(k, v)| (k.clone(), v.manifest.payload_digest()))
            .collect();
        // Parked models are as good as installed: ready, not to be fetched and gated again.
        for (slot, parked) in &self.parked {
            installed.insert(slot.clone(), parked.model.manifest.payload_digest());
        }
        let mut pass = Pass::Done;
        for (slot, model) in plan::changes(desired, &installed, refused, &self.state.blocked) {
            match self.install(slot, model).await {
                Ok(()) => {}
                Err(Outcome::Rejected(_)) => {
                    refused.insert(model.manifest.payload_digest());
                }
                Err(Outcome::Failed(_)) => pass = Pass::Failed,
                Err(Outcome::Deferred(_)) if pass == Pass::Done => pass = Pass::Deferred,
                Err(Outcome::Deferred(_)) => {}
            }
        }
        pass
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
        let stage = match &result {
            Ok(()) => None,
            Err(Outcome::Rejected((reason, message))) => {
                warn!(?reason, %message, "model rejected; the previous model keeps serving");
                Some(Stage::Rejected {
                    reason: *reason,
                    message: message.clone(),
                })
            }
            Err(Outcome::Deferred(deferral)) => {
                info!(%deferral, "install put off; the previous model keeps serving");
                Some(Stage::Deferred {
                    deferral: deferral.clone(),
                })
            }
            Err(Outcome::Failed(message)) => {
                warn!(%message, "install failed; the previous model keeps serving");
                Some(Stage::Failed {
                    message: message.clone(),
                })
            }
        };
        if let Some(stage) = stage {
            self.emit(slot, model.rollout_id.as_ref(), claims, stage);
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

        if let Some(trip) = self.guards.check() {
            let recheck = SignedDuration::try_from(self.guards.recheck()).unwrap_or_default();
            return Err(Outcome::Deferred(Deferral::Guard {
                guard: trip.guard.to_owned(),
                message: trip.message,
                recheck_at: Timestamp::now() + recheck,
            }));
        }
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

        // A shadow compares with the serving model: a slot that serves none has nothing to
        // compare with, and the gate's checks are all there is.
        if let Some(spec) = model
            .shadow
            .clone()
            .filter(|_| self.slots.current(slot).is_some())
        {
            self.start_shadow(slot, model, manifest, loaded, claims, spec);
            return Ok(());
        }
        let now = jiff::ZonedDateTime::now();
        let holds = self.holds.active(now.timestamp());
        match plan::deferral(&now, &holds, model) {
            None => self.swap(slot, model, manifest, loaded, claims),
            Some(deferral) => {
                let parked = Parked {
                    model: model.clone(),
                    manifest,
                    loaded,
                    claims,
                    deferral,
                    since: now.timestamp(),
                    announced: true,
                    shadowing: false,
                };
                self.park(slot, parked);
                Ok(())
            }
        }
    }

    /// Runs `loaded` as a shadow of `slot`'s serving model on live requests; the verdict
    /// comes back as [`Request::Shadowed`].
    fn start_shadow(
        &mut self,
        slot: &SlotName,
        model: &DesiredModel,
        manifest: Verified<Manifest>,
        loaded: Model,
        claims: (Sha256Digest, Option<u64>),
        spec: ShadowSpec,
    ) {
        let (tap, rx) = crate::shadow::Tap::new(&spec);
        let tap = Arc::new(tap);
        // The task keeps no strong handle: dropping the slot's tap ends the shadow early.
        let weak = Arc::downgrade(&tap);
        self.slots.set_shadow(slot, Some(tap));
        let candidate = loaded.clone();
        let requests = self.requests_tx.clone();
        let (slot_name, sha256) = (slot.clone(), manifest.artifact.sha256);
        let (requests_wanted, seconds) = (spec.requests, spec.seconds);
        let judged = spec.clone();
        let disagreements = self.capture.as_ref().and_then(|c| {
            let model = botfleet_protocol::sample::SampleModel {
                version: manifest.version.clone(),
                release: manifest.release,
                sha256,
            };
            c.disagreements(slot, model)
        });
        self.watchers.spawn(async move {
            let tally = crate::loader::in_background(move || {
                crate::shadow::run_capturing(&candidate, &spec, &rx, disagreements.as_ref())
            })
            .await;
            let dropped = weak.upgrade().map_or(0, |t| t.dropped());
            let report = match tally {
                Ok(tally) => crate::shadow::judge(&judged, &tally, dropped),
                // Judged on nothing (refused), with the crash as the reason.
                Err(e) => ShadowReport {
                    reason: Some(format!("shadow: {e}")),
                    ..crate::shadow::judge(&judged, &Default::default(), dropped)
                },
            };
            let _ = requests
                .send(Request::Shadowed {
                    slot: slot_name,
                    sha256,
                    report,
                })
                .await;
        });
        let now = Timestamp::now();
        let seconds = SignedDuration::from_secs(i64::try_from(seconds).unwrap_or(i64::MAX));
        let parked = Parked {
            model: model.clone(),
            manifest,
            loaded,
            claims,
            deferral: Deferral::Shadow {
                requests: requests_wanted,
                until: now.checked_add(seconds).unwrap_or(now),
            },
            since: now,
            announced: true,
            shadowing: true,
        };
        self.park(slot, parked);
    }

    /// The verdict of a shadow: on to the swap (holds and windows still apply), or refused
    /// with its figures. A verdict about a model no longer parked is moot.
    pub(super) fn shadow_done(
        &mut self,
        slot: &SlotName,
        sha256: Sha256Digest,
        report: ShadowReport,
    ) {
        self.slots.set_shadow(slot, None);
        let Some(parked) = self.parked.get_mut(slot) else {
            return;
        };
        if !parked.shadowing || parked.manifest.artifact.sha256 != sha256 {
            return;
        }
        let (rollout, claims) = (parked.model.rollout_id.clone(), parked.claims);
        if report.passed {
            parked.shadowing = false;
            parked.announced = false;
        }
        info!(slot = %slot, samples = report.samples, agreed = report.agreed, passed = report.passed, "shadow done");
        self.emit(
            slot,
            rollout.as_ref(),
            claims,
            Stage::Shadowed(report.clone()),
        );
        if report.passed {
            self.release_parked();
            return;
        }
        let message = report.reason.unwrap_or_else(|| "shadow failed".into());
        if let Some(parked) = self.parked.remove(slot) {
            self.shadow_refused
                .insert(parked.model.manifest.payload_digest());
        }
        warn!(%message, "model refused after its shadow; the serving model stays");
        self.emit(
            slot,
            rollout.as_ref(),
            claims,
            Stage::Rejected {
                reason: RejectReason::Inaccurate,
                message,
            },
        );
        self.report_parked();
    }

    /// Keeps a ready model until its swap may happen, and says why it waits.
    fn park(&mut self, slot: &SlotName, parked: Parked) {
        info!(deferral = %parked.deferral, "the swap waits");
        self.emit(
            slot,
            parked.model.rollout_id.as_ref(),
            parked.claims,
            Stage::Deferred {
                deferral: parked.deferral.clone(),
            },
        );
        self.parked.insert(slot.clone(), parked);
        self.report_parked();
    }

    /// When a parked model's deferral should be looked at again.
    fn next_look(&self) -> Option<tokio::time::Instant> {
        let now = Timestamp::now();
        let soonest = (self.parked.values())
            .filter(|p| !p.shadowing)
            .map(|p| p.deferral.until())
            .min()?;
        let wait = now
            .duration_until(soonest)
            .unsigned_abs()
            .min(DEFERRAL_RECHECK);
        Some(tokio::time::Instant::now() + wait)
    }

    /// Swaps in every parked model whose deferral ended; reports those whose reason changed.
    fn release_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let now = jiff::ZonedDateTime::now();
        let holds = self.holds.active(now.timestamp());
        let slots: Vec<SlotName> = self.parked.keys().cloned().collect();
        let mut changed = false;
        for slot in slots {
            let Some(parked) = self.parked.get_mut(&slot) else {
                continue;
            };
            if parked.shadowing {
                continue;
            }
            match plan::deferral(&now, &holds, &parked.model) {
                Some(deferral) => {
                    let new_reason = !parked.announced || !same_reason(&parked.deferral, &deferral);
                    changed |= parked.deferral != deferral || !parked.announced;
                    parked.deferral = deferral;
                    parked.announced = true;
                    if new_reason {
                        let (rollout, claims) = (parked.model.rollout_id.clone(), parked.claims);
                        let stage = Stage::Deferred {
                            deferral: parked.deferral.clone(),
                        };
                        info!(slot = %slot, deferral = %parked.deferral, "the swap still waits");
                        self.emit(&slot, rollout.as_ref(), claims, stage);
                    }
                }
                None => {
                    let Some(parked) = self.parked.remove(&slot) else {
                        continue;
                    };
                    changed = true;
                    info!(slot = %slot, "deferral over; swapping");
                    let rollout = parked.model.rollout_id.clone();
                    if let Err(Outcome::Failed(message) | Outcome::Rejected((_, message))) = self
                        .swap(
                            &slot,
                            &parked.model,
                            parked.manifest,
                            parked.loaded,
                            parked.claims,
                        )
                    {
                        warn!(%message, "swap failed; the previous model keeps serving");
                        let stage = Stage::Failed { message };
                        self.emit(&slot, rollout.as_ref(), parked.claims, stage);
                    }
                }
            }
        }
        if changed {
            self.report_parked();
        }
    }

    /// Publishes what is parked (the reporter sends a status when it changes).
    fn report_parked(&self) {
        let report = self
            .parked
            .iter()
            .map(|(slot, parked)| (slot.clone(), parked.report()))
            .collect();
        self.deferred.send_replace(report);
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
