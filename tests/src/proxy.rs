//! A TCP proxy on loopback between a client and a server that counts what the client sends,
//! with when, and can cut the connection once a number of bytes has gone through: an upload
//! cut half-way, and the rate a client really sent at.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What went through, client to server.
#[derive(Default)]
struct Counts {
    /// Bytes from clients, in all.
    sent: AtomicU64,
    /// Cut every connection once `sent` reaches this (then no more cuts).
    cut_at: AtomicU64,
    cuts: AtomicU64,
    /// (when, `sent` after the chunk) for every chunk forwarded.
    log: Mutex<Vec<(Instant, u64)>>,
}

/// A running proxy; stops with the test's runtime.
pub struct Proxy {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts {
            cut_at: AtomicU64::new(u64::MAX),
            ..Counts::default()
        });
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        forward(client, server, &counts).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts })
    }

    /// `http://` and the proxy's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the connection carrying byte `bytes` from now on (counted from the client side),
    /// once.
    pub fn cut_after(&self, bytes: u64) {
        let at = self.counts.sent.load(Ordering::SeqCst) + bytes;
        self.counts.cut_at.store(at, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.counts.cuts.load(Ordering::SeqCst)
    }

    /// Bytes clients sent through, in all.
    pub fn sent(&self) -> u64 {
        self.counts.sent.load(Ordering::SeqCst)
    }

    /// Client bytes per second from the first chunk after `from` bytes had gone through to
    /// the last chunk, and the seconds that covers (the first chunk's own bytes arrived as
    /// the window opened, so they are not counted).
    pub fn rate_since(&self, from: u64) -> Option<(f64, f64)> {
        let log = self
            .counts
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut window = log.iter().filter(|(_, sent)| *sent > from);
        let first = window.next()?;
        let last = window.next_back()?;
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        let bytes = last.1 - first.1;
        (seconds > 0.0).then(|| (bytes as f64 / seconds, seconds))
    }
}

async fn forward(client: TcpStream, server: TcpStream, counts: &Counts) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut_at = counts.cut_at.load(Ordering::SeqCst);
        let before = counts.sent.load(Ordering::SeqCst);
        if before + n as u64 >= cut_at {
            // Half of what would cross the line goes through, then the link is gone.
            let part = usize::try_from(cut_at.saturating_sub(before))
                .unwrap_or(n)
                .min(n);
            let _ = server_write.write_all(&buf[..part]).await;
            counts.sent.fetch_add(part as u64, Ordering::SeqCst);
            counts.cut_at.store(u64::MAX, Ordering::SeqCst);
            counts.cuts.fetch_add(1, Ordering::SeqCst);
            down.abort();
            return;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let sent = counts.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        counts
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), sent));
    }
    let _ = server_write.shutdown().await;
    let _ = down.await;
}
