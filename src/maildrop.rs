//! The maildrop: where `sendmail` leaves a message while the daemon is not
//! running, and the daemon's pickup, which submits what it finds there.
//!
//! `<data_dir>/maildrop/` is made by the daemon at start, owned by its
//! user, mode 1733 (as Postfix's maildrop was before postdrop): any user
//! may create a file in it, nobody but the daemon may list it or remove
//! another's file. sendmail creates its file mode 0600 under a random
//! name, writes and fsyncs it, and only then makes it readable (0644) and
//! fsyncs again: a file that is readable by others is complete, and the
//! pickup takes no other. The name cannot be guessed and the directory
//! cannot be listed, so no other user finds the file to read it.
//!
//! The file is a text envelope, then the message as it is sent after
//! `DATA` (CRLF, dot-stuffed, the final dot included):
//!
//! ```text
//! postling-maildrop 1
//! sender <alice@pi.lan>
//! utf8                      (only when SMTPUTF8 is needed)
//! rcpt <bob@example.net>
//! end
//! ```
//!
//! Nothing in the file is trusted. The identity is the file's owner, as
//! SO_PEERCRED is a socket client's: the pickup runs the message through a
//! local session on a socket pair, with the checks and the slot limits a
//! sendmail connection of that user gets. Its envelope sender is always
//! the owner's own address, root's and `trusted_users`' too: a file root
//! wrote in a directory another user controls could be renamed in here,
//! so ownership does not prove who asked for a sender. A recipient refused
//! for good gets the owner a bounce (a notice that cannot be stored keeps
//! the file for the next pass); a temporary failure leaves the file for
//! the next pass, which sends only to the recipients not done yet (kept in
//! memory: after a restart, a recipient may get a second copy, never
//! none), until the file is `relay.max_queue_time` old and the rest
//! bounce. A message over `max_message_size` bounces without being read.
//! Only names sendmail gives (32 hex digits) are taken; anything else, a
//! file that is not regular, has another link or is malformed is removed
//! with a log line; one never made readable (its sendmail was killed) is
//! removed after a day. A user at its session cap waits; the others'
//! files go on.
//!
//! The daemon looks at start and then every [`EVERY`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};

use crate::relay::bounce::{self, Entry, Kind};
use crate::relay::reply::ServerReply;
use crate::sendmail::{is_valid_address, transaction, Conn, Outgoing};
use crate::server::Context;
use crate::store::envelope::Envelope;

/// The directory's name under `data_dir`.
pub const DIR: &str = "maildrop";
/// World-writable with the sticky bit, not listable by others.
const DIR_MODE: u32 = 0o1733;
/// How often the daemon looks again after its look at start.
pub const EVERY: Duration = Duration::from_secs(60);
/// A file never made readable is removed after this long.
const ABANDONED: Duration = Duration::from_secs(24 * 3600);
/// The first line of a maildrop file of this version.
const MAGIC: &str = "postling-maildrop 1";
/// The envelope's most bytes (sendmail's header limit bounds `-t`).
const MAX_ENVELOPE: u64 = 4 << 20;
/// How long the pickup waits for its session's next reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The `client` of the bounces the pickup sends.
const BOUNCE_CLIENT: &str = "postling maildrop";

