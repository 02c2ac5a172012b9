//! The sans-IO SMTP server session: (state, command line, now) -> action.
//!
//! Owns the state machine of RFC 5321 4.1.4 (command order), the policy
//! decisions taken per command (local recipient or relay, limits), and the
//! mapping of every error to its reply. It never touches a socket or a file:
//! `conn.rs` feeds it lines and carries out its actions, which is why the
//! transcript tests below need no network.
//!
//! ```text
//! Greeted --EHLO/HELO--> Ready --MAIL--> Mail --RCPT ok--> Rcpt --DATA--> (driver streams the data)
//!    ^                   | ^  <--RSET/EHLO--  |  <--RSET/EHLO--'                 |
//!    |                   | '-------------------------- data_done --------------'
//!    |                   '--AUTH--> Auth --(334 challenges, then verdict)--> Ready
//!    '-- STARTTLS (after the handshake, RFC 3207 4.2) from Greeted or Ready
//!    '-- RSET keeps Greeted; QUIT or too many errors from anywhere --> Closed
//! ```
//!
//! Policy by listener mode: `submission` and `smtps` need AUTH before MAIL
//! (RFC 6409 4.3); every mode accepts mail for local domains; relaying needs
//! an authenticated session or a client in `relay.allow_from`. AUTH is
//! offered only over TLS (RFC 4954 4), unless `auth.allow_plaintext_loopback`
//! and the client is on loopback.

use std::net::IpAddr;

use log::{debug, info, trace};

use super::command::{Command, ForwardPath, Mailbox, ParseError, ReversePath, Verb};
use super::data::DataError;
use super::message::{Message, Recipient};
use super::reply::{self, Reply};
use super::sasl::{Exchange, Mechanism, Step};
use crate::config::{Config, ListenMode, SenderPolicy};
use crate::local::{ResolveError, Target};

/// Commands that move no mail (NOOP, RSET, VRFY, HELP) a session may send
/// before each further one counts as an error (Postfix's default, 100).
const JUNK_LIMIT: u32 = 100;

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Send this reply, then close the connection.
    Close(Reply),
    /// Send this reply, then `421 4.7.0 Too many errors` and close: the
    /// session passed `max_errors`, but this reply still answers the
    /// client's command (a permanent refusal must stay permanent, or the
    /// client would retry a message that can never be taken).
    CloseAfter(Reply),
    /// Open a spool file; on success send `354` and stream the data into it,
    /// then report with `data_done`; on failure report `Storage` at once.
    Data(Message),
    /// Send this 220, discard every byte already read (RFC 3207 5: the
    /// CVE-2011-0411 class), do the TLS handshake, then call `tls_started`;
    /// on failure close the connection.
    StartTls(Reply),
    /// Check these credentials (the driver owns the users file, the delay
    /// and the per-address failure count), then call `auth_done`.
    Authenticate { user: String, password: String },
}

/// How the DATA phase ended, as the driver saw it.
#[derive(Debug)]
pub enum DataResult {
    /// Every copy is durable; the id names the message in logs and the queue.
    Stored {
        id: String,
    },
    Refused(DataError),
    /// More `Received:` fields than allowed: a mail loop.
    Loop,
}

#[derive(Debug)]
struct Tx {
    sender: String,
    smtputf8: bool,
    recipients: Vec<Recipient>,
    /// RCPT commands tried, accepted or not, to tell 503 from 554 at DATA.
    rcpt_attempts: usize,
}

#[derive(Debug)]
enum State {
    /// Greeting sent, no EHLO/HELO yet.
    Greeted,
    /// Between transactions.
    Ready,
    /// MAIL accepted, no recipient yet.
    Mail(Tx),
    /// At least one recipient accepted.
    Rcpt(Tx),
    /// DATA handed to the driver; waiting for `data_done`.
    Data,
    /// In an AUTH exchange: lines are SASL responses, not commands.
    Auth(Box<Exchange>),
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Greeted => "Greeted",
            State::Ready => "Ready",
            State::Mail(_) => "Mail",
            State::Rcpt(_) => "Rcpt",
            State::Data => "Data",
            State::Auth(_) => "Auth",
            State::Closed => "Closed",
        }
    }
}

