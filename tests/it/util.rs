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
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener: (mode, address), in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub data: PathBuf,
    log: Arc<Mutex<String>>,
}

/// The `postling` binary under test: the one cargo built with this suite,
/// or another build of the same code named by `POSTLING_TEST_BIN` (how
/// `scripts/build-small.sh` runs this suite against its smallest build).
pub fn bin() -> &'static str {
    static BIN_PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN_PATH.get_or_init(|| {
        std::env::var("POSTLING_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_postling").to_owned())
    })
}

impl Server {
    /// Starts a server in `dir` with `config` (TOML, without data_dir).
    pub fn start(dir: &TempDir, config: &str) -> Server {
        Server::start_at(dir.path(), config, "127.0.0.1:0")
    }

    pub fn start_at(dir: &Path, config: &str, listen: &str) -> Server {
        Server::launch(dir, config, Some(listen), 1, &[], true)
    }

    /// `start`, with extra environment variables for the server process.
    pub fn start_env(dir: &TempDir, config: &str, env: &[(&str, &str)]) -> Server {
        Server::launch(dir.path(), config, Some("127.0.0.1:0"), 1, env, true)
    }

    /// Starts with the config's own `[[listen]]` blocks (`count` of them).
    pub fn start_listeners(dir: &TempDir, config: &str, count: usize) -> Server {
        Server::launch(dir.path(), config, None, count, &[], true)
    }

    /// `start` without `--data-dir`: `config` sets `data_dir` itself (to
    /// `<dir>/data`, where `Server::data` points).
    pub fn start_own_data_dir(dir: &TempDir, config: &str) -> Server {
        Server::launch(dir.path(), config, Some("127.0.0.1:0"), 1, &[], false)
    }

    fn launch(
        dir: &Path,
        config: &str,
        listen: Option<&str>,
        count: usize,
        env: &[(&str, &str)],
        data_dir_flag: bool,
    ) -> Server {
        let data = dir.join("data");
        let config_path = dir.join("postling.toml");
        fs::write(&config_path, isolated(config)).expect("write config");
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"]).arg(&config_path);
        if data_dir_flag {
            cmd.arg("--data-dir").arg(&data);
        }
        if let Some(listen) = listen {
            cmd.args(["--listen", listen]);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
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
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening addr=").nth(1) {
                    let mut words = rest.split_whitespace();
                    let addr = words.next().unwrap_or("").to_string();
                    let mode = words
                        .next()
                        .and_then(|m| m.strip_prefix("mode="))
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send((mode, addr));
                }
                let mut l = sink.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut listeners = Vec::new();
        while listeners.len() < count {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok((mode, addr)) => {
                    listeners.push((mode, addr.parse().expect("listening address")))
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "postling did not start; log:\n{}",
                        log.lock().expect("log lock")
                    );
                }
            }
        }
        Server {
            child,
            addr: listeners[0].1,
            listeners,
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

    /// The address of the listener of `mode` ("smtp", "submission", "smtps").
    pub fn listener(&self, mode: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(m, _)| m == mode)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {mode} listener"))
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

    /// Unfinished messages: entries in the spool (`incoming/`) plus files in
    /// the `tmp/` of every Maildir under the default root, where local-only
    /// mail is written while it arrives.
    pub fn unfinished(&self) -> usize {
        let count = |dir: &Path| fs::read_dir(dir).map_or(0, |d| d.count());
        let mut n = count(&self.data.join("incoming"));
        if let Ok(users) = fs::read_dir(self.data.join("mail")) {
            for user in users.flatten() {
                n += count(&user.path().join("tmp"));
            }
        }
        n
    }

    /// Waits up to 5 s for [`Server::unfinished`] to reach 0.
    pub fn nothing_unfinished(&self) -> bool {
        wait_for(std::time::Duration::from_secs(5), || self.unfinished() == 0)
    }

    /// Committed queue entries: (id, current envelope text). An entry is
    /// one file, `queue/<id>`: the envelope up to its `end` line, then the
    /// message; `queue/<id>.env`, once delivery updated it, supersedes the
    /// envelope at its front.
    pub fn queue(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.data.join("queue")) else {
            return out;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.contains('.') {
                continue;
            }
            let env = fs::read_to_string(self.data.join("queue").join(format!("{id}.env")))
                .unwrap_or_else(|_| {
                    let entry = fs::read(e.path()).unwrap_or_default();
                    String::from_utf8_lossy(split_entry(&entry).0).into_owned()
                });
            out.push((id, env));
        }
        out.sort();
        out
    }

    /// The message of queue entry `id`, without its envelope.
    pub fn queued_message(&self, id: &str) -> Vec<u8> {
        let entry = fs::read(self.data.join("queue").join(id)).unwrap_or_default();
        split_entry(&entry).1.to_vec()
    }
}

/// A queue entry split into its envelope (through the `end` line) and the
/// message; all envelope when there is no `end` line.
fn split_entry(entry: &[u8]) -> (&[u8], &[u8]) {
    match entry.windows(5).position(|w| w == b"\nend\n") {
        Some(p) => entry.split_at(p + 5),
        None => (entry, &[]),
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

/// The names in `dir`, sorted; none if it cannot be read.
pub fn read_dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
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
        Client::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// A client on an already connected socket (e.g. bound to 127.0.0.2).
    pub fn from_stream(stream: TcpStream) -> Client {
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
        read_reply(&mut self.reader)
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

/// A test CA, and a certificate and key for "localhost" signed by it, as
/// PEM files in a test directory.
pub struct Pki {
    pub ca_path: PathBuf,
    pub ca: rustls::pki_types::CertificateDer<'static>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    pub fn new(dir: &TempDir) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "postling test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".into()]).expect("params");
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).expect("leaf");
        let n = N_PKI.fetch_add(1, Ordering::Relaxed);
        let ca_path = dir.path().join(format!("ca{n}.pem"));
        let cert_path = dir.path().join(format!("cert{n}.pem"));
        let key_path = dir.path().join(format!("key{n}.pem"));
        fs::write(&ca_path, ca_cert.pem()).expect("ca file");
        fs::write(&cert_path, cert.pem()).expect("cert file");
        fs::write(&key_path, key.serialize_pem()).expect("key file");
        Pki {
            ca_path,
            ca: ca_cert.der().clone(),
            cert_path,
            key_path,
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    /// A rustls server config presenting the "localhost" certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), key)
        .expect("server config");
        Arc::new(config)
    }

    /// A rustls client config that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }
}

static N_PKI: AtomicUsize = AtomicUsize::new(0);

/// Reads one SMTP reply; multi-line replies are joined with '\n'. Returns
/// "" when the connection closed first. Every line must end with CRLF.
pub fn read_reply(reader: &mut impl BufRead) -> String {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
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

/// Whether an unprivileged user (`nobody`) can reach and run `path`: every
/// directory on the way must be searchable by others. Tests that run as
/// `nobody` skip themselves when the checkout sits somewhere private.
pub fn others_can_reach(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}
