//! Artifact download.
//!
//! - SHA-256 computed while streaming; never more bytes than the manifest declares.
//! - Resume with `Range` + `If-Range` (the validator from the first response is kept beside
//!   the partial file), so an interrupted download — or a restarted agent — continues where
//!   it stopped, and a file that changed on the server in between is never spliced.
//! - A stall deadline (no byte for N s), a total deadline, and retries with full-jitter
//!   backoff inside it.
//! - A free-space check before writing; a failed write removes the partial file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use botfleet_protocol::manifest::{Artifact, Sha256Digest};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::backoff::Backoff;

/// What a download must produce: exactly this many bytes with this digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub size: u64,
    pub sha256: Sha256Digest,
}

impl From<&Artifact> for Expected {
    fn from(artifact: &Artifact) -> Self {
        Self {
            size: artifact.size,
            sha256: artifact.sha256,
        }
    }
}

impl From<&botfleet_protocol::evaluation::Evaluation> for Expected {
    fn from(set: &botfleet_protocol::evaluation::Evaluation) -> Self {
        Self {
            size: set.size,
            sha256: set.sha256,
        }
    }
}

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
    Status { url: String, status: StatusCode },
    #[error("the server sent more than the declared {declared} bytes")]
    TooLarge { declared: u64 },
    #[error("got {got} bytes, the manifest declares {declared}")]
    SizeMismatch { declared: u64, got: u64 },
    #[error("the connection ended after {got} of {declared} bytes")]
    Truncated { declared: u64, got: u64 },
    #[error("sha256 {got} differs from the manifest's {declared}")]
    DigestMismatch {
        declared: Sha256Digest,
        got: Sha256Digest,
    },
    #[error("download stalled: no byte for {0:?}")]
    Stalled(Duration),
    #[error("download took longer than {0:?}")]
    TimedOut(Duration),
    #[error("not enough disk space: {needed} bytes needed, {available} available in {dir}")]
    NoSpace {
        needed: u64,
        available: u64,
        dir: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    /// Worth another attempt within the same download (the network, not the file).
    fn transient(&self) -> bool {
        match self {
            FetchError::Network { .. } | FetchError::Stalled(_) | FetchError::Truncated { .. } => {
                true
            }
            FetchError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// Deadlines and retries of one download.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub stall: Duration,
    pub total: Duration,
    /// Attempts (first try included) before giving up, within `total`.
    pub attempts: u32,
    /// First retry delay ceiling; doubles per attempt (full jitter).
    pub retry_initial: Duration,
}

/// What a finished download measured.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub bytes: u64,
    /// Bytes already on disk (from an earlier attempt or run) when the last attempt began.
    pub resumed_from: u64,
    pub attempts: u32,
    pub elapsed: Duration,
}

/// The validator of a partial download, kept beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Validator {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validator {
    fn if_range(&self) -> Option<&str> {
        // A strong ETag is the safe validator; Last-Modified is the fallback RFC 9110 allows.
        self.etag
            .as_deref()
            .filter(|e| !e.starts_with("W/"))
            .or(self.last_modified.as_deref())
    }
}

