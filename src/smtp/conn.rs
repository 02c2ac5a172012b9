//! The blocking driver of one SMTP session: a thin loop between a socket, the
//! sans-IO `Session`, the DATA decoder and delivery.
//!
//! Owns line framing (RFC 5321 2.3.8: CRLF only; a bare CR or LF is refused),
//! the 512-octet command line limit (4.5.3.1.4), PIPELINING's output rule
//! (RFC 2920 3.2: replies are buffered and flushed before the server would
//! block reading), the per-command and per-DATA deadlines (4.5.3.2, checked
//! against the clock so a client trickling one byte at a time cannot stretch
//! them), and noticing a shutdown. Memory per session is fixed: one input
//! buffer and a small output buffer, whatever the client sends.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, trace, warn};

use std::sync::Arc;

use rustls::{ServerConnection, StreamOwned};

use super::data::{DataDecoder, DataError};
use super::reply::{self, Reply};
use super::session::{Action, DataResult, Session};
use crate::config::{Config, ListenMode};
use crate::deliver;
use crate::server::Context;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF
/// (enforced by the session, which knows the verb).
pub const MAX_COMMAND_LINE: usize = 512;
/// What the line reader frames at most: RFC 4954 4 allows AUTH lines and
/// SASL responses of 12288 octets.
const MAX_FRAME: usize = 12288;
/// The pause after a failed AUTH, so guessing passwords is slow.
const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(2);
/// The input buffer; DATA is decoded in place in it.
const INPUT_BUFFER: usize = 16 * 1024;
/// Bytes per second a DATA transfer must average, beyond `data_timeout`.
const MIN_DATA_RATE: u64 = 1024;
/// How often a blocked read wakes up to check deadlines and shutdown.
const TICK: Duration = Duration::from_secs(1);

/// Seconds since the Unix epoch, for `Received:` dates.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One framed command line from the input buffer.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Command(&'a [u8]),
    TooLong,
    BareEnding,
}

/// Why the read loop stopped.
#[derive(Debug)]
enum End {
    /// The client closed the connection.
    Eof,
    /// The deadline passed.
    Timeout,
    /// The server is shutting down and the session is idle.
    Shutdown,
    Io(io::Error),
    /// We ended it: a failed TLS handshake, an early talker, a rate limit.
    Refused(String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Io(e)
    }
}

/// A fixed-size input buffer: `buf[start..end]` is unread.
struct Input {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Discarding the rest of an over-long line up to its CRLF.
    discarding: bool,
    /// While discarding, the last byte read was a CR.
    discard_cr: bool,
}

impl Input {
    fn new() -> Input {
        Input {
            buf: vec![0; INPUT_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            discarding: false,
            discard_cr: false,
        }
    }

    fn pending(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Frames the next command line from what is buffered; None means more
    /// input is needed. Never reads from the socket.
    fn take_line(&mut self) -> Option<Line<'_>> {
        if self.discarding {
            // The same CRLF rules as below, across reads: a bare CR or LF
            // ends nothing, it closes the connection.
            let pending = &self.buf[self.start..self.end];
            if self.discard_cr {
                let first = *pending.first()?;
                self.discard_cr = false;
                self.discarding = false;
                if first == b'\n' {
                    self.consume(1);
                    return Some(Line::TooLong);
                }
                return Some(Line::BareEnding);
            }
            return match pending.iter().position(|&b| b == b'\r' || b == b'\n') {
                Some(i) if pending[i] == b'\n' => {
                    self.discarding = false;
                    self.consume(i + 1);
                    Some(Line::BareEnding)
                }
                Some(i) if i + 1 == pending.len() => {
                    self.discard_cr = true;
                    self.consume(i + 1);
                    None
                }
                Some(i) if pending[i + 1] == b'\n' => {
                    self.discarding = false;
                    self.consume(i + 2);
                    Some(Line::TooLong)
                }
                Some(i) => {
                    self.discarding = false;
                    self.consume(i + 1);
                    Some(Line::BareEnding)
                }
                None => {
                    self.consume(pending.len());
                    None
                }
            };
        }
        let pending = &self.buf[self.start..self.end];
        let max = MAX_FRAME - 2;
        match pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) if pending[i] == b'\n' => {
                self.consume(i + 1);
                Some(Line::BareEnding)
            }
            Some(i) if i + 1 == pending.len() && i <= max => None, // CR, LF not here yet
            // Already too long, and the buffer may be full: discard it,
            // keeping the CR's place (its LF decides the error).
            Some(i) if i + 1 == pending.len() => {
                self.discarding = true;
                self.take_line()
            }
            Some(i) if pending[i + 1] != b'\n' => {
                self.consume(i + 1);
                Some(Line::BareEnding)
            }
            Some(i) if i > max => {
                self.consume(i + 2);
                Some(Line::TooLong)
            }
            Some(i) => {
                let start = self.start;
                self.consume(i + 2);
                Some(Line::Command(&self.buf[start..start + i]))
            }
            None if pending.len() > max => {
                self.discarding = true;
                self.consume(pending.len());
                self.take_line()
            }
            None => None,
        }
    }

    /// Drops everything buffered (before a TLS handshake: RFC 3207 5).
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.discarding = false;
        self.discard_cr = false;
    }

    /// Reads more input, waiting at most one TICK. Ok(false) means no bytes
    /// arrived in this tick.
    fn fill(&mut self, stream: &mut Stream) -> Result<bool, End> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // Cannot happen: lines are capped far below the buffer size and
            // DATA consumes everything it decodes. Refuse rather than spin.
            return Err(End::Io(io::Error::other("input buffer full")));
        }
        match stream.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(End::Eof),
            Ok(n) => {
                self.end += n;
                Ok(true)
            }
            Err(e) if crate::wait::is_retry(&e) => Ok(false),
            Err(e) => Err(End::Io(e)),
        }
    }
}

