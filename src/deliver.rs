//! Final disposition of one received message, before the `250` is sent.
//!
//! Takes the spooled message (already holding the `Received:` field and the
//! body) and makes every recipient's copy durable: one Maildir file per
//! distinct local mailbox (with `Return-Path:` and `Delivered-To:`, RFC 5321
//! 4.4, RFC 9228), then, if any recipient is remote, the spool is committed to
//! the queue with its envelope and the relay thread is told its id. Only
//! when all of that succeeded does the caller reply 250; on any error the
//! spool is removed (Maildir copies already made stay: a retry by the client
//! may duplicate them, but nothing acknowledged is ever lost).
//!
//! It does not parse SMTP or decide who is local: the session did that.

use std::io::{self, Seek, SeekFrom};
use std::path::Path;

use log::{info, warn};

use crate::server::Context;
use crate::smtp::conn::unix_now;
use crate::smtp::message::Message;
use crate::store::envelope::Envelope;
use crate::store::maildir;
use crate::store::queue::Spool;

/// Delivers local copies and queues remote recipients; Ok means durable.
pub fn store(message: &Message, spool: Spool, size: u64, ctx: &Context) -> io::Result<()> {
    let client = format!(
        "[{}] helo={} session={}",
        message.peer, message.helo, message.session
    );
    store_with_client(message, spool, size, ctx, &client)
}

/// `store`, with the envelope's informational `client` field given.
pub fn store_with_client(
    message: &Message,
    mut spool: Spool,
    size: u64,
    ctx: &Context,
    client: &str,
) -> io::Result<()> {
    let id = spool.id().to_string();
    spool.sync()?;
    let config = ctx.config();
    let local = &config.local;
    let sender = &message.sender;
    let copies = message.mailboxes();
    // Find a broken mailbox before writing any copy, so the 451 that
    // follows does not leave the others with a copy each retry duplicates.
    for copy in &copies {
        maildir::prepare(copy.dir, within(copy.dir, &local.maildir_root))?;
    }
    for copy in copies {
        let header = format!(
            "Return-Path: <{sender}>\r\nDelivered-To: {}\r\n",
            copy.delivered_to
        );
        let file = spool.file();
        file.seek(SeekFrom::Start(0))?;
        let path = maildir::deliver_prepared(copy.dir, &config.hostname, header.as_bytes(), file)?;
        info!(
            "id={id} from=<{sender}> to=<{}> size={size} status=delivered maildir={}",
            copy.delivered_to,
            path.display()
        );
    }
    let remote = message.remote();
    if remote.is_empty() {
        // Every copy is durable: a spool we cannot remove is swept at the
        // next start, and must not turn a delivered message into a 451.
        if let Err(e) = spool.discard() {
            warn!("id={id} cannot remove the spool: {e}");
        }
        return Ok(());
    }
    let envelope = Envelope::new(&id, unix_now(), sender, client.to_string(), &remote);
    if let Err(e) = spool.commit(&envelope) {
        // If the rename happened, the entry is committed (only a later
        // fsync failed): the relay must still hear of it, though the
        // client is told to retry.
        if ctx.queue.load(&id).is_ok() {
            let _ = ctx.relay.send(crate::relay::Request::Queued(id));
        }
        return Err(e);
    }
    for to in &remote {
        info!("id={id} from=<{sender}> to=<{to}> size={size} status=queued");
    }
    // The relay thread picks up everything in the queue at start too, so a
    // closed channel (shutting down) loses nothing.
    let _ = ctx.relay.send(crate::relay::Request::Queued(id));
    Ok(())
}

/// The Maildir root to confine symlink checks to, when `dir` is under it.
fn within<'a>(dir: &Path, root: &'a Path) -> Option<&'a Path> {
    dir.starts_with(root).then_some(root)
}
