//! The sans-IO SMTP client: given the server's replies, what to send next.
//!
//! Owns the client side of one outbound SMTP session: greeting, EHLO with a
//! fallback to HELO (RFC 5321 4.1.1.1, 3.2), the capability list, STARTTLS
//! (RFC 3207) per the job's `TlsMode`, AUTH PLAIN (RFC 4616) or LOGIN
//! (draft-murchison-sasl-login) per RFC 4954, one mail transaction with the
//! MAIL parameters SIZE (RFC 1870), BODY=8BITMIME (RFC 6152) and SMTPUTF8
//! (RFC 6531), per-recipient RCPT results, PIPELINING (RFC 2920: MAIL, every
//! RCPT and DATA in one write, replies matched in order), and QUIT. It never
//! touches a socket, a file or the clock: `transfer.rs` carries out its
//! `Output`s and feeds it replies, which is why the transcript tests below
//! need no network. Reply parsing is `reply.rs`; the DATA encoding is
//! `dotstuff.rs`.
//!
//! ```text
//! (Implicit: Handshake) -> Greeting -> Ehlo --5xx--> Helo
//!        Ehlo/Helo --STARTTLS offered/required--> StartTls -> Handshake -> Ehlo (again)
//!        Ehlo/Helo --credentials--> Auth -> Tx (MAIL, RCPT..., DATA) -> Data -> Quit -> Done
//!        Data --keep_open--> Idle --next_job--> Tx ...   (one more message, same session)
//!        any error: every recipient without a final result gets one, then Quit or Done
//! ```
//!
//! With [`Client::keep_open`], a session whose message got its final reply
//! is not ended with QUIT: it reports its `Done` and waits in `Idle` for
//! [`Client::next_job`], so the next message to the same host needs no new
//! connection, greeting, EHLO, TLS handshake or AUTH (as Postfix's
//! connection cache does). The end of data cleared the server's
//! transaction (RFC 5321 4.1.1.4), so the next MAIL needs no RSET.
//!
//! Results: 2xx to the end of data delivers the accepted recipients; a 4xx
//! defers and a 5xx fails whoever it concerns. Anything that ends the
//! session early (a dropped connection, a timeout, a malformed reply, TLS
//! or AUTH failure) defers every recipient not yet final — including after
//! the message was sent but before its final reply, since a duplicate is
//! acceptable and a loss is not.
//!
//! A message that needs 8BITMIME, sent to a server that does not offer it,
//! goes out as is, a deliberate choice: Exim does the same, Postfix does it
//! for mail not declared 8-bit (declared 8-bit mail it converts to
//! quoted-printable unless `disable_mime_output_conversion` is set), and
//! RFC 6152 3 asks for a conversion or a bounce; but rewriting the body
//! breaks DKIM signatures and nearly every server takes 8-bit data. A
//! message that needs SMTPUTF8 is never sent to a server that does not
//! offer it (RFC 6531 3.2: fail with 5.6.7).

use std::collections::VecDeque;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use log::{debug, trace, warn};

use super::reply::ServerReply;

/// One delivery attempt: one connection, one sender, its recipients there.
#[derive(Debug, Clone)]
pub struct Job {
    /// The queue id, for log lines.
    pub id: String,
    /// Our name in EHLO/HELO.
    pub helo: String,
    /// The envelope sender, without angle brackets; empty for a bounce.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The message size in octets, for SIZE=.
    pub size: u64,
    /// The body has 8-bit data (BODY=8BITMIME).
    pub eightbit: bool,
    /// The envelope or headers need SMTPUTF8.
    pub smtputf8: bool,
    pub tls: TlsMode,
    pub auth: Option<Credentials>,
}

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text throughout; credentials, if any, are sent in clear. Only
    /// for an explicit `smarthost_tls = "none"`.
    None,
    /// STARTTLS when offered, without certificate verification (Postfix's
    /// `may`); clear text otherwise. Credentials are never sent in clear.
    Opportunistic,
    /// STARTTLS must be offered and succeed with a verified certificate.
    RequireStartTls,
    /// TLS from the first byte (port 465, RFC 8314).
    Implicit,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"****")
            .finish()
    }
}

/// The result for one recipient. Reasons are one-line and sanitised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// The server took responsibility; `reply` is its final reply.
    Delivered { reply: String },
    /// Try again later.
    Deferred { reason: String },
    /// Do not try again; bounce.
    Failed { reason: String },
}

impl RcptResult {
    pub fn is_final(&self) -> bool {
        !matches!(self, RcptResult::Deferred { .. })
    }
}

/// Why the session ended before it could run its course, when it did. The
/// recipients are already deferred; this tells the caller what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The TLS handshake failed. With `opportunistic`, retry this host in
    /// clear (Postfix `may`); otherwise the mail waits.
    TlsHandshake { opportunistic: bool, reason: String },
    /// TLS was required but STARTTLS was not offered or was refused, or
    /// credentials would have had to go in clear.
    TlsRequired(String),
    /// The server refused our credentials (5xx: a configuration problem, but
    /// the mail is deferred, not bounced) or failed temporarily (4xx).
    Auth { permanent: bool, reason: String },
    /// The connection dropped, timed out, or the server's output could not
    /// be parsed.
    Connection(String),
}

/// What one session achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every recipient of the job, in order, with a result.
    pub recipients: Vec<(String, RcptResult)>,
    /// The protocol and cipher suite, e.g. "TLSv1.3 TLS13_AES_256_GCM_SHA384".
    pub tls: Option<String>,
    /// The server's greeting as a one-line diagnostic (empty if none came).
    pub remote_greeting: String,
    pub failure: Option<Failure>,
}

impl Outcome {
    /// The TLS handshake failed in opportunistic mode: the caller should
    /// retry this host without STARTTLS.
    pub fn retry_in_clear(&self) -> bool {
        matches!(
            self.failure,
            Some(Failure::TlsHandshake {
                opportunistic: true,
                ..
            })
        )
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Output {
    /// Write these bytes (one or more command lines).
    Send(Vec<u8>),
    /// Perform the TLS handshake on the connection, drop any bytes read
    /// before it (a fresh reply parser), then call `tls_started` or
    /// `tls_failed`.
    StartTls,
    /// Stream the message through a `DotStuffer`, terminator included, then
    /// read the final reply.
    SendData,
    /// The session is over; close the connection.
    Done(Outcome),
}

/// Which reply the client is waiting for, to pick its timeout (RFC 5321
/// 4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Greeting,
    /// EHLO, HELO, STARTTLS, AUTH, and the dot of an aborted DATA.
    Command,
    /// QUIT, sent once every result is known.
    Quit,
    Mail,
    Rcpt,
    DataInit,
    DataFinal,
}

impl Wait {
    /// What the reply answers, for diagnostics.
    pub fn what(self) -> &'static str {
        match self {
            Wait::Greeting => "the greeting",
            Wait::Command => "a command",
            Wait::Quit => "QUIT",
            Wait::Mail => "MAIL FROM",
            Wait::Rcpt => "RCPT TO",
            Wait::DataInit => "DATA",
            Wait::DataFinal => "end of data",
        }
    }
}

