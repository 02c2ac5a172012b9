//! `postling queue list|show|flush|delete` and `mailq`: the queue as the
//! person at the console sees it.
//!
//! `list` and `show` read `<data_dir>/queue/` directly and never write, so
//! they are safe while the daemon runs: an entry that vanishes (delivered or
//! deleted meanwhile) or does not parse is skipped, never fatal. Envelopes
//! are replaced by rename, so a reader sees the old or the new one whole.
//!
//! `flush` and `delete` change the queue, which the relay thread owns while
//! the daemon runs, so they go through the control socket
//! ([`crate::control`]). When no daemon runs (no socket, or nobody listening,
//! and the data_dir lock is free), `delete` takes the lock itself and
//! removes the entry with [`Queue::remove`]; `flush` has nobody to ask and
//! fails with EX_TEMPFAIL, since the daemon tries everything when it starts.
//!
//! The listing follows Postfix's `mailq`: one block per message (id, size,
//! arrival time in UTC, sender), then each recipient still to be delivered,
//! with its last error in parentheses above it, and a count of the files
//! in the maildrop (sendmail's, while the daemon was down) when there are
//! any and this user may read it. `--json` gives scripts the
//! same facts, including finished recipients. Text that came from outside
//! (addresses, remote replies, headers) is printed with control characters
//! escaped, so a hostile message cannot drive the terminal.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::control;
use crate::store::envelope::{Envelope, RcptState};
use crate::store::is_valid_id;
use crate::store::queue::Queue;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List {
        json: bool,
    },
    Show(String),
    /// One message, or all of them.
    Flush(Option<String>),
    Delete(String),
}

/// `show` prints at most this much of the message header.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Where the recipient column starts in the listing.
const INDENT: usize = 51;

/// Why a queue command failed; each maps to a sysexits.h code.
#[derive(Debug)]
pub enum Error {
    /// A malformed argument (EX_USAGE, 64).
    Usage(String),
    /// No queued message has this id (EX_NOINPUT, 66).
    UnknownId(String),
    /// The daemon is not running, so nothing can be flushed (EX_TEMPFAIL, 75).
    NotRunning,
    /// The daemon runs but did not do what was asked (EX_UNAVAILABLE, 69).
    Daemon(String),
    /// No permission to read the queue or reach the socket (EX_NOPERM, 77).
    Permission(io::Error),
    /// Any other I/O error (EX_IOERR, 74).
    Io(io::Error),
}

impl Error {
    /// The process exit code (sysexits.h).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 64,
            Error::UnknownId(_) => 66,
            Error::Daemon(_) => 69,
            Error::Io(_) => 74,
            Error::NotRunning => 75,
            Error::Permission(_) => 77,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m}"),
            Error::UnknownId(id) => write!(f, "{id}: no such message in the queue"),
            Error::NotRunning => {
                write!(
                    f,
                    "postling is not running; queued mail is tried when it starts"
                )
            }
            Error::Daemon(m) => write!(f, "{m}"),
            Error::Permission(e) => {
                write!(f, "{e} (run this as the user postling runs as, or as root)")
            }
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::PermissionDenied {
            Error::Permission(e)
        } else {
            Error::Io(e)
        }
    }
}

/// Runs `cmd` against the queue under `data_dir`, writing what it prints to
/// `out`. A reader that goes away (`mailq | head`) is not an error.
pub fn run(cmd: &Command, data_dir: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let result = match cmd {
        Command::List { json: false } => list(data_dir, out),
        Command::List { json: true } => list_json(data_dir, out),
        Command::Show(id) => show(data_dir, id, out),
        Command::Flush(id) => flush(data_dir, id.as_deref(), out),
        Command::Delete(id) => delete(data_dir, id, out),
    };
    let result = result.and_then(|()| out.flush().map_err(Error::from));
    match result {
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Reading the queue (read-only).

/// One queued message as read from disk.
struct Entry {
    env: Envelope,
    /// Bytes of the message file.
    size: u64,
}

fn queue_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("queue")
}

fn check_id(id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{:?} is not a queue id (letters A-Z and digits)",
            printable(id)
        )))
    }
}

