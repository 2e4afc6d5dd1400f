//! The binary tensor data extension of the OIP v2 API (Triton's `binary_data`,
//! `Inference-Header-Content-Length`), over real HTTP on loopback with real models, on
//! tract and on ONNX Runtime's CPU provider. Needs the ONNX Runtime library:
//! `ORT_DYLIB_PATH`, or the onnxruntime wheel in the repository's `.venv` (`.ci/run`
//! installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::sync::Arc;

use botfleet_agent::serve::router;
use botfleet_agent::slots::{ServingModel, Slots};
use botfleet_engine::{Engines, LoadOptions, OnnxRuntimeSettings};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::{Artifact, Gate, ModelFormat, Quantization, Sha256Digest};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{ExpiryCheck, Manifest, ManifestSigner, SlotName, TrustedKeys};
use serde_json::{Value, json};

const HEADER: &str = "Inference-Header-Content-Length";
const BODY_LIMIT: usize = 1 << 20;

fn spec(name: &str, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: shape.to_vec(),
    }
}

/// Every engine the binary extension is served on here.
const ENGINES: [EngineKind; 2] = [EngineKind::Tract, EngineKind::OnnxruntimeCpu];

#[path = "../../engine/tests/support/onnxruntime_library.rs"]
mod onnxruntime_library;
use onnxruntime_library::onnxruntime_library;

/// tract and ONNX Runtime, which must have loaded.
fn engines() -> Engines {
    let engines = Engines::probe(&OnnxRuntimeSettings {
        library: Some(onnxruntime_library()),
        ..OnnxRuntimeSettings::default()
    });
    for engine in ENGINES {
        assert!(
            engines.available().contains(&engine),
            "{engine} is not available: {:?}",
            engines.info()
        );
    }
    engines
}

/// Serves `bytes` (loaded with `inputs` on `engine`) as slot `m` on a loopback port;
/// returns its infer URL.
async fn serve(
    engines: &Engines,
    engine: EngineKind,
    bytes: &[u8],
    inputs: &[TensorSpec],
) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let model = engines
        .load(engine, bytes, inputs, &LoadOptions::default())
        .unwrap();
    assert_eq!(model.engine(), engine);
    let signer = ManifestSigner::from_secret([9; 32]);
    let manifest = Manifest {
        schema: 1,
        slot: SlotName::new("m").unwrap(),
        name: "m".into(),
        version: "1".into(),
        release: 1,
        artifact: Artifact {
            size: bytes.len() as u64,
            sha256: Sha256Digest::of(bytes),
            format: ModelFormat::Onnx,
            quantization: Quantization::Fp32,
        },
        inputs: inputs.to_vec(),
        outputs: vec![],
        compatibility: Default::default(),
        gate: Gate::default(),
        provenance: Default::default(),
        issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires_at: "2036-01-01T00:00:00Z".parse().unwrap(),
        allow_downgrade: false,
        engines: Default::default(),
    };
    let verified = signer
        .sign(&manifest)
        .unwrap()
        .verify(&TrustedKeys::new([signer.public_key()]), ExpiryCheck::Skip)
        .unwrap();
    let slots = Arc::new(Slots::default());
    slots.swap(
        &SlotName::new("m").unwrap(),
        Arc::new(ServingModel::new(model, verified, jiff::Timestamp::now())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v2/models/m/infer",
        listener.local_addr().unwrap()
    );
    let app = router(slots, BODY_LIMIT);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A JSON header followed by raw bytes, as a Triton client sends it.
async fn post_binary(url: &str, header: &Value, binary: &[u8]) -> reqwest::Response {
    post_raw(url, &header.to_string(), binary, None).await
}

async fn post_raw(
    url: &str,
    header: &str,
    binary: &[u8],
    declared: Option<&str>,
) -> reqwest::Response {
    let mut body = header.as_bytes().to_vec();
    body.extend_from_slice(binary);
    let length = declared.map_or_else(|| header.len().to_string(), str::to_owned);
    reqwest::Client::new()
        .post(url)
        .header(HEADER, length)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Splits a binary answer into its JSON header and the named binary outputs, as f32.
async fn read_binary(response: reqwest::Response) -> (Value, Vec<(String, Vec<f32>)>) {
    assert!(response.status().is_success(), "{}", response.status());
    let length: usize = response.headers()[HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.bytes().await.unwrap();
    let header: Value = serde_json::from_slice(&body[..length]).unwrap();
    let mut rest = &body[length..];
    let mut outputs = Vec::new();
    for output in header["outputs"].as_array().unwrap() {
        if let Some(size) = output["parameters"]["binary_data_size"].as_u64() {
            let (mine, after) = rest.split_at(size as usize);
            rest = after;
            let values = mine
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            outputs.push((output["name"].as_str().unwrap().to_owned(), values));
        }
    }
    assert!(rest.is_empty(), "bytes left after the outputs");
    (header, outputs)
}

fn json_values(output: &Value) -> Vec<f32> {
    output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn pnet() -> (Vec<u8>, Vec<TensorSpec>) {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models/mtcnn_pnet.onnx"
    ))
    .unwrap();
    (bytes, vec![spec("input_1", &[1, 24, 24, 3])])
}

fn image() -> Vec<f32> {
    (0..24 * 24 * 3).map(|i| (i % 255) as f32 / 255.0).collect()
}

#[tokio::test]
async fn a_binary_request_gives_the_same_numbers_as_the_json_request_on_a_real_fixture() {
    let engines = engines();
    for engine in ENGINES {
        binary_matches_json_on(&engines, engine).await;
    }
}

async fn binary_matches_json_on(engines: &Engines, engine: EngineKind) {
    let (bytes, inputs) = pnet();
    let url = serve(engines, engine, &bytes, &inputs).await;
    let values = image();
    let as_json = json!({"inputs": [{"name": "input_1", "shape": [1, 24, 24, 3],
        "datatype": "FP32", "data": values}]});
    let answer: Value = reqwest::Client::new()
        .post(&url)
        .json(&as_json)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected: Vec<(String, Vec<f32>)> = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["name"].as_str().unwrap().to_owned(), json_values(o)))
        .collect();
    assert_eq!(expected.len(), 2, "{answer}");
    assert_eq!(answer["parameters"]["engine"], engine.as_str(), "{answer}");

    let header = json!({
        "inputs": [{"name": "input_1", "shape": [1, 24, 24, 3], "datatype": "FP32",
            "parameters": {"binary_data_size": values.len() * 4}}],
        "parameters": {"binary_data_output": true},
    });
    let (header, outputs) = read_binary(post_binary(&url, &header, &le_bytes(&values)).await).await;
    assert_eq!(header["model_name"], "m");
    assert_eq!(header["parameters"]["engine"], engine.as_str(), "{header}");
    assert_eq!(
        outputs, expected,
        "{engine}: binary answer differs from the JSON one"
    );
}

