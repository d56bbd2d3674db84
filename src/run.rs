//! Running one side until a signal: start-up checks, serving, and draining on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use phoenix_mesh_client::{ClientSettings, ClientSide};
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::settings::SideSettings;
use phoenix_mesh_common::sidecar::{Side, Sidecar, StartError};
use phoenix_mesh_server::{ListenerSide, ServerSettings};
use phoenix_mesh_transport::serve::{Shutdown, ShutdownWatch};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// A command with its config read and validated, ready for a runtime.
pub enum Prepared {
    Client(ClientSettings),
    Server(ServerSettings),
    CheckClient(PathBuf, crate::CheckArgs),
    CheckServer(PathBuf, crate::CheckArgs),
    Demo { once: bool },
}

/// Reads the sidecars' config before the runtime starts (its size is a setting).
pub fn prepare(command: crate::Command) -> Result<Prepared, Failure> {
    Ok(match command {
        crate::Command::Client { config, check } if check.check => {
            Prepared::CheckClient(config, check)
        }
        crate::Command::Server { config, check } if check.check => {
            Prepared::CheckServer(config, check)
        }
        crate::Command::Client { config, .. } => {
            Prepared::Client(ClientSettings::load(&config).map_err(|e| Failure::Config(e.into()))?)
        }
        crate::Command::Server { config, .. } => {
            Prepared::Server(ServerSettings::load(&config).map_err(|e| Failure::Config(e.into()))?)
        }
        crate::Command::Demo { once } => Prepared::Demo { once },
    })
}

impl Prepared {
    /// Worker threads for the runtime: the config's `worker_threads` for a sidecar, one otherwise.
    pub fn worker_threads(&self) -> usize {
        match self {
            Prepared::Client(s) => s.shared.worker_threads,
            Prepared::Server(s) => s.shared.worker_threads,
            Prepared::CheckClient(..) | Prepared::CheckServer(..) | Prepared::Demo { .. } => 1,
        }
    }

    /// Runs to the end.
    pub async fn run(self) -> Result<(), Failure> {
        match self {
            Prepared::Client(settings) => sidecar::<ClientSide>(settings).await,
            Prepared::Server(settings) => sidecar::<ListenerSide>(settings).await,
            Prepared::CheckClient(config, check) => check_side::<ClientSide>(&config, check).await,
            Prepared::CheckServer(config, check) => {
                check_side::<ListenerSide>(&config, check).await
            }
            Prepared::Demo { once } => crate::demo::run(once).await.map_err(Failure::Runtime),
        }
    }
}

/// One thread runs everything on it (no cross-thread wake-ups per request, as linkerd2-proxy does
/// by default); more threads spread handshakes and requests over cores.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            builder.worker_threads(worker_threads);
        }
        builder.enable_all().build()
    }
}

/// How a run ended badly: a start-up problem with config or certificates, or anything else.
#[derive(Debug)]
pub enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
    /// `--check` found a broken step (the report is already printed).
    CheckFailed,
}

/// `--check` for side `S`: the config alone with `--config-only`, else every hop live.
async fn check_side<S: Side>(config: &Path, check: crate::CheckArgs) -> Result<(), Failure> {
    let settings = S::Settings::load(config).map_err(|e| Failure::Config(e.into()))?;
    if check.config_only {
        println!(
            "[ OK ] config {}: valid {} configuration",
            config.display(),
            S::COMMAND
        );
        return Ok(());
    }
    let request = CheckRequest {
        host: check.host,
        path: check.path,
    };
    report(S::check(&settings, &request).await)
}

fn report(report: Report) -> Result<(), Failure> {
    print!("{}", report.render());
    if report.passed() {
        Ok(())
    } else {
        Err(Failure::CheckFailed)
    }
}

/// Runs side `S` until a signal: binds (a config or certificate problem is a [`Failure::Config`], a
/// socket that cannot be bound a [`Failure::Runtime`]), then serves, reloading on SIGHUP.
async fn sidecar<S: Side>(settings: S::Settings) -> Result<(), Failure> {
    let drain = settings.shared().drain_timeout;
    let sidecar = Sidecar::<S>::bind(settings).await.map_err(|e| match e {
        StartError::Bind { .. } => Failure::Runtime(e.into()),
        other => Failure::Config(other.into()),
    })?;
    let reload = sidecar.settings_reload();
    serve_until_signal(
        drain,
        move || {
            // The reload logs its own failure, and a failed reload changes nothing.
            let _ = reload.reload();
        },
        |watch| sidecar.serve(watch),
    )
    .await
}

/// Serves until SIGTERM or SIGINT, then stops accepting and waits up to `drain` for open connections.
/// SIGHUP calls `on_hup` (re-read the config and reload certificates) and serving goes on.
async fn serve_until_signal<H, F, Fut>(drain: Duration, on_hup: H, serve: F) -> Result<(), Failure>
where
    H: Fn() + Send + Sync + 'static,
    F: FnOnce(ShutdownWatch) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut term = signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")
        .map_err(Failure::Runtime)?;
    let mut int = signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")
        .map_err(Failure::Runtime)?;
    let mut hup = signal(SignalKind::hangup())
        .context("installing the SIGHUP handler")
        .map_err(Failure::Runtime)?;
    let (shutdown, watch) = Shutdown::new();
    let accept = tokio::spawn(serve(watch));
    notify(&[sd_notify::NotifyState::Ready]);
    // WATCHDOG_USEC=0 is not something systemd sends, and `interval` panics on a zero period.
    if let Some(period) = sd_notify::watchdog_enabled().filter(|p| !p.is_zero()) {
        tokio::spawn(feed_watchdog(period));
    }
    let on_hup = std::sync::Arc::new(on_hup);
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config file and certificates");
                let mut states = vec![sd_notify::NotifyState::Reloading];
                states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                notify(&states);
                let on_hup = on_hup.clone();
                // File reads and config parsing stay off the async workers.
                let _ = tokio::task::spawn_blocking(move || on_hup()).await;
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    };
    info!(
        signal = which,
        drain_timeout_s = drain.as_secs(),
        "stopping: no new connections, draining requests in flight"
    );
    notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.begin();
    let _ = accept.await;
    if tokio::time::timeout(drain, shutdown.drained())
        .await
        .is_err()
    {
        warn!(
            open = shutdown.watchers(),
            "drain timeout reached; closing the remaining connections"
        );
    } else {
        info!("drained; exiting");
    }
    Ok(())
}

/// With `WatchdogSec=` in the unit, systemd restarts a sidecar that stops pinging it. The pings come
/// from a task on the runtime that carries the traffic, so they stop when that runtime stops polling
/// its tasks (with the default single runtime thread: a blocking call or a busy loop on it), not only
/// when the process dies; every half period, as sd_watchdog_enabled(3) advises.
async fn feed_watchdog(period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// Tells systemd (Type=notify) about our state; does nothing outside systemd (no NOTIFY_SOCKET).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "sd_notify failed");
    }
}