/// Makes `<data_dir>/maildrop` (the daemon, at start): a real directory,
/// owned by this process's user, mode 1733.
pub fn prepare(data_dir: &Path) -> io::Result<PathBuf> {
    let dir = data_dir.join(DIR);
    crate::store::create_dir_durable(&dir)?;
    let meta = fs::symlink_metadata(&dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: owned by uid {}, not by this process's user (uid {me}); \
                 chown it to the user postling runs as",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o7777 != DIR_MODE {
        fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------
// sendmail's side.

/// Leaves `msg` for `rcpts` in the maildrop of `data_dir`; the path of the
/// new file, or None when there is no maildrop (no daemon ever ran here).
pub(crate) fn write(
    data_dir: &Path,
    msg: &mut Outgoing<'_>,
    rcpts: &[String],
) -> io::Result<Option<PathBuf>> {
    let dir = data_dir.join(DIR);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let head = envelope(msg.sender, msg.utf8, rcpts);
    if head.len() as u64 > MAX_ENVELOPE {
        return Err(io::Error::other("too many recipients for the maildrop"));
    }
    let path = dir.join(random_name()?);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let written = (|| {
        file.write_all(head.as_bytes())?;
        msg.copy_to(&mut file)?;
        file.sync_all()?;
        // Readable: complete. The pickup takes no file before this.
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    // Only the daemon's user and root may open the directory to sync it;
    // for anyone else the file's own fsync has to do (on ext4 it commits
    // the file's creation with it).
    let _ = crate::store::sync_dir(&dir);
    Ok(Some(path))
}

/// 32 hex digits from the system's random source.
fn random_name() -> io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io::Error::other("no random numbers"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn envelope(sender: &str, utf8: bool, rcpts: &[String]) -> String {
    let mut s = format!("{MAGIC}\nsender <{sender}>\n");
    if utf8 {
        s.push_str("utf8\n");
    }
    for r in rcpts {
        s.push_str(&format!("rcpt <{r}>\n"));
    }
    s.push_str("end\n");
    s
}

/// A maildrop file's envelope, read back.
#[derive(Debug, PartialEq, Eq)]
struct Dropped {
    sender: String,
    utf8: bool,
    rcpts: Vec<String>,
    /// Where the message starts in the file.
    start: u64,
}

/// Why a file is not taken.
#[derive(Debug, PartialEq, Eq)]
enum Unreadable {
    /// The first line names a version this build does not know: left for
    /// the build that wrote it.
    Version(String),
    /// Not an envelope sendmail writes.
    Malformed(String),
}

fn parse(input: &mut impl BufRead) -> Result<Dropped, Unreadable> {
    let bad = |why: &str| Unreadable::Malformed(why.to_string());
    let mut input = input.take(MAX_ENVELOPE);
    let mut line = Vec::new();
    let mut next = |line: &mut Vec<u8>| -> Result<String, Unreadable> {
        line.clear();
        match input.read_until(b'\n', line) {
            Ok(_) if line.pop() == Some(b'\n') => {}
            Ok(_) => return Err(bad("the envelope has no end")),
            Err(e) => return Err(Unreadable::Malformed(e.to_string())),
        }
        String::from_utf8(std::mem::take(line)).map_err(|_| bad("not UTF-8"))
    };
    let first = next(&mut line)?;
    if first != MAGIC {
        return Err(match first.strip_prefix("postling-maildrop ") {
            Some(v) => Unreadable::Version(v.chars().take(20).collect()),
            None => bad("no postling-maildrop line"),
        });
    }
    let mut start = first.len() as u64 + 1;
    let mut sender = None;
    let mut utf8 = false;
    let mut rcpts = Vec::new();
    loop {
        let l = next(&mut line)?;
        start += l.len() as u64 + 1;
        let address = |prefix: &str| {
            l.strip_prefix(prefix)
                .and_then(|a| a.strip_prefix('<')?.strip_suffix('>'))
                .map(str::to_string)
        };
        if l == "end" {
            break;
        } else if l == "utf8" {
            utf8 = true;
        } else if let Some(a) = address("sender ") {
            if sender.is_some() || !(a.is_empty() || is_valid_address(&a)) {
                return Err(bad("a bad sender line"));
            }
            sender = Some(a);
        } else if let Some(a) = address("rcpt ") {
            if !is_valid_address(&a) {
                return Err(bad("a bad rcpt line"));
            }
            rcpts.push(a);
        } else {
            return Err(bad("an unknown line"));
        }
    }
    match sender {
        Some(sender) if !rcpts.is_empty() => Ok(Dropped {
            sender,
            utf8,
            rcpts,
            start,
        }),
        _ => Err(bad("no sender or no recipient")),
    }
}

// ---------------------------------------------------------------------------
// The daemon's side.

/// When to look at the maildrop (the acceptor's clock): at start, then
/// every [`EVERY`].
pub struct Watch {
    next: Instant,
}

impl Default for Watch {
    fn default() -> Watch {
        Watch {
            next: Instant::now(),
        }
    }
}

impl Watch {
    /// How long until the next look.
    pub fn wait(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// Whether a pass is due now (then the next one is [`EVERY`] away).
    pub fn due(&mut self) -> bool {
        if !self.wait().is_zero() {
            return false;
        }
        self.next = Instant::now() + EVERY;
        true
    }
}

/// What the pickup keeps between passes, in memory only: after a restart a
/// file is taken from its start again, so a recipient that had the message
/// may get it twice (a duplicate, never a loss).
#[derive(Default)]
pub struct Memory {
    /// The files left by an earlier pass (few: a Vec is enough).
    files: Vec<Known>,
}

/// A file (name, inode) an earlier pass left.
struct Known {
    key: (String, u64),
    /// The recipients done with (accepted, or refused and told of), so a
    /// file left after a temporary failure is not sent again to those.
    done: Vec<String>,
    /// Logged as left once; not again.
    warned: bool,
}

impl Memory {
    fn known(&mut self, key: &(String, u64)) -> &mut Known {
        let i = match self.files.iter().position(|k| &k.key == key) {
            Some(i) => i,
            None => {
                self.files.push(Known {
                    key: key.clone(),
                    done: Vec::new(),
                    warned: false,
                });
                self.files.len() - 1
            }
        };
        &mut self.files[i]
    }
}

/// A session for the owner of a maildrop file: the client's end of a
/// socket pair whose other end a local session serves as user `uid`; None
/// when the user has no free slot now.
pub type OpenSession<'a> = dyn FnMut(u32, &str) -> Option<UnixStream> + 'a;

/// What became of one file.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Submitted (refused recipients told) or thrown out: removed.
    Done,
    /// Left for a later pass.
    Left,
    /// Left: its user has no free session slot now; the pass skips that
    /// user's other files and goes on with the rest.
    Busy(u32),
}

/// One pass over the maildrop.
pub fn pass(ctx: &Context, data_dir: &Path, memory: &mut Memory, open: &mut OpenSession<'_>) {
    let dir = data_dir.join(DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!("maildrop: {}: {e}", dir.display());
            return;
        }
    };
    let mut seen = Vec::new();
    let mut busy = Vec::new();
    for entry in entries.flatten() {
        if ctx.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let path = entry.path();
        let Some(name) = entry
            .file_name()
            .to_str()
            .filter(|n| is_drop_name(n))
            .map(str::to_string)
        else {
            remove_foreign(&path);
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue; // gone already
        };
        seen.push((name.clone(), meta.ino()));
        if busy.contains(&meta.uid()) {
            continue;
        }
        if let Taken::Busy(uid) = take(ctx, memory, &path, &name, &meta, open) {
            busy.push(uid);
        }
    }
    memory.files.retain(|k| seen.contains(&k.key));
}

/// How many complete files sendmail left in `data_dir`'s maildrop (0 if
/// it cannot be read): what `mailq` shows.
pub fn count(data_dir: &Path) -> usize {
    fs::read_dir(data_dir.join(DIR)).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_drop_name))
            .filter(|e| {
                e.metadata()
                    .is_ok_and(|m| m.is_file() && m.mode() & 0o004 != 0)
            })
            .count()
    })
}