#[derive(Debug)]
struct Helo {
    name: String,
    esmtp: bool,
}

pub struct Session<'c> {
    config: &'c Config,
    id: String,
    peer: IpAddr,
    mode: ListenMode,
    /// The server has a certificate, so STARTTLS can be offered.
    tls_ready: bool,
    /// Protocol and cipher once the connection is encrypted.
    tls: Option<String>,
    /// The authenticated user.
    user: Option<String>,
    /// On the sendmail socket: the Unix login and whether it may choose
    /// its envelope sender (root, `local.trusted_users`).
    local_user: Option<(String, bool)>,
    helo: Option<Helo>,
    state: State,
    errors: u32,
    /// NOOP, RSET, VRFY and HELP so far.
    junk: u32,
}

impl<'c> Session<'c> {
    /// A session on a listener of `mode`; `tls_ready` when the server has
    /// a certificate. For smtps, call `tls_started` before the greeting.
    pub fn new(
        config: &'c Config,
        id: String,
        peer: IpAddr,
        mode: ListenMode,
        tls_ready: bool,
    ) -> Session<'c> {
        Session {
            config,
            id,
            peer,
            mode,
            tls_ready,
            tls: None,
            user: None,
            local_user: None,
            helo: None,
            state: State::Greeted,
            errors: 0,
            junk: 0,
        }
    }

    /// A local submission (the sendmail socket) by Unix user `login`.
    pub fn set_local_user(&mut self, login: String, trusted: bool) {
        info!("session={} local user={login} trusted={trusted}", self.id);
        self.local_user = Some((login, trusted));
    }

    /// The handshake succeeded: the session starts over (RFC 3207 4.2).
    pub fn tls_started(&mut self, description: String) {
        info!("session={} tls={description}", self.id);
        self.tls = Some(description);
        self.helo = None;
        // A login in clear (allow_plaintext_loopback) is knowledge from
        // before TLS too: discarded.
        self.user = None;
        self.set_state(State::Greeted);
    }

    /// True while an AUTH exchange is running: the next line is a SASL
    /// response, which may be up to 12288 octets (RFC 4954 4).
    pub fn in_auth_exchange(&self) -> bool {
        matches!(self.state, State::Auth(_))
    }

    /// The verdict on the credentials of an `Authenticate` action.
    pub fn auth_done(&mut self, user: String, ok: bool) -> Action {
        if ok {
            info!("session={} auth user={user}", self.id);
            self.user = Some(user);
            return Action::Reply(Reply::new(235, "2.7.0", "Authentication successful"));
        }
        info!("session={} auth failed user={user}", self.id);
        self.count_errors(Action::Reply(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid",
        )))
    }

    /// AUTH is offered and accepted on this connection now.
    fn auth_offered(&self) -> bool {
        self.config.auth.users_file.is_some()
            && (self.tls.is_some()
                || (self.config.auth.allow_plaintext_loopback && self.peer.is_loopback()))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The 220 banner (RFC 5321 4.3.1).
    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP postling", self.config.hostname))
    }

    /// True when no transaction is open, so a shutdown may close the session.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Greeted | State::Ready)
    }

    /// The only writer of `state` (STYLE habit 3).
    fn set_state(&mut self, next: State) {
        trace!(
            "session={} state={}=>{}",
            self.id,
            self.state.name(),
            next.name()
        );
        self.state = next;
    }

    /// Ends the open transaction, if any, returning it (state becomes Ready).
    fn take_tx(&mut self) -> Option<Tx> {
        if !matches!(self.state, State::Mail(_) | State::Rcpt(_)) {
            return None;
        }
        trace!("session={} state={}=>Ready", self.id, self.state.name());
        match std::mem::replace(&mut self.state, State::Ready) {
            State::Mail(tx) | State::Rcpt(tx) => Some(tx),
            _ => None,
        }
    }

    /// Handles one command line (CRLF removed).
    pub fn command(&mut self, line: &[u8]) -> Action {
        if let State::Auth(exchange) = &mut self.state {
            let step = match std::str::from_utf8(line) {
                Ok(text) => exchange.respond(text),
                Err(_) => Step::Malformed("Response is not valid UTF-8"),
            };
            let action = self.auth_step(step);
            return self.count_errors(action);
        }
        // The verb is looked at only for a line over the base limit.
        if line.len() > super::conn::MAX_COMMAND_LINE - 2 && line.len() > line_limit(line) - 2 {
            return self.line_too_long();
        }
        let action = match Command::parse(line) {
            Ok(cmd) => self.dispatch(cmd),
            Err(e) => Action::Reply(parse_error_reply(e)),
        };
        self.count_errors(action)
    }

    /// A command line longer than RFC 5321 4.5.3.1.4 allows (or, in an
    /// AUTH exchange, than RFC 4954 4 allows: 500 5.5.6).
    pub fn line_too_long(&mut self) -> Action {
        if self.in_auth_exchange() {
            self.set_state(State::Ready);
            let r = Reply::new(500, "5.5.6", "Authentication exchange line is too long");
            return self.count_errors(Action::Reply(r));
        }
        self.count_errors(Action::Reply(reply::line_too_long()))
    }

    /// A bare CR or LF in a command: refused, and the connection closed so
    /// nothing after it can be read differently from how a proxy read it.
    pub fn bare_line_ending(&mut self) -> Action {
        self.set_state(State::Closed);
        Action::Close(reply::bare_line_ending())
    }

    fn count_errors(&mut self, action: Action) -> Action {
        let Action::Reply(r) = action else {
            return action;
        };
        // 452 "too many recipients" is the client's cue to send the rest in
        // another transaction (RFC 5321 4.5.3.1.10), not misbehaviour: it
        // must not end the session before the accepted ones get the mail.
        // A local submission (sendmail, over the Unix socket) comes from a
        // known Unix user, not a stranger probing: a long list of unknown
        // recipients from a script must not cut its message off.
        if !r.is_error() || r.code == 452 || self.local_user.is_some() {
            return Action::Reply(r);
        }
        self.add_error(r, "too many errors")
    }

    /// NOOP, RSET, VRFY and HELP move no mail: past JUNK_LIMIT of them since
    /// the last message accepted, each counts as an error, as Postfix's
    /// smtpd_junk_command_limit does, so a NOOP before every
    /// command_timeout cannot hold a session forever.
    fn junk(&mut self, r: Reply) -> Action {
        self.junk += 1;
        if self.junk <= JUNK_LIMIT || self.local_user.is_some() {
            return Action::Reply(r);
        }
        self.add_error(r, "too many commands that move no mail")
    }

    /// Counts one error against `max_errors`: past it, `r` is still sent,
    /// then the session closes.
    fn add_error(&mut self, r: Reply, why: &str) -> Action {
        self.errors += 1;
        debug!("session={} error={} reply=\"{}\"", self.id, self.errors, r);
        if self.errors > self.config.limits.max_errors {
            info!("session={} closing: {why} ({})", self.id, self.errors);
            self.set_state(State::Closed);
            return Action::CloseAfter(r);
        }
        Action::Reply(r)
    }

    fn dispatch(&mut self, cmd: Command<'_>) -> Action {
        match cmd {
            Command::Ehlo(name) => Action::Reply(self.helo(name, true)),
            Command::Helo(name) => Action::Reply(self.helo(name, false)),
            Command::Mail(from, params) => Action::Reply(self.mail(from, params)),
            Command::Rcpt(to) => Action::Reply(self.rcpt(to)),
            Command::Data => self.data(),
            Command::Rset => {
                // RSET before EHLO keeps the session in Greeted.
                self.take_tx();
                self.junk(reply::reset_ok())
            }
            Command::Noop => self.junk(reply::ok()),
            Command::Vrfy => self.junk(reply::vrfy()),
            Command::Help => self.junk(reply::help()),
            Command::Quit => {
                self.set_state(State::Closed);
                Action::Close(reply::bye())
            }
            Command::StartTls => self.starttls(),
            Command::Auth(mechanism, initial) => self.auth(mechanism, initial),
        }
    }

    fn starttls(&mut self) -> Action {
        if self.tls.is_some() {
            return Action::Reply(reply::bad_sequence("TLS is already active"));
        }
        if !self.tls_ready {
            return Action::Reply(reply::not_implemented());
        }
        if !matches!(self.state, State::Greeted | State::Ready) {
            return Action::Reply(reply::bad_sequence(
                "STARTTLS is not allowed in a mail transaction",
            ));
        }
        Action::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) -> Action {
        if self.config.auth.users_file.is_none() {
            return Action::Reply(reply::not_implemented());
        }
        if self.user.is_some() {
            return Action::Reply(reply::bad_sequence("Already authenticated"));
        }
        match self.state {
            State::Ready => {}
            State::Greeted => return Action::Reply(reply::bad_sequence("Send EHLO first")),
            _ => {
                return Action::Reply(reply::bad_sequence(
                    "AUTH is not allowed in a mail transaction",
                ))
            }
        }
        if !self.auth_offered() {
            return Action::Reply(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism (use STARTTLS)",
            ));
        }
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return Action::Reply(Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication type (use PLAIN or LOGIN)",
            ));
        };
        let (exchange, step) = Exchange::start(mechanism, initial);
        self.set_state(State::Auth(Box::new(exchange)));
        self.auth_step(step)
    }

    /// Carries out one step of a SASL exchange (state is Auth on entry).
    fn auth_step(&mut self, step: Step) -> Action {
        match step {
            Step::Challenge(challenge) => Action::Reply(Reply::plain(334, challenge)),
            Step::Done { user, password, .. } => {
                self.set_state(State::Ready);
                Action::Authenticate { user, password }
            }
            Step::Malformed(why) => {
                self.set_state(State::Ready);
                Action::Reply(Reply::new(501, "5.5.2", why))
            }
            Step::Cancelled => {
                self.set_state(State::Ready);
                Action::Reply(Reply::new(501, "5.0.0", "Authentication cancelled"))
            }
        }
    }

    fn helo(&mut self, name: &str, esmtp: bool) -> Reply {
        // EHLO/HELO resets any transaction (RFC 5321 4.1.4).
        self.take_tx();
        self.set_state(State::Ready);
        debug!("session={} helo={} esmtp={}", self.id, name, esmtp);
        self.helo = Some(Helo {
            name: name.to_string(),
            esmtp,
        });
        let greeting = format!("{} Hello {}", self.config.hostname, name);
        if !esmtp {
            return Reply::plain(250, greeting);
        }
        let mut r = Reply::plain(250, greeting)
            .line("PIPELINING")
            .line(format!("SIZE {}", self.config.limits.max_message_size))
            .line("8BITMIME")
            .line("SMTPUTF8")
            .line("ENHANCEDSTATUSCODES");
        if self.tls_ready && self.tls.is_none() {
            r = r.line("STARTTLS");
        }
        if self.auth_offered() && self.user.is_none() {
            r = r.line("AUTH PLAIN LOGIN");
        }
        r
    }

    fn mail(&mut self, from: ReversePath<'_>, params: super::command::MailParams) -> Reply {
        match self.state {
            State::Greeted => return reply::bad_sequence("Send EHLO or HELO first"),
            State::Mail(_) | State::Rcpt(_) => return reply::bad_sequence("Nested MAIL command"),
            State::Ready => {}
            State::Data | State::Auth(_) | State::Closed => {
                return reply::bad_sequence("Bad sequence of commands")
            }
        }
        if matches!(self.mode, ListenMode::Submission | ListenMode::Smtps) && self.user.is_none() {
            return Reply::new(530, "5.7.0", "Authentication required");
        }
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        if !esmtp && params != Default::default() {
            // Extensions exist only after EHLO (RFC 5321 4.1.1.1).
            return Reply::new(555, "5.5.4", "MAIL parameters need EHLO, not HELO");
        }
        if params.auth && !self.auth_offered() {
            // Part of the AUTH extension: unknown where it is not offered.
            return parse_error_reply(ParseError::UnknownParam(Verb::Mail));
        }
        let sender = match from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(m) => {
                if m.is_utf8() && !params.smtputf8 {
                    return needs_smtputf8();
                }
                address(&m)
            }
        };
        if params
            .size
            .is_some_and(|s| s > self.config.limits.max_message_size)
        {
            return reply::message_too_big();
        }
        // An untrusted local user sends as itself, whatever it asked for
        // (sendmail's rule; the real sender is known from SO_PEERCRED).
        let sender = match &self.local_user {
            Some((login, false)) => {
                let own = self.config.local.own_address(login);
                if sender != own {
                    info!(
                        "session={} local user={login} sender <{sender}> replaced by <{own}>",
                        self.id
                    );
                }
                own
            }
            _ => sender,
        };
        if let Some(user) = &self.user {
            if !self.sender_allowed(user, &sender) {
                info!(
                    "session={} reject from=<{sender}>: not owned by user={user}",
                    self.id
                );
                return Reply::new(
                    553,
                    "5.7.1",
                    format!("Sender address <{sender}> is not owned by user {user}"),
                );
            }
        }
        debug!(
            "session={} from=<{}> size={}",
            self.id,
            sender,
            params
                .size
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        );
        self.set_state(State::Mail(Tx {
            sender,
            smtputf8: params.smtputf8,
            recipients: Vec::new(),
            rcpt_attempts: 0,
        }));
        reply::sender_ok()
    }

    fn rcpt(&mut self, to: ForwardPath<'_>) -> Reply {
        let (count, smtputf8) = match &mut self.state {
            State::Mail(tx) | State::Rcpt(tx) => {
                tx.rcpt_attempts += 1;
                (tx.recipients.len(), tx.smtputf8)
            }
            _ => return reply::bad_sequence("Need MAIL before RCPT"),
        };
        if count >= self.config.limits.max_recipients {
            return reply::too_many_recipients();
        }
        let local = &self.config.local;
        let (address, targets) = match to {
            ForwardPath::Postmaster => {
                let domain = local.first_domain();
                // Named with the domain it is resolved in, so its copy's
                // Delivered-To: is a whole address.
                (
                    format!("postmaster@{domain}"),
                    local.resolve("postmaster", domain),
                )
            }
            ForwardPath::Mailbox(m) => {
                if m.is_utf8() && !smtputf8 {
                    return needs_smtputf8();
                }
                let address = address(&m);
                if !m.is_literal() && local.is_local_domain(m.domain) {
                    let targets = local.resolve(m.local, m.domain);
                    (address, targets)
                } else if self.user.is_some()
                    || self.local_user.is_some()
                    || self.config.relay.allows(self.peer)
                {
                    let targets = Ok(vec![Target::Remote(address.clone())]);
                    (address, targets)
                } else {
                    info!(
                        "session={} reject to=<{}>: relay denied for {}",
                        self.id, address, self.peer
                    );
                    return reply::relay_denied();
                }
            }
        };
        let targets = match targets {
            Ok(t) => t,
            Err(e) => {
                info!("session={} reject to=<{}>: {:?}", self.id, address, e);
                return match e {
                    ResolveError::UnknownUser => reply::unknown_user(),
                    ResolveError::RoutingCharacters => reply::routing_characters(),
                    ResolveError::AliasLoop => reply::alias_loop(),
                };
            }
        };
        debug!("session={} to=<{}>", self.id, address);
        let Some(mut tx) = self.take_tx() else {
            unreachable!("checked at the top: a transaction is open");
        };
        tx.recipients.push(Recipient { address, targets });
        self.set_state(State::Rcpt(tx));
        reply::recipient_ok()
    }

    fn data(&mut self) -> Action {
        match &self.state {
            State::Rcpt(_) => {}
            State::Mail(tx) if tx.rcpt_attempts > 0 => {
                return Action::Reply(reply::no_valid_recipients())
            }
            State::Mail(_) => return Action::Reply(reply::bad_sequence("Need RCPT before DATA")),
            _ => return Action::Reply(reply::bad_sequence("Need MAIL before DATA")),
        }
        let Some(tx) = self.take_tx() else {
            unreachable!("state was Rcpt just above");
        };
        self.set_state(State::Data);
        let helo = self.helo.as_ref();
        let protocol = protocol(
            helo.is_some_and(|h| h.esmtp),
            tx.smtputf8,
            self.tls.is_some(),
            self.user.is_some(),
        );
        Action::Data(Message {
            session: self.id.clone(),
            sender: tx.sender,
            recipients: tx.recipients,
            helo: helo.map_or_else(String::new, |h| h.name.clone()),
            peer: self.peer,
            protocol,
            tls: self.tls.clone(),
            local_user: self.local_user.as_ref().map(|(login, _)| login.clone()),
        })
    }

    /// Reports how the DATA phase ended; returns the reply to send.
    pub fn data_done(&mut self, result: DataResult) -> Action {
        self.set_state(State::Ready);
        let r = match result {
            DataResult::Stored { id } => {
                // A connection that carries mail is no idler: an MTA that
                // sends RSET (Postfix, to check a cached connection) before
                // each of hundreds of messages is never cut off.
                self.junk = 0;
                reply::queued(&id)
            }
            DataResult::Loop => reply::too_many_hops(),
            DataResult::Refused(e) => data_error_reply(e),
        };
        self.count_errors(Action::Reply(r))
    }
}

