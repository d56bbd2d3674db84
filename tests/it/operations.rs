//! Operations (issue 4) through the real binary: the admin endpoint and its metrics, the JSON access
//! log, draining on SIGTERM, `--check` on a working chain and on each broken hop, and every config in
//! deploy/ validated with `--check --config-only`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::PeerIdentity;
use rustls::AlertDescription;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::backend::{Backend, HELLO};
use crate::support::closed_port_addr;
use crate::support::http::SERVICE_HOST;
use crate::support::mesh::{toml_str, TomlConfig};
use crate::support::pki::{GATEWAY_SPIFFE, LISTENER_NAME};
use crate::support::tls::{client_config, refusal_alert};
use crate::support_ops::{
    admin_get, assert_round_trip, eventually, metric, run_binary, try_get, InProc, OpsPki,
    ProcFiles,
};

fn not_after_unix(der: &[u8]) -> f64 {
    PeerIdentity::from_der(der)
        .unwrap()
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64
}

/// Every metric family the issue names, as `# TYPE` lines must show them.
const FAMILIES: [&str; 9] = [
    "phoenix_mesh_tls_handshakes",
    "phoenix_mesh_tls_handshake_duration_seconds",
    "phoenix_mesh_http_requests",
    "phoenix_mesh_http_request_duration_seconds",
    "phoenix_mesh_open_connections",
    "phoenix_mesh_upstream_connections",
    "phoenix_mesh_upstream_dials",
    "phoenix_mesh_certificate_not_after_seconds",
    "phoenix_mesh_reloads",
];

