//! The engines this robot has, found once at start.
//!
//! Loading ONNX Runtime and trying its providers (a TensorRT build of a one-node model, a
//! CUDA context) happens in a child process, like the gate: a broken library or driver
//! cannot take the daemon down, and the daemon maps the library only when a model is to be
//! served on it.
//!
//! The child's answer is kept in the data directory with a fingerprint of what it depended
//! on: this agent's build, the settings, the ONNX Runtime library files (size, inode, mtime),
//! the dynamic linker's cache (rewritten by `ldconfig` whenever a package installs a library:
//! CUDA, cuDNN, TensorRT), `LD_LIBRARY_PATH` and the GPU driver's version. A restart with all
//! of that unchanged reuses the answer instead of starting a child (tens of ms before the
//! installed model can be restored); any change probes again. A child that failed is not
//! kept, so it is retried.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botfleet_engine::{Engines, OnnxRuntimeSettings};
use botfleet_protocol::engine::{EngineKind, EnginesInfo};
use botfleet_protocol::manifest::Sha256Digest;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::gate::{self, ChildRequest, GateReport};

/// How long the probe may take (a TensorRT builder starting up on a Jetson is slow).
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

/// The probe's answer as kept in the data directory.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    fingerprint: String,
    info: EnginesInfo,
}

const KEPT: &str = "engines-probe.json";

/// What engines this robot has. Never fails: what cannot be used is in the info with why.
pub async fn probe(settings: &OnnxRuntimeSettings, program: &Path, data_dir: &Path) -> Engines {
    let engines = match settings.library_path() {
        // Nothing to load: says so without a child.
        None => Engines::probe(settings),
        Some(library) => {
            let fingerprint = fingerprint(settings, &library);
            match kept_answer(data_dir, &fingerprint) {
                Some(info) => {
                    debug!("engines as probed before (nothing they depend on changed)");
                    Engines::from_info(settings, info)
                }
                None => probe_in_child(settings, program, data_dir, fingerprint).await,
            }
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

async fn probe_in_child(
    settings: &OnnxRuntimeSettings,
    program: &Path,
    data_dir: &Path,
    fingerprint: String,
) -> Engines {
    let request = ChildRequest::Probe {
        onnxruntime: settings.clone(),
    };
    match gate::run_in_child(program, &request, PROBE_TIMEOUT).await {
        Ok(GateReport::Engines { info }) => {
            let kept = Kept { fingerprint, info };
            match serde_json::to_vec(&kept) {
                Ok(bytes) => {
                    if let Err(e) = crate::store::write_atomic(&data_dir.join(KEPT), &bytes) {
                        warn!(error = %e, "cannot keep the engine probe's answer; the next start probes again");
                    }
                }
                Err(e) => warn!(error = %e, "cannot encode the engine probe's answer"),
            }
            Engines::from_info(settings, kept.info)
        }
        Ok(other) => failed(settings, format!("the probe answered {other:?}")),
        Err(e) => failed(settings, format!("the probe failed: {e}")),
    }
}

/// The kept answer, if it was probed with this fingerprint.
fn kept_answer(data_dir: &Path, fingerprint: &str) -> Option<EnginesInfo> {
    let bytes = std::fs::read(data_dir.join(KEPT)).ok()?;
    let kept: Kept = serde_json::from_slice(&bytes).ok()?;
    (kept.fingerprint == fingerprint).then_some(kept.info)
}

/// What the probe's answer depends on, hashed (see the module's documentation).
fn fingerprint(settings: &OnnxRuntimeSettings, library: &Path) -> String {
    let mut text = format!(
        "{} {}|{settings:?}|LD_LIBRARY_PATH={:?}",
        env!("CARGO_PKG_VERSION"),
        env!("BOTFLEET_GIT_COMMIT"),
        std::env::var_os("LD_LIBRARY_PATH")
    );
    // The library and its provider libraries beside it (libonnxruntime_providers_*.so).
    let mut files = vec![library.to_path_buf(), PathBuf::from("/etc/ld.so.cache")];
    if let Some(entries) = library.parent().and_then(|d| std::fs::read_dir(d).ok()) {
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime"))
        }));
    }
    files.sort();
    files.dedup();
    for file in &files {
        let _ = match std::fs::metadata(file) {
            Ok(m) => write!(
                text,
                "|{}:{}:{}:{}.{}",
                file.display(),
                m.len(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec()
            ),
            Err(_) => write!(text, "|{}:absent", file.display()),
        };
    }
    // Discrete NVIDIA GPUs (the kernel module's version); a Jetson's GPU driver comes with
    // L4T, whose release file says which.
    for version in ["/proc/driver/nvidia/version", "/etc/nv_tegra_release"] {
        if let Ok(v) = std::fs::read_to_string(version) {
            let _ = write!(text, "|{version}:{v}");
        }
    }
    Sha256Digest::of(text.as_bytes()).to_hex()
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
    fn a_kept_probe_answer_is_reused_only_while_the_library_and_settings_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so.1.32.0");
        std::fs::write(&library, b"one build").unwrap();
        let settings = OnnxRuntimeSettings {
            library: Some(library.clone()),
            ..OnnxRuntimeSettings::default()
        };
        let first = fingerprint(&settings, &library);
        assert_eq!(first, fingerprint(&settings, &library));
        let info = EnginesInfo {
            available: vec![EngineKind::OnnxruntimeCpu, EngineKind::Tract],
            ..EnginesInfo::default()
        };
        let kept = Kept {
            fingerprint: first.clone(),
            info: info.clone(),
        };
        crate::store::write_atomic(&dir.path().join(KEPT), &serde_json::to_vec(&kept).unwrap())
            .unwrap();
        assert_eq!(kept_answer(dir.path(), &first), Some(info));

        // Other settings, a provider library added beside it, the library replaced: each
        // is a new fingerprint, so the kept answer is not used.
        let other = OnnxRuntimeSettings {
            sessions: 4,
            ..settings.clone()
        };
        assert_ne!(fingerprint(&other, &library), first);
        std::fs::write(dir.path().join("libonnxruntime_providers_cuda.so"), b"cuda").unwrap();
        let with_provider = fingerprint(&settings, &library);
        assert_ne!(with_provider, first);
        std::fs::write(&library, b"another build").unwrap();
        assert_ne!(fingerprint(&settings, &library), with_provider);
        assert_eq!(
            kept_answer(dir.path(), &fingerprint(&settings, &library)),
            None
        );
    }

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
