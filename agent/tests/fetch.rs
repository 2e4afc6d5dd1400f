//! Downloads against a real HTTP server on loopback that misbehaves on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use botfleet_agent::fetch::{FetchError, Limits, download};
use botfleet_protocol::manifest::{Artifact, ModelFormat, Quantization, Sha256Digest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server answers the n-th request (0-based).
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Honour Range/If-Range with this ETag.
    Good { etag: &'static str },
    /// Send this many body bytes of a full response, then hang up.
    HangUpAfter { bytes: usize, etag: &'static str },
    /// Send this many body bytes, then go silent (keep the socket open).
    StallAfter { bytes: usize, etag: &'static str },
    /// A 200 whose body never ends.
    Endless,
    /// One body byte per `every`, for as long as the client listens: never silent long
    /// enough for a stall deadline.
    Trickle { every: Duration, etag: &'static str },
}

struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    ranges: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

async fn serve(bodies: Vec<Vec<u8>>, script: Vec<Behaviour>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let ranges = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (r, g) = (Arc::clone(&requests), Arc::clone(&ranges));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let behaviour = script[n.min(script.len() - 1)];
            let body = bodies[n.min(bodies.len() - 1)].clone();
            let g = Arc::clone(&g);
            tokio::spawn(answer(stream, behaviour, body, g));
        }
    });
    Server {
        url,
        requests,
        ranges,
    }
}

async fn answer(
    mut stream: TcpStream,
    behaviour: Behaviour,
    body: Vec<u8>,
    ranges: Arc<std::sync::Mutex<Vec<Option<String>>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}: "))
                .map(|v| v.trim().to_owned())
        })
    };
    let range = header("range");
    ranges.lock().unwrap().push(range.clone());
    let write = |status: &str, extra: String, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n")
    };
    match behaviour {
        Behaviour::Good { etag } => {
            let start = match (&range, header("if-range")) {
                (Some(r), Some(v)) if v.trim_matches('"') == etag => r
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-')
                    .parse::<usize>()
                    .unwrap(),
                _ => 0,
            };
            let part = &body[start..];
            let (status, extra) = if start > 0 {
                (
                    "206 Partial Content",
                    format!(
                        "ETag: \"{etag}\"\r\nContent-Range: bytes {start}-{}/{}\r\n",
                        body.len() - 1,
                        body.len()
                    ),
                )
            } else {
                ("200 OK", format!("ETag: \"{etag}\"\r\n"))
            };
            let _ = stream
                .write_all(write(status, extra, part.len()).as_bytes())
                .await;
            let _ = stream.write_all(part).await;
        }
        Behaviour::HangUpAfter { bytes, etag } => {
            let _ = stream
                .write_all(write("200 OK", format!("ETag: \"{etag}\"\r\n"), body.len()).as_bytes())
                .await;
            let _ = stream.write_all(&body[..bytes]).await;
        }
        Behaviour::StallAfter { bytes, etag } => {
            let head = write("200 OK", format!("ETag: \"{etag}\"\r\n"), body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body[..bytes]).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Behaviour::Trickle { every, etag } => {
            let head = write("200 OK", format!("ETag: \"{etag}\"\r\n"), body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            for byte in &body {
                if stream.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        }
        Behaviour::Endless => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                )
                .await;
            loop {
                if stream.write_all(b"400\r\n").await.is_err()
                    || stream.write_all(&[7u8; 1024]).await.is_err()
                    || stream.write_all(b"\r\n").await.is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

fn artifact(body: &[u8]) -> Artifact {
    Artifact {
        size: body.len() as u64,
        sha256: Sha256Digest::of(body),
        format: ModelFormat::Onnx,
        quantization: Quantization::Fp32,
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn limits() -> Limits {
    Limits {
        stall: Duration::from_millis(500),
        total: Duration::from_secs(30),
        attempts: 4,
        retry_initial: Duration::from_millis(20),
    }
}

fn model_bytes() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models/mtcnn_pnet.onnx"
    ))
    .unwrap()
}

#[tokio::test]
async fn a_connection_dropped_half_way_is_resumed_with_range_and_if_range() {
    let body = model_bytes();
    let server = serve(
        vec![body.clone()],
        vec![
            Behaviour::HangUpAfter {
                bytes: body.len() / 2,
                etag: "v1",
            },
            Behaviour::Good { etag: "v1" },
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let got = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap();
    assert_eq!(got.bytes, body.len() as u64);
    assert_eq!(got.attempts, 2);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    // How much of the first half reached the file before the hang-up is up to the kernel
    // and hyper; whatever did is resumed, never fetched twice.
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 2);
    assert_eq!(ranges[0], None);
    assert_eq!(
        ranges[1].is_some(),
        got.resumed_from > 0,
        "{ranges:?} {got:?}"
    );
    if let Some(range) = &ranges[1] {
        assert_eq!(*range, format!("bytes={}-", got.resumed_from));
        assert!(got.resumed_from <= body.len() as u64 / 2);
    }
}

#[tokio::test]
async fn a_file_that_changed_between_attempts_is_downloaded_again_not_spliced() {
    let old = model_bytes();
    let mut new = old.clone();
    new[100] ^= 0xff;
    let server = serve(
        vec![old.clone(), new.clone()],
        vec![
            Behaviour::HangUpAfter {
                bytes: old.len() / 2,
                etag: "v1",
            },
            Behaviour::Good { etag: "v2" },
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    // The manifest names the new file; the first half came from the old one.
    let got = download(&client(), &server.url, &artifact(&new), &dest, limits())
        .await
        .unwrap();
    assert_eq!(got.bytes, new.len() as u64);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        new,
        "If-Range mismatch must restart from 0"
    );
}

#[tokio::test]
async fn a_partial_download_survives_a_restart_of_the_downloader() {
    let body = model_bytes();
    let server = serve(
        vec![body.clone()],
        vec![
            // A stall, not a hang-up: exactly these bytes arrive before the failure.
            Behaviour::StallAfter {
                bytes: 1000,
                etag: "v1",
            },
            Behaviour::Good { etag: "v1" },
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let once = Limits {
        attempts: 1,
        ..limits()
    };
    let err = download(&client(), &server.url, &artifact(&body), &dest, once)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Stalled(_)), "{err}");
    assert_eq!(
        std::fs::metadata(&dest).unwrap().len(),
        1000,
        "the prefix is kept"
    );
    // A new call (as after an agent restart) resumes from byte 1000.
    let got = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap();
    assert_eq!(got.resumed_from, 1000);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
}

#[tokio::test]
async fn a_stalled_server_is_abandoned_after_the_stall_deadline() {
    let body = model_bytes();
    let server = serve(
        vec![body.clone()],
        vec![Behaviour::StallAfter {
            bytes: 10,
            etag: "v1",
        }],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let err = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Stalled(_) | FetchError::TimedOut(_)),
        "{err}"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        4,
        "every attempt was tried"
    );
}

#[tokio::test]
async fn an_endless_response_stops_at_the_declared_size() {
    let body = vec![7u8; 4096];
    let server = serve(vec![body.clone()], vec![Behaviour::Endless]).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let err = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { declared: 4096 }),
        "{err}"
    );
    assert!(!dest.exists(), "a wrong file is not kept");
}

#[tokio::test]
async fn a_tampered_byte_is_a_digest_mismatch_and_nothing_is_kept() {
    let body = model_bytes();
    let mut evil = body.clone();
    evil[2000] ^= 1;
    let server = serve(vec![evil], vec![Behaviour::Good { etag: "v1" }]).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let err = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err}");
    assert!(!dest.exists());
}

#[tokio::test]
async fn a_download_larger_than_the_free_space_is_refused_before_writing() {
    let body = model_bytes();
    let server = serve(vec![body.clone()], vec![Behaviour::Good { etag: "v1" }]).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    let mut huge = artifact(&body);
    huge.size = u64::MAX / 2;
    let err = download(&client(), &server.url, &huge, &dest, limits())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NoSpace { .. }), "{err}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_one_byte_per_second_server_is_cut_off_by_the_total_deadline_and_the_partial_is_resumed()
{
    let body = model_bytes();
    let server = serve(
        vec![body.clone()],
        vec![
            Behaviour::Trickle {
                every: Duration::from_secs(1),
                etag: "v1",
            },
            Behaviour::Good { etag: "v1" },
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("part");
    // A byte every second never trips a 3 s stall deadline: only the total one ends it.
    let slow = Limits {
        stall: Duration::from_secs(3),
        total: Duration::from_secs(5),
        ..limits()
    };
    let err = download(&client(), &server.url, &artifact(&body), &dest, slow)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::TimedOut(_)), "{err}");
    assert!(
        err.to_string().contains("took longer than"),
        "the error names the deadline: {err}"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "one slow attempt"
    );
    // The bytes that did arrive are good bytes of a file with a strong ETag: kept, so the
    // next try (a later reconcile, or after a restart) asks only for the rest, and If-Range
    // makes sure the rest belongs to the same file.
    let kept = std::fs::metadata(&dest).unwrap().len();
    assert!(kept > 0 && kept < body.len() as u64, "{kept} bytes kept");
    let got = download(&client(), &server.url, &artifact(&body), &dest, limits())
        .await
        .unwrap();
    assert_eq!(got.resumed_from, kept);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges[1], Some(format!("bytes={kept}-")), "{ranges:?}");
}
