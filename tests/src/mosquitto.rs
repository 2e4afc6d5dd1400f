//! A real Mosquitto broker on a loopback port (or a given address), for one fleet; it can be
//! killed and started again on the same port, with or without persistence.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `mosquitto`, killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    addr: IpAddr,
    port: u16,
    persistence: bool,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` (from PATH) on a free loopback port, without persistence, and
    /// waits for its "running" log line.
    pub async fn start() -> Result<Self> {
        Self::start_on(IpAddr::from([127, 0, 0, 1]), false).await
    }

    /// Starts one listening on `addr` (a free port); with `persistence`, sessions, queued
    /// messages and retained messages survive [`Self::kill`] + [`Self::restart`] (saved
    /// after every change, so even SIGKILL loses nothing).
    pub async fn start_on(addr: IpAddr, persistence: bool) -> Result<Self> {
        let port = std::net::TcpListener::bind((addr, 0))?.local_addr()?.port();
        let mut broker = Self {
            child: None,
            addr,
            port,
            persistence,
            dir: tempfile::tempdir()?,
        };
        broker.restart().await?;
        Ok(broker)
    }

    /// Starts the broker again on the same address and port (after [`Self::kill`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistence {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\nautosave_on_changes true\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {} {}\nallow_anonymous true\n{persistence}\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 max_packet_size {}\n\
                 # As deploy/mosquitto/mosquitto.conf: the server subscribes to the whole\n\
                 # fleet, and a wave's events must queue for it, not be dropped at 1,000.\n\
                 max_queued_messages 200000\n",
                self.port,
                self.addr,
                botfleet_protocol::MAX_PACKET_BYTES
            ),
        )?;
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run `mosquitto` (apt-get install -y mosquitto, or set BOTFLEET_MOSQUITTO_URL)")?;
        let stderr = child.stderr.take().context("mosquitto stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                // "mosquitto version 2.0.11 running"
                if line.contains(" running") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("mosquitto exited before it was running"),
            Ok(Err(e)) => bail!("reading mosquitto's log: {e}"),
            Err(_) => bail!("mosquitto did not report running within 10 s"),
        }
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.addr, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the next [`Self::restart`] keeps what the broker saved. Turning it off
    /// also deletes what was saved: the broker comes back knowing nothing (no sessions, no
    /// retained messages).
    pub fn set_persistence(&mut self, on: bool) -> Result<()> {
        self.persistence = on;
        if !on {
            for entry in std::fs::read_dir(self.dir.path())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "db") {
                    std::fs::remove_file(path)?;
                }
            }
        }
        Ok(())
    }

    /// Kills the broker now with SIGKILL (network fault tests); a no-op when not running.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}
