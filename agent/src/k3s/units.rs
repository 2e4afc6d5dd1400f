//! Starting and watching the K3s agent's systemd unit, and reading why it failed.

use std::future::Future;
use std::path::PathBuf;
use std::time::SystemTime;

use botfleet_protocol::messages::K3sFailure;

/// A unit's `ActiveState`, as far as a join cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveState {
    Active,
    /// Starting, or waiting to be restarted after a failure.
    Activating,
    Failed,
    Inactive,
}

impl ActiveState {
    fn parse(s: &str) -> Self {
        match s.trim() {
            "active" | "reloading" => Self::Active,
            "activating" | "deactivating" => Self::Activating,
            "failed" => Self::Failed,
            _ => Self::Inactive,
        }
    }
}

/// Why systemd could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// What a join needs from the service manager.
pub trait UnitManager: Send + Sync {
    /// `systemctl enable --now`.
    fn enable_now(&self, unit: &str) -> impl Future<Output = Result<(), UnitError>> + Send;
    /// `systemctl disable --now`.
    fn disable_now(&self, unit: &str) -> impl Future<Output = Result<(), UnitError>> + Send;
    fn restart(&self, unit: &str) -> impl Future<Output = Result<(), UnitError>> + Send;
    fn active_state(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<ActiveState, UnitError>> + Send;
    /// The unit's log lines since `since`.
    fn log_since(
        &self,
        unit: &str,
        since: SystemTime,
    ) -> impl Future<Output = Result<String, UnitError>> + Send;
}

/// The real service manager, through `systemctl` and `journalctl`.
#[derive(Debug, Clone)]
pub struct Systemctl {
    pub systemctl: PathBuf,
    pub journalctl: PathBuf,
}

impl Default for Systemctl {
    fn default() -> Self {
        Self {
            systemctl: PathBuf::from("systemctl"),
            journalctl: PathBuf::from("journalctl"),
        }
    }
}

impl Systemctl {
    async fn output(&self, program: &PathBuf, args: &[&str]) -> Result<String, UnitError> {
        let out = tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| UnitError::Spawn {
                program: program.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(UnitError::Failed {
                command: format!("{} {}", program.display(), args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

impl UnitManager for Systemctl {
    async fn enable_now(&self, unit: &str) -> Result<(), UnitError> {
        // --no-block: a k3s-agent that cannot reach its server never finishes starting;
        // the join watches the state instead of hanging in the start job.
        self.output(&self.systemctl, &["enable", "--now", "--no-block", unit])
            .await
            .map(drop)
    }

    async fn disable_now(&self, unit: &str) -> Result<(), UnitError> {
        self.output(&self.systemctl, &["disable", "--now", unit])
            .await
            .map(drop)
    }

    async fn restart(&self, unit: &str) -> Result<(), UnitError> {
        self.output(&self.systemctl, &["restart", "--no-block", unit])
            .await
            .map(drop)
    }

    async fn active_state(&self, unit: &str) -> Result<ActiveState, UnitError> {
        // `show` answers for units that do not exist too ("inactive").
        let out = self
            .output(
                &self.systemctl,
                &["show", "--property=ActiveState", "--value", unit],
            )
            .await?;
        Ok(ActiveState::parse(&out))
    }

    async fn log_since(&self, unit: &str, since: SystemTime) -> Result<String, UnitError> {
        let secs = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let since = format!("--since=@{secs}");
        self.output(
            &self.journalctl,
            &[
                "--unit",
                unit,
                &since,
                "--no-pager",
                "--output=cat",
                "--lines=200",
            ],
        )
        .await
    }
}

/// The known ways a K3s agent fails to join, from its log. k3s reports them only as text;
/// this is the one place that reads it, everything after works on [`K3sFailure`].
pub fn classify(log: &str) -> Option<K3sFailure> {
    const DUPLICATE: [&str; 1] = ["Node password rejected"];
    const TOKEN: [&str; 3] = [
        "401 Unauthorized",
        "token CA hash does not match",
        "invalid token format",
    ];
    const UNREACHABLE: [&str; 5] = [
        "connection refused",
        "no route to host",
        "i/o timeout",
        "no such host",
        "network is unreachable",
    ];
    let has = |needles: &[&str]| needles.iter().any(|n| log.contains(n));
    if has(&DUPLICATE) {
        Some(K3sFailure::DuplicateNodeName)
    } else if has(&TOKEN) {
        Some(K3sFailure::TokenRejected)
    } else if has(&UNREACHABLE) {
        Some(K3sFailure::ServerUnreachable)
    } else {
        None
    }
}

#[cfg(test)]
pub mod fake {
    //! A service manager that records what it was asked and plays back scripted states.

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeUnits {
        /// Every call, as `verb unit`.
        pub calls: Mutex<Vec<String>>,
        /// States answered in turn; the last one repeats.
        pub states: Mutex<VecDeque<ActiveState>>,
        pub log: Mutex<String>,
    }

    impl FakeUnits {
        pub fn answering(states: &[ActiveState], log: &str) -> Self {
            Self {
                calls: Mutex::default(),
                states: Mutex::new(states.iter().copied().collect()),
                log: Mutex::new(log.to_owned()),
            }
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn record(&self, verb: &str, unit: &str) {
            self.calls.lock().unwrap().push(format!("{verb} {unit}"));
        }
    }

    impl UnitManager for FakeUnits {
        async fn enable_now(&self, unit: &str) -> Result<(), UnitError> {
            self.record("enable-now", unit);
            Ok(())
        }
        async fn disable_now(&self, unit: &str) -> Result<(), UnitError> {
            self.record("disable-now", unit);
            Ok(())
        }
        async fn restart(&self, unit: &str) -> Result<(), UnitError> {
            self.record("restart", unit);
            Ok(())
        }
        async fn active_state(&self, unit: &str) -> Result<ActiveState, UnitError> {
            self.record("state", unit);
            let mut states = self.states.lock().unwrap();
            let state = *states.front().unwrap_or(&ActiveState::Inactive);
            if states.len() > 1 {
                states.pop_front();
            }
            Ok(state)
        }
        async fn log_since(&self, unit: &str, _since: SystemTime) -> Result<String, UnitError> {
            self.record("log", unit);
            Ok(self.log.lock().unwrap().clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_known_k3s_failures_are_told_apart() {
        let cases = [
            (
                "level=fatal msg=\"Failed to validate connection to cluster at https://10.0.0.1:6443: \
                 failed to get CA certs: Get \\\"https://10.0.0.1:6443/cacerts\\\": dial tcp 10.0.0.1:6443: \
                 connect: connection refused\"",
                Some(K3sFailure::ServerUnreachable),
            ),
            (
                "level=error msg=\"Failed to retrieve agent config: https://10.0.0.1:6443/v1-k3s/serving-kubelet.crt: \
                 401 Unauthorized\"",
                Some(K3sFailure::TokenRejected),
            ),
            (
                "level=error msg=\"Failed to retrieve agent config: Node password rejected, duplicate hostname \
                 or contents of '/etc/rancher/node/password' may not match server node-passwd entry\"",
                Some(K3sFailure::DuplicateNodeName),
            ),
            ("level=info msg=\"Starting k3s agent v1.30.4+k3s1\"", None),
        ];
        for (log, expected) in cases {
            assert_eq!(classify(log), expected, "{log}");
        }
    }

    /// The real implementation against a stub `systemctl` that records its arguments.
    #[tokio::test]
    async fn systemctl_is_asked_exactly_for_the_k3s_unit() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("calls");
        let stub = dir.path().join("systemctl");
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n[ \"$1\" = show ] && echo activating\nexit 0\n",
                record.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let units = Systemctl {
            systemctl: stub.clone(),
            journalctl: stub,
        };
        units.enable_now("k3s-agent.service").await.unwrap();
        let state = units.active_state("k3s-agent.service").await.unwrap();
        assert_eq!(state, ActiveState::Activating);
        units.disable_now("k3s-agent.service").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            "enable --now --no-block k3s-agent.service\n\
             show --property=ActiveState --value k3s-agent.service\n\
             disable --now k3s-agent.service\n"
        );
    }

    #[tokio::test]
    async fn a_failing_systemctl_is_an_error_with_its_message() {
        let units = Systemctl {
            systemctl: PathBuf::from("false"),
            journalctl: PathBuf::from("false"),
        };
        assert!(matches!(
            units.restart("k3s-agent.service").await,
            Err(UnitError::Failed { .. })
        ));
    }
}
