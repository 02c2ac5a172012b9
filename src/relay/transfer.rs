//! The blocking driver of one outbound SMTP session: a thin loop between a
//! socket, the sans-IO `Client`, the reply parser and the message file.
//!
//! Owns the socket: writing commands, reading replies against the RFC 5321
//! 4.5.3.2 timeouts (each a deadline checked against the clock, so a server
//! trickling one byte at a time cannot stretch it), the STARTTLS swap to a
//! rustls stream (RFC 3207: bytes received before the handshake are thrown
//! away with the old parser), implicit TLS from the first byte (RFC 8314),
//! and streaming the message through the `DotStuffer`. Every decision —
//! what to send, what a reply means for each recipient — is the client's.
//! It does not resolve names or connect: the caller hands it a connected
//! `TcpStream` and the name to verify the certificate against.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, trace};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::client::{Client, Job, Outcome, Output, TlsMode, Wait};
use super::dotstuff::DotStuffer;
use super::reply::{ReplyParser, ServerReply};
use crate::tls;

/// How long to wait for each reply, RFC 5321 4.5.3.2. The defaults are the
/// RFC's minimums; tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// The greeting (4.5.3.2.1, "initial 220 message"): 5 minutes.
    pub greeting: Duration,
    /// EHLO, STARTTLS (and its handshake), AUTH: 5 minutes.
    pub command: Duration,
    /// QUIT: 10 seconds. RFC 5321 sets none; every result is known by then,
    /// and a server that never answers must not hold a delivery thread and
    /// the results for 5 minutes.
    pub quit: Duration,
    /// MAIL (4.5.3.2.2): 5 minutes.
    pub mail: Duration,
    /// Each RCPT (4.5.3.2.3): 5 minutes.
    pub rcpt: Duration,
    /// The 354 after DATA (4.5.3.2.4): 2 minutes.
    pub data_init: Duration,
    /// Each write of message data (4.5.3.2.5): 3 minutes.
    pub data_block: Duration,
    /// The reply after the final dot (4.5.3.2.6): 10 minutes.
    pub data_final: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            greeting: min(5),
            command: min(5),
            quit: Duration::from_secs(10),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_final: min(10),
        }
    }
}

impl Timeouts {
    /// Every timeout the same (for tests).
    pub fn all(d: Duration) -> Timeouts {
        Timeouts {
            greeting: d,
            command: d,
            quit: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_block: d,
            data_final: d,
        }
    }

    pub fn for_wait(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Greeting => self.greeting,
            Wait::Command => self.command,
            Wait::Quit => self.quit,
            Wait::Mail => self.mail,
            Wait::Rcpt => self.rcpt,
            Wait::DataInit => self.data_init,
            Wait::DataFinal => self.data_final,
        }
    }
}

