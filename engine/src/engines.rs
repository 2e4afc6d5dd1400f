//! Which engines this machine has, and loading a model on one of them.
//!
//! tract is always there. ONNX Runtime is a shared library found at run time (configuration
//! or `ORT_DYLIB_PATH`), so a robot without it, or with one of an unsupported version, still
//! runs every model on tract; the reason is kept for the robot's info. Loading the library
//! costs memory, so it happens on first use: a process that only serves tract never maps it.

use std::path::PathBuf;

use botfleet_protocol::engine::{EngineKind, EnginesInfo};
use botfleet_protocol::tensor::TensorSpec;
use serde::{Deserialize, Serialize};

use crate::model::{EngineError, Model};

/// How to find and run ONNX Runtime (`[engine.onnxruntime]` in the agent's configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxRuntimeSettings {
    /// `libonnxruntime.so`; empty: `ORT_DYLIB_PATH`, else ONNX Runtime is not used.
    pub library: Option<PathBuf>,
    /// Threads inside one inference (1: one core per request, as tract runs).
    pub intra_threads: usize,
    /// Sessions per model: requests beyond this many at once wait for a free one.
    pub sessions: usize,
    /// CUDA device for the CUDA and TensorRT providers.
    pub device_id: i32,
    /// Engines this robot must not use even where the library has them.
    pub disabled: Vec<EngineKind>,
}

impl Default for OnnxRuntimeSettings {
    fn default() -> Self {
        Self {
            library: None,
            intra_threads: 1,
            sessions: 2,
            device_id: 0,
            disabled: Vec::new(),
        }
    }
}

impl OnnxRuntimeSettings {
    /// The library to load: the configured one, else `ORT_DYLIB_PATH`.
    pub fn library_path(&self) -> Option<PathBuf> {
        self.library
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .or_else(|| {
                std::env::var_os("ORT_DYLIB_PATH")
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            })
    }
}

/// Per-load options.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where TensorRT keeps the engines it builds for this model (reused on the next load).
    pub tensorrt_cache: Option<PathBuf>,
}

/// The engines of this process.
#[derive(Debug, Clone)]
pub struct Engines {
    settings: OnnxRuntimeSettings,
    info: EnginesInfo,
}

impl Engines {
    /// tract alone.
    pub fn tract_only() -> Self {
        Self {
            settings: OnnxRuntimeSettings::default(),
            info: EnginesInfo {
                available: vec![EngineKind::Tract],
                ..EnginesInfo::default()
            },
        }
    }

    /// Loads ONNX Runtime now and tries each of its providers on a tiny model: what answers
    /// is available. Never fails: what cannot be used is listed with its reason.
    pub fn probe(settings: &OnnxRuntimeSettings) -> Self {
        let mut info = EnginesInfo {
            available: vec![EngineKind::Tract],
            ..EnginesInfo::default()
        };
        probe_onnxruntime(settings, &mut info);
        // Most preferred first, as EngineKind::ALL orders them.
        info.available
            .sort_by_key(|e| EngineKind::ALL.iter().position(|x| x == e));
        Self {
            settings: settings.clone(),
            info,
        }
    }

    /// Engines a probe (usually in another process) found, without loading anything now.
    pub fn from_info(settings: &OnnxRuntimeSettings, info: EnginesInfo) -> Self {
        let mut info = info;
        if !info.available.contains(&EngineKind::Tract) {
            info.available.push(EngineKind::Tract);
        }
        Self {
            settings: settings.clone(),
            info,
        }
    }

    pub fn available(&self) -> &[EngineKind] {
        &self.info.available
    }

    pub fn info(&self) -> &EnginesInfo {
        &self.info
    }

    pub fn settings(&self) -> &OnnxRuntimeSettings {
        &self.settings
    }

