//! Shared helpers for the integration tests: a real nats-server on a free
//! loopback port, the real builder binary, offline fixture flakes built by
//! the real `nix`, a real headless browser for the web pages, and waiting
//! with deadlines instead of sleeping. Each module is one concern; tests
//! import what they use by name.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod builder;
pub mod cli;
pub mod flake;
pub mod flood;
pub mod identity;
pub mod nats;
pub mod net;
pub mod nix;
pub mod notify;
pub mod process;
pub mod remote;
pub mod replies;
pub mod requester;
pub mod wait;
pub mod web;
