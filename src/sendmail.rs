//! `sendmail` (and `postling sendmail`): the sendmail(8) command line that
//! cron, mail(1), PHP and git send-email call, as a client of the daemon's
//! submission socket `<data_dir>/submit.sock`.
//!
//! This file owns the hand-written flag parser (sendmail's flags are not
//! argh's), reading the message from standard input, and speaking ESMTP to
//! the daemon over the Unix socket. The message is read in two parts: the
//! header section (bounded by [`MAX_HEADER`]) is held in memory so `-t` can
//! take recipients from To/Cc/Bcc, Bcc can be removed and a missing `From:`,
//! `Date:` or `Message-ID:` (RFC 5322 3.6) can be added; the body is
//! never held whole: the message, encoded for DATA, goes into an unnamed
//! file in the temporary directory while it is read, and only then is the
//! daemon called, so a cron job that writes for an hour is not cut off by
//! the daemon's DATA timeout, and recipients over the daemon's
//! `max_recipients` get the same message in a further transaction
//! (RFC 5321 4.5.3.1.10). On the way, any line ending
//! (LF, CRLF, or a lone CR) becomes CRLF and lines are dot-stuffed
//! (RFC 5321 4.5.2). Without `-i`, a line holding a single "." ends the
//! message, as in classic sendmail. A `Bcc:` field is always removed (with
//! or without `-t`): it must never reach the recipients. Input that does
//! not start with a header field is all body; a header section ends at the
//! empty line or at the first line that is not a header field.
//!
//! It does not decide the envelope sender: the daemon learns the Unix user
//! from SO_PEERCRED and, unless the user is trusted, replaces `MAIL FROM`
//! with `login@<first local domain>` (see `smtp::conn::serve_local`). If the
//! daemon is not running or says "try later", sendmail tries again for
//! `local.sendmail_wait` (a restart, a boot where cron starts first); after
//! that nothing is kept (the temporary file has no name) and the exit code
//! is 75 (EX_TEMPFAIL). A daemon that is not running at all but has run
//! here before has left its maildrop directory: the message is left there
//! at once, exit 0, and the daemon submits it when it starts (see
//! [`crate::maildrop`]).
//!
//! Exit codes follow sysexits.h: 0 sent, 64 usage, 65 bad message data,
//! 67 no recipient accepted, 69 refused by the daemon, 74 I/O error,
//! 75 try again later, 77 permission denied, 78 bad config.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, Flags};
use crate::relay::reply::{ReplyParser, ServerReply};

/// Where the installed daemon's config lives; read when `-C` is not given
/// and the file exists (as the queue tools do).
/// The submission socket's name under `data_dir` (`server::SUBMIT_SOCKET`).
const SUBMIT_SOCKET: &str = "submit.sock";
/// Most bytes of header section read before giving up (EX_DATAERR).
pub const MAX_HEADER: usize = 1 << 20;
/// A line this long that does not start like a header field is taken as
/// the body's first line without reading the rest of it first.
const LONG_LINE: u64 = 64 * 1024;
/// How long one read or write on the socket may take.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of body read from stdin at a time.
const CHUNK: usize = 64 * 1024;

/// sysexits.h codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const NOPERM: u8 = 77;
    pub const CONFIG: u8 = 78;
}

// ---------------------------------------------------------------------------
// Flags.

/// What the invocation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `-bm` (the default): read a message from stdin and submit it.
    Deliver,
    /// `-bs`: SMTP on stdin/stdout, proxied to the daemon.
    Smtp,
    /// `-bp`: list the queue (mailq).
    ListQueue,
    /// `-q`: ask the daemon to retry the queue now.
    Flush,
    /// `-bi` / `-I` (newaliases): nothing to rebuild; the daemon reads the
    /// aliases file itself, at start and on reload.
    NewAliases,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-t`: recipients also from the To, Cc and Bcc headers.
    pub recipients_from_headers: bool,
    /// `-i` / `-oi`: a line with a single "." does not end the message.
    pub ignore_dots: bool,
    /// `-f` / `-r`: the envelope sender (honoured for trusted users only).
    pub sender: Option<String>,
    /// `-F`: the full name for an added `From:`.
    pub full_name: Option<String>,
    /// `-C`: the config file.
    pub config: Option<PathBuf>,
    /// Recipient arguments as given (comma-separated lists allowed).
    pub recipients: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mode: Mode::Deliver,
            recipients_from_headers: false,
            ignore_dots: false,
            sender: None,
            full_name: None,
            config: None,
            recipients: Vec::new(),
        }
    }
}

/// Parses sendmail's flags (`args` without argv[0]), getopt style: flags
/// may be clustered (`-ti`), an option's value may be attached (`-fme`) or
/// the next argument (`-f me`), options may follow recipients, and `--`
/// ends options. Errors are the message for stderr (EX_USAGE).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut i = 0;
    let mut options_done = false;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if options_done || arg == "-" || !arg.starts_with('-') {
            o.recipients.push(arg.clone());
            continue;
        }
        if arg == "--" {
            options_done = true;
            continue;
        }
        if arg.starts_with("--") {
            return Err(format!("unknown option {arg}"));
        }
        let mut rest = &arg[1..];
        while let Some(c) = rest.chars().next() {
            rest = &rest[c.len_utf8()..];
            match c {
                't' => o.recipients_from_headers = true,
                'i' => o.ignore_dots = true,
                // Accepted and ignored, as Postfix's sendmail does.
                'v' | 'm' | 'n' | 'U' | 'G' | 'c' | 'x' => {}
                'I' => o.mode = Mode::NewAliases,
                // -q, -q1h, -qR...: retry the queue now (no queue runner
                // interval: the daemon schedules retries itself).
                'q' => {
                    o.mode = Mode::Flush;
                    break;
                }
                'f' | 'r' | 'F' | 'C' | 'b' | 'o' | 'O' | 'B' | 'N' | 'R' | 'V' | 'h' | 'L'
                | 'X' | 'A' | 'e' | 'p' => {
                    let value = if rest.is_empty() {
                        let Some(next) = args.get(i) else {
                            return Err(format!("option -{c} requires an argument"));
                        };
                        i += 1;
                        next.as_str()
                    } else {
                        rest
                    };
                    rest = "";
                    match c {
                        'f' | 'r' => o.sender = Some(value.to_owned()),
                        'F' => o.full_name = Some(value.to_owned()),
                        'C' => o.config = Some(PathBuf::from(value)),
                        'b' => {
                            o.mode = match value {
                                "m" => Mode::Deliver,
                                "s" => Mode::Smtp,
                                "p" => Mode::ListQueue,
                                "i" => Mode::NewAliases,
                                _ => return Err(format!("unsupported mode -b{value}")),
                            }
                        }
                        // -oi is -i; -oem, -odb, -odi, -oXxx and the rest,
                        // and -O, -B, -N, -R, -V, -h, -L, -X, -A, -e, -p:
                        // accepted and ignored (the daemon decides).
                        'o' if value == "i" => o.ignore_dots = true,
                        _ => {}
                    }
                }
                _ => return Err(format!("unknown option -{c}")),
            }
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Addresses.

/// The addresses of an RFC 5322 3.4 address list: `a@b`, `Name <a@b>`,
/// `"Doe, J." <a@b>`, comments, groups (`team: a@b, c@d;`,
/// `undisclosed-recipients:;`). Returned as written, without the angle
/// brackets, display names, comments or source routes; empty ones dropped.
pub fn parse_address_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut plain = String::new();
    let mut angle: Option<String> = None;
    let mut in_angle = false;
    let mut in_quote = false;
    let mut escape = false;
    let mut comment = 0usize;
    let mut in_group = false;
    let mut flush = |plain: &mut String, angle: &mut Option<String>| {
        let addr = match angle.take() {
            // Drop an obsolete source route: <@a,@b:user@c>.
            Some(a) => match a.trim().strip_prefix('@') {
                Some(route) => route.split_once(':').map_or("", |(_, a)| a).to_owned(),
                None => a,
            },
            None => std::mem::take(plain),
        };
        plain.clear();
        let addr = addr.trim();
        if !addr.is_empty() {
            out.push(addr.to_owned());
        }
    };
    for c in s.chars() {
        let had_angle = angle.is_some();
        let target = if in_angle {
            angle.get_or_insert_with(String::new)
        } else {
            &mut plain
        };
        if in_quote {
            target.push(c);
            if escape {
                escape = false;
            } else if c == '\\' {
                escape = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        if comment > 0 {
            if escape {
                escape = false;
            } else if c == '\\' {
                escape = true;
            } else if c == '(' {
                comment += 1;
            } else if c == ')' {
                comment -= 1;
            }
            continue;
        }
        match c {
            '"' => {
                in_quote = true;
                target.push(c);
            }
            '(' => comment = 1,
            '<' if !in_angle => {
                in_angle = true;
                angle = Some(String::new());
            }
            '>' if in_angle => in_angle = false,
            ',' if !in_angle => flush(&mut plain, &mut angle),
            ':' if !in_angle && !in_group && !had_angle => {
                // A group's display name.
                in_group = true;
                plain.clear();
            }
            ';' if !in_angle && in_group => {
                flush(&mut plain, &mut angle);
                in_group = false;
            }
            _ => target.push(c),
        }
    }
    flush(&mut plain, &mut angle);
    out
}

/// True if `addr` can go into `MAIL FROM:<>` / `RCPT TO:<>` as is: no
/// control characters, no angle brackets, no white space outside a quoted
/// local part, at most 320 bytes.
pub fn is_valid_address(addr: &str) -> bool {
    if addr.is_empty() || addr.len() > 320 {
        return false;
    }
    if addr.chars().any(|c| c.is_control() || c == '<' || c == '>') {
        return false;
    }
    let unquoted = match addr.strip_prefix('"') {
        Some(rest) => match closing_quote(rest) {
            Some(end) => &rest[end + 1..],
            None => return false,
        },
        None => addr,
    };
    !unquoted.chars().any(char::is_whitespace)
}

/// The index of the `"` that closes a quoted string whose opening quote was
/// just before `s`.
fn closing_quote(s: &str) -> Option<usize> {
    let mut escape = false;
    for (i, c) in s.char_indices() {
        if escape {
            escape = false;
        } else if c == '\\' {
            escape = true;
        } else if c == '"' {
            return Some(i);
        }
    }
    None
}

