//! A scripted SMTP server for tests, on 127.0.0.1 only.
//!
//! Owns nothing of postling's behaviour: it exists so the relay client's
//! tests (and the integration tests) can talk to a real socket that accepts,
//! defers, rejects, drops the connection mid-DATA, speaks STARTTLS or
//! implicit TLS with a given rustls `ServerConfig`, breaks its TLS on
//! purpose, and checks AUTH PLAIN / LOGIN. It records every line it receives
//! so a test can assert, for example, that no AUTH line ever arrived. It is
//! lenient where a real server would be strict; it is not a reference.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// What the server does. `Script::default()` accepts everything in clear.
#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    /// The server side of STARTTLS / implicit TLS.
    pub tls: Option<Arc<ServerConfig>>,
    /// TLS from the first byte instead of STARTTLS.
    pub implicit_tls: bool,
    /// Answer STARTTLS with 220, then send garbage instead of a handshake.
    pub broken_tls: bool,
    /// `(user, password)`: offer AUTH and require it before MAIL.
    pub auth: Option<(String, String)>,
    /// The mechanisms to offer, e.g. "PLAIN LOGIN".
    pub auth_mechanisms: String,
    /// Answer every AUTH command with this reply, without an exchange.
    pub auth_refusal: Option<String>,
    pub pipelining: bool,
    /// Replies to RCPT by address; others get 250.
    pub rcpt_replies: Vec<(String, String)>,
    /// Close the connection after the first line of message data.
    pub drop_mid_data: bool,
    /// The reply after the final dot.
    pub data_reply: String,
    /// How long to hold that reply back (the message is recorded first).
    pub data_reply_delay: Duration,
    /// Never answer QUIT: read on until the client closes.
    pub silent_quit: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 mail.test ESMTP test".into(),
            tls: None,
            implicit_tls: false,
            broken_tls: false,
            auth: None,
            auth_mechanisms: "PLAIN LOGIN".into(),
            auth_refusal: None,
            pipelining: true,
            rcpt_replies: Vec::new(),
            drop_mid_data: false,
            data_reply: "250 2.0.0 queued".into(),
            data_reply_delay: Duration::ZERO,
            silent_quit: false,
        }
    }
}

#[derive(Default)]
struct Record {
    lines: Vec<String>,
    messages: Vec<Vec<u8>>,
}

/// A running test server; it stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    /// Listens on 127.0.0.1 on a free port and serves connections one at a
    /// time on a thread.
    pub fn start(script: Script) -> io::Result<TestServer> {
        TestServer::start_on("127.0.0.1:0".parse().expect("address"), script)
    }

    /// [`TestServer::start`] on `addr`, which must be a loopback address
    /// (another 127.x.y.z beside a server on 127.0.0.1, say).
    pub fn start_on(addr: SocketAddr, script: Script) -> io::Result<TestServer> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "loopback only"));
        }
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, stopping) = (record.clone(), stop.clone());
        thread::Builder::new()
            .name("test-smtp".into())
            .spawn(move || {
                for sock in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(sock) = sock {
                        let _ = serve(sock, &script, &rec);
                    }
                }
            })?;
        Ok(TestServer { addr, record, stop })
    }

    /// A connected socket to this server.
    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).expect("the test server listens")
    }

    /// Every line received so far (message data lines prefixed "D:").
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Every message received completely, as on the wire (still
    /// dot-stuffed, without the final dot line).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.lock().messages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        // A panic in the server thread poisons nothing we cannot read.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.as_mut(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Conn<'a> {
    stream: Stream,
    buf: Vec<u8>,
    record: &'a Mutex<Record>,
}

impl Conn<'_> {
    fn reply(&mut self, text: &str) -> io::Result<()> {
        let io = self.stream.io();
        io.write_all(text.as_bytes())?;
        io.write_all(b"\r\n")?;
        io.flush()
    }

    /// The next line without its line end, or None at EOF.
    fn line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=lf).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            let mut chunk = [0u8; 4096];
            let n = match self.stream.io().read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn log(&self, line: String) {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .push(line);
    }

    fn start_tls(&mut self, config: &Arc<ServerConfig>) -> io::Result<()> {
        let Stream::Plain(sock) = &self.stream else {
            return Err(io::Error::other("already TLS"));
        };
        let sock = sock.try_clone()?;
        let conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        self.stream = Stream::Tls(Box::new(tls));
        self.buf.clear();
        Ok(())
    }
}

