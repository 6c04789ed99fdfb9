//! The builder's web pages and read-only JSON API, served on its HTTP
//! listener beside `/metrics` when `[web] enabled` (docs/web.md).

pub mod badge;
pub mod chart;
mod html;
pub mod pages;
