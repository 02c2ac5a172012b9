//! `postling check`: is the configuration valid, and can mail get out?
//!
//! Validates the config (errors name file, line and key) and the files
//! `serve` checks before it runs (`server::preflight`), then, unless
//! offline, walks the path outbound mail takes and prints one line per step,
//! OK or the reason with a hint: DNS, the TCP connection, the greeting and
//! EHLO capabilities, STARTTLS or implicit TLS with the certificate's
//! subject and expiry, AUTH with the configured credentials (no mail is
//! sent), and with `--send-test ADDR` one test message. It talks to the
//! smarthost, or in direct mode to the MX of the test address's domain.
//! The exit code is 0 only when every step passed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::config::{Config, SmarthostTls};
use crate::relay::dns::Resolver;
use crate::relay::reply::{ReplyParser, ServerReply};
use crate::relay::route::{self, Candidate, RouteError};
use crate::server::Preflight;

/// What `check` was asked to do.
pub struct Options {
    pub offline: bool,
    pub send_test: Option<String>,
}

/// One printed step: "OK" or "FAIL" with a reason and a hint.
struct Report<'a> {
    out: &'a mut dyn Write,
    failed: bool,
}

impl Report<'_> {
    fn ok(&mut self, step: &str, detail: &str) {
        let _ = writeln!(self.out, "OK    {step}: {detail}");
    }
    fn fail(&mut self, step: &str, reason: &str, hint: &str) {
        self.failed = true;
        let _ = writeln!(self.out, "FAIL  {step}: {reason}");
        if !hint.is_empty() {
            let _ = writeln!(self.out, "      hint: {hint}");
        }
    }
    fn info(&mut self, text: &str) {
        let _ = writeln!(self.out, "      {text}");
    }
}

/// How `check` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// A file the daemon needs, or its user or group, is wrong: `serve`
    /// would refuse to start.
    Config,
    /// A step on the way out failed.
    Unavailable,
}

/// Runs the checks on an already loaded config.
pub fn run(config: &Config, opts: &Options, out: &mut dyn Write) -> Outcome {
    let mut r = Report { out, failed: false };
    r.ok("config", "valid");
    for (step, result) in crate::server::preflight(config) {
        match result {
            Preflight::Ok(detail) => r.ok(&step, &detail),
            Preflight::Note(text) => r.info(&format!("{step}: {text}")),
            Preflight::Fail(reason) => r.fail(
                &step,
                &reason,
                "postling serve would refuse to start (run check as root or as the daemon's user)",
            ),
        }
    }
    // The way out is tested all the same; the exit code says the worse.
    let config_failed = std::mem::take(&mut r.failed);
    let passed = move |r: &Report<'_>| match (config_failed, r.failed) {
        (true, _) => Outcome::Config,
        (false, true) => Outcome::Unavailable,
        (false, false) => Outcome::Passed,
    };
    if opts.offline {
        return passed(&r);
    }
    let relay = &config.relay;
    let (candidates, tls) = match &relay.smarthost {
        Some(sh) => {
            let step = format!("resolve smarthost {}", sh.host);
            match route::smarthost(sh) {
                Ok(c) => {
                    r.ok(&step, &addresses(&c));
                    (c, sh.tls)
                }
                Err(e) => {
                    r.fail(
                        &step,
                        &route_reason(&e),
                        "check relay.smarthost and /etc/resolv.conf",
                    );
                    return passed(&r);
                }
            }
        }
        None => {
            let Some(domain) = opts
                .send_test
                .as_deref()
                .and_then(|a| a.rsplit_once('@'))
                .map(|(_, d)| d)
            else {
                if let Some(addr) = &opts.send_test {
                    r.fail(
                        "send test",
                        &format!("{addr} has no domain"),
                        "give a whole address, user@domain, to test direct delivery",
                    );
                    return passed(&r);
                }
                r.ok(
                    "relay",
                    "direct MX delivery; give --send-test ADDR to check a destination",
                );
                return passed(&r);
            };
            let resolver = Resolver::new(&relay.dns_servers);
            let step = format!("resolve MX of {domain}");
            match route::direct(&resolver, domain, relay.mx_port) {
                Ok(c) => {
                    r.ok(&step, &addresses(&c));
                    (c, SmarthostTls::StartTls)
                }
                Err(e) => {
                    r.fail(
                        &step,
                        &route_reason(&e),
                        "check relay.dns_servers or /etc/resolv.conf",
                    );
                    return passed(&r);
                }
            }
        }
    };
    probe(config, &candidates, tls, opts, &mut r);
    passed(&r)
}