/// Every readable entry, oldest first. A missing queue directory is an
/// empty queue (the daemon never ran); entries that vanish or do not parse
/// are skipped.
fn read_all(data_dir: &Path) -> Result<Vec<Entry>, Error> {
    let dir = queue_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(&dir, e).into()),
    };
    let mut out: Vec<Entry> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str().filter(|id| is_valid_id(id))?;
            read_entry(data_dir, id).ok()
        })
        .collect();
    out.sort_by(|a, b| (a.env.arrived, &a.env.id).cmp(&(b.env.arrived, &b.env.id)));
    Ok(out)
}

/// Reads `queue/<id>`: the envelope and the message size, through the
/// queue's own reader (which never follows a symlink and refuses an
/// envelope naming another id).
fn read_entry(data_dir: &Path, id: &str) -> io::Result<Entry> {
    let queue = Queue::at(data_dir);
    let env = queue.load(id)?;
    let size = queue.open_message(id)?.len();
    Ok(Entry { env, size })
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Reads one entry for `show`; a missing entry is [`Error::UnknownId`].
fn read_one(data_dir: &Path, id: &str) -> Result<Entry, Error> {
    check_id(id)?;
    match read_entry(data_dir, id) {
        Ok(e) => Ok(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::UnknownId(id.to_owned())),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------
// list

fn list(data_dir: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let entries = read_all(data_dir)?;
    out.write_all(format_list(&entries).as_bytes())?;
    // Messages sendmail left while the daemon was down are not queued yet;
    // only root and the daemon's user can count them.
    let dropped = crate::maildrop::count(data_dir);
    if dropped > 0 {
        writeln!(
            out,
            "-- {dropped} message(s) in {}, waiting for postling to pick them up",
            data_dir.join(crate::maildrop::DIR).display()
        )?;
    }
    Ok(())
}

/// The Postfix-style listing of `entries`.
fn format_list(entries: &[Entry]) -> String {
    if entries.is_empty() {
        return "Mail queue is empty\n".to_owned();
    }
    let mut s = format!(
        "{:<20} {:>8} {:<20} {}\n",
        "-Queue ID-", "--Size--", "----Arrival Time----", "-Sender/Recipient-------"
    );
    let indent = " ".repeat(INDENT);
    let mut total = 0u64;
    for e in entries {
        total += e.size;
        let sender = if e.env.sender.is_empty() {
            "MAILER-DAEMON".to_owned()
        } else {
            printable(&e.env.sender)
        };
        s.push_str(&format!(
            "{:<20} {:>8} {:<19}  {sender}\n",
            e.env.id,
            e.size,
            arrival(e.env.arrived)
        ));
        let mut last_reason: Option<&str> = None;
        for r in e.env.recipients.iter().filter(|r| !r.state.is_final()) {
            if let RcptState::Deferred { reason } = &r.state {
                if last_reason != Some(reason.as_str()) {
                    s.push_str(&format!("{indent}({})\n", printable(reason)));
                    last_reason = Some(reason);
                }
            }
            s.push_str(&format!("{indent}{}\n", printable(&r.address)));
        }
        s.push('\n');
    }
    let n = entries.len();
    s.push_str(&format!(
        "-- {} Kbytes in {n} Request{}.\n",
        total.div_ceil(1024),
        if n == 1 { "" } else { "s" }
    ));
    s
}

/// `Sun Nov 22 06:00:24` (UTC), as Postfix's mailq shows it.
fn arrival(unix: u64) -> String {
    // rfc5322 gives "Sun, 22 Nov 2026 06:00:24 +0000".
    let full = crate::date::rfc5322(unix);
    let f: Vec<&str> = full.split(' ').collect();
    match f.as_slice() {
        [day, date, month, _year, time, _zone] => {
            format!("{} {month} {date:>2} {time}", day.trim_end_matches(','))
        }
        _ => full,
    }
}

// ---------------------------------------------------------------------------
// list --json

fn list_json(data_dir: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let entries = read_all(data_dir)?;
    out.write_all(format_json(&entries).as_bytes())?;
    Ok(())
}

/// `[{"id":..,"arrival":..,"size":..,"sender":..,"attempts":..,
/// "recipients":[{"address":..,"state":..,"reason":..|null}]}]`, one
/// message a line.
fn format_json(entries: &[Entry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        s.push_str(if i == 0 { "\n" } else { ",\n" });
        s.push_str(&format!(
            "{{\"id\":{},\"arrival\":{},\"size\":{},\"sender\":{},\"attempts\":{},\"recipients\":[",
            json_str(&e.env.id),
            e.env.arrived,
            e.size,
            json_str(&e.env.sender),
            e.env.attempts
        ));
        for (j, r) in e.env.recipients.iter().enumerate() {
            let (state, reason) = state_parts(&r.state);
            s.push_str(&format!(
                "{}{{\"address\":{},\"state\":\"{state}\",\"reason\":{}}}",
                if j == 0 { "" } else { "," },
                json_str(&r.address),
                reason.map_or("null".to_owned(), json_str)
            ));
        }
        s.push_str("]}");
    }
    s.push_str(if entries.is_empty() { "]\n" } else { "\n]\n" });
    s
}

fn state_parts(state: &RcptState) -> (&'static str, Option<&str>) {
    match state {
        RcptState::Pending => ("pending", None),
        RcptState::Deferred { reason } => ("deferred", Some(reason)),
        RcptState::Delivered => ("delivered", None),
        RcptState::Failed { reason } => ("failed", Some(reason)),
    }
}

/// A JSON string literal (RFC 8259 section 7): quotes, backslashes and
/// control characters escaped; everything else is UTF-8 as is.
fn json_str(s: &str) -> String {
    use crate::smtp::command::hides_text;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // C0 and C1 controls: a terminal acts on a raw C1 CSI (0x9b).
            c if c.is_control() || hides_text(c) => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// show

fn show(data_dir: &Path, id: &str, out: &mut dyn Write) -> Result<(), Error> {
    let entry = read_one(data_dir, id)?;
    let header = read_header(data_dir, id);
    let mut s = format_envelope(&entry);
    s.push('\n');
    match header {
        Ok((text, truncated)) => {
            for line in text.lines() {
                s.push_str(&printable_keep_tabs(line));
                s.push('\n');
            }
            if truncated {
                s.push_str(&format!(
                    "[header longer than {MAX_HEADER_BYTES} bytes; cut]\n"
                ));
            }
        }
        // Delivered or deleted between the two reads.
        Err(e) => s.push_str(&format!("[message unreadable: {e}]\n")),
    }
    out.write_all(s.as_bytes())?;
    Ok(())
}

fn format_envelope(e: &Entry) -> String {
    let env = &e.env;
    let sender = if env.sender.is_empty() {
        "<> (MAILER-DAEMON)".to_owned()
    } else {
        printable(&env.sender)
    };
    let tried = if env.tried == 0 {
        "never".to_owned()
    } else {
        crate::date::rfc5322(env.tried)
    };
    let mut s = format!(
        "id: {}\narrival: {} ({})\nsize: {}\nsender: {sender}\nclient: {}\nattempts: {}\nlast attempt: {tried}\ndelay warning sent: {}\n",
        env.id,
        crate::date::rfc5322(env.arrived),
        env.arrived,
        e.size,
        printable(&env.client),
        env.attempts,
        if env.warned { "yes" } else { "no" },
    );
    for r in &env.recipients {
        let (state, reason) = state_parts(&r.state);
        s.push_str(&format!("recipient: {} {state}", printable(&r.address)));
        if let Some(reason) = reason {
            s.push_str(&format!(" ({})", printable(reason)));
        }
        s.push('\n');
    }
    s
}

/// The message header up to (not including) the empty line, and whether it
/// was cut at [`MAX_HEADER_BYTES`].
fn read_header(data_dir: &Path, id: &str) -> io::Result<(String, bool)> {
    let mut bytes = Vec::new();
    Queue::at(data_dir)
        .open_message(id)?
        .take(MAX_HEADER_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .or_else(|| bytes.windows(2).position(|w| w == b"\n\n").map(|p| p + 1));
    let (cut, truncated) = match end {
        Some(end) if end <= MAX_HEADER_BYTES => (end, false),
        _ if bytes.len() > MAX_HEADER_BYTES => (MAX_HEADER_BYTES, true),
        _ => (bytes.len(), false),
    };
    Ok((
        String::from_utf8_lossy(&bytes[..cut]).into_owned(),
        truncated,
    ))
}

/// `s` with control characters shown as `\xNN`, so it prints on one line and
/// cannot send escape sequences to the terminal.
fn printable(s: &str) -> String {
    use crate::smtp::command::hides_text;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else if hides_text(c) {
            out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// [`printable`], but a tab (folded header lines) stays a tab.
fn printable_keep_tabs(s: &str) -> String {
    s.split('\t').map(printable).collect::<Vec<_>>().join("\t")
}

// ---------------------------------------------------------------------------
// flush and delete: through the daemon, or (delete) directly when none runs.

/// What asking the daemon gave.
enum Asked {
    /// It answered with this line.
    Reply(String),
    /// Nobody listens on the socket and the data_dir lock is free.
    NotRunning,
}

/// Sends `line` over the control socket. A missing or dead socket means
/// "not running" only if the data_dir lock is free too; a daemon that holds
/// the lock without answering is [`Error::Daemon`].
fn ask(data_dir: &Path, line: &str) -> Result<Asked, Error> {
    match control::request(data_dir, line) {
        Ok(reply) => Ok(Asked::Reply(reply)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            if lock_is_held(data_dir)? {
                Err(Error::Daemon(format!(
                    "postling is running but its control socket {} does not answer ({e})",
                    control::socket_path(data_dir).display()
                )))
            } else {
                Ok(Asked::NotRunning)
            }
        }
        Err(e) => {
            let path = control::socket_path(data_dir);
            Err(Error::from(at(&path, e)))
        }
    }
}

/// True when a daemon holds `<data_dir>/lock`. Creates nothing.
fn lock_is_held(data_dir: &Path) -> Result<bool, Error> {
    let path = data_dir.join("lock");
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(at(&path, e).into()),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(at(&path, e).into()),
    }
}

/// Maps a reply line to a result.
fn check_reply(reply: &str, id: Option<&str>) -> Result<(), Error> {
    match reply {
        "OK" => Ok(()),
        "ERR unknown id" => Err(Error::UnknownId(id.unwrap_or("").to_owned())),
        other => Err(Error::Daemon(format!(
            "postling refused: {}",
            printable(other.strip_prefix("ERR ").unwrap_or(other))
        ))),
    }
}

fn flush(data_dir: &Path, id: Option<&str>, out: &mut dyn Write) -> Result<(), Error> {
    if let Some(id) = id {
        check_id(id)?;
        // The daemon answers OK to any id; the user wants to hear about a typo.
        if fs::symlink_metadata(queue_dir(data_dir).join(id)).is_err() {
            return Err(Error::UnknownId(id.to_owned()));
        }
    }
    let line = match id {
        Some(id) => format!("FLUSH {id}"),
        None => "FLUSH".to_owned(),
    };
    match ask(data_dir, &line)? {
        Asked::Reply(reply) => check_reply(&reply, id)?,
        Asked::NotRunning => return Err(Error::NotRunning),
    }
    match id {
        Some(id) => writeln!(out, "{id}: delivery requested")?,
        None => writeln!(out, "delivery of every queued message requested")?,
    }
    Ok(())
}

fn delete(data_dir: &Path, id: &str, out: &mut dyn Write) -> Result<(), Error> {
    check_id(id)?;
    if fs::symlink_metadata(queue_dir(data_dir).join(id)).is_err() {
        return Err(Error::UnknownId(id.to_owned()));
    }
    match ask(data_dir, &format!("DELETE {id}"))? {
        // The relay thread was too busy (a slow disk) to answer in time;
        // the request waits in its queue and is carried out.
        Asked::Reply(reply) if reply == "QUEUED" => {
            writeln!(
                out,
                "{id}: delete requested; the daemon is busy and removes it shortly"
            )?;
            return Ok(());
        }
        Asked::Reply(reply) => check_reply(&reply, Some(id))?,
        Asked::NotRunning => delete_offline(data_dir, id)?,
    }
    writeln!(out, "{id}: deleted")?;
    Ok(())
}

/// Removes `id` with no daemon running: takes the data_dir lock first, so a
/// daemon starting meanwhile waits for us (it fails to start rather than
/// sweep a half-done removal), then uses the queue's own crash-safe removal.
fn delete_offline(data_dir: &Path, id: &str) -> Result<(), Error> {
    if fs::symlink_metadata(queue_dir(data_dir).join(id)).is_err() {
        return Err(Error::UnknownId(id.to_owned()));
    }
    let _lock = match crate::server::lock_data_dir(data_dir) {
        Ok(lock) => lock,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(Error::Daemon(format!(
                "postling started meanwhile; try again ({e})"
            )))
        }
        Err(e) => return Err(at(data_dir, e).into()),
    };
    let (queue, _) = Queue::open(data_dir)?;
    match queue.remove(id) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::UnknownId(id.to_owned())),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::envelope::Recipient;
    use crate::store::testdir::TestDir;

    fn entry(id: &str, sender: &str, size: u64, states: &[(&str, RcptState)]) -> Entry {
        let mut env = Envelope::new(id, 1_795_324_930, sender, "[127.0.0.1]".into(), &[]);
        env.recipients = states
            .iter()
            .map(|(a, s)| Recipient {
                address: (*a).to_owned(),
                state: s.clone(),
            })
            .collect();
        env.attempts = 2;
        Entry { env, size }
    }

    fn deferred(r: &str) -> RcptState {
        RcptState::Deferred { reason: r.into() }
    }

    #[test]
    fn arrival_like_postfix() {
        assert_eq!(arrival(1_795_324_930), "Sun Nov 22 05:22:10");
        assert_eq!(arrival(0), "Thu Jan  1 00:00:00");
    }

    #[test]
    fn listing_like_mailq() {
        let reason = "connect to mx.example.com [192.0.2.1]:25: Connection refused";
        let e = entry(
            "0HOE1XVCI9C009HY0001",
            "cron@localhost",
            1234,
            &[
                ("done@example.com", RcptState::Delivered),
                ("friend@example.com", deferred(reason)),
                ("other@example.com", deferred(reason)),
                ("new@example.com", RcptState::Pending),
                (
                    "gone@example.com",
                    RcptState::Failed {
                        reason: "550".into(),
                    },
                ),
            ],
        );
        let pad = " ".repeat(INDENT);
        let want = format!(
            "-Queue ID-           --Size-- ----Arrival Time---- -Sender/Recipient-------\n\
             0HOE1XVCI9C009HY0001     1234 Sun Nov 22 05:22:10  cron@localhost\n\
             {pad}({reason})\n\
             {pad}friend@example.com\n\
             {pad}other@example.com\n\
             {pad}new@example.com\n\
             \n\
             -- 2 Kbytes in 1 Request.\n"
        );
        assert_eq!(format_list(&[e]), want);
        assert_eq!(format_list(&[]), "Mail queue is empty\n");
    }

    #[test]
    fn null_sender_and_hostile_text() {
        let e = entry(
            "A1",
            "",
            10,
            &[("x@example.com", deferred("bad\x1b[2J\nthing"))],
        );
        let l = format_list(&[e]);
        assert!(l.contains("  MAILER-DAEMON\n"), "{l}");
        assert!(l.contains("(bad\\x1b[2J\\x0athing)"), "{l}");
        assert!(l.ends_with("-- 1 Kbytes in 1 Request.\n"), "{l}");
        // A right-to-left override would make the address read backwards.
        let e = entry(
            "A2",
            "a@x",
            10,
            &[("\u{202e}moc.elpmaxe@x", RcptState::Pending)],
        );
        let l = format_list(&[e]);
        assert!(l.contains("\\u{202e}moc.elpmaxe@x"), "{l}");
        assert!(!l.contains('\u{202e}'), "{l}");
    }

    #[test]
    fn json_output() {
        let e = entry(
            "A1",
            "we\"ird\\@x",
            10,
            &[
                ("a@x", deferred("451 \u{1}later\n")),
                ("b@x", RcptState::Delivered),
            ],
        );
        assert_eq!(
            format_json(&[e]),
            "[\n{\"id\":\"A1\",\"arrival\":1795324930,\"size\":10,\"sender\":\"we\\\"ird\\\\@x\",\"attempts\":2,\"recipients\":[\
             {\"address\":\"a@x\",\"state\":\"deferred\",\"reason\":\"451 \\u0001later\\n\"},\
             {\"address\":\"b@x\",\"state\":\"delivered\",\"reason\":null}]}\n]\n"
        );
        assert_eq!(format_json(&[]), "[]\n");
        assert_eq!(json_str("ü\t"), "\"ü\\t\"");
        assert_eq!(json_str("\u{9b}2J\u{202e}"), "\"\\u009b2J\\u202e\"");
    }

    /// Writes a queue entry the way the queue does (envelope, then message).
    fn put(data: &Path, env: &Envelope, message: &[u8]) {
        fs::create_dir_all(data.join("queue")).expect("mkdir");
        let mut bytes = env.to_bytes();
        bytes.extend_from_slice(message);
        fs::write(data.join("queue").join(&env.id), bytes).expect("entry");
    }

    fn run_str(cmd: Command, data: &Path) -> (Result<(), Error>, String) {
        let mut out = Vec::new();
        let r = run(&cmd, data, &mut out);
        (r, String::from_utf8(out).expect("utf-8 output"))
    }

    #[test]
    fn reads_a_queue_directory_skipping_bad_entries() {
        let t = TestDir::new("qcli");
        let data = t.path();
        let (r, out) = run_str(Command::List { json: false }, data);
        assert!(r.is_ok());
        assert_eq!(out, "Mail queue is empty\n", "no queue dir yet");

        let env = Envelope::new("B2", 200, "bob@x", "c".into(), &["a@y"]);
        put(
            data,
            &env,
            b"Subject: hi\r\nX-A: 1\r\n\tfolded\r\n\r\nbody\r\n",
        );
        let older = Envelope::new("Z9", 100, "zed@x", "c".into(), &["q@y"]);
        put(data, &older, b"Subject: old\r\n\r\n");
        // Garbage: a bad envelope, a bad name, an envelope naming another id.
        fs::write(data.join("queue/C3"), b"junk").expect("junk");
        fs::create_dir_all(data.join("queue/bad name")).expect("mkdir");
        let mut other = env.clone();
        other.id = "D4".into();
        put(data, &other, b"x");
        fs::write(data.join("queue/D4.env"), env.to_bytes()).expect("envelope");
        // An entry of the layout earlier versions wrote is listed too.
        let legacy = Envelope::new("E5", 300, "eve@x", "c".into(), &["e@y"]);
        fs::create_dir_all(data.join("queue/E5")).expect("mkdir");
        fs::write(data.join("queue/E5/envelope"), legacy.to_bytes()).expect("envelope");
        fs::write(data.join("queue/E5/message"), b"Subject: e\r\n\r\n").expect("message");

        let (r, out) = run_str(Command::List { json: false }, data);
        assert!(r.is_ok());
        let z = out.find("Z9 ").expect("Z9 listed");
        let b = out.find("B2 ").expect("B2 listed");
        assert!(z < b, "oldest first:\n{out}");
        assert!(!out.contains("C3") && !out.contains("D4"), "{out}");
        assert!(out.contains("E5 "), "{out}");
        assert!(out.ends_with("in 3 Requests.\n"), "{out}");

        let (r, out) = run_str(Command::Show("B2".into()), data);
        assert!(r.is_ok());
        assert!(out.contains("id: B2\n"), "{out}");
        assert!(out.contains("recipient: a@y pending\n"), "{out}");
        assert!(
            out.ends_with("\nSubject: hi\nX-A: 1\n\tfolded\n"),
            "header only:\n{out}"
        );

        let (r, _) = run_str(Command::Show("NOSUCH".into()), data);
        assert_eq!(r.expect_err("unknown").exit_code(), 66);
        let (r, _) = run_str(Command::Show("../etc".into()), data);
        assert_eq!(r.expect_err("bad id").exit_code(), 64);
    }

    #[test]
    fn offline_flush_and_delete() {
        let t = TestDir::new("qcli-offline");
        let data = t.path();
        let env = Envelope::new("B2", 200, "bob@x", "c".into(), &["a@y"]);
        put(data, &env, b"Subject: hi\r\n\r\n");

        let (r, _) = run_str(Command::Flush(None), data);
        assert_eq!(r.expect_err("not running").exit_code(), 75);
        let (r, _) = run_str(Command::Flush(Some("NOSUCH".into())), data);
        assert_eq!(r.expect_err("unknown").exit_code(), 66);

        let (r, out) = run_str(Command::Delete("B2".into()), data);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(out, "B2: deleted\n");
        assert!(!data.join("queue/B2").exists());
        let (r, _) = run_str(Command::Delete("B2".into()), data);
        assert_eq!(r.expect_err("gone").exit_code(), 66);

        // A daemon holding the lock without a control socket is not "not running".
        let _held = crate::server::lock_data_dir(data).expect("lock");
        let (r, _) = run_str(Command::Flush(None), data);
        assert_eq!(r.expect_err("unavailable").exit_code(), 69);
    }
}
