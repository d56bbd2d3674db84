//! Certificates rotated while traffic flows: through SIGHUP and through a file change alone (files
//! replaced by rename, rewritten in place, or behind a swapped Kubernetes-secret symlink), on both
//! sides, under load, without a failed request; pooled mesh connections follow the client's new
//! certificate; botched renewals keep the last good certificate in service until the next good
//! one applies; and a renewal's two renames, seen half-done by the poller, are no failed reload.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_certs::LiveTls;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::{Backend, HELLO};
use crate::support::files::{
    install_leaf_by_rename, install_leaf_by_two_renames, install_leaf_in_place,
    install_symlinked_leaf, rename_replace, swap_symlinked_leaf, MeshFiles,
};
use crate::support::http::{assert_round_trip, try_get};
use crate::support::load::Load;
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, TestPki};
use crate::support::tls::{client_config, presented_leaf};
use crate::support::{eventually, STEP_LIMIT};

/// How long the load runs on each side of a rotation. Pacing only; nothing asserts on time.
const LOAD_PHASE: Duration = Duration::from_millis(1200);

/// After the load, requests until one goes out on a fresh mesh connection (the pool keeps idle
/// connections for `pool_idle_timeout` = 200 ms) and the backend sees `leaf`'s identity.
async fn backend_sees_client(inbound: std::net::SocketAddr, backend: &Backend, leaf: &Leaf) {
    let want = expected_gateway_xfcc(leaf);
    let mut last = String::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_round_trip(inbound, "request after rotation").await;
        last = backend.last_xfcc();
        if last == want {
            return;
        }
    }
    panic!("the backend never saw the new client certificate: want {want}, last {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_both_sides_under_load_without_a_failed_request() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let (old_listener, old_client) = (pki.listener_cert(), pki.client_cert());
    let mut files = MeshFiles::new(&pki, backend.addr, &old_listener, &old_client);
    // A poll interval of an hour: only the signal can make these reloads happen.
    files.server.set_str("reload_poll_interval", "1h");
    files
        .client
        .set_str("reload_poll_interval", "1h")
        .set_str("pool_idle_timeout", "200ms");
    let (mut listener, listener_addr) = files.start_listener().await;
    let (mut client, client_addr) = files.start_client(listener_addr).await;
    let probe = client_config(pki.root_pem(), Some(&old_client), &[]);

    assert_round_trip(client_addr, "before rotation").await;
    assert_eq!(backend.last_xfcc(), expected_gateway_xfcc(&old_client));
    assert_eq!(
        presented_leaf(listener_addr, probe.clone()).await,
        old_listener.der
    );

    let load = Load::start(client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (pki.listener_cert(), pki.client_cert());
    install_leaf_by_rename(files.dir.path(), "listener", &new_listener);
    install_leaf_by_rename(files.dir.path(), "client", &new_client);
    listener.signal("HUP");
    client.signal("HUP");
    listener
        .wait_for_line(&["TLS material reloaded", "SIGHUP"])
        .await;
    client
        .wait_for_line(&["TLS material reloaded", "SIGHUP"])
        .await;
    tokio::time::sleep(LOAD_PHASE).await;
    load.assert_no_failures("during the rotation", 20).await;
    assert_eq!(
        presented_leaf(listener_addr, probe).await,
        new_listener.der,
        "a new connection to the listener must see the renewed certificate"
    );
    backend_sees_client(client_addr, &backend, &new_client).await;
    assert!(listener.running() && client.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_alone_rotates_both_sides_under_load_rename_and_in_place() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("reload_poll_interval", "200ms");
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    let probe = mesh.tls_config(&mesh.client_leaf);
    assert_round_trip(mesh.client_addr, "before rotation").await;

    let load = Load::start(mesh.client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (mesh.pki.listener_cert(), mesh.pki.client_cert());
    // The listener's files are replaced by rename, the client's rewritten in place.
    install_leaf_by_rename(mesh.dir.path(), "listener", &new_listener);
    install_leaf_in_place(mesh.dir.path(), "client", &new_client);
    eventually("the listener presenting the renewed certificate", || {
        let probe = probe.clone();
        let want = new_listener.der.clone();
        let addr = mesh.listener_addr;
        async move { (presented_leaf(addr, probe).await == want).then_some(()) }
    })
    .await;
    eventually("the client reloading its renewed certificate", || {
        let now = mesh.client_reloader.live().leaf().xfcc();
        let want = expected_gateway_xfcc(&new_client);
        async move { (now == want).then_some(()) }
    })
    .await;
    tokio::time::sleep(LOAD_PHASE).await;
    load.assert_no_failures("during the rotation", 20).await;
    backend_sees_client(mesh.client_addr, &mesh.backend, &new_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_alone_follows_a_swapped_symlink_on_both_sides() {
    let mesh = Mesh::start_with(|s| {
        // The Kubernetes-secret layout: every path read goes through a link.
        install_symlinked_leaf(s.dir, "listener", s.listener_leaf());
        install_symlinked_leaf(s.dir, "client", s.client_leaf());
        s.server.set_str("reload_poll_interval", "200ms");
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    assert!(mesh
        .path("listener.crt")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    let probe = mesh.tls_config(&mesh.client_leaf);
    assert_round_trip(mesh.client_addr, "before the swap").await;

    let load = Load::start(mesh.client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (mesh.pki.listener_cert(), mesh.pki.client_cert());
    swap_symlinked_leaf(mesh.dir.path(), "listener", &new_listener, 1);
    swap_symlinked_leaf(mesh.dir.path(), "client", &new_client, 1);
    eventually(
        "the listener presenting the certificate behind the new link",
        || {
            let probe = probe.clone();
            let want = new_listener.der.clone();
            let addr = mesh.listener_addr;
            async move { (presented_leaf(addr, probe).await == want).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(LOAD_PHASE).await;
    load.assert_no_failures("during the swap", 20).await;
    backend_sees_client(mesh.client_addr, &mesh.backend, &new_client).await;
    // Both files swap in one rename, so neither side ever saw a mismatched pair.
    assert_eq!(
        mesh.listener_reloader.stats.failed.load(Ordering::Relaxed),
        0
    );
    assert_eq!(mesh.client_reloader.stats.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pooled_connection_moves_to_the_rotated_client_certificate_without_a_failed_request() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("reload_poll_interval", "200ms");
        s.server.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let old_xfcc = expected_gateway_xfcc(&mesh.client_leaf);
    for i in 0..10 {
        let got = try_get(mesh.client_addr, &format!("/warm/{i}"))
            .await
            .unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, HELLO), "{got:?}");
    }
    assert_eq!(mesh.backend.last_xfcc(), old_xfcc);
    let admin = mesh.listener_admin.unwrap();
    let (_, text) = admin_get(admin, "/metrics").await;
    let handshakes = |text: &str| {
        metric(
            text,
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "ok")],
        )
    };
    assert_eq!(
        handshakes(&text),
        Some(1.0),
        "the requests should share one pooled mesh connection: {text}"
    );

    let load = Load::start(mesh.client_addr, 2, 100_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_leaf = mesh.pki.client_cert();
    let new_xfcc = expected_gateway_xfcc(&new_leaf);
    install_leaf_by_rename(mesh.dir.path(), "client", &new_leaf);
    let deadline = Instant::now() + STEP_LIMIT;
    while mesh.backend.last_xfcc() != new_xfcc {
        assert!(
            Instant::now() < deadline,
            "the backend never saw the rotated client certificate; still {}",
            mesh.backend.last_xfcc()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep the load on the new connection for a moment before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.assert_no_failures("during the rotation", 10).await;
    for i in 0..5 {
        let got = try_get(mesh.client_addr, &format!("/after/{i}"))
            .await
            .unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, HELLO), "{got:?}");
        assert_eq!(
            mesh.backend.last_xfcc(),
            new_xfcc,
            "a request after the switch used the old certificate"
        );
    }
}

/// A botched renewal the listener must survive: what ends up in `listener.crt` / `listener.key`.
fn botch(kind: &str, pki: &TestPki, dir: &std::path::Path) {
    let crt = dir.join("listener.crt");
    match kind {
        "garbage PEM" => rename_replace(
            &crt,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        ),
        // A new certificate next to the old key.
        "key not matching the certificate" => rename_replace(&crt, &pki.listener_cert().chain_pem),
        "expired certificate" => {
            install_leaf_by_rename(dir, "listener", &pki.expired_listener_cert())
        }
        "half-written file" => {
            let leaf = pki.listener_cert();
            rename_replace(&dir.join("listener.key"), &leaf.key_pem);
            // The writer died mid-way through the certificate.
            std::fs::write(&crt, &leaf.chain_pem[..leaf.chain_pem.len() / 3]).unwrap();
        }
        other => unreachable!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_renewals_keep_the_old_certificate_and_the_next_good_one_applies() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set_str("reload_poll_interval", "200ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let admin = mesh.listener_admin.unwrap();
    let probe = mesh.tls_config(&mesh.client_leaf);
    let stats = &mesh.listener_reloader.stats;
    let mut in_service = mesh.listener_leaf.clone();

    for kind in [
        "garbage PEM",
        "key not matching the certificate",
        "expired certificate",
        "half-written file",
    ] {
        let failed_before = stats.failed.load(Ordering::Relaxed);
        botch(kind, &mesh.pki, mesh.dir.path());
        eventually(&format!("{kind}: a failed reload counted"), || {
            let n = stats.failed.load(Ordering::Relaxed);
            async move { (n > failed_before).then_some(()) }
        })
        .await;
        assert_eq!(
            presented_leaf(mesh.listener_addr, probe.clone()).await,
            in_service.der,
            "{kind}: the last good certificate must stay in service"
        );
        assert_round_trip(mesh.client_addr, kind).await;
        let (_, text) = admin_get(admin, "/metrics").await;
        let failed = metric(&text, "phoenix_mesh_reloads_total", &[("result", "failed")]);
        assert!(
            failed.unwrap_or(0.0) >= (failed_before + 1) as f64,
            "{kind}: reloads_total{{result=\"failed\"}} should count it:\n{text}"
        );

        let good = mesh.pki.listener_cert();
        install_leaf_by_rename(mesh.dir.path(), "listener", &good);
        eventually(
            &format!("after {kind}: the next good renewal applied"),
            || {
                let probe = probe.clone();
                let want = good.der.clone();
                let addr = mesh.listener_addr;
                async move { (presented_leaf(addr, probe).await == want).then_some(()) }
            },
        )
        .await;
        assert_round_trip(
            mesh.client_addr,
            &format!("after {kind} and a good renewal"),
        )
        .await;
        in_service = good;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_client_renewal_keeps_the_client_serving() {
    let mesh = Mesh::start_with(|s| {
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    let stats = &mesh.client_reloader.stats;
    rename_replace(&mesh.path("client.crt"), "garbage, not PEM\n");
    eventually("the client counting a failed reload", || {
        let n = stats.failed.load(Ordering::Relaxed);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    // A fresh mesh connection still presents the old certificate.
    backend_sees_client(mesh.client_addr, &mesh.backend, &mesh.client_leaf).await;

    let good = mesh.pki.client_cert();
    install_leaf_by_rename(mesh.dir.path(), "client", &good);
    backend_sees_client(mesh.client_addr, &mesh.backend, &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_renewal_and_sighup_leave_the_binary_running_on_the_old_certificate() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let (old_listener, gateway) = (pki.listener_cert(), pki.client_cert());
    let mut files = MeshFiles::new(&pki, backend.addr, &old_listener, &gateway);
    files
        .server
        .set_str("reload_poll_interval", "1h")
        .set_str("admin_listen", "127.0.0.1:0");
    let (mut listener, listener_addr) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (_client, client_addr) = files.start_client(listener_addr).await;
    let probe = client_config(pki.root_pem(), Some(&gateway), &[]);

    rename_replace(&files.path("listener.crt"), "garbage\n");
    listener.signal("HUP");
    listener
        .wait_for_line(&["certificate reload failed", "listener.crt"])
        .await;
    let (_, text) = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(&text, "phoenix_mesh_reloads_total", &[("result", "failed")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        listener.running(),
        "a failed reload must not end the process"
    );
    assert_eq!(
        presented_leaf(listener_addr, probe.clone()).await,
        old_listener.der
    );
    assert_round_trip(client_addr, "after the botched renewal").await;

    // The next change is tried again.
    let good = pki.listener_cert();
    install_leaf_by_rename(files.dir.path(), "listener", &good);
    listener.signal("HUP");
    eventually("the good renewal applied on the next SIGHUP", || {
        let probe = probe.clone();
        let want = good.der.clone();
        async move { (presented_leaf(listener_addr, probe).await == want).then_some(()) }
    })
    .await;
    let (_, text) = admin_get(admin, "/metrics").await;
    assert!(
        metric(&text, "phoenix_mesh_reloads_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
}

/// The pause between a renewal's two renames: several poll intervals, so the watcher reads the new
/// certificate beside the old key (or the other way round). Pacing only; nothing asserts on time.
const BETWEEN_RENAMES: Duration = Duration::from_millis(400);

/// Renewals done the way Phoenix's post-renewal command does them, two renames with a poll between,
/// on both sides under load with a fast poll: no failed reload counted or warned about, no failed
/// request, and every renewal in service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rename_renewals_under_a_fast_poll_count_no_failed_reload() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let (first_listener, first_client) = (pki.listener_cert(), pki.client_cert());
    let mut files = MeshFiles::new(&pki, backend.addr, &first_listener, &first_client);
    for side in [&mut files.server, &mut files.client] {
        side.set_str("reload_poll_interval", "100ms")
            .set_str("admin_listen", "127.0.0.1:0");
    }
    files.client.set_str("pool_idle_timeout", "200ms");
    let (listener, listener_addr) = files.start_listener().await;
    let listener_admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (client, client_addr) = files.start_client(listener_addr).await;
    let client_admin = client
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let probe = client_config(pki.root_pem(), Some(&first_client), &[]);
    assert_round_trip(client_addr, "before the renewals").await;

    let load = Load::start(client_addr, 2, 100_000);
    let dir = files.dir.path();
    for round in 0..4 {
        let (listener_leaf, client_leaf) = (pki.listener_cert(), pki.client_cert());
        // Phoenix's command moves the certificate first; install.sh moves the key first.
        let key_first = round % 2 == 1;
        tokio::join!(
            install_leaf_by_two_renames(
                dir,
                "listener",
                &listener_leaf,
                key_first,
                BETWEEN_RENAMES
            ),
            install_leaf_by_two_renames(dir, "client", &client_leaf, key_first, BETWEEN_RENAMES),
        );
        eventually(
            &format!("renewal {round}: the listener presenting its new certificate"),
            || {
                let probe = probe.clone();
                let want = listener_leaf.der.clone();
                async move { (presented_leaf(listener_addr, probe).await == want).then_some(()) }
            },
        )
        .await;
        backend_sees_client(client_addr, &backend, &client_leaf).await;
    }
    load.assert_no_failures("during the renewals", 20).await;

    for (side, admin, proc) in [
        ("listener", listener_admin, &listener),
        ("client", client_admin, &client),
    ] {
        let (_, text) = admin_get(admin, "/metrics").await;
        let reloads = |result| metric(&text, "phoenix_mesh_reloads_total", &[("result", result)]);
        assert_eq!(
            reloads("failed").unwrap_or(0.0),
            0.0,
            "{side}: a renewal's two renames are no failed reload:\n{text}"
        );
        assert!(
            reloads("ok").unwrap_or(0.0) >= 4.0,
            "{side}: every renewal reloaded:\n{text}"
        );
        // Only the reloader's warnings: the process may warn about its environment (file limits).
        let warnings: Vec<String> = proc
            .log()
            .into_iter()
            .filter(|l| {
                l.contains("\"level\":\"WARN\"")
                    && (l.contains("reload") || l.contains("does not match"))
            })
            .collect();
        assert!(
            warnings.is_empty(),
            "{side}: no reload warning:\n{}",
            warnings.join("\n")
        );
    }
}
