//! The reconciler: desired state → verify → download → load → benchmark → swap, with an
//! event for every stage. Decisions live in [`plan`]; this module does the I/O.

pub mod plan;
mod recover;

pub use recover::Request;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use botfleet_engine::{BenchStats, Model, reference_inputs};
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{BenchReport, Desired, DesiredModel, Event, RejectReason, Stage};
use botfleet_protocol::{
    DeviceId, ExpiryCheck, Manifest, ManifestError, RolloutId, SlotName, TrustedKeys, Verified,
};
use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, instrument, warn};

use crate::backoff::Backoff;
use crate::fetch::{self, FetchError, Limits};
use crate::gate::{self, GateError, GateReport, GateRequest, ModelFile};
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
pub async fn restore(store: &Store, trusted: &TrustedKeys, slots: &Slots, state: &State) {
    for (slot, installed) in &state.slots {
        match restore_one(store, trusted, installed).await {
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
    let model = tokio::task::spawn_blocking(move || Model::load(&bytes, &inputs))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ServingModel::new(model, manifest, installed.since))
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

        // Load, check and benchmark in a child process first: a hostile file dies there.
        let report = self.gate(&manifest, incumbent.as_deref()).await?;
        let (load_ms, report, verdict) = report;
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

        // Proven in the child; now load it here and warm it up before it takes traffic.
        let inputs = manifest.inputs.clone();
        let seed = manifest.gate.reference.as_ref().map_or(0, |r| r.seed);
        let loaded = tokio::task::spawn_blocking(move || {
            let model = Model::load(&bytes, &inputs)?;
            let warm = reference_inputs(&model, seed)?;
            model.run(warm)?;
            Ok::<_, botfleet_engine::EngineError>(model)
        })
        .await
        .map_err(|e| Outcome::Failed(format!("loader crashed: {e}")))?
        .map_err(|e| Outcome::Rejected((RejectReason::NotLoadable, e.to_string())))?;

        self.swap(slot, model, manifest, loaded, claims)
    }

    /// The artifact's bytes: from the store if present, else downloaded and committed.
    async fn fetch(
        &self,
        slot: &SlotName,
        model: &DesiredModel,
        manifest: &Verified<Manifest>,
        claims: (Sha256Digest, Option<u64>),
    ) -> Result<Vec<u8>, Outcome> {
        let sha = manifest.artifact.sha256;
        if !self.store.has(&sha) {
            let url = self.artifact_url(&model.artifact_url);
            let dest = self.store.partial_path(&sha);
            let offset = tokio::fs::metadata(&dest).await.map_or(0, |m| m.len());
            self.emit(
                slot,
                model.rollout_id.as_ref(),
                claims,
                Stage::Downloading {
                    total_bytes: manifest.artifact.size,
                    offset,
                },
            );
            let fetched = fetch::download(&self.http, &url, &manifest.artifact, &dest, self.limits)
                .await
                .map_err(|e| match e {
                    FetchError::TooLarge { .. } | FetchError::SizeMismatch { .. } => {
                        Outcome::Rejected((RejectReason::SizeMismatch, e.to_string()))
                    }
                    FetchError::DigestMismatch { .. } => {
                        Outcome::Rejected((RejectReason::DigestMismatch, e.to_string()))
                    }
                    // Network, deadlines, disk: the partial file stays where resuming helps.
                    other => Outcome::Failed(other.to_string()),
                })?;
            info!(
                bytes = fetched.bytes,
                resumed_from = fetched.resumed_from,
                attempts = fetched.attempts,
                "downloaded"
            );
            crate::failpoint::hit("after-download");
            self.store
                .commit(&sha)
                .map_err(|e| Outcome::Failed(e.to_string()))?;
            self.emit(
                slot,
                model.rollout_id.as_ref(),
                claims,
                Stage::Downloaded {
                    bytes: fetched.bytes,
                    millis: fetched.elapsed.as_millis() as u64,
                },
            );
        }
        let bytes = self
            .store
            .read_checked(&sha)
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        // The digest matched, but a manifest that misstates the size is not trusted either.
        if bytes.len() as u64 != manifest.artifact.size {
            return Err(Outcome::Rejected((
                RejectReason::SizeMismatch,
                format!(
                    "stored artifact has {} bytes, the manifest declares {}",
                    bytes.len(),
                    manifest.artifact.size
                ),
            )));
        }
        Ok(bytes)
    }

    fn artifact_url(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") || self.server_url.is_empty() {
            url.to_owned()
        } else {
            format!(
                "{}/{}",
                self.server_url.trim_end_matches('/'),
                url.trim_start_matches('/')
            )
        }
    }

    /// Runs the gate child on the committed candidate (and the incumbent, when the gate
    /// compares) and judges its numbers.
    async fn gate(
        &self,
        manifest: &Verified<Manifest>,
        incumbent: Option<&ServingModel>,
    ) -> Result<(u64, BenchReport, Result<(), Outcome>), Outcome> {
        let seed_of = |m: &Manifest| m.gate.reference.as_ref().map_or(0, |r| r.seed);
        let request = GateRequest {
            candidate: ModelFile {
                path: self.store.model_path(&manifest.artifact.sha256),
                inputs: manifest.inputs.clone(),
                seed: seed_of(manifest),
            },
            gate: manifest.gate.clone(),
            incumbent: incumbent
                .filter(|_| manifest.gate.max_regression.is_some())
                .map(|m| ModelFile {
                    path: self.store.model_path(&m.sha256()),
                    inputs: m.manifest.inputs.clone(),
                    seed: seed_of(&m.manifest),
                }),
            memory_limit_bytes: self.gate.memory_limit_bytes,
        };
        let report = gate::run_in_child(&self.gate.program, &request, self.gate.timeout).await;
        let (load_ms, candidate, incumbent, ref_err, peak) = match report {
            Ok(GateReport::Measured {
                load_ms,
                candidate,
                incumbent,
                reference_max_abs_err,
                peak_rss_bytes,
            }) => (
                load_ms,
                candidate,
                incumbent,
                reference_max_abs_err,
                peak_rss_bytes,
            ),
            Ok(GateReport::NotLoadable { message }) => {
                return Err(Outcome::Rejected((RejectReason::NotLoadable, message)));
            }
            Ok(GateReport::WrongOutput { message }) => {
                return Err(Outcome::Rejected((RejectReason::WrongOutput, message)));
            }
            Err(e @ GateError::Spawn { .. }) => return Err(Outcome::Failed(e.to_string())),
            Err(e @ GateError::TimedOut(_)) => {
                return Err(Outcome::Rejected((RejectReason::GateMissed, e.to_string())));
            }
            Err(e) => {
                return Err(Outcome::Rejected((
                    RejectReason::NotLoadable,
                    e.to_string(),
                )));
            }
        };
        let stats: BenchStats = candidate.into();
        let incumbent: Option<BenchStats> = incumbent.map(Into::into);
        let verdict = plan::judge(&manifest.gate, &stats, incumbent.as_ref(), ref_err, peak);
        let report = BenchReport {
            runs: stats.runs,
            p50_ms: stats.p50_ms,
            p99_ms: stats.p99_ms,
            mean_ms: stats.mean_ms,
            incumbent_p99_ms: incumbent.map(|s| s.p99_ms),
            reference_max_abs_err: ref_err,
            peak_rss_bytes: peak,
            passed: verdict.is_ok(),
        };
        info!(p50_ms = report.p50_ms, p99_ms = report.p99_ms, peak_rss_bytes = ?peak, passed = report.passed, "benchmarked");
        Ok((load_ms, report, verdict.map_err(Outcome::Rejected)))
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
        info!(%version, swap_micros, "model active");
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
