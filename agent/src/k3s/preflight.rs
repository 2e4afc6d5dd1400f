//! Can this robot run a K3s agent? Checked before anything is written.

use std::path::Path;

use super::Paths;

/// What the preflight found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// `v1.30.4+k3s1`.
    pub k3s_version: String,
    /// The NVIDIA container runtime is installed: pods get the GPU by default.
    pub nvidia_runtime: bool,
}

/// Why this robot cannot run a K3s agent.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("no k3s binary at {0} (install k3s with INSTALL_K3S_SKIP_START=true first)")]
    NoK3s(std::path::PathBuf),
    #[error("{binary} --version: {message}")]
    K3sVersion {
        binary: std::path::PathBuf,
        message: String,
    },
    #[error(
        "the cgroup memory controller is not enabled (add cgroup_memory=1 cgroup_enable=memory to the kernel command line)"
    )]
    NoMemoryCgroup,
}

/// Checks the k3s binary (and asks its version), the cgroup memory controller, and looks
/// for the NVIDIA container runtime.
pub async fn check(paths: &Paths) -> Result<Preflight, PreflightError> {
    let binary = paths.k3s_binary();
    if !binary.is_file() {
        return Err(PreflightError::NoK3s(binary));
    }
    let version_err = |message: String| PreflightError::K3sVersion {
        binary: binary.clone(),
        message,
    };
    let out = tokio::process::Command::new(&binary)
        .arg("--version")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| version_err(e.to_string()))?;
    if !out.status.success() {
        return Err(version_err(format!("exited with {}", out.status)));
    }
    // "k3s version v1.30.4+k3s1 (98262b5d)"
    let text = String::from_utf8_lossy(&out.stdout);
    let k3s_version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .ok_or_else(|| version_err(format!("unexpected output {:?}", text.trim())))?
        .to_owned();
    if !memory_cgroup(
        &paths.under_root("sys/fs/cgroup/cgroup.controllers"),
        &paths.under_root("proc/cgroups"),
    ) {
        return Err(PreflightError::NoMemoryCgroup);
    }
    Ok(Preflight {
        k3s_version,
        nvidia_runtime: paths.nvidia_runtime().is_file(),
    })
}

/// cgroup v2: `memory` among the root's controllers; v1: the `memory` row of
/// `/proc/cgroups` enabled.
fn memory_cgroup(v2_controllers: &Path, v1_table: &Path) -> bool {
    if let Ok(text) = std::fs::read_to_string(v2_controllers) {
        return text.split_whitespace().any(|c| c == "memory");
    }
    std::fs::read_to_string(v1_table).is_ok_and(|text| {
        text.lines().any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.first() == Some(&"memory") && cols.get(3) == Some(&"1")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3s::tests::fake_root;

    #[tokio::test]
    async fn a_robot_with_k3s_and_memory_cgroup_passes_and_reports_the_version() {
        let root = fake_root(true);
        let found = check(&Paths::new(root.path())).await.unwrap();
        assert_eq!(
            found,
            Preflight {
                k3s_version: "v1.30.4+k3s1".into(),
                nvidia_runtime: true
            }
        );
    }

    #[tokio::test]
    async fn a_robot_without_k3s_fails_preflight() {
        let root = fake_root(false);
        std::fs::remove_file(root.path().join("usr/local/bin/k3s")).unwrap();
        let err = check(&Paths::new(root.path())).await.unwrap_err();
        assert!(matches!(err, PreflightError::NoK3s(_)));
    }

    #[tokio::test]
    async fn a_kernel_without_the_memory_controller_fails_preflight() {
        let root = fake_root(false);
        std::fs::write(
            root.path().join("sys/fs/cgroup/cgroup.controllers"),
            "cpu io pids\n",
        )
        .unwrap();
        let err = check(&Paths::new(root.path())).await.unwrap_err();
        assert!(matches!(err, PreflightError::NoMemoryCgroup));
    }

    #[test]
    fn cgroup_v1_is_read_from_proc_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("cgroups");
        std::fs::write(
            &table,
            "#subsys_name hierarchy num_cgroups enabled\nmemory 4 90 1\n",
        )
        .unwrap();
        assert!(memory_cgroup(&dir.path().join("absent"), &table));
        std::fs::write(&table, "memory 0 1 0\n").unwrap();
        assert!(!memory_cgroup(&dir.path().join("absent"), &table));
    }
}