impl Session<'_> {
    /// `auth.senders = "own"`: the login's own address at a local domain,
    /// the login itself when it is an address, the rewrite address, or `<>`.
    fn sender_allowed(&self, user: &str, sender: &str) -> bool {
        if self.config.auth.senders == SenderPolicy::Any || sender.is_empty() {
            return true;
        }
        if sender.eq_ignore_ascii_case(user)
            || self.config.relay.rewrite_from.as_deref() == Some(sender)
        {
            return true;
        }
        match sender.rsplit_once('@') {
            Some((local, domain)) => {
                local.eq_ignore_ascii_case(user)
                    && !user.contains('@')
                    && self.config.local.is_local_domain(domain)
            }
            None => false,
        }
    }
}

/// RFC 3848 / RFC 6531 3.7.3 protocol names for `Received: ... with`.
fn protocol(esmtp: bool, utf8: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp, utf8, tls, auth) {
        (false, _, _, _) => "SMTP",
        (true, false, false, false) => "ESMTP",
        (true, false, true, false) => "ESMTPS",
        (true, false, false, true) => "ESMTPA",
        (true, false, true, true) => "ESMTPSA",
        (true, true, false, false) => "UTF8SMTP",
        (true, true, true, false) => "UTF8SMTPS",
        (true, true, false, true) => "UTF8SMTPA",
        (true, true, true, true) => "UTF8SMTPSA",
    }
}

