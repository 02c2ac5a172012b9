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
//! sendmail connection of that user gets, and the same envelope-sender
//! rule. A recipient refused for good gets the sender a bounce; a
//! temporary refusal leaves the file for the next pass (a recipient that
//! had it from an earlier transaction of the same file may then get a
//! second copy: a duplicate, never a loss). Files that are not regular,
//! have another link, or are malformed are removed with a log line; one
//! never made readable (its sendmail was killed) is removed after a day.
//!
//! The daemon looks at start and then every [`EVERY`], and only reads the
//! directory when its modification time changed or the last pass left a
//! file behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use log::{error, info, warn};

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
    let path = dir.join(random_name()?);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let written = (|| {
        file.write_all(envelope(msg.sender, msg.utf8, rcpts).as_bytes())?;
        msg.file.seek(SeekFrom::Start(msg.start))?;
        io::copy(msg.file, &mut file)?;
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
/// every [`EVERY`] if the directory changed or a file was left.
pub struct Watch {
    dir: PathBuf,
    next: std::time::Instant,
    seen: Option<SystemTime>,
}

impl Watch {
    pub fn new(data_dir: &Path) -> Watch {
        Watch {
            dir: data_dir.join(DIR),
            next: std::time::Instant::now(),
            seen: None,
        }
    }

    /// How long until the next look.
    pub fn wait(&self) -> Duration {
        self.next
            .saturating_duration_since(std::time::Instant::now())
    }

    /// Looks again at the next tick, whatever the directory's time says:
    /// the pass that was due could not start.
    pub fn missed(&mut self) {
        self.seen = None;
    }

    /// Whether a pass is due now; `left`: the last pass left a file.
    pub fn due(&mut self, left: bool) -> bool {
        if !self.wait().is_zero() {
            return false;
        }
        self.next = std::time::Instant::now() + EVERY;
        let mtime = fs::symlink_metadata(&self.dir)
            .and_then(|m| m.modified())
            .ok();
        let changed = mtime != self.seen;
        self.seen = mtime;
        changed || left
    }
}

/// A session for the owner of a maildrop file: the client's end of a
/// socket pair whose other end a local session serves as user `uid`; None
/// when the user has no free slot now.
pub type OpenSession<'a> = dyn FnMut(u32, &str) -> Option<UnixStream> + 'a;

/// What became of one file.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Submitted (refused recipients bounced) or thrown out: removed.
    Done,
    /// Left for a later pass.
    Left,
    /// Left, and the pass ends here (no slot for its user).
    Stop,
}

/// One pass over the maildrop. True if it left a file for the next one.
pub fn pass(ctx: &Context, data_dir: &Path, open: &mut OpenSession<'_>) -> bool {
    let dir = data_dir.join(DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!("maildrop: {}: {e}", dir.display());
            return true;
        }
    };
    let mut left = false;
    for entry in entries.flatten() {
        if ctx.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        match take(ctx, &dir.join(&name), &name, open) {
            Taken::Done => {}
            Taken::Left => left = true,
            Taken::Stop => return true,
        }
    }
    left
}

fn take(ctx: &Context, path: &Path, name: &str, open: &mut OpenSession<'_>) -> Taken {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Taken::Done; // gone already
    };
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
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            warn!("maildrop: {name}: {e}");
            return Taken::Left;
        }
    };
    // The file opened is the one looked at, still with one link.
    match file.metadata() {
        Ok(m) if m.ino() == meta.ino() && m.uid() == uid && m.nlink() == 1 => {}
        _ => return Taken::Left,
    }
    let dropped = match parse(&mut BufReader::new(&mut file)) {
        Ok(d) => d,
        Err(Unreadable::Version(v)) => {
            warn!("maildrop: {name} from uid={uid}: version {v:?}, unknown to this build; left");
            return Taken::Left;
        }
        Err(Unreadable::Malformed(why)) => return remove(&format!("not a maildrop file ({why})")),
    };
    info!(
        "maildrop: {name} from uid={uid}: {} recipient(s)",
        dropped.rcpts.len()
    );
    match submit(ctx, &mut file, name, uid, &dropped, open) {
        Taken::Done => {
            if let Err(e) = fs::remove_file(path) {
                // Submitted: a second pass would deliver it again.
                error!("maildrop: {name}: submitted, but cannot remove it: {e}");
            }
            Taken::Done
        }
        other => other,
    }
}

