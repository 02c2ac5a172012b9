//! The SMTP server side (RFC 5321, with RFC 1869 EHLO, 1870 SIZE, 2034 and
//! 3463 enhanced status codes, 2920 PIPELINING, 6152 8BITMIME, 6531 SMTPUTF8).
//!
//! - `command`: one line in, a borrowed `Command` out (zero allocation).
//! - `reply`: every reply's code, enhanced code and text.
//! - `session`: the sans-IO state machine (see its diagram).
//! - `data`: the DATA decoder (dot-unstuffing, strict CRLF, limits).
//! - `message`: what a finished transaction hands to delivery.
//! - `conn`: the blocking driver that ties them to a socket.

pub mod command;
pub mod conn;
pub mod data;
pub mod message;
pub mod reply;
pub mod sasl;
pub mod session;