fn addresses(c: &[Candidate]) -> String {
    c.iter()
        .map(|c| format!("{} [{}]", c.host, c.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

fn route_reason(e: &RouteError) -> String {
    match e {
        RouteError::Temporary(why) | RouteError::Permanent(why) => why.clone(),
    }
}

/// The SMTP conversation with the first host that answers.
fn probe(
    config: &Config,
    candidates: &[Candidate],
    tls: SmarthostTls,
    opts: &Options,
    r: &mut Report<'_>,
) {
    let relay = &config.relay;
    let mut stream = None;
    for (n, c) in candidates.iter().enumerate() {
        let step = format!("connect to {} [{}]", c.host, c.addr);
        match TcpStream::connect_timeout(&c.addr, relay.connect_timeout) {
            Ok(s) => {
                r.ok(&step, "connected");
                stream = Some((s, c));
                break;
            }
            // The relay moves on to the next address too (an MX's IPv6
            // address on a line with IPv4 only, say): not a failure yet.
            Err(e) if n + 1 < candidates.len() => {
                r.info(&format!("{step}: {e}; trying the next address"));
            }
            Err(e) => {
                let hint = if c.addr.port() == 25 {
                    "port 25 blocked by your ISP? set relay.smarthost (port 587 or 465)"
                } else {
                    "is the host up, and the port right?"
                };
                r.fail(&step, &e.to_string(), hint);
            }
        }
    }
    let Some((tcp, cand)) = stream else {
        return;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(30)));
    let mut s = match tls {
        SmarthostTls::Implicit => {
            match handshake(tcp, cand, relay.smarthost.is_some(), config, r) {
                Some(s) => Wire::Tls(Box::new(s)),
                None => return,
            }
        }
        _ => Wire::Plain(tcp),
    };
    let mut parser = ReplyParser::new();
    match read_reply(&mut s, &mut parser) {
        Ok(g) if g.code == 220 => r.ok("greeting", &g.one_line()),
        Ok(g) => {
            return r.fail(
                "greeting",
                &g.one_line(),
                "the server refuses connections from here",
            )
        }
        Err(e) => {
            return r.fail(
                "greeting",
                &e,
                "a firewall, or not an SMTP server on that port",
            )
        }
    }
    let Some(mut caps) = ehlo(&mut s, &mut parser, config, r) else {
        return;
    };
    if tls == SmarthostTls::StartTls {
        if !caps.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS")) {
            if relay.smarthost.is_some() {
                return r.fail(
                    "STARTTLS",
                    "not offered by the server",
                    "set relay.smarthost_tls = \"implicit\" (port 465) if the provider uses it",
                );
            }
            // Direct delivery is opportunistic: say so, but it still works.
            r.info("STARTTLS not offered: mail to this host goes unencrypted");
        } else {
            match command(&mut s, &mut parser, "STARTTLS") {
                Ok(rep) if rep.code == 220 => {}
                Ok(rep) => return r.fail("STARTTLS", &rep.one_line(), ""),
                Err(e) => return r.fail("STARTTLS", &e, ""),
            }
            let Wire::Plain(tcp) = s else {
                return;
            };
            s = match handshake(tcp, cand, relay.smarthost.is_some(), config, r) {
                Some(t) => Wire::Tls(Box::new(t)),
                None if relay.smarthost.is_none() => {
                    return probe(
                        config,
                        std::slice::from_ref(cand),
                        SmarthostTls::None,
                        opts,
                        r,
                    );
                }
                None => return,
            };
            parser = ReplyParser::new();
            caps = match ehlo(&mut s, &mut parser, config, r) {
                Some(c) => c,
                None => return,
            };
        }
    }
    if let Some(sh) = &relay.smarthost {
        if let Some((user, file)) = &sh.auth {
            auth(&mut s, &mut parser, user, file, &caps, r);
        }
    }
    if let Some(addr) = &opts.send_test {
        send_test(&mut s, &mut parser, config, addr, r);
    }
    let _ = command(&mut s, &mut parser, "QUIT");
}

enum Wire {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Wire {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(s) => s.as_mut(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn read_reply(s: &mut Wire, parser: &mut ReplyParser) -> Result<ServerReply, String> {
    let mut buf = [0u8; 4096];
    loop {
        match parser.next() {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        match s.io().read(&mut buf) {
            Ok(0) => return Err("connection closed by the server".into()),
            Ok(n) => parser.feed(&buf[..n]),
            Err(e) => return Err(crate::tls::io_reason(&e)),
        }
    }
}

fn command(s: &mut Wire, parser: &mut ReplyParser, line: &str) -> Result<ServerReply, String> {
    s.io()
        .write_all(format!("{line}\r\n").as_bytes())
        .map_err(|e| crate::tls::io_reason(&e))?;
    read_reply(s, parser)
}

/// EHLO; prints and returns the capabilities.
fn ehlo(
    s: &mut Wire,
    parser: &mut ReplyParser,
    config: &Config,
    r: &mut Report<'_>,
) -> Option<Vec<String>> {
    match command(s, parser, &format!("EHLO {}", config.hostname)) {
        Ok(rep) if rep.code == 250 => {
            let caps: Vec<String> = rep.lines.iter().skip(1).cloned().collect();
            r.ok("EHLO", &caps.join(", "));
            Some(caps)
        }
        Ok(rep) => {
            r.fail(
                "EHLO",
                &rep.one_line(),
                "the server did not accept our name; set hostname to a real name",
            );
            None
        }
        Err(e) => {
            r.fail("EHLO", &e, "");
            None
        }
    }
}

/// The TLS handshake; prints the protocol, and the certificate's subject and
/// expiry. `verify`: against the trust anchors (smarthost); otherwise
/// opportunistic, as direct delivery does.
fn handshake(
    tcp: TcpStream,
    cand: &Candidate,
    verify: bool,
    config: &Config,
    r: &mut Report<'_>,
) -> Option<StreamOwned<ClientConnection, TcpStream>> {
    let tls_config = if verify {
        match crate::tls::client_config(config.relay.ca_file.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                r.fail("TLS", &e.to_string(), "check relay.ca_file");
                return None;
            }
        }
    } else {
        crate::tls::insecure_client_config()
    };
    let name = match ServerName::try_from(cand.host.clone()) {
        Ok(n) => n,
        Err(e) => {
            r.fail("TLS", &e.to_string(), "");
            return None;
        }
    };
    let conn = match ClientConnection::new(Arc::clone(&tls_config), name) {
        Ok(c) => c,
        Err(e) => {
            r.fail("TLS", &e.to_string(), "");
            return None;
        }
    };
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            let hint = if verify {
                "the certificate is not trusted for this name: check relay.smarthost, or set relay.ca_file for a private CA"
            } else {
                ""
            };
            if verify {
                r.fail("TLS handshake", &crate::tls::io_reason(&e), hint);
            } else {
                // Opportunistic, as the relay's direct delivery is: it
                // sends in clear then, so this is no failure.
                r.info(&format!(
                    "TLS handshake failed: {}; the relay sends to this host in clear then",
                    crate::tls::io_reason(&e)
                ));
            }
            return None;
        }
    }
    let mut detail = crate::tls::describe(&stream.conn);
    detail.push_str(if verify {
        ", certificate verified"
    } else {
        ", certificate not verified (opportunistic)"
    });
    r.ok("TLS handshake", &detail);
    if let Some(leaf) = stream.conn.peer_certificates().and_then(|c| c.first()) {
        match crate::tls::cert_summary(leaf.as_ref()) {
            Some((subject, expiry)) => r.info(&format!(
                "certificate subject CN={subject}, expires {expiry}"
            )),
            None => r.info("certificate: could not read its subject and expiry"),
        }
    }
    Some(stream)
}

/// AUTH with the configured credentials; no mail is sent.
fn auth(
    s: &mut Wire,
    parser: &mut ReplyParser,
    user: &str,
    file: &std::path::Path,
    caps: &[String],
    r: &mut Report<'_>,
) {
    let password = match std::fs::read_to_string(file) {
        Ok(t) => t.lines().next().unwrap_or("").to_string(),
        Err(e) => {
            return r.fail(
                "AUTH",
                &format!("cannot read {}: {e}", file.display()),
                "check relay.smarthost_password_file and its permissions",
            )
        }
    };
    let mechanisms: Vec<String> = caps
        .iter()
        .filter_map(|c| c.strip_prefix("AUTH ").or_else(|| c.strip_prefix("AUTH=")))
        .flat_map(|m| m.split_whitespace().map(str::to_ascii_uppercase))
        .collect();
    if !mechanisms.iter().any(|m| m == "PLAIN" || m == "LOGIN") {
        return r.fail(
            "AUTH",
            "the server offers no PLAIN or LOGIN",
            "the smarthost wants another mechanism, or TLS first",
        );
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let result = if mechanisms.iter().any(|m| m == "PLAIN") {
        command(
            s,
            parser,
            &format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{password}"))),
        )
    } else {
        // Each step only after a 334: a refusal must never be followed by
        // the user name and password as if they were commands.
        let mut result = command(s, parser, "AUTH LOGIN");
        for line in [b64(user), b64(&password)] {
            result = match result {
                Ok(rep) if rep.code == 334 => command(s, parser, &line),
                other => other,
            };
        }
        result
    };
    match result {
        Ok(rep) if rep.code == 235 => r.ok("AUTH", &format!("accepted for {user}")),
        Ok(rep) => r.fail("AUTH", &rep.one_line(), "check relay.smarthost_user and the password file (Gmail and others need an app password)"),
        Err(e) => r.fail("AUTH", &e, ""),
    }
}

/// Sends one short test message to `addr`.
fn send_test(
    s: &mut Wire,
    parser: &mut ReplyParser,
    config: &Config,
    addr: &str,
    r: &mut Report<'_>,
) {
    let from = config
        .relay
        .rewrite_from
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", config.hostname));
    let now = crate::smtp::conn::unix_now();
    let message = format!(
        "From: <{from}>\r\nTo: <{addr}>\r\nSubject: postling check test message\r\nDate: {}\r\nMessage-ID: <check.{now}@{}>\r\n\r\nThis test message was sent by `postling check --send-test`.\r\n.\r\n",
        crate::date::rfc5322(now),
        config.hostname
    );
    let steps = [
        format!("MAIL FROM:<{from}>"),
        format!("RCPT TO:<{addr}>"),
        "DATA".to_string(),
    ];
    for line in &steps {
        match command(s, parser, line) {
            Ok(rep) if rep.code == 250 || rep.code == 354 => {}
            Ok(rep) => {
                return r.fail(
                    "send test",
                    &format!("{line}: {}", rep.one_line()),
                    "the server refused the test message",
                )
            }
            Err(e) => return r.fail("send test", &e, ""),
        }
    }
    if let Err(e) = s.io().write_all(message.as_bytes()) {
        return r.fail("send test", &e.to_string(), "");
    }
    match read_reply(s, parser) {
        Ok(rep) if rep.code == 250 => r.ok(
            "send test",
            &format!("accepted for {addr}: {}", rep.one_line()),
        ),
        Ok(rep) => r.fail(
            "send test",
            &rep.one_line(),
            "the server refused the test message",
        ),
        Err(e) => r.fail("send test", &e, ""),
    }
}
