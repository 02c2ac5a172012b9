//! Test helpers: run the real `postling` binary on 127.0.0.1:0 in a private
//! directory, talk to it over TCP, and read what it wrote to disk.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "postling-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running `postling serve`, stopped (SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    log: Arc<Mutex<String>>,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_postling");

impl Server {
    /// Starts a server in `dir` with `config` (TOML, without data_dir).
    pub fn start(dir: &TempDir, config: &str) -> Server {
        Server::start_at(dir.path(), config, "127.0.0.1:0")
    }

    pub fn start_at(dir: &Path, config: &str, listen: &str) -> Server {
        let data = dir.join("data");
        let config_path = dir.join("postling.toml");
        fs::write(&config_path, isolated(config)).expect("write config");
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", listen])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postling");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("listening addr=").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
                let mut l = sink.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "postling did not start; log:\n{}",
                    log.lock().expect("log lock")
                );
            }
        };
        Server {
            child,
            addr,
            data,
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `limit`) for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "postling did not exit");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Maildir `new/` files of a user under the default maildir root.
    pub fn mail(&self, user: &str) -> Vec<Vec<u8>> {
        read_new(&self.data.join("mail").join(user))
    }

    /// Committed queue entries: (id, envelope text).
    pub fn queue(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.data.join("queue")) else {
            return out;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let env = fs::read_to_string(e.path().join("envelope")).unwrap_or_default();
            out.push((id, env));
        }
        out.sort();
        out
    }
}

/// Tests must never reach the real DNS: unless the config names its own
/// name servers, point the relay at a closed loopback port, so every MX
/// lookup fails at once (temporary failure: the mail stays queued).
pub fn isolated(config: &str) -> String {
    if config.contains("dns_servers") {
        return config.to_string();
    }
    const LINE: &str = "dns_servers = [\"127.0.0.1:9\"]\n";
    match config.find("[relay]\n") {
        Some(i) => {
            let at = i + "[relay]\n".len();
            format!("{}{LINE}{}", &config[..at], &config[at..])
        }
        None => format!("{config}\n[relay]\n{LINE}"),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every file in `<maildir>/new`, sorted by name.
pub fn read_new(maildir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = fs::read_dir(maildir.join("new")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| fs::read(p).expect("read mail"))
        .collect()
}

/// A raw SMTP client: bytes out, replies in.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub greeting: String,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut c = Client {
            stream,
            reader,
            greeting: String::new(),
        };
        c.greeting = c.reply();
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one reply; multi-line replies are joined with '\n'. Returns ""
    /// when the server closed the connection.
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        lines.join("\n")
    }

    /// Sends one command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// True when the server has closed the connection (EOF).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }

    /// MAIL, RCPTs, DATA and the body (already CRLF, without the final dot);
    /// returns the reply to the final dot.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        assert!(self.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        assert!(self.cmd("DATA").starts_with("354"));
        self.send(body.as_bytes());
        self.cmd(".")
    }
}

/// Splits a stored message into (header, body) at the first empty line.
pub fn split_message(msg: &[u8]) -> (String, Vec<u8>) {
    let pos = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header/body separator");
    (
        String::from_utf8_lossy(&msg[..pos + 2]).into_owned(),
        msg[pos + 4..].to_vec(),
    )
}

/// Waits until `f` is true, at most `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}