fn meta_path(dest: &Path) -> PathBuf {
    dest.with_extension("meta")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Removes a partial download and its validator.
pub async fn discard(dest: &Path) {
    let _ = tokio::fs::remove_file(dest).await;
    let _ = tokio::fs::remove_file(meta_path(dest)).await;
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
fn available_space(dir: &Path) -> Result<u64, FetchError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| FetchError::Io {
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Downloads `url` into `dest`, resuming what an earlier attempt left there.
/// On success `dest` is complete, checked and fsynced.
pub async fn download(
    client: &reqwest::Client,
    url: &str,
    artifact: impl Into<Expected>,
    dest: &Path,
    limits: Limits,
) -> Result<Fetched, FetchError> {
    let artifact = artifact.into();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limits.total;
    let mut backoff = Backoff::new(limits.retry_initial, limits.retry_initial * 32);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = tokio::time::timeout_at(
            deadline,
            attempt_once(client, url, &artifact, dest, limits.stall),
        )
        .await
        .unwrap_or(Err(FetchError::TimedOut(limits.total)));
        match outcome {
            Ok((bytes, offset)) => {
                let _ = tokio::fs::remove_file(meta_path(dest)).await;
                return Ok(Fetched {
                    bytes,
                    resumed_from: offset,
                    attempts: attempt,
                    elapsed: started.elapsed(),
                });
            }
            Err(e) if e.transient() && attempt < limits.attempts => {
                let delay = backoff.next_delay();
                warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "download interrupted; will resume");
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(FetchError::TimedOut(limits.total));
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                // Keep a partial file only where resuming it can help.
                if !e.transient() && !matches!(e, FetchError::TimedOut(_)) {
                    discard(dest).await;
                }
                return Err(e);
            }
        }
    }
}

/// One HTTP exchange: resume from what `dest` holds when its validator still applies.
/// Returns (total bytes, offset resumed from).
async fn attempt_once(
    client: &reqwest::Client,
    url: &str,
    artifact: &Expected,
    dest: &Path,
    stall: Duration,
) -> Result<(u64, u64), FetchError> {
    let have = tokio::fs::metadata(dest)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let validator: Option<Validator> = tokio::fs::read(meta_path(dest))
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|v: &Validator| v.url == url);
    let resume = match (&validator, have) {
        (Some(v), 1..) if have < artifact.size && v.if_range().is_some() => Some(v),
        _ => None,
    };
    let dir = dest.parent().unwrap_or(Path::new("."));
    let needed = artifact.size - resume.map_or(0, |_| have);
    let available = available_space(dir)?;
    if available < needed {
        return Err(FetchError::NoSpace {
            needed,
            available,
            dir: dir.display().to_string(),
        });
    }

    let network = |source| FetchError::Network {
        url: url.to_owned(),
        source,
    };
    let mut request = client.get(url);
    if let Some(v) = resume {
        request = request
            .header(RANGE, format!("bytes={have}-"))
            .header(IF_RANGE, v.if_range().unwrap_or_default());
    }
    let mut response = request.send().await.map_err(network)?;
    let status = response.status();
    let offset = match status {
        StatusCode::PARTIAL_CONTENT if resume.is_some() => {
            check_content_range(&response, have, artifact.size)?;
            have
        }
        StatusCode::OK => 0, // a fresh start (no resume, or If-Range said the file changed)
        other => {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: other,
            });
        }
    };
    if response
        .content_length()
        .is_some_and(|n| n > artifact.size - offset)
    {
        return Err(FetchError::TooLarge {
            declared: artifact.size,
        });
    }

    let mut hasher = Sha256::new();
    let mut file = if offset > 0 {
        info!(offset, total = artifact.size, "resuming download");
        // The prefix on disk must be hashed too: read it once, then append.
        let mut f = tokio::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(dest)
            .await
            .map_err(io_err(dest))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).await.map_err(io_err(dest))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        f
    } else {
        let validator = Validator {
            url: url.to_owned(),
            etag: header(&response, ETAG),
            last_modified: header(&response, LAST_MODIFIED),
        };
        let meta = serde_json::to_vec(&validator).unwrap_or_default();
        tokio::fs::write(meta_path(dest), meta)
            .await
            .map_err(io_err(dest))?;
        tokio::fs::File::create(dest).await.map_err(io_err(dest))?
    };

    let mut got = offset;
    loop {
        let chunk = match tokio::time::timeout(stall, response.chunk()).await {
            Err(_) => return Err(FetchError::Stalled(stall)),
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
        if let Err(e) = file.write_all(&chunk).await {
            // Disk full or worse: nothing to resume from.
            drop(file);
            discard(dest).await;
            return Err(io_err(dest)(e));
        }
        if got > offset && got < artifact.size && got - (chunk.len() as u64) == offset {
            let _ = file.flush().await;
            crate::failpoint::hit("mid-download");
        }
    }
    if got < artifact.size {
        return Err(FetchError::Truncated {
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
    file.flush().await.map_err(io_err(dest))?;
    file.sync_all().await.map_err(io_err(dest))?;
    Ok((got, offset))
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `Content-Range: bytes {have}-{size-1}/{size}` or the download cannot be trusted.
fn check_content_range(
    response: &reqwest::Response,
    have: u64,
    size: u64,
) -> Result<(), FetchError> {
    let expected = format!("bytes {have}-{}/{size}", size - 1);
    match header(response, CONTENT_RANGE) {
        Some(range) if range == expected => Ok(()),
        Some(range) => {
            let total = range.rsplit('/').next().and_then(|t| t.parse().ok());
            Err(FetchError::SizeMismatch {
                declared: size,
                got: total.unwrap_or(0),
            })
        }
        None => Err(FetchError::SizeMismatch {
            declared: size,
            got: 0,
        }),
    }
}
