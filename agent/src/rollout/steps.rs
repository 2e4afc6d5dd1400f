//! The two slow steps of an install: getting the artifact, and the benchmark gate.

use botfleet_engine::BenchStats;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{BenchReport, DesiredModel, RejectReason, Stage};
use botfleet_protocol::{Manifest, SlotName, Verified};
use tracing::info;

use super::{Outcome, Reconciler, plan};
use crate::fetch::{self, FetchError};
use crate::gate::{self, GateError, GateReport, GateRequest, ModelFile};
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
    pub(super) async fn gate(
        &self,
        manifest: &Verified<Manifest>,
        incumbent: Option<&ServingModel>,
    ) -> Result<(u64, BenchReport, Result<(), Outcome>), Outcome> {
        let request = GateRequest {
            candidate: ModelFile {
                path: self.store.model_path(&manifest.artifact.sha256),
                inputs: manifest.inputs.clone(),
                seed: manifest.gate.input_seed(),
            },
            gate: manifest.gate.clone(),
            incumbent: incumbent
                .filter(|_| manifest.gate.max_regression.is_some())
                .map(|m| ModelFile {
                    path: self.store.model_path(&m.sha256()),
                    inputs: m.manifest.inputs.clone(),
                    seed: m.manifest.gate.input_seed(),
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
            engine: None,
            incumbent_engine: None,
            engines: vec![],
        };
        info!(p50_ms = report.p50_ms, p99_ms = report.p99_ms, peak_rss_bytes = ?peak, passed = report.passed, "benchmarked");
        Ok((load_ms, report, verdict.map_err(Outcome::Rejected)))
    }
}
