//! The *live connections* of a sidecar: every established mutual-TLS connection it holds, with what
//! it was authenticated with (the peer's chain and TLS version as its handshake recorded them, and
//! when our own chain and the peer's end). A connection is *retired* when it must take no new
//! requests and close once those in flight finish: before the first of its certificates ends, or
//! when a reload's policy refuses it ([`LiveConnections::recheck`]). At its *deadline*, the earliest
//! `notAfter` of the two chains, it is closed whatever it carries.
//!
//! A connection that switched protocols (a WebSocket) carries a *tunnel*: no requests to finish, and
//! no end of its own to wait for. It is cut off when its connection retires: a tunnel kept to the
//! deadline would gain at most two margins (two minutes for step-ca's certificates), once in its
//! life, and on the other side's clock, a few seconds off, could outlive the certificates.
//!
//! The rules:
//! - ALWAYS retire a connection [`close_margin`] before its deadline on the side that accepted it,
//!   and twice that on the side that dialled it, so that the dialler has opened its replacement
//!   before the acceptor asks the old connection to go. One opened with less than four of the
//!   acceptor's margins left retires instead when a quarter of what was left remains (the dialler:
//!   half): it still serves, and the order of the two sides holds.
//! - NEVER let a connection outlive its deadline: whoever serves it closes it then.
//! - ALWAYS cut a tunnel off when its connection retires ([`Registration::retired`]), both ways.
//! - ALWAYS count and log a connection's retirement once, with the first reason it got.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use phoenix_mesh_certs::{Authenticated, OwnChain, PeerIdentity, Refusal};
use tokio::sync::watch;
use tracing::info;

use crate::certs_report::{ConnectedPeer, ConnectedPeers};
use crate::metrics::{ClosedReason, Metrics};

/// How long before a connection's deadline the side that accepted it asks it to close: a tenth of
/// the shorter of the two certificates' lifetimes, at least 1 s and at most 60 s. For step-ca's 24-hour
/// certificates that is a minute, room for the requests in flight to finish and for clocks a few
/// seconds apart; a certificate of a few seconds still leaves its connection most of its life.
pub fn close_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Which end of the connection this sidecar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It accepted the connection (the mesh listener): retires it [`close_margin`] before the deadline.
    Accepted,
    /// It dialled the connection (the client): retires it twice as early, so its replacement is
    /// open before the listener asks the old one to go.
    Dialled,
}

/// The established connections of one sidecar.
#[derive(Debug)]
pub struct LiveConnections {
    conns: Mutex<HashMap<u64, Arc<LiveConn>>>,
    next: AtomicU64,
    metrics: Arc<Metrics>,
    end: End,
}

/// One established connection, as the registry and its server see it.
#[derive(Debug)]
pub struct LiveConn {
    id: u64,
    peer: Arc<PeerIdentity>,
    since: SystemTime,
    auth: Authenticated,
    deadline: SystemTime,
    /// What ends first: the peer's chain or ours.
    expiry: ClosedReason,
    retire_at: SystemTime,
    /// When the full margin before the deadline begins (`retire_at` is later for a connection
    /// opened inside it).
    margin_from: SystemTime,
    retired: watch::Sender<Option<ClosedReason>>,
    metrics: Arc<Metrics>,
}

/// A connection's entry in the registry; dropping it (the connection is gone) removes the entry.
#[derive(Debug)]
pub struct Registration {
    conn: Arc<LiveConn>,
    registry: Arc<LiveConnections>,
}

/// One established connection, for listing (`/certs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSnapshot {
    /// The peer's identity ([`PeerIdentity::name`]).
    pub identity: String,
    /// The peer certificate's serial number, lowercase hex.
    pub serial: String,
    /// When the peer's certificate expires.
    pub not_after: SystemTime,
    /// When the connection was established.
    pub since: SystemTime,
}

impl LiveConnections {
    /// An empty registry for the sidecar at `end`, counting closes in `metrics`.
    pub fn new(metrics: Arc<Metrics>, end: End) -> Arc<Self> {
        Arc::new(LiveConnections {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            metrics,
            end,
        })
    }

