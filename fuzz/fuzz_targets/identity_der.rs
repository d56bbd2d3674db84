//! Peer identity from arbitrary DER (what a TLS peer could present, before or after chain checks):
//! `PeerIdentity::from_der`, then the `X-Forwarded-Client-Cert` value and `allowed_peers` matching.
//! Seeded with real rcgen certificates (fuzz/seeds/identity_der) so mutations stay near valid X.509.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phoenix_mesh_certs::PeerIdentity;

#[path = "../src/xfcc.rs"]
mod xfcc;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = PeerIdentity::from_der(data) {
        xfcc::check_identity(&id);
    }
});
