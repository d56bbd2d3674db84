//! What a side does when a response it passes on is cut off for making no progress
//! ([`phoenix_mesh_transport::progress`]): one log line per hop and stalled end, as [`LogLimit`]
//! allows. The request is counted when its response ends ([`crate::access::Logged`]).

use std::sync::Arc;
use std::time::Duration;

use phoenix_mesh_transport::progress::{Progress, Stalled};
use tracing::info;

use crate::log_limit::{Cause, LogLimit, Repeat};

/// The progress timeout of one side's responses, logging each one it cuts off: `sender` names the
/// hop the responses come from (`backend 127.0.0.1:8081`), `key` the config key of `timeout`.
pub fn progress_timeout(sender: String, key: &'static str, timeout: Duration) -> Progress {
    let log = LogLimit::new();
    let hop: Arc<str> = sender.into();
    Progress::new(timeout, move |end| {
        let message = "response made no progress; cut off";
        let cause = match end {
            Stalled::Sender => "sender-stalled",
            Stalled::Reader => "reader-stalled",
        };
        if log.admit(&Repeat {
            message,
            hop: hop.clone(),
            cause: Cause::Code(cause),
        }) {
            let stopped = match end {
                Stalled::Sender => "the sender sent nothing more",
                Stalled::Reader => "the reader took nothing more",
            };
            info!(
                from = %hop,
                stalled = cause,
                timeout_ms = timeout.as_millis() as u64,
                "{message}: {stopped} for {timeout:?} ({key})"
            );
        }
    })
}
