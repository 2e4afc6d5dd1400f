//! The fleet data loop against a real server: robots' uploads (and every way one is
//! refused), listing and summaries, data sets and their exports, thumbnails and capture
//! orders. Every test runs twice: with the local disk store and with S3 (a real
//! `moto_server` on loopback).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Read as _;

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{Command, CommandKind};
use botfleet_protocol::sample::{self, CaptureRule, SampleHeader, SampleModel, SampleTensor};
use botfleet_protocol::tensor::DataType;
use botfleet_protocol::{DeviceId, TopicKind, TrustedKeys};
use botfleet_server::Config;
use botfleet_server::data::DeviceSecret;
use common::moto::Moto;
use common::{MqttClient, TestServer, info, topic};
use serde_json::{Value, json};

/// The test servers take samples of at most this many bytes (small, so that an oversized
/// upload is sent whole before the server answers 413).
const MAX_SAMPLE_BYTES: u64 = 64 * 1024;
const OPERATOR: &str = "operator-token-0123456789";
const READER: &str = "reader-token-0123456789";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Local,
    S3,
}

/// A server on `backend` (and the moto_server behind it), with API tokens.
struct Data {
    server: TestServer,
    config: Config,
    secret: DeviceSecret,
    _moto: Option<Moto>,
}

impl Data {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// As [`Self::start`], the configuration changed by `adjust` first.
    async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let moto = match backend {
            Backend::Local => None,
            Backend::S3 => Some(Moto::start("fleet-samples").await),
        };
        let credentials = dir.path().join("s3.env");
        std::fs::write(
            &credentials,
            "AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n",
        )
        .unwrap();
        let mut config = common::test_config(&dir);
        {
            config.data.max_sample_bytes = MAX_SAMPLE_BYTES;
            if let Some(moto) = &moto {
                config.data.store_url = format!("s3://{}/botfleet/test", moto.bucket);
                config.data.s3_endpoint = moto.endpoint.clone();
                config.data.s3_region = "us-east-1".into();
                config.data.s3_allow_http = true;
                config.data.s3_credentials_file = credentials.clone();
            }
            for (name, role, token) in [("ops", "operator", OPERATOR), ("ci", "read", READER)] {
                config.auth.tokens.push(
                    serde_json::from_value(json!({"name": name, "role": role, "token": token}))
                        .unwrap(),
                );
            }
        }
        adjust(&mut config);
        let running = botfleet_server::start(config.clone()).await.unwrap();
        let server = TestServer {
            running,
            dir,
            http: common::http_client(),
        };
        let secret = DeviceSecret::load(&server.dir.path().join("device-secret")).unwrap();
        Self {
            server,
            config,
            secret,
            _moto: moto,
        }
    }

    /// Waits until the server knows `device` (it reported over MQTT).
    async fn wait_for_device(&self, device: &str) {
        let path = format!("/api/v1/devices/{device}");
        tokio::time::timeout(common::WAIT, async {
            while self.get_with(&path, READER).await.status() != 200 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the server never knew {device}"));
    }

    fn token(&self, device: &str) -> String {
        self.secret.token(&DeviceId::new(device).unwrap())
    }

    /// `PUT`s `file` as `device`'s sample `sha` with `token`; status and answer.
    async fn put_as(
        &self,
        device: &str,
        sha: &str,
        token: Option<&str>,
        file: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self
            .server
            .http
            .put(
                self.server
                    .url(&format!("/api/v1/devices/{device}/samples/{sha}")),
            )
            .body(file);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Uploads `file` as its own device with its token: the status.
    async fn upload(&self, file: &[u8]) -> u16 {
        let header = sample::decode(file).unwrap().header;
        let device = header.device.as_str();
        let sha = Sha256Digest::of(file).to_hex();
        let (status, body) = self
            .put_as(device, &sha, Some(&self.token(device)), file.to_vec())
            .await;
        assert!(status == 200 || status == 201, "{status}: {body}");
        assert_eq!(body["sha256"], sha.as_str());
        status
    }

    async fn get_with(&self, path: &str, token: &str) -> reqwest::Response {
        self.server
            .http
            .get(self.server.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// `GET` with the read token; the answer must be 200 JSON.
    async fn get(&self, path: &str) -> Value {
        let response = self.get_with(path, READER).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .server
            .http
            .post(self.server.url(path))
            .bearer_auth(OPERATOR)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The digests `GET /api/v1/samples?…` lists, in its order.
    async fn listed(&self, query: &str) -> Vec<String> {
        let list = self.get(&format!("/api/v1/samples{query}")).await;
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["sha256"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn stop(self) {
        self.server.running.shutdown().await.unwrap();
    }
}

/// A sample file: `device`'s `slot`, captured by `rule` at `at`, with one input.
fn sample_file(
    device: &str,
    slot: &str,
    rule: CaptureRule,
    at: &str,
    input: (DataType, Vec<usize>, Vec<u8>),
) -> Vec<u8> {
    let (datatype, shape, data) = input;
    let header = SampleHeader {
        schema: sample::SAMPLE_SCHEMA,
        device: device.parse().unwrap(),
        slot: slot.parse().unwrap(),
        model: SampleModel {
            version: "1.0.0".into(),
            release: 1,
            sha256: Sha256Digest::of(b"model"),
        },
        engine: EngineKind::Tract,
        captured_at: at.parse().unwrap(),
        rule,
        detail: Some("top-1 0.41 < 0.6".into()),
        candidate: None,
        latency_ms: Some(1.5),
        inputs: vec![SampleTensor {
            name: "x".into(),
            datatype,
            shape,
        }],
        outputs: vec![SampleTensor {
            name: "y".into(),
            datatype: DataType::Int64,
            shape: vec![1],
        }],
        candidate_outputs: vec![],
    };
    sample::encode(&header, &[&data, &7i64.to_le_bytes()]).unwrap()
}

/// A small sample of `device`'s `digits` slot; `seed` makes each one distinct.
fn small(device: &str, rule: CaptureRule, at: &str, seed: u8) -> Vec<u8> {
    let data = [seed, 1, 2, 3, 4, 5, 6, 7].to_vec();
    sample_file(
        device,
        "digits",
        rule,
        at,
        (DataType::Fp32, vec![1, 2], data),
    )
}

fn sha(file: &[u8]) -> String {
    Sha256Digest::of(file).to_hex()
}

/// The entries of a tar: names and contents, in order.
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

/// An upload that must be refused: the digest in its path, its token and body, the status
/// and what the error must say.
struct Refused<'a> {
    what: &'a str,
    digest: String,
    token: Option<&'a str>,
    file: Vec<u8>,
    status: u16,
    says: &'a str,
}

async fn uploads_are_stored_once_and_bad_ones_are_refused_without_losing_others(backend: Backend) {
    let data = Data::start(backend).await;
    let a = small(
        "robot-1",
        CaptureRule::LowConfidence,
        "2026-01-01T10:00:00Z",
        1,
    );
    let b = small("robot-1", CaptureRule::Sampled, "2026-01-01T10:01:00Z", 2);
    assert_eq!(data.upload(&a).await, 201, "stored");
    assert_eq!(
        data.upload(&a).await,
        200,
        "the same digest again: stored already"
    );
    assert_eq!(data.upload(&b).await, 201);
    let token = data.token("robot-1");

    // Every refusal says why, and leaves what was stored as it was.
    let c = small("robot-1", CaptureRule::Sampled, "2026-01-01T10:02:00Z", 3);
    let garbage = b"GIF89a not a sample".to_vec();
    let truncated = c[..c.len() - 3].to_vec();
    let n = MAX_SAMPLE_BYTES as usize / 4 + 1;
    let big = sample_file(
        "robot-1",
        "digits",
        CaptureRule::Sampled,
        "2026-01-01T10:03:00Z",
        (DataType::Fp32, vec![1, n], vec![0; n * 4]),
    );
    let of_robot_2 = small("robot-2", CaptureRule::Sampled, "2026-01-01T10:04:00Z", 5);
    // robot-2's token names robot-2: genuine, but not robot-1's (403, not 401).
    let mut robot = MqttClient::connect(data.server.mqtt_addr(), "robots").await;
    robot
        .publish(&topic("robot-2", TopicKind::Info), true, info(json!({})))
        .await;
    data.wait_for_device("robot-2").await;
    let robot_2 = data.token("robot-2");
    let refuse = |what, digest: String, token, file: &[u8], status, says| Refused {
        what,
        digest,
        token,
        file: file.to_vec(),
        status,
        says,
    };
    let cases = [
        refuse(
            "malformed",
            sha(&garbage),
            Some(&*token),
            &garbage,
            400,
            "not a sample file",
        ),
        refuse(
            "truncated",
            sha(&truncated),
            Some(&token),
            &truncated,
            400,
            "the file holds",
        ),
        refuse("digest mismatch", sha(&a), Some(&token), &c, 400, "SHA-256"),
        refuse(
            "not a digest",
            "abc".into(),
            Some(&token),
            &c,
            400,
            "not a SHA-256",
        ),
        refuse(
            "oversized",
            sha(&big),
            Some(&token),
            &big,
            413,
            "max_sample_bytes",
        ),
        refuse(
            "another device's token",
            sha(&c),
            Some(&robot_2),
            &c,
            403,
            "robot-2",
        ),
        refuse("no token", sha(&c), None, &c, 401, "token"),
        refuse("a bad token", sha(&c), Some("00ff"), &c, 401, "not valid"),
        refuse(
            "an API token",
            sha(&c),
            Some(OPERATOR),
            &c,
            401,
            "not valid",
        ),
        refuse(
            "another device's sample",
            sha(&of_robot_2),
            Some(&token),
            &of_robot_2,
            400,
            "names device robot-2",
        ),
    ];
    for case in cases {
        let (got, body) = data
            .put_as("robot-1", &case.digest, case.token, case.file)
            .await;
        let what = case.what;
        assert_eq!(got, case.status, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(case.says),
            "{what}: {error:?} does not say {:?}",
            case.says
        );
        assert_eq!(
            data.listed("").await,
            [sha(&b), sha(&a)],
            "{what}: the stored samples are as they were"
        );
    }
    // The refused ones are nowhere; the stored ones are whole.
    for file in [&a, &b] {
        let response = data
            .get_with(&format!("/api/v1/samples/{}/file", sha(file)), READER)
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap().as_ref(), file.as_slice());
    }
    let response = data
        .get_with(&format!("/api/v1/samples/{}", sha(&c)), READER)
        .await;
    assert_eq!(response.status(), 404);
    // HEAD answers whether the server has it, for the robot's own token only.
    let head = |digest: String, token: String| {
        let http = data.server.http.clone();
        let url = data
            .server
            .url(&format!("/api/v1/devices/robot-1/samples/{digest}"));
        async move {
            http.head(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(head(sha(&a), token.clone()).await, 200);
    assert_eq!(head(sha(&c), token.clone()).await, 404);
    assert_eq!(head(sha(&a), robot_2.clone()).await, 403);
    // The record says what the header said.
    let record = data.get(&format!("/api/v1/samples/{}", sha(&a))).await;
    assert_eq!(record["device"], "robot-1");
    assert_eq!(record["rule"], "low_confidence");
    assert_eq!(record["bytes"], a.len());
    assert_eq!(record["inputs"][0]["shape"], json!([1, 2]));
    // The counts reach /metrics.
    let metrics = data
        .server
        .http
        .get(data.server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "botfleet_samples_received_total{result=\"stored\"} 2",
        "botfleet_samples_received_total{result=\"duplicate\"} 1",
        "botfleet_samples_refused_total{reason=\"too_large\"} 1",
        "botfleet_samples_refused_total{reason=\"forbidden\"} 2",
        "botfleet_samples_refused_total{reason=\"unauthorized\"} 3",
        "botfleet_samples_refused_total{reason=\"digest_mismatch\"} 1",
        "botfleet_samples_refused_total{reason=\"device_mismatch\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // Reads need the API's tokens, not a device's.
    let response = data.get_with("/api/v1/samples", &token).await;
    assert_eq!(response.status(), 401);
    data.stop().await;
}

async fn samples_are_listed_newest_first_and_summarised_by_filter(backend: Backend) {
    let data = Data::start(backend).await;
    let files = [
        small("robot-1", CaptureRule::Sampled, "2026-01-01T10:00:00Z", 1),
        small(
            "robot-1",
            CaptureRule::LowConfidence,
            "2026-01-01T10:30:00Z",
            2,
        ),
        small("robot-2", CaptureRule::Sampled, "2026-01-01T11:15:00Z", 3),
        small("robot-1", CaptureRule::Sampled, "2026-01-01T12:45:00Z", 4),
    ];
    for file in &files {
        data.upload(file).await;
    }
    let [s0, s1, s2, s3] = files.each_ref().map(|f| sha(f));
    let [s0, s1, s2, s3] = [s0.as_str(), s1.as_str(), s2.as_str(), s3.as_str()];
    assert_eq!(data.listed("").await, [s3, s2, s1, s0]);
    assert_eq!(data.listed("?device=robot-1").await, [s3, s1, s0]);
    assert_eq!(data.listed("?rule=sampled&device=robot-1").await, [s3, s0]);
    assert_eq!(
        data.listed("?since=2026-01-01T10:30:00Z&until=2026-01-01T12:45:00Z")
            .await,
        [s2, s1]
    );
    assert_eq!(data.listed("?limit=1").await, [s3]);
    assert_eq!(data.listed("?slot=other").await, Vec::<String>::new());
    assert_eq!(
        data.listed("?device=&slot=").await.len(),
        4,
        "empty: no filter"
    );
    for bad in [
        "?rule=often",
        "?since=yesterday",
        "?limit=-1",
        "?devices=robot-1",
    ] {
        let response = data
            .get_with(&format!("/api/v1/samples{bad}"), READER)
            .await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    let summary = data.get("/api/v1/samples/summary?bucket_s=3600").await;
    assert_eq!(summary["samples"], 4);
    let rows: Vec<(String, String, String, u64)> = summary["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_str().unwrap().to_owned(),
                r["device"].as_str().unwrap().to_owned(),
                r["rule"].as_str().unwrap().to_owned(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect();
    let row = |start: &str, device: &str, rule: &str, n| {
        (start.to_owned(), device.to_owned(), rule.to_owned(), n)
    };
    assert_eq!(
        rows,
        [
            // Rules in their documented order: sampled, low_confidence, …
            row("2026-01-01T10:00:00Z", "robot-1", "sampled", 1),
            row("2026-01-01T10:00:00Z", "robot-1", "low_confidence", 1),
            row("2026-01-01T11:00:00Z", "robot-2", "sampled", 1),
            row("2026-01-01T12:00:00Z", "robot-1", "sampled", 1),
        ]
    );
    let day = data
        .get("/api/v1/samples/summary?bucket_s=86400&device=robot-1")
        .await;
    assert_eq!(day["samples"], 3);
    assert_eq!(day["buckets"].as_array().unwrap().len(), 2, "{day}");
    data.stop().await;
}

async fn a_data_set_exports_exactly_the_samples_its_selection_names(backend: Backend) {
    let data = Data::start(backend).await;
    let files = [
        small(
            "robot-1",
            CaptureRule::LowConfidence,
            "2026-01-01T10:00:00Z",
            1,
        ),
        small(
            "robot-2",
            CaptureRule::LowConfidence,
            "2026-01-01T10:00:00Z",
            2,
        ),
        small("robot-1", CaptureRule::Sampled, "2026-01-01T11:00:00Z", 3),
        small(
            "robot-1",
            CaptureRule::LowConfidence,
            "2026-01-01T12:00:00Z",
            4,
        ),
        small(
            "robot-3",
            CaptureRule::LowConfidence,
            "2026-01-01T12:30:00Z",
            5,
        ),
        small(
            "robot-1",
            CaptureRule::LowConfidence,
            "2026-01-02T00:00:00Z",
            6,
        ),
    ];
    for file in &files {
        data.upload(file).await;
    }
    let (status, dataset) = data
        .post(
            "/api/v1/datasets",
            &json!({
                "name": "low confidence, day one", "devices": ["robot-1", "robot-2"],
                "rules": ["low_confidence"], "since": "2026-01-01T00:00:00Z",
                "until": "2026-01-02T00:00:00Z"
            }),
        )
        .await;
    assert_eq!(status, 201, "{dataset}");
    let id = dataset["id"].as_str().unwrap().to_owned();
    // Manifest order: by capture time, then digest.
    let mut wanted = vec![
        (&files[0], "2026-01-01T10:00:00Z"),
        (&files[1], "2026-01-01T10:00:00Z"),
        (&files[3], "2026-01-01T12:00:00Z"),
    ];
    wanted.sort_by_key(|(f, at)| (at.to_owned(), sha(f)));
    let wanted: Vec<&Vec<u8>> = wanted.into_iter().map(|(f, _)| f).collect();
    assert_eq!(dataset["samples"], 3);
    assert_eq!(
        dataset["bytes"],
        wanted.iter().map(|f| f.len()).sum::<usize>()
    );

    // The manifest: its exact bytes have the digest the record and the header name.
    let response = data
        .get_with(&format!("/api/v1/datasets/{id}/manifest"), READER)
        .await;
    assert_eq!(response.status(), 200);
    let header = response.headers()["x-botfleet-dataset-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let manifest = response.bytes().await.unwrap();
    assert_eq!(Sha256Digest::of(&manifest).to_hex(), header);
    assert_eq!(dataset["digest"], header.as_str());
    let parsed: Value = serde_json::from_slice(&manifest).unwrap();
    let listed: Vec<&str> = parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(listed, wanted.iter().map(|f| sha(f)).collect::<Vec<_>>());

    // The export: the manifest, then exactly those files, in that order, byte for byte.
    let response = data
        .get_with(&format!("/api/v1/datasets/{id}/export"), READER)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-botfleet-dataset-digest"],
        header.as_str()
    );
    let tar = response.bytes().await.unwrap();
    let entries = untar(&tar);
    assert_eq!(entries[0].0, "manifest.json");
    assert_eq!(entries[0].1, manifest.as_ref());
    let names: Vec<String> = entries[1..].iter().map(|(n, _)| n.clone()).collect();
    let expected: Vec<String> = wanted
        .iter()
        .map(|f| format!("samples/{}.bfs", sha(f)))
        .collect();
    assert_eq!(names, expected);
    for ((_, bytes), file) in entries[1..].iter().zip(&wanted) {
        assert_eq!(bytes, *file);
    }
    assert_eq!(tar.len() % 512, 0);
    assert!(
        tar[tar.len() - 1024..].iter().all(|&b| b == 0),
        "two zero blocks end it"
    );

    // The same data set again and the list.
    assert_eq!(data.get(&format!("/api/v1/datasets/{id}")).await, dataset);
    let all = data.get("/api/v1/datasets").await;
    assert_eq!(all.as_array().unwrap().len(), 1);

    // A selector picks devices by their labels; a selection of nothing is refused.
    let mut robot = MqttClient::connect(data.server.mqtt_addr(), "robots").await;
    for (device, site) in [("robot-1", "lab"), ("robot-3", "lab"), ("robot-2", "field")] {
        robot
            .publish(
                &topic(device, TopicKind::Info),
                true,
                info(json!({"site": site})),
            )
            .await;
        data.wait_for_device(device).await;
    }
    let (status, lab) = data
        .post(
            "/api/v1/datasets",
            &json!({"name": "lab", "selector": "site=lab", "slots": ["digits"]}),
        )
        .await;
    assert_eq!(status, 201, "{lab}");
    let lab_id = lab["id"].as_str().unwrap();
    let tar = data
        .get_with(&format!("/api/v1/datasets/{lab_id}/export"), READER)
        .await
        .bytes()
        .await
        .unwrap();
    let got: BTreeSet<String> = untar(&tar)[1..].iter().map(|(n, _)| n.clone()).collect();
    let lab_files: BTreeSet<String> = [&files[0], &files[2], &files[3], &files[4], &files[5]]
        .iter()
        .map(|f| format!("samples/{}.bfs", sha(f)))
        .collect();
    assert_eq!(got, lab_files, "robot-2 is in the field");
    for (body, says) in [
        (json!({"name": "none", "devices": ["robot-9"]}), "no sample"),
        (json!({"name": "x", "selector": "site in ("}), "selector"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x", "labels": {}}), "unknown field"),
    ] {
        let (status, answer) = data.post("/api/v1/datasets", &body).await;
        assert!(status == 400 || status == 422, "{body}: {status} {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}: {error}");
    }
    // Making a data set needs an operator.
    let response = data
        .server
        .http
        .post(data.server.url("/api/v1/datasets"))
        .bearer_auth(READER)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    data.stop().await;
}

/// Runs the `botfleet-server` binary with `args` against the test server; its JSON answer.
async fn cli_json(data: &Data, args: &[&str]) -> Value {
    let base = data.server.running.base_url();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_botfleet-server"));
    command
        .args(args)
        .args(["--server", &base, "--token", OPERATOR, "--output", "json"]);
    let output = command.output().await.unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn the_cli_makes_lists_and_exports_data_sets_checking_every_digest(backend: Backend) {
    let data = Data::start(backend).await;
    let files = [
        small("robot-1", CaptureRule::OnDemand, "2026-01-01T10:00:00Z", 1),
        small("robot-1", CaptureRule::OnDemand, "2026-01-01T10:05:00Z", 2),
        small("robot-1", CaptureRule::Sampled, "2026-01-01T10:06:00Z", 3),
    ];
    for file in &files {
        data.upload(file).await;
    }
    let listed = cli_json(&data, &["samples", "list", "--rule", "on_demand"]).await;
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [sha(&files[1]), sha(&files[0])]);
    let dataset = cli_json(
        &data,
        &[
            "dataset",
            "create",
            "--name",
            "on demand",
            "--rule",
            "on_demand",
            "--device",
            "robot-1",
        ],
    )
    .await;
    assert_eq!(dataset["samples"], 2, "{dataset}");
    let id = dataset["id"].as_str().unwrap();
    let shown = cli_json(&data, &["dataset", "show", id]).await;
    assert_eq!(shown, dataset);
    let all = cli_json(&data, &["dataset", "list"]).await;
    assert_eq!(all, json!([dataset]));
    let out = data.server.dir.path().join("export.tar");
    let base = data.server.running.base_url();
    let export = |output: &std::path::Path| {
        use clap::Parser as _;
        botfleet_server::cli::Cli::try_parse_from([
            "botfleet-server",
            "dataset",
            "export",
            id,
            "--output",
            output.to_str().unwrap(),
            "--server",
            &base,
            "--token",
            READER,
        ])
        .unwrap()
    };
    botfleet_server::cli::run(export(&out)).await.unwrap();
    let entries = untar(&std::fs::read(&out).unwrap());
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[1].1, files[0]);

    // A stored sample changed behind the server's back: the export is cut, and the CLI
    // keeps no file.
    let settings = data.config.validate().unwrap();
    let store = botfleet_server::data::BlobStore::open(&settings.store, &data.config.data).unwrap();
    let key = botfleet_server::data::store::sample_key(&Sha256Digest::of(&files[1]));
    let mut forged = files[1].clone();
    let last = forged.len() - 1;
    forged[last] ^= 0xff;
    store.put(&key, forged.into()).await.unwrap();
    let bad = data.server.dir.path().join("bad.tar");
    let err = botfleet_server::cli::run(export(&bad)).await.unwrap_err();
    assert!(!bad.exists(), "{err}");
    let mut part = bad.clone().into_os_string();
    part.push(".part");
    assert!(!std::path::Path::new(&part).exists());
    data.stop().await;
}

async fn a_thumbnail_of_an_image_input_is_a_png(backend: Backend) {
    let data = Data::start(backend).await;
    let pixels: Vec<u8> = (0..28 * 28)
        .flat_map(|i| ((i % 28) as f32 / 27.0).to_le_bytes())
        .collect();
    let digit = sample_file(
        "robot-1",
        "digits",
        CaptureRule::LowConfidence,
        "2026-01-01T10:00:00Z",
        (DataType::Fp32, vec![1, 1, 28, 28], pixels),
    );
    data.upload(&digit).await;
    let response = data
        .get_with(
            &format!("/api/v1/samples/{}/thumbnail.png", sha(&digit)),
            READER,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let png = response.bytes().await.unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png.to_vec()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), (28, 28));
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    assert_eq!((buf[0], buf[27]), (0, 255), "min-max normalised");

    let vector = small("robot-1", CaptureRule::Sampled, "2026-01-01T10:01:00Z", 9);
    data.upload(&vector).await;
    let response = data
        .get_with(
            &format!("/api/v1/samples/{}/thumbnail.png", sha(&vector)),
            READER,
        )
        .await;
    assert_eq!(response.status(), 415);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("[1, 2]"), "{body}");
    data.stop().await;
}

async fn a_capture_order_reaches_the_device_signed_by_the_server(backend: Backend) {
    let data = Data::start(backend).await;
    let mut robot = MqttClient::connect(data.server.mqtt_addr(), "robot-1").await;
    robot
        .publish(&topic("robot-1", TopicKind::Info), true, info(json!({})))
        .await;
    data.wait_for_device("robot-1").await;
    let commands = topic("robot-1", TopicKind::Commands);
    robot.subscribe(&commands).await;
    let (status, sent) = data
        .post(
            "/api/v1/devices/robot-1/capture",
            &json!({"slot": "digits", "requests": 25, "reason": "night shift"}),
        )
        .await;
    assert_eq!(status, 202, "{sent}");
    let publish = robot.next_publish(&commands).await;
    let command: Command = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(
        command.command_id.as_str(),
        sent["command_id"].as_str().unwrap()
    );
    let CommandKind::SignedCapture { order } = command.kind else {
        panic!("not a capture order: {command:?}");
    };
    let trusted = TrustedKeys::parse([data.server.running.public_key().as_str()]).unwrap();
    let me = DeviceId::new("robot-1").unwrap();
    let verified = order
        .verify(&trusted, &me, jiff::Timestamp::now())
        .unwrap()
        .into_inner();
    assert_eq!(verified.slot.as_str(), "digits");
    assert_eq!(verified.capture_requests, 25);
    assert_eq!(verified.reason.as_deref(), Some("night shift"));
    assert_eq!(sent["expires_at"], json!(verified.expires_at));
    let other = DeviceId::new("robot-2").unwrap();
    assert!(
        order
            .verify(&trusted, &other, jiff::Timestamp::now())
            .is_err()
    );

    for (path, body, status) in [
        (
            "/api/v1/devices/robot-9/capture",
            json!({"slot": "digits", "requests": 5}),
            404,
        ),
        (
            "/api/v1/devices/robot-1/capture",
            json!({"slot": "digits", "requests": 0}),
            400,
        ),
        (
            "/api/v1/devices/robot-1/capture",
            json!({"slot": "digits", "requests": 10001}),
            400,
        ),
        (
            "/api/v1/devices/robot-1/capture",
            json!({"slot": "a/b", "requests": 5}),
            422,
        ),
    ] {
        let (got, answer) = data.post(path, &body).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    data.stop().await;
}

async fn the_device_token_command_prints_the_token_the_server_takes(backend: Backend) {
    let data = Data::start(backend).await;
    let secret = data.server.dir.path().join("device-secret");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_botfleet-server"))
        .args([
            "device-token",
            "robot-7",
            "--secret",
            secret.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    let token = printed.trim();
    assert!(token.starts_with("robot-7:"), "{token}");
    assert_eq!(token.len(), "robot-7:".len() + 64);
    assert_eq!(token, data.server.running.device_token("robot-7"));
    let file = small("robot-7", CaptureRule::Sampled, "2026-01-01T10:00:00Z", 1);
    let (status, body) = data.put_as("robot-7", &sha(&file), Some(token), file).await;
    assert_eq!(status, 201, "{body}");
    data.stop().await;
}

/// A sample of `bytes` of FP32 input (at most `MAX_SAMPLE_BYTES` in all).
fn sized(device: &str, at: &str, bytes: usize) -> Vec<u8> {
    let n = bytes / 4;
    sample_file(
        device,
        "digits",
        CaptureRule::Sampled,
        at,
        (DataType::Fp32, vec![1, n], vec![3; n * 4]),
    )
}

/// Uploads wait in memory while they are checked: all together they may hold
/// `data.max_upload_buffer_bytes`. Two uploads that each need all of it send half their
/// bodies and wait: whichever came second is answered 429 with Retry-After at once, never
/// queued; the other is stored whole once its body is done, and a later one goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upload_buffer_answers_429_and_the_sample_goes_in_later() {
    let data = Data::start_with(Backend::Local, |config| {
        config.data.max_upload_buffer_bytes = MAX_SAMPLE_BYTES;
    })
    .await;
    let token = data.token("robot-1");
    // Each takes all of the buffer's 64 KiB but less than 1 KiB.
    let files: Vec<Vec<u8>> = ["2026-01-01T10:00:00Z", "2026-01-01T10:01:00Z"]
        .into_iter()
        .map(|at| sized("robot-1", at, 63 * 1024 + 200))
        .collect();
    let mut rest = Vec::new();
    let mut answers = tokio::task::JoinSet::new();
    for (n, file) in files.iter().enumerate() {
        assert!(file.len() as u64 > MAX_SAMPLE_BYTES - 1024);
        assert!(file.len() as u64 <= MAX_SAMPLE_BYTES);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        let half = file.len() / 2;
        tx.send(Ok(file[..half].to_vec())).await.unwrap();
        rest.push((tx, file[half..].to_vec()));
        let request = data
            .server
            .http
            .put(
                data.server
                    .url(&format!("/api/v1/devices/robot-1/samples/{}", sha(file))),
            )
            .bearer_auth(&token)
            .header("content-length", file.len())
            .body(reqwest::Body::wrap_stream(tokio_stream(rx)))
            .send();
        answers.spawn(async move { (n, request.await) });
    }
    // Neither body is done, so the first answer is the refusal.
    let (refused_n, refused) = tokio::time::timeout(common::WAIT, answers.join_next())
        .await
        .expect("the full buffer never refused an upload")
        .unwrap()
        .unwrap();
    let refused = refused.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let answer: Value = refused.json().await.unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("max_upload_buffer_bytes"),
        "{answer}"
    );
    // The other body's second half: stored whole, and its room free again.
    let held_n = 1 - refused_n;
    let (tx, tail) = rest.swap_remove(held_n);
    tx.send(Ok(tail)).await.unwrap();
    drop(tx);
    drop(rest);
    let (_, held) = tokio::time::timeout(common::WAIT, answers.join_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(held.unwrap().status(), 201);
    let later = small("robot-1", CaptureRule::Sampled, "2026-01-01T10:02:00Z", 10);
    assert_eq!(data.upload(&later).await, 201);
    let digests: BTreeSet<String> = data.listed("?device=robot-1").await.into_iter().collect();
    let expected: BTreeSet<String> = [sha(&files[held_n]), sha(&later)].into();
    assert_eq!(digests, expected);
    data.stop().await;
}

/// An mpsc receiver as a stream of body chunks.
fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::Local).await
            })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Backend::S3).await
            })*
        }
    };
}

on_both_backends!(
    uploads_are_stored_once_and_bad_ones_are_refused_without_losing_others,
    samples_are_listed_newest_first_and_summarised_by_filter,
    a_data_set_exports_exactly_the_samples_its_selection_names,
    the_cli_makes_lists_and_exports_data_sets_checking_every_digest,
    a_thumbnail_of_an_image_input_is_a_png,
    a_capture_order_reaches_the_device_signed_by_the_server,
    the_device_token_command_prints_the_token_the_server_takes,
);