/// Server capabilities from the EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Caps {
    pipelining: bool,
    /// SIZE's fixed maximum; `Some(0)` offers SIZE without a limit.
    size: Option<u64>,
    eightbitmime: bool,
    smtputf8: bool,
    starttls: bool,
    auth: Vec<String>,
}

impl Caps {
    fn parse(reply: &ServerReply) -> Caps {
        let mut caps = Caps::default();
        // The first line is the server's name and greeting text.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                _ => {
                    // "AUTH PLAIN LOGIN", and the pre-RFC "AUTH=PLAIN LOGIN".
                    let first = match keyword.strip_prefix("AUTH=") {
                        Some(m) => Some(m),
                        None if keyword == "AUTH" => None,
                        None => continue,
                    };
                    for m in first.into_iter().chain(words) {
                        let m = m.to_ascii_uppercase();
                        if !m.is_empty() && !caps.auth.contains(&m) && caps.auth.len() < 32 {
                            caps.auth.push(m);
                        }
                    }
                }
            }
        }
        caps
    }
}

/// A command of the mail transaction awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Mail,
    Rcpt(usize),
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    Plain,
    LoginStart,
    LoginUser,
    LoginPassword,
}

#[derive(Debug)]
enum State {
    /// Implicit TLS: the handshake comes before the greeting.
    Connect,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// `Output::StartTls` handed to the driver.
    Handshake,
    Auth(AuthStep),
    /// MAIL, RCPT and DATA commands awaiting replies, in order.
    Tx(VecDeque<Cmd>),
    /// The message is being sent; the final reply is awaited.
    Data,
    /// An unwanted 354 was answered with an empty message.
    AbortData,
    Quit,
    Done,
    /// A message is done and the session stays open for another.
    Idle,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connect => "Connect",
            State::Greeting => "Greeting",
            State::Ehlo => "Ehlo",
            State::Helo => "Helo",
            State::StartTls => "StartTls",
            State::Handshake => "Handshake",
            State::Auth(_) => "Auth",
            State::Tx(_) => "Tx",
            State::Data => "Data",
            State::AbortData => "AbortData",
            State::Quit => "Quit",
            State::Done => "Done",
            State::Idle => "Idle",
        }
    }
}

/// The client of one SMTP session. See the module docs for its life.
#[derive(Debug)]
pub struct Client {
    job: Job,
    state: State,
    out: VecDeque<Output>,
    caps: Caps,
    tls: Option<String>,
    greeting: String,
    /// Final results so far, by recipient index.
    results: Vec<Option<RcptResult>>,
    /// Recipients the server accepted at RCPT, awaiting the data's result.
    accepted: Vec<bool>,
    /// The next recipient to send RCPT for (without PIPELINING).
    next_rcpt: usize,
    /// MAIL was refused; remaining pipelined replies are only consumed.
    mail_refused: bool,
    failure: Option<Failure>,
    /// `Output::Done` was queued.
    finished: bool,
    /// After a message's final reply, wait in `Idle` instead of QUIT.
    keep_open: bool,
    /// Replies that answered the current job ([`Client::replies`]).
    replies: usize,
}

impl Client {
    pub fn new(job: Job) -> Client {
        let n = job.recipients.len();
        let mut client = Client {
            state: State::Greeting,
            out: VecDeque::new(),
            caps: Caps::default(),
            tls: None,
            greeting: String::new(),
            results: vec![None; n],
            accepted: vec![false; n],
            next_rcpt: 0,
            mail_refused: false,
            failure: None,
            finished: false,
            keep_open: false,
            replies: 0,
            job,
        };
        if client.job.tls == TlsMode::Implicit {
            client.set_state(State::Connect);
            client.out.push_back(Output::StartTls);
        }
        client
    }

    /// The next thing to do; `None` means read a reply and pass it to
    /// `on_reply` (with the timeout `awaiting` names).
    pub fn next_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The reply being waited for, or `None` when no reply is expected
    /// (during a handshake, or once done).
    pub fn awaiting(&self) -> Option<Wait> {
        match &self.state {
            State::Connect | State::Handshake | State::Done | State::Idle => None,
            State::Greeting => Some(Wait::Greeting),
            State::Ehlo | State::Helo | State::StartTls | State::Auth(_) | State::AbortData => {
                Some(Wait::Command)
            }
            State::Quit => Some(Wait::Quit),
            State::Tx(pending) => Some(match pending.front() {
                Some(Cmd::Mail) => Wait::Mail,
                Some(Cmd::Rcpt(_)) => Wait::Rcpt,
                Some(Cmd::Data) | None => Wait::DataInit,
            }),
            State::Data => Some(Wait::DataFinal),
        }
    }

    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// The current job's queue id, for log lines.
    pub fn job_id(&self) -> &str {
        &self.job.id
    }

    /// The current job's TLS mode.
    pub fn tls_mode(&self) -> TlsMode {
        self.job.tls
    }

    /// Keep the session open after a message's final reply (see the
    /// module docs); call before the first output is taken.
    pub fn keep_open(&mut self) {
        self.keep_open = true;
    }

    /// The session waits for another job.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Replies that answered the current job: zero means nothing of it was
    /// sent (the message goes only after a 354): no reply came, or the
    /// first was a 421, the server closing the session (RFC 5321 3.8), as
    /// one does with a kept session it timed out or that carried its
    /// quota of messages.
    pub fn replies(&self) -> usize {
        self.replies
    }

    /// Starts another message on an idle session: the job's sender and
    /// recipients, with what the session already knows (capabilities, TLS,
    /// authentication). Outside `Idle` the job is deferred at once.
    pub fn next_job(&mut self, job: Job) {
        let n = job.recipients.len();
        self.job = job;
        self.results = vec![None; n];
        self.accepted = vec![false; n];
        self.next_rcpt = 0;
        self.mail_refused = false;
        self.failure = None;
        self.finished = false;
        self.replies = 0;
        if self.is_idle() {
            self.start_tx();
        } else {
            self.connection_lost("the session is not idle");
        }
    }

    /// The only writer of `state` (STYLE habit 3).
    fn set_state(&mut self, next: State) {
        trace!(
            "id={} client state={}=>{}",
            self.job.id,
            self.state.name(),
            next.name()
        );
        self.state = next;
    }

    /// Queues one command line; `shown` is what the trace log shows, so AUTH
    /// payloads never reach a log.
    fn send(&mut self, line: String, shown: &str) {
        trace!("id={} > {shown}", self.job.id);
        let mut bytes = line.into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.out.push_back(Output::Send(bytes));
    }

    fn send_plain(&mut self, line: String) {
        let shown = line.clone();
        self.send(line, &shown);
    }

