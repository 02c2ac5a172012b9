//! Where one received message goes, and its final disposition before the
//! `250` is sent.
//!
//! [`open`] picks the file the message is written to as it arrives: for
//! mail whose recipients are all local, the first mailbox's Maildir `tmp/`
//! (the message is written once, as qmail's local delivery does); otherwise
//! the queue's spool. [`store`] then makes every recipient's copy durable:
//! one Maildir file per distinct local mailbox (with `Return-Path:` and
//! `Delivered-To:`, RFC 5321 4.4, RFC 9228), then, if any recipient is
//! remote, the spool is committed to the queue with its envelope and the
//! relay thread is told its id. Only when all of that succeeded does the
//! caller reply 250; on any error the unfinished files are removed. Every
//! copy is written and fsynced in its `tmp/` before any is renamed into
//! `new/`, so a mailbox that cannot take the message (a full disk, a quota)
//! leaves no copy anywhere; only a failure after that point (a rename, a
//! directory fsync, the queue's commit) leaves the copies already renamed,
//! which a retry by the client may duplicate. Nothing acknowledged is ever
//! lost.
//!
//! It does not parse SMTP or decide who is local: the session did that.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use log::{error, info, warn};

use crate::config::Config;
use crate::local::Target;
use crate::server::Context;
use crate::smtp::conn::unix_now;
use crate::smtp::message::{MailboxCopy, Message, Recipient};
use crate::store::envelope::Envelope;
use crate::store::maildir::{self, Draft, Synced};
use crate::store::new_id;
use crate::store::queue::Spool;

/// Where a message is written while it is received, with what [`open`]
/// worked out for [`store`]: the config snapshot, the local copies and the
/// remote recipients.
#[derive(Debug)]
pub struct Sink<'m> {
    id: String,
    config: Arc<Config>,
    copies: Vec<MailboxCopy<'m>>,
    remote: Vec<&'m str>,
    file: SinkFile,
}

#[derive(Debug)]
enum SinkFile {
    /// Some recipient is remote: the queue's spool, `incoming/<id>`.
    Queue(Spool),
    /// Every recipient is local: straight into the first mailbox's `tmp/`,
    /// after that mailbox's `Return-Path:` and `Delivered-To:`, so a local
    /// message is written once and no spool file is made and removed.
    Maildir(Draft),
}

impl Sink<'_> {
    /// The message id, for the `Received:` field and the logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file the message (from its `Received:` field on) is written to.
    pub fn file(&mut self) -> &mut File {
        match &mut self.file {
            SinkFile::Queue(spool) => spool.file(),
            SinkFile::Maildir(draft) => draft.file(),
        }
    }
}

/// Opens the sink for `message` before its data arrives. Every local
/// mailbox is checked (and created) first, so a broken one refuses the
/// transaction before the client sends the body.
pub fn open<'m>(message: &'m Message, ctx: &Context) -> io::Result<Sink<'m>> {
    let client = format!(
        "[{}] helo={} session={}",
        message.peer, message.helo, message.session
    );
    open_with_client(message, ctx, &client)
}

/// [`open`], with the queue envelope's informational `client` field given.
pub fn open_with_client<'m>(
    message: &'m Message,
    ctx: &Context,
    client: &str,
) -> io::Result<Sink<'m>> {
    let config = ctx.config();
    let copies = message.mailboxes();
    let remote = message.remote();
    let several = copies.len() + usize::from(!remote.is_empty()) > 1;
    for copy in &copies {
        maildir::prepare(
            copy.dir,
            within(copy.dir, &config.local.maildir_root),
            config.local.sharing,
        )?;
        if several {
            maildir::check_writable(copy.dir)?;
        }
    }
    let (id, file) = match copies.first() {
        Some(first) if remote.is_empty() => {
            let header = trace_header(&message.sender, &first.delivered_to);
            let draft = Draft::create(
                first.dir,
                &config.hostname,
                header.as_bytes(),
                config.local.sharing,
            )?;
            (new_id(), SinkFile::Maildir(draft))
        }
        _ => {
            let spool = ctx.queue.begin(|id| {
                Envelope::new(id, unix_now(), &message.sender, client.to_string(), &remote)
            })?;
            (spool.id().to_string(), SinkFile::Queue(spool))
        }
    };
    Ok(Sink {
        id,
        config,
        copies,
        remote,
        file,
    })
}

/// The fields a Maildir copy starts with (RFC 5321 4.4, RFC 9228).
fn trace_header(sender: &str, delivered_to: &str) -> String {
    format!("Return-Path: <{sender}>\r\nDelivered-To: {delivered_to}\r\n")
}

/// One more Maildir copy, written from `body` (the message as received,
/// positioned at its start) after the copy's own trace fields, and
/// fsynced in the mailbox's `tmp/`.
fn copy_into(
    copy: &MailboxCopy<'_>,
    sender: &str,
    config: &Config,
    body: io::Result<&mut File>,
) -> io::Result<Synced> {
    let header = trace_header(sender, &copy.delivered_to);
    maildir::copy_prepared(
        copy.dir,
        &config.hostname,
        header.as_bytes(),
        body?,
        config.local.sharing,
    )
}

/// A [`store`] that failed part way: why, and how many copies were
/// already durable when it did (a Maildir file each, or the queue entry).
#[derive(Debug)]
pub struct Unfinished {
    pub error: io::Error,
    pub stored: usize,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} copies stored before)", self.error, self.stored)
    }
}

