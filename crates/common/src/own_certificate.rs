//! What a sidecar says about its own certificate: a log line at start (a warning once renewal is
//! due), readiness while it is in date, and its not-after time and the reload counters as metrics.

use std::time::SystemTime;

use phoenix_mesh_certs::{LiveTls, Material, Reloader};
use tracing::{info, warn};

use crate::admin::NotReady;
use crate::metrics::{CertKind, Metrics};

/// Logs our certificate at start, warning when renewal is due.
pub fn log_certificate(material: &Material, role: &str) {
    let leaf = &material.leaf;
    let now = SystemTime::now();
    let left = leaf.remaining(now);
    info!(
        role,
        cert = %material.files.cert.display(),
        subject = %leaf.subject,
        dns = ?leaf.dns,
        expires_in_s = left.as_secs(),
        "certificate loaded"
    );
    if leaf.renewal_due(now) {
        warn!(
            role,
            cert = %material.files.cert.display(),
            expires_in_s = left.as_secs(),
            "certificate has less than a third of its lifetime left; is renewal running?"
        );
    }
}

/// Brings the metrics that come from the TLS material up to date: our certificate's validity and
/// the reload counters.
pub fn refresh_tls_metrics<T: LiveTls>(metrics: &Metrics, reloader: &Reloader<T>) {
    let leaf = reloader.live().leaf();
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    metrics.set_not_after(CertKind::Own, unix(leaf.not_after));
    metrics.set_not_before(CertKind::Own, unix(leaf.not_before));
    metrics.sync_reloads(&reloader.stats.succeeded, &reloader.stats.failed);
}

/// Readiness as far as the TLS material goes: our certificate must not have expired. The seconds
/// it has left when it has not.
pub fn own_certificate_ready<T: LiveTls>(reloader: &Reloader<T>) -> Result<u64, NotReady> {
    let leaf = reloader.live().leaf();
    match leaf.remaining(SystemTime::now()).as_secs() {
        0 => Err(NotReady::CertificateExpired {
            subject: leaf.subject.clone(),
        }),
        left => Ok(left),
    }
}