    /// Registers a connection just authenticated: the peer's leaf `peer`, what the handshake
    /// recorded (`auth`), and our own chain as this connection presented it (`own`).
    pub fn register(
        self: &Arc<Self>,
        peer: Arc<PeerIdentity>,
        auth: Authenticated,
        own: &OwnChain,
    ) -> Registration {
        let peer_end = phoenix_mesh_certs::chain_not_after(&auth.chain).unwrap_or(peer.not_after);
        let (deadline, expiry) = if own.not_after < peer_end {
            (own.not_after, ClosedReason::OwnCertificateExpiry)
        } else {
            (peer_end, ClosedReason::CertificateExpiry)
        };
        let margin = close_margin(peer.lifetime().min(own.leaf.lifetime()));
        let now = SystemTime::now();
        let left = deadline.duration_since(now).unwrap_or_default();
        // A connection opened with less than a few margins left still serves for part of what is
        // left, rather than being retired before its first request.
        let (margin, shortened) = match self.end {
            End::Accepted => (margin, margin.min(left / 4)),
            End::Dialled => (margin * 2, (margin * 2).min(left / 2)),
        };
        let conn = Arc::new(LiveConn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            peer,
            since: now,
            auth,
            deadline,
            expiry,
            retire_at: deadline.checked_sub(shortened).unwrap_or(deadline),
            margin_from: deadline.checked_sub(margin).unwrap_or(deadline),
            retired: watch::Sender::new(None),
            metrics: self.metrics.clone(),
        });
        self.conns.lock().insert(conn.id, conn.clone());
        Registration {
            conn,
            registry: self.clone(),
        }
    }

    /// Re-checks every connection against the policy now in force (`judge`, given what each was
    /// authenticated with) and retires those it refuses; how many it retired.
    pub fn recheck(&self, judge: impl Fn(&Authenticated) -> Option<Refusal>) -> usize {
        let conns: Vec<Arc<LiveConn>> = self.conns.lock().values().cloned().collect();
        let mut retired = 0;
        for conn in conns {
            if conn.reason().is_some() {
                continue;
            }
            if let Some(refusal) = judge(&conn.auth) {
                if conn.retire(closed_reason(refusal, conn.expiry)) {
                    retired += 1;
                }
            }
        }
        retired
    }

    /// The connections established now, oldest first.
    pub fn snapshot(&self) -> Vec<LiveSnapshot> {
        let mut conns: Vec<(u64, LiveSnapshot)> = self
            .conns
            .lock()
            .values()
            .map(|conn| (conn.id, conn.snapshot()))
            .collect();
        conns.sort_by_key(|(id, _)| *id);
        conns.into_iter().map(|(_, snapshot)| snapshot).collect()
    }

    /// The peers connected now, one entry per certificate (identity and serial), oldest first.
    pub fn peers(&self) -> Vec<ConnectedPeer> {
        let mut peers: Vec<ConnectedPeer> = Vec::new();
        for conn in self.snapshot() {
            match peers
                .iter_mut()
                .find(|p| p.serial == conn.serial && p.identity == conn.identity)
            {
                Some(peer) => {
                    peer.connections += 1;
                    peer.since = peer.since.min(conn.since);
                }
                None => peers.push(ConnectedPeer {
                    identity: conn.identity,
                    serial: conn.serial,
                    not_after: conn.not_after,
                    connections: 1,
                    since: conn.since,
                }),
            }
        }
        peers
    }

    /// How many connections are established now.
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.conns.lock().is_empty()
    }
}

/// `/certs` lists the peers of the live connections.
impl ConnectedPeers for LiveConnections {
    fn connected_peers(&self) -> Vec<ConnectedPeer> {
        self.peers()
    }
}

/// The metric label for a refusal; an expired peer chain is whichever expiry comes first.
fn closed_reason(refusal: Refusal, expiry: ClosedReason) -> ClosedReason {
    match refusal {
        Refusal::Revoked => ClosedReason::Revoked,
        Refusal::NotAllowed => ClosedReason::NotAllowed,
        Refusal::CaChanged => ClosedReason::CaChanged,
        Refusal::TlsVersion => ClosedReason::TlsVersion,
        Refusal::Expired => expiry,
    }
}

impl LiveConn {
    /// Why it was retired, once it has been.
    pub fn reason(&self) -> Option<ClosedReason> {
        *self.retired.borrow()
    }

    /// Why it must take no new requests at `now`, if it must: retired, or past its retirement time
    /// (the timer that retires it may not have fired yet).
    pub fn retirement(&self, now: SystemTime) -> Option<ClosedReason> {
        self.reason()
            .or_else(|| (now >= self.retire_at).then_some(self.expiry))
    }

    /// Whether it was opened inside the margin before its deadline (a resumed session whose
    /// certificates are about to end, say): the dialler then prefers a fresh handshake.
    pub fn opened_within_margin(&self) -> bool {
        self.since >= self.margin_from
    }