/// Delivers local copies and queues remote recipients; Ok means durable.
pub fn store(
    message: &Message,
    sink: Sink<'_>,
    size: u64,
    ctx: &Context,
) -> Result<(), Unfinished> {
    let Sink {
        id,
        config,
        copies,
        remote,
        file,
    } = sink;
    let sender = &message.sender;
    let mut stored = 0;
    let unfinished = |stored| move |error| Unfinished { error, stored };
    let mut copies = copies.into_iter();
    // Every copy is written and fsynced before any is renamed into `new/`:
    // a mailbox that cannot take its copy (a full disk, a quota) then
    // leaves none visible, and the client's retry duplicates nothing.
    let (spool, ready) = match file {
        SinkFile::Maildir(mut draft) => {
            // `open` made the draft in the first mailbox; the others are
            // copied from it.
            let Some(first) = copies.next() else {
                return Ok(());
            };
            let mut ready = Vec::new();
            for copy in copies {
                let synced =
                    copy_into(&copy, sender, &config, draft.body()).map_err(unfinished(0))?;
                ready.push((copy, synced));
            }
            if ready.is_empty() {
                let path = draft.publish().map_err(unfinished(0))?;
                log_delivered(&id, sender, &first.delivered_to, size, &path);
                return Ok(());
            }
            ready.insert(0, (first, draft.sync().map_err(unfinished(0))?));
            (None, ready)
        }
        SinkFile::Queue(mut spool) => {
            let ready = copies
                .map(|copy| {
                    let synced = copy_into(&copy, sender, &config, spool.rewound())?;
                    Ok((copy, synced))
                })
                .collect::<io::Result<Vec<_>>>()
                .map_err(unfinished(0))?;
            if !ready.is_empty() && !remote.is_empty() {
                spool.sync().map_err(unfinished(0))?;
            }
            (Some(spool), ready)
        }
    };
    for (copy, synced) in ready {
        let path = synced.publish().map_err(unfinished(stored))?;
        stored += 1;
        log_delivered(&id, sender, &copy.delivered_to, size, &path);
    }
    let Some(spool) = spool else {
        return Ok(());
    };
    if remote.is_empty() {
        // Only for a message without recipients (`open` writes local-only
        // mail straight into a Maildir). A spool we cannot remove is swept
        // at the next start, and must not turn this into a 451.
        if let Err(e) = spool.discard() {
            warn!("id={id} cannot remove the spool: {e}");
        }
        return Ok(());
    }
    if let Err(e) = spool.commit() {
        // If the rename happened, the entry is committed (only a later
        // fsync failed): the relay must still hear of it, though the
        // client is told to retry.
        if ctx.queue.load(&id).is_ok() {
            let _ = ctx.relay.send(crate::relay::Request::Queued(id));
            stored += 1;
        }
        return Err(unfinished(stored)(e));
    }
    for to in &remote {
        info!("id={id} from=<{sender}> to=<{to}> size={size} status=queued");
    }
    // The relay thread picks up everything in the queue at start too, so a
    // closed channel (shutting down) loses nothing.
    let _ = ctx.relay.send(crate::relay::Request::Queued(id));
    Ok(())
}

fn log_delivered(id: &str, sender: &str, to: &str, size: u64, path: &Path) {
    info!(
        "id={id} from=<{sender}> to=<{to}> size={size} status=delivered maildir={}",
        path.display()
    );
}

/// The Maildir root to confine symlink checks to, when `dir` is under it.
fn within<'a>(dir: &Path, root: &'a Path) -> Option<&'a Path> {
    dir.starts_with(root).then_some(root)
}

/// Stores a locally generated message from `<>` (a bounce, a delay notice)
/// for `to` the way an inbound one is stored: Maildir for a local user (or
/// the postmaster, when `to` has no mailbox), the queue otherwise. `client`
/// names the generator in the envelope and the `Received:` line. Returns
/// the new message's id.
pub fn inject(ctx: &Context, to: &str, text: &[u8], client: &str) -> io::Result<String> {
    let config = ctx.config();
    let local = &config.local;
    let (local_part, domain) = to.rsplit_once('@').unwrap_or((to, "localhost"));
    let targets = if local.is_local_domain(domain) {
        local
            .resolve(local_part, domain)
            .or_else(|_| local.resolve("postmaster", domain))
            .map_err(|e| io::Error::other(format!("no local mailbox for <{to}>: {e:?}")))?
    } else {
        vec![Target::Remote(to.to_string())]
    };
    let message = Message {
        session: client.to_string(),
        sender: String::new(),
        recipients: vec![Recipient {
            address: to.to_string(),
            targets,
        }],
        helo: config.hostname.clone(),
        peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        protocol: "local",
        tls: None,
        local_user: None,
    };
    let mut sink = open_with_client(&message, ctx, client)?;
    let id = sink.id().to_string();
    sink.file().write_all(text)?;
    match store(&message, sink, text.len() as u64, ctx) {
        Ok(()) => Ok(id),
        // Stored somewhere: the notice is out, and storing it again at
        // the next attempt would only add copies where it already is.
        Err(partly) if partly.stored > 0 => {
            error!("notice={id} to=<{to}> not stored in every mailbox: {partly}");
            Ok(id)
        }
        Err(partly) => Err(partly.error),
    }
}
