//! The uploader: sends the spool to the server, oldest first, one
//! `PUT {url}/api/v1/devices/{id}/samples/{sha256}` per sample with the file as the body and
//! `Authorization: Bearer {device token}`.
//!
//! A sample leaves the spool only once the server answered 200 or 201 (it has it). Other
//! 4xx answers but 401, 403 and 429 refuse the sample for good: it is deleted, counted and
//! the reason logged. 401, 403, 429, 5xx and network errors keep it and back off
//! ([`crate::backoff`]); a connection cut half-way only means the sample is sent again.
//! The body goes through a [`Throttle`]; uploads wait outside `upload.windows` and while
//! the link is metered, and say why in telemetry (`upload_waiting`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use botfleet_protocol::DeviceId;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::InstallWindow;
use bytes::Bytes;
use jiff::{Timestamp, ZonedDateTime};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metered::Metered;
use super::settings::{DeviceToken, UploadSettings};
use super::spool::{Entry, Spool};
use crate::backoff::Backoff;

/// Retry pacing after a failed upload.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Time an upload may take beyond what the throttle needs.
const REQUEST_MARGIN: Duration = Duration::from_secs(60);
/// The most of a refusal's body kept for the log.
const MAX_REASON: usize = 512;
/// Why uploads wait while the link is metered.
pub const WAIT_METERED: &str = "metered";
/// Why uploads wait outside the windows.
pub const WAIT_WINDOW: &str = "outside the upload windows";

/// What the uploader did since the agent started, and why it waits now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadState {
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub refused: u64,
    /// Uploads tried, whatever their outcome.
    pub attempts: u64,
    pub waiting: Option<String>,
}

/// Why uploads may not run now.
#[derive(Debug, Clone, PartialEq)]
pub enum Waiting {
    Metered,
    /// Outside every window; the next one opens then.
    Outside {
        opens_at: Option<Timestamp>,
    },
}

impl Waiting {
    pub fn reason(&self) -> &'static str {
        match self {
            Waiting::Metered => WAIT_METERED,
            Waiting::Outside { .. } => WAIT_WINDOW,
        }
    }
}

/// Whether uploads must wait at `now` (local time): metered, or outside every window (no
/// windows: always inside).
pub fn waiting(metered: bool, windows: &[InstallWindow], now: &ZonedDateTime) -> Option<Waiting> {
    if metered {
        return Some(Waiting::Metered);
    }
    if windows.is_empty() || windows.iter().any(|w| w.contains(now.time())) {
        return None;
    }
    let opens_at = windows.iter().filter_map(|w| w.opens_after(now)).min();
    Some(Waiting::Outside { opens_at })
}

/// What an answer means for the sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The server has it: delete it from the spool.
    Taken,
    /// The server will never take it: delete it and count it.
    Refused,
    /// Not now (auth, rate, server trouble): keep it and back off.
    Retry,
}

/// The meaning of an HTTP status for an upload.
pub fn classify(status: StatusCode) -> Class {
    match status.as_u16() {
        200 | 201 => Class::Taken,
        401 | 403 | 429 => Class::Retry,
        400..=499 => Class::Refused,
        _ => Class::Retry,
    }
}

/// A bandwidth cap: a token bucket that starts empty and holds at most one chunk, so the
/// bytes sent by any time `t` after the start are at most `rate·t` plus one chunk. Time is
/// passed in.
#[derive(Debug, Clone)]
pub struct Throttle {
    rate: f64,
    chunk: usize,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(bytes_per_s: u64, now: Instant) -> Self {
        let rate = bytes_per_s.max(1);
        // About 20 chunks a second, so one chunk's burst is a small part of a second.
        let chunk = usize::try_from(rate / 20)
            .unwrap_or(usize::MAX)
            .clamp(64, 16 * 1024);
        Self {
            rate: rate as f64,
            chunk,
            tokens: 0.0,
            last: now,
        }
    }