/// The connection, in clear or encrypted.
enum Stream {
    Plain(TcpStream),
    /// The sendmail submission socket.
    Unix(std::os::unix::net::UnixStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// Only while the TcpStream is moved into a handshake.
    Taken,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => read_tls_step(s, buf),
            Stream::Taken => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Reads plaintext with at most one socket read. rustls' own `read` keeps
/// reading until a whole record has arrived (up to 16 KiB), so a client
/// sending a byte a second would never let the caller look at its clock;
/// here a read that brings no plaintext yet is a `WouldBlock`, and the
/// caller checks its deadline before the next.
fn read_tls_step(
    s: &mut StreamOwned<ServerConnection, TcpStream>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match s.conn.reader().read(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        done => return done,
    }
    while s.conn.wants_write() {
        s.conn.write_tls(&mut s.sock)?;
    }
    if s.conn.read_tls(&mut s.sock)? == 0 {
        return Ok(0);
    }
    if let Err(e) = s.conn.process_new_packets() {
        let _ = s.conn.write_tls(&mut s.sock); // the alert
        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
    }
    s.conn.reader().read(buf)
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Taken => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Taken => Ok(()),
        }
    }
}

struct Conn<'a> {
    /// The configuration as it was when this connection arrived (SIGHUP
    /// applies to the next connections).
    config: Arc<Config>,
    stream: Stream,
    input: Input,
    output: Vec<u8>,
    ctx: &'a Context,
    peer: SocketAddr,
}

/// Runs one session to its end. Never panics on client input; logs one line
/// at connect and one at disconnect.
pub fn serve(stream: TcpStream, peer: SocketAddr, id: String, mode: ListenMode, ctx: &Context) {
    info!("session={id} connect from={peer}");
    let config = ctx.config();
    let limits = &config.limits;
    if let Err(e) = stream
        .set_read_timeout(Some(TICK))
        .and_then(|()| stream.set_write_timeout(Some(limits.command_timeout)))
        .and_then(|()| stream.set_nodelay(true))
    {
        warn!("session={id} socket setup failed: {e}");
        return;
    }
    let mut conn = Conn {
        config: Arc::clone(&config),
        stream: Stream::Plain(stream),
        input: Input::new(),
        output: Vec::with_capacity(512),
        ctx,
        peer,
    };
    let tls_ready = ctx.tls.is_some();
    let mut session = Session::new(&config, id, peer.ip(), mode, tls_ready);
    let end = conn
        .open(&mut session, mode)
        .and_then(|()| conn.run(&mut session));
    log_end(&session, end);
}

