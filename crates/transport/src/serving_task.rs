//! A request's *serving task* is the task whose end ends the request's exchange with the peer that
//! sent it: over HTTP/1.1 the task serving its connection, over HTTP/2 the task hyper spawns for its
//! stream. Ending it from outside is how a response is cut off when nothing polls its body: hyper
//! polls a response body only while the reader has room for more (its socket, or its HTTP/2 window),
//! so a body whose reader stopped reading is never asked for anything again.
//!
//! Aborting the task drops what it holds, and that is the cut-off each protocol understands: over
//! HTTP/1.1 the connection closes before the response is complete (no last chunk, or fewer bytes than
//! its `content-length`), over HTTP/2 `h2` resets the stream (`RST_STREAM(CANCEL)`) as its last handle
//! goes; the response body on the other hop is dropped with it, which releases that hop's connection
//! or resets its stream in turn.
//!
//! A task knows itself through a task-local set by [`spawn_serving`]; hyper spawns HTTP/2 stream tasks
//! through [`ServingExecutor`], which does the same.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::task::{AbortHandle, JoinHandle};

tokio::task_local! {
    static CURRENT: ServingTask;
}

/// A handle that ends one serving task.
#[derive(Debug, Clone)]
pub struct ServingTask(Arc<OnceLock<AbortHandle>>);

impl ServingTask {
    /// The serving task this code runs in, if it was spawned by [`spawn_serving`].
    pub fn current() -> Option<ServingTask> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Ends the task at its next await point (at once when it is not running), dropping what it holds.
    pub fn abort(&self) {
        if let Some(handle) = self.0.get() {
            handle.abort();
        }
    }
}

/// Spawns `future` as a serving task: code it runs finds its handle with [`ServingTask::current`].
pub fn spawn_serving<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task = ServingTask(Arc::new(OnceLock::new()));
    let handle = tokio::spawn(CURRENT.scope(task.clone(), future));
    // Set before any response could ask for it: a response is watched once the other hop has
    // answered, long after the task began (and abort reads it only once the timeout ran out).
    let _ = task.0.set(handle.abort_handle());
    handle
}

/// hyper's executor for HTTP/2 server streams: each stream's task is a serving task.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServingExecutor;

impl<F> hyper::rt::Executor<F> for ServingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        spawn_serving(future);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn a_serving_task_can_end_itself_from_outside() {
        let (found_tx, found_rx) = oneshot::channel();
        let task = spawn_serving(async move {
            let _ = found_tx.send(ServingTask::current());
            std::future::pending::<()>().await;
        });
        let found = found_rx.await.ok().flatten();
        let Some(found) = found else {
            panic!("the task did not find itself")
        };
        found.abort();
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            matches!(ended, Ok(Err(ref e)) if e.is_cancelled()),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn other_tasks_have_none() {
        assert!(ServingTask::current().is_none());
        let inner = tokio::spawn(async { ServingTask::current().is_none() });
        assert!(matches!(inner.await, Ok(true)));
    }
}
