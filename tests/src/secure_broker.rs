//! Mosquitto started with the shipped production configuration (`deploy/mosquitto/`):
//! TLS with client certificates minted by the shipped script, the shipped ACL file. Only
//! what a test machine must differ in is rewritten: file paths, the port (loopback), the
//! user it runs as and the log destination.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use botfleet_agent::tls::{MqttSecurity, SecurityFiles};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The topic prefix the shipped ACL names.
pub const PREFIX: &str = "botfleet/v1";

/// `deploy/mosquitto` in this repository.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto")
}

/// A running broker with the production configuration; killed on drop.
pub struct SecureBroker {
    _child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl SecureBroker {
    /// Mints a CA, the broker's, the server's and `devices`' certificates, plus a second,
    /// foreign CA with the same names (`rogue/`), then starts Mosquitto.
    pub async fn start(devices: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        for sub in ["certs", "rogue"] {
            let status = std::process::Command::new(deploy_dir().join("mint-certs.sh"))
                .arg(dir.path().join(sub))
                .args(devices)
                .stdout(Stdio::null())
                .status()
                .context("running deploy/mosquitto/mint-certs.sh (needs openssl)")?;
            if !status.success() {
                bail!("mint-certs.sh failed: {status}");
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let certs = dir.path().join("certs");
        let shipped = std::fs::read_to_string(deploy_dir().join("mosquitto.conf"))?;
        let config = shipped
            .replace("/etc/mosquitto/botfleet/", &format!("{}/", certs.display()))
            .replace("listener 8883", &format!("listener {port} 127.0.0.1"))
            .replace(
                "persistence_location /var/lib/mosquitto/",
                &format!("persistence_location {}/", dir.path().display()),
            )
            // Tests run as root or as the owner of the temporary files.
            .replace("user mosquitto", "user root")
            .replace(
                "log_dest syslog",
                &format!(
                    "log_dest stderr\nlog_dest file {}/mosquitto.log",
                    dir.path().display()
                ),
            );
        std::fs::copy(deploy_dir().join("acl"), certs.join("acl"))?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, config)?;
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run `mosquitto` (apt-get install -y mosquitto)")?;
        let stderr = child.stderr.take().context("mosquitto stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(" running") {
                    return Ok::<bool, std::io::Error>(true);
                }
                seen.push(line);
            }
            Ok(false)
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            bail!(
                "mosquitto with the shipped config did not start:\n{}",
                seen.join("\n")
            );
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _child: child,
            port,
            dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the broker logged so far (connections, refusals), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// `mqtts://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// The certificates of the fleet's CA.
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Certificates with the same names from a CA the broker does not trust.
    pub fn rogue(&self) -> PathBuf {
        self.dir.path().join("rogue")
    }

    /// TLS settings for a client: trusts the fleet CA, presents `identity` (a file stem in
    /// `dir`: a device id or `botfleet-server`), or no certificate with `None`.
    pub fn security(&self, dir: &Path, identity: Option<&str>) -> Result<MqttSecurity> {
        let ca = self.certs().join("ca.crt");
        let cert = identity.map(|i| dir.join(format!("{i}.crt")));
        let key = identity.map(|i| dir.join(format!("{i}.key")));
        let empty = PathBuf::new();
        Ok(MqttSecurity::load(SecurityFiles {
            tls: true,
            ca_file: &ca,
            cert_file: cert.as_ref().unwrap_or(&empty),
            key_file: key.as_ref().unwrap_or(&empty),
            username: "",
            password_file: &empty,
            password_env: None,
        })?)
    }
}
