//! Planned restarts of the mesh listener under load. A listener told to stop (SIGTERM begins its
//! graceful shutdown; here the in-process equivalent) sends GOAWAY on its HTTP/2 connections and
//! finishes the requests it took. The client sends new requests on a fresh connection, and a GET the
//! old listener turned away unprocessed (above the last stream its GOAWAY let through) once more
//! there: a planned restart costs no GET.

use crate::support::load::Load;
use crate::support::mesh::{Mesh, Upstream};
use crate::support::{closed_port_addr, eventually};

/// GETs in flight at once: more than a listener takes on one connection (256 concurrent streams),
/// so that some of them wait in the client's queue of the mesh link when a GOAWAY comes. Those the
/// listener never sees, and its final GOAWAY turns them away.
const IN_FLIGHT: usize = 320;

/// Waits until the backend has seen `more` requests beyond `from`; returns the new count.
async fn backend_sees(mesh: &Mesh, from: usize, more: usize) -> usize {
    eventually("the load to go on", || async {
        let seen = mesh.backend.targets_with_prefix("/delay/").len();
        (seen >= from + more).then_some(seen)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_each_listener_under_load_costs_no_get() {
    // Two listeners, so that the fresh connection has one to go to while the other restarts.
    let spare_addr = closed_port_addr();
    let mut mesh = Mesh::start_with(|s| {
        s.upstreams = vec![Upstream::Listener, Upstream::At(spare_addr)];
    })
    .await;
    let mut spare = mesh.start_spare_listener(spare_addr).await;
    mesh.good_requests("before", 2).await;

    // Each GET waits at the backend, so that every worker's request is on the mesh link at once.
    let load = Load::start_get(mesh.client_addr, "/delay/200", IN_FLIGHT, u64::MAX);
    let seen = backend_sees(&mesh, 0, 2 * IN_FLIGHT).await;
    // The mesh link rides one of the two listeners: restarting each in turn restarts that one.
    let first = mesh.replace_listener().await;
    let seen = backend_sees(&mesh, seen, 2 * IN_FLIGHT).await;
    let second = spare.replace().await;
    backend_sees(&mesh, seen, 2 * IN_FLIGHT).await;
    load.assert_no_failures("while both listeners restarted", 4 * IN_FLIGHT as u64)
        .await;
    first.await;
    second.await;
    mesh.good_requests("after", 2).await;
}