/// A name sendmail gives its files: 32 lower-case hex digits.
fn is_drop_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Anything else in the maildrop was not put there by sendmail.
fn remove_foreign(path: &Path) {
    let uid = fs::symlink_metadata(path).map_or(u32::MAX, |m| m.uid());
    match fs::remove_file(path) {
        Ok(()) => warn!("maildrop: {path:?} from uid={uid}: not a name sendmail gives; removed"),
        // A directory (or gone): it holds nothing the pickup would take.
        Err(_) => debug!("maildrop: {path:?} from uid={uid}: not a file sendmail writes; ignored"),
    }
}

fn take(
    ctx: &Context,
    memory: &mut Memory,
    path: &Path,
    name: &str,
    meta: &fs::Metadata,
    open: &mut OpenSession<'_>,
) -> Taken {
    let uid = meta.uid();
    let remove = |why: &str| {
        warn!("maildrop: {name} from uid={uid}: {why}; removed");
        if let Err(e) = fs::remove_file(path) {
            error!("maildrop: {name}: cannot remove it: {e}");
        }
        Taken::Done
    };
    if !meta.is_file() {
        return remove("not a regular file");
    }
    if meta.nlink() != 1 {
        return remove("a file with another link");
    }
    if meta.mode() & 0o004 == 0 {
        let age = meta.modified().ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > ABANDONED) {
            return remove("never finished (its sendmail was stopped)");
        }
        return Taken::Left;
    }
    let key = (name.to_string(), meta.ino());
    let mut left = |why: &str| {
        let known = memory.known(&key);
        if !std::mem::replace(&mut known.warned, true) {
            warn!("maildrop: {name} from uid={uid}: {why}; left for a later pass");
        }
        Taken::Left
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => return left(&e.to_string()),
    };
    // The file opened is the one looked at, still with one link.
    let end = match file.metadata() {
        Ok(m) if m.ino() == meta.ino() && m.uid() == uid && m.nlink() == 1 => m.len(),
        _ => return Taken::Left,
    };
    let dropped = match parse(&mut BufReader::new(&mut file)) {
        Ok(d) => d,
        Err(Unreadable::Version(v)) => {
            return left(&format!("version {v:?}, unknown to this build"))
        }
        Err(Unreadable::Malformed(why)) => return remove(&format!("not a maildrop file ({why})")),
    };
    // Only what is there now, and only if it ends as sendmail ends it: a
    // file still growing must not hold the pickup in DATA, nor add to it.
    if !ends_with_dot(&mut file, dropped.start, end) {
        return remove("not a maildrop file (the message does not end with a dot line)");
    }
    let done = &mut memory.known(&key).done;
    let todo: Vec<String> = dropped
        .rcpts
        .iter()
        .filter(|r| !done.contains(*r))
        .cloned()
        .collect();
    info!(
        "maildrop: {name} from uid={uid}: {} recipient(s) to go",
        todo.len()
    );
    let mut msg = Outgoing {
        sender: &dropped.sender,
        utf8: dropped.utf8,
        file: &mut file,
        start: dropped.start,
        end,
    };
    let mut failed = Vec::new();
    let outcome = submit(ctx, &mut msg, name, uid, &todo, done, &mut failed, open);
    // Recipients refused for good are done once the sender is told.
    if !failed.is_empty() {
        if !bounce(ctx, msg.file, name, uid, dropped.start, &failed) {
            return Taken::Left;
        }
        done.extend(failed.into_iter().map(|(rcpt, _)| rcpt));
    }
    match outcome {
        Taken::Done => {
            memory.files.retain(|k| k.key != key);
            if let Err(e) = fs::remove_file(path) {
                // Submitted: it stays known as done until it is gone.
                error!("maildrop: {name}: submitted, but cannot remove it: {e}");
            }
            Taken::Done
        }
        other => other,
    }
}

