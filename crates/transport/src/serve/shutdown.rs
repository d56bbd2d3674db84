//! The shutdown signal: who decides the process stops holds [`Shutdown`], every accept loop and
//! connection holds a [`ShutdownWatch`]; draining is waiting for the watches to go.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

/// The sending half of the shutdown signal; owned by whoever decides the process stops.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// The receiving half, cloned into every accept loop and connection so draining can wait for them.
#[derive(Debug, Clone)]
pub struct ShutdownWatch(watch::Receiver<bool>);

impl Shutdown {
    /// A new signal and its first watcher.
    pub fn new() -> (Shutdown, ShutdownWatch) {
        let (tx, rx) = watch::channel(false);
        (Shutdown(tx), ShutdownWatch(rx))
    }

    /// Tells every accept loop to stop and every connection to finish its requests and close.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once every watcher (accept loops and connections) is gone.
    pub async fn drained(&self) {
        self.0.closed().await;
    }

    /// How many watchers are alive: accept loops plus open connections.
    pub fn watchers(&self) -> usize {
        self.0.receiver_count()
    }
}

impl ShutdownWatch {
    /// Resolves when shutdown has begun.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

/// Drives a connection to its end; when shutdown begins first, asks it to finish (`graceful`: hyper's
/// `graceful_shutdown`, which lets in-flight requests complete) and waits for that.
pub async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    shutdown: &mut ShutdownWatch,
) -> C::Output {
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.wait() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

/// Serves one connection until it ends, asking it to finish (the watch `serve` is given fires) once
/// shutdown begins or `retire` resolves, and dropping it, whatever it still carries, at `deadline`.
/// `None` when the deadline cut it off. The listener's rule for a connection whose certificates end
/// or that a reload's policy refuses: in-flight requests finish, new ones go elsewhere, and nothing
/// outlives the certificates.
pub async fn serve_until<F: Future>(
    serve: impl FnOnce(ShutdownWatch) -> F,
    shutdown: &mut ShutdownWatch,
    retire: impl Future<Output = ()>,
    deadline: tokio::time::Instant,
) -> Option<F::Output> {
    let (finish, watch) = Shutdown::new();
    // Boxed: moved into `run` below, the connection's future would otherwise be laid out in this
    // one's state more than once (rustc does not overlap a moved-from local with its destination),
    // and every idle connection's task would carry the copies (measured: 28 KiB per idle listener
    // connection instead of 15, `cargo bench --bench mesh -- --only idle`).
    let served = Box::pin(serve(watch));
    let asked = async {
        tokio::select! {
            () = shutdown.wait() => {}
            () = retire => {}
        }
        finish.begin();
        std::future::pending::<std::convert::Infallible>().await
    };
    let run = async {
        tokio::select! {
            out = served => out,
            never = asked => match never {},
        }
    };
    tokio::time::timeout_at(deadline, run).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_every_watch() {
        let (shutdown, watch) = Shutdown::new();
        let conn = watch.clone();
        assert_eq!(shutdown.watchers(), 2);
        drop(watch);
        shutdown.begin();
        let drained = tokio::time::timeout(Duration::from_secs(1), shutdown.drained()).await;
        assert!(drained.is_err(), "a connection still holds its watch");
        drop(conn);
        let drained = tokio::time::timeout(Duration::from_secs(1), shutdown.drained()).await;
        assert!(drained.is_ok());
    }

    /// The connection's future lives on the heap, once: `serve_until`'s own state stays small however
    /// large the connection's is (an idle listener connection's task is mostly this state).
    #[tokio::test]
    async fn serve_until_keeps_the_connection_future_out_of_its_own_state() {
        let (_shutdown, mut watch) = Shutdown::new();
        let big = |mut asked: ShutdownWatch| async move {
            let state = [7u8; 16 * 1024];
            asked.wait().await;
            state.iter().map(|b| u64::from(*b)).sum::<u64>()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let future = serve_until(big, &mut watch, std::future::pending::<()>(), deadline);
        assert!(
            std::mem::size_of_val(&future) < 4 * 1024,
            "serve_until's future is {} bytes: the connection's future is inline",
            std::mem::size_of_val(&future)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn serve_until_asks_at_retirement_and_cuts_off_at_the_deadline() {
        let (_shutdown, mut watch) = Shutdown::new();
        let start = tokio::time::Instant::now();
        // A connection that takes 2 s to finish once asked.
        let conn = |mut asked: ShutdownWatch| async move {
            asked.wait().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            tokio::time::Instant::now()
        };
        let retire = tokio::time::sleep(Duration::from_secs(5));
        let ended = serve_until(conn, &mut watch, retire, start + Duration::from_secs(10)).await;
        assert_eq!(ended, Some(start + Duration::from_secs(7)));

        let start = tokio::time::Instant::now();
        let retire = tokio::time::sleep(Duration::from_secs(9));
        let ended = serve_until(conn, &mut watch, retire, start + Duration::from_secs(10)).await;
        assert_eq!(ended, None, "the deadline cuts off what is still in flight");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn drive_asks_a_connection_to_finish_once_shutdown_begins() {
        let (shutdown, mut watch) = Shutdown::new();
        // A "connection" that runs until asked to finish, then takes a second to do so.
        let (finish, finishing) = tokio::sync::oneshot::channel::<()>();
        let mut finish = Some(finish);
        let conn = async move {
            let _ = finishing.await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            "finished"
        };
        tokio::pin!(conn);
        let stop = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            shutdown.begin();
        };
        let started = tokio::time::Instant::now();
        let (ended, ()) = tokio::join!(
            drive(
                conn,
                |_| {
                    if let Some(finish) = finish.take() {
                        let _ = finish.send(());
                    }
                },
                &mut watch
            ),
            stop
        );
        assert_eq!(ended, "finished");
        assert_eq!(started.elapsed(), Duration::from_secs(11));
    }
}