fn assert_families(side: &str, text: &str) {
    // The listener dials nothing but Traefik (a hyper pool), so it has no dial samples to show, and
    // an empty family is not exposed.
    let expected = FAMILIES
        .into_iter()
        .filter(|f| side == "client" || *f != "phoenix_mesh_upstream_dials");
    for family in expected {
        assert!(
            text.contains(&format!("# TYPE {family}")),
            "{side} /metrics lacks {family}:\n{text}"
        );
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("phoenix_mesh_"),
            "{side}: unprefixed metric {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_moving_metrics_on_both_sides() {
    let pki = OpsPki::new();
    let backend = Backend::start().await;
    let (listener_leaf, gateway) = (pki.listener(), pki.gateway());
    let mut files = ProcFiles::new(&pki, backend.addr, &listener_leaf, &gateway);
    files.server.set_str("admin_listen", "127.0.0.1:0");
    files.client.set_str("admin_listen", "127.0.0.1:0");
    let (mut listener, listener_addr) = files.start_listener().await;
    let listener_admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (client, client_addr) = files.start_client(listener_addr).await;
    let client_admin = client
        .addr_from_log("admin endpoint serving", "admin")
        .await;

    for (side, admin) in [("listener", listener_admin), ("client", client_admin)] {
        assert_eq!(
            admin_get(admin, "/healthz").await,
            (200, "ok\n".to_owned()),
            "{side}"
        );
        let (status, body) = admin_get(admin, "/readyz").await;
        assert_eq!(status, 200, "{side} /readyz: {body}");
        assert!(body.starts_with("ready: "), "{side} /readyz: {body}");
    }

    assert_round_trip(client_addr, "through the mesh").await;
    // A client from another CA: one failed handshake with reason unknown-ca.
    let stranger = OpsPki::named("Somebody Else").gateway();
    let alert = refusal_alert(
        listener_addr,
        client_config(pki.root_pem(), Some(&stranger), &[]),
    )
    .await;
    assert_eq!(alert, AlertDescription::UnknownCA);

    let (status, text) = admin_get(listener_admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_families("listener", &text);
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    assert!(
        m(
            "phoenix_mesh_http_requests_total",
            &[("status_class", "2xx"), ("made_by", "backend")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m(
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "failed"), ("reason", "unknown-ca")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m(
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "ok"), ("kind", "full")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_tls_handshake_duration_seconds_count", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_http_request_duration_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(
        m(
            "phoenix_mesh_certificate_not_after_seconds",
            &[("cert", "own")]
        ),
        not_after_unix(&listener_leaf.der),
        "{text}"
    );

    let (_, text) = admin_get(client_admin, "/metrics").await;
    assert_families("client", &text);
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    assert!(
        m(
            "phoenix_mesh_http_requests_total",
            &[("status_class", "2xx"), ("made_by", "backend")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_upstream_dials_total", &[("result", "ok")]) >= 1.0,
        "{text}"
    );
    assert_eq!(
        m(
            "phoenix_mesh_certificate_not_after_seconds",
            &[("cert", "own")]
        ),
        not_after_unix(&gateway.der),
        "{text}"
    );
    assert_eq!(
        m(
            "phoenix_mesh_certificate_not_after_seconds",
            &[("cert", "peer")]
        ),
        not_after_unix(&listener_leaf.der),
        "{text}"
    );

    // The upstream goes away: the client is alive but no longer ready, and says why.
    listener.signal("TERM");
    assert!(listener.exit().await.success());
    let (status, body) = admin_get(client_admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert!(body.contains(&listener_addr.to_string()), "{body}");
    assert_eq!(admin_get(client_admin, "/healthz").await.0, 200);
}

/// The single access-log line (JSON) whose path is `path`, from the process's stderr.
async fn access_line(proc: &crate::support_ops::Proc, path: &str) -> String {
    let needle = format!("\"path\":\"{path}\"");
    proc.wait_for_line(&["phoenix_mesh::access", &needle]).await;
    let lines: Vec<String> = proc
        .log()
        .into_iter()
        .filter(|l| l.contains("phoenix_mesh::access") && l.contains(&needle))
        .collect();
    assert_eq!(lines.len(), 1, "one access line per request: {lines:#?}");
    lines.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request_on_both_sides() {
    let pki = OpsPki::new();
    let backend = Backend::start().await;
    let mut files = ProcFiles::new(&pki, backend.addr, &pki.listener(), &pki.gateway());
    files.server.set("access_log", "true");
    files.client.set("access_log", "true");
    let (listener, listener_addr) = files.start_listener().await;
    let (client, client_addr) = files.start_client(listener_addr).await;

    let paths = ["/first?n=1", "/second?n=2", "/404"];
    for path in paths {
        try_get(client_addr, path).await.unwrap();
    }
    for path in paths {
        let status = if path == "/404" { 404 } else { 200 };
        for (side, proc, peer, upstream) in [
            (
                "client",
                &client,
                "127.0.0.1:".to_owned(),
                listener_addr.to_string(),
            ),
            (
                "listener",
                &listener,
                GATEWAY_SPIFFE.to_owned(),
                backend.addr.to_string(),
            ),
        ] {
            let line = access_line(proc, path).await;
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "{side}: {line}"
            );
            for field in [
                "\"method\":\"GET\"".to_owned(),
                format!("\"host\":\"{SERVICE_HOST}\""),
                format!("\"status\":{status},"),
                "\"duration_ms\":".to_owned(),
                format!("\"peer\":\"{peer}"),
                format!("\"upstream\":\"{upstream}\""),
            ] {
                assert!(
                    line.contains(&field),
                    "{side} access line lacks {field}: {line}"
                );
            }
            if status == 200 {
                assert!(
                    line.contains(&format!("\"bytes\":{},", HELLO.len())),
                    "{side}: {line}"
                );
            }
        }
    }
}

/// A backend whose `/held` answers only when the test opens the gate; reports when it has the request.
async fn gated_backend() -> (SocketAddr, Arc<AtomicBool>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicBool::new(false));
    let (gate, _) = watch::channel(false);
    let (arrived2, gate2) = (arrived.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (arrived, gate) = (arrived2.clone(), gate2.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (arrived, mut open) = (arrived.clone(), gate.subscribe());
                    async move {
                        if req.uri().path() == "/held" {
                            arrived.store(true, Ordering::SeqCst);
                            let _ = open.wait_for(|o| *o).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"held answer\n",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, arrived, gate)
}

async fn refuses_connections(addr: SocketAddr) -> Option<()> {
    match TcpStream::connect(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_the_request_in_flight_finish_and_exits_0() {
    let pki = OpsPki::new();
    let (backend, arrived, gate) = gated_backend().await;
    let mut files = ProcFiles::new(&pki, backend, &pki.listener(), &pki.gateway());
    files.server.set_str("drain_timeout", "20s");
    files.client.set_str("drain_timeout", "20s");
    let (mut listener, listener_addr) = files.start_listener().await;
    let (mut client, client_addr) = files.start_client(listener_addr).await;

    let in_flight = tokio::spawn(try_get(client_addr, "/held"));
    eventually("the held request reaching the backend", || {
        let a = arrived.load(Ordering::SeqCst);
        async move { a.then_some(()) }
    })
    .await;
    listener.signal("TERM");
    client.signal("TERM");
    listener
        .wait_for_line(&["SIGTERM", "stopping: no new connections"])
        .await;
    client
        .wait_for_line(&["SIGTERM", "stopping: no new connections"])
        .await;
    // The request is still held by the backend, so both processes are draining, not gone.
    eventually("the client refusing new connections", || {
        refuses_connections(client_addr)
    })
    .await;
    eventually("the listener refusing new connections", || {
        refuses_connections(listener_addr)
    })
    .await;
    assert!(!in_flight.is_finished(), "the held request ended early");
    assert!(
        listener.running() && client.running(),
        "exited before draining"
    );

    gate.send_replace(true);
    let got = crate::support::within("the drained request", in_flight)
        .await
        .unwrap()
        .expect("the request in flight must complete");
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, "held answer\n"),
        "{got:?}"
    );
    let (l, c) = (listener.exit().await, client.exit().await);
    assert_eq!((l.code(), c.code()), (Some(0), Some(0)));
    listener.wait_for_line(&["drained; exiting"]).await;
}

// ---------------------------------------------------------------------------------------------
// --check

/// A client config for `mesh`'s certificates, aimed at `upstream`.
fn client_toml(upstream: SocketAddr) -> TomlConfig {
    let mut c = TomlConfig::default();
    c.set_str("listen", "127.0.0.1:0")
        .set(
            "upstreams",
            format!("[{}]", toml_str(&upstream.to_string())),
        )
        .set_str("server_name", LISTENER_NAME)
        .set_str("cert", "client.crt")
        .set_str("key", "client.key")
        .set_str("ca", "ca.crt")
        .set_str("connect_timeout", "3s")
        .set_str("handshake_timeout", "3s");
    c
}

/// Writes `config` as `name` in `mesh`'s directory and runs `<side> --config it --check <extra>`.
async fn check(
    mesh: &InProc,
    side: &str,
    name: &str,
    config: &TomlConfig,
    extra: &[&str],
) -> (Option<i32>, String) {
    let path = mesh.path(name);
    config.write(&path);
    let path = path.to_str().unwrap().to_owned();
    let mut args = vec![side, "--config", &path, "--check"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_binary(&args).await;
    (code, format!("{stdout}\n--- stderr:\n{stderr}"))
}

/// The listener's config with `listen` naming the port it actually bound.
fn running_server_toml(mesh: &InProc) -> TomlConfig {
    let mut config = mesh.server.clone();
    config.set_str("listen", &mesh.listener_addr.to_string());
    config
}

fn fail_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("[FAIL]")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_working_chain_for_both_sides() {
    let mesh = InProc::start(|_| {}).await;
    for (side, name, config) in [
        (
            "client",
            "check-client.toml",
            client_toml(mesh.listener_addr),
        ),
        ("server", "check-server.toml", running_server_toml(&mesh)),
    ] {
        let (code, out) = check(&mesh, side, name, &config, &[]).await;
        assert_eq!(code, Some(0), "{side}:\n{out}");
        let steps: Vec<&str> = out.lines().filter(|l| l.starts_with('[')).collect();
        assert!(steps.len() >= 3, "{side}:\n{out}");
        assert!(
            steps.iter().all(|l| l.starts_with("[ OK ]")),
            "{side}: every step OK:\n{out}"
        );
        assert!(out.contains("check passed"), "{side}:\n{out}");
    }
    // The client's probe really went through the mesh.
    assert!(mesh
        .backend
        .seen()
        .iter()
        .any(|s| s.headers.get("user-agent").map(|v| v.as_bytes()) == Some(b"phoenix-mesh-check")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_address_when_the_listener_is_down() {
    let mesh = InProc::start(|_| {}).await;
    let down = closed_port_addr();
    let (code, out) = check(&mesh, "client", "c.toml", &client_toml(down), &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].contains(&format!("{down}: "))
            && fails[0].to_lowercase().contains("connection refused"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_a_plaintext_upstream_does_not_speak_tls() {
    let mesh = InProc::start(|_| {}).await;
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.backend.addr),
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("does not speak TLS"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_rejected_listener_certificate_and_the_wrong_name() {
    let mesh = InProc::start(|_| {}).await;
    let wrong = "wrong.internal.thinkheads.ai";
    let mut config = client_toml(mesh.listener_addr);
    config.set_str("server_name", wrong);
    let (code, out) = check(&mesh, "client", "c.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains("mutual TLS")
            && fails[0].contains("rejected")
            && fails[0].contains(wrong),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_our_certificate_refused_by_the_listener() {
    let mesh = InProc::start(|s| {
        s.server.set(
            "allowed_peers",
            format!("[{}]", toml_str("somebody-else.internal.thinkheads.ai")),
        );
    })
    .await;
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.listener_addr),
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("refused our client certificate"),
        "{out}"
    );
    assert!(mesh.backend.seen().is_empty());
}

/// The same refusal with HTTP/1.1 on the mesh link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_our_certificate_refused_by_the_listener_over_http1() {
    let mesh = InProc::start(|s| {
        s.server.set(
            "allowed_peers",
            format!("[{}]", toml_str("somebody-else.internal.thinkheads.ai")),
        );
    })
    .await;
    let mut config = client_toml(mesh.listener_addr);
    config.set("upstream_http2", "false");
    let (code, out) = check(&mesh, "client", "c.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("refused our client certificate"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_names_the_backend_and_traefik_when_the_backend_is_down() {
    let mesh = InProc::start(|_| {}).await;
    let down = closed_port_addr();
    let mut config = mesh.server.clone();
    config.set_str("backend", &down.to_string());
    let (code, out) = check(&mesh, "server", "s.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains(&down.to_string())
            && fails[0].to_lowercase().contains("connection refused"),
        "{out}"
    );
    let hint = out
        .lines()
        .skip_while(|l| !l.starts_with("[FAIL]"))
        .nth(1)
        .unwrap_or("");
    assert!(hint.contains("hint:") && hint.contains("Traefik"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_backend_404_as_mesh_ok_without_a_router() {
    let mesh = InProc::start(|_| {}).await;
    let host = "nothing-routes-this.internal.thinkheads.ai";
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.listener_addr),
        &["--host", host, "--path", "/404"],
    )
    .await;
    assert_eq!(code, Some(0), "a 404 is a warning, not a failure:\n{out}");
    let warn: Vec<&str> = out.lines().filter(|l| l.starts_with("[WARN]")).collect();
    assert!(
        warn.len() == 1
            && warn[0].contains(&format!("mesh OK; Traefik has no router for Host {host}")),
        "{out}"
    );
    assert!(fail_lines(&out).is_empty(), "{out}");
    assert_eq!(mesh.backend.only_request().one("host"), host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_probes_the_backend_over_h2c_when_backend_http2_is_on() {
    let mesh = InProc::start(|_| {}).await;
    let mut config = running_server_toml(&mesh);
    config.set("backend_http2", "true");
    let (code, out) = check(
        &mesh,
        "server",
        "s.toml",
        &config,
        &["--host", SERVICE_HOST],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[ OK ]") && l.contains("over h2c")),
        "{out}"
    );
    let seen = mesh.backend.only_request();
    assert_eq!(seen.version, http::Version::HTTP_2, "{seen:#?}");
    assert_eq!(seen.authority.as_deref(), Some(SERVICE_HOST), "{seen:#?}");

    // A backend that speaks HTTP/1.1 only fails the step, and the hint names the key.
    let http1_only = Backend::start_http1_only().await;
    config.set_str("backend", &http1_only.addr.to_string());
    let (code, out) = check(&mesh, "server", "s.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains(&http1_only.addr.to_string())
            && fails[0].contains("over h2c"),
        "{out}"
    );
    assert!(out.contains("hint: backend_http2 = true"), "{out}");

    // A --host that cannot be an :authority is named as the problem, not the backend.
    config.set_str("backend", &mesh.backend.addr.to_string());
    let (code, out) = check(
        &mesh,
        "server",
        "s.toml",
        &config,
        &["--host", "not a host"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains(r#"--host "not a host" is no valid host[:port]"#),
        "{out}"
    );
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deploy_config_validates_with_check_config_only() {
    let mut found = Vec::new();
    toml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut found,
    );
    found.sort();
    let mut sides = Vec::new();
    for path in &found {
        let text = std::fs::read_to_string(path).unwrap();
        let is_client = text
            .lines()
            .any(|l| l.trim_start().starts_with("upstreams"));
        let side = if is_client { "client" } else { "server" };
        let p = path.to_str().unwrap();
        let (code, stdout, stderr) =
            run_binary(&[side, "--config", p, "--check", "--config-only"]).await;
        assert_eq!(code, Some(0), "{side} {p}:\n{stdout}\n{stderr}");
        assert!(
            stdout.starts_with("[ OK ] config ")
                && stdout.contains(&format!("valid {side} configuration")),
            "{side} {p}:\n{stdout}"
        );
        sides.push(side);
    }
    assert!(
        sides.contains(&"client") && sides.contains(&"server"),
        "deploy/ should hold a config for each side: {found:?}"
    );
}

/// `--config-only` is not a rubber stamp: a typo in a key fails with exit 78 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_only_refuses_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/lxc-102-traefik/phoenix-mesh-server.toml");
    let text = std::fs::read_to_string(src).unwrap() + "\nalowed_peers = []\n";
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, text).unwrap();
    let (code, stdout, stderr) = run_binary(&[
        "server",
        "--config",
        path.to_str().unwrap(),
        "--check",
        "--config-only",
    ])
    .await;
    assert_eq!(code, Some(78), "{stdout}\n{stderr}");
    assert!(stderr.contains("alowed_peers"), "{stderr}");
}

/// The admin port closes connections that send nothing, or stop inside a request head, after
/// `header_read_timeout` like the traffic ports: it accepts 64 connections at a time, and a local
/// process holding them would blind `/readyz` and the Prometheus scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_closes_silent_and_stalled_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = OpsPki::new();
    let backend = Backend::start().await;
    let (listener_leaf, gateway) = (pki.listener(), pki.gateway());
    let mut files = ProcFiles::new(&pki, backend.addr, &listener_leaf, &gateway);
    files.server.set_str("admin_listen", "127.0.0.1:0");
    files.server.set_str("header_read_timeout", "500ms");
    let (listener, _) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    for (what, first) in [
        ("a silent connection", &b""[..]),
        (
            "a stalled request head",
            &b"GET /metrics HTTP/1.1\r\nHost: a\r\n"[..],
        ),
    ] {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut got),
        )
        .await;
        assert!(read.is_ok(), "admin port: {what} still open after 10 s");
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{what}: {text}"
        );
    }
    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".to_owned()));
}
