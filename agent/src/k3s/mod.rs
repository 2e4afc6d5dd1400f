//! Joining the robot to a K3s cluster as an agent node, leaving it, rotating the token.
//!
//! A join runs the [`preflight`], writes our own drop-in
//! `/etc/rancher/k3s/config.yaml.d/50-botfleet.yaml` ([`dropin`]) and the token file (0600,
//! written atomically), then enables and starts `k3s-agent.service` and watches it until it
//! is active or fails in a way we recognise ([`units::classify`]). Every path is taken under
//! a configurable root, so tests run on a temporary directory with a fake `k3s` binary and
//! a fake service manager.
//!
//! The agent daemon runs unprivileged and never does this itself: it hands the request to
//! a root-owned oneshot unit ([`helper`]), which runs this code as `botfleet-agent k3s
//! apply`. Provisioning by hand runs it directly (`botfleet-agent k3s join`, as root).

pub mod dropin;
pub mod files;
pub mod helper;
pub mod preflight;
pub mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use botfleet_protocol::messages::{CommandKind, K3sFailure, K3sState, K3sToken};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::K3sConfig;
use dropin::{DropIn, DropInError};
use preflight::PreflightError;
use units::{ActiveState, UnitError, UnitManager};

/// The token file's path on the robot, as written into the drop-in.
pub const TOKEN_FILE: &str = "/etc/rancher/k3s/botfleet-token";
/// Our drop-in, relative to the root.
const DROP_IN: &str = "etc/rancher/k3s/config.yaml.d/50-botfleet.yaml";
/// How often the unit's state is looked at while waiting for it.
const POLL: Duration = Duration::from_secs(2);

/// Where things are, under a root (`/` on a robot).
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn under_root(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub fn k3s_binary(&self) -> PathBuf {
        self.under_root("usr/local/bin/k3s")
    }

    pub fn nvidia_runtime(&self) -> PathBuf {
        self.under_root("usr/bin/nvidia-container-runtime")
    }

    pub fn drop_in(&self) -> PathBuf {
        self.under_root(DROP_IN)
    }

    pub fn token(&self) -> PathBuf {
        self.under_root(TOKEN_FILE.trim_start_matches('/'))
    }
}

/// One K3s operation, as the server commands it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    Join {
        server_url: String,
        token: K3sToken,
        #[serde(default)]
        node_labels: BTreeMap<String, String>,
    },
    Leave,
    RotateToken {
        token: K3sToken,
    },
}

impl Operation {
    /// The K3s operation a server command asks for, if it is one.
    pub fn from_command(kind: &CommandKind) -> Option<Self> {
        match kind {
            CommandKind::K3sJoin {
                server_url,
                token,
                node_labels,
            } => Some(Self::Join {
                server_url: server_url.clone(),
                token: token.clone(),
                node_labels: node_labels.clone(),
            }),
            CommandKind::K3sLeave => Some(Self::Leave),
            CommandKind::K3sRotateToken { token } => Some(Self::RotateToken {
                token: token.clone(),
            }),
            _ => None,
        }
    }
}