/// The connection, before and after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.as_mut(),
        }
    }

    /// Writes everything within `timeout` per write call.
    fn send(&mut self, bytes: &[u8], timeout: Duration) -> io::Result<()> {
        self.socket().set_write_timeout(Some(nonzero(timeout)))?;
        let stream = self.stream();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Replaces the plain stream by a TLS stream with a finished handshake.
    fn start_tls(
        self,
        config: &Arc<ClientConfig>,
        server_name: &str,
        timeout: Duration,
    ) -> Result<Conn, String> {
        let Conn::Plain(mut sock) = self else {
            return Err("STARTTLS inside TLS".into());
        };
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("invalid server name {server_name:?}: {e}"))?;
        let mut tls = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        while tls.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("handshake timed out after {timeout:?}"));
            }
            for set in [TcpStream::set_read_timeout, TcpStream::set_write_timeout] {
                set(&sock, Some(nonzero(left))).map_err(|e| e.to_string())?;
            }
            match tls.complete_io(&mut sock) {
                Ok((0, 0)) if tls.is_handshaking() => {
                    return Err("connection closed during the handshake".into())
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(tls::io_reason(&e)),
            }
        }
        Ok(Conn::Tls(Box::new(StreamOwned::new(tls, sock))))
    }

    /// True if nothing is waiting to be read: an idle session with unread
    /// bytes (a `421` before the server hung up) or at end of file is not
    /// usable for another message.
    fn is_quiet(&self) -> bool {
        matches!(
            crate::wait::peek_now(self.socket()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// QUIT without waiting for the reply, before closing an idle session.
    fn send_quit(&mut self) -> io::Result<()> {
        self.send(b"QUIT\r\n", Duration::from_secs(1))
    }

    fn close(self) {
        match self {
            Conn::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Conn::Tls(mut s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                let _ = s.sock.shutdown(Shutdown::Both);
            }
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Socket timeouts cannot be zero (that means "none").
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Runs one SMTP session for `job` over `stream`, connected to the host
/// called `server_name` (the name certificates are verified against), and
/// returns what happened to each recipient. With `keep_open`, a session
/// whose message got its final reply is not ended but returned, for the
/// next message to the same host. Never fails: every problem is in the
/// `Outcome`.
pub fn deliver(
    stream: TcpStream,
    server_name: &str,
    job: Job,
    message: &mut dyn Read,
    tls: TlsConfigs<'_>,
    timeouts: &Timeouts,
    keep_open: bool,
) -> (Outcome, Option<Reusable>) {
    let mut client = Client::new(job);
    if keep_open {
        client.keep_open();
    }
    let (outcome, reusable, _) = drive(
        client,
        Some(Conn::Plain(stream)),
        server_name,
        message,
        tls,
        timeouts,
    );
    (outcome, reusable)
}

/// The two client TLS configurations: `verified` for `RequireStartTls` and
/// `Implicit`, `opportunistic` for `Opportunistic`.
#[derive(Clone, Copy)]
pub struct TlsConfigs<'a> {
    pub verified: &'a Arc<ClientConfig>,
    pub opportunistic: &'a Arc<ClientConfig>,
}

/// A kept session was found closed before it carried anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// An open session whose last message got its final reply: greeting, EHLO,
/// TLS and AUTH are done, and the server waits for the next MAIL.
pub struct Reusable {
    client: Client,
    conn: Conn,
    server_name: String,
}

impl Reusable {
    /// Sends one more message over this session. `Err(Closed)` means the
    /// session turned out to be unusable before anything of this job was
    /// answered: the server closed it while it was idle (perhaps after a
    /// `421` timeout notice, which is still unread), or answered the job's
    /// first command with `421` (a limit of messages per session), so
    /// nothing of the message was sent and the caller connects anew.
    pub fn send(
        mut self,
        job: Job,
        message: &mut dyn Read,
        tls: TlsConfigs<'_>,
        timeouts: &Timeouts,
    ) -> Result<(Outcome, Option<Reusable>), Closed> {
        if !self.conn.is_quiet() {
            self.conn.close();
            return Err(Closed);
        }
        self.client.next_job(job);
        let server_name = std::mem::take(&mut self.server_name);
        let (outcome, again, replies) = drive(
            self.client,
            Some(self.conn),
            &server_name,
            message,
            tls,
            timeouts,
        );
        if replies == 0 {
            return Err(Closed);
        }
        Ok((outcome, again))
    }

    /// Ends the session politely: QUIT, without waiting for its reply.
    pub fn close(mut self) {
        let _ = self.conn.send_quit();
        self.conn.close();
    }
}

/// Carries out the client's outputs until its job is done; also returns
/// how many replies the job got.
fn drive(
    mut client: Client,
    mut conn: Option<Conn>,
    server_name: &str,
    message: &mut dyn Read,
    tls: TlsConfigs<'_>,
    timeouts: &Timeouts,
) -> (Outcome, Option<Reusable>, usize) {
    let id = client.job_id().to_string();
    let config = match client.tls_mode() {
        TlsMode::Opportunistic => tls.opportunistic,
        _ => tls.verified,
    };
    let mut parser = ReplyParser::new();
    loop {
        let Some(c) = conn.as_mut() else {
            // Only after a failed handshake; the client is then done.
            match client.next_output() {
                Some(Output::Done(outcome)) => return (outcome, None, client.replies()),
                Some(_) => continue,
                None => {
                    client.connection_lost("connection lost");
                    continue;
                }
            }
        };
        match client.next_output() {
            Some(Output::Send(bytes)) => {
                if let Err(e) = c.send(&bytes, timeouts.command) {
                    client.connection_lost(&format!("write failed: {}", tls::io_reason(&e)));
                }
            }
            Some(Output::StartTls) => {
                if parser.buffered() > 0 {
                    debug!(
                        "id={id} discarding {} bytes received before the TLS handshake",
                        parser.buffered()
                    );
                }
                parser = ReplyParser::new();
                let plain = conn.take().expect("conn is Some in this branch");
                match plain.start_tls(config, server_name, timeouts.command) {
                    Ok(tls_conn) => {
                        let Conn::Tls(s) = &tls_conn else {
                            unreachable!("start_tls returns a TLS connection")
                        };
                        client.tls_started(tls::describe(&s.conn));
                        conn = Some(tls_conn);
                    }
                    Err(reason) => client.tls_failed(&reason),
                }
            }
            Some(Output::SendData) => {
                if let Err(reason) = send_data(c, message, timeouts.data_block) {
                    client.connection_lost(&reason);
                }
            }
            Some(Output::Done(outcome)) => {
                let replies = client.replies();
                // A reply already buffered would belong to no command: the
                // session is not in a state to be reused.
                if client.is_idle() && parser.buffered() == 0 {
                    if let Some(conn) = conn.take() {
                        debug!("id={id} session kept open host={server_name}");
                        let server_name = server_name.to_string();
                        return (
                            outcome,
                            Some(Reusable {
                                client,
                                conn,
                                server_name,
                            }),
                            replies,
                        );
                    }
                }
                if let Some(mut c) = conn.take() {
                    if client.is_idle() {
                        let _ = c.send_quit();
                    }
                    c.close();
                }
                debug!(
                    "id={id} session done host={server_name} tls={:?} failure={:?}",
                    outcome.tls, outcome.failure
                );
                return (outcome, None, replies);
            }
            None => match client.awaiting() {
                Some(wait) => match read_reply(c, &mut parser, timeouts.for_wait(wait)) {
                    Ok(reply) => client.on_reply(reply),
                    Err(reason) => client.connection_lost(&reason),
                },
                None => client.connection_lost("client waiting for nothing"),
            },
        }
    }
}

/// Reads until the parser has a whole reply or the deadline passes.
fn read_reply(
    conn: &mut Conn,
    parser: &mut ReplyParser,
    timeout: Duration,
) -> Result<ServerReply, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        match parser.next() {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed reply: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out after {}s", timeout.as_secs_f32()));
        }
        conn.socket()
            .set_read_timeout(Some(nonzero(left)))
            .map_err(|e| e.to_string())?;
        match conn.stream().read(&mut buf) {
            Ok(0) => return Err("connection closed by the server".into()),
            Ok(n) => {
                trace!("read {n} bytes");
                parser.feed(&buf[..n]);
            }
            Err(e) if crate::wait::is_retry(&e) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err("connection closed by the server".into())
            }
            Err(e) => return Err(format!("read failed: {}", tls::io_reason(&e))),
        }
    }
}

/// Streams the message, dot-stuffed and CRLF-clean, with the final dot.
/// On a read error nothing more is sent, so the server never sees the
/// final dot of a truncated message. Each chunk is sent once the next read
/// has succeeded, so the last one goes out in the same write as the final
/// dot: a dot written on its own would wait for the server's delayed ACK
/// (~40 ms on Linux) behind Nagle's algorithm, for every message.
fn send_data(conn: &mut Conn, message: &mut dyn Read, timeout: Duration) -> Result<(), String> {
    let mut stuffer = DotStuffer::new();
    let mut input = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(17 * 1024);
    let mut total = 0u64;
    let send = |conn: &mut Conn, out: &[u8]| {
        conn.send(out, timeout)
            .map_err(|e| format!("write failed during DATA: {}", tls::io_reason(&e)))
    };
    loop {
        let n = match message.read(&mut input) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the queued message: {e}")),
        };
        if !out.is_empty() {
            send(conn, &out)?;
            total += out.len() as u64;
            out.clear();
        }
        stuffer.encode(&input[..n], &mut out);
    }
    stuffer.finish(&mut out);
    send(conn, &out)?;
    trace!("sent {} bytes of message data", total + out.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::ServerConfig;

    use super::*;
    use crate::relay::client::{Credentials, Failure, RcptResult};
    use crate::relay::test_smtp::{Script, TestServer};

    /// A test CA and a server certificate for "localhost" and "mail.test"
    /// signed by it.
    struct Pki {
        ca_pem: String,
        server: Arc<ServerConfig>,
    }

    fn pki(ca_name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".into(), "mail.test".into()]).unwrap();
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }

    fn temp_file(contents: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "postling-transfer-{}-{}.pem",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// The verifying config trusting `pki`'s CA.
    fn trusting(pki: &Pki) -> Arc<ClientConfig> {
        let path = temp_file(&pki.ca_pem);
        let config = tls::client_config(Some(&path)).unwrap();
        std::fs::remove_file(path).unwrap();
        config
    }

    fn job(tls: TlsMode, auth: bool) -> Job {
        Job {
            id: "q1".into(),
            helo: "pi.lan".into(),
            sender: "a@pi.lan".into(),
            recipients: vec!["b@example.net".into(), "c@example.net".into()],
            size: 64,
            eightbit: false,
            smtputf8: false,
            tls,
            auth: auth.then(|| Credentials {
                user: "me@example.net".into(),
                password: "hunter2".into(),
            }),
        }
    }

    fn script(pki: Option<&Pki>, auth: bool) -> Script {
        Script {
            tls: pki.map(|p| p.server.clone()),
            auth: auth.then(|| ("me@example.net".to_owned(), "hunter2".to_owned())),
            ..Script::default()
        }
    }

    const MESSAGE: &[u8] = b"Subject: hi\n\n.leading dot\nbare lf\rbare cr\r\nend";
    const WIRE: &[u8] = b"Subject: hi\r\n\r\n..leading dot\r\nbare lf\r\nbare cr\r\nend\r\n";

    fn run(server: &TestServer, name: &str, job: Job, verified: &Arc<ClientConfig>) -> Outcome {
        let insecure = tls::insecure_client_config();
        deliver(
            server.connect(),
            name,
            job,
            &mut &MESSAGE[..],
            configs(verified, &insecure),
            &Timeouts::all(Duration::from_secs(10)),
            false,
        )
        .0
    }

    fn configs<'a>(
        verified: &'a Arc<ClientConfig>,
        opportunistic: &'a Arc<ClientConfig>,
    ) -> TlsConfigs<'a> {
        TlsConfigs {
            verified,
            opportunistic,
        }
    }

    fn all_delivered(o: &Outcome) -> bool {
        o.recipients
            .iter()
            .all(|(_, r)| matches!(r, RcptResult::Delivered { .. }))
    }

    fn all_deferred(o: &Outcome) -> bool {
        o.recipients
            .iter()
            .all(|(_, r)| matches!(r, RcptResult::Deferred { .. }))
    }

    fn no_auth(server: &TestServer) -> bool {
        !server
            .lines()
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with("AUTH"))
    }

    #[test]
    fn plain_delivery_pipelined_and_clean_on_the_wire() {
        let server = TestServer::start(Script {
            rcpt_replies: vec![("c@example.net".into(), "550 5.1.1 unknown".into())],
            ..Script::default()
        })
        .unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::None, false),
            &tls::client_config(None).unwrap(),
        );
        assert_eq!(
            o.recipients,
            [
                (
                    "b@example.net".to_owned(),
                    RcptResult::Delivered {
                        reply: "250 2.0.0 queued".into()
                    }
                ),
                (
                    "c@example.net".to_owned(),
                    RcptResult::Failed {
                        reason: "550 5.1.1 unknown (in reply to RCPT TO)".into()
                    }
                ),
            ]
        );
        assert_eq!(o.remote_greeting, "220 mail.test ESMTP test");
        assert_eq!(server.messages(), [WIRE.to_vec()]);
        assert_eq!(server.lines().last().map(String::as_str), Some("QUIT"));
    }

    #[test]
    fn starttls_with_a_valid_cert_and_auth_plain() {
        let pki = pki("Test CA");
        let server = TestServer::start(Script {
            auth_mechanisms: "LOGIN PLAIN".into(),
            ..script(Some(&pki), true)
        })
        .unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &trusting(&pki),
        );
        assert!(all_delivered(&o), "{o:?}");
        let tls = o.tls.unwrap();
        assert!(tls.starts_with("TLSv1."), "{tls}");
        let lines = server.lines();
        let starttls = lines.iter().position(|l| l == "STARTTLS").unwrap();
        let auth = lines
            .iter()
            .position(|l| l.starts_with("AUTH PLAIN "))
            .unwrap();
        assert!(starttls < auth, "{lines:?}");
        assert_eq!(server.messages(), [WIRE.to_vec()]);
    }

    #[test]
    fn a_kept_session_carries_the_next_message_without_a_new_handshake() {
        let pki = pki("Test CA");
        let server = TestServer::start(script(Some(&pki), true)).unwrap();
        let verified = trusting(&pki);
        let insecure = tls::insecure_client_config();
        let timeouts = Timeouts::all(Duration::from_secs(10));
        let (first, open) = deliver(
            server.connect(),
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &mut &MESSAGE[..],
            configs(&verified, &insecure),
            &timeouts,
            true,
        );
        assert!(all_delivered(&first), "{first:?}");
        let open = open.expect("the session stays open");
        let mut next = job(TlsMode::RequireStartTls, true);
        next.id = "q2".into();
        next.sender = "other@pi.lan".into();
        let (second, open) = open
            .send(
                next,
                &mut &b"second\r\n"[..],
                configs(&verified, &insecure),
                &timeouts,
            )
            .expect("the open session takes it");
        assert!(all_delivered(&second), "{second:?}");
        assert!(second.tls.is_some(), "still inside TLS");
        open.expect("still open").close();
        // One greeting, one STARTTLS, one login: two transactions, then QUIT
        // (recorded by the server's thread, so waited for).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server.lines().iter().any(|l| l == "QUIT") && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let lines = server.lines();
        let count = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
        assert_eq!(count("STARTTLS"), 1, "{lines:?}");
        assert_eq!(count("AUTH"), 1, "{lines:?}");
        assert_eq!(count("MAIL FROM:"), 2, "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("QUIT"));
        assert_eq!(server.messages(), [WIRE.to_vec(), b"second\r\n".to_vec()]);
    }

    #[test]
    fn a_session_the_server_closed_while_idle_is_reported_unused() {
        for goodbye in ["", "421 4.4.2 idle too long\r\n"] {
            closed_while_idle(goodbye, false);
        }
        // Exim, Exchange: a limit of messages per session, or an idle
        // timeout, told in answer to the next MAIL.
        closed_while_idle("421 4.7.0 too many messages in this session\r\n", true);
    }

    /// A server that answers one message, then sends `goodbye` and hangs
    /// up, while the session is idle or (`at_mail`) in answer to the next
    /// MAIL: the next message is not sent over that session.
    fn closed_while_idle(goodbye: &'static str, at_mail: bool) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The server says goodbye only once the client holds the session.
        let (kept_tx, kept) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut input = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let reply = |s: &mut TcpStream, text: &str| s.write_all(text.as_bytes()).unwrap();
            reply(&mut s, "220 hi\r\n");
            let mut in_data = false;
            loop {
                line.clear();
                if io::BufRead::read_line(&mut input, &mut line).unwrap() == 0 {
                    return;
                }
                match line.trim_end() {
                    "." if in_data && at_mail => {
                        in_data = false;
                        reply(&mut s, "250 ok\r\n");
                    }
                    "." if in_data => {
                        reply(&mut s, "250 ok\r\n");
                        // Hangs up while the client keeps the session.
                        kept.recv().unwrap();
                        reply(&mut s, goodbye);
                        return;
                    }
                    _ if in_data => {}
                    l if at_mail && l.starts_with("MAIL") && kept.try_recv().is_ok() => {
                        reply(&mut s, goodbye);
                        return;
                    }
                    l if l.starts_with("EHLO") => reply(&mut s, "250-hi\r\n250 PIPELINING\r\n"),
                    "DATA" => {
                        in_data = true;
                        reply(&mut s, "354 go\r\n");
                    }
                    _ => reply(&mut s, "250 ok\r\n"),
                }
            }
        });
        let insecure = tls::insecure_client_config();
        let timeouts = Timeouts::all(Duration::from_secs(10));
        let (first, open) = deliver(
            TcpStream::connect(addr).unwrap(),
            "mail.test",
            job(TlsMode::None, false),
            &mut &MESSAGE[..],
            configs(&insecure, &insecure),
            &timeouts,
            true,
        );
        assert!(all_delivered(&first), "{first:?}");
        let open = open.expect("kept open on our side");
        kept_tx.send(()).unwrap();
        let server = if at_mail {
            Some(server)
        } else {
            server.join().unwrap();
            None
        };
        let mut message: &[u8] = b"not sent\r\n";
        let result = open.send(
            job(TlsMode::None, false),
            &mut message,
            configs(&insecure, &insecure),
            &timeouts,
        );
        assert!(result.is_err(), "a dead idle session must be reported");
        if let Some(server) = server {
            server.join().unwrap();
        }
        assert_eq!(message, b"not sent\r\n", "nothing of the message was read");
    }

    #[test]
    fn implicit_tls_with_auth_login() {
        let pki = pki("Test CA");
        let server = TestServer::start(Script {
            implicit_tls: true,
            auth_mechanisms: "LOGIN".into(),
            ..script(Some(&pki), true)
        })
        .unwrap();
        let o = run(
            &server,
            "localhost",
            job(TlsMode::Implicit, true),
            &trusting(&pki),
        );
        assert!(all_delivered(&o), "{o:?}");
        assert!(o.tls.is_some());
        assert!(server.lines().iter().any(|l| l == "AUTH LOGIN"));
        assert!(!server.lines().iter().any(|l| l == "STARTTLS"));
    }

    #[test]
    fn wrong_host_name_defers_and_never_sends_auth() {
        let pki = pki("Test CA");
        for implicit in [false, true] {
            let server = TestServer::start(Script {
                implicit_tls: implicit,
                ..script(Some(&pki), true)
            })
            .unwrap();
            let mode = if implicit {
                TlsMode::Implicit
            } else {
                TlsMode::RequireStartTls
            };
            let o = run(&server, "wrong.test", job(mode, true), &trusting(&pki));
            assert!(all_deferred(&o), "{o:?}");
            let Some(Failure::TlsHandshake {
                opportunistic: false,
                reason,
            }) = &o.failure
            else {
                panic!("{o:?}");
            };
            assert!(reason.contains("certificate"), "{reason}");
            assert!(!o.retry_in_clear());
            assert!(no_auth(&server), "{:?}", server.lines());
        }
    }

    #[test]
    fn untrusted_cert_defers_and_never_sends_auth() {
        let pki = pki("Test CA");
        let other = pki_other();
        let server = TestServer::start(script(Some(&pki), true)).unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &trusting(&other),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(
            matches!(
                o.failure,
                Some(Failure::TlsHandshake {
                    opportunistic: false,
                    ..
                })
            ),
            "{o:?}"
        );
        assert!(no_auth(&server), "{:?}", server.lines());
        // Nor with only the built-in roots.
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &tls::client_config(None).unwrap(),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(no_auth(&server), "{:?}", server.lines());
    }

    fn pki_other() -> Pki {
        pki("Another CA")
    }

    #[test]
    fn starttls_required_but_not_offered_defers() {
        let server = TestServer::start(script(None, true)).unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &tls::client_config(None).unwrap(),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert_eq!(
            o.failure,
            Some(Failure::TlsRequired("STARTTLS not offered".into()))
        );
        assert!(no_auth(&server));
    }

    #[test]
    fn opportunistic_accepts_an_unverified_cert() {
        let pki = pki("Test CA");
        let server = TestServer::start(script(Some(&pki), false)).unwrap();
        let o = run(
            &server,
            "mx.elsewhere.test",
            job(TlsMode::Opportunistic, false),
            &tls::client_config(None).unwrap(),
        );
        assert!(all_delivered(&o), "{o:?}");
        assert!(o.tls.is_some());
    }

    #[test]
    fn opportunistic_broken_tls_says_retry_in_clear() {
        let server = TestServer::start(Script {
            broken_tls: true,
            ..Script::default()
        })
        .unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::Opportunistic, false),
            &tls::client_config(None).unwrap(),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(o.retry_in_clear(), "{o:?}");
        assert!(server.messages().is_empty());
    }

    #[test]
    fn auth_refused_defers() {
        let pki = pki("Test CA");
        let server = TestServer::start(Script {
            auth: Some(("me@example.net".into(), "other".into())),
            ..script(Some(&pki), true)
        })
        .unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::RequireStartTls, true),
            &trusting(&pki),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(
            matches!(
                o.failure,
                Some(Failure::Auth {
                    permanent: true,
                    ..
                })
            ),
            "{o:?}"
        );
        assert!(server.messages().is_empty());
    }

    #[test]
    fn drop_mid_data_defers() {
        let server = TestServer::start(Script {
            drop_mid_data: true,
            ..Script::default()
        })
        .unwrap();
        let o = run(
            &server,
            "mail.test",
            job(TlsMode::None, false),
            &tls::client_config(None).unwrap(),
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(matches!(o.failure, Some(Failure::Connection(_))), "{o:?}");
    }

    #[test]
    fn a_server_that_never_answers_quit_does_not_hold_the_results() {
        let refused = "550 5.1.1 no such user".to_string();
        let server = TestServer::start(Script {
            rcpt_replies: vec![
                ("b@example.net".into(), refused.clone()),
                ("c@example.net".into(), refused),
            ],
            silent_quit: true,
            ..Script::default()
        })
        .unwrap();
        let timeouts = Timeouts {
            quit: Duration::from_millis(300),
            ..Timeouts::all(Duration::from_secs(60))
        };
        let insecure = tls::insecure_client_config();
        let started = Instant::now();
        let (o, _) = deliver(
            server.connect(),
            "mail.test",
            job(TlsMode::None, false),
            &mut &MESSAGE[..],
            configs(&insecure, &insecure),
            &timeouts,
            false,
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(
            o.recipients
                .iter()
                .all(|(_, r)| matches!(r, RcptResult::Failed { .. })),
            "{o:?}"
        );
        assert_eq!(server.lines().last().map(String::as_str), Some("QUIT"));
    }

    #[test]
    fn silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let timeouts = Timeouts {
            greeting: Duration::from_millis(200),
            ..Timeouts::default()
        };
        let started = Instant::now();
        let verified = tls::client_config(None).unwrap();
        let insecure = tls::insecure_client_config();
        let (o, _) = deliver(
            stream,
            "mail.test",
            job(TlsMode::None, false),
            &mut &MESSAGE[..],
            configs(&verified, &insecure),
            &timeouts,
            false,
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(all_deferred(&o), "{o:?}");
        let Some(Failure::Connection(reason)) = &o.failure else {
            panic!("{o:?}");
        };
        assert!(reason.contains("timed out"), "{reason}");
        drop(listener);
    }

    #[test]
    fn unreadable_message_is_never_terminated() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let server = TestServer::start(Script::default()).unwrap();
        let verified = tls::client_config(None).unwrap();
        let insecure = tls::insecure_client_config();
        let (o, _) = deliver(
            server.connect(),
            "mail.test",
            job(TlsMode::None, false),
            &mut Failing,
            configs(&verified, &insecure),
            &Timeouts::all(Duration::from_secs(10)),
            false,
        );
        assert!(all_deferred(&o), "{o:?}");
        assert!(format!("{o:?}").contains("disk on fire"));
        assert!(server.messages().is_empty());
    }

    #[test]
    fn default_timeouts_are_rfc_5321() {
        let t = Timeouts::default();
        assert_eq!(t.for_wait(Wait::Greeting), Duration::from_secs(300));
        assert_eq!(t.for_wait(Wait::DataInit), Duration::from_secs(120));
        assert_eq!(t.data_block, Duration::from_secs(180));
        assert_eq!(t.for_wait(Wait::DataFinal), Duration::from_secs(600));
        assert_eq!(t.for_wait(Wait::Quit), Duration::from_secs(10));
    }
}