/// Runs one local submission (the sendmail socket): the peer's Unix user,
/// from SO_PEERCRED, is the identity; root and `local.trusted_users` may
/// choose their envelope sender.
pub fn serve_local(stream: std::os::unix::net::UnixStream, id: String, ctx: &Context) {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(&stream, PeerCredentials) {
        Ok(c) => serve_local_as(stream, id, ctx, c.uid(), &format!("pid={}", c.pid()), true),
        Err(e) => warn!("session={id} local connection without credentials: {e}"),
    }
}

/// [`serve_local`] for a client whose Unix user is known otherwise: `uid`
/// is the identity (the maildrop's pickup: the owner of the file), `origin`
/// says where it came from in the connect log line, and without `trust`
/// even root sends as its own address.
pub fn serve_local_as(
    stream: std::os::unix::net::UnixStream,
    id: String,
    ctx: &Context,
    uid: u32,
    origin: &str,
    trust: bool,
) {
    let login = crate::local::login_of(uid);
    let config = ctx.config();
    let trusted = trust && (uid == 0 || config.local.trusted_users.contains(&login));
    info!("session={id} connect from=local {origin} uid={uid} user={login}");
    let limits = &config.limits;
    if let Err(e) = stream
        .set_read_timeout(Some(TICK))
        .and_then(|()| stream.set_write_timeout(Some(limits.command_timeout)))
    {
        warn!("session={id} socket setup failed: {e}");
        return;
    }
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut conn = Conn {
        config: Arc::clone(&config),
        stream: Stream::Unix(stream),
        input: Input::new(),
        output: Vec::with_capacity(512),
        ctx,
        peer: loopback,
    };
    let mut session = Session::new(&config, id, loopback.ip(), ListenMode::Local, false);
    session.set_local_user(login, trusted);
    let end = conn
        .open(&mut session, ListenMode::Local)
        .and_then(|()| conn.run(&mut session));
    log_end(&session, end);
}

fn log_end(session: &Session, end: Result<(), End>) {
    match end {
        Ok(()) => info!("session={} disconnect", session.id()),
        Err(End::Eof) => info!("session={} disconnect: client closed", session.id()),
        Err(End::Timeout) => info!("session={} disconnect: timeout", session.id()),
        Err(End::Shutdown) => info!("session={} disconnect: shutting down", session.id()),
        Err(End::Io(e)) => info!("session={} disconnect: {e}", session.id()),
        Err(End::Refused(why)) => info!("session={} disconnect: {why}", session.id()),
    }
}

