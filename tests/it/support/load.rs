//! Background traffic for the rotation and restart tests: workers sending GETs back to back through
//! the client sidecar, counting every answer that is not the backend's 200.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::backend::HELLO;
use super::http::try_get;
use super::within;

/// Workers sending GETs through `addr` until stopped (or a bounded count per worker).
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(addr: SocketAddr, workers: usize, max_per_worker: u64) -> Load {
        Load::start_get(addr, "/load", workers, max_per_worker)
    }

    /// Workers sending GETs for `target` (one the backend answers with its `HELLO`, such as
    /// `/delay/MS`).
    pub fn start_get(
        addr: SocketAddr,
        target: &'static str,
        workers: usize,
        max_per_worker: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0u64, Vec::new());
                    for _ in 0..max_per_worker {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match try_get(addr, target).await {
                            Ok(got) if got.status == 200 && got.body == HELLO => ok += 1,
                            Ok(got) => failures.push(format!("{got:?}")),
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the workers; returns (successes, failures).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for w in self.workers {
            let (o, f) = within("load worker stopping", w).await.unwrap();
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }

    /// Stops the workers and fails the test if any request failed or fewer than `at_least`
    /// succeeded; `during` names what the load ran across.
    pub async fn assert_no_failures(self, during: &str, at_least: u64) -> u64 {
        let (ok, failures) = self.finish().await;
        assert!(
            failures.is_empty(),
            "{} of {} requests failed {during}, first: {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        assert!(ok >= at_least, "the load barely ran: {ok} requests");
        ok
    }
}
