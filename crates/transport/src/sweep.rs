//! Housekeeping that runs beside an object for as long as the object lives.

use std::sync::{Arc, Weak};
use std::time::Duration;

/// Calls `sweep` on `owner` every half `idle_timeout` (at least every second, first after one period)
/// until `owner` is dropped, so what has been idle longer than `idle_timeout` goes within 1.5 times it.
/// The task holds only a weak reference and never keeps the owner alive.
pub fn sweep_idle<T: Send + Sync + 'static>(owner: &Arc<T>, idle_timeout: Duration, sweep: fn(&T)) {
    let owner: Weak<T> = Arc::downgrade(owner);
    let every = (idle_timeout / 2).max(Duration::from_secs(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match owner.upgrade() {
                Some(owner) => sweep(&owner),
                None => return,
            }
        }
    });
}