    /// The size of the pieces the body is sent in.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Takes room for `n` bytes at `now`: how long to wait before sending them.
    pub fn reserve(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.chunk as f64);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// The least time `bytes` take at this rate.
    pub fn time_for(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.rate)
    }
}

/// `body` in the throttle's chunks, each sent only once the throttle has room for it.
pub fn throttled(
    body: Bytes,
    throttle: Arc<Mutex<Throttle>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold((body, throttle), |(mut rest, throttle)| async move {
        if rest.is_empty() {
            return None;
        }
        let (delay, chunk) = {
            let mut t = throttle.lock().unwrap_or_else(PoisonError::into_inner);
            let n = t.chunk().min(rest.len());
            (t.reserve(n, Instant::now()), rest.split_to(n))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok(chunk), (rest, throttle)))
    })
}

/// How one upload ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Taken {
        bytes: u64,
    },
    Refused(String),
    Retry(String),
    /// The file is gone or unreadable (a spool bound took it, the disk failed).
    Lost(String),
    /// Stopped half-way because the link became metered.
    Interrupted,
}

/// The uploader task's state.
#[derive(Debug)]
pub struct Uploader {
    device: DeviceId,
    base_url: String,
    token: DeviceToken,
    windows: Vec<InstallWindow>,
    interval: Duration,
    spool: Arc<Spool>,
    metered: Metered,
    http: reqwest::Client,
    throttle: Option<Arc<Mutex<Throttle>>>,
    backoff: Backoff,
    state: watch::Sender<UploadState>,
    /// Local time now (tests set it).
    clock: fn() -> ZonedDateTime,
}