/// `root` -> `root@<domain>`; an address with a domain stays as it is.
pub fn qualify(addr: &str, domain: &str) -> String {
    let has_domain = addr.rsplit_once('@').is_some_and(|(_, d)| !d.contains('"'));
    if has_domain {
        addr.to_owned()
    } else {
        format!("{addr}@{domain}")
    }
}

/// Adds the addresses in `list` (qualified) to `out`, skipping duplicates;
/// returns the ones that are not valid addresses.
fn add_recipients(list: &str, domain: &str, out: &mut Vec<String>) -> Vec<String> {
    let mut bad = Vec::new();
    for addr in parse_address_list(list) {
        if !is_valid_address(&addr) {
            bad.push(addr);
            continue;
        }
        let addr = qualify(&addr, domain);
        if !out.iter().any(|a| a.eq_ignore_ascii_case(&addr)) {
            out.push(addr);
        }
    }
    bad
}

// ---------------------------------------------------------------------------
// Reading the message.

/// A reader that turns every line ending (CRLF, lone CR, LF) into LF, so
/// everything after it sees LF-terminated lines only. A run of CRs that
/// ends in an LF is one line ending: `CR CR LF` is what a program that
/// converted LF to CRLF twice writes (a known PHP `mail()` problem), and
/// it must not end the header section after its first line. CRs not
/// followed by an LF are each a line ending (old Mac text).
pub struct Normalize<R> {
    inner: R,
    /// CRs seen in a row: one LF if an LF follows, else one each.
    crs: usize,
    /// Line endings decided on and not yet given out.
    owed: usize,
}

impl<R: BufRead> Normalize<R> {
    pub fn new(inner: R) -> Normalize<R> {
        Normalize {
            inner,
            crs: 0,
            owed: 0,
        }
    }
}

impl<R: BufRead> Read for Normalize<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.owed > 0 {
                let n = self.owed.min(out.len());
                out[..n].fill(b'\n');
                self.owed -= n;
                return Ok(n);
            }
            let input = self.inner.fill_buf()?;
            if input.is_empty() {
                // The end: CRs left over are line endings of their own.
                self.owed = std::mem::take(&mut self.crs);
                if self.owed == 0 {
                    return Ok(0);
                }
                continue;
            }
            let (mut used, mut w) = (0, 0);
            while used < input.len() && w < out.len() {
                match input[used] {
                    b'\r' => self.crs += 1,
                    b'\n' => {
                        self.crs = 0;
                        out[w] = b'\n';
                        w += 1;
                    }
                    _ if self.crs > 0 => {
                        // Lone CRs: each a line ending, given out before
                        // this byte, which is read again after them.
                        self.owed = std::mem::take(&mut self.crs);
                        break;
                    }
                    b => {
                        out[w] = b;
                        w += 1;
                    }
                }
                used += 1;
            }
            self.inner.consume(used);
            if w > 0 {
                return Ok(w);
            }
        }
    }
}

/// The longest line SMTP carries, without its CRLF (RFC 5321 4.5.3.1.6).
const MAX_LINE: usize = crate::smtp::data::MAX_LINE;

/// Turns LF-terminated lines into CRLF-terminated, dot-stuffed DATA
/// (RFC 5321 4.5.2), and, unless told to ignore dots, finds the line with a
/// single "." that ends the input. A line longer than SMTP allows is broken
/// by inserting CRLF and a space, as Postfix does (`smtp_line_length_limit`):
/// in a header field that is folding, and a body line arrives in pieces
/// rather than not at all. Sans-IO: bytes in, bytes out.
#[derive(Debug)]
pub struct Encoder {
    stop_at_dot: bool,
    line_start: bool,
    /// Octets of the current output line, without a dot added for
    /// transparency.
    line_len: usize,
    /// Dots added for transparency so far: the output is this much longer
    /// than the message the daemon will count.
    pub stuffed: u64,
    /// The current line so far is exactly "." (only when `stop_at_dot`).
    dot_pending: bool,
    ended: bool,
}

impl Encoder {
    pub fn new(stop_at_dot: bool) -> Encoder {
        Encoder {
            stop_at_dot,
            line_start: true,
            line_len: 0,
            stuffed: 0,
            dot_pending: false,
            ended: false,
        }
    }

    /// Encodes `input` onto `out`. Returns true once the "." line has been
    /// seen: the message ends there and no more input may be read.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        if self.ended {
            return true;
        }
        for &b in input {
            if self.dot_pending {
                self.dot_pending = false;
                if b == b'\n' {
                    self.ended = true;
                    return true;
                }
                out.extend_from_slice(b"..");
                self.stuffed += 1;
            }
            if b != b'\n' && self.line_len == MAX_LINE {
                out.extend_from_slice(b"\r\n ");
                self.line_len = 1;
            }
            match b {
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    self.line_len = 0;
                }
                b'.' if self.line_start => {
                    if self.stop_at_dot {
                        self.dot_pending = true;
                    } else {
                        out.extend_from_slice(b"..");
                        self.stuffed += 1;
                    }
                    self.line_start = false;
                    self.line_len = 1;
                }
                _ => {
                    out.push(b);
                    self.line_start = false;
                    self.line_len += 1;
                }
            }
        }
        false
    }

    /// At the end of input: ends an unterminated last line with CRLF (a
    /// lone "." there is the end marker and is dropped). Afterwards the
    /// caller sends ".\r\n".
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if self.dot_pending {
            self.dot_pending = false;
            return;
        }
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The header section as read from stdin.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One entry per field, folded lines joined by LF, no final LF.
    pub fields: Vec<Vec<u8>>,
    /// The first body line when the body began without an empty line (a
    /// line that is not a header field), with its LF if it had one.
    pub first_body_line: Option<Vec<u8>>,
    /// The input ended within the header section (EOF or a "." line).
    pub input_ended: bool,
}