#[tokio::test]
async fn malformed_binary_sizes_are_rejected_with_a_clear_400() {
    let engines = engines();
    for engine in ENGINES {
        malformed_sizes_are_rejected_on(&engines, engine).await;
    }
}

async fn malformed_sizes_are_rejected_on(engines: &Engines, engine: EngineKind) {
    let (bytes, inputs) = pnet();
    let url = serve(engines, engine, &bytes, &inputs).await;
    let data = le_bytes(&image());
    let header = |size: usize| {
        json!({"inputs": [{"name": "input_1", "shape": [1, 24, 24, 3], "datatype": "FP32",
            "parameters": {"binary_data_size": size}}]})
        .to_string()
    };
    let full = header(data.len());
    let cases: Vec<(&str, reqwest::Response, &str)> = vec![
        (
            "size does not match the shape",
            post_raw(&url, &header(data.len() - 4), &data[4..], None).await,
            "needs 6912",
        ),
        (
            "size runs past the body",
            post_raw(&url, &full, &data[..100], None).await,
            "runs past the body",
        ),
        (
            "bytes nobody claimed",
            post_raw(&url, &full, &[data.as_slice(), &[0; 8]].concat(), None).await,
            "8 bytes of binary data after",
        ),
        (
            "header length past the body",
            post_raw(&url, &full, &data, Some("999999")).await,
            "but the body has only",
        ),
        (
            "header length not a number",
            post_raw(&url, &full, &data, Some("lots")).await,
            "is not a byte count",
        ),
        (
            "both JSON data and binary size",
            post_raw(
                &url,
                &json!({"inputs": [{"name": "input_1", "shape": [1, 24, 24, 3], "datatype": "FP32",
                    "data": image(), "parameters": {"binary_data_size": data.len()}}]})
                .to_string(),
                &data,
                None,
            )
            .await,
            "send one",
        ),
        (
            "a shape whose size overflows",
            post_raw(
                &url,
                &json!({"inputs": [{"name": "input_1", "shape": [usize::MAX, 2], "datatype": "FP32",
                    "parameters": {"binary_data_size": 8}}]})
                .to_string(),
                &data[..8],
                None,
            )
            .await,
            "too large",
        ),
    ];
    for (what, response, needle) in cases {
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{engine}, {what}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{engine}, {what}: {message}");
    }

    // The total body is capped before anything is parsed.
    let huge = vec![0u8; BODY_LIMIT + 1];
    let response = post_raw(&url, &full, &huge, None).await;
    assert_eq!(response.status(), 413);

    // A good request still works afterwards.
    let (header, outputs) = read_binary(
        post_raw(
            &url,
            &json!({"inputs": [{"name": "input_1", "shape": [1, 24, 24, 3], "datatype": "FP32",
                "parameters": {"binary_data_size": data.len()}}],
                "parameters": {"binary_data_output": true}})
            .to_string(),
            &data,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(outputs.len(), 2);
    assert_eq!(header["parameters"]["engine"], engine.as_str(), "{header}");
}

/// Protocol buffer encoding, just enough for a two-input ONNX graph.
mod onnx {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    pub fn int(field: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(field << 3, &mut out);
        varint(v, &mut out);
        out
    }
    pub fn bytes(field: u64, v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint((field << 3) | 2, &mut out);
        varint(v.len() as u64, &mut out);
        out.extend_from_slice(v);
        out
    }
    fn value_info(name: &str, dims: &[u64]) -> Vec<u8> {
        let shape: Vec<u8> = dims.iter().flat_map(|d| bytes(1, &int(1, *d))).collect();
        let tensor = [int(1, 1), bytes(2, &shape)].concat(); // elem_type 1 = FLOAT
        [bytes(1, name.as_bytes()), bytes(2, &bytes(1, &tensor))].concat()
    }
    fn node(op: &str, inputs: &[&str], output: &str) -> Vec<u8> {
        let mut n: Vec<u8> = inputs.iter().flat_map(|i| bytes(1, i.as_bytes())).collect();
        n.extend(bytes(2, output.as_bytes()));
        n.extend(bytes(3, output.as_bytes()));
        n.extend(bytes(4, op.as_bytes()));
        n
    }
    /// `sum = a + b`, `product = a * b`, all FP32 of `dims`.
    pub fn add_and_mul(dims: &[u64]) -> Vec<u8> {
        let graph = [
            bytes(1, &node("Add", &["a", "b"], "sum")),
            bytes(1, &node("Mul", &["a", "b"], "product")),
            bytes(2, b"add_and_mul"),
            bytes(11, &value_info("a", dims)),
            bytes(11, &value_info("b", dims)),
            bytes(12, &value_info("sum", dims)),
            bytes(12, &value_info("product", dims)),
        ]
        .concat();
        [int(1, 7), bytes(8, &int(2, 13)), bytes(7, &graph)].concat()
    }
}

#[tokio::test]
async fn json_and_binary_inputs_mix_in_one_request_and_each_output_picks_its_format() {
    let engines = engines();
    for engine in ENGINES {
        inputs_and_outputs_mix_on(&engines, engine).await;
    }
}

async fn inputs_and_outputs_mix_on(engines: &Engines, engine: EngineKind) {
    let inputs = [spec("a", &[2, 3]), spec("b", &[2, 3])];
    let url = serve(engines, engine, &onnx::add_and_mul(&[2, 3]), &inputs).await;
    let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [0.5f32, -1.0, 2.0, 10.0, 0.0, -3.0];
    let header = json!({
        "id": "mixed",
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32",
                "parameters": {"binary_data_size": 24}},
            {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": b},
        ],
        "outputs": [
            {"name": "sum", "parameters": {"binary_data": true}},
            {"name": "product"},
        ],
    });
    let (header, binary) = read_binary(post_binary(&url, &header, &le_bytes(&a)).await).await;
    assert_eq!(header["id"], "mixed");
    assert_eq!(header["parameters"]["engine"], engine.as_str(), "{header}");
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let product: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    assert_eq!(binary, vec![("sum".to_owned(), sum)], "{engine}");
    let as_json = header["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "product")
        .unwrap();
    assert_eq!(json_values(as_json), product, "{engine}");

    // Binary input, every output as JSON: a plain JSON answer without the length header.
    let response = post_binary(
        &url,
        &json!({"inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [2, 3], "datatype": "FP32",
                "parameters": {"binary_data_size": 24}},
        ]}),
        &le_bytes(&b),
    )
    .await;
    assert!(response.headers().get(HEADER).is_none());
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["outputs"].as_array().unwrap().len(), 2, "{answer}");
    assert_eq!(answer["parameters"]["engine"], engine.as_str(), "{answer}");
}