impl Uploader {
    pub fn new(
        device: DeviceId,
        settings: &UploadSettings,
        spool: Arc<Spool>,
        metered: Metered,
        http: reqwest::Client,
        state: watch::Sender<UploadState>,
    ) -> Self {
        Self {
            device,
            base_url: settings.base_url.clone(),
            token: settings.token.clone(),
            windows: settings.windows.clone(),
            interval: settings.interval,
            spool,
            metered,
            http,
            throttle: (settings.max_bytes_per_s > 0).then(|| {
                Arc::new(Mutex::new(Throttle::new(
                    settings.max_bytes_per_s,
                    Instant::now(),
                )))
            }),
            backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX),
            state,
            clock: ZonedDateTime::now,
        }
    }

    /// Retries after `initial`, doubling up to `max` (tests make it short).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// Reads local time from `clock` (tests).
    pub fn with_clock(mut self, clock: fn() -> ZonedDateTime) -> Self {
        self.clock = clock;
        self
    }

    /// What the uploader did; changes after every attempt and every change of `waiting`.
    pub fn subscribe(&self) -> watch::Receiver<UploadState> {
        self.state.subscribe()
    }

    fn set_waiting(&self, waiting: Option<String>) {
        self.state.send_if_modified(|s| {
            let changed = s.waiting != waiting;
            s.waiting = waiting;
            changed
        });
    }

    /// Uploads until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut metered = self.metered.subscribe();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            self.spool.enforce(Timestamp::now());
            let now = (self.clock)();
            let is_metered = *metered.borrow_and_update();
            if let Some(wait) = waiting(is_metered, &self.windows, &now) {
                self.set_waiting(Some(wait.reason().to_owned()));
                let recheck = match wait {
                    Waiting::Outside {
                        opens_at: Some(opens_at),
                    } => opens_at
                        .duration_since(now.timestamp())
                        .try_into()
                        .unwrap_or(Duration::ZERO)
                        .min(self.interval)
                        .max(Duration::from_secs(1)),
                    _ => self.interval,
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = metered.changed() => {}
                    () = tokio::time::sleep(recheck) => {}
                }
                continue;
            }
            let Some(entry) = self.spool.oldest() else {
                self.set_waiting(None);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = self.spool.added() => {}
                    _ = metered.changed() => {}
                    () = tokio::time::sleep(self.interval) => {}
                }
                continue;
            };
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = self.send(&entry) => outcome,
                _ = metered.wait_for(|m| *m) => Outcome::Interrupted,
            };
            self.done(&entry, outcome, &cancel).await;
        }
    }

    /// Books one upload's outcome; after a failure, waits out the backoff.
    async fn done(&mut self, entry: &Entry, outcome: Outcome, cancel: &CancellationToken) {
        let sha = entry.sha256.short();
        match outcome {
            Outcome::Taken { bytes } => {
                let _ = self.spool.remove(entry);
                self.backoff.reset();
                debug!(sample = %sha, bytes, "sample uploaded");
                self.state.send_modify(|s| {
                    s.attempts += 1;
                    s.uploaded += 1;
                    s.uploaded_bytes += bytes;
                    s.waiting = None;
                });
            }
            Outcome::Refused(reason) => {
                let _ = self.spool.remove(entry);
                warn!(sample = %sha, %reason, "the server refused a sample; deleted");
                self.state.send_modify(|s| {
                    s.attempts += 1;
                    s.refused += 1;
                });
            }
            Outcome::Lost(reason) => {
                // A sample a spool bound took meanwhile was counted when it went.
                if self.spool.remove(entry) {
                    self.spool.count_lost();
                    warn!(sample = %sha, %reason, "a spooled sample could not be read; deleted");
                }
            }
            Outcome::Interrupted => {
                info!(sample = %sha, "upload stopped: the link is metered; it is sent again later");
            }
            Outcome::Retry(reason) => {
                let delay = self.backoff.next_delay();
                info!(sample = %sha, %reason, retry_in = ?delay, "upload failed; the sample stays in the spool");
                self.state.send_modify(|s| {
                    s.attempts += 1;
                    s.waiting = Some(format!("retrying after: {reason}"));
                });
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// The URL one sample goes to.
    pub fn url(&self, sha256: &Sha256Digest) -> String {
        format!(
            "{}/api/v1/devices/{}/samples/{}",
            self.base_url,
            self.device,
            sha256.to_hex()
        )
    }

    /// One `PUT`.
    async fn send(&self, entry: &Entry) -> Outcome {
        let path = self.spool.path(entry);
        let file = match tokio::fs::read(&path).await {
            Ok(file) => Bytes::from(file),
            Err(e) => return Outcome::Lost(format!("{}: {e}", path.display())),
        };
        let actual = Sha256Digest::of(&file);
        if actual != entry.sha256 {
            return Outcome::Lost(format!(
                "{} changed on disk (sha256 {})",
                path.display(),
                actual.short()
            ));
        }
        let bytes = file.len() as u64;
        let (body, limit) = match &self.throttle {
            Some(throttle) => {
                let time = throttle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .time_for(bytes);
                let stream = throttled(file, Arc::clone(throttle));
                (reqwest::Body::wrap_stream(stream), time + REQUEST_MARGIN)
            }
            None => (reqwest::Body::from(file), REQUEST_MARGIN),
        };
        let sent = self
            .http
            .put(self.url(&entry.sha256))
            .header(AUTHORIZATION, format!("Bearer {}", self.token.expose()))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, bytes)
            .timeout(limit)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return Outcome::Retry(error_chain(&e)),
        };
        let status = response.status();
        match classify(status) {
            Class::Taken => Outcome::Taken { bytes },
            Class::Refused => Outcome::Refused(reason(status, response).await),
            Class::Retry => Outcome::Retry(reason(status, response).await),
        }
    }
}

/// An error with its causes, for the log (reqwest's own text stops at the outermost).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The status and the server's `{"error"}` (or the start of its body; at most a few KiB of
/// it are read).
async fn reason(status: StatusCode, mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < 4 * MAX_REASON {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let said = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    let said: String = said.chars().take(MAX_REASON).collect();
    if said.trim().is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", said.trim())
    }
}

#[cfg(test)]
#[path = "upload_tests.rs"]
mod tests;
