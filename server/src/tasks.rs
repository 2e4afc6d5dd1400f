//! The server's tasks, supervised together: any task that ends before it was asked to
//! (with an error, a panic, or just returning) is fatal for the whole server.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::service::Error;

/// Named tasks and the token that stops them.
#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<Result<(), Error>>,
    names: HashMap<Id, &'static str>,
    cancel: CancellationToken,
}

impl Tasks {
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            cancel,
        }
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next task to end; `None` when none are left. A task that ends cleanly
    /// after cancellation yields `Some(Ok(()))`.
    async fn join_next(&mut self) -> Option<Result<(), Error>> {
        let joined = self.set.join_next_with_id().await?;
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            Err(err) => {
                let id = err.id();
                let task = self.names.remove(&id).unwrap_or("unknown");
                let message = if err.is_panic() {
                    "panicked".to_owned()
                } else {
                    "was aborted".to_owned()
                };
                return Some(Err(Error::TaskFailed { task, message }));
            }
        };
        let task = self.names.remove(&id).unwrap_or("unknown");
        Some(match result {
            Ok(()) if !self.cancel.is_cancelled() => Err(Error::TaskExited { task }),
            other => other,
        })
    }

    /// Waits until a task fails (or ends unasked); never returns while all run well.
    pub async fn failure(&mut self) -> Error {
        loop {
            match self.join_next().await {
                Some(Err(err)) => return err,
                Some(Ok(())) => {}
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Cancels every task and waits up to `grace` for them; the first error is returned.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), Error> {
        self.cancel.cancel();
        let mut first_error = None;
        let drained = tokio::time::timeout(grace, async {
            while let Some(result) = self.join_next().await {
                if let Err(err) = result {
                    tracing::error!(error = %err, "task failed during shutdown");
                    first_error.get_or_insert(err);
                }
            }
        })
        .await;
        if drained.is_err() {
            let left: Vec<&str> = self.names.values().copied().collect();
            self.set.abort_all();
            return Err(Error::DrainTimeout { grace, left });
        }
        first_error.map_or(Ok(()), Err)
    }
}
