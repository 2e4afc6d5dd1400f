//! Many simulated devices at once: connected in batches in this process
//! ([`connect_batched`]), or spread over `botfleet-sim` child processes ([`SimProcess`])
//! when one process cannot hold them all (its open files).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

use crate::simulated::{Behaviour, SimAgent};

/// The most sessions one process (simulator or broker) is given: the open-file hard limit
/// here is 20,000 and cannot be raised, and each session is one socket.
pub const SESSIONS_PER_PROCESS: usize = 15_000;

/// Simultaneous connection attempts: one CONNACK round trip at a time would dominate at
/// 10,000, and all at once would overrun the broker's listen backlog.
const BATCH: usize = 100;

/// Raises this process's soft open-file limit to its hard limit (children inherit it);
/// returns the new soft limit.
pub fn raise_open_files() -> Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")
}

/// `{prefix}{index}`, the index zero-padded to `width` digits.
pub fn device_name(prefix: &str, index: usize, width: usize) -> String {
    format!("{prefix}{index:0width$}")
}

/// Connects one [`SimAgent`] per name to `mqtt_url`, [`BATCH`] at a time.
pub async fn connect_batched(
    mqtt_url: &str,
    topic_prefix: &str,
    names: &[String],
    trusted_key: &str,
    behaviour: Behaviour,
) -> Result<Vec<SimAgent>> {
    let mut agents = Vec::with_capacity(names.len());
    for batch in names.chunks(BATCH) {
        let mut starting = tokio::task::JoinSet::new();
        for id in batch {
            let (url, prefix, id, key) = (
                mqtt_url.to_owned(),
                topic_prefix.to_owned(),
                id.clone(),
                trusted_key.to_owned(),
            );
            starting.spawn(async move {
                SimAgent::start(&url, &prefix, &id, &key, &[], behaviour)
                    .await
                    .with_context(|| format!("simulated device {id}"))
            });
        }
        while let Some(agent) = starting.join_next().await {
            agents.push(agent.context("a connecting task panicked")??);
        }
    }
    Ok(agents)
}

/// What a `botfleet-sim` child carries.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub mqtt_url: String,
    pub topic_prefix: String,
    pub trusted_key: String,
    pub id_prefix: String,
    pub first: usize,
    pub count: usize,
    pub width: usize,
    /// Every device succeeds, reporting this p99.
    pub p99_ms: f64,
}

impl SimSpec {
    /// The device names this child connects, in order.
    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        (self.first..self.first + self.count).map(|i| device_name(&self.id_prefix, i, self.width))
    }
}

/// A `botfleet-sim` child: its devices stay connected until [`SimProcess::stop`] (or drop)
/// closes its stdin.
pub struct SimProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: watch::Receiver<Vec<String>>,
}

impl SimProcess {
    /// Starts `program` (the `botfleet-sim` binary) for `spec`.
    pub fn spawn(program: &Path, spec: &SimSpec) -> Result<Self> {
        let mut child = Command::new(program)
            .arg("--url")
            .arg(&spec.mqtt_url)
            .arg("--topic-prefix")
            .arg(&spec.topic_prefix)
            .arg("--trusted-key")
            .arg(&spec.trusted_key)
            .arg("--id-prefix")
            .arg(&spec.id_prefix)
            .args(["--first", &spec.first.to_string()])
            .args(["--count", &spec.count.to_string()])
            .args(["--width", &spec.width.to_string()])
            .args(["--p99-ms", &spec.p99_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("simulator stdout")?).lines();
        let stderr = tail(child.stderr.take().context("simulator stderr")?);
        Ok(Self {
            child,
            stdin,
            stdout,
            stderr,
        })
    }

    /// Waits for its `ready COUNT SECONDS` line; returns the seconds it took to connect.
    pub async fn ready(&mut self, limit: Duration) -> Result<f64> {
        let line = tokio::time::timeout(limit, self.stdout.next_line())
            .await
            .with_context(|| format!("simulator not ready within {limit:?}"))??;
        let Some(line) = line else {
            // Its last words come after it closed stdout; give the reader a moment.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
            bail!(
                "simulator exited before it was ready: {}",
                self.stderr.borrow().join(" / ")
            );
        };
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ready"), Some(_), Some(seconds)) => seconds
                .parse()
                .with_context(|| format!("simulator said {line:?}")),
            _ => bail!("simulator said {line:?}, not ready"),
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Closes its stdin and waits (up to `limit`) for it to drop its sessions and exit.
    pub async fn stop(mut self, limit: Duration) -> Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "simulator exited with {status}: {}",
                        self.stderr.borrow().join(" / ")
                    );
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("simulator still running {limit:?} after its stdin closed")
            }
        }
    }
}

/// The last lines `stream` wrote, kept by a task that drains it (a full pipe would block
/// the writer).
fn tail(stream: impl AsyncRead + Unpin + Send + 'static) -> watch::Receiver<Vec<String>> {
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tx.send_modify(|kept| {
                kept.push(line);
                if kept.len() > 10 {
                    kept.remove(0);
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulator_names_its_devices_from_its_first_index_zero_padded() {
        let spec = SimSpec {
            mqtt_url: String::new(),
            topic_prefix: String::new(),
            trusted_key: String::new(),
            id_prefix: "bench-1-".to_owned(),
            first: 14_999,
            count: 2,
            width: 6,
            p99_ms: 2.0,
        };
        let names: Vec<String> = spec.names().collect();
        assert_eq!(names, ["bench-1-014999", "bench-1-015000"]);
    }
}
