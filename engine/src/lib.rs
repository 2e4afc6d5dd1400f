//! botfleet's only user of tract: loads ONNX models, runs them, and measures them.
//!
//! Both sides use it: the server to check an upload is a model the robots can load (and to
//! record its reference output), the agent to benchmark and serve it.

mod bench;
mod model;
mod tensor;

pub use bench::{BenchStats, benchmark, percentile, reference_error, reference_inputs};
pub use model::{EngineError, GraphPort, Model, inspect};
pub use tensor::{Tensor, TensorData};
