//! The engines this robot has, found once at start.
//!
//! Loading ONNX Runtime and trying its providers (a TensorRT build of a one-node model, a
//! CUDA context) happens in a child process, like the gate: a broken library or driver
//! cannot take the daemon down, and the daemon maps the library only when a model is to be
//! served on it.

use std::path::Path;
use std::time::Duration;

use botfleet_engine::{Engines, OnnxRuntimeSettings};
use botfleet_protocol::engine::{EngineKind, EnginesInfo};
use botfleet_protocol::manifest::Sha256Digest;
use tracing::{info, warn};

use crate::gate::{self, ChildRequest, GateReport};

/// How long the probe may take (a TensorRT builder starting up on a Jetson is slow).
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

/// What engines this robot has. Never fails: what cannot be used is in the info with why.
pub async fn probe(settings: &OnnxRuntimeSettings, program: &Path) -> Engines {
    let engines = if settings.library_path().is_none() {
        // Nothing to load: says so without a child.
        Engines::probe(settings)
    } else {
        let request = ChildRequest::Probe {
            onnxruntime: settings.clone(),
        };
        match gate::run_in_child(program, &request, PROBE_TIMEOUT).await {
            Ok(GateReport::Engines { info }) => Engines::from_info(settings, info),
            Ok(other) => failed(settings, format!("the probe answered {other:?}")),
            Err(e) => failed(settings, format!("the probe failed: {e}")),
        }
    };
    let info = engines.info();
    let available: Vec<&str> = info.available.iter().map(|e| e.as_str()).collect();
    info!(
        available = %available.join(", "),
        onnxruntime = info.onnxruntime.as_ref().map(|o| o.version.as_str()),
        unavailable = ?info.unavailable,
        "engines"
    );
    engines
}

fn failed(settings: &OnnxRuntimeSettings, reason: String) -> Engines {
    warn!(%reason, "ONNX Runtime is not usable; models run on tract");
    let mut info = EnginesInfo {
        available: vec![EngineKind::Tract],
        ..EnginesInfo::default()
    };
    info.unavailable.insert("onnxruntime".to_owned(), reason);
    Engines::from_info(settings, info)
}

/// The part of a compiled engine's cache folder name that is not the model: library
/// versions and the GPU (name, compute capability, power mode), hashed.
pub fn cache_key(info: &EnginesInfo, hardware: &str) -> String {
    let text = format!(
        "onnxruntime={}|tensorrt={}|cuda={}|{hardware}",
        info.onnxruntime.as_ref().map_or("", |o| o.version.as_str()),
        info.tensorrt.as_deref().unwrap_or(""),
        info.cuda.as_deref().unwrap_or(""),
    );
    Sha256Digest::of(text.as_bytes()).to_hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_changes_with_the_libraries_and_the_hardware() {
        let mut info = EnginesInfo::default();
        let a = cache_key(&info, "Orin|8.7|MODE_30W");
        assert_eq!(a.len(), 16);
        assert_eq!(a, cache_key(&info, "Orin|8.7|MODE_30W"));
        assert_ne!(a, cache_key(&info, "Orin|8.7|MODE_15W"));
        info.tensorrt = Some("10.3.0".into());
        assert_ne!(a, cache_key(&info, "Orin|8.7|MODE_30W"));
    }
}
