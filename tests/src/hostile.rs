//! A hostile artifact host: answers every GET with the bytes it was given, whatever the
//! manifest declares. Stands in for a compromised or misconfigured mirror.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one body on a loopback port until dropped.
pub struct ArtifactHost {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ArtifactHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ArtifactHost {
    pub async fn start(body: Vec<u8>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = Arc::new(body);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = Arc::clone(&body);
                tokio::spawn(async move {
                    // Read the request head; its content does not matter.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(header.as_bytes()).await;
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}/model.onnx", self.addr)
    }
}
