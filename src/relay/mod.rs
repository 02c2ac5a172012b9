//! The relay thread: owns outbound delivery of queued messages.
//!
//! It is fed queue ids over a crossbeam channel by sessions (after a commit)
//! and by startup (every committed entry). Outbound delivery — DNS MX,
//! smarthost, TLS, retries and bounces — is not built yet; until it is, this
//! thread records each id it is given and leaves the message safely in the
//! queue, where the next version will find it.

use std::thread::{self, JoinHandle};

use crossbeam_channel::Receiver;
use log::info;

/// Starts the relay thread; it ends when every sender of `ids` is dropped.
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

pub fn spawn(ids: Receiver<String>) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name("relay".into()).spawn(move || {
        for id in ids {
            info!("id={id} status=queued relay=unavailable: outbound delivery is not built yet; the message stays in the queue");
        }
    })
}