    /// Resolves when it must take no new requests (and close once those in flight finish), with
    /// why: its retirement time before the deadline came, or a reload's policy refused it.
    pub fn retired(self: &Arc<Self>) -> impl Future<Output = ClosedReason> + Send + 'static {
        let mut changes = self.retired.subscribe();
        let at = tokio_instant(self.retire_at);
        let conn = self.clone();
        async move {
            let refused = async {
                changes
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|r| *r)
            };
            tokio::select! {
                Some(reason) = refused => reason,
                () = tokio::time::sleep_until(at) => {
                    conn.retire(conn.expiry);
                    conn.reason().unwrap_or(conn.expiry)
                }
            }
        }
    }

    /// When it must be closed whatever it carries: the first of its certificates ends.
    pub fn deadline(&self) -> tokio::time::Instant {
        tokio_instant(self.deadline)
    }

    /// The peer's certificate as its handshake presented it.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    fn snapshot(&self) -> LiveSnapshot {
        LiveSnapshot {
            identity: self.peer.name().to_owned(),
            serial: self.peer.serial.clone(),
            not_after: self.peer.not_after,
            since: self.since,
        }
    }

    /// Retires it for `reason` unless it already was; counted and logged once. Whether this did.
    fn retire(&self, reason: ClosedReason) -> bool {
        let first = self.retired.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            *now = Some(reason);
            true
        });
        if first {
            self.metrics.connection_closed(reason);
            let left = self
                .deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            info!(
                peer.id = self.peer.name(),
                peer.serial = %self.peer.serial,
                reason = reason.as_str(),
                deadline_in_ms = left.as_millis() as u64,
                "closing an established connection once its requests finish"
            );
        }
        first
    }
}

impl Registration {
    /// The connection.
    pub fn conn(&self) -> &Arc<LiveConn> {
        &self.conn
    }

    /// [`LiveConn::retired`], for a tunnel that outlives the task serving its connection: the entry
    /// stays (listed in `/certs`, re-checked on reload) for as long as this future is held.
    pub fn retired(self: Arc<Self>) -> impl Future<Output = ClosedReason> + Send + 'static {
        let retired = self.conn.retired();
        async move {
            let _registered = self;
            retired.await
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.conns.lock().remove(&self.conn.id);
    }
}