/// Why the message cannot be read.
#[derive(Debug)]
pub enum ReadError {
    /// More than [`MAX_HEADER`] bytes without the end of the header section.
    HeaderTooLong,
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// True if `line` starts a header field: a name of printable ASCII (no
/// colon, optional trailing white space, RFC 5322 obs-syntax) and a colon.
fn is_field_start(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = &line[..colon];
    let end = name
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    end > 0 && name[..end].iter().all(|&b| (33..=126).contains(&b))
}

impl Header {
    /// Reads the header section from LF-only input (see [`Normalize`]): up
    /// to the empty line (consumed), the first line that is not a header
    /// field (kept as [`Header::first_body_line`]), or the end of input.
    /// Input that does not start with a header field is all body. A leading
    /// mbox "From " line is dropped.
    pub fn read(input: &mut impl BufRead, stop_at_dot: bool) -> Result<Header, ReadError> {
        let mut h = Header::default();
        let mut total = 0usize;
        let mut first = true;
        loop {
            let mut line = Vec::new();
            let limit = (MAX_HEADER - total + 1) as u64;
            let first_part = limit.min(LONG_LINE);
            input
                .by_ref()
                .take(first_part)
                .read_until(b'\n', &mut line)?;
            if first_part == LONG_LINE
                && line.len() as u64 == LONG_LINE
                && line.last() != Some(&b'\n')
            {
                // Field names as real ones are (letters, digits, '-'), so
                // compact JSON such as {"log":"..."} is no header field.
                let name = line.iter().position(|&b| b == b':').map(|i| &line[..i]);
                let field = name.is_some_and(|n| {
                    !n.is_empty() && n.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                });
                let header_like = (matches!(line[0], b' ' | b'\t') && !h.fields.is_empty())
                    || field
                    || (first && line.starts_with(b"From "));
                if !header_like {
                    // One long line that is no header field (one-line JSON
                    // with no header): the body starts here, and the rest
                    // of the line follows from the input.
                    h.first_body_line = Some(line);
                    return Ok(h);
                }
                input
                    .by_ref()
                    .take(limit - first_part)
                    .read_until(b'\n', &mut line)?;
            }
            total += line.len();
            if total > MAX_HEADER {
                return Err(ReadError::HeaderTooLong);
            }
            if line.is_empty() {
                h.input_ended = true;
                return Ok(h);
            }
            let had_lf = line.last() == Some(&b'\n');
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if stop_at_dot && text == b"." {
                h.input_ended = true;
                return Ok(h);
            }
            if first && text.starts_with(b"From ") {
                first = false;
                continue;
            }
            first = false;
            if text.is_empty() {
                return Ok(h);
            }
            let continuation = matches!(text[0], b' ' | b'\t');
            match h.fields.last_mut() {
                Some(field) if continuation => {
                    field.push(b'\n');
                    field.extend_from_slice(text);
                }
                _ if is_field_start(text) => h.fields.push(text.to_vec()),
                _ => {
                    let mut body = text.to_vec();
                    if had_lf {
                        body.push(b'\n');
                    }
                    h.first_body_line = Some(body);
                    return Ok(h);
                }
            }
        }
    }

    /// The field's name (before the colon, trimmed).
    fn name(field: &[u8]) -> &[u8] {
        let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
        field[..colon].trim_ascii_end()
    }

    /// True if a field called `name` (ASCII case-insensitive) is present.
    pub fn has(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|f| Header::name(f).eq_ignore_ascii_case(name.as_bytes()))
    }

    /// The unfolded values of every field called `name`.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.fields
            .iter()
            .filter(|f| Header::name(f).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| {
                let colon = f.iter().position(|&b| b == b':').unwrap_or(0);
                let value: Vec<u8> = f[colon + 1..]
                    .iter()
                    .copied()
                    .filter(|&b| b != b'\n')
                    .collect();
                String::from_utf8_lossy(&value).trim().to_owned()
            })
            .collect()
    }

    /// Removes every field called `name`.
    pub fn remove(&mut self, name: &str) {
        self.fields
            .retain(|f| !Header::name(f).eq_ignore_ascii_case(name.as_bytes()));
    }

    /// The recipients `-t` takes: every address in To, Cc and Bcc, or, in
    /// a message being resent (RFC 5322 3.6.6), in Resent-To, Resent-Cc
    /// and Resent-Bcc only, as Postfix's cleanup does.
    pub fn recipient_lists(&self) -> Vec<String> {
        const RESENT: [&str; 3] = ["Resent-To", "Resent-Cc", "Resent-Bcc"];
        let names = if RESENT.iter().any(|n| self.has(n)) {
            RESENT
        } else {
            ["To", "Cc", "Bcc"]
        };
        names.iter().flat_map(|n| self.values(n)).collect()
    }
}

/// What goes into the header fields sendmail adds.
#[derive(Debug, Clone)]
pub struct Added {
    /// The address for `From:`.
    pub from: String,
    /// `-F`: the display name.
    pub full_name: Option<String>,
    /// Unix seconds, for `Date:`.
    pub now: u64,
    /// The `Message-ID:` value, angle brackets included.
    pub message_id: String,
}

/// The fields to add, each without line ending: only those missing.
pub fn missing_fields(header: &Header, added: &Added) -> Vec<String> {
    let mut out = Vec::new();
    if !header.has("From") {
        let from = match added.full_name.as_deref().map(display_name) {
            Some(name) if !name.is_empty() => format!("From: {name} <{}>", added.from),
            _ => format!("From: <{}>", added.from),
        };
        out.push(from);
    }
    if !header.has("Date") {
        out.push(format!("Date: {}", crate::date::rfc5322(added.now)));
    }
    if !header.has("Message-ID") {
        out.push(format!("Message-ID: {}", added.message_id));
    }
    out
}