impl Conn<'_> {
    fn queue(&mut self, r: &Reply) {
        trace!("> {r}");
        r.write_to(&mut self.output);
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output)?;
            self.output.clear();
        }
        Ok(())
    }

    /// Sends a final reply, ignoring errors: the connection ends either way.
    fn close_with(&mut self, r: &Reply) {
        self.queue(r);
        let _ = self.flush();
    }

    /// Waits for input until `deadline`, flushing pending replies first
    /// (RFC 2920: never block with replies unsent). Closes idle sessions on
    /// shutdown.
    fn wait_input(&mut self, deadline: Instant, idle: bool) -> Result<(), End> {
        self.wait_input_or(deadline, idle, reply::command_timeout)
    }

    /// `wait_input`, with the reply to give when the deadline passes (made
    /// only then: the DATA loop calls this for every read).
    fn wait_input_or(
        &mut self,
        deadline: Instant,
        idle: bool,
        late: fn() -> Reply,
    ) -> Result<(), End> {
        self.flush()?;
        loop {
            if idle && self.ctx.shutdown.load(Ordering::Relaxed) {
                self.close_with(&reply::shutting_down());
                return Err(End::Shutdown);
            }
            // Checked on every wake-up, not only when the client is silent:
            // one byte a second must not stretch the deadline (slowloris).
            if Instant::now() >= deadline {
                self.close_with(&late());
                return Err(End::Timeout);
            }
            if self.input.fill(&mut self.stream)? {
                return Ok(());
            }
        }
    }

    /// Before the first command: the smtps handshake, the pre-greeting
    /// check (a client that talks before the 220 is no real MTA, RFC 5321
    /// 4.3.1), then the greeting.
    fn open(&mut self, session: &mut Session, mode: ListenMode) -> Result<(), End> {
        if mode == ListenMode::Smtps {
            self.handshake(session)?;
        } else if self.talks_first()? {
            self.close_with(&Reply::new(
                554,
                "5.5.0",
                "Protocol error: you talked before my greeting",
            ));
            return Err(End::Refused("spoke before the greeting".into()));
        }
        self.queue(&session.greeting());
        Ok(())
    }

    /// Waits `limits.greeting_delay` (or just looks, when it is zero) for
    /// bytes the client should not have sent yet.
    fn talks_first(&mut self) -> Result<bool, End> {
        let Stream::Plain(tcp) = &self.stream else {
            return Ok(false);
        };
        let peeked = match self.config.limits.greeting_delay {
            Some(wait) => {
                tcp.set_read_timeout(Some(wait))?;
                let r = tcp.peek(&mut [0u8; 1]);
                tcp.set_read_timeout(Some(TICK))?;
                r
            }
            None => crate::wait::peek_now(tcp),
        };
        Ok(matches!(peeked, Ok(n) if n > 0))
    }

    /// The TLS handshake on the plain stream (STARTTLS after its 220, or
    /// smtps at once), bounded by the command timeout.
    fn handshake(&mut self, session: &mut Session) -> Result<(), End> {
        let Some((_, config)) = &self.ctx.tls else {
            return Err(End::Refused("TLS requested but not configured".into()));
        };
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Taken) else {
            return Err(End::Refused("TLS is already active".into()));
        };
        let mut tls = ServerConnection::new(Arc::clone(config))
            .map_err(|e| End::Refused(format!("TLS setup: {e}")))?;
        let deadline = Instant::now() + self.config.limits.command_timeout;
        let mut tcp = tcp;
        let failed = |e: io::Error| {
            End::Refused(format!(
                "TLS handshake failed: {}",
                crate::tls::io_reason(&e)
            ))
        };
        // One socket read at a time, not rustls' `complete_io`, which goes
        // on reading while bytes trickle in: the deadline is checked after
        // every read.
        while tls.is_handshaking() {
            if Instant::now() >= deadline {
                return Err(End::Timeout);
            }
            while tls.wants_write() {
                tls.write_tls(&mut tcp).map_err(failed)?;
            }
            if !tls.is_handshaking() {
                break;
            }
            match tls.read_tls(&mut tcp) {
                Ok(0) => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let _ = tls.write_tls(&mut tcp); // the alert
                        return Err(failed(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                }
                Err(e) if crate::wait::is_retry(&e) => {}
                Err(e) => return Err(failed(e)),
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut tcp).map_err(failed)?;
        }
        session.tls_started(crate::tls::describe(&tls));
        self.stream = Stream::Tls(Box::new(StreamOwned::new(tls, tcp)));
        Ok(())
    }

    /// Checks credentials, with a pause after a failure and a cap on
    /// failures per client address.
    fn authenticate(&mut self, session: &mut Session, user: String, password: String) -> Action {
        let ip = self.peer.ip();
        if self
            .ctx
            .auth_failures
            .blocked(ip, self.config.auth.max_failures)
        {
            info!(
                "session={} auth refused: too many failures from {ip}",
                session.id()
            );
            return Action::Close(Reply::new(
                421,
                "4.7.0",
                "Too many failed authentications, try again later",
            ));
        }
        let ok = self.ctx.users().is_some_and(|u| u.verify(&user, &password));
        if !ok {
            self.ctx.auth_failures.record(ip);
            // Flush what is pending first, then make guessing slow.
            let _ = self.flush();
            std::thread::sleep(AUTH_FAILURE_DELAY);
        }
        session.auth_done(user, ok)
    }

    fn run(&mut self, session: &mut Session) -> Result<(), End> {
        let command_timeout = self.config.limits.command_timeout;
        let mut deadline = Instant::now() + command_timeout;
        loop {
            let action = match self.input.take_line() {
                None => {
                    let idle = session.is_idle() && self.input.start == self.input.end;
                    self.wait_input(deadline, idle)?;
                    continue;
                }
                Some(Line::Command(line)) => {
                    if log::log_enabled!(log::Level::Trace) {
                        trace!("< {}", masked(line, session.in_auth_exchange()));
                    }
                    session.command(line)
                }
                Some(Line::TooLong) => session.line_too_long(),
                Some(Line::BareEnding) => session.bare_line_ending(),
            };
            deadline = Instant::now() + command_timeout;
            let action = match action {
                Action::Authenticate { user, password } => {
                    self.authenticate(session, user, password)
                }
                Action::Data(message) => {
                    // Local programs are not rate-limited: their sessions
                    // are capped per Unix user instead, and a refused cron
                    // burst would only be retried by sendmail.
                    if message.local_user.is_none()
                        && !self.ctx.message_rate.allow(
                            self.peer.ip(),
                            self.config.limits.max_messages_per_minute_per_ip,
                        )
                    {
                        let r = Reply::new(
                            421,
                            "4.7.0",
                            "Too many messages from your address, try again later",
                        );
                        self.close_with(&r);
                        return Err(End::Refused("message rate limit".into()));
                    }
                    let result = self.receive(&message)?;
                    deadline = Instant::now() + command_timeout;
                    session.data_done(result)
                }
                other => other,
            };
            match action {
                Action::Reply(r) => self.queue(&r),
                Action::Close(r) => {
                    self.close_with(&r);
                    return Ok(());
                }
                Action::CloseAfter(r) => {
                    self.queue(&r);
                    self.close_with(&reply::too_many_errors());
                    return Ok(());
                }
                Action::StartTls(r) => {
                    self.queue(&r);
                    self.flush()?;
                    // Whatever the client sent before the handshake is not
                    // trusted: it could have been injected in clear.
                    self.input.clear();
                    self.handshake(session)?;
                    deadline = Instant::now() + command_timeout;
                }
                Action::Data(_) | Action::Authenticate { .. } => {
                    unreachable!("handled above; data_done and auth_done never return them")
                }
            }
        }
    }

    /// The DATA phase: spool, 354, stream through the decoder, deliver.
    fn receive(&mut self, message: &crate::smtp::message::Message) -> Result<DataResult, End> {
        let ctx = self.ctx;
        let mut sink = match deliver::open(message, ctx) {
            Ok(s) => s,
            Err(e) => {
                error!("session={} cannot store a message: {e}", message.session);
                return Ok(DataResult::Refused(DataError::Storage));
            }
        };
        self.queue(&reply::start_data());
        self.flush()?;
        let id = sink.id().to_string();
        let header = message.received_header(&self.config.hostname, &id, unix_now());
        let mut decoder = DataDecoder::new(self.config.limits.max_message_size);
        if let Err(e) = sink.file().write_all(header.as_bytes()) {
            error!("id={id} write failed: {e}");
            decoder.fail(DataError::Storage);
        }
        // data_timeout bounds silence; the whole DATA phase may also take
        // one more second per KiB received, so a slow but steady link is
        // never cut while a trickle still is (RFC 5321 4.5.3.2.5-6).
        let timeout = self.config.limits.data_timeout;
        let started = Instant::now();
        let mut received: u64 = 0;
        loop {
            let step = decoder.decode(self.input.pending());
            received += step.consumed as u64;
            if step.produced > 0 {
                if let Err(e) = sink
                    .file()
                    .write_all(&self.input.pending()[..step.produced])
                {
                    error!("id={id} write failed: {e}");
                    decoder.fail(DataError::Storage);
                }
            }
            self.input.consume(step.consumed);
            if step.done {
                break;
            }
            // Bytes past max_message_size are only read to be thrown away:
            // they earn no more time, or a steady 1 KiB/s would never end.
            let counted = received.min(self.config.limits.max_message_size);
            let allowed = started + timeout + Duration::from_secs(counted / MIN_DATA_RATE);
            let deadline = (Instant::now() + timeout).min(allowed);
            // Cut off while sending more than max_message_size: the
            // message would be refused anyway, for good (552), and a 421
            // would only have it sent again, for days.
            let late = if decoder.too_big() {
                reply::message_too_big
            } else {
                reply::command_timeout
            };
            // The sink is dropped (and its file removed) if this fails.
            self.wait_input_or(deadline, false, late)?;
        }
        let stats = match decoder.finish() {
            Ok(stats) => stats,
            Err(e) => {
                info!("id={id} session={} refused: {e:?}", message.session);
                return Ok(DataResult::Refused(e));
            }
        };
        if stats.received_headers > self.config.limits.max_received_headers {
            info!(
                "id={id} refused: {} Received headers, mail loop",
                stats.received_headers
            );
            return Ok(DataResult::Loop);
        }
        debug!(
            "id={id} size={} received={}",
            stats.size, stats.received_headers
        );
        match deliver::store(message, sink, stats.size, ctx) {
            Ok(()) => {
                // One line per accepted message; the commands that led to
                // it are logged at debug level (fewer journal writes on an
                // SD card), refusals at info.
                info!(
                    "session={} id={id} accepted from=<{}> size={} nrcpt={} helo={}",
                    message.session,
                    message.sender,
                    stats.size,
                    message.recipients.len(),
                    message.helo
                );
                Ok(DataResult::Stored { id })
            }
            Err(e) => {
                error!("id={id} delivery failed, client told to retry: {e}");
                Ok(DataResult::Refused(DataError::Storage))
            }
        }
    }
}

