//! botfleet's inference engines: loads ONNX models, runs them, and measures them.
//!
//! Both sides use it: the server to check an upload is a model the robots can load (and to
//! record its reference output), the agent to benchmark and serve it. [`Model`] is the seam:
//! tract (pure Rust, always there) or ONNX Runtime (loaded at run time from a library the
//! robot has, with its CPU, CUDA and TensorRT execution providers) behind one behaviour.
//! [`Engines`] says which engines this machine has and loads a model on one of them.

mod bench;
mod engines;
mod model;
#[cfg(feature = "onnxruntime")]
mod onnxruntime;
mod tensor;
mod tract;

pub use bench::{BenchStats, benchmark, evaluate, percentile, reference_error, reference_inputs};
pub use engines::{Engines, LoadOptions, OnnxRuntimeSettings};
pub use model::{EngineError, GraphPort, Model};
pub use tensor::{Tensor, TensorData};
pub use tract::inspect;
