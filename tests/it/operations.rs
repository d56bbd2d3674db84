//! Running the sidecars as an operator does, mostly through the real binary: start-up and its
//! refusals (`startup`), `--check` (`check`), the admin endpoint and its metrics (`admin`), `/certs`
//! (`certs`), the Prometheus alert rules and scrape example of deploy/prometheus (`alerts`), the
//! access log and log lines on a pipe or the journal (`logs`), and life under systemd: notify,
//! watchdog, SIGTERM's drain (`service`); planned restarts of a listener under load (`restarts`); the
//! demo's `--check` commands and its clean-up (`demo`).

mod admin;
mod alerts;
mod certs;
mod check;
mod demo;
mod logs;
mod restarts;
mod service;
mod startup;