    /// Handles one complete reply from the server.
    pub fn on_reply(&mut self, reply: ServerReply) {
        trace!("id={} < {}", self.job.id, reply.one_line());
        if self.replies > 0 || reply.code != 421 {
            self.replies += 1;
        }
        let pending = match &mut self.state {
            State::Tx(pending) => std::mem::take(pending),
            _ => VecDeque::new(),
        };
        match self.state {
            State::Greeting => self.greeting(reply),
            State::Ehlo => self.ehlo(reply),
            State::Helo => self.helo(reply),
            State::StartTls => self.starttls(reply),
            State::Auth(step) => self.auth(step, reply),
            State::Tx(_) => self.tx(pending, reply),
            State::Data => self.data_done(reply),
            State::AbortData => self.quit(),
            State::Quit => self.done(),
            State::Done => {}
            State::Connect | State::Handshake | State::Idle => {
                self.connection_lost(&format!("unexpected reply: {}", reply.one_line()));
            }
        }
    }

    /// The TLS handshake succeeded; `description` names protocol and suite.
    pub fn tls_started(&mut self, description: String) {
        debug!("id={} tls={description}", self.job.id);
        self.tls = Some(description);
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.caps = Caps::default();
        match self.state {
            State::Connect => self.set_state(State::Greeting),
            State::Handshake => self.ehlo_command(),
            _ => self.connection_lost("TLS started at an unexpected time"),
        }
    }

    /// The TLS handshake failed (including certificate verification).
    pub fn tls_failed(&mut self, reason: &str) {
        let opportunistic = self.job.tls == TlsMode::Opportunistic;
        let reason = format!("TLS handshake failed: {reason}");
        debug!("id={} {reason} opportunistic={opportunistic}", self.job.id);
        self.finish_all(&RcptResult::Deferred {
            reason: reason.clone(),
        });
        self.failure = Some(Failure::TlsHandshake {
            opportunistic,
            reason,
        });
        // The connection is in an unknown state: no QUIT.
        self.done();
    }

    /// The connection dropped, timed out, or the server's output could not
    /// be parsed (`reason` says which). Every recipient not yet final is
    /// deferred — also when the message was sent and its reply not read.
    pub fn connection_lost(&mut self, reason: &str) {
        if self.finished {
            return;
        }
        if matches!(self.state, State::Quit | State::AbortData) {
            // The results were final before QUIT.
            return self.done();
        }
        let reason = match self.awaiting() {
            Some(wait) => format!("{reason} (waiting for the reply to {})", wait.what()),
            None => reason.to_owned(),
        };
        debug!("id={} connection lost: {reason}", self.job.id);
        self.finish_all(&RcptResult::Deferred {
            reason: reason.clone(),
        });
        if self.failure.is_none() {
            self.failure = Some(Failure::Connection(reason));
        }
        self.done();
    }

    fn greeting(&mut self, reply: ServerReply) {
        self.greeting = reply.one_line();
        let name = reply
            .lines
            .first()
            .and_then(|l| l.split_whitespace().next());
        if reply.code / 100 == 2 && name.is_some_and(|n| n.eq_ignore_ascii_case(&self.job.helo)) {
            // Not one of our listeners (those are never connected to), so
            // another box or MTA with the same name: two Pis left at the
            // default hostname. A loop back to us through NAT is stopped
            // by the Received count.
            warn!(
                "id={} the server greeted with our own hostname {}: give one of the two another `hostname`",
                self.job.id, self.job.helo
            );
        }
        if reply.code / 100 == 2 {
            self.ehlo_command();
        } else {
            // Even a 5xx greeting only defers: it says this host will not
            // talk to us now, not that the address is bad, so the next MX
            // is tried, and the last one's 5xx leaves the mail queued
            // (Postfix's default, smtp_skip_5xx_greeting = yes).
            self.finish_all(&RcptResult::Deferred {
                reason: diagnostic(&reply, "the greeting"),
            });
            self.quit();
        }
    }

    fn ehlo_command(&mut self) {
        let name = helo_name(&self.job.helo);
        self.send_plain(format!("EHLO {name}"));
        self.set_state(State::Ehlo);
    }

    fn ehlo(&mut self, reply: ServerReply) {
        match reply.code / 100 {
            2 => {
                self.caps = Caps::parse(&reply);
                debug!("id={} capabilities {:?}", self.job.id, self.caps);
                self.after_hello();
            }
            5 => {
                let name = helo_name(&self.job.helo);
                self.send_plain(format!("HELO {name}"));
                self.set_state(State::Helo);
            }
            _ => {
                self.finish_by_reply(&reply, "EHLO");
                self.quit();
            }
        }
    }

    fn helo(&mut self, reply: ServerReply) {
        if reply.code / 100 == 2 {
            self.caps = Caps::default();
            self.after_hello();
        } else {
            self.finish_by_reply(&reply, "HELO");
            self.quit();
        }
    }

    /// After EHLO/HELO: STARTTLS, AUTH or the transaction.
    fn after_hello(&mut self) {
        if self.tls.is_none() {
            let mode = self.job.tls;
            match mode {
                TlsMode::None => {}
                TlsMode::Opportunistic if !self.caps.starttls => {
                    debug!(
                        "id={} STARTTLS not offered, continuing in clear",
                        self.job.id
                    );
                }
                TlsMode::RequireStartTls | TlsMode::Implicit if !self.caps.starttls => {
                    return self.tls_required("STARTTLS not offered");
                }
                _ => {
                    self.send_plain("STARTTLS".into());
                    return self.set_state(State::StartTls);
                }
            }
        }
        self.start_auth();
    }

    fn starttls(&mut self, reply: ServerReply) {
        if reply.code == 220 {
            self.out.push_back(Output::StartTls);
            return self.set_state(State::Handshake);
        }
        if self.job.tls == TlsMode::Opportunistic {
            debug!(
                "id={} STARTTLS refused ({}), continuing in clear",
                self.job.id,
                reply.one_line()
            );
            return self.start_auth();
        }
        self.tls_required(&format!(
            "STARTTLS refused: {}",
            diagnostic(&reply, "STARTTLS")
        ));
    }

    fn tls_required(&mut self, reason: &str) {
        debug!("id={} {reason}", self.job.id);
        self.finish_all(&RcptResult::Deferred {
            reason: reason.to_owned(),
        });
        self.failure = Some(Failure::TlsRequired(reason.to_owned()));
        self.quit();
    }