/// The longest a command line may be, CRLF included: RFC 5321 4.5.3.1.4's
/// 512, raised as its extensions allow (4.5.3.1.4 last paragraph): AUTH
/// lines up to RFC 4954's 12288 (the framer's limit), MAIL and RCPT to
/// 2048 as in Postfix, room for SIZE (RFC 1870 adds 26), BODY (16),
/// SMTPUTF8 (RFC 6531 adds 10) and an AUTH= parameter (RFC 4954 adds 500).
fn line_limit(line: &[u8]) -> usize {
    let verb = |v: &[u8]| line.len() > 5 && line[..5].eq_ignore_ascii_case(v);
    if verb(b"AUTH ") {
        usize::MAX
    } else if verb(b"MAIL ") || verb(b"RCPT ") {
        2048
    } else {
        super::conn::MAX_COMMAND_LINE
    }
}

/// Reconstructs `local@domain` as the client wrote it.
fn address(m: &Mailbox<'_>) -> String {
    format!("{}@{}", m.local, m.domain)
}

fn needs_smtputf8() -> Reply {
    Reply::new(
        553,
        "5.6.7",
        "Non-ASCII address needs the SMTPUTF8 parameter (RFC 6531)",
    )
}

/// One place that maps parser errors to replies (STYLE habit 5).
fn parse_error_reply(e: ParseError) -> Reply {
    let address_code = |verb| if verb == Verb::Mail { "5.1.7" } else { "5.1.3" };
    match e {
        ParseError::Unknown => reply::unknown_command(),
        ParseError::NotImplemented => reply::not_implemented(),
        ParseError::Syntax(_, why) => Reply::new(501, "5.5.4", why),
        ParseError::Address(verb, why) => Reply::new(501, address_code(verb), why),
        ParseError::UnknownParam(_) => Reply::new(555, "5.5.4", "Unsupported parameter"),
    }
}

