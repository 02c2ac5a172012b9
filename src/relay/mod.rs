//! The relay thread: owns outbound delivery of queued messages.
//!
//! One thread (STYLE habit 8) keeps every queued envelope in memory and
//! sleeps on `recv_timeout(next_due)`. It is fed over a crossbeam channel:
//! sessions send the id of each newly committed message, start-up sends every
//! committed entry, and the queue tools ask it to flush or delete. For each
//! due message it groups the unfinished recipients by destination (the
//! smarthost, or each domain's MX hosts), delivers with the blocking SMTP
//! client, records every recipient's result in the envelope with the
//! durable-write pattern (so a crash never re-sends to a recipient already
//! done nor forgets one), then sends bounces and delay notices.
//!
//! Submodules: `schedule` (when), `route` (where), `dns`, `client` and
//! `reply` (sans-IO SMTP), `transfer` (the socket driver), `bounce` and
//! `rewrite` (message text).

pub mod bounce;
pub mod client;
pub mod dns;
pub mod dotstuff;
pub mod reply;
pub mod rewrite;
pub mod route;
pub mod schedule;
#[doc(hidden)]
pub mod test_smtp;
pub mod transfer;

mod attempt;
mod worker;

pub use worker::{spawn, Request};
