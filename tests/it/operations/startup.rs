//! Start-up through the real binary: a valid setup starts serving, and every config or certificate
//! mistake exits 78 (EX_CONFIG) before serving anything, with stderr naming the file (or key) and the
//! cause ([`mistakes`], one case per mistake).

use std::net::SocketAddr;

use crate::support::backend::HELLO;
use crate::support::binary::Binary;
use crate::support::files::MeshFiles;
use crate::support::http::{get, send_h1};
use crate::support::mesh::Mesh;
use crate::support::pki::{write_leaf, Rsa1024, TestPki};
use crate::support::{closed_port_addr, within};

const EX_CONFIG: i32 = 78;

/// The control for every mistake below: the same setup, unbroken, starts and serves.
#[tokio::test(flavor = "multi_thread")]
async fn valid_configs_start_serving() {
    let files = MeshFiles::unconnected(&TestPki::new());
    for (side, config) in [
        ("server", files.write_server()),
        ("client", files.write_client()),
    ] {
        let mut proc = Binary::new(side, &config).spawn();
        proc.wait_for_line(&["accepting"]).await;
        assert!(proc.running(), "{side} exited:\n{}", proc.log().join("\n"));
        proc.kill().await;
    }
}

/// A mistake an operator can make in a sidecar's files.
struct Mistake {
    what: &'static str,
    side: &'static str,
    /// Makes the mistake in a valid [`MeshFiles::unconnected`] setup.
    make: fn(&TestPki, &mut MeshFiles),
    /// What stderr must mention; `{dir}` stands for the files' directory.
    says: &'static [&'static str],
}

