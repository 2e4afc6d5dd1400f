//! Download: the agent's verify-while-streaming fetch (`fetch::download`: size cap, SHA-256
//! as bytes arrive, fsync) against a plain download of the same file from the same loopback
//! server into a file, without hashing (also fsynced); interleaved. Then a download cut
//! half-way and resumed (Range + If-Range): every byte the server sent is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use botfleet_agent::fetch::{Limits, download};
use botfleet_protocol::manifest::{Artifact, ModelFormat, Quantization, Sha256Digest};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::stats::Summary;

const ETAG: &str = "\"bench\"";

/// A loopback file server honouring `Range` with `If-Range`; the first `cut` requests hang
/// up after half the body. Counts body bytes and all bytes it sent.
struct Server {
    url: String,
    body_bytes: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
    cuts_left: Arc<AtomicUsize>,
}

impl Server {
    async fn start(body: Arc<Vec<u8>>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/model.onnx", listener.local_addr()?);
        let server = Self {
            url,
            body_bytes: Arc::default(),
            wire_bytes: Arc::default(),
            cuts_left: Arc::default(),
        };
        let (b, w, c) = (
            Arc::clone(&server.body_bytes),
            Arc::clone(&server.wire_bytes),
            Arc::clone(&server.cuts_left),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let cut = c
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let (body, b, w) = (Arc::clone(&body), Arc::clone(&b), Arc::clone(&w));
                tokio::spawn(answer(stream, body, cut, b, w));
            }
        });
        Ok(server)
    }
}

async fn answer(
    mut stream: TcpStream,
    body: Arc<Vec<u8>>,
    cut: bool,
    body_bytes: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
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
    let start = match (header("range"), header("if-range")) {
        (Some(r), Some(v)) if v == ETAG => r
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse::<usize>()
            .unwrap_or(0)
            .min(body.len()),
        _ => 0,
    };
    let status = if start > 0 {
        format!(
            "206 Partial Content\r\nContent-Range: bytes {start}-{}/{}",
            body.len().saturating_sub(1),
            body.len()
        )
    } else {
        "200 OK".to_owned()
    };
    let part = &body[start..];
    let response_head = format!(
        "HTTP/1.1 {status}\r\nETag: {ETAG}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        part.len()
    );
    let send = if cut { &part[..part.len() / 2] } else { part };
    if stream.write_all(response_head.as_bytes()).await.is_err() {
        return;
    }
    wire_bytes.fetch_add(response_head.len() as u64, Ordering::SeqCst);
    for chunk in send.chunks(64 * 1024) {
        if stream.write_all(chunk).await.is_err() {
            return;
        }
        body_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        wire_bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    let _ = stream.shutdown().await;
}

async fn plain(http: &reqwest::Client, url: &str, dest: &std::path::Path) -> Result<()> {
    let mut response = http.get(url).send().await?.error_for_status()?;
    let mut file = tokio::fs::File::create(dest).await?;
    while let Some(chunk) = response.chunk().await? {
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    Ok(())
}

pub async fn run(size: usize, rounds: usize) -> Result<Value> {
    let body: Arc<Vec<u8>> = Arc::new(
        (0..size)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    );
    let artifact = Artifact {
        size: size as u64,
        sha256: Sha256Digest::of(&body),
        format: ModelFormat::Onnx,
        quantization: Quantization::Fp32,
    };
    let server = Server::start(Arc::clone(&body)).await?;
    let http = reqwest::Client::new();
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("model.onnx");
    let limits = Limits {
        stall: Duration::from_secs(30),
        total: Duration::from_secs(300),
        attempts: 3,
        retry_initial: Duration::from_millis(10),
    };
    let mib = size as f64 / (1024.0 * 1024.0);
    let (mut verified, mut plain_s) = (Vec::new(), Vec::new());
    for round in 0..=rounds {
        let _ = tokio::fs::remove_file(&dest).await;
        let t = Instant::now();
        download(&http, &server.url, &artifact, &dest, limits).await?;
        let v = mib / t.elapsed().as_secs_f64();
        let _ = tokio::fs::remove_file(&dest).await;
        let t = Instant::now();
        plain(&http, &server.url, &dest).await?;
        let p = mib / t.elapsed().as_secs_f64();
        // Round 0 warms the page cache and the connection pool.
        if round > 0 {
            verified.push(v);
            plain_s.push(p);
        }
    }

    // SHA-256 alone on the same bytes, in memory: the floor of what a verifying download
    // costs where the network and the disk are free.
    let mut hash_s = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(Sha256Digest::of(&body));
        hash_s.push(mib / t.elapsed().as_secs_f64());
    }

    let _ = tokio::fs::remove_file(&dest).await;
    let (body0, wire0) = (
        server.body_bytes.load(Ordering::SeqCst),
        server.wire_bytes.load(Ordering::SeqCst),
    );
    server.cuts_left.store(1, Ordering::SeqCst);
    let fetched = download(&http, &server.url, &artifact, &dest, limits).await?;
    let sent = server.body_bytes.load(Ordering::SeqCst) - body0;
    let wire = server.wire_bytes.load(Ordering::SeqCst) - wire0;
    println!(
        "download: {rounds} rounds; resumed from {}",
        fetched.resumed_from
    );
    Ok(json!({
        "file_mib": mib,
        "rounds": rounds,
        "verify_while_streaming_mib_s": Summary::of(&verified),
        "plain_mib_s": Summary::of(&plain_s),
        "sha256_alone_mib_s": Summary::of(&hash_s),
        "resume": {
            "file_bytes": size,
            "attempts": fetched.attempts,
            "resumed_from": fetched.resumed_from,
            "body_bytes_sent": sent,
            "wire_bytes_sent": wire,
        },
    }))
}
