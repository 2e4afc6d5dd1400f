//! Engine facts for the info document: labels for rollout selectors and the GPU's compute
//! capability where NVML cannot tell it (Jetson).

use std::collections::BTreeMap;

use botfleet_protocol::engine::EnginesInfo;

/// The compute capability of a Jetson's integrated GPU, by its device-tree name.
pub fn jetson_compute_capability(gpu: &str) -> Option<&'static str> {
    Some(match gpu {
        "ga10b" => "8.7", // Orin
        "gv11b" => "7.2", // Xavier
        "gp10b" => "6.2", // TX2
        "gm20b" => "5.3", // Nano, TX1
        _ => return None,
    })
}

/// `major.minor` of a version (`10.3.0` → `10.3`).
fn major_minor(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// Derived labels (`engine.onnxruntime=1.32`, `engine.cuda=12.6`, `engine.tensorrt=10.3`,
/// `engine.gpu=true`, `gpu.sm=87`); configured labels keep precedence.
pub fn add_labels(
    labels: &mut BTreeMap<String, String>,
    engines: &EnginesInfo,
    configured: &BTreeMap<String, String>,
) {
    let mut derived = BTreeMap::new();
    if let Some(ort) = &engines.onnxruntime {
        derived.insert("engine.onnxruntime".to_owned(), major_minor(&ort.version));
    }
    if let Some(v) = &engines.cuda {
        derived.insert("engine.cuda".to_owned(), major_minor(v));
    }
    if let Some(v) = &engines.tensorrt {
        derived.insert("engine.tensorrt".to_owned(), major_minor(v));
    }
    let gpu = engines.available.iter().any(|e| e.is_gpu());
    derived.insert("engine.gpu".to_owned(), gpu.to_string());
    if let Some(cc) = &engines.gpu_compute_capability {
        derived.insert("gpu.sm".to_owned(), cc.replace('.', ""));
    }
    for (k, v) in derived {
        if !configured.contains_key(&k) {
            labels.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botfleet_protocol::engine::{EngineKind, OnnxRuntimeInfo};

    #[test]
    fn labels_come_from_the_engines_and_yield_to_configured_ones() {
        let engines = EnginesInfo {
            available: vec![EngineKind::OnnxruntimeTensorrt, EngineKind::Tract],
            onnxruntime: Some(OnnxRuntimeInfo {
                version: "1.20.0".into(),
                library: "/usr/lib/libonnxruntime.so.1.20.0".into(),
                providers: vec![],
            }),
            tensorrt: Some("10.3.0".into()),
            cuda: Some("12.6.68".into()),
            gpu_compute_capability: Some("8.7".into()),
            ..EnginesInfo::default()
        };
        let configured = BTreeMap::from([("engine.cuda".to_owned(), "pinned".to_owned())]);
        let mut labels = BTreeMap::new();
        add_labels(&mut labels, &engines, &configured);
        assert_eq!(labels["engine.onnxruntime"], "1.20");
        assert_eq!(labels["engine.tensorrt"], "10.3");
        assert_eq!(labels["engine.gpu"], "true");
        assert_eq!(labels["gpu.sm"], "87");
        assert!(!labels.contains_key("engine.cuda"));
        assert_eq!(jetson_compute_capability("ga10b"), Some("8.7"));
        assert_eq!(jetson_compute_capability("unknown"), None);
    }
}