/// Every start-up mistake, and what the refusal must name.
fn mistakes() -> Vec<Mistake> {
    vec![
        Mistake {
            what: "a missing certificate file",
            side: "server",
            make: |_, f| {
                f.server.set_str("cert", "missing.crt");
            },
            says: &["{dir}/missing.crt", "No such file or directory"],
        },
        Mistake {
            what: "garbage instead of PEM",
            side: "server",
            make: |_, f| {
                std::fs::write(f.path("listener.crt"), "this is not a certificate\n").unwrap()
            },
            says: &["{dir}/listener.crt", "no PEM CERTIFICATE block"],
        },
        Mistake {
            what: "a key not matching the certificate",
            side: "server",
            make: |pki, f| {
                std::fs::write(f.path("listener.key"), pki.listener_cert().key_pem).unwrap()
            },
            says: &["{dir}/listener.key", "{dir}/listener.crt", "does not match"],
        },
        Mistake {
            what: "an expired certificate",
            side: "server",
            make: |pki, f| {
                write_leaf(f.dir.path(), "listener", &pki.expired_listener_cert());
            },
            says: &["{dir}/listener.crt", "expired"],
        },
        Mistake {
            what: "a certificate not yet valid",
            side: "server",
            make: |pki, f| {
                write_leaf(f.dir.path(), "listener", &pki.not_yet_valid_listener_cert());
            },
            says: &["{dir}/listener.crt", "not valid before"],
        },
        Mistake {
            what: "a chain not verifying against `ca`",
            side: "server",
            make: |pki, f| std::fs::write(f.path("listener-ca.crt"), pki.other_root_pem()).unwrap(),
            says: &[
                "{dir}/listener.crt",
                "{dir}/listener-ca.crt",
                "does not verify",
                "UnknownIssuer",
            ],
        },
        Mistake {
            what: "a client certificate without clientAuth",
            side: "client",
            make: |pki, f| {
                write_leaf(f.dir.path(), "client", &pki.server_only_client_cert());
            },
            says: &["{dir}/client.crt", "no clientAuth extended key usage"],
        },
        Mistake {
            what: "an expired client certificate",
            side: "client",
            make: |pki, f| {
                write_leaf(f.dir.path(), "client", &pki.expired_client_cert());
            },
            says: &["{dir}/client.crt", "expired"],
        },
        Mistake {
            what: "an unknown config key",
            side: "server",
            make: |_, f| {
                f.server.set_str("backend_timout", "5s");
            },
            says: &[
                "{dir}/server.toml",
                "unknown field",
                "backend_timout",
                "did you mean `backend_timeout`?",
            ],
        },
        Mistake {
            what: "a config key one letter short",
            side: "client",
            make: |_, f| {
                f.client.set_addrs("upstream", &[closed_port_addr()]);
            },
            says: &[
                "{dir}/client.toml",
                "unknown field `upstream`",
                "did you mean `upstreams`?",
            ],
        },
        Mistake {
            what: "a host name where an address belongs",
            side: "server",
            make: |_, f| {
                f.server.set_str("listen", "mesh.internal:8443");
            },
            says: &[
                "{dir}/server.toml",
                "listen",
                "mesh.internal:8443",
                "not an ip:port address",
            ],
        },
        Mistake {
            what: "a client listening beyond loopback",
            side: "client",
            make: |_, f| {
                f.client.set_str("listen", "0.0.0.0:0");
            },
            says: &[
                "{dir}/client.toml",
                "0.0.0.0:0",
                "loopback",
                "allow_public_listen",
            ],
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_startup_mistake_exits_78_naming_the_cause() {
    let pki = TestPki::new();
    for mistake in mistakes() {
        let what = mistake.what;
        let mut files = MeshFiles::unconnected(&pki);
        (mistake.make)(&pki, &mut files);
        let config = match mistake.side {
            "server" => files.write_server(),
            _ => files.write_client(),
        };
        let (code, _, stderr) = Binary::new(mistake.side, &config).output().await;
        assert_eq!(code, Some(EX_CONFIG), "{what}: stderr:\n{stderr}");
        let dir = files.dir.path().display().to_string();
        for needle in mistake.says {
            let needle = needle.replace("{dir}", &dir);
            assert!(
                stderr.contains(&needle),
                "{what}: stderr should mention {needle:?}:\n{stderr}"
            );
        }
    }
}

/// With `allow_public_listen = true` the wildcard address is accepted; traffic is still sent to
/// 127.0.0.1 only.
#[tokio::test(flavor = "multi_thread")]
async fn client_accepts_public_listen_when_allowed() {
    let mesh = Mesh::start_with(|s| {
        s.client
            .set_str("listen", "0.0.0.0:0")
            .set("allow_public_listen", "true");
    })
    .await;
    assert!(
        mesh.client_addr.ip().is_unspecified(),
        "{}",
        mesh.client_addr
    );
    let loopback = SocketAddr::from(([127, 0, 0, 1], mesh.client_addr.port()));
    let reply = within("request", send_h1(loopback, get("/public"))).await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert_eq!(reply.body, HELLO);
    assert_eq!(reply.mesh_error(), None);
}

/// The first PEM block of `pem` with only its first `lines` lines of base64: still well-formed PEM
/// (64 characters of base64 are 48 whole bytes), but the certificate inside is cut short.
fn first_block_cut_to(pem: &str, lines: usize) -> String {
    let mut block = pem.lines().take_while(|l| !l.starts_with("-----END"));
    let begin = block.next().unwrap();
    let body: Vec<&str> = block.take(lines).collect();
    format!("{begin}\n{}\n-----END CERTIFICATE-----\n", body.join("\n"))
}

/// A certificate file cut short (a half-written file, or a whole PEM block holding half a
/// certificate): start-up exits 78 and `--check` fails, both naming the file and saying what is
/// wrong in words, with none of the parsers' internals (the label's bytes, nom's error kinds).
#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_certificate_is_refused_in_words() {
    let pki = TestPki::new();
    let leaf = pki.listener_cert();
    let cases = [
        (
            "a PEM file cut short",
            leaf.chain_pem[..leaf.chain_pem.len() / 3].to_owned(),
            "the file ends inside a CERTIFICATE block",
        ),
        (
            "a PEM block holding half a certificate",
            first_block_cut_to(&leaf.chain_pem, 3),
            "not a complete X.509 certificate",
        ),
    ];
    for (what, text, says) in cases {
        let files = MeshFiles::unconnected(&pki);
        std::fs::write(files.path("listener.crt"), text).unwrap();
        let config = files.write_server();
        let sentence = format!(
            "certificate {}: {says}",
            files.path("listener.crt").display()
        );
        for (flags, exit) in [(&[][..], EX_CONFIG), (&["--check"][..], 1)] {
            let (code, stdout, stderr) = Binary::server(&config).flags(flags).output().await;
            let out = format!("{stdout}\n--- stderr:\n{stderr}");
            // The temporary directory's random name is no internal, whatever letters it has.
            let words = out.replace(&files.dir.path().display().to_string(), "");
            assert_eq!(code, Some(exit), "{what} {flags:?}:\n{out}");
            assert!(
                out.contains(&sentence),
                "{what} {flags:?}: should say {sentence:?}:\n{out}"
            );
            for internal in [
                "[67, 69",
                "NomError",
                "Parsing Error",
                "Eof",
                "missing section end",
            ] {
                assert!(
                    !words.contains(internal),
                    "{what} {flags:?}: {internal:?} is a parser's internals:\n{out}"
                );
            }
        }
    }
}

/// What the TLS stack itself refuses, though the file is well-formed: a CRL without extensions (no
/// CRL Number), which the verifier's parser rejects, and our own RSA key of 1024 bits. Start-up exits
/// 78 and `--check` fails, both naming the file and the cause; before, `--check` passed the CRL and
/// start-up named no file ("provided CRL could not be parsed: ParseError").
#[tokio::test(flavor = "multi_thread")]
async fn a_crl_or_key_the_tls_stack_refuses_is_named_by_start_and_check_alike() {
    let pki = TestPki::new();
    type Make = fn(&TestPki, &mut MeshFiles) -> &'static str;
    let cases: [(&str, Make, &str); 2] = [
        (
            "a CRL without extensions",
            |pki, f| {
                std::fs::write(f.path("old.crl"), pki.crl_without_extensions()).unwrap();
                f.server.set_list("crls", &["old.crl"]);
                "old.crl"
            },
            "CRL {path}: it has no extensions, so no CRL Number extension",
        ),
        (
            "an RSA key of 1024 bits",
            |_, f| {
                std::fs::write(f.path("listener.key"), Rsa1024::new().private_key_pem()).unwrap();
                "listener.key"
            },
            "private key {path}: an RSA key of 1024 bits is too small",
        ),
    ];
    for (what, make, says) in cases {
        let mut files = MeshFiles::unconnected(&pki);
        let file = make(&pki, &mut files);
        let config = files.write_server();
        let sentence = says.replace("{path}", &files.path(file).display().to_string());
        for (flags, exit) in [(&[][..], EX_CONFIG), (&["--check"][..], 1)] {
            let (code, stdout, stderr) = Binary::server(&config).flags(flags).output().await;
            let out = format!("{stdout}\n--- stderr:\n{stderr}");
            assert_eq!(code, Some(exit), "{what} {flags:?}:\n{out}");
            assert!(
                out.contains(&sentence),
                "{what} {flags:?}: should say {sentence:?}:\n{out}"
            );
        }
    }
}
