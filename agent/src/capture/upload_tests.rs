//! The uploader against a small in-process server on loopback, and its pure parts: how an
//! answer is read, when uploads wait, and the throttle's arithmetic on a paused clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use futures_util::StreamExt;
use jiff::ZonedDateTime;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::capture::settings::SpoolBounds;
use crate::capture::spool::unix_ns;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn answers_are_read_as_taken_refused_or_retried() {
    let class = |code: u16| classify(StatusCode::from_u16(code).unwrap());
    assert_eq!(class(201), Class::Taken);
    assert_eq!(class(200), Class::Taken);
    for refused in [400, 404, 409, 413, 422] {
        assert_eq!(class(refused), Class::Refused, "{refused}");
    }
    for retried in [401, 403, 429, 500, 502, 503, 504, 302] {
        assert_eq!(class(retried), Class::Retry, "{retried}");
    }
}

fn local(time: &str) -> ZonedDateTime {
    format!("2026-06-01T{time}[UTC]").parse().unwrap()
}

#[test]
fn uploads_wait_while_metered_and_outside_every_window() {
    let night: InstallWindow = "22:00-05:00".parse().unwrap();
    let lunch: InstallWindow = "12:00-13:00".parse().unwrap();
    assert_eq!(
        waiting(false, &[], &local("15:00:00")),
        None,
        "no windows: always"
    );
    assert_eq!(
        waiting(true, &[], &local("15:00:00")),
        Some(Waiting::Metered)
    );
    assert_eq!(waiting(false, &[night, lunch], &local("23:30:00")), None);
    assert_eq!(waiting(false, &[night, lunch], &local("12:10:00")), None);
    let outside = waiting(false, &[night, lunch], &local("15:00:00")).unwrap();
    assert_eq!(outside.reason(), WAIT_WINDOW);
    assert_eq!(
        outside,
        Waiting::Outside {
            opens_at: Some("2026-06-01T22:00:00Z".parse().unwrap())
        }
    );
    // Metered wins inside a window too.
    assert_eq!(
        waiting(true, &[night], &local("23:00:00"))
            .unwrap()
            .reason(),
        WAIT_METERED
    );
}

/// Sends `total` bytes through a throttle of `cap` bytes a second as the uploader does,
/// on the paused clock; returns when each chunk went and its size.
async fn pace(cap: u64, total: usize) -> Vec<(Duration, usize)> {
    let start = Instant::now();
    let throttle = Arc::new(Mutex::new(Throttle::new(cap, start)));
    let body = Bytes::from(vec![7u8; total]);
    let mut stream = std::pin::pin!(throttled(body, throttle));
    let mut sent = Vec::new();
    while let Some(chunk) = stream.next().await {
        sent.push((start.elapsed(), chunk.unwrap().len()));
    }
    sent
}

