//! Join, leave and rotate on a fake root with a fake `k3s` and a fake service manager.

use std::os::unix::fs::PermissionsExt;

use botfleet_protocol::CommandId;

use super::helper::{Handoff, Request};
use super::units::fake::FakeUnits;
use super::*;

const UNIT: &str = "k3s-agent.service";

/// A root with `/usr/local/bin/k3s` (prints a version), cgroup v2 with the memory
/// controller, and the NVIDIA container runtime if asked.
pub(crate) fn fake_root(nvidia: bool) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let k3s = root.path().join("usr/local/bin/k3s");
    std::fs::create_dir_all(k3s.parent().unwrap()).unwrap();
    std::fs::write(
        &k3s,
        "#!/bin/sh\necho 'k3s version v1.30.4+k3s1 (98262b5d)'\necho 'go version go1.22.5'\n",
    )
    .unwrap();
    std::fs::set_permissions(&k3s, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cgroup = root.path().join("sys/fs/cgroup");
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::write(
        cgroup.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    if nvidia {
        let rt = root.path().join("usr/bin/nvidia-container-runtime");
        std::fs::create_dir_all(rt.parent().unwrap()).unwrap();
        std::fs::write(rt, "").unwrap();
    }
    root
}

fn node(root: &Path, units: FakeUnits) -> Node<FakeUnits> {
    let config = K3sConfig {
        root: root.to_owned(),
        ..K3sConfig::default()
    };
    let labels = BTreeMap::from([
        ("arch".to_owned(), "aarch64".to_owned()),
        (
            "board".to_owned(),
            "NVIDIA Jetson Orin Nano Developer Kit".to_owned(),
        ),
    ]);
    Node::new(&config, "robot-1", labels, units)
}

fn token(s: &str) -> K3sToken {
    K3sToken(s.to_owned())
}

fn join_op() -> Operation {
    Operation::Join {
        server_url: "https://10.0.0.1:6443".into(),
        token: token("K10abc::server:secret"),
        node_labels: BTreeMap::from([("site".into(), "lab".into())]),
    }
}

#[tokio::test(start_paused = true)]
async fn a_join_writes_drop_in_and_token_then_starts_the_agent_and_waits_for_active() {
    let root = fake_root(true);
    let units = FakeUnits::answering(
        &[
            ActiveState::Activating,
            ActiveState::Activating,
            ActiveState::Active,
        ],
        "level=info msg=\"Starting k3s agent v1.30.4+k3s1\"",
    );
    let node = node(root.path(), units);
    let state = node.apply(&join_op()).await;
    assert_eq!(
        state,
        K3sState::Joined {
            node_name: "robot-1".into(),
            server_url: "https://10.0.0.1:6443".into(),
            k3s_version: "v1.30.4+k3s1".into(),
            nvidia_runtime: true,
        }
    );
    let drop_in = std::fs::read_to_string(node.paths.drop_in()).unwrap();
    assert_eq!(drop_in, include_str!("testdata/50-botfleet.yaml"));
    assert!(!drop_in.contains("node-role.kubernetes.io"));
    let token_path = node.paths.token();
    assert_eq!(
        std::fs::read_to_string(&token_path).unwrap(),
        "K10abc::server:secret"
    );
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let calls = node.units.calls();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("enable-now k3s-agent.service")
    );
    assert_eq!(calls.iter().filter(|c| c.starts_with("state")).count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_reported_as_such_without_waiting_for_the_deadline() {
    let root = fake_root(false);
    let log = "level=error msg=\"Failed to retrieve agent config: \
               https://10.0.0.1:6443/v1-k3s/serving-kubelet.crt: 401 Unauthorized\"";
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Activating], log),
    );
    let started = tokio::time::Instant::now();
    let state = node.apply(&join_op()).await;
    assert!(
        matches!(
            state,
            K3sState::Failed {
                reason: K3sFailure::TokenRejected,
                ..
            }
        ),
        "{state:?}"
    );
    assert!(started.elapsed() < node.timeout);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_node_name_and_an_unreachable_server_are_told_apart() {
    for (log, reason) in [
        (
            "msg=\"Node password rejected, duplicate hostname or contents of \
             '/etc/rancher/node/password' may not match server node-passwd entry\"",
            K3sFailure::DuplicateNodeName,
        ),
        (
            "msg=\"failed to get CA certs: dial tcp 10.0.0.1:6443: connect: connection refused\"",
            K3sFailure::ServerUnreachable,
        ),
    ] {
        let root = fake_root(false);
        let node = node(
            root.path(),
            FakeUnits::answering(&[ActiveState::Failed], log),
        );
        match node.apply(&join_op()).await {
            K3sState::Failed { reason: got, .. } => assert_eq!(got, reason),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_becomes_active_fails_at_the_deadline() {
    let root = fake_root(false);
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Activating], "starting"),
    );
    let started = tokio::time::Instant::now();
    let state = node.apply(&join_op()).await;
    assert!(matches!(
        state,
        K3sState::Failed {
            reason: K3sFailure::NotActive,
            ..
        }
    ));
    assert!(started.elapsed() >= node.timeout);
}

#[tokio::test]
async fn a_robot_without_k3s_fails_preflight_and_writes_nothing() {
    let root = fake_root(false);
    std::fs::remove_file(root.path().join("usr/local/bin/k3s")).unwrap();
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    let state = node.apply(&join_op()).await;
    assert!(matches!(
        state,
        K3sState::Failed {
            reason: K3sFailure::Preflight,
            ..
        }
    ));
    assert!(!node.paths.drop_in().exists());
    assert!(!node.paths.token().exists());
    assert!(node.units.calls().is_empty());
}

