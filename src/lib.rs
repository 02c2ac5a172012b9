//! postling: a small, crash-safe SMTP server for home routers and small boxes.
//!
//! Receives mail over SMTP, delivers local mail into Maildirs and keeps mail
//! for elsewhere in a durable queue. The binary (`main.rs`) is a thin shell
//! over `server::Server`; see README.md for the user's view and the module
//! docs for who owns what.

#![forbid(unsafe_code)]

pub mod aliases;
pub mod auth;
pub mod check;
pub mod config;
pub mod control;
pub mod date;
pub mod deliver;
pub mod limiter;
pub mod listener;
pub mod local;
pub mod maildrop;
pub mod notify;
pub mod pool;
pub mod queue_cli;
pub mod relay;
pub mod sendmail;
pub mod server;
pub mod smtp;
pub mod store;
pub mod tls;
pub mod wait;
