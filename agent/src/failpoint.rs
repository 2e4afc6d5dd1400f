//! Named stopping points for crash tests.
//!
//! With `BOTFLEET_FAILPOINT=<name>` in its environment the agent stops at that point, says
//! `failpoint <name> reached` on stderr, and waits there to be killed (the tests send
//! SIGKILL), so every crash lands exactly where the test wants it. Unset, a point costs one
//! comparison.

use std::sync::OnceLock;

/// The points, in the order an install passes them.
pub const POINTS: [&str; 6] = [
    "mid-desired-write",
    "mid-download",
    "after-download",
    "mid-benchmark",
    "mid-state-write",
    "mid-swap",
];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("BOTFLEET_FAILPOINT")
                .ok()
                .filter(|p| !p.is_empty())
        })
        .as_deref()
}

/// Stops here for good if `name` is the armed point.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("failpoint {name} reached");
        loop {
            std::thread::park();
        }
    }
}

/// With `BOTFLEET_WRONG_ENGINE=<engine>` (e.g. `onnxruntime-cpu`) the gate child adds 1.0 to
/// that engine's reference error, as an engine that computes wrong outputs would: how the
/// tests show a wrong engine is refused for itself only. Unset, one comparison.
pub fn skew_output(engine: botfleet_protocol::engine::EngineKind, error: f32) -> f32 {
    static WRONG: OnceLock<Option<String>> = OnceLock::new();
    let wrong = WRONG.get_or_init(|| {
        std::env::var("BOTFLEET_WRONG_ENGINE")
            .ok()
            .filter(|p| !p.is_empty())
    });
    if wrong.as_deref() == Some(engine.as_str()) {
        error + 1.0
    } else {
        error
    }
}
