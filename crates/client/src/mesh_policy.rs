//! The client's policy for its connections to the mesh listener: the shared HTTP/2 *mesh link* that
//! every plain request rides ([`phoenix_mesh_transport::h2::shared`]), and the HTTP/1.1 pool beside
//! it ([`phoenix_mesh_transport::pool`]).
//!
//! A connection is *retired* (takes no new requests; those in flight finish on it) by the rule in
//! [`crate::retirement`]: when its certificates end soon, when a reload's trust refuses it, or when it
//! was opened before our own certificate or trust was reloaded. The first two happen on their own,
//! so the pools let go of such a connection without waiting for a request to find out, and close it
//! at its certificates' end whatever it carries. A listener that does not choose HTTP/2 gets the requests over HTTP/1.1 for a while
//! ([`H1_FALLBACK`]).
//!
//! A request the listener turned away unprocessed (its stream refused, or above the last stream its
//! GOAWAY let through, as a listener shutting down for a restart does) goes once more, after a GOAWAY
//! on a fresh connection, if it is idempotent and has no body: the rule the listener's h2c hop to its
//! backend follows too ([`idempotent_without_body`]). The fresh connection is dialled as any other,
//! so with several listeners it reaches the next one that answers.

use std::time::Duration;

use http::Request;
use phoenix_mesh_transport::body::ProxyBody;
use phoenix_mesh_transport::dial::{Lifetime, Retire};
use phoenix_mesh_transport::h2::shared::{idempotent_without_body, Policy, SharedConnection};
use tracing::info;

use crate::conn_info::ConnInfo;
use crate::connector::MeshConnector;

/// The shared HTTP/2 connection to a mesh listener.
pub(crate) type MeshLink = SharedConnection<MeshConnector, MeshPolicy>;

/// How long the link leaves requests to the HTTP/1.1 pool after a listener declined HTTP/2.
pub(crate) const H1_FALLBACK: Duration = Duration::from_secs(60);

/// The client's rules for its mesh connections.
#[derive(Clone)]
pub(crate) struct MeshPolicy {
    connector: MeshConnector,
}

impl MeshPolicy {
    pub(crate) fn new(connector: MeshConnector) -> Self {
        MeshPolicy { connector }
    }
}

impl Retire<ConnInfo> for MeshPolicy {
    fn retire(&self, info: &ConnInfo) -> bool {
        match self.connector.retirement(info) {
            Some(retirement) => {
                retirement.log();
                true
            }
            None => false,
        }
    }

    fn lifetime(&self, info: &ConnInfo) -> Option<Lifetime> {
        let retired = info.live.retired();
        Some(Lifetime {
            retired: Box::pin(async move {
                retired.await;
            }),
            deadline: info.live.deadline(),
        })
    }
}

impl Policy<ConnInfo> for MeshPolicy {
    fn replayable(&self, req: &Request<ProxyBody>) -> bool {
        idempotent_without_body(req)
    }

    fn declined_http2(&self) -> Duration {
        info!(
            for_s = H1_FALLBACK.as_secs(),
            "the mesh listener did not choose HTTP/2; using HTTP/1.1 connections for now"
        );
        H1_FALLBACK
    }
}
