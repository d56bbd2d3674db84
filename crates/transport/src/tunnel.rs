//! Joining the two halves of an upgraded connection (WebSocket and other `101 Switching Protocols`)
//! and copying bytes both ways until either end closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{debug, Instrument};

/// Once both sides have switched protocols, copies between them until either end closes.
pub fn splice(downstream: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(
        async move {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, "upgrade did not complete");
                    return;
                }
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((to_up, to_down)) => debug!(to_up, to_down, "upgraded connection closed"),
                Err(error) => debug!(%error, "upgraded connection ended with an error"),
            }
        }
        .in_current_span(),
    );
}
