//! The hand-off between the unprivileged agent and the root-owned K3s helper.
//!
//! The agent writes `request.json` (0600, atomically) into `{data_dir}/k3s/`; the root
//! path unit `botfleet-k3s.path` notices it and starts the oneshot `botfleet-k3s.service`,
//! which runs `botfleet-agent k3s apply`: it takes the request (deleting it, token and
//! all), runs the [`super::Operation`] with the node name and labels from the root-owned
//! configuration, and writes `result.json`, which the agent reports. The agent chooses
//! only the operation, the server URL, the token and extra labels; it never writes a byte
//! of the K3s configuration or touches a unit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use botfleet_protocol::CommandId;
use botfleet_protocol::messages::{K3sFailure, K3sNode, K3sState};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::units::UnitManager;
use super::{Node, Operation, files};

const REQUEST: &str = "request.json";
const RESULT: &str = "result.json";
/// How often the agent looks for the helper's answer.
const POLL: Duration = Duration::from_secs(1);

/// A K3s operation asked for by one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command_id: CommandId,
    #[serde(flatten)]
    pub op: Operation,
}

/// Why the hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0} is not a plain directory; refusing to use it")]
    NotADirectory(PathBuf),
}

/// The directory both sides use.
#[derive(Debug, Clone)]
pub struct Handoff {
    dir: PathBuf,
}

impl Handoff {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("k3s"),
        }
    }

    pub fn request_path(&self) -> PathBuf {
        self.dir.join(REQUEST)
    }

    pub fn result_path(&self) -> PathBuf {
        self.dir.join(RESULT)
    }

    /// Agent side: asks the helper for `request`.
    pub fn submit(&self, request: &Request) -> Result<(), HandoffError> {
        let path = self.request_path();
        let bytes = serde_json::to_vec(request).map_err(|source| HandoffError::Parse {
            path: path.clone(),
            source,
        })?;
        files::write_atomic(&path, &bytes, 0o600)
            .map_err(|source| HandoffError::Io { path, source })
    }

    /// Agent side: submits `op` and waits for its outcome (see [`Self::outcome`]).
    pub async fn ask(self, command_id: CommandId, op: Operation, limit: Duration) -> K3sNode {
        let request = Request {
            command_id: command_id.clone(),
            op,
        };
        if let Err(e) = self.submit(&request) {
            return K3sNode {
                command_id,
                at: Timestamp::now(),
                state: K3sState::Failed {
                    reason: K3sFailure::System,
                    message: e.to_string(),
                },
            };
        }
        self.outcome(&command_id, limit).await
    }

    /// The last result the helper wrote, if any.
    pub fn last(&self) -> Option<K3sNode> {
        let text = std::fs::read(self.result_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Agent side: waits for the helper's answer to `command_id`; after `limit` the answer
    /// is a failure that names the helper.
    pub async fn outcome(&self, command_id: &CommandId, limit: Duration) -> K3sNode {
        let wait = async {
            loop {
                match self.last() {
                    Some(node) if &node.command_id == command_id => return node,
                    _ => tokio::time::sleep(POLL).await,
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(node) => node,
            Err(_) => K3sNode {
                command_id: command_id.clone(),
                at: Timestamp::now(),
                state: K3sState::Failed {
                    reason: K3sFailure::System,
                    message: format!(
                        "no answer from botfleet-k3s.service within {limit:?} \
                         (is botfleet-k3s.path enabled?)"
                    ),
                },
            },
        }
    }

    /// Helper side: takes the pending request, if there is one, and answers it.
    pub async fn serve<U: UnitManager>(
        &self,
        node: &Node<U>,
    ) -> Result<Option<K3sNode>, HandoffError> {
        // The agent owns the directory: it must not point the helper (root) elsewhere.
        let meta = std::fs::symlink_metadata(&self.dir).map_err(|source| HandoffError::Io {
            path: self.dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(HandoffError::NotADirectory(self.dir.clone()));
        }
        let path = self.request_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HandoffError::Io { path, source }),
        };
        files::remove_if_present(&path).map_err(|source| HandoffError::Io {
            path: path.clone(),
            source,
        })?;
        let request: Request = serde_json::from_slice(&bytes)
            .map_err(|source| HandoffError::Parse { path, source })?;
        let answer = K3sNode {
            command_id: request.command_id,
            state: node.apply(&request.op).await,
            at: Timestamp::now(),
        };
        let path = self.result_path();
        let bytes = serde_json::to_vec_pretty(&answer).map_err(|source| HandoffError::Parse {
            path: path.clone(),
            source,
        })?;
        files::write_atomic(&path, &bytes, 0o644)
            .map_err(|source| HandoffError::Io { path, source })?;
        Ok(Some(answer))
    }
}