/// One place that maps DATA errors to replies.
fn data_error_reply(e: DataError) -> Reply {
    match e {
        DataError::TooBig => reply::message_too_big(),
        DataError::BareLineEnding => reply::bad_data_line_ending(),
        DataError::LineTooLong => reply::data_line_too_long(),
        DataError::FoldedStart => reply::folded_first_line(),
        DataError::Storage => reply::local_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = "hostname = \"mx.test\"\n[local]\ndomains = [\"localhost\"]\nusers = [\"alice\"]\n[relay]\nallow_from = [\"10.0.0.0/8\"]\n[limits]\nmax_errors = 100\n";
        crate::config::parse(text, None, &Default::default()).expect("valid test config")
    }

    /// Runs `script` (commands separated by `|`) and returns each reply's
    /// "code enhanced" prefix, or "DATA" where the driver would stream data.
    fn run(config: &Config, peer: &str, script: &str) -> Vec<String> {
        let mut s = Session::new(
            config,
            "T".into(),
            peer.parse().expect("ip"),
            ListenMode::Smtp,
            false,
        );
        script
            .split('|')
            .map(|cmd| match s.command(cmd.as_bytes()) {
                Action::Reply(r) | Action::Close(r) | Action::CloseAfter(r) => {
                    format!("{} {}", r.code, r.enhanced.unwrap_or(""))
                        .trim_end()
                        .to_string()
                }
                Action::Data(_) => {
                    s.data_done(DataResult::Stored { id: "X".into() });
                    "DATA".into()
                }
                Action::StartTls(r) => format!("{} STARTTLS", r.code),
                Action::Authenticate { user, .. } => format!("VERIFY {user}"),
            })
            .collect()
    }

    #[test]
    fn transcripts() {
        let c = config();
        let cases: &[(&str, &str, &str)] = &[
            // (peer, commands, replies)
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<alice@localhost>|DATA",
                "250|250 2.1.0|250 2.1.5|DATA",
            ),
            ("127.0.0.1", "MAIL FROM:<x@y>", "503 5.5.1"),
            (
                "127.0.0.1",
                "EHLO a|RCPT TO:<alice@localhost>",
                "250|503 5.5.1",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|DATA",
                "250|250 2.1.0|503 5.5.1",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<bob@localhost>|DATA",
                "250|250 2.1.0|550 5.1.1|554 5.5.1",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|MAIL FROM:<x@y>",
                "250|250 2.1.0|503 5.5.1",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RSET|RCPT TO:<alice@localhost>",
                "250|250 2.1.0|250 2.0.0|503 5.5.1",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|EHLO b|RCPT TO:<alice@localhost>",
                "250|250 2.1.0|250|503 5.5.1",
            ),
            ("127.0.0.1", "RSET|MAIL FROM:<x@y>", "250 2.0.0|503 5.5.1"),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<a%b@localhost>",
                "250|250 2.1.0|554 5.7.1",
            ),
            // 127.0.0.1 is outside this config's allow_from: no relaying.
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<u@example.com>",
                "250|250 2.1.0|554 5.7.1",
            ),
            (
                "10.1.2.3",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<u@example.com>|DATA",
                "250|250 2.1.0|250 2.1.5|DATA",
            ),
            (
                "::ffff:10.1.2.3",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<u@example.com>",
                "250|250 2.1.0|250 2.1.5",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y>|RCPT TO:<postmaster>",
                "250|250 2.1.0|250 2.1.5",
            ),
            (
                "127.0.0.1",
                "HELO a|MAIL FROM:<x@y> SIZE=1",
                "250|555 5.5.4",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y> SIZE=26214401",
                "250|552 5.3.4",
            ),
            (
                "127.0.0.1",
                "EHLO a|MAIL FROM:<x@y> SIZE=26214400",
                "250|250 2.1.0",
            ),
            ("127.0.0.1", "QUIT", "221 2.0.0"),
        ];
        for (peer, script, want) in cases {
            assert_eq!(run(&c, peer, script).join("|"), *want, "{peer} {script}");
        }
    }

    /// A plain-SMTP session from 127.0.0.1.
    fn session(c: &Config) -> Session<'_> {
        Session::new(
            c,
            "T".into(),
            "127.0.0.1".parse().expect("ip"),
            ListenMode::Smtp,
            false,
        )
    }

    #[test]
    fn error_limit_closes() {
        let mut c = config();
        c.limits.max_errors = 2;
        let mut s = session(&c);
        assert!(matches!(s.command(b"X"), Action::Reply(_)));
        assert!(matches!(s.command(b"X"), Action::Reply(_)));
        match s.command(b"X") {
            // The reply itself, then the close.
            Action::CloseAfter(r) => assert_eq!(r.code, 500),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_that_move_no_mail_count_as_errors_past_the_junk_limit() {
        let mut c = config();
        c.limits.max_errors = 2;
        let mut s = session(&c);
        for cmd in [b"NOOP".as_slice(), b"RSET", b"VRFY x", b"HELP"]
            .iter()
            .cycle()
            .take(100)
        {
            assert!(
                matches!(s.command(cmd), Action::Reply(r) if r.code / 100 == 2 || r.code == 214 || r.code == 252)
            );
        }
        // Still answered, but each is an error now: the third one over
        // max_errors closes the session, its reply sent first.
        assert!(matches!(s.command(b"NOOP"), Action::Reply(r) if r.code == 250));
        assert!(matches!(s.command(b"NOOP"), Action::Reply(r) if r.code == 250));
        assert!(matches!(s.command(b"NOOP"), Action::CloseAfter(r) if r.code == 250));

        // A message accepted starts the count again: an MTA that sends RSET
        // before each of hundreds of messages on one connection goes on.
        let mut c = config();
        c.limits.max_errors = 2;
        let mut s = session(&c);
        s.command(b"EHLO client.test");
        for _ in 0..150 {
            for _ in 0..2 {
                assert!(matches!(s.command(b"RSET"), Action::Reply(r) if r.code == 250));
            }
            assert!(
                matches!(s.command(b"MAIL FROM:<a@b.test>"), Action::Reply(r) if r.code == 250)
            );
            assert!(
                matches!(s.command(b"RCPT TO:<alice@localhost>"), Action::Reply(r) if r.code == 250)
            );
            assert!(matches!(s.command(b"DATA"), Action::Data(_)));
            let done = s.data_done(DataResult::Stored { id: "X".into() });
            assert!(matches!(done, Action::Reply(r) if r.code == 250));
        }
    }

    #[test]
    fn data_results_map_to_replies() {
        let c = config();
        let cases = [
            (DataResult::Stored { id: "ABC".into() }, 250, "2.0.0"),
            (DataResult::Loop, 554, "5.4.6"),
            (DataResult::Refused(DataError::TooBig), 552, "5.3.4"),
            (DataResult::Refused(DataError::BareLineEnding), 550, "5.6.0"),
            (DataResult::Refused(DataError::LineTooLong), 550, "5.6.0"),
            (DataResult::Refused(DataError::Storage), 451, "4.3.0"),
        ];
        for (result, code, enhanced) in cases {
            let mut s = session(&c);
            for cmd in ["EHLO a", "MAIL FROM:<x@y>", "RCPT TO:<alice@localhost>"] {
                s.command(cmd.as_bytes());
            }
            assert!(matches!(s.command(b"DATA"), Action::Data(_)));
            assert!(!s.is_idle());
            match s.data_done(result) {
                Action::Reply(r) => assert_eq!((r.code, r.enhanced), (code, Some(enhanced))),
                other => panic!("{other:?}"),
            }
            assert!(s.is_idle(), "back to Ready after DATA");
        }
    }
}