    fn start_auth(&mut self) {
        let Some(creds) = self.job.auth.clone() else {
            return self.start_tx();
        };
        if self.tls.is_none() && self.job.tls != TlsMode::None {
            return self.tls_required("refusing to send credentials without TLS");
        }
        let offered = &self.caps.auth;
        if offered.iter().any(|m| m == "PLAIN") {
            let token = BASE64.encode(format!("\0{}\0{}", creds.user, creds.password));
            self.send(format!("AUTH PLAIN {token}"), "AUTH PLAIN ****");
            self.set_state(State::Auth(AuthStep::Plain));
        } else if offered.iter().any(|m| m == "LOGIN") {
            self.send_plain("AUTH LOGIN".into());
            self.set_state(State::Auth(AuthStep::LoginStart));
        } else {
            let reason = if offered.is_empty() {
                "server does not offer AUTH".to_owned()
            } else {
                format!(
                    "server offers no AUTH mechanism we support (offered: {})",
                    offered.join(" ")
                )
            };
            self.auth_failed(true, reason);
        }
    }

    fn auth(&mut self, step: AuthStep, reply: ServerReply) {
        let Some(creds) = self.job.auth.clone() else {
            // Unreachable: Auth is entered only with credentials.
            return self.connection_lost("AUTH without credentials");
        };
        match (step, reply.code) {
            (AuthStep::Plain | AuthStep::LoginPassword, 235) => {
                debug!("id={} authenticated as {}", self.job.id, creds.user);
                self.start_tx();
            }
            (AuthStep::LoginStart, 334) => {
                self.send(BASE64.encode(&creds.user), "**** (user)");
                self.set_state(State::Auth(AuthStep::LoginUser));
            }
            (AuthStep::LoginUser, 334) => {
                self.send(BASE64.encode(&creds.password), "**** (password)");
                self.set_state(State::Auth(AuthStep::LoginPassword));
            }
            _ => {
                if reply.code == 334 {
                    // A challenge we cannot answer: cancel it (RFC 4954 4).
                    self.send_plain("*".into());
                }
                let permanent = reply.is_permanent();
                self.auth_failed(
                    permanent,
                    format!("authentication failed: {}", diagnostic(&reply, "AUTH")),
                );
            }
        }
    }

    fn auth_failed(&mut self, permanent: bool, reason: String) {
        debug!("id={} {reason}", self.job.id);
        self.finish_all(&RcptResult::Deferred {
            reason: reason.clone(),
        });
        self.failure = Some(Failure::Auth { permanent, reason });
        self.quit();
    }

    /// MAIL, then RCPT per recipient and DATA: all at once with PIPELINING.
    fn start_tx(&mut self) {
        if self.job.smtputf8 && !self.caps.smtputf8 {
            self.finish_all(&RcptResult::Failed {
                reason: "5.6.7 the message needs SMTPUTF8, which the server does not offer".into(),
            });
            return self.quit();
        }
        if let Some(max) = self.caps.size.filter(|&max| max > 0) {
            if self.job.size > max {
                self.finish_all(&RcptResult::Failed {
                    reason: format!(
                        "5.3.4 message size {} exceeds the server's fixed maximum {max}",
                        self.job.size
                    ),
                });
                return self.quit();
            }
        }
        if !valid_address(&self.job.sender) {
            self.finish_all(&RcptResult::Failed {
                reason: "5.1.7 invalid sender address".into(),
            });
            return self.quit();
        }
        for (i, rcpt) in self.job.recipients.iter().enumerate() {
            if self.results[i].is_none() && (rcpt.is_empty() || !valid_address(rcpt)) {
                self.results[i] = Some(RcptResult::Failed {
                    reason: "5.1.3 invalid recipient address".into(),
                });
            }
        }
        if self.results.iter().all(Option::is_some) {
            return self.quit();
        }
        if self.job.eightbit && !self.caps.eightbitmime {
            debug!(
                "id={} 8-bit message to a server without 8BITMIME: sending as is",
                self.job.id
            );
        }

        let mut mail = format!("MAIL FROM:<{}>", self.job.sender);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", self.job.size));
        }
        if self.job.eightbit && self.caps.eightbitmime {
            mail.push_str(" BODY=8BITMIME");
        }
        if self.job.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        self.send_plain(mail);
        let mut pending = VecDeque::from([Cmd::Mail]);
        if self.caps.pipelining {
            // RFC 2920 3.1: DATA ends the group; one write for all of it.
            for i in 0..self.job.recipients.len() {
                if self.results[i].is_none() {
                    self.send_plain(format!("RCPT TO:<{}>", self.job.recipients[i]));
                    pending.push_back(Cmd::Rcpt(i));
                }
            }
            self.send_plain("DATA".into());
            pending.push_back(Cmd::Data);
            self.coalesce_sends();
        }
        self.set_state(State::Tx(pending));
    }

    /// Joins the queued `Send`s into one write (PIPELINING).
    fn coalesce_sends(&mut self) {
        let mut joined = Vec::new();
        let mut rest = VecDeque::new();
        for output in self.out.drain(..) {
            match output {
                Output::Send(bytes) => joined.extend_from_slice(&bytes),
                other => rest.push_back(other),
            }
        }
        self.out.push_back(Output::Send(joined));
        self.out.extend(rest);
    }

    fn tx(&mut self, mut pending: VecDeque<Cmd>, reply: ServerReply) {
        let Some(cmd) = pending.pop_front() else {
            self.set_state(State::Tx(pending));
            return self.connection_lost("reply with no command pending");
        };
        let pipelining = self.caps.pipelining;
        match cmd {
            Cmd::Mail => {
                if reply.code / 100 == 2 {
                    if !pipelining {
                        return self.next_rcpt(pending);
                    }
                } else {
                    self.mail_refused = true;
                    self.finish_by_reply(&reply, "MAIL FROM");
                    if !pipelining {
                        return self.quit();
                    }
                }
            }
            Cmd::Rcpt(i) => {
                if !self.mail_refused {
                    if reply.code / 100 == 2 {
                        self.accepted[i] = true;
                    } else {
                        self.results[i] = Some(by_reply(&reply, "RCPT TO"));
                    }
                }
                if !pipelining {
                    return self.next_rcpt(pending);
                }
            }
            Cmd::Data => {
                let wanted = !self.mail_refused && self.accepted.iter().any(|&a| a);
                if reply.code == 354 {
                    if wanted {
                        self.out.push_back(Output::SendData);
                        return self.set_state(State::Data);
                    }
                    // RFC 2920 3.1: DATA went out with no recipient accepted;
                    // end it with an empty message.
                    self.send_plain(".".into());
                    return self.set_state(State::AbortData);
                }
                if wanted {
                    self.finish_accepted(&reply, "DATA");
                }
                return self.quit();
            }
        }
        self.set_state(State::Tx(pending));
    }

    /// Without PIPELINING: the next RCPT, or DATA, or QUIT.
    fn next_rcpt(&mut self, mut pending: VecDeque<Cmd>) {
        while self.next_rcpt < self.job.recipients.len() {
            let i = self.next_rcpt;
            self.next_rcpt += 1;
            if self.results[i].is_none() {
                self.send_plain(format!("RCPT TO:<{}>", self.job.recipients[i]));
                pending.push_back(Cmd::Rcpt(i));
                return self.set_state(State::Tx(pending));
            }
        }
        if self.accepted.iter().any(|&a| a) {
            self.send_plain("DATA".into());
            pending.push_back(Cmd::Data);
            self.set_state(State::Tx(pending));
        } else {
            debug!("id={} no recipient accepted, not sending DATA", self.job.id);
            self.quit();
        }
    }

    fn data_done(&mut self, reply: ServerReply) {
        if reply.code / 100 == 2 {
            let delivered = RcptResult::Delivered {
                reply: reply.one_line(),
            };
            for i in 0..self.results.len() {
                if self.accepted[i] && self.results[i].is_none() {
                    self.results[i] = Some(delivered.clone());
                }
            }
        } else {
            self.finish_accepted(&reply, "end of data");
        }
        if self.keep_open {
            let outcome = self.outcome();
            self.out.push_back(Output::Done(outcome));
            return self.set_state(State::Idle);
        }
        self.quit();
    }

    fn quit(&mut self) {
        self.send_plain("QUIT".into());
        self.set_state(State::Quit);
    }

    /// Builds the outcome; anything still without a result is deferred.
    fn done(&mut self) {
        if self.finished {
            return;
        }
        let outcome = self.outcome();
        self.out.push_back(Output::Done(outcome));
        self.set_state(State::Done);
    }

    /// The job's outcome, once: anything still without a result is deferred.
    fn outcome(&mut self) -> Outcome {
        self.finished = true;
        self.finish_all(&RcptResult::Deferred {
            reason: "the session ended before a result".into(),
        });
        let recipients = self
            .job
            .recipients
            .iter()
            .zip(self.results.iter_mut())
            .map(|(r, result)| {
                let result = result.take().unwrap_or(RcptResult::Deferred {
                    reason: String::new(),
                });
                (r.clone(), result)
            })
            .collect();
        Outcome {
            recipients,
            tls: self.tls.clone(),
            remote_greeting: self.greeting.clone(),
            failure: self.failure.clone(),
        }
    }

    /// Gives every recipient without a final result this one.
    fn finish_all(&mut self, result: &RcptResult) {
        for r in self.results.iter_mut().filter(|r| r.is_none()) {
            *r = Some(result.clone());
        }
    }

    fn finish_by_reply(&mut self, reply: &ServerReply, stage: &str) {
        self.finish_all(&by_reply(reply, stage));
    }

    /// The recipients accepted at RCPT get this reply's result.
    fn finish_accepted(&mut self, reply: &ServerReply, stage: &str) {
        let result = by_reply(reply, stage);
        for i in 0..self.results.len() {
            if self.accepted[i] && self.results[i].is_none() {
                self.results[i] = Some(result.clone());
            }
        }
    }
}

