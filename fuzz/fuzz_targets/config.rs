//! The config parser of both sidecars, end to end: bytes on disk -> TOML -> validated settings.
//!
//! `ServerSettings::load` / `ClientSettings::load` take a path (relative paths in the file resolve
//! against it), so each input is written to one file in a private temporary directory and loaded as
//! both a listener and a client config. Either may refuse it; neither may panic, and what they accept
//! must hold the invariants the rest of the code relies on without re-checking.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phoenix_mesh_client::ClientSettings;
use phoenix_mesh_common::config::parse_duration;
use phoenix_mesh_server::ServerSettings;

fn config_path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("phoenix-mesh-fuzz-")
            .tempdir()
            .expect("temporary directory");
        let path = dir.path().join("mesh.toml");
        (dir, path)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let path = config_path();
    std::fs::write(path, data).expect("writing the config file");

    if let Ok(s) = ServerSettings::load(path) {
        assert!(s.shared.http.max_header_bytes >= 8192, "{s:?}");
        assert!(s.shared.max_connections >= 1, "{s:?}");
        if let Some(admin) = s.shared.admin_listen {
            assert!(admin.ip().is_loopback(), "{s:?}");
        }
        assert!(
            s.allowed_peers.iter().all(|p| !p.trim().is_empty()),
            "{s:?}"
        );
        for p in [&s.shared.tls.cert, &s.shared.tls.key, &s.shared.tls.ca]
            .into_iter()
            .chain(&s.shared.tls.crls)
        {
            assert!(p.is_absolute(), "unresolved path {p:?}");
        }
    }

    if let Ok(c) = ClientSettings::load(path) {
        assert!(c.shared.http.max_header_bytes >= 8192, "{c:?}");
        assert!(c.shared.max_connections >= 1, "{c:?}");
        assert!(!c.upstreams.is_empty(), "{c:?}");
        assert!(!c.server_name.trim().is_empty(), "{c:?}");
        if let Some(admin) = c.shared.admin_listen {
            assert!(admin.ip().is_loopback(), "{c:?}");
        }
        for p in [&c.shared.tls.cert, &c.shared.tls.key, &c.shared.tls.ca]
            .into_iter()
            .chain(&c.shared.tls.crls)
        {
            assert!(p.is_absolute(), "unresolved path {p:?}");
        }
    }

    // Durations are also parsed on their own (SIGHUP reloads, CLI); any string must be safe.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = parse_duration(text) {
            // A plain number of milliseconds means exactly that many (humantime also takes
            // compound forms such as "1h 5ms", which this does not check).
            if let Some(n) = text
                .trim()
                .strip_suffix("ms")
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                assert_eq!(d.as_millis(), u128::from(n), "{text:?}");
            }
        }
    }
});