/// A display name as an RFC 5322 phrase: atoms and spaces as they are,
/// anything else as a quoted string. Control characters are dropped.
fn display_name(name: &str) -> String {
    let name: String = name.chars().filter(|c| !c.is_control()).collect();
    let name = name.trim();
    let atom = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~ ".contains(c);
    if name.chars().all(atom) {
        return name.to_owned();
    }
    let mut q = String::from("\"");
    for c in name.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A Message-ID unique enough without a random-number crate: time, pid and
/// a per-process random hash key.
fn message_id(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = RandomState::new().build_hasher();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    format!(
        "<{}.{}.{:016x}@{hostname}>",
        now.as_secs(),
        std::process::id(),
        h.finish()
    )
}

/// The submitting user's login, for the added `From:` and the default
/// sender (the daemon takes the real identity from the socket): as the
/// daemon finds it from SO_PEERCRED, the passwd entry's name, or `uid<N>`
/// without one.
fn login() -> String {
    crate::local::login_of(nix::unistd::getuid().as_raw())
}

// ---------------------------------------------------------------------------
// Errors.

/// Why sendmail failed; each maps to a sysexits.h code.
#[derive(Debug)]
pub enum Error {
    Usage(String),
    DataErr(String),
    NoRecipient,
    /// The daemon refused (a 5xx).
    Refused(String),
    /// Try again later: the daemon is busy, gave a 4xx, or the connection
    /// broke before the message was accepted.
    TempFail(String),
    /// A `TempFail` once the message was sent: the daemon may have stored
    /// it for some recipients, so it is never sent again on its own.
    TempFailSent(String),
    NotRunning(PathBuf),
    Permission(String),
    Config(String),
    Io(String),
    /// A later transaction failed after earlier ones had given the message
    /// to `sent` recipients: the exit code is the failure's, and the text
    /// says who has the message and who has not.
    Partial {
        sent: usize,
        unsent: Vec<String>,
        cause: Box<Error>,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Partial { cause, .. } => cause.exit_code(),
            Error::Usage(_) => exit::USAGE,
            Error::DataErr(_) => exit::DATAERR,
            Error::NoRecipient => exit::NOUSER,
            Error::Refused(_) => exit::UNAVAILABLE,
            Error::TempFail(_) | Error::TempFailSent(_) | Error::NotRunning(_) => exit::TEMPFAIL,
            Error::Permission(_) => exit::NOPERM,
            Error::Config(_) => exit::CONFIG,
            Error::Io(_) => exit::IOERR,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::DataErr(m) | Error::Config(m) | Error::Io(m) => f.write_str(m),
            Error::NoRecipient => f.write_str("no recipient accepted; message not sent"),
            Error::Refused(m) => write!(f, "{m}; message not sent"),
            Error::TempFail(m) | Error::TempFailSent(m) => {
                write!(f, "{m}; message not sent, try again later")
            }
            Error::NotRunning(p) => write!(
                f,
                "postling is not running (no {}); message not sent",
                p.display()
            ),
            Error::Permission(m) => write!(f, "{m}; message not sent"),
            Error::Partial {
                sent,
                unsent,
                cause,
            } => {
                let why = match cause.as_ref() {
                    Error::Refused(m)
                    | Error::TempFail(m)
                    | Error::TempFailSent(m)
                    | Error::DataErr(m)
                    | Error::Io(m) => m.clone(),
                    other => other.to_string(),
                };
                write!(
                    f,
                    "{why}; the message went to {sent} recipient(s) but not to {} \
                     (trying again sends the first ones another copy)",
                    unsent.join(", ")
                )
            }
        }
    }
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Error {
        match e {
            ReadError::HeaderTooLong => Error::DataErr("header too long".into()),
            ReadError::Io(e) => Error::Io(format!("reading the message: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------
// The client.

/// One SMTP connection to the daemon, blocking.
pub(crate) struct Conn {
    stream: UnixStream,
    parser: ReplyParser,
}

impl Conn {
    fn connect(path: &Path, timeout: Option<Duration>) -> Result<Conn, Error> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                Error::NotRunning(path.to_path_buf())
            }
            io::ErrorKind::PermissionDenied => {
                Error::Permission(format!("{}: {e}", path.display()))
            }
            _ => Error::TempFail(format!("{}: {e}", path.display())),
        })?;
        Conn::over(stream, timeout).map_err(|e| Error::TempFail(format!("{}: {e}", path.display())))
    }

    /// A connection on a socket already open (the pickup's socket pair).
    pub(crate) fn over(stream: UnixStream, timeout: Option<Duration>) -> io::Result<Conn> {
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        Ok(Conn {
            stream,
            parser: ReplyParser::new(),
        })
    }

    fn reply(&mut self) -> Result<ServerReply, Error> {
        let mut buf = [0u8; 4096];
        loop {
            match self.parser.next() {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(broken(&format!("bad reply from the daemon: {e}"))),
            }
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|e| broken(&e.to_string()))?;
            if n == 0 {
                return Err(broken("the daemon closed the connection"));
            }
            self.parser.feed(&buf[..n]);
        }
    }

    fn command(&mut self, line: &str) -> Result<ServerReply, Error> {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| broken(&e.to_string()))?;
        self.reply()
    }

    /// Sends QUIT and ignores the outcome: the transaction is already over.
    fn quit(&mut self) {
        let _ = self.command("QUIT");
    }
}

fn broken(why: &str) -> Error {
    Error::TempFail(format!("submission failed: {why}"))
}

/// A reply that is not what was hoped for, as an error.
fn refusal(what: &str, r: &ServerReply) -> Error {
    let m = format!("{what}: {}", r.one_line());
    if r.is_transient() {
        Error::TempFail(m)
    } else {
        Error::Refused(m)
    }
}

/// Loads the config: `-C FILE`, else the installed one if it exists, else
/// the built-in defaults (as `postling queue` finds it).
fn load_config(path: Option<PathBuf>) -> Result<Config, Error> {
    let flags = Flags {
        config: crate::config::installed_or(path),
        client: true,
        ..Flags::default()
    };
    crate::config::load(&flags).map_err(|e| Error::Config(e.to_string()))
}

/// The binary invoked as `sendmail`, or `postling sendmail ARGS`: `args`
/// are the arguments after argv[0] (or after `sendmail`), taken raw.
pub fn main(argv0: &str, args: &[String]) -> ExitCode {
    let _ = argv0;
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sendmail: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(code)
}

fn run(args: &[String]) -> Result<u8, Error> {
    let opts = parse_args(args).map_err(Error::Usage)?;
    if opts.mode == Mode::Deliver && opts.recipients.is_empty() && !opts.recipients_from_headers {
        return Err(Error::Usage("no recipients".into()));
    }
    // Every mode but newaliases needs the config; a broken one must not
    // fail the package scripts that call newaliases.
    let config = || load_config(opts.config.clone());
    match opts.mode {
        Mode::NewAliases => {
            eprintln!(
                "sendmail: nothing to rebuild: postling reads the aliases file itself, at start \
                 and on reload; run `systemctl reload postling` for a change to take effect"
            );
            Ok(exit::OK)
        }
        Mode::ListQueue => queue(crate::queue_cli::Command::List { json: false }, &config()?),
        Mode::Flush => queue(crate::queue_cli::Command::Flush(None), &config()?),
        Mode::Smtp => smtp_proxy(&config()?),
        Mode::Deliver => {
            let config = config()?;
            let stdin = io::stdin();
            let mut input = BufReader::with_capacity(CHUNK, Normalize::new(stdin.lock()));
            submit(&opts, &config, &mut input, &mut io::stderr())
        }
    }
}

/// `-bp` and `-q`: the queue tools.
fn queue(cmd: crate::queue_cli::Command, config: &Config) -> Result<u8, Error> {
    let mut out = io::stdout().lock();
    match crate::queue_cli::run(&cmd, &config.data_dir, &mut out) {
        Ok(()) => Ok(exit::OK),
        Err(e) => {
            eprintln!("sendmail: {e}");
            Ok(e.exit_code())
        }
    }
}

/// `-bs`: copies stdin (line endings made CRLF) to the daemon and the
/// daemon's replies to stdout, until the daemon closes the connection.
fn smtp_proxy(config: &Config) -> Result<u8, Error> {
    let path = config.data_dir.join(SUBMIT_SOCKET);
    // No client timeout: the daemon's command and data timeouts apply.
    let conn = Conn::connect(&path, None)?;
    let mut to_daemon = conn
        .stream
        .try_clone()
        .map_err(|e| Error::Io(e.to_string()))?;
    std::thread::spawn(move || {
        let mut input = BufReader::new(Normalize::new(io::stdin().lock()));
        let mut line = Vec::new();
        loop {
            line.clear();
            match input.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            line.extend_from_slice(b"\r\n");
            if to_daemon.write_all(&line).is_err() {
                break;
            }
        }
        let _ = to_daemon.shutdown(std::net::Shutdown::Write);
    });
    let mut from_daemon = &conn.stream;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match from_daemon.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(format!("{}: {e}", path.display()))),
        };
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(exit::OK)
}

