//! Joining the two halves of an upgraded connection (WebSocket and other `101 Switching Protocols`)
//! and copying bytes both ways until either end closes, or until the mesh connection under it says
//! the tunnel must end (its certificates end, or a reload refuses its peer): then both directions
//! are shut down, since a protocol we do not parse has no graceful end we could ask for.

use std::future::Future;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::{debug, Instrument};

/// How long shutting a cut-off tunnel's two ends down may take before they are dropped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// Once both sides have switched protocols, copies between them until either end closes, or until
/// `cut_off` resolves (with why, a `phoenix_mesh_connections_closed_total` reason) and both ends are
/// shut down.
pub fn splice(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    cut_off: impl Future<Output = &'static str> + Send + 'static,
) {
    tokio::spawn(
        async move {
            tokio::pin!(cut_off);
            let joined = tokio::select! {
                joined = async { tokio::try_join!(downstream, upstream) } => joined,
                reason = &mut cut_off => {
                    debug!(reason, "upgrade cut off before it completed");
                    return;
                }
            };
            let (down, up) = match joined {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, "upgrade did not complete");
                    return;
                }
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut down, &mut up) => match copied {
                    Ok((to_up, to_down)) => debug!(to_up, to_down, "upgraded connection closed"),
                    Err(error) => debug!(%error, "upgraded connection ended with an error"),
                },
                reason = &mut cut_off => {
                    debug!(reason, "upgraded connection cut off");
                    let shut = async { tokio::join!(down.shutdown(), up.shutdown()) };
                    let _ = tokio::time::timeout(SHUTDOWN_WAIT, shut).await;
                }
            }
        }
        .in_current_span(),
    );
}
