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
//!    ^                     ^  <--RSET/EHLO--  |  <--RSET/EHLO--'                 |
//!    |                     '-------------------------- data_done --------------'
//!    '-- RSET keeps Greeted; QUIT or too many errors from anywhere --> Closed
//! ```

use std::net::IpAddr;

use log::{debug, info, trace};

use super::command::{Command, ForwardPath, Mailbox, ParseError, ReversePath, Verb};
use super::data::DataError;
use super::message::{Message, Recipient};
use super::reply::{self, Reply};
use crate::config::Config;
use crate::local::{ResolveError, Target};

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Send this reply, then close the connection.
    Close(Reply),
    /// Open a spool file; on success send `354` and stream the data into it,
    /// then report with `data_done`; on failure report `Storage` at once.
    Data(Message),
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
    helo: Option<Helo>,
    state: State,
    errors: u32,
}

impl<'c> Session<'c> {
    pub fn new(config: &'c Config, id: String, peer: IpAddr) -> Session<'c> {
        Session {
            config,
            id,
            peer,
            helo: None,
            state: State::Greeted,
            errors: 0,
        }
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
        let action = match Command::parse(line) {
            Ok(cmd) => self.dispatch(cmd),
            Err(e) => Action::Reply(parse_error_reply(e)),
        };
        self.count_errors(action)
    }

    /// A command line longer than RFC 5321 4.5.3.1.4 allows.
    pub fn line_too_long(&mut self) -> Action {
        self.count_errors(Action::Reply(reply::line_too_long()))
    }

    /// A bare CR or LF in a command: refused, and the connection closed so
    /// nothing after it can be read differently from how a proxy read it.
    pub fn bare_line_ending(&mut self) -> Action {
        self.set_state(State::Closed);
        Action::Close(reply::bare_line_ending())
    }

    fn count_errors(&mut self, action: Action) -> Action {
        let Action::Reply(r) = &action else {
            return action;
        };
        // 452 "too many recipients" is the client's cue to send the rest in
        // another transaction (RFC 5321 4.5.3.1.10), not misbehaviour: it
        // must not end the session before the accepted ones get the mail.
        if !r.is_error() || r.code == 452 {
            return action;
        }
        self.errors += 1;
        debug!("session={} error={} reply=\"{}\"", self.id, self.errors, r);
        if self.errors > self.config.limits.max_errors {
            info!(
                "session={} closing: too many errors ({})",
                self.id, self.errors
            );
            self.set_state(State::Closed);
            return Action::Close(reply::too_many_errors());
        }
        action
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
                Action::Reply(reply::reset_ok())
            }
            Command::Noop => Action::Reply(reply::ok()),
            Command::Vrfy => Action::Reply(reply::vrfy()),
            Command::Help => Action::Reply(reply::help()),
            Command::Quit => {
                self.set_state(State::Closed);
                Action::Close(reply::bye())
            }
        }
    }

    fn helo(&mut self, name: &str, esmtp: bool) -> Reply {
        // EHLO/HELO resets any transaction (RFC 5321 4.1.4).
        self.take_tx();
        self.set_state(State::Ready);
        info!("session={} helo={} esmtp={}", self.id, name, esmtp);
        self.helo = Some(Helo {
            name: name.to_string(),
            esmtp,
        });
        let greeting = format!("{} Hello {}", self.config.hostname, name);
        if !esmtp {
            return Reply::plain(250, greeting);
        }
        Reply::plain(250, greeting)
            .line("PIPELINING")
            .line(format!("SIZE {}", self.config.limits.max_message_size))
            .line("8BITMIME")
            .line("SMTPUTF8")
            .line("ENHANCEDSTATUSCODES")
    }

    fn mail(&mut self, from: ReversePath<'_>, params: super::command::MailParams) -> Reply {
        match self.state {
            State::Greeted => return reply::bad_sequence("Send EHLO or HELO first"),
            State::Mail(_) | State::Rcpt(_) => return reply::bad_sequence("Nested MAIL command"),
            State::Ready => {}
            State::Data | State::Closed => return reply::bad_sequence("Bad sequence of commands"),
        }
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        if !esmtp && params != Default::default() {
            // Extensions exist only after EHLO (RFC 5321 4.1.1.1).
            return Reply::new(555, "5.5.4", "MAIL parameters need EHLO, not HELO");
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
        info!(
            "session={} from=<{}> size={:?}",
            self.id, sender, params.size
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
                let domain = local.domains.first().map_or("localhost", String::as_str);
                (
                    "postmaster".to_string(),
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
                } else if self.config.relay.allows(self.peer) {
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
        info!("session={} to=<{}>", self.id, address);
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
        let protocol = match (helo.is_some_and(|h| h.esmtp), tx.smtputf8) {
            (false, _) => "SMTP",
            (true, false) => "ESMTP",
            (true, true) => "UTF8SMTP",
        };
        Action::Data(Message {
            session: self.id.clone(),
            sender: tx.sender,
            recipients: tx.recipients,
            helo: helo.map_or_else(String::new, |h| h.name.clone()),
            peer: self.peer,
            protocol,
        })
    }

    /// Reports how the DATA phase ended; returns the reply to send.
    pub fn data_done(&mut self, result: DataResult) -> Action {
        self.set_state(State::Ready);
        let r = match result {
            DataResult::Stored { id } => reply::queued(&id),
            DataResult::Loop => reply::too_many_hops(),
            DataResult::Refused(e) => data_error_reply(e),
        };
        self.count_errors(Action::Reply(r))
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
        let mut s = Session::new(config, "T".into(), peer.parse().expect("ip"));
        script
            .split('|')
            .map(|cmd| match s.command(cmd.as_bytes()) {
                Action::Reply(r) | Action::Close(r) => {
                    format!("{} {}", r.code, r.enhanced.unwrap_or(""))
                        .trim_end()
                        .to_string()
                }
                Action::Data(_) => {
                    s.data_done(DataResult::Stored { id: "X".into() });
                    "DATA".into()
                }
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

    #[test]
    fn error_limit_closes() {
        let mut c = config();
        c.limits.max_errors = 2;
        let mut s = Session::new(&c, "T".into(), "127.0.0.1".parse().expect("ip"));
        assert!(matches!(s.command(b"X"), Action::Reply(_)));
        assert!(matches!(s.command(b"X"), Action::Reply(_)));
        match s.command(b"X") {
            Action::Close(r) => assert_eq!((r.code, r.enhanced), (421, Some("4.7.0"))),
            other => panic!("{other:?}"),
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
            let mut s = Session::new(&c, "T".into(), "127.0.0.1".parse().expect("ip"));
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