/// Submits `dropped` as user `uid`, transaction by transaction as sendmail
/// does, and bounces what was refused for good.
fn submit(
    ctx: &Context,
    file: &mut File,
    name: &str,
    uid: u32,
    dropped: &Dropped,
    open: &mut OpenSession<'_>,
) -> Taken {
    let mut msg = Outgoing {
        sender: &dropped.sender,
        utf8: dropped.utf8,
        file,
        start: dropped.start,
    };
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut todo = &dropped.rcpts[..];
    while !todo.is_empty() {
        let Some(stream) = open(uid, name) else {
            return Taken::Stop;
        };
        let conn = match Conn::over(stream, Some(REPLY_TIMEOUT)) {
            Ok(c) => c,
            Err(e) => {
                warn!("maildrop: {name}: {e}");
                return Taken::Left;
            }
        };
        let mut all = None;
        let result = transaction(
            conn,
            &mut msg,
            todo,
            &mut |rcpt, r: &ServerReply| match rcpt {
                Some(rcpt) => failed.push((rcpt.to_string(), r.one_line())),
                None => all = Some(r.one_line()),
            },
        );
        match result {
            Ok((_, rest)) => todo = rest,
            Err(_) if all.is_some() => {
                // The sender or the message itself was refused: every
                // recipient still to go fails with it.
                let why = all.unwrap_or_default();
                for rcpt in todo {
                    if !failed.iter().any(|(r, _)| r == rcpt) {
                        failed.push((rcpt.clone(), why.clone()));
                    }
                }
                break;
            }
            Err(e) => {
                warn!("maildrop: {name} from uid={uid}: {e}; left for the next pass");
                return Taken::Left;
            }
        }
    }
    if !failed.is_empty() {
        bounce(ctx, msg.file, name, uid, dropped, &failed);
    }
    Taken::Done
}

/// Tells the sender about the recipients the daemon refused. The sender is
/// the one the session used: the file's for root and `trusted_users`,
/// else the owner's own address; none for `<>`.
fn bounce(
    ctx: &Context,
    file: &mut File,
    name: &str,
    uid: u32,
    dropped: &Dropped,
    failed: &[(String, String)],
) {
    let config = ctx.config();
    let login = crate::local::login_of(uid);
    let trusted = uid == 0 || config.local.trusted_users.contains(&login);
    let to = if trusted {
        dropped.sender.clone()
    } else {
        config.local.own_address(&login)
    };
    for (rcpt, why) in failed {
        info!("maildrop: {name} rcpt=<{rcpt}> refused: {why}");
    }
    if to.is_empty() {
        warn!("maildrop: {name}: refused recipients not bounced: the sender is <>");
        return;
    }
    let now = crate::smtp::conn::unix_now();
    let arrived = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(now, |d| d.as_secs());
    let env = Envelope {
        id: name.to_string(),
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
        .seek(SeekFrom::Start(dropped.start))
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
        Ok(id) => info!("maildrop: {name} notice={id} to=<{to}>"),
        Err(e) => error!("maildrop: {name}: cannot store the notice to <{to}>: {e}"),
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
    fn watch_looks_when_the_directory_changed_or_a_file_was_left() {
        let t = crate::store::testdir::TestDir::new("maildrop-watch");
        prepare(t.path()).expect("made");
        let mut w = Watch::new(t.path());
        assert!(w.due(false), "the first look");
        assert!(!w.due(false), "not before EVERY");
        w.next = std::time::Instant::now();
        assert!(!w.due(false), "unchanged");
        w.next = std::time::Instant::now();
        assert!(w.due(true), "a file was left");
        // Directory times have a granularity: wait until a new one shows.
        let before = fs::metadata(t.path().join(DIR)).and_then(|m| m.modified());
        loop {
            fs::write(t.path().join(DIR).join("f"), b"x").expect("write");
            fs::remove_file(t.path().join(DIR).join("f")).expect("rm");
            if fs::metadata(t.path().join(DIR))
                .and_then(|m| m.modified())
                .ok()
                != before.as_ref().ok().copied()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        w.next = std::time::Instant::now();
        assert!(w.due(false), "changed");
    }
}