/// Whether the message from `start` to `end` ends with the line ".".
fn ends_with_dot(file: &mut File, start: u64, end: u64) -> bool {
    const TAIL: &[u8] = b"\r\n.\r\n";
    let mut tail = [0u8; TAIL.len()];
    end >= start + TAIL.len() as u64
        && file
            .seek(SeekFrom::Start(end - TAIL.len() as u64))
            .and_then(|_| file.read_exact(&mut tail))
            .is_ok()
        && tail == TAIL
}

/// Submits `msg` to `todo` as user `uid`, transaction by transaction as
/// sendmail does. Accepted recipients go into `done`, refused ones into
/// `failed` (with the reason); a file older than `relay.max_queue_time`
/// whose submission fails for now fails for good.
#[allow(clippy::too_many_arguments)]
fn submit(
    ctx: &Context,
    msg: &mut Outgoing<'_>,
    name: &str,
    uid: u32,
    todo: &[String],
    done: &mut Vec<String>,
    failed: &mut Vec<(String, String)>,
    open: &mut OpenSession<'_>,
) -> Taken {
    let config = ctx.config();
    let size = msg.end - msg.start;
    if size > config.limits.max_message_size {
        // Not streamed: a sparse file can claim any size.
        let why = format!(
            "552 5.3.4 Message size exceeds fixed maximum message size ({size} octets, the limit is {})",
            config.limits.max_message_size
        );
        failed.extend(todo.iter().map(|r| (r.clone(), why.clone())));
        return Taken::Done;
    }
    let mut todo = todo;
    while !todo.is_empty() {
        let Some(stream) = open(uid, name) else {
            return Taken::Busy(uid);
        };
        let why = match Conn::over(stream, Some(REPLY_TIMEOUT)) {
            Ok(conn) => {
                let mut all = None;
                let mut refused = Vec::new();
                let result =
                    transaction(conn, msg, todo, &mut |rcpt, r: &ServerReply| match rcpt {
                        Some(rcpt) => refused.push((rcpt.to_string(), r.one_line())),
                        None => all = Some(r.one_line()),
                    });
                match (result, all) {
                    (Ok((_, rest)), _) => {
                        let batch = &todo[..todo.len() - rest.len()];
                        done.extend(
                            batch
                                .iter()
                                .filter(|r| !refused.iter().any(|(f, _)| f == *r))
                                .cloned(),
                        );
                        failed.append(&mut refused);
                        todo = rest;
                        continue;
                    }
                    (Err(_), Some(why)) => {
                        // The sender or the message itself was refused:
                        // every recipient still to go fails with it.
                        failed.append(&mut refused);
                        for rcpt in todo {
                            if !failed.iter().any(|(r, _)| r == rcpt) {
                                failed.push((rcpt.clone(), why.clone()));
                            }
                        }
                        return Taken::Done;
                    }
                    (Err(e), None) => {
                        failed.append(&mut refused);
                        e.to_string()
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        // A temporary failure (the disk, a mailbox): tried again at the
        // next pass, until the file is as old as the queue keeps mail.
        let age = (msg.file.metadata())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > config.relay.max_queue_time) {
            let why = format!("4.4.7 not submitted in time, last: {why}");
            failed.extend(todo.iter().map(|r| (r.clone(), why.clone())));
            return Taken::Done;
        }
        warn!("maildrop: {name} from uid={uid}: {why}; tried again at the next pass");
        return Taken::Left;
    }
    Taken::Done
}

/// Tells the file's owner about the recipients refused for good (a
/// maildrop message's sender is always its owner's own address); false if
/// the notice could not be stored.
fn bounce(
    ctx: &Context,
    file: &mut File,
    name: &str,
    uid: u32,
    start: u64,
    failed: &[(String, String)],
) -> bool {
    let config = ctx.config();
    let to = config.local.own_address(&crate::local::login_of(uid));
    for (rcpt, why) in failed {
        info!("maildrop: {name} rcpt=<{rcpt}> refused: {why}");
    }
    let now = crate::smtp::conn::unix_now();
    let arrived = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(now, |d| d.as_secs());
    let env = Envelope {
        id: crate::store::new_id(),
        arrived,
        sender: to.clone(),
        recipients: Vec::new(),
        client: BOUNCE_CLIENT.to_string(),
        attempts: 0,
        tried: 0,
        warned: false,
    };
    let entries: Vec<Entry<'_>> = failed
        .iter()
        .map(|(address, diagnostic)| Entry {
            address,
            diagnostic,
            remote_mta: None,
        })
        .collect();
    // The bounce quotes the header; 64 KiB of the message holds it.
    let mut header = Vec::new();
    let _ = file
        .seek(SeekFrom::Start(start))
        .and_then(|_| file.take(64 * 1024).read_to_end(&mut header));
    let text = bounce::render(
        Kind::Failed,
        &config.hostname,
        &to,
        &env,
        &entries,
        &header,
        now,
    );
    match crate::deliver::inject(ctx, &to, &text, BOUNCE_CLIENT) {
        Ok(id) => {
            info!("maildrop: {name} notice={id} to=<{to}>");
            true
        }
        Err(e) => {
            error!("maildrop: {name}: cannot store the notice to <{to}>: {e}; tried again at the next pass");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Dropped, Unreadable> {
        parse(&mut text.as_bytes())
    }

    #[test]
    fn what_sendmail_writes_reads_back() {
        let rcpts = vec!["bob@example.net".to_string(), "r\u{e9}@pi.lan".to_string()];
        let text = envelope("alice@pi.lan", true, &rcpts) + "Subject: x\r\n\r\nhi\r\n.\r\n";
        let d = parsed(&text).expect("parses");
        assert_eq!(d.sender, "alice@pi.lan");
        assert!(d.utf8);
        assert_eq!(d.rcpts, rcpts);
        assert_eq!(&text[d.start as usize..], "Subject: x\r\n\r\nhi\r\n.\r\n");
        let null = parsed(&envelope("", false, &rcpts[..1])).expect("null sender");
        assert_eq!((null.sender.as_str(), null.utf8), ("", false));
    }

    #[test]
    fn anything_else_is_refused() {
        let ok = "postling-maildrop 1\nsender <a@b>\nrcpt <c@d>\nend\n";
        assert!(parsed(ok).is_ok());
        assert_eq!(
            parsed("postling-maildrop 2\nsender <a@b>\n"),
            Err(Unreadable::Version("2".into()))
        );
        for bad in [
            "",
            "hello\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <c@d>\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <c@d>\nend",
            "postling-maildrop 1\nsender <a@b>\nend\n",
            "postling-maildrop 1\nrcpt <c@d>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nsender <e@f>\nrcpt <c@d>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <c@d>\r\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <c\r@d>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <c@d>>\nend\n",
            "postling-maildrop 1\nsender <a b@c>\nrcpt <c@d>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt c@d\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nbcc <c@d>\nend\n",
            "postling-maildrop 1\nsender <a@b>\nrcpt <\u{0}@d>\nend\n",
        ] {
            assert!(
                matches!(parsed(bad), Err(Unreadable::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut not_utf8 = b"postling-maildrop 1\nsender <a@b>\nrcpt <c".to_vec();
        not_utf8.extend_from_slice(b"\xff@d>\nend\n");
        assert!(matches!(
            parse(&mut &not_utf8[..]),
            Err(Unreadable::Malformed(_))
        ));
    }

    #[test]
    fn an_endless_envelope_is_refused_without_reading_it_all() {
        let mut text = String::from("postling-maildrop 1\nsender <a@b>\n");
        while text.len() as u64 <= MAX_ENVELOPE {
            text.push_str("rcpt <someone@example.net>\n");
        }
        text.push_str("end\n");
        assert!(matches!(parsed(&text), Err(Unreadable::Malformed(_))));
    }

    #[test]
    fn the_directory_is_sticky_and_unlistable() {
        let t = crate::store::testdir::TestDir::new("maildrop");
        let dir = prepare(t.path()).expect("made");
        let mode = fs::metadata(&dir).expect("stat").mode();
        assert_eq!(mode & 0o7777, DIR_MODE);
        // A mode changed by hand is put back; a file in its place refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        prepare(t.path()).expect("again");
        assert_eq!(fs::metadata(&dir).expect("stat").mode() & 0o7777, DIR_MODE);
        fs::remove_dir(&dir).expect("rmdir");
        fs::write(&dir, b"x").expect("file");
        assert!(prepare(t.path()).is_err());
    }

    #[test]
    fn only_names_sendmail_gives_are_taken() {
        assert!(is_drop_name(&random_name().expect("random")));
        for bad in [
            "",
            "a1",
            "../x",
            &"A".repeat(32),
            &"0".repeat(33),
            &"g".repeat(32),
        ] {
            assert!(!is_drop_name(bad), "{bad:?}");
        }
    }
}
