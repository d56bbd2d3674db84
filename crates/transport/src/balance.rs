//! *Balancing* is choosing which of several equivalent upstreams a new connection is dialled to:
//! each in turn (round-robin), passing over the ones that keep failing. Health here is passive: only
//! real dials count, nothing is sent just to find out.
//!
//! An upstream is *ejected* when [`EJECT_AFTER_FAILURES`] dials to it fail in a row: for
//! [`EJECT_FIRST`] the first time, twice as long each time it is ejected again without a success in
//! between, up to [`EJECT_MAX`]. The first dial to it after an ejection ends is its *probe*; one
//! success returns it to rotation and forgets its failures and bans.
//!
//! - ALWAYS offer every upstream to every dial: the ones in rotation first, in round-robin order,
//!   then the ejected ones as a last resort, so no request fails while an ejected upstream may
//!   already be back.
//! - ALWAYS start each dial's order one upstream further than the previous dial's, so connections
//!   spread over the upstreams in rotation.
//! - NEVER eject on fewer than [`EJECT_AFTER_FAILURES`] failures in a row: one refused connection is
//!   not a dead upstream.
//! - NEVER keep an ejected upstream's history after a success: it comes back as a new one.
//!
//! The balancer knows upstreams only by their index; the dialer owns their addresses, and the
//! metrics and log lines that name them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Consecutive failed dials that eject an upstream.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// How long the first ejection lasts; each further one doubles it, up to [`EJECT_MAX`].
pub const EJECT_FIRST: Duration = Duration::from_secs(10);
/// The longest ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(120);

/// Round-robin over a fixed set of upstreams with passive-health ejection; see the module docs.
#[derive(Debug)]
pub struct Balancer {
    next: AtomicUsize,
    health: Box<[Mutex<Health>]>,
}

/// One upstream's record of failures.
#[derive(Debug, Default)]
struct Health {
    /// Failed dials since the last success or ejection.
    failures: u32,
    /// Until when it is out of rotation; stays set after it passes, until a success, so the
    /// success can tell that it was a probe.
    ejected_until: Option<Instant>,
    /// How long the next ejection lasts (zero: [`EJECT_FIRST`]).
    next_ban: Duration,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

impl Balancer {
    /// A balancer over `upstreams` upstreams, all in rotation.
    pub fn new(upstreams: usize) -> Self {
        Balancer {
            next: AtomicUsize::new(0),
            health: (0..upstreams).map(|_| Mutex::default()).collect(),
        }
    }

    /// The indices of every upstream in the order a new dial tries them: in rotation first,
    /// round-robin, then the ejected ones.
    pub fn order(&self) -> Vec<usize> {
        let n = self.health.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut order = Vec::with_capacity(n);
        let mut ejected = Vec::new();
        for i in (0..n).map(|k| (start + k) % n) {
            if self.health[i].lock().is_ejected(now) {
                ejected.push(i);
            } else {
                order.push(i);
            }
        }
        order.append(&mut ejected);
        order
    }

    /// Records a dial to upstream `i` that succeeded; true when that ends an ejection (the upstream
    /// answered its probe).
    pub fn succeeded(&self, i: usize) -> bool {
        let mut health = self.health[i].lock();
        let was_ejected = health.ejected_until.is_some();
        *health = Health::default();
        was_ejected
    }

    /// Records a dial to upstream `i` that failed; the length of the ban when this failure ejects it.
    pub fn failed(&self, i: usize) -> Option<Duration> {
        let mut health = self.health[i].lock();
        health.failures += 1;
        if health.failures < EJECT_AFTER_FAILURES {
            return None;
        }
        let ban = health.next_ban.max(EJECT_FIRST);
        health.ejected_until = Some(Instant::now() + ban);
        health.next_ban = (ban * 2).min(EJECT_MAX);
        health.failures = 0;
        Some(ban)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    impl Balancer {
        fn is_ejected(&self, i: usize) -> bool {
            self.health[i].lock().is_ejected(Instant::now())
        }
    }

    fn fail(balancer: &Balancer, i: usize, times: u32) -> Option<Duration> {
        (0..times).map(|_| balancer.failed(i)).last().flatten()
    }

    #[test]
    fn order_is_round_robin_over_every_upstream() {
        let balancer = Balancer::new(3);
        assert_eq!(balancer.order(), [0, 1, 2]);
        assert_eq!(balancer.order(), [1, 2, 0]);
        assert_eq!(balancer.order(), [2, 0, 1]);
        assert_eq!(balancer.order(), [0, 1, 2]);
        assert!(Balancer::new(0).order().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn three_failures_in_a_row_eject() {
        let balancer = Balancer::new(2);
        assert_eq!(balancer.failed(0), None);
        assert_eq!(balancer.failed(0), None);
        assert!(!balancer.is_ejected(0));
        assert_eq!(balancer.failed(0), Some(EJECT_FIRST));
        assert!(balancer.is_ejected(0));
        assert!(!balancer.is_ejected(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_of_failures() {
        let balancer = Balancer::new(1);
        fail(&balancer, 0, 2);
        assert!(!balancer.succeeded(0), "not ejected, so not a probe");
        assert_eq!(fail(&balancer, 0, 2), None);
        assert!(!balancer.is_ejected(0));
    }

    #[tokio::test(start_paused = true)]
    async fn order_puts_ejected_upstreams_last() {
        let balancer = Balancer::new(3);
        fail(&balancer, 0, EJECT_AFTER_FAILURES);
        assert_eq!(balancer.order(), [1, 2, 0]);
        assert_eq!(balancer.order(), [1, 2, 0]);
        assert_eq!(balancer.order(), [2, 1, 0]);
        fail(&balancer, 2, EJECT_AFTER_FAILURES);
        // Both ejected ones last, in round-robin order among themselves.
        assert_eq!(balancer.order(), [1, 0, 2]);
        assert_eq!(balancer.order(), [1, 2, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_ends_after_its_ban() {
        let balancer = Balancer::new(2);
        fail(&balancer, 1, EJECT_AFTER_FAILURES);
        tokio::time::advance(EJECT_FIRST - Duration::from_millis(1)).await;
        assert!(balancer.is_ejected(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!balancer.is_ejected(1));
        assert_eq!(balancer.order(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ban_doubles_while_probes_fail_up_to_the_maximum() {
        let balancer = Balancer::new(1);
        let mut bans = Vec::new();
        for _ in 0..6 {
            let ban = fail(&balancer, 0, EJECT_AFTER_FAILURES).expect("ejected");
            tokio::time::advance(ban - Duration::from_millis(1)).await;
            assert!(balancer.is_ejected(0), "ejected for all of {ban:?}");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(!balancer.is_ejected(0), "back after {ban:?}");
            bans.push(ban.as_secs());
        }
        assert_eq!(bans, [10, 20, 40, 80, 120, 120]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_succeeds_returns_the_upstream_as_new() {
        let balancer = Balancer::new(2);
        fail(&balancer, 0, EJECT_AFTER_FAILURES);
        tokio::time::advance(EJECT_FIRST).await;
        fail(&balancer, 0, EJECT_AFTER_FAILURES);
        tokio::time::advance(EJECT_FIRST * 2).await;
        assert!(balancer.succeeded(0), "the success ends an ejection");
        assert!(!balancer.succeeded(0), "and only once");
        assert!(!balancer.is_ejected(0));
        // Its bans start over.
        assert_eq!(fail(&balancer, 0, EJECT_AFTER_FAILURES), Some(EJECT_FIRST));
    }
}