/// The tokio instant of a wall-clock time (now when it has passed).
fn tokio_instant(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use phoenix_mesh_certs::pki::{LeafSpec, Pki};

    #[test]
    fn the_margin_is_a_tenth_of_the_lifetime_within_one_second_and_a_minute() {
        let s = Duration::from_secs;
        assert_eq!(close_margin(s(24 * 3600)), s(60));
        assert_eq!(close_margin(s(300)), s(30));
        assert_eq!(close_margin(s(6)), s(1));
        assert_eq!(close_margin(Duration::ZERO), s(1));
    }

    /// A certificate issued now for `lifetime`, with its chain as a handshake records it.
    fn issued(pki: &Pki, name: &str, lifetime: Duration) -> (Arc<PeerIdentity>, Authenticated) {
        let mut spec = LeafSpec::new(name, lifetime);
        spec.not_before = SystemTime::now();
        let leaf = pki.issue(&spec).unwrap();
        let chain = phoenix_mesh_certs::rustls::pki_types::pem::PemObject::pem_slice_iter(
            leaf.chain_pem.as_bytes(),
        )
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
        let id = Arc::new(PeerIdentity::from_der(&leaf.der).unwrap());
        (
            id,
            Authenticated {
                chain: chain.into(),
                version: Some(phoenix_mesh_certs::rustls::ProtocolVersion::TLSv1_3),
            },
        )
    }

    fn own(pki: &Pki, lifetime: Duration) -> OwnChain {
        let (leaf, auth) = issued(pki, "own.test", lifetime);
        OwnChain {
            not_after: phoenix_mesh_certs::chain_not_after(&auth.chain).unwrap(),
            leaf: (*leaf).clone(),
        }
    }

    fn closed(metrics: &Metrics, reason: ClosedReason) -> u64 {
        metrics
            .connections_closed
            .get_or_create(&crate::metrics::ClosedLabels { reason })
            .get()
    }

    #[tokio::test]
    async fn a_connection_retires_before_the_first_of_its_two_chains_ends() {
        let pki = Pki::new("live test").unwrap();
        let metrics = Arc::new(Metrics::new());
        let live = LiveConnections::new(metrics.clone(), End::Accepted);
        // The peer's 20 s certificate ends first: retired 2 s (a tenth) before its end.
        let (peer, auth) = issued(&pki, "peer.test", Duration::from_secs(20));
        let registered = live.register(peer.clone(), auth, &own(&pki, Duration::from_secs(3600)));
        let conn = registered.conn().clone();
        assert_eq!(conn.retirement(SystemTime::now()), None);
        assert_eq!(
            conn.retirement(peer.not_after - Duration::from_secs(2)),
            Some(ClosedReason::CertificateExpiry)
        );
        assert_eq!(
            conn.retirement(peer.not_after - Duration::from_secs(3)),
            None
        );
        let snapshot = live.snapshot();
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].identity, "peer.test");
        assert_eq!(snapshot[0].serial, peer.serial);
        assert_eq!(snapshot[0].not_after, peer.not_after);
        drop(registered);
        assert!(live.is_empty(), "a closed connection stays listed");

        // Our own chain ends first: the other reason, and the dialler's margin is twice as long.
        let dialled = LiveConnections::new(metrics.clone(), End::Dialled);
        let (peer, auth) = issued(&pki, "peer.test", Duration::from_secs(3600));
        let ours = own(&pki, Duration::from_secs(20));
        let registered = dialled.register(peer, auth, &ours);
        assert_eq!(
            registered
                .conn()
                .retirement(ours.not_after - Duration::from_secs(4)),
            Some(ClosedReason::OwnCertificateExpiry)
        );
        assert_eq!(
            registered
                .conn()
                .retirement(ours.not_after - Duration::from_secs(5)),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_retirement_timer_fires_and_is_counted_once() {
        let pki = Pki::new("live test").unwrap();
        let metrics = Arc::new(Metrics::new());
        let live = LiveConnections::new(metrics.clone(), End::Accepted);
        let (peer, auth) = issued(&pki, "peer.test", Duration::from_secs(20));
        let registered = live.register(peer, auth, &own(&pki, Duration::from_secs(3600)));
        let reason = registered.conn().retired().await;
        assert_eq!(reason, ClosedReason::CertificateExpiry);
        assert_eq!(registered.conn().retired().await, reason);
        assert_eq!(closed(&metrics, ClosedReason::CertificateExpiry), 1);
    }

    #[tokio::test]
    async fn a_recheck_retires_only_the_refused_connections_once() {
        let pki = Pki::new("live test").unwrap();
        let metrics = Arc::new(Metrics::new());
        let live = LiveConnections::new(metrics.clone(), End::Accepted);
        let ours = own(&pki, Duration::from_secs(3600));
        let (gateway, gateway_auth) = issued(&pki, "gateway.test", Duration::from_secs(3600));
        let (other, other_auth) = issued(&pki, "other.test", Duration::from_secs(3600));
        let refused_der = gateway_auth.chain[0].clone();
        let gateway = live.register(gateway, gateway_auth, &ours);
        let other = live.register(other, other_auth, &ours);
        let judge =
            |auth: &Authenticated| (auth.chain[0] == refused_der).then_some(Refusal::Revoked);
        assert_eq!(live.recheck(judge), 1);
        assert_eq!(
            live.recheck(judge),
            0,
            "an already retired connection again"
        );
        assert_eq!(gateway.conn().retired().await, ClosedReason::Revoked);
        assert_eq!(other.conn().reason(), None);
        assert_eq!(closed(&metrics, ClosedReason::Revoked), 1);
        assert_eq!(live.len(), 2, "retired is not yet closed");
        let peers = live.peers();
        assert_eq!(
            peers
                .iter()
                .map(|p| p.identity.as_str())
                .collect::<Vec<_>>(),
            ["gateway.test", "other.test"]
        );
        let (again, again_auth) = (other.conn().peer().clone(), other.conn().auth.clone());
        let _again = live.register(Arc::new(again), again_auth, &ours);
        let peers = live.peers();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].connections, 2);
        assert_eq!(peers[1].since, other.conn().since);
    }

    #[tokio::test]
    async fn a_tunnel_keeps_its_connection_registered_and_ends_when_it_is_refused() {
        let pki = Pki::new("live test").unwrap();
        let metrics = Arc::new(Metrics::new());
        let live = LiveConnections::new(metrics.clone(), End::Accepted);
        let ours = own(&pki, Duration::from_secs(3600));
        let (peer, auth) = issued(&pki, "gateway.test", Duration::from_secs(3600));
        let registered = Arc::new(live.register(peer, auth, &ours));
        let tunnel = registered.clone().retired();
        // The task that served the connection ends; the tunnel keeps it listed and re-checked.
        drop(registered);
        assert_eq!(live.len(), 1);
        assert_eq!(live.recheck(|_| Some(Refusal::NotAllowed)), 1);
        assert_eq!(tunnel.await, ClosedReason::NotAllowed);
        assert!(live.is_empty(), "the ended tunnel stays listed");
        assert_eq!(closed(&metrics, ClosedReason::NotAllowed), 1);
    }
}