/// A command line for the trace log, with AUTH secrets masked.
fn masked(line: &[u8], in_auth: bool) -> String {
    if in_auth {
        return "****".into();
    }
    let text = String::from_utf8_lossy(line);
    let mut words = text.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some(verb), Some(mech), Some(_)) if verb.eq_ignore_ascii_case("AUTH") => {
            format!("{verb} {mech} ****")
        }
        _ => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut input = Input::new();
        let mut out = Vec::new();
        for chunk in chunks {
            input.buf[input.end..input.end + chunk.len()].copy_from_slice(chunk);
            input.end += chunk.len();
            while let Some(line) = input.take_line() {
                out.push(match line {
                    Line::Command(l) => String::from_utf8_lossy(l).into_owned(),
                    Line::TooLong => "<too long>".into(),
                    Line::BareEnding => "<bare>".into(),
                });
            }
            if input.start > 0 {
                input.buf.copy_within(input.start..input.end, 0);
                input.end -= input.start;
                input.start = 0;
            }
        }
        out
    }

    #[test]
    fn framing() {
        assert_eq!(lines(&[b"NOOP\r\nQUIT\r\n"]), ["NOOP", "QUIT"]);
        assert_eq!(
            lines(&[b"NO", b"OP\r", b"\nQU", b"IT\r\n"]),
            ["NOOP", "QUIT"]
        );
        assert_eq!(lines(&[b"NOOP\nQUIT\r\n"]), ["<bare>", "QUIT"]);
        assert_eq!(lines(&[b"NOOP\rQUIT\r\n"]), ["<bare>", "QUIT"]);
        assert_eq!(lines(&[b"NOOP\r", b"QUIT\r\n"]), ["<bare>", "QUIT"]);
        assert_eq!(lines(&[b"\r\n"]), [""]);
    }

    #[test]
    fn line_limit() {
        // The framer allows RFC 4954's 12288 octets (AUTH); the session cuts
        // other commands at 512.
        let ok = [vec![b'a'; MAX_FRAME - 2], b"\r\n".to_vec()].concat();
        assert_eq!(lines(&[&ok]).len(), 1);
        assert_ne!(lines(&[&ok])[0], "<too long>");
        let long = [vec![b'a'; MAX_FRAME - 1], b"\r\nNOOP\r\n".to_vec()].concat();
        assert_eq!(lines(&[&long]), ["<too long>", "NOOP"]);
        // Much longer than the buffer, in pieces: one error, then in step again.
        let huge = vec![b'x'; 3 * INPUT_BUFFER];
        let mut chunks: Vec<&[u8]> = huge.chunks(4000).collect();
        chunks.push(b"\r\nNOOP\r\n");
        assert_eq!(lines(&chunks), ["<too long>", "NOOP"]);
        // A bare LF or CR inside the discarded part is still a bare ending,
        // however the bytes were split (review finding: it used to end the line).
        let long = vec![b'A'; MAX_FRAME + 100];
        assert_eq!(
            lines(&[&long, b"\nMAIL FROM:<a@b>\r\n"]),
            ["<bare>", "MAIL FROM:<a@b>"]
        );
        assert_eq!(lines(&[&long, b"\rMAIL\r\n"]), ["<bare>", "MAIL"]);
        assert_eq!(
            lines(&[&long, b"\r", b"\nNOOP\r\n"]),
            ["<too long>", "NOOP"]
        );
        assert_eq!(lines(&[&long, b"\r", b"MAIL\r\n"]), ["<bare>", "MAIL"]);
        // A CR as the very last byte the buffer holds (review finding: the
        // connection was dropped, "input buffer full", with no reply).
        let full = [vec![b'x'; INPUT_BUFFER - 1], b"\r".to_vec()].concat();
        assert_eq!(lines(&[&full, b"\nNOOP\r\n"]), ["<too long>", "NOOP"]);
    }
}
