//! The two slow steps of an install: getting the artifact, and the benchmark gate.

use botfleet_engine::BenchStats;
use botfleet_protocol::engine::{EngineBench, EngineKind};
use botfleet_protocol::evaluation::EvaluationSet;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{BenchReport, DesiredModel, RejectReason, Stage};
use botfleet_protocol::{Manifest, SlotName, Verified};
use tracing::info;

use super::{Outcome, Reconciler, plan};
use crate::fetch::{self, FetchError};
use crate::gate::{
    self, ChildRequest, EngineResult, GateError, GateReport, GateRequest, ModelFile,
};
use crate::slots::ServingModel;

impl Reconciler {
    /// The artifact's bytes: from the store if present, else downloaded and committed.
    pub(super) async fn fetch(
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

    /// The accuracy gate's evaluation set, when the manifest names one: from the store if
    /// there with the right digest, else downloaded (its digest checked) and kept beside the
    /// artifact. It is parsed here so a set that does not fit is a refusal, not a crash.
    pub(super) async fn fetch_evaluation(
        &self,
        model: &DesiredModel,
        manifest: &Verified<Manifest>,
    ) -> Result<Option<std::path::PathBuf>, Outcome> {
        let Some(evaluation) = &manifest.gate.evaluation else {
            return Ok(None);
        };
        let sha = manifest.artifact.sha256;
        let path = self.store.evaluation_path(&sha);
        let bytes = match self.store.read_evaluation(&sha, &evaluation.sha256) {
            Some(bytes) => bytes,
            None => {
                let Some(url) = &model.evaluation_url else {
                    return Err(Outcome::Rejected((
                        RejectReason::BadManifest,
                        "the manifest's gate names an evaluation set, the desired state gives                          no URL to download it from"
                            .into(),
                    )));
                };
                let url = self.artifact_url(url);
                let dest = self.store.partial_path(&evaluation.sha256);
                fetch::download(&self.http, &url, evaluation, &dest, self.limits)
                    .await
                    .map_err(|e| match e {
                        FetchError::TooLarge { .. } | FetchError::SizeMismatch { .. } => {
                            Outcome::Rejected((
                                RejectReason::SizeMismatch,
                                format!("evaluation set: {e}"),
                            ))
                        }
                        FetchError::DigestMismatch { .. } => Outcome::Rejected((
                            RejectReason::DigestMismatch,
                            format!("evaluation set: {e}"),
                        )),
                        other => Outcome::Failed(format!("evaluation set: {other}")),
                    })?;
                self.store
                    .commit_evaluation(&evaluation.sha256, &sha)
                    .map_err(|e| Outcome::Failed(e.to_string()))?;
                self.store
                    .read_evaluation(&sha, &evaluation.sha256)
                    .ok_or_else(|| {
                        Outcome::Failed("evaluation set changed on disk after download".into())
                    })?
            }
        };
        let set = EvaluationSet::parse(&bytes, evaluation.metric)
            .map_err(|e| Outcome::Rejected((RejectReason::BadManifest, e.to_string())))?;
        set.fits(&manifest.inputs, &manifest.outputs)
            .map_err(|e| Outcome::Rejected((RejectReason::BadManifest, e.to_string())))?;
        if (set.input.as_str(), set.output.as_str())
            != (evaluation.input.as_str(), evaluation.output.as_str())
            || set.samples.len() != evaluation.samples as usize
        {
            return Err(Outcome::Rejected((
                RejectReason::BadManifest,
                "the evaluation set differs from what the manifest says of it".into(),
            )));
        }
        Ok(Some(path))
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

    /// Runs the gate child on the committed candidate, on every engine the manifest allows
    /// and this robot has (and the incumbent, when the gate compares), judges each engine's
    /// numbers and chooses the one to serve on.
    pub(super) async fn gate(
        &self,
        manifest: &Verified<Manifest>,
        incumbent: Option<&ServingModel>,
        evaluation: Option<std::path::PathBuf>,
    ) -> Result<(u64, BenchReport, Result<EngineKind, Outcome>), Outcome> {
        let has_reference = manifest.gate.reference.is_some();
        let engines = manifest
            .engines
            .select(self.engines.available(), has_reference);
        if engines.is_empty() {
            return Err(Outcome::Rejected((
                RejectReason::Incompatible,
                format!(
                    "none of the engines the manifest allows ({:?}) runs on this robot (available: {})",
                    manifest.engines.candidates,
                    names(self.engines.available())
                ),
            )));
        }
        let sha = manifest.artifact.sha256;
        let request = GateRequest {
            candidate: ModelFile {
                path: self.store.model_path(&sha),
                inputs: manifest.inputs.clone(),
                seed: manifest.gate.input_seed(),
                engine: EngineKind::Tract,
                engine_cache: Some(self.store.engine_cache(&sha, &self.engine_key)),
            },
            engines,
            gate: manifest.gate.clone(),
            incumbent: incumbent
                .filter(|_| manifest.gate.max_regression.is_some())
                .map(|m| ModelFile {
                    path: self.store.model_path(&m.sha256()),
                    inputs: m.manifest.inputs.clone(),
                    seed: m.manifest.gate.input_seed(),
                    engine: m.model.engine(),
                    engine_cache: Some(self.store.engine_cache(&m.sha256(), &self.engine_key)),
                }),
            memory_limit_bytes: self.gate.memory_limit_bytes,
            onnxruntime: self.engines.settings().clone(),
            evaluation,
        };
        let incumbent_engine = request.incumbent.as_ref().map(|m| m.engine);
        let child = ChildRequest::Gate(Box::new(request));
        let report = gate::run_in_child(&self.gate.program, &child, self.gate.timeout).await;
        let (runs, incumbent_stats) = match report {
            Ok(GateReport::Measured { engines, incumbent }) => (engines, incumbent),
            Ok(GateReport::NotLoadable { message }) => {
                return Err(Outcome::Rejected((RejectReason::NotLoadable, message)));
            }
            Ok(GateReport::Engines { .. }) => {
                return Err(Outcome::Failed(
                    "benchmark process answered a probe to a gate request".into(),
                ));
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
        let incumbent_stats: Option<BenchStats> = incumbent_stats.map(Into::into);
        let judged = plan::judge_engines(
            &manifest.gate,
            &manifest.engines,
            &runs,
            incumbent_stats.as_ref(),
        );
        let load_ms = runs.iter().map(|r| r.load_ms).max().unwrap_or(0);
        let shown = judged
            .choice
            .or(judged.best_measured)
            .and_then(|e| judged.benches.iter().find(|b| b.engine == e));
        let stats_of = |b: Option<&EngineBench>| {
            b.and_then(|b| b.p99_ms.zip(b.p50_ms))
                .map(|(p99, p50)| (p50, p99))
        };
        let (p50_ms, p99_ms) = stats_of(shown).unwrap_or((0.0, 0.0));
        let mean_ms = shown
            .and_then(|b| runs.iter().find(|r| r.engine == b.engine))
            .and_then(|r| match &r.result {
                EngineResult::Measured { stats, .. } => Some(stats.mean_ms),
                _ => None,
            })
            .unwrap_or(0.0);
        let report = BenchReport {
            runs: manifest.gate.runs.max(1),
            p50_ms,
            p99_ms,
            mean_ms,
            incumbent_p99_ms: incumbent_stats.as_ref().map(|s| s.p99_ms),
            reference_max_abs_err: shown.and_then(|b| b.reference_max_abs_err),
            peak_rss_bytes: shown.and_then(|b| b.peak_rss_bytes),
            passed: judged.choice.is_some(),
            engine: shown.map(|b| b.engine),
            incumbent_engine: incumbent_engine.filter(|_| incumbent_stats.is_some()),
            agreement: shown.and_then(|b| b.agreement),
            engines: judged.benches.clone(),
        };
        info!(
            engine = ?report.engine,
            p50_ms = report.p50_ms,
            p99_ms = report.p99_ms,
            peak_rss_bytes = ?report.peak_rss_bytes,
            passed = report.passed,
            agreement = ?report.agreement,
            measured = report.engines.len(),
            "benchmarked"
        );
        let verdict = judged.choice.ok_or(Outcome::Rejected(judged.refusal));
        Ok((load_ms, report, verdict))
    }
}

fn names(engines: &[EngineKind]) -> String {
    engines
        .iter()
        .map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