/// "550 5.1.1 unknown (in reply to RCPT TO)".
fn diagnostic(reply: &ServerReply, stage: &str) -> String {
    format!("{} (in reply to {stage})", reply.one_line())
}

/// 5xx fails; anything else that is not the wanted success (4xx, or an
/// out-of-place 2xx/3xx) defers.
fn by_reply(reply: &ServerReply, stage: &str) -> RcptResult {
    let reason = diagnostic(reply, stage);
    if reply.is_permanent() {
        RcptResult::Failed { reason }
    } else {
        RcptResult::Deferred { reason }
    }
}

/// Our EHLO name with anything that could end or split the line removed.
fn helo_name(name: &str) -> String {
    let clean: String = name.chars().filter(|c| c.is_ascii_graphic()).collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Addresses go between angle brackets on a command line: no control
/// characters (no CR/LF command injection) and no brackets.
fn valid_address(addr: &str) -> bool {
    !addr.chars().any(|c| c.is_control() || c == '<' || c == '>')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::reply::ReplyParser;

    fn job(recipients: &[&str]) -> Job {
        Job {
            id: "q1".into(),
            helo: "me.test".into(),
            sender: "a@x.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            size: 100,
            eightbit: false,
            smtputf8: false,
            tls: TlsMode::None,
            auth: None,
        }
    }

    fn creds() -> Option<Credentials> {
        Some(Credentials {
            user: "me@example.net".into(),
            password: "s3cret pass".into(),
        })
    }

    /// Drives the client with scripted server replies (`|` separates the
    /// lines of one reply; "EOF" drops the connection) and returns the
    /// transcript: one `C:` line per write (commands joined by " / "), one
    /// `S:` line per reply.
    fn run(job: Job, replies: &[&str]) -> (String, Outcome) {
        let mut client = Client::new(job);
        let mut replies = replies.iter();
        let mut transcript = String::new();
        loop {
            while let Some(output) = client.next_output() {
                match output {
                    Output::Send(bytes) => {
                        let text = String::from_utf8(bytes).unwrap();
                        assert!(text.ends_with("\r\n"), "{text:?}");
                        let cmds: Vec<&str> = text.trim_end().split("\r\n").collect();
                        transcript += &format!("C: {}\n", cmds.join(" / "));
                    }
                    Output::StartTls => {
                        transcript += "C: <tls>\n";
                        client.tls_started("TLSv1.3 TLS13_AES_256_GCM_SHA384".into());
                    }
                    Output::SendData => transcript += "C: <data>\n",
                    Output::Done(outcome) => {
                        assert!(client.is_done());
                        assert!(client.awaiting().is_none());
                        return (transcript, outcome);
                    }
                }
            }
            assert!(
                client.awaiting().is_some(),
                "waiting for nothing:\n{transcript}"
            );
            match replies.next() {
                None | Some(&"EOF") => {
                    transcript += "S: <eof>\n";
                    client.connection_lost("connection closed");
                }
                Some(reply) => {
                    let mut parser = ReplyParser::new();
                    let lines: Vec<&str> = reply.split('|').collect();
                    let code = &lines[0][..3];
                    for (i, line) in lines.iter().enumerate() {
                        let line = if i == 0 { &line[3..] } else { line };
                        let sep = if i + 1 == lines.len() { " " } else { "-" };
                        parser.feed(format!("{code}{sep}{}\r\n", line.trim_start()).as_bytes());
                    }
                    let reply = parser.next().unwrap().expect("a whole reply");
                    transcript += &format!("S: {reply}\n");
                    client.on_reply(reply);
                }
            }
        }
    }

    fn results(outcome: &Outcome) -> Vec<String> {
        outcome
            .recipients
            .iter()
            .map(|(r, res)| match res {
                RcptResult::Delivered { reply } => format!("{r} delivered: {reply}"),
                RcptResult::Deferred { reason } => format!("{r} deferred: {reason}"),
                RcptResult::Failed { reason } => format!("{r} failed: {reason}"),
            })
            .collect()
    }

    fn lines(s: &str) -> String {
        s.lines().map(|l| format!("{}\n", l.trim())).collect()
    }

    #[test]
    fn happy_path_without_pipelining() {
        let (t, o) = run(
            job(&["b@y.test", "c@y.test"]),
            &[
                "220 mx.y.test",
                "250 mx.y.test",
                "250 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 2.0.0 queued as X",
                "221 bye",
            ],
        );
        assert_eq!(
            t,
            lines(
                "S: 220 mx.y.test
                 C: EHLO me.test
                 S: 250 mx.y.test
                 C: MAIL FROM:<a@x.test>
                 S: 250 ok
                 C: RCPT TO:<b@y.test>
                 S: 250 ok
                 C: RCPT TO:<c@y.test>
                 S: 250 ok
                 C: DATA
                 S: 354 go
                 C: <data>
                 S: 250 2.0.0 queued as X
                 C: QUIT
                 S: 221 bye"
            )
        );
        assert_eq!(
            results(&o),
            [
                "b@y.test delivered: 250 2.0.0 queued as X",
                "c@y.test delivered: 250 2.0.0 queued as X"
            ]
        );
        assert_eq!(o.remote_greeting, "220 mx.y.test");
        assert_eq!(o.failure, None);
        assert_eq!(o.tls, None);
    }

    #[test]
    fn happy_path_with_pipelining_sends_one_group() {
        let mut j = job(&["b@y.test", "c@y.test"]);
        j.eightbit = true;
        j.size = 1234;
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|PIPELINING|SIZE 10000000|8BITMIME",
                "250 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 done",
                "221 bye",
            ],
        );
        assert_eq!(
            t,
            lines(
                "S: 220 mx
                 C: EHLO me.test
                 S: 250 mx PIPELINING SIZE 10000000 8BITMIME
                 C: MAIL FROM:<a@x.test> SIZE=1234 BODY=8BITMIME / RCPT TO:<b@y.test> / RCPT TO:<c@y.test> / DATA
                 S: 250 ok
                 S: 250 ok
                 S: 250 ok
                 S: 354 go
                 C: <data>
                 S: 250 done
                 C: QUIT
                 S: 221 bye"
            )
        );
        assert_eq!(
            results(&o),
            [
                "b@y.test delivered: 250 done",
                "c@y.test delivered: 250 done"
            ]
        );
    }

    #[test]
    fn ehlo_500_falls_back_to_helo() {
        let (t, o) = run(
            job(&["b@y.test"]),
            &[
                "220 old", "500 what", "250 hi", "250 ok", "250 ok", "354 go", "250 ok", "221 bye",
            ],
        );
        assert!(t.contains("C: EHLO me.test\nS: 500 what\nC: HELO me.test\nS: 250 hi\nC: MAIL FROM:<a@x.test>\n"), "{t}");
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
    }

    #[test]
    fn ehlo_421_defers() {
        let (t, o) = run(job(&["b@y.test"]), &["220 mx", "421 4.3.2 busy", "EOF"]);
        assert!(t.ends_with("C: QUIT\nS: <eof>\n"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test deferred: 421 4.3.2 busy (in reply to EHLO)"]
        );
        assert_eq!(o.failure, None);
    }

    #[test]
    fn greeting_decides_for_everyone() {
        // A 5xx greeting defers too: the next MX may take the mail.
        let (_, o) = run(job(&["b@y.test"]), &["554 5.7.1 go away", "221 bye"]);
        assert_eq!(
            results(&o),
            ["b@y.test deferred: 554 5.7.1 go away (in reply to the greeting)"]
        );
        let (_, o) = run(job(&["b@y.test"]), &["421 4.3.2 busy", "EOF"]);
        assert_eq!(
            results(&o),
            ["b@y.test deferred: 421 4.3.2 busy (in reply to the greeting)"]
        );
        assert_eq!(o.remote_greeting, "421 4.3.2 busy");
    }

    #[test]
    fn mixed_recipient_results() {
        for caps in ["250 mx", "250 mx|PIPELINING"] {
            let replies = vec![
                "220 mx",
                caps,
                "250 ok",
                "250 ok",
                "450 4.2.0 busy",
                "550 5.1.1 unknown",
                "354 go",
                "250 done",
                "221 bye",
            ];
            let (_, o) = run(job(&["b@y.test", "c@y.test", "d@y.test"]), &replies);
            assert_eq!(
                results(&o),
                [
                    "b@y.test delivered: 250 done",
                    "c@y.test deferred: 450 4.2.0 busy (in reply to RCPT TO)",
                    "d@y.test failed: 550 5.1.1 unknown (in reply to RCPT TO)",
                ],
                "{caps}"
            );
        }
    }

    #[test]
    fn all_recipients_rejected_sends_no_data() {
        let (t, o) = run(
            job(&["b@y.test", "c@y.test"]),
            &[
                "220 mx",
                "250 mx",
                "250 ok",
                "550 no",
                "450 later",
                "221 bye",
            ],
        );
        assert!(!t.contains("DATA"), "{t}");
        assert!(t.ends_with("S: 450 later\nC: QUIT\nS: 221 bye\n"), "{t}");
        assert_eq!(
            results(&o),
            [
                "b@y.test failed: 550 no (in reply to RCPT TO)",
                "c@y.test deferred: 450 later (in reply to RCPT TO)"
            ]
        );

        // Pipelined: DATA went out anyway; its 554 is consumed, then QUIT.
        let (t, o) = run(
            job(&["b@y.test"]),
            &[
                "220 mx",
                "250 mx|PIPELINING",
                "250 ok",
                "550 no",
                "554 no valid recipients",
                "221 bye",
            ],
        );
        assert!(
            t.ends_with("S: 554 no valid recipients\nC: QUIT\nS: 221 bye\n"),
            "{t}"
        );
        assert!(!t.contains("<data>"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test failed: 550 no (in reply to RCPT TO)"]
        );

        // A broken server that says 354 anyway gets an empty message.
        let (t, _) = run(
            job(&["b@y.test"]),
            &[
                "220 mx",
                "250 mx|PIPELINING",
                "250 ok",
                "550 no",
                "354 go",
                "554 empty",
                "221 bye",
            ],
        );
        assert!(
            t.ends_with("S: 354 go\nC: .\nS: 554 empty\nC: QUIT\nS: 221 bye\n"),
            "{t}"
        );
    }

    #[test]
    fn mail_refused() {
        let (t, o) = run(
            job(&["b@y.test"]),
            &["220 mx", "250 mx", "553 5.1.8 bad sender", "221 bye"],
        );
        assert!(!t.contains("RCPT"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test failed: 553 5.1.8 bad sender (in reply to MAIL FROM)"]
        );
        // Pipelined: the RCPT and DATA replies are consumed, not believed.
        let (t, o) = run(
            job(&["b@y.test"]),
            &[
                "220 mx",
                "250 mx|PIPELINING",
                "451 4.3.0 try later",
                "503 need MAIL",
                "503 need MAIL",
                "221 bye",
            ],
        );
        assert!(
            t.ends_with("S: 503 need MAIL\nC: QUIT\nS: 221 bye\n"),
            "{t}"
        );
        assert_eq!(
            results(&o),
            ["b@y.test deferred: 451 4.3.0 try later (in reply to MAIL FROM)"]
        );
    }

    #[test]
    fn data_refused_or_final_reply_negative() {
        let base = ["220 mx", "250 mx", "250 ok", "250 ok"];
        let cases: &[(&[&str], &str)] = &[
            (
                &["451 4.3.0 not now", "221 bye"],
                "b@y.test deferred: 451 4.3.0 not now (in reply to DATA)",
            ),
            (
                &["554 5.5.1 no", "221 bye"],
                "b@y.test failed: 554 5.5.1 no (in reply to DATA)",
            ),
            (
                &["354 go", "452 4.3.1 disk full", "221 bye"],
                "b@y.test deferred: 452 4.3.1 disk full (in reply to end of data)",
            ),
            (
                &["354 go", "552 5.3.4 too big", "221 bye"],
                "b@y.test failed: 552 5.3.4 too big (in reply to end of data)",
            ),
        ];
        for (tail, want) in cases {
            let replies: Vec<&str> = base.iter().chain(tail.iter()).copied().collect();
            let (t, o) = run(job(&["b@y.test"]), &replies);
            assert_eq!(results(&o), [*want], "{t}");
            assert!(t.ends_with("C: QUIT\nS: 221 bye\n"), "{t}");
        }
    }

    #[test]
    fn drop_after_data_sent_defers() {
        let (t, o) = run(
            job(&["b@y.test"]),
            &["220 mx", "250 mx", "250 ok", "250 ok", "354 go", "EOF"],
        );
        assert!(t.ends_with("C: <data>\nS: <eof>\n"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test deferred: connection closed (waiting for the reply to end of data)"]
        );
        assert!(matches!(o.failure, Some(Failure::Connection(_))));
        // A drop after the final reply, before QUIT's reply, changes nothing.
        let (_, o) = run(
            job(&["b@y.test"]),
            &[
                "220 mx", "250 mx", "250 ok", "250 ok", "354 go", "250 ok", "EOF",
            ],
        );
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
        assert_eq!(o.failure, None);
        // Mid-transaction drops defer everyone not yet final.
        let (_, o) = run(
            job(&["b@y.test", "c@y.test"]),
            &["220 mx", "250 mx", "250 ok", "550 no", "EOF"],
        );
        assert_eq!(
            results(&o),
            [
                "b@y.test failed: 550 no (in reply to RCPT TO)",
                "c@y.test deferred: connection closed (waiting for the reply to RCPT TO)"
            ]
        );
    }

    #[test]
    fn auth_plain() {
        let mut j = job(&["b@y.test"]);
        j.auth = creds();
        j.tls = TlsMode::None;
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|AUTH LOGIN PLAIN",
                "235 2.7.0 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(
            t.contains("C: AUTH PLAIN AG1lQGV4YW1wbGUubmV0AHMzY3JldCBwYXNz\nS: 235 2.7.0 ok\nC: MAIL FROM:<a@x.test>\n"),
            "{t}"
        );
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
    }

    #[test]
    fn auth_login() {
        let mut j = job(&["b@y.test"]);
        j.auth = creds();
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|AUTH=LOGIN",
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(
            t.contains(
                "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: bWVAZXhhbXBsZS5uZXQ=\nS: 334 UGFzc3dvcmQ6\nC: czNjcmV0IHBhc3M=\nS: 235 ok\nC: MAIL"
            ),
            "{t}"
        );
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
    }

    #[test]
    fn auth_refused() {
        let mut j = job(&["b@y.test"]);
        j.auth = creds();
        let (t, o) = run(
            j.clone(),
            &[
                "220 mx",
                "250 mx|AUTH PLAIN",
                "535 5.7.8 bad credentials",
                "221 bye",
            ],
        );
        assert!(!t.contains("MAIL"), "{t}");
        let reason = "authentication failed: 535 5.7.8 bad credentials (in reply to AUTH)";
        assert_eq!(results(&o), [format!("b@y.test deferred: {reason}")]);
        assert_eq!(
            o.failure,
            Some(Failure::Auth {
                permanent: true,
                reason: reason.into()
            })
        );

        let (_, o) = run(
            j.clone(),
            &[
                "220 mx",
                "250 mx|AUTH PLAIN",
                "454 4.7.0 try later",
                "221 bye",
            ],
        );
        assert!(matches!(
            o.failure,
            Some(Failure::Auth {
                permanent: false,
                ..
            })
        ));

        let (t, o) = run(j, &["220 mx", "250 mx|AUTH CRAM-MD5", "221 bye"]);
        assert!(!t.contains("C: AUTH"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test deferred: server offers no AUTH mechanism we support (offered: CRAM-MD5)"]
        );
    }

    #[test]
    fn smtputf8_needed_but_not_offered() {
        let mut j = job(&["b@y.test"]);
        j.smtputf8 = true;
        let (t, o) = run(j.clone(), &["220 mx", "250 mx|8BITMIME", "221 bye"]);
        assert!(!t.contains("MAIL"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test failed: 5.6.7 the message needs SMTPUTF8, which the server does not offer"]
        );
        let (t, _) = run(
            j,
            &[
                "220 mx",
                "250 mx|SMTPUTF8",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(t.contains("C: MAIL FROM:<a@x.test> SMTPUTF8\n"), "{t}");
    }

    #[test]
    fn size_over_the_servers_limit_fails() {
        let mut j = job(&["b@y.test"]);
        j.size = 2000;
        let (t, o) = run(j, &["220 mx", "250 mx|SIZE 1000", "221 bye"]);
        assert!(!t.contains("MAIL"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test failed: 5.3.4 message size 2000 exceeds the server's fixed maximum 1000"]
        );
    }

    #[test]
    fn eightbit_without_8bitmime_is_sent_as_is() {
        let mut j = job(&["b@y.test"]);
        j.eightbit = true;
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|SIZE",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(t.contains("C: MAIL FROM:<a@x.test> SIZE=100\n"), "{t}");
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
    }

    #[test]
    fn starttls_then_ehlo_again_then_auth() {
        let mut j = job(&["b@y.test"]);
        j.tls = TlsMode::RequireStartTls;
        j.auth = creds();
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|STARTTLS|AUTH PLAIN",
                "220 go ahead",
                "250 mx|AUTH PLAIN|PIPELINING",
                "235 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert_eq!(
            t,
            lines(
                "S: 220 mx
                 C: EHLO me.test
                 S: 250 mx STARTTLS AUTH PLAIN
                 C: STARTTLS
                 S: 220 go ahead
                 C: <tls>
                 C: EHLO me.test
                 S: 250 mx AUTH PLAIN PIPELINING
                 C: AUTH PLAIN AG1lQGV4YW1wbGUubmV0AHMzY3JldCBwYXNz
                 S: 235 ok
                 C: MAIL FROM:<a@x.test> / RCPT TO:<b@y.test> / DATA
                 S: 250 ok
                 S: 250 ok
                 S: 354 go
                 C: <data>
                 S: 250 ok
                 C: QUIT
                 S: 221 bye"
            )
        );
        assert_eq!(o.tls.as_deref(), Some("TLSv1.3 TLS13_AES_256_GCM_SHA384"));
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
    }

    #[test]
    fn starttls_required_but_not_offered_or_refused() {
        let mut j = job(&["b@y.test"]);
        j.tls = TlsMode::RequireStartTls;
        j.auth = creds();
        let (t, o) = run(j.clone(), &["220 mx", "250 mx|AUTH PLAIN", "221 bye"]);
        assert!(!t.contains("AUTH PLAIN AG"), "{t}");
        assert_eq!(results(&o), ["b@y.test deferred: STARTTLS not offered"]);
        assert_eq!(
            o.failure,
            Some(Failure::TlsRequired("STARTTLS not offered".into()))
        );

        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|STARTTLS|AUTH PLAIN",
                "454 4.7.0 TLS not available",
                "221 bye",
            ],
        );
        assert!(!t.contains("AUTH PLAIN AG"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test deferred: STARTTLS refused: 454 4.7.0 TLS not available (in reply to STARTTLS)"]
        );
    }

    #[test]
    fn opportunistic_tls() {
        let mut j = job(&["b@y.test"]);
        j.tls = TlsMode::Opportunistic;
        // Not offered: clear text.
        let (t, o) = run(
            j.clone(),
            &[
                "220 mx", "250 mx", "250 ok", "250 ok", "354 go", "250 ok", "221 bye",
            ],
        );
        assert!(!t.contains("STARTTLS"), "{t}");
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
        // Refused: clear text, same EHLO.
        let (t, o) = run(
            j.clone(),
            &[
                "220 mx",
                "250 mx|STARTTLS",
                "454 no",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(t.contains("S: 454 no\nC: MAIL FROM"), "{t}");
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
        // Never credentials in clear, even when offered.
        j.auth = creds();
        let (t, o) = run(j, &["220 mx", "250 mx|AUTH PLAIN", "221 bye"]);
        assert!(!t.contains("AUTH PLAIN AG"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test deferred: refusing to send credentials without TLS"]
        );
    }

    #[test]
    fn tls_handshake_failure() {
        for (mode, opportunistic) in [
            (TlsMode::Opportunistic, true),
            (TlsMode::RequireStartTls, false),
        ] {
            let mut j = job(&["b@y.test"]);
            j.tls = mode;
            let mut c = Client::new(j);
            let mut replies = ["220 mx", "250 mx|STARTTLS", "220 go"].into_iter();
            let outcome = loop {
                match c.next_output() {
                    Some(Output::StartTls) => {
                        c.tls_failed("invalid peer certificate: NotValidForName")
                    }
                    Some(Output::Done(o)) => break o,
                    Some(_) => {}
                    None => c.on_reply({
                        let text = replies.next().unwrap();
                        let mut lines = text.split('|');
                        let first = lines.next().unwrap();
                        let mut r = ServerReply::new(first[..3].parse().unwrap(), &first[4..]);
                        r.lines.extend(lines.map(str::to_owned));
                        r
                    }),
                }
            };
            assert_eq!(outcome.retry_in_clear(), opportunistic);
            assert_eq!(
                results(&outcome),
                ["b@y.test deferred: TLS handshake failed: invalid peer certificate: NotValidForName"]
            );
        }
    }

    #[test]
    fn implicit_tls_starts_before_the_greeting() {
        let mut j = job(&["b@y.test"]);
        j.tls = TlsMode::Implicit;
        j.auth = creds();
        let (t, o) = run(
            j,
            &[
                "220 mx",
                "250 mx|AUTH PLAIN",
                "235 ok",
                "250 ok",
                "250 ok",
                "354 go",
                "250 ok",
                "221 bye",
            ],
        );
        assert!(
            t.starts_with(
                "C: <tls>\nS: 220 mx\nC: EHLO me.test\nS: 250 mx AUTH PLAIN\nC: AUTH PLAIN AG"
            ),
            "{t}"
        );
        assert_eq!(results(&o), ["b@y.test delivered: 250 ok"]);
        assert!(o.tls.is_some());
    }

    #[test]
    fn addresses_cannot_inject_commands() {
        let (t, o) = run(
            job(&["b@y.test\r\nRCPT TO:<evil@z>", "c@y.test"]),
            &[
                "220 mx", "250 mx", "250 ok", "250 ok", "354 go", "250 ok", "221 bye",
            ],
        );
        assert!(!t.contains("evil"), "{t}");
        assert_eq!(
            results(&o),
            [
                "b@y.test\r\nRCPT TO:<evil@z> failed: 5.1.3 invalid recipient address",
                "c@y.test delivered: 250 ok"
            ]
        );
        let mut j = job(&["b@y.test"]);
        j.sender = "a@x>\r\nDATA".into();
        j.helo = "me\r\nQUIT".into();
        let (t, o) = run(j, &["220 mx", "250 mx", "221 bye"]);
        assert!(t.contains("C: EHLO meQUIT\n"), "{t}");
        assert!(!t.contains("MAIL"), "{t}");
        assert_eq!(
            results(&o),
            ["b@y.test failed: 5.1.7 invalid sender address"]
        );
    }

    #[test]
    fn null_sender_and_no_recipients() {
        let mut j = job(&["b@y.test"]);
        j.sender = String::new();
        let (t, _) = run(
            j,
            &[
                "220 mx", "250 mx", "250 ok", "250 ok", "354 go", "250 ok", "221 bye",
            ],
        );
        assert!(t.contains("C: MAIL FROM:<>\n"), "{t}");
        let (t, o) = run(job(&[]), &["220 mx", "250 mx", "221 bye"]);
        assert!(t.ends_with("C: QUIT\nS: 221 bye\n"), "{t}");
        assert!(o.recipients.is_empty());
    }

    #[test]
    fn awaiting_names_each_timeout() {
        let mut c = Client::new(job(&["b@y.test"]));
        assert_eq!(c.awaiting(), Some(Wait::Greeting));
        c.on_reply(ServerReply::new(220, "mx"));
        assert_eq!(c.awaiting(), Some(Wait::Command));
        c.on_reply(ServerReply::new(250, "mx"));
        assert_eq!(c.awaiting(), Some(Wait::Mail));
        c.on_reply(ServerReply::new(250, "ok"));
        assert_eq!(c.awaiting(), Some(Wait::Rcpt));
        c.on_reply(ServerReply::new(250, "ok"));
        assert_eq!(c.awaiting(), Some(Wait::DataInit));
        c.on_reply(ServerReply::new(354, "go"));
        assert_eq!(c.awaiting(), Some(Wait::DataFinal));
    }

    #[test]
    fn credentials_debug_is_masked() {
        assert!(!format!("{:?}", creds()).contains("s3cret"));
    }
}