/// Reads the message from `input` (LF-only, see [`Normalize`]) and submits
/// it to the daemon. Per-recipient refusals go to `diag`.
fn submit(
    opts: &Options,
    config: &Config,
    input: &mut impl BufRead,
    diag: &mut dyn Write,
) -> Result<u8, Error> {
    let domain = config.local.first_domain();
    let mut recipients = Vec::new();
    for arg in &opts.recipients {
        let bad = add_recipients(arg, domain, &mut recipients);
        if let Some(b) = bad.first() {
            return Err(Error::Usage(format!("{b:?}: not a valid address")));
        }
    }
    let mut header = Header::read(input, !opts.ignore_dots)?;
    if opts.recipients_from_headers {
        for list in header.recipient_lists() {
            for b in add_recipients(&list, domain, &mut recipients) {
                let _ = writeln!(diag, "sendmail: {b:?}: not a valid address, skipped");
            }
        }
    }
    // Bcc is never sent on: it would tell every recipient who else got it.
    header.remove("Bcc");
    header.remove("Resent-Bcc");
    if recipients.is_empty() {
        return Err(Error::Usage("no recipients".into()));
    }
    let login = login();
    let sender = match opts.sender.as_deref().map(str::trim) {
        Some(s) => {
            let s = s
                .strip_prefix('<')
                .and_then(|s| s.strip_suffix('>'))
                .unwrap_or(s);
            if s.is_empty() {
                String::new()
            } else if is_valid_address(s) {
                qualify(s, domain)
            } else {
                return Err(Error::Usage(format!("{s:?}: not a valid sender address")));
            }
        }
        None => config.local.own_address(&login),
    };
    // The daemon keeps `-f` only for root and `local.trusted_users`; for
    // anyone else an added From: must name the sender it will really use.
    let trusted = nix::unistd::getuid().is_root() || config.local.trusted_users.contains(&login);
    let added = Added {
        from: if sender.is_empty() || !trusted {
            config.local.own_address(&login)
        } else {
            sender.clone()
        },
        full_name: opts.full_name.clone(),
        now: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        message_id: message_id(&config.hostname),
    };

    let mut spool = spool_file()?;
    let limit = config.limits.max_message_size;
    write_data(&mut spool, &header, &added, input, !opts.ignore_dots, limit)?;
    let end = (spool.metadata())
        .map_err(|e| Error::Io(format!("reading the kept message: {e}")))?
        .len();

    let path = config.data_dir.join(SUBMIT_SOCKET);
    // A non-ASCII address needs SMTPUTF8 (RFC 6531), which the daemon
    // offers; asked for only then, as Postfix's sendmail does.
    let utf8 = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
    let mut msg = Outgoing {
        sender: &sender,
        utf8,
        file: &mut spool,
        start: 0,
        end,
    };
    let mut todo = &recipients[..];
    let mut sent = 0;
    let mut waiting = Waiting::new(config.local.sendmail_wait);
    let mut maildrop = true;
    while !todo.is_empty() {
        let result = Conn::connect(&path, Some(SOCKET_TIMEOUT)).and_then(|conn| {
            transaction(conn, &mut msg, todo, &mut |rcpt, r| {
                if let Some(rcpt) = rcpt {
                    let _ = writeln!(diag, "sendmail: {rcpt}: {}", r.one_line());
                }
            })
        });
        let e = match result {
            Ok((accepted, rest)) => {
                sent += accepted;
                todo = rest;
                continue;
            }
            Err(e) => e,
        };
        // The daemon is down, but has made its maildrop: the message waits
        // there for it, as with Postfix's postdrop.
        if maildrop && matches!(e, Error::NotRunning(_)) {
            match crate::maildrop::write(&config.data_dir, &mut msg, todo) {
                // Silent, as Postfix's sendmail is: cron would mail a note
                // on stderr to the user as one more message.
                Ok(Some(_)) => {
                    sent += todo.len();
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = writeln!(
                        diag,
                        "sendmail: cannot leave the message in the maildrop: {e}"
                    );
                }
            }
            maildrop = false;
        }
        if waiting.again(&e, diag) {
            continue;
        }
        if sent > 0 {
            return Err(Error::Partial {
                sent,
                unsent: todo.to_vec(),
                cause: Box::new(e),
            });
        }
        return Err(e);
    }
    if sent > 0 {
        Ok(exit::OK)
    } else {
        Err(Error::NoRecipient)
    }
}

/// Tries again, for up to `local.sendmail_wait`, a transaction that failed
/// for now before the message was sent: the daemon is not running (a
/// restart, a boot where cron is first), at its connection cap, or gave a
/// 4xx to a command. A failure after the message was sent is not tried
/// again (the daemon may have stored it). Nothing is kept when
/// sendmail exits, so waiting here is what keeps cron's mail.
struct Waiting {
    until: Instant,
    pause: Duration,
    told: bool,
}

impl Waiting {
    fn new(wait: Duration) -> Waiting {
        Waiting {
            until: Instant::now() + wait,
            pause: Duration::from_secs(1),
            told: false,
        }
    }

    /// Sleeps and returns true if `e` is worth another try and there is
    /// time left; says so on `diag` the first time.
    fn again(&mut self, e: &Error, diag: &mut dyn Write) -> bool {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let why = match e {
            Error::TempFail(m) => m.clone(),
            Error::NotRunning(p) => format!("postling is not running (no {})", p.display()),
            _ => return false,
        };
        if !self.told {
            let _ = writeln!(
                diag,
                "sendmail: {why}; trying again for {}s",
                left.as_secs()
            );
            self.told = true;
        }
        std::thread::sleep(self.pause.min(left));
        self.pause = (self.pause * 2).min(Duration::from_secs(10));
        true
    }
}

/// A message as the client sends it: the envelope sender asked for,
/// whether it needs SMTPUTF8, and the DATA stream (CRLF, dot-stuffed, the
/// final dot included): the bytes of `file` from `start` to `end`.
pub(crate) struct Outgoing<'a> {
    pub sender: &'a str,
    pub utf8: bool,
    pub file: &'a mut std::fs::File,
    pub start: u64,
    pub end: u64,
}

impl Outgoing<'_> {
    /// Copies the DATA stream into `out`.
    pub(crate) fn copy_to(&mut self, out: &mut impl Write) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(self.start))?;
        let n = io::copy(
            &mut Read::by_ref(self.file).take(self.end - self.start),
            out,
        )?;
        if n != self.end - self.start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the kept message is shorter than it was",
            ));
        }
        Ok(n)
    }
}

/// Told of each permanent refusal: `Some(recipient)` for a refused
/// `RCPT`, `None` when `MAIL` or the message itself was refused (every
/// recipient of the transaction, and of any later one, fails with it).
pub(crate) type Refused<'a> = dyn FnMut(Option<&str>, &ServerReply) + 'a;

/// One transaction on `conn`, a connection of its own (so the daemon's
/// per-session limits, such as `max_errors`, start afresh): the message
/// to as many of `todo` as the daemon takes at once. Returns how many took
/// it and the recipients left for the next transaction (after a `452`,
/// RFC 5321 4.5.3.1.10); permanent refusals go to `refused`.
pub(crate) fn transaction<'r>(
    mut conn: Conn,
    msg: &mut Outgoing<'_>,
    todo: &'r [String],
    refused: &mut Refused<'_>,
) -> Result<(usize, &'r [String]), Error> {
    let greeting = conn.reply()?;
    if greeting.code != 220 {
        return Err(refusal("greeting", &greeting));
    }
    let r = conn.command("EHLO localhost")?;
    if r.code != 250 {
        conn.quit();
        return Err(refusal("EHLO", &r));
    }
    let param = if msg.utf8 { " SMTPUTF8" } else { "" };
    let sender = msg.sender;
    let r = conn.command(&format!("MAIL FROM:<{sender}>{param}"))?;
    if r.code != 250 {
        conn.quit();
        if !r.is_transient() {
            refused(None, &r);
        }
        return Err(refusal(&format!("<{sender}>"), &r));
    }
    let mut accepted = 0;
    let mut rest: &[String] = &[];
    for (k, rcpt) in todo.iter().enumerate() {
        let r = conn.command(&format!("RCPT TO:<{rcpt}>"))?;
        if r.is_positive() {
            accepted += 1;
        } else if r.code == 452 && accepted > 0 {
            // Too many recipients for one transaction: these get the
            // message, the rest the same message in the next one.
            rest = &todo[k..];
            break;
        } else if r.is_transient() {
            // Sending to the others now would make a retry a duplicate for
            // them: give up on the whole message, the caller retries it.
            conn.quit();
            return Err(refusal(rcpt, &r));
        } else {
            refused(Some(rcpt), &r);
        }
    }
    if accepted > 0 {
        // From here a failure may come after the daemon stored the message
        // (a 451 for a later copy, a connection lost before its 250): no
        // retry, which could deliver it twice.
        send_spooled(&mut conn, msg, refused).map_err(|e| match e {
            Error::TempFail(m) => Error::TempFailSent(m),
            e => e,
        })?;
    }
    conn.quit();
    Ok((accepted, rest))
}