    /// Loads `bytes` on `engine` with the input shapes of `inputs`.
    pub fn load(
        &self,
        engine: EngineKind,
        bytes: &[u8],
        inputs: &[TensorSpec],
        options: &LoadOptions,
    ) -> Result<Model, EngineError> {
        if engine == EngineKind::Tract {
            return Model::load(bytes, inputs);
        }
        if !self.info.available.contains(&engine) {
            let reason = self
                .info
                .unavailable
                .get(engine.as_str())
                .or_else(|| self.info.unavailable.get("onnxruntime"))
                .cloned()
                .unwrap_or_else(|| "not found on this machine".to_owned());
            return Err(EngineError::Unavailable { engine, reason });
        }
        self.load_onnxruntime(engine, bytes, inputs, options)
    }

    #[cfg(feature = "onnxruntime")]
    fn load_onnxruntime(
        &self,
        engine: EngineKind,
        bytes: &[u8],
        inputs: &[TensorSpec],
        options: &LoadOptions,
    ) -> Result<Model, EngineError> {
        let runtime = crate::onnxruntime::runtime(&self.settings)
            .map_err(|reason| EngineError::Unavailable { engine, reason })?;
        crate::onnxruntime::load(runtime, &self.settings, engine, bytes, inputs, options)
    }

    #[cfg(not(feature = "onnxruntime"))]
    fn load_onnxruntime(
        &self,
        engine: EngineKind,
        _bytes: &[u8],
        _inputs: &[TensorSpec],
        _options: &LoadOptions,
    ) -> Result<Model, EngineError> {
        Err(EngineError::Unavailable {
            engine,
            reason: NOT_BUILT.to_owned(),
        })
    }
}

#[cfg(not(feature = "onnxruntime"))]
const NOT_BUILT: &str = "this build has no ONNX Runtime support (feature `onnxruntime`)";

#[cfg(feature = "onnxruntime")]
fn probe_onnxruntime(settings: &OnnxRuntimeSettings, info: &mut EnginesInfo) {
    crate::onnxruntime::probe(settings, info);
}

#[cfg(not(feature = "onnxruntime"))]
fn probe_onnxruntime(_settings: &OnnxRuntimeSettings, info: &mut EnginesInfo) {
    info.unavailable
        .insert("onnxruntime".to_owned(), NOT_BUILT.to_owned());
}

/// Versions of the shared libraries named `stem` (`libnvinfer.so`) found in `dirs`, read
/// from their file names (`libnvinfer.so.10.3.0` → `10.3.0`): the longest one wins.
pub(crate) fn library_version(dirs: &[PathBuf], stem: &str) -> Option<String> {
    let prefix = format!("{stem}.");
    let mut best: Option<String> = None;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            let numeric = !version.is_empty()
                && version
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if numeric && best.as_ref().is_none_or(|b| version.len() > b.len()) {
                best = Some(version.to_owned());
            }
        }
    }
    best
}

/// Where the CUDA and TensorRT libraries of a robot usually are, plus the loader's path and
/// the folders of a Python environment that holds the ONNX Runtime library.
pub(crate) fn library_dirs(onnxruntime: Option<&std::path::Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/aarch64-linux/lib",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    // site-packages/onnxruntime/capi/libonnxruntime.so → site-packages/{tensorrt_libs,nvidia/*/lib}
    if let Some(site) = onnxruntime.and_then(|p| p.parent()?.parent()?.parent().map(PathBuf::from))
    {
        dirs.push(site.join("tensorrt_libs"));
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            dirs.extend(entries.flatten().map(|e| e.path().join("lib")));
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_versions_come_from_file_names() {
        let dir = tempfile_dir();
        for name in [
            "libnvinfer.so",
            "libnvinfer.so.10",
            "libnvinfer.so.10.3.0",
            "libnvinfer.so.10.x",
            "libnvinfer_plugin.so.10.3.0",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(
            library_version(std::slice::from_ref(&dir), "libnvinfer.so").as_deref(),
            Some("10.3.0")
        );
        assert_eq!(
            library_version(std::slice::from_ref(&dir), "libcudart.so"),
            None
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "botfleet-engine-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tract_is_always_available_and_unknown_engines_say_why() {
        let engines = Engines::tract_only();
        assert_eq!(engines.available(), &[EngineKind::Tract]);
        let err = engines
            .load(
                EngineKind::OnnxruntimeCuda,
                b"",
                &[],
                &LoadOptions::default(),
            )
            .unwrap_err();
        assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    }
}
