//! The ONNX Runtime library the tests load, shared by the test code of several crates of
//! this workspace (each includes this file with `#[path]`; all live one level below the
//! workspace root).

use std::path::PathBuf;

/// `ORT_DYLIB_PATH`, else the onnxruntime wheel's library in the repository's `.venv` (which
/// `.ci/run` installs); without either the tests fail rather than skip ONNX Runtime.
pub fn onnxruntime_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|entries| {
            entries.flatten().find_map(|py| {
                let capi = py.path().join("site-packages/onnxruntime/capi");
                std::fs::read_dir(capi).ok()?.flatten().find_map(|f| {
                    let name = f.file_name().into_string().ok()?;
                    name.starts_with("libonnxruntime.so.").then(|| f.path())
                })
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no ONNX Runtime library: set ORT_DYLIB_PATH or run `python3 -m venv .venv && \
                 .venv/bin/pip install onnxruntime==1.32.0` (as .ci/run does)"
            )
        })
}