/// The most bytes sent in any window of `window` starting at a chunk.
fn busiest(sent: &[(Duration, usize)], window: Duration) -> usize {
    sent.iter()
        .map(|&(from, _)| {
            sent.iter()
                .filter(|(at, _)| *at >= from && *at < from + window)
                .map(|(_, n)| n)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn the_throttle_holds_the_cap_over_any_window_of_seconds() {
    for cap in [1_000u64, 50_000, 1_000_000] {
        let total = (cap * 10) as usize;
        let sent = pace(cap, total).await;
        assert_eq!(sent.iter().map(|(_, n)| n).sum::<usize>(), total);
        let window = Duration::from_secs(3);
        let most = busiest(&sent, window) as f64;
        let allowed = cap as f64 * 3.0;
        assert!(most <= allowed * 1.1, "cap {cap}: {most} bytes in 3 s");
        // And it is a cap, not a crawl: ten seconds' worth takes about ten seconds.
        let took = sent.last().unwrap().0.as_secs_f64();
        assert!((9.0..=10.5).contains(&took), "cap {cap}: took {took} s");
        // The first second too.
        let first: usize = sent
            .iter()
            .filter(|(at, _)| *at < Duration::from_secs(1))
            .map(|(_, n)| n)
            .sum();
        assert!(
            first as f64 <= cap as f64 * 1.1,
            "cap {cap}: {first} in the first second"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_throttle_saves_up_at_most_one_chunk() {
    let start = Instant::now();
    let mut throttle = Throttle::new(10_000, start);
    assert_eq!(throttle.chunk(), 500);
    assert_eq!(throttle.reserve(500, start), Duration::from_millis(50));
    let later = start + Duration::from_secs(60);
    assert_eq!(
        throttle.reserve(500, later),
        Duration::ZERO,
        "one chunk saved up"
    );
    assert_eq!(throttle.reserve(500, later), Duration::from_millis(50));
    assert_eq!(throttle.reserve(500, later), Duration::from_millis(100));
}

/// What the test server saw of one upload.
#[derive(Debug, Clone)]
struct Received {
    device: String,
    sha256: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<(StatusCode, &'static str)>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

async fn upload(
    State(script): State<Script>,
    Path((device, sha256)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    script.received.lock().unwrap().push(Received {
        device,
        sha256,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.to_vec(),
    });
    let (status, error) = script
        .answers
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((StatusCode::CREATED, ""));
    (status, serde_json::json!({ "error": error }).to_string())
}

/// A listener that cuts its first `cut` connections after some bytes of the request.
struct Cutting {
    inner: tokio::net::TcpListener,
    cut: usize,
}

impl axum::serve::Listener for Cutting {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((mut stream, addr)) = self.inner.accept().await else {
                continue;
            };
            if self.cut == 0 {
                return (stream, addr);
            }
            self.cut -= 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut read = 0;
                while read < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
                // Dropped with the rest unread: the client sees the connection reset.
            });
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The test server; answers as `script` says (201 when it runs out).
async fn server(script: Script, cut: usize) -> String {
    let app = Router::new()
        .route("/api/v1/devices/{id}/samples/{sha}", put(upload))
        .layer(DefaultBodyLimit::max(16 << 20))
        .with_state(script);
    let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", inner.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(Cutting { inner, cut }, app).await });
    url
}

struct Rig {
    _dir: tempfile::TempDir,
    spool: Arc<Spool>,
    metered: Metered,
    state: watch::Receiver<UploadState>,
    cancel: CancellationToken,
    uploader: Option<Uploader>,
}

impl Rig {
    fn new(url: &str, max_bytes_per_s: u64, windows: Vec<InstallWindow>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bounds = SpoolBounds {
            max_bytes: 1 << 30,
            max_samples: 100,
            max_age: None,
        };
        let spool = Arc::new(Spool::open(
            &dir.path().join("spool"),
            bounds,
            Timestamp::now(),
        ));
        let metered = Metered::open(dir.path());
        let settings = UploadSettings {
            base_url: url.to_owned(),
            token: DeviceToken::new("secret-token"),
            max_bytes_per_s,
            windows,
            interval: Duration::from_secs(3600),
        };
        let (tx, state) = watch::channel(UploadState::default());
        let uploader = Uploader::new(
            "robot-1".parse().unwrap(),
            &settings,
            Arc::clone(&spool),
            metered.clone(),
            crate::capture::test_http(),
            tx,
        )
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50));
        Self {
            _dir: dir,
            spool,
            metered,
            state,
            cancel: CancellationToken::new(),
            uploader: Some(uploader),
        }
    }

    fn clock(mut self, clock: fn() -> ZonedDateTime) -> Self {
        self.uploader = self.uploader.take().map(|u| u.with_clock(clock));
        self
    }

    fn spool_sample(&self, n: u8, len: usize) -> Entry {
        let at = Timestamp::from_second(1_800_000_000 + i64::from(n)).unwrap();
        self.spool.write(unix_ns(at), &vec![n; len], at).unwrap()
    }

    fn start(&mut self) {
        let uploader = self.uploader.take().unwrap();
        tokio::spawn(uploader.run(self.cancel.clone()));
    }

    async fn until(&mut self, what: &str, done: impl FnMut(&UploadState) -> bool) -> UploadState {
        let seen = tokio::time::timeout(WAIT, self.state.wait_for(done))
            .await
            .map(|r| r.unwrap().clone());
        seen.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", self.state.borrow()))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test]
async fn taken_samples_are_deleted_oldest_first_and_each_put_names_its_digest() {
    let script = Script::default();
    script
        .answers
        .lock()
        .unwrap()
        .extend([(StatusCode::CREATED, ""), (StatusCode::OK, "")]);
    let url = server(script.clone(), 0).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    let newer = rig.spool_sample(2, 300);
    let older = rig.spool_sample(1, 100);
    rig.start();
    let state = rig.until("two uploads", |s| s.uploaded == 2).await;
    assert_eq!(state.uploaded_bytes, 400);
    assert_eq!((state.refused, state.attempts), (0, 2));
    assert_eq!(state.waiting, None);
    assert_eq!(rig.spool.stats().samples, 0);
    let received = script.received.lock().unwrap().clone();
    let order: Vec<String> = received.iter().map(|r| r.sha256.clone()).collect();
    assert_eq!(order, [older.sha256.to_hex(), newer.sha256.to_hex()]);
    for r in &received {
        assert_eq!(r.device, "robot-1");
        assert_eq!(r.authorization.as_deref(), Some("Bearer secret-token"));
        assert_eq!(Sha256Digest::of(&r.body).to_hex(), r.sha256);
    }
}

#[tokio::test]
async fn a_refused_sample_is_deleted_and_counted() {
    let script = Script::default();
    script
        .answers
        .lock()
        .unwrap()
        .push_back((StatusCode::BAD_REQUEST, "not a sample file"));
    let url = server(script.clone(), 0).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    rig.spool_sample(1, 10);
    rig.spool_sample(2, 10);
    rig.start();
    let state = rig
        .until("one refused, one taken", |s| s.uploaded == 1)
        .await;
    assert_eq!(state.refused, 1);
    assert_eq!(rig.spool.stats().samples, 0);
}

#[tokio::test]
async fn a_server_error_keeps_the_sample_and_says_why_uploads_wait() {
    let script = Script::default();
    script.answers.lock().unwrap().extend(std::iter::repeat_n(
        (StatusCode::SERVICE_UNAVAILABLE, "store failed"),
        1_000,
    ));
    let url = server(script.clone(), 0).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    rig.spool_sample(1, 50);
    rig.start();
    let state = rig.until("a retry", |s| s.attempts >= 2).await;
    assert_eq!((state.uploaded, state.refused), (0, 0));
    assert!(
        state
            .waiting
            .as_deref()
            .is_some_and(|w| w.contains("503") && w.contains("store failed")),
        "{state:?}"
    );
    assert_eq!(rig.spool.stats().samples, 1, "kept");
}

#[tokio::test]
async fn auth_and_rate_answers_are_retried_until_the_server_takes_the_sample() {
    let script = Script::default();
    script.answers.lock().unwrap().extend([
        (StatusCode::SERVICE_UNAVAILABLE, "store failed"),
        (StatusCode::UNAUTHORIZED, "bad token"),
        (StatusCode::FORBIDDEN, "another device's token"),
        (StatusCode::TOO_MANY_REQUESTS, ""),
    ]);
    let url = server(script.clone(), 0).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    let entry = rig.spool_sample(1, 50);
    rig.start();
    let state = rig.until("the upload", |s| s.uploaded == 1).await;
    assert_eq!((state.attempts, state.refused), (5, 0));
    assert_eq!(
        state.waiting, None,
        "the retry reason is cleared once it went"
    );
    let received = script.received.lock().unwrap().clone();
    assert_eq!(received.len(), 5);
    assert!(received.iter().all(|r| r.sha256 == entry.sha256.to_hex()));
    assert_eq!(rig.spool.stats().samples, 0);
}

#[tokio::test]
async fn a_connection_cut_half_way_keeps_the_sample_and_sends_it_again() {
    let script = Script::default();
    let url = server(script.clone(), 1).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    let entry = rig.spool_sample(1, 256 * 1024);
    rig.start();
    let state = rig.until("the upload", |s| s.uploaded == 1).await;
    assert_eq!(state.attempts, 2, "the cut attempt, then the one that went");
    let received = script.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "the server saw one whole upload");
    assert_eq!(received[0].body.len(), 256 * 1024);
    assert_eq!(received[0].sha256, entry.sha256.to_hex());
    assert_eq!(rig.spool.stats().samples, 0);
}

#[tokio::test]
async fn a_throttled_upload_sends_the_whole_file_with_its_length() {
    let script = Script::default();
    let url = server(script.clone(), 0).await;
    // 64 KiB at 1 MiB/s: about a sixteenth of a second.
    let mut rig = Rig::new(&url, 1 << 20, vec![]);
    let entry = rig.spool_sample(1, 64 * 1024);
    rig.start();
    rig.until("the upload", |s| s.uploaded == 1).await;
    let received = script.received.lock().unwrap().clone();
    assert_eq!(Sha256Digest::of(&received[0].body), entry.sha256);
}

#[tokio::test]
async fn a_metered_link_holds_uploads_until_it_is_not() {
    let script = Script::default();
    let url = server(script.clone(), 0).await;
    let mut rig = Rig::new(&url, 0, vec![]);
    rig.metered.set(true).unwrap();
    rig.spool_sample(1, 10);
    rig.start();
    let state = rig.until("waiting", |s| s.waiting.is_some()).await;
    assert_eq!(state.waiting.as_deref(), Some(WAIT_METERED));
    assert!(script.received.lock().unwrap().is_empty());
    rig.metered.set(false).unwrap();
    let state = rig.until("the upload", |s| s.uploaded == 1).await;
    assert_eq!(state.waiting, None);
}

fn afternoon() -> ZonedDateTime {
    local("15:00:00")
}

fn night() -> ZonedDateTime {
    local("23:00:00")
}

#[tokio::test]
async fn uploads_wait_outside_the_windows_and_go_inside_them() {
    let script = Script::default();
    let url = server(script.clone(), 0).await;
    let window: InstallWindow = "22:00-05:00".parse().unwrap();
    let mut rig = Rig::new(&url, 0, vec![window]).clock(afternoon);
    rig.spool_sample(1, 10);
    rig.start();
    let state = rig.until("waiting", |s| s.waiting.is_some()).await;
    assert_eq!(state.waiting.as_deref(), Some(WAIT_WINDOW));
    assert!(script.received.lock().unwrap().is_empty());
    let mut rig = Rig::new(&url, 0, vec![window]).clock(night);
    rig.spool_sample(1, 10);
    rig.start();
    rig.until("the upload", |s| s.uploaded == 1).await;
    assert_eq!(script.received.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_new_sample_wakes_an_idle_uploader() {
    let script = Script::default();
    let url = server(script.clone(), 0).await;
    // interval_s is an hour: only the spool's wake-up can make this upload happen.
    let mut rig = Rig::new(&url, 0, vec![]);
    rig.start();
    rig.spool_sample(1, 10);
    rig.until("the upload", |s| s.uploaded == 1).await;
    rig.spool_sample(2, 10);
    rig.until("the second upload", |s| s.uploaded == 2).await;
}