/// An unnamed, private file for the message: in `$TMPDIR` when it is set
/// and usable, else in `/tmp`; created with a fresh name, mode 0600, and
/// unlinked at once, so nothing is left behind however sendmail ends.
fn spool_file() -> Result<std::fs::File, Error> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("TMPDIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("/tmp"));
    let mut last = None;
    for dir in dirs {
        match unnamed_file_in(&dir) {
            Ok(file) => return Ok(file),
            Err(e) => last = Some(format!("cannot keep the message in {}: {e}", dir.display())),
        }
    }
    Err(Error::TempFail(last.unwrap_or_default()))
}

fn unnamed_file_in(dir: &Path) -> io::Result<std::fs::File> {
    // The store's private create (0600, create_new, no symlink followed)
    // under one of its ids, unique in this process and across processes.
    let path = dir.join(format!(".postling-sendmail.{}", crate::store::new_id()));
    let file = crate::store::create_file(&path, true)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// DATA, the spooled message, and the daemon's verdict on it.
fn send_spooled(
    conn: &mut Conn,
    msg: &mut Outgoing<'_>,
    refused: &mut Refused<'_>,
) -> Result<(), Error> {
    let r = conn.command("DATA")?;
    if r.code != 354 {
        conn.quit();
        if !r.is_transient() {
            refused(None, &r);
        }
        return Err(refusal("DATA", &r));
    }
    let copied = msg
        .copy_to(&mut conn.stream)
        .map_err(|e| broken(&e.to_string()));
    let r = match copied {
        Ok(_) => conn.reply()?,
        // The daemon may have given up on us (size): its reply, if any,
        // says why.
        Err(Error::TempFail(m)) => match conn.reply() {
            Ok(r) if !r.is_positive() => r,
            _ => return Err(Error::TempFail(m)),
        },
        Err(e) => return Err(e),
    };
    if r.code == 250 {
        return Ok(());
    }
    conn.quit();
    if !r.is_transient() {
        refused(None, &r);
    }
    Err(final_error(&r))
}

/// The error for a refused message (the reply to the final dot).
fn final_error(r: &ServerReply) -> Error {
    let m = format!("message refused: {}", r.one_line());
    if r.is_transient() {
        Error::TempFail(m)
    } else if r.code == 552 || r.code == 554 {
        Error::DataErr(format!("{m}; message not sent"))
    } else {
        Error::Refused(m)
    }
}

/// Writes the message as DATA into `out` (the spool): header fields, the
/// added ones, the empty line, the body from `input`, and the final dot.
/// A message over `limit` octets as the daemon counts them (without the
/// dots added for transparency) is refused here, before the temporary
/// directory fills up with what the daemon would refuse anyway.
fn write_data(
    out: &mut impl Write,
    header: &Header,
    added: &Added,
    input: &mut impl BufRead,
    stop_at_dot: bool,
    limit: u64,
) -> Result<(), Error> {
    let mut w = BufWriter::with_capacity(CHUNK, out);
    let mut enc = Encoder::new(stop_at_dot);
    let mut buf = Vec::with_capacity(2 * CHUNK);
    let mut head = Vec::new();
    for f in &header.fields {
        head.extend_from_slice(f);
        head.push(b'\n');
    }
    for f in missing_fields(header, added) {
        head.extend_from_slice(f.as_bytes());
        head.push(b'\n');
    }
    head.push(b'\n');
    // Header lines cannot be the "." line (`Header::read` stops there), so
    // they only get CRLF and dot-stuffing here.
    let mut ended = enc.push(&head, &mut buf);
    if let Some(line) = &header.first_body_line {
        ended = enc.push(line, &mut buf);
    }
    let mut written = 0u64;
    let mut keep = |w: &mut BufWriter<&mut _>, bytes: &[u8], stuffed: u64| -> Result<(), Error> {
        written += bytes.len() as u64;
        if written.saturating_sub(stuffed) > limit {
            return Err(Error::DataErr(format!(
                "message too big (over the {limit} octets of max_message_size); message not sent"
            )));
        }
        w.write_all(bytes)
            .map_err(|e| Error::TempFail(format!("cannot keep the message: {e}")))
    };
    keep(&mut w, &buf, enc.stuffed)?;
    if !ended && !header.input_ended {
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let n = match input.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Never let a half-read message through.
                    return Err(Error::Io(format!("reading the message: {e}")));
                }
            };
            buf.clear();
            let ended = enc.push(&chunk[..n], &mut buf);
            keep(&mut w, &buf, enc.stuffed)?;
            if ended {
                break;
            }
        }
    }
    buf.clear();
    enc.finish(&mut buf);
    keep(&mut w, &buf, enc.stuffed)?;
    w.write_all(b".\r\n")
        .and_then(|()| w.flush())
        .map_err(|e| Error::TempFail(format!("cannot keep the message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags() {
        let d = Options::default;
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: Vec<(&str, Options)> = vec![
            (
                "root",
                Options {
                    recipients: r(&["root"]),
                    ..d()
                },
            ),
            (
                "-t -i",
                Options {
                    recipients_from_headers: true,
                    ignore_dots: true,
                    ..d()
                },
            ),
            (
                "-ti",
                Options {
                    recipients_from_headers: true,
                    ignore_dots: true,
                    ..d()
                },
            ),
            (
                "-oi a",
                Options {
                    ignore_dots: true,
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-oem -odb -odi -oQ/x -v a",
                Options {
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                // Postfix's ignored ones, some with a value.
                "-Am -c -e x -p smtp -x -t",
                Options {
                    recipients_from_headers: true,
                    ..d()
                },
            ),
            (
                "-bi",
                Options {
                    mode: Mode::NewAliases,
                    ..d()
                },
            ),
            (
                "-I",
                Options {
                    mode: Mode::NewAliases,
                    ..d()
                },
            ),
            (
                "-f me@x a",
                Options {
                    sender: Some("me@x".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-fme@x a",
                Options {
                    sender: Some("me@x".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-r me@x a",
                Options {
                    sender: Some("me@x".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-rme a",
                Options {
                    sender: Some("me".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-F Cron a",
                Options {
                    full_name: Some("Cron".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-C /x.toml a",
                Options {
                    config: Some("/x.toml".into()),
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-bs",
                Options {
                    mode: Mode::Smtp,
                    ..d()
                },
            ),
            (
                "-b s",
                Options {
                    mode: Mode::Smtp,
                    ..d()
                },
            ),
            (
                "-bp",
                Options {
                    mode: Mode::ListQueue,
                    ..d()
                },
            ),
            (
                "-bm a",
                Options {
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-q",
                Options {
                    mode: Mode::Flush,
                    ..d()
                },
            ),
            (
                "-q1h",
                Options {
                    mode: Mode::Flush,
                    ..d()
                },
            ),
            (
                "a -i",
                Options {
                    ignore_dots: true,
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
            (
                "-i -- -t b",
                Options {
                    ignore_dots: true,
                    recipients: r(&["-t", "b"]),
                    ..d()
                },
            ),
            (
                "a,b c",
                Options {
                    recipients: r(&["a,b", "c"]),
                    ..d()
                },
            ),
            (
                "-B8BITMIME -N never a",
                Options {
                    recipients: r(&["a"]),
                    ..d()
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_args(&args(line)), Ok(want), "{line}");
        }
        let bad = [
            ("-y", "unknown option -y"),
            ("--help", "unknown option --help"),
            ("-ty a", "unknown option -y"),
            ("-bd", "unsupported mode -bd"),
            ("-f", "option -f requires an argument"),
        ];
        for (line, want) in bad {
            assert_eq!(parse_args(&args(line)), Err(want.to_owned()), "{line}");
        }
    }

    #[test]
    fn address_lists() {
        let cases: &[(&str, &[&str])] = &[
            ("a@b", &["a@b"]),
            ("a@b, c@d", &["a@b", "c@d"]),
            ("root", &["root"]),
            ("John Doe <j@x.org>", &["j@x.org"]),
            ("\"Doe, John\" <j@x.org>, k@y", &["j@x.org", "k@y"]),
            ("j@x.org (John, Doe)", &["j@x.org"]),
            ("undisclosed-recipients:;", &[]),
            ("team: a@b, \"B\" <c@d>; e@f", &["a@b", "c@d", "e@f"]),
            ("<@relay.x,@r2:u@h>", &["u@h"]),
            ("\"john doe\"@x", &["\"john doe\"@x"]),
            ("", &[]),
            (" , ,", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_address_list(input), *want, "{input}");
        }
        assert!(is_valid_address("a@b"));
        assert!(is_valid_address("\"john doe\"@x"));
        assert!(!is_valid_address("a b@c"));
        assert!(!is_valid_address("a@b>\r\nRCPT TO:<c@d"));
        assert!(!is_valid_address(""));
        assert_eq!(qualify("root", "pi.lan"), "root@pi.lan");
        assert_eq!(qualify("a@b", "pi.lan"), "a@b");
        assert_eq!(qualify("\"a@b\"", "pi.lan"), "\"a@b\"@pi.lan");
    }

    fn read(input: &[u8], stop_at_dot: bool) -> (Header, Vec<u8>) {
        let mut r = BufReader::new(Normalize::new(input));
        let h = Header::read(&mut r, stop_at_dot).expect("header");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).expect("rest");
        (h, rest)
    }

    #[test]
    fn header_for_t() {
        let msg = b"From: cron@pi\nTo: Alice <alice@x>, bob\nCc: \"Doe, J\" <j@y>,\n  k@z (Kay)\nBCC: secret@w\nSubject: hi\n\nbody\n";
        let (mut h, rest) = read(msg, true);
        assert_eq!(rest, b"body\n");
        let mut rcpts = Vec::new();
        for list in h.recipient_lists() {
            assert!(add_recipients(&list, "pi.lan", &mut rcpts).is_empty());
        }
        assert_eq!(rcpts, ["alice@x", "bob@pi.lan", "j@y", "k@z", "secret@w"]);
        assert_eq!(h.values("cc"), ["\"Doe, J\" <j@y>,  k@z (Kay)"]);
        h.remove("Bcc");
        assert!(!h.has("bcc"));
        assert_eq!(h.fields.len(), 4);
        assert_eq!(h.fields[2], b"Cc: \"Doe, J\" <j@y>,\n  k@z (Kay)");

        // Groups, repeated fields, duplicates.
        let (h, _) = read(
            b"To: undisclosed-recipients:;\nTo: a@b\nCc: list: a@b, c@d;\n\n",
            true,
        );
        let mut rcpts = Vec::new();
        for list in h.recipient_lists() {
            add_recipients(&list, "pi.lan", &mut rcpts);
        }
        assert_eq!(rcpts, ["a@b", "c@d"]);

        // A resent message goes to its Resent- recipients only.
        let (h, _) = read(
            b"Resent-To: frank@x\nResent-Bcc: grace@y\nResent-From: root@pi\nTo: alice@z\n\n",
            true,
        );
        let mut rcpts = Vec::new();
        for list in h.recipient_lists() {
            add_recipients(&list, "pi.lan", &mut rcpts);
        }
        assert_eq!(rcpts, ["frank@x", "grace@y"]);
    }

    #[test]
    fn a_long_first_line_that_is_no_header_is_body_at_once() {
        let long = [
            b"The log follows ".to_vec(),
            vec![b'a'; 200_000],
            b"\nend\n".to_vec(),
        ]
        .concat();
        let (h, rest) = read(&long, true);
        assert!(h.fields.is_empty());
        let first = h.first_body_line.expect("body");
        assert_eq!(first.len() as u64, LONG_LINE);
        assert_eq!([first, rest].concat(), long);
        // A header field that long is still a header field.
        let field = [
            b"X-Long: ".to_vec(),
            vec![b'b'; 100_000],
            b"\n\nbody\n".to_vec(),
        ]
        .concat();
        let (h, rest) = read(&field, true);
        assert_eq!(h.fields.len(), 1);
        assert_eq!(h.fields[0].len(), 100_008);
        assert_eq!(rest, b"body\n");
    }

    #[test]
    fn header_boundaries() {
        // No header at all: everything is body.
        let (h, rest) = read(b"hello\nworld\n", true);
        assert!(h.fields.is_empty());
        assert_eq!(h.first_body_line.as_deref(), Some(&b"hello\n"[..]));
        assert_eq!(rest, b"world\n");
        // A non-header line ends the header section.
        let (h, rest) = read(b"Subject: x\nnot a header\nmore\n", true);
        assert_eq!(h.fields, [b"Subject: x".to_vec()]);
        assert_eq!(h.first_body_line.as_deref(), Some(&b"not a header\n"[..]));
        assert_eq!(rest, b"more\n");
        // EOF in the header; a "." line in the header ends the input.
        let (h, _) = read(b"Subject: x", true);
        assert!(h.input_ended && h.fields.len() == 1);
        let (h, rest) = read(b"Subject: x\n.\nTo: y\n", true);
        assert!(h.input_ended);
        assert_eq!(rest, b"To: y\n");
        let (h, _) = read(b"Subject: x\n.\nTo: y\n\n", false);
        assert!(!h.input_ended);
        assert_eq!(h.first_body_line.as_deref(), Some(&b".\n"[..]));
        // mbox "From " line dropped; obs "Name : value"; CRLF and CR input.
        let (h, rest) = read(
            b"From me Mon Jan 1\r\nSubject : x\rX-A: 1\r\n\r\nb\r\n",
            true,
        );
        assert_eq!(h.fields, [b"Subject : x".to_vec(), b"X-A: 1".to_vec()]);
        assert!(h.has("subject"));
        assert_eq!(rest, b"b\n");
        // Bounded.
        let mut big = b"X-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER));
        let mut r = BufReader::new(Normalize::new(&big[..]));
        assert!(matches!(
            Header::read(&mut r, true),
            Err(ReadError::HeaderTooLong)
        ));
        let many = b"X-A: 1\n".repeat(MAX_HEADER / 7 + 1);
        let mut r = BufReader::new(Normalize::new(&many[..]));
        assert!(matches!(
            Header::read(&mut r, true),
            Err(ReadError::HeaderTooLong)
        ));
    }

    /// Normalizes and encodes `input` in one go, as `send_data` does.
    fn encode(input: &[u8], stop_at_dot: bool) -> Vec<u8> {
        let mut norm = Vec::new();
        Normalize::new(input).read_to_end(&mut norm).expect("read");
        let mut enc = Encoder::new(stop_at_dot);
        let mut out = Vec::new();
        enc.push(&norm, &mut out);
        enc.finish(&mut out);
        out
    }

    #[test]
    fn line_ends_and_dots() {
        let cases: &[(&[u8], bool, &[u8])] = &[
            (b"a\nb\n", true, b"a\r\nb\r\n"),
            (b"a\r\nb\r\n", true, b"a\r\nb\r\n"),
            (b"a\rb\r", true, b"a\r\nb\r\n"),
            // A run of CRs before an LF is one line end (LF to CRLF twice);
            // lone CRs are one each.
            (b"a\r\rb", true, b"a\r\n\r\nb\r\n"),
            (b"a\r\r", true, b"a\r\n\r\n"),
            (b"a\r\r\r\nb", true, b"a\r\nb\r\n"),
            (
                b"To: x\r\r\nSubject: y\r\r\n\r\r\nz\r\r\n",
                true,
                b"To: x\r\nSubject: y\r\n\r\nz\r\n",
            ),
            (b"a\n\nb", true, b"a\r\n\r\nb\r\n"),
            (b"no newline", true, b"no newline\r\n"),
            (b"", true, b""),
            // Without -i a lone "." ends the message, whatever ends its line.
            (b"a\n.\nb\n", true, b"a\r\n"),
            (b"a\r\n.\r\nb\r\n", true, b"a\r\n"),
            (b"a\n.", true, b"a\r\n"),
            (b".\n", true, b""),
            // Other dot lines are stuffed.
            (b".a\n..\n. \n", true, b"..a\r\n...\r\n.. \r\n"),
            // With -i the "." line is kept (stuffed on the wire).
            (b"a\n.\nb\n", false, b"a\r\n..\r\nb\r\n"),
            (b".a\n", false, b"..a\r\n"),
            (b"a\n.", false, b"a\r\n..\r\n"),
            (b"x.\n", false, b"x.\r\n"),
        ];
        for (input, stop, want) in cases {
            assert_eq!(
                String::from_utf8_lossy(&encode(input, *stop)),
                String::from_utf8_lossy(want),
                "{:?} stop_at_dot={stop}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_failure_after_some_recipients_got_it_says_so() {
        let e = Error::Partial {
            sent: 100,
            unsent: vec!["u100@pi.lan".into(), "u101@pi.lan".into()],
            cause: Box::new(Error::TempFail("DATA: 451 4.3.0 disk full".into())),
        };
        assert_eq!(e.exit_code(), exit::TEMPFAIL);
        assert_eq!(
            e.to_string(),
            "DATA: 451 4.3.0 disk full; the message went to 100 recipient(s) but not to \
             u100@pi.lan, u101@pi.lan (trying again sends the first ones another copy)"
        );
    }

    #[test]
    fn lines_longer_than_smtp_allows_are_broken_with_crlf_space() {
        for len in [998, 999, 2500, 5000] {
            let line = vec![b'x'; len];
            let out = encode(&[&line[..], b"\n"].concat(), true);
            let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
            for l in &lines {
                assert!(l.len() <= MAX_LINE + 1, "{len}: a line of {}", l.len());
            }
            let pieces = if len <= MAX_LINE {
                1
            } else {
                1 + (len - MAX_LINE).div_ceil(MAX_LINE - 1)
            };
            assert_eq!(lines.len(), pieces + 1, "{len}");
            // Removing each inserted CRLF and space gives the line back.
            let mut joined = Vec::new();
            let mut i = 0;
            while i < out.len() {
                if out[i..].starts_with(b"\r\n ") {
                    i += 3;
                } else {
                    joined.push(out[i]);
                    i += 1;
                }
            }
            assert_eq!(joined, [&line[..], b"\r\n"].concat(), "{len}");
        }
        // A dot added for transparency is not counted.
        let dotted = [b".".to_vec(), vec![b'x'; MAX_LINE - 1], b"\n".to_vec()].concat();
        assert_eq!(
            encode(&dotted, true),
            [b"..".to_vec(), vec![b'x'; MAX_LINE - 1], b"\r\n".to_vec()].concat()
        );
    }

    #[test]
    fn normalize_gives_the_same_bytes_however_it_is_read() {
        // The rule in one go: a run of CRs and its LF is one line end, a run
        // of CRs without one is a line end each.
        fn reference(input: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut crs = 0;
            for &b in input {
                match b {
                    b'\r' => crs += 1,
                    b'\n' => {
                        crs = 0;
                        out.push(b'\n');
                    }
                    _ => {
                        out.extend(std::iter::repeat_n(b'\n', std::mem::take(&mut crs)));
                        out.push(b);
                    }
                }
            }
            out.extend(std::iter::repeat_n(b'\n', crs));
            out
        }
        let mut seed = 0x2545_f491_u32;
        for _ in 0..2000 {
            let input: Vec<u8> = (0..seed % 40)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    [b'\r', b'\n', b'.', b'a'][(seed % 4) as usize]
                })
                .collect();
            for (capacity, chunk) in [(1, 1), (2, 3), (3, 2), (5, 64)] {
                let mut n = Normalize::new(io::BufReader::with_capacity(capacity, &input[..]));
                let (mut got, mut buf) = (Vec::new(), vec![0; chunk]);
                loop {
                    let k = n.read(&mut buf).expect("read");
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                assert_eq!(got, reference(&input), "{input:?} {capacity}/{chunk}");
            }
        }
    }

    #[test]
    fn streaming_matches_one_go() {
        // Feeding one byte at a time (CRLF split across reads) gives the
        // same bytes.
        let input = b"a\r\n.\r\n.b\r\nc\rd\n.";
        for stop in [true, false] {
            let mut n = Normalize::new(io::Cursor::new(&input[..]));
            let mut enc = Encoder::new(stop);
            let mut out = Vec::new();
            let mut b = [0u8; 1];
            while n.read(&mut b).expect("read") == 1 {
                if enc.push(&b, &mut out) {
                    break;
                }
            }
            enc.finish(&mut out);
            assert_eq!(out, encode(input, stop), "stop_at_dot={stop}");
        }
    }

    #[test]
    fn added_fields_only_when_missing() {
        let added = Added {
            from: "alice@pi.lan".into(),
            full_name: None,
            now: 0,
            message_id: "<1.2.3@pi.lan>".into(),
        };
        let h = Header::default();
        assert_eq!(
            missing_fields(&h, &added),
            [
                "From: <alice@pi.lan>",
                "Date: Thu, 1 Jan 1970 00:00:00 +0000",
                "Message-ID: <1.2.3@pi.lan>"
            ]
        );
        let named = |n: &str| Added {
            full_name: Some(n.into()),
            ..added.clone()
        };
        assert_eq!(
            missing_fields(&h, &named("Cron Daemon"))[0],
            "From: Cron Daemon <alice@pi.lan>"
        );
        assert_eq!(
            missing_fields(&h, &named("Doe, \"J\""))[0],
            "From: \"Doe, \\\"J\\\"\" <alice@pi.lan>"
        );
        let h = Header {
            fields: vec![
                b"from: x@y".to_vec(),
                b"DATE: whenever".to_vec(),
                b"Message-Id: <a@b>".to_vec(),
            ],
            ..Header::default()
        };
        assert!(missing_fields(&h, &added).is_empty());
        let h = Header {
            fields: vec![b"Date: whenever".to_vec()],
            ..Header::default()
        };
        assert_eq!(
            missing_fields(&h, &added),
            ["From: <alice@pi.lan>", "Message-ID: <1.2.3@pi.lan>"]
        );
        let id = message_id("pi.lan");
        assert!(id.starts_with('<') && id.ends_with("@pi.lan>"), "{id}");
        assert_ne!(id, message_id("pi.lan"));
    }
}