fn serve(sock: TcpStream, script: &Script, record: &Mutex<Record>) -> io::Result<()> {
    let mut c = Conn {
        stream: Stream::Plain(sock),
        buf: Vec::new(),
        record,
    };
    if script.implicit_tls {
        let config = script.tls.as_ref().ok_or(io::ErrorKind::InvalidInput)?;
        if let Err(e) = c.start_tls(config) {
            c.log(format!("TLS failed: {e}"));
            return Err(e);
        }
    }
    c.reply(&script.greeting)?;
    let mut authed = false;
    let mut rcpts = 0;
    while let Some(line) = c.line()? {
        let text = String::from_utf8_lossy(&line).into_owned();
        c.log(text.clone());
        let upper = text.to_ascii_uppercase();
        let is_tls = matches!(c.stream, Stream::Tls(_));
        if upper.starts_with("EHLO") {
            let mut lines = vec![
                "mail.test".to_owned(),
                "8BITMIME".into(),
                "SIZE 10000000".into(),
            ];
            if script.pipelining {
                lines.push("PIPELINING".into());
            }
            if script.tls.is_some() && !is_tls && !script.implicit_tls || script.broken_tls {
                lines.push("STARTTLS".into());
            }
            if script.auth.is_some() {
                lines.push(format!("AUTH {}", script.auth_mechanisms));
            }
            let last = lines.len() - 1;
            for (i, l) in lines.iter().enumerate() {
                c.reply(&format!("250{}{l}", if i == last { ' ' } else { '-' }))?;
            }
        } else if upper.starts_with("HELO") {
            c.reply("250 mail.test")?;
        } else if upper == "STARTTLS" {
            c.reply("220 2.0.0 go ahead")?;
            if script.broken_tls {
                let io = c.stream.io();
                io.write_all(b"this is not a TLS server hello\r\n")?;
                io.flush()?;
                return Ok(());
            }
            let config = script.tls.as_ref().ok_or(io::ErrorKind::InvalidInput)?;
            if let Err(e) = c.start_tls(config) {
                c.log(format!("TLS failed: {e}"));
                return Err(e);
            }
        } else if upper.starts_with("AUTH ") {
            let Some((user, password)) = &script.auth else {
                c.reply("503 5.5.1 no AUTH here")?;
                continue;
            };
            if let Some(refusal) = &script.auth_refusal {
                c.reply(refusal)?;
                continue;
            }
            let words: Vec<&str> = text.split_ascii_whitespace().collect();
            let (got_user, got_password) = match words.get(1).map(|m| m.to_ascii_uppercase()) {
                Some(m) if m == "PLAIN" => {
                    let token = match words.get(2) {
                        Some(t) => t.to_string(),
                        None => {
                            c.reply("334 ")?;
                            String::from_utf8_lossy(&c.line()?.unwrap_or_default()).into_owned()
                        }
                    };
                    let decoded = BASE64.decode(token.trim()).unwrap_or_default();
                    let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
                    match parts.as_slice() {
                        [_, u, p] => (u.to_vec(), p.to_vec()),
                        _ => (Vec::new(), Vec::new()),
                    }
                }
                Some(m) if m == "LOGIN" => {
                    c.reply("334 VXNlcm5hbWU6")?;
                    let u = c.line()?.unwrap_or_default();
                    c.log(String::from_utf8_lossy(&u).into_owned());
                    c.reply("334 UGFzc3dvcmQ6")?;
                    let p = c.line()?.unwrap_or_default();
                    c.log(String::from_utf8_lossy(&p).into_owned());
                    (
                        BASE64.decode(&u).unwrap_or_default(),
                        BASE64.decode(&p).unwrap_or_default(),
                    )
                }
                _ => {
                    c.reply("504 5.5.4 mechanism not supported")?;
                    continue;
                }
            };
            if got_user == user.as_bytes() && got_password == password.as_bytes() {
                authed = true;
                c.reply("235 2.7.0 authenticated")?;
            } else {
                c.reply("535 5.7.8 authentication failed")?;
            }
        } else if upper.starts_with("MAIL FROM:") {
            rcpts = 0;
            if script.auth.is_some() && !authed {
                c.reply("530 5.7.0 authentication required")?;
            } else {
                c.reply("250 2.1.0 ok")?;
            }
        } else if upper.starts_with("RCPT TO:") {
            let addr = text[8..].trim().trim_start_matches('<');
            let addr = addr.split('>').next().unwrap_or_default();
            let reply = script
                .rcpt_replies
                .iter()
                .find(|(a, _)| a == addr)
                .map_or("250 2.1.5 ok", |(_, r)| r.as_str())
                .to_owned();
            if reply.starts_with('2') {
                rcpts += 1;
            }
            c.reply(&reply)?;
        } else if upper == "DATA" {
            if rcpts == 0 {
                c.reply("554 5.5.1 no valid recipients")?;
                continue;
            }
            c.reply("354 go ahead")?;
            let mut message = Vec::new();
            loop {
                let Some(line) = c.line()? else {
                    return Ok(());
                };
                if line == b"." {
                    break;
                }
                c.log(format!("D:{}", String::from_utf8_lossy(&line)));
                message.extend_from_slice(&line);
                message.extend_from_slice(b"\r\n");
                if script.drop_mid_data {
                    if let Stream::Plain(s) = &c.stream {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return Ok(());
                }
            }
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .messages
                .push(message);
            thread::sleep(script.data_reply_delay);
            c.reply(&script.data_reply)?;
        } else if upper == "RSET" || upper == "NOOP" {
            c.reply("250 2.0.0 ok")?;
        } else if upper == "QUIT" && script.silent_quit {
            continue;
        } else if upper == "QUIT" {
            c.reply("221 2.0.0 bye")?;
            return Ok(());
        } else {
            c.reply("500 5.5.2 what?")?;
        }
    }
    Ok(())
}
