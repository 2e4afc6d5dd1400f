//! Loading the next model off the serving path.
//!
//! A hot swap loads and warms the new model while the old one answers requests. On a
//! robot with a few cores, that load (seconds of tract plan optimisation or ONNX Runtime
//! session set-up) competes with inference for the CPU and shows as a p99 spike. The load
//! runs on its own thread at the lowest scheduling priority (`nice` 19, per thread on
//! Linux), so it takes only the CPU time serving leaves idle.

use tracing::debug;

/// The loader thread's nice value: the lowest priority an unprivileged thread can set.
pub const LOADER_NICE: i32 = 19;

/// The loader thread panicked or could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("could not start the loader thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the loader thread panicked")]
    Panicked,
}

/// Runs `load` on a fresh thread at [`LOADER_NICE`] and waits for its result without
/// blocking the runtime.
pub async fn in_background<T, F>(load: F) -> Result<T, LoaderError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("botfleet-loader".into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(load());
        })
        .map_err(LoaderError::Spawn)?;
    rx.await.map_err(|_| LoaderError::Panicked)
}

/// Lowers the calling thread's priority; a refusal (a seccomp filter, say) only costs the
/// benefit, so it is logged and the load goes on.
pub(crate) fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), LOADER_NICE) {
        debug!(error = %e, "could not lower the loader thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_load_runs_at_the_lowest_priority_and_its_result_comes_back() {
        let own = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let before = own().unwrap();
        let nice = in_background(own).await.unwrap().unwrap();
        assert_eq!(nice, LOADER_NICE);
        // The caller's own thread is untouched.
        assert_eq!(own().unwrap(), before);
    }

    #[tokio::test]
    async fn a_panicking_load_is_an_error_not_a_hang() {
        let err = in_background(|| -> u32 { panic!("tract blew up") })
            .await
            .unwrap_err();
        assert!(matches!(err, LoaderError::Panicked), "{err}");
    }
}
