//! homelab-deploy: a NATS-driven build service for a homelab's NixOS flakes.
//!
//! The builder daemon ([`builder`]) takes requests on `build.<repo>.<target>`
//! ([`protocol`]), builds a request's hosts with Nix ([`nix`]) in order
//! (up to `parallel_hosts` at once, one by default), and streams events
//! back; the client ([`client`]) and the CLI ([`cli`])
//! drive it; [`metrics`] exports what operators watch; [`redact`] keeps
//! credentials out of everything sent and logged; [`printable`] keeps
//! terminal control sequences from the wire out of what people are shown.

#![forbid(unsafe_code)]

mod atomic_file;
pub(crate) mod builder;
pub mod changes;
pub mod cli;
pub(crate) mod client;
pub(crate) mod config;
pub mod history;
pub(crate) mod mcp;
pub(crate) mod metrics;
pub mod nats;
pub mod nix;
pub(crate) mod present;
pub(crate) mod printable;
pub mod protocol;
pub(crate) mod redact;
pub(crate) mod signing;
mod sync;
pub(crate) mod systemd;
pub(crate) mod text;
pub mod web;

/// How long the builder takes at most to stop after SIGTERM: it cancels the
/// running build, answers the waiting requests and delivers every event
/// within it. The NixOS module gives its unit twice as long before SIGKILL
/// (nix/defaults.nix holds the same number, `check-config --print-defaults`
/// prints it).
pub const SHUTDOWN_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);
