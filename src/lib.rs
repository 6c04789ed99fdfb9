//! homelab-deploy: a NATS-driven build service for a homelab's NixOS flakes.
//!
//! The builder daemon ([`builder`]) takes requests on `build.<repo>.<target>`
//! ([`protocol`]), builds each host with Nix ([`nix`]) one after the other,
//! and streams events back; the client ([`client`]) and the CLI ([`cli`])
//! drive it; [`metrics`] exports what operators watch.

#![forbid(unsafe_code)]

pub mod builder;
pub mod cli;
pub mod client;
pub mod config;
pub mod mcp;
pub mod metrics;
pub mod nats;
pub mod nix;
pub mod protocol;
pub mod systemd;
