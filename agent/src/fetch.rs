//! Artifact download: SHA-256 while streaming, never more bytes than declared, stall and
//! total deadlines.

use std::path::Path;
use std::time::{Duration, Instant};

use botfleet_protocol::manifest::{Artifact, Sha256Digest};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a download did not produce the declared artifact.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {source}")]
    Network {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("the server sent more than the declared {declared} bytes")]
    TooLarge { declared: u64 },
    #[error("got {got} bytes, the manifest declares {declared}")]
    SizeMismatch { declared: u64, got: u64 },
    #[error("sha256 {got} differs from the manifest's {declared}")]
    DigestMismatch {
        declared: Sha256Digest,
        got: Sha256Digest,
    },
    #[error("download stalled: no byte for {0:?}")]
    Stalled(Duration),
    #[error("download took longer than {0:?}")]
    TimedOut(Duration),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Deadlines of one download.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub stall: Duration,
    pub total: Duration,
}

/// What a finished download measured.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Downloads `url` into `dest`, checking size and digest against `artifact` as bytes arrive.
/// On success `dest` is complete and fsynced; on failure it may hold a prefix.
pub async fn download(
    client: &reqwest::Client,
    url: &str,
    artifact: &Artifact,
    dest: &Path,
    limits: Limits,
) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limits.total;
    let within = |fut| async move {
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::TimedOut(limits.total)),
        }
    };
    within(Box::pin(async {
        let network = |source| FetchError::Network {
            url: url.to_owned(),
            source,
        };
        let mut response = client.get(url).send().await.map_err(network)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: response.status(),
            });
        }
        if response.content_length().is_some_and(|n| n > artifact.size) {
            return Err(FetchError::TooLarge {
                declared: artifact.size,
            });
        }
        let io = |source| FetchError::Io {
            path: dest.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        loop {
            let chunk = match tokio::time::timeout(limits.stall, response.chunk()).await {
                Err(_) => return Err(FetchError::Stalled(limits.stall)),
                Ok(chunk) => chunk.map_err(network)?,
            };
            let Some(chunk) = chunk else { break };
            got += chunk.len() as u64;
            if got > artifact.size {
                return Err(FetchError::TooLarge {
                    declared: artifact.size,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        if got != artifact.size {
            return Err(FetchError::SizeMismatch {
                declared: artifact.size,
                got,
            });
        }
        let digest = Sha256Digest::from_bytes(hasher.finalize().into());
        if digest != artifact.sha256 {
            return Err(FetchError::DigestMismatch {
                declared: artifact.sha256,
                got: digest,
            });
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        Ok(Fetched {
            bytes: got,
            elapsed: started.elapsed(),
        })
    }))
    .await
}