/// Why a K3s operation failed; [`K3sError::failure`] is what gets reported.
#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error("preflight: {0}")]
    Preflight(#[from] PreflightError),
    #[error("{0}")]
    DropIn(#[from] DropInError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("systemd: {0}")]
    Unit(#[from] UnitError),
    #[error("{unit}: {reason:?}: {log}")]
    Rejected {
        unit: String,
        reason: K3sFailure,
        log: String,
    },
    #[error("{unit} not active after {waited:?}; last log: {log}")]
    NotActive {
        unit: String,
        waited: Duration,
        log: String,
    },
    #[error("not joined: {0} is missing")]
    NotJoined(PathBuf),
}

impl K3sError {
    pub fn failure(&self) -> K3sFailure {
        match self {
            K3sError::Preflight(_) => K3sFailure::Preflight,
            K3sError::DropIn(_) | K3sError::NotJoined(_) => K3sFailure::BadRequest,
            K3sError::Io { .. } | K3sError::Unit(_) => K3sFailure::System,
            K3sError::Rejected { reason, .. } => *reason,
            K3sError::NotActive { .. } => K3sFailure::NotActive,
        }
    }
}

/// This robot as a K3s node.
#[derive(Debug)]
pub struct Node<U> {
    pub paths: Paths,
    pub units: U,
    pub unit: String,
    /// The device id.
    pub node_name: String,
    /// Derived and configured device labels (names without prefix).
    pub labels: BTreeMap<String, String>,
    pub label_prefix: String,
    pub taint: String,
    pub timeout: Duration,
}

impl<U: UnitManager> Node<U> {
    pub fn new(
        config: &K3sConfig,
        node_name: &str,
        labels: BTreeMap<String, String>,
        units: U,
    ) -> Self {
        Self {
            paths: Paths::new(&config.root),
            units,
            unit: config.unit.clone(),
            node_name: node_name.to_owned(),
            labels,
            label_prefix: config.label_prefix.clone(),
            taint: config.taint.clone(),
            timeout: Duration::from_secs(config.join_timeout_s),
        }
    }

    /// Runs `op` and says where it ended, failures included.
    pub async fn apply(&self, op: &Operation) -> K3sState {
        let result = match op {
            Operation::Join {
                server_url,
                token,
                node_labels,
            } => self.join(server_url, token, node_labels).await,
            Operation::Leave => self.leave().await.map(|()| K3sState::Left),
            Operation::RotateToken { token } => self.rotate(token).await,
        };
        result.unwrap_or_else(|e| {
            warn!(error = %e, unit = %self.unit, "k3s operation failed");
            K3sState::Failed {
                reason: e.failure(),
                message: e.to_string(),
            }
        })
    }

    pub async fn join(
        &self,
        server_url: &str,
        token: &K3sToken,
        extra_labels: &BTreeMap<String, String>,
    ) -> Result<K3sState, K3sError> {
        let found = preflight::check(&self.paths).await?;
        let mut labels = self.labels.clone();
        labels.extend(extra_labels.clone());
        let text = DropIn {
            server_url: server_url.to_owned(),
            token_file: TOKEN_FILE.to_owned(),
            node_name: self.node_name.clone(),
            labels,
            label_prefix: self.label_prefix.clone(),
            taint: self.taint.clone(),
            nvidia_runtime: found.nvidia_runtime,
        }
        .render()?;
        write(&self.paths.token(), token.0.as_bytes(), 0o600)?;
        write(&self.paths.drop_in(), text.as_bytes(), 0o600)?;
        let since = SystemTime::now();
        self.units.enable_now(&self.unit).await?;
        self.wait_active(since).await?;
        info!(node = %self.node_name, server = %server_url, k3s = %found.k3s_version, "joined K3s");
        Ok(K3sState::Joined {
            node_name: self.node_name.clone(),
            server_url: server_url.to_owned(),
            k3s_version: found.k3s_version,
            nvidia_runtime: found.nvidia_runtime,
        })
    }

    /// Stops and disables the K3s agent and removes our files (the k3s data stays).
    pub async fn leave(&self) -> Result<(), K3sError> {
        self.units.disable_now(&self.unit).await?;
        for path in [self.paths.drop_in(), self.paths.token()] {
            files::remove_if_present(&path).map_err(|source| K3sError::Io { path, source })?;
        }
        info!(node = %self.node_name, "left K3s");
        Ok(())
    }

    /// Rewrites the token and restarts the agent with it.
    pub async fn rotate(&self, token: &K3sToken) -> Result<K3sState, K3sError> {
        let drop_in = self.paths.drop_in();
        let text =
            std::fs::read_to_string(&drop_in).map_err(|_| K3sError::NotJoined(drop_in.clone()))?;
        let server_url = dropin::server_url_of(&text).ok_or(K3sError::NotJoined(drop_in))?;
        let found = preflight::check(&self.paths).await?;
        write(&self.paths.token(), token.0.as_bytes(), 0o600)?;
        let since = SystemTime::now();
        self.units.restart(&self.unit).await?;
        self.wait_active(since).await?;
        info!(node = %self.node_name, "K3s token rotated");
        Ok(K3sState::Joined {
            node_name: self.node_name.clone(),
            server_url,
            k3s_version: found.k3s_version,
            nvidia_runtime: found.nvidia_runtime,
        })
    }

    /// Until the unit is active, its log shows a known failure, or the time is up.
    async fn wait_active(&self, since: SystemTime) -> Result<(), K3sError> {
        let started = tokio::time::Instant::now();
        loop {
            let state = self.units.active_state(&self.unit).await?;
            if state == ActiveState::Active {
                return Ok(());
            }
            let log = self.units.log_since(&self.unit, since).await?;
            if let Some(reason) = units::classify(&log) {
                return Err(K3sError::Rejected {
                    unit: self.unit.clone(),
                    reason,
                    log: tail(&log),
                });
            }
            if started.elapsed() >= self.timeout {
                return Err(K3sError::NotActive {
                    unit: self.unit.clone(),
                    waited: self.timeout,
                    log: tail(&log),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), K3sError> {
    files::write_atomic(path, bytes, mode).map_err(|source| K3sError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The last few lines of a log, for a report.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(3)..].join("\n")
}

#[cfg(test)]
mod tests;
