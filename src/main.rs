//! `phoenix-mesh`: the client sidecar, the mesh listener and a self-contained demo in one binary.

mod demo;
mod logging;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mTLS sidecars that carry HTTP from the nginx gateway (LXC 101) to Traefik (LXC 102).
#[derive(Debug, Parser)]
#[command(name = "phoenix-mesh", version, about, propagate_version = true)]
struct Cli {
    /// Log line format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The client sidecar beside nginx: plain HTTP on loopback in, mutual TLS to the mesh listener out.
    Client {
        /// TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// The mesh listener beside Traefik: mutual TLS in, plain HTTP to Traefik on loopback out.
    Server {
        /// TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// The whole hop on a throwaway PKI and free loopback ports: backend, listener and client.
    Demo {
        /// Exit 0 after the first round trip succeeds (non-zero if it fails) instead of running on.
        #[arg(long)]
        once: bool,
    },
}

/// `--check` and its options.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Validate the config and certificates, probe every hop live, print one line per step, and exit
    /// 0 only if everything works (instead of running).
    #[arg(long)]
    check: bool,
    /// With --check: only parse and validate the config file (no certificates, no network).
    #[arg(long, requires = "check")]
    config_only: bool,
    /// With --check: the Host header of the probe request.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "localhost",
        requires = "check"
    )]
    host: String,
    /// With --check: the path of the probe request.
    #[arg(long, value_name = "P", default_value = "/", requires = "check")]
    path: String,
}

/// Config or certificate problems found at start-up (sysexits EX_CONFIG), so systemd can be told not
/// to restart into the same mistake.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    raise_fd_limit();
    // The sidecars' settings are read before the runtime exists: they say how many threads it gets.
    let command = match run::prepare(cli.command) {
        Ok(command) => command,
        Err(failure) => return exit(failure),
    };
    let runtime = match run::runtime(command.worker_threads()) {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("phoenix-mesh: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command.run());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => exit(failure),
    }
}

fn exit(failure: run::Failure) -> ExitCode {
    match failure {
        run::Failure::CheckFailed => ExitCode::FAILURE,
        run::Failure::Config(error) => {
            // One line on stderr, whatever RUST_LOG says: the operator must see why it did not start.
            eprintln!("phoenix-mesh: {error:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        run::Failure::Runtime(error) => {
            eprintln!("phoenix-mesh: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the open-file soft limit to the hard limit: each connection costs a descriptor (two on the
/// listener: client and backend), and the default soft limit of 1024 is far below what systemd allows.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised to the hard limit"),
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit; keeping the current one")
        }
    }
}
