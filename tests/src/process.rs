//! The real `botfleet-agent` binary as a child process, for crash tests (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// `target/<profile>/botfleet-agent`, which `cargo test --workspace` builds for the agent
/// package's own tests.
pub fn agent_binary() -> Result<PathBuf> {
    crate::sibling_binary("botfleet-agent").context(
        "botfleet-agent binary not found next to the tests: run `cargo test --workspace` (or `cargo build -p botfleet-agent`) first",
    )
}

/// A running agent process; killed on drop.
pub struct AgentProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    _config: tempfile::NamedTempFile,
}

impl AgentProcess {
    /// Starts the agent with `config`; with `failpoint`, it stops there (see the agent's
    /// `failpoint` module).
    pub async fn spawn(config: &botfleet_agent::Config, failpoint: Option<&str>) -> Result<Self> {
        Self::spawn_wrapped(config, failpoint, &[]).await
    }

    /// As [`Self::spawn`], run through `wrapper` (e.g. `ip netns exec NAME`).
    pub async fn spawn_wrapped(
        config: &botfleet_agent::Config,
        failpoint: Option<&str>,
        wrapper: &[&str],
    ) -> Result<Self> {
        Self::spawn_with(&agent_binary()?, config, failpoint, wrapper)
    }

    /// As [`Self::spawn`], another build of the agent (e.g. an earlier one, to compare).
    pub async fn spawn_binary(binary: &Path, config: &botfleet_agent::Config) -> Result<Self> {
        Self::spawn_with(binary, config, None, &[])
    }

    fn spawn_with(
        binary: &Path,
        config: &botfleet_agent::Config,
        failpoint: Option<&str>,
        wrapper: &[&str],
    ) -> Result<Self> {
        let mut file = tempfile::NamedTempFile::new()?;
        std::io::Write::write_all(&mut file, toml::to_string(config)?.as_bytes())?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        command
            .arg("--config")
            .arg(file.path())
            .env("RUST_LOG", "info,botfleet_agent=debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match failpoint {
            Some(point) => command.env("BOTFLEET_FAILPOINT", point),
            None => command.env_remove("BOTFLEET_FAILPOINT"),
        };
        let mut child = command.spawn().context("starting botfleet-agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            _config: file,
        })
    }

    /// Waits for a stderr line containing `needle`.
    pub async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let mut tail = Vec::new();
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => bail!(
                "agent exited before {needle:?}; last lines:\n{}",
                tail.join("\n")
            ),
            Err(_) => bail!(
                "no {needle:?} within {limit:?}; last lines:\n{}",
                tail.join("\n")
            ),
        }
    }

    /// The lines it wrote so far that nobody waited for.
    pub fn drain_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and reap it.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
