//! A real S3-compatible server for the tests: `moto_server` (Python, `moto[server]`) on a
//! free loopback port, with one bucket, stopped when dropped.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::WAIT;

/// The command that installs it where the tests look by default.
pub const INSTALL: &str = ".venv/bin/pip install 'moto[server]==5.2.6' (in the workspace root)";

/// A running `moto_server`.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

/// `BOTFLEET_MOTO_SERVER`, else `.venv/bin/moto_server` of the workspace.
fn program() -> PathBuf {
    std::env::var_os("BOTFLEET_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../.venv/bin/moto_server"
            ))
        })
}

impl Moto {
    /// Starts moto_server, waits until it says it listens, and makes `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let program = program();
        assert!(
            program.exists(),
            "{} is missing: the S3 tests need moto_server; install it with {INSTALL}, or point BOTFLEET_MOTO_SERVER at one",
            program.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        // Werkzeug says "Running on http://…" on stderr once it listens; the thread goes on
        // reading so that moto never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (ready, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Running on") {
                    let _ = ready.send(());
                }
            }
        });
        let started = tokio::task::spawn_blocking(move || listening.recv_timeout(WAIT))
            .await
            .unwrap();
        let mut moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_owned(),
        };
        if started.is_err() {
            let status = moto.child.try_wait();
            panic!("moto_server did not start listening within {WAIT:?} ({status:?})");
        }
        let made = super::http_client()
            .put(format!("{}/{bucket}", moto.endpoint))
            .send()
            .await
            .unwrap();
        assert!(
            made.status().is_success(),
            "bucket not made: {}",
            made.status()
        );
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