#[tokio::test]
async fn a_join_with_a_node_role_label_is_refused_before_anything_is_written() {
    let root = fake_root(false);
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    let op = Operation::Join {
        server_url: "https://10.0.0.1:6443".into(),
        token: token("t"),
        node_labels: BTreeMap::from([("node-role.kubernetes.io/worker".into(), "true".into())]),
    };
    let state = node.apply(&op).await;
    assert!(matches!(
        state,
        K3sState::Failed {
            reason: K3sFailure::BadRequest,
            ..
        }
    ));
    assert!(!node.paths.drop_in().exists());
    assert!(node.units.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn leave_stops_and_disables_the_agent_and_removes_our_files() {
    let root = fake_root(false);
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    assert!(matches!(
        node.apply(&join_op()).await,
        K3sState::Joined { .. }
    ));
    let unrelated = root
        .path()
        .join("etc/rancher/k3s/config.yaml.d/10-site.yaml");
    std::fs::write(&unrelated, "kubelet-arg: []\n").unwrap();
    assert_eq!(node.apply(&Operation::Leave).await, K3sState::Left);
    assert!(!node.paths.drop_in().exists());
    assert!(!node.paths.token().exists());
    assert!(unrelated.exists(), "only our files go");
    assert_eq!(
        node.units.calls().last().map(String::as_str),
        Some("disable-now k3s-agent.service")
    );
    // Leaving twice is fine.
    assert_eq!(node.apply(&Operation::Leave).await, K3sState::Left);
}

#[tokio::test(start_paused = true)]
async fn rotate_rewrites_the_token_and_restarts_the_agent() {
    let root = fake_root(false);
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    assert!(matches!(
        node.apply(&join_op()).await,
        K3sState::Joined { .. }
    ));
    let drop_in_before = std::fs::read_to_string(node.paths.drop_in()).unwrap();
    let state = node
        .apply(&Operation::RotateToken {
            token: token("K10def::server:new"),
        })
        .await;
    assert!(
        matches!(&state, K3sState::Joined { server_url, .. } if server_url == "https://10.0.0.1:6443"),
        "{state:?}"
    );
    assert_eq!(
        std::fs::read_to_string(node.paths.token()).unwrap(),
        "K10def::server:new"
    );
    assert_eq!(
        std::fs::read_to_string(node.paths.drop_in()).unwrap(),
        drop_in_before
    );
    assert!(node.units.calls().contains(&format!("restart {UNIT}")));
}

#[tokio::test]
async fn rotating_before_any_join_is_a_bad_request() {
    let root = fake_root(false);
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    let state = node
        .apply(&Operation::RotateToken { token: token("t") })
        .await;
    assert!(matches!(
        state,
        K3sState::Failed {
            reason: K3sFailure::BadRequest,
            ..
        }
    ));
    assert!(node.units.calls().is_empty());
}

/// The unprivileged agent asks, the root helper acts and answers, the agent reads it.
#[tokio::test]
async fn the_helper_takes_the_agents_request_joins_and_the_agent_reads_the_answer() {
    let root = fake_root(false);
    let data = tempfile::tempdir().unwrap();
    let handoff = Handoff::new(data.path());
    let id = CommandId::new("c-7").unwrap();
    handoff
        .submit(&Request {
            command_id: id.clone(),
            op: join_op(),
        })
        .unwrap();
    let mode = std::fs::metadata(handoff.request_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the request holds the token");

    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    let served = handoff.serve(&node).await.unwrap().unwrap();
    assert!(
        !handoff.request_path().exists(),
        "the token does not stay in the agent's directory"
    );
    assert!(matches!(served.state, K3sState::Joined { .. }));

    let answer = handoff.outcome(&id, Duration::from_secs(5)).await;
    assert_eq!(answer, served);
    // Nothing pending: the helper has nothing to do.
    assert!(handoff.serve(&node).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_helper_never_answers_reports_a_system_failure() {
    let data = tempfile::tempdir().unwrap();
    let handoff = Handoff::new(data.path());
    let id = CommandId::new("c-8").unwrap();
    let answer = handoff.outcome(&id, Duration::from_secs(30)).await;
    assert!(matches!(
        answer.state,
        K3sState::Failed {
            reason: K3sFailure::System,
            ..
        }
    ));
}

#[tokio::test]
async fn the_helper_refuses_a_handoff_directory_that_is_a_symlink() {
    let root = fake_root(false);
    let data = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.path().join("etc"), data.path().join("k3s")).unwrap();
    let node = node(
        root.path(),
        FakeUnits::answering(&[ActiveState::Active], ""),
    );
    let err = Handoff::new(data.path()).serve(&node).await.unwrap_err();
    assert!(matches!(err, helper::HandoffError::NotADirectory(_)));
}

#[test]
fn the_three_k3s_commands_map_to_operations_and_nothing_else_does() {
    let join = CommandKind::K3sJoin {
        server_url: "https://10.0.0.1:6443".into(),
        token: token("t"),
        node_labels: BTreeMap::new(),
    };
    assert!(matches!(
        Operation::from_command(&join),
        Some(Operation::Join { .. })
    ));
    assert_eq!(
        Operation::from_command(&CommandKind::K3sLeave),
        Some(Operation::Leave)
    );
    assert_eq!(
        Operation::from_command(&CommandKind::K3sRotateToken { token: token("n") }),
        Some(Operation::RotateToken { token: token("n") })
    );
    assert_eq!(Operation::from_command(&CommandKind::ReportNow), None);
}
