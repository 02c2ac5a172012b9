//! Inbound TLS and AUTH, listener policy and abuse limits, end to end with
//! real clients (lettre, and a raw rustls client for exact transcripts).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine as _;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::util::{bin, split_message, wait_for, Client, Pki, Server, TempDir};

/// A server with TLS, a users file (alice / "wonderland"), and three
/// listeners: smtp, submission and smtps.
struct Fixture {
    _dir: TempDir,
    pki: Pki,
    server: Server,
}

fn fixture(extra: &str) -> Fixture {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let line = postling::auth::passwd_line("alice", "wonderland").expect("hash");
    let users = dir.path().join("users");
    fs::write(&users, format!("{line}\n")).expect("users");
    let mut perms = fs::metadata(&users).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(&users, perms).expect("chmod");
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nmode = \"smtp\"\n[[listen]]\naddr = \"127.0.0.1:0\"\nmode = \"submission\"\n[[listen]]\naddr = \"127.0.0.1:0\"\nmode = \"smtps\"\n\
         [local]\ndomains = [\"localhost\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nusers_file = \"{}\"\n{extra}",
        pki.cert_path.display(),
        pki.key_path.display(),
        users.display()
    );
    let server = Server::start_listeners(&dir, &config, 3);
    Fixture {
        _dir: dir,
        pki,
        server,
    }
}

/// A raw SMTP client over TLS, for exact transcripts.
struct TlsClient {
    io: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsClient {
    /// Handshakes on `tcp` (right after STARTTLS's 220, or at once for smtps).
    fn handshake(tcp: TcpStream, pki: &Pki) -> TlsClient {
        let name = ServerName::try_from("localhost").expect("name");
        let conn = ClientConnection::new(pki.client_config(), name).expect("client");
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .expect("handshake");
        }
        TlsClient {
            io: BufReader::new(stream),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).expect("send");
        self.io.get_mut().flush().expect("flush");
    }

    fn reply(&mut self) -> String {
        crate::util::read_reply(&mut self.io)
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// Connects to the smtp listener, STARTTLS, handshake.
fn starttls(f: &Fixture, mode: &str) -> TlsClient {
    let mut c = Client::connect(f.server.listener(mode));
    assert!(c.cmd("EHLO client.test").contains("STARTTLS"));
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    TlsClient::handshake(c.stream.try_clone().expect("clone"), &f.pki)
}

fn plain(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

fn lettre_transport(
    f: &Fixture,
    addr: SocketAddr,
    implicit: bool,
    mechanism: Mechanism,
) -> SmtpTransport {
    let cert = Certificate::from_pem(&fs::read(&f.pki.ca_path).expect("ca")).expect("ca pem");
    let params = TlsParameters::builder("localhost".into())
        .add_root_certificate(cert)
        .build_rustls()
        .expect("tls params");
    let tls = if implicit {
        Tls::Wrapper(params)
    } else {
        Tls::Required(params)
    };
    SmtpTransport::builder_dangerous("localhost")
        .port(addr.port())
        .tls(tls)
        .hello_name(ClientId::Domain("laptop.test".into()))
        .credentials(Credentials::new("alice".into(), "wonderland".into()))
        .authentication(vec![mechanism])
        .build()
}

fn email(subject: &str) -> Message {
    Message::builder()
        .from("alice@localhost".parse().expect("from"))
        .to("bob@localhost".parse().expect("to"))
        .subject(subject)
        .body("hello over TLS\r\n".to_string())
        .expect("message")
}

#[test]
fn lettre_submits_over_starttls_and_over_implicit_tls_with_auth() {
    let f = fixture("");
    let starttls = lettre_transport(&f, f.server.listener("submission"), false, Mechanism::Plain);
    starttls
        .send(&email("via 587"))
        .expect("send over STARTTLS");
    let smtps = lettre_transport(&f, f.server.listener("smtps"), true, Mechanism::Login);
    smtps
        .send(&email("via 465"))
        .expect("send over implicit TLS");
    let mail = f.server.mail("bob");
    assert_eq!(mail.len(), 2);
    for m in &mail {
        let (header, _) = split_message(m);
        assert!(header.contains(" with ESMTPSA id "), "{header}");
        assert!(header.contains("(using TLSv1."), "{header}");
        assert!(!header.contains("wonderland"));
    }
    assert!(
        !f.server.log().contains("wonderland"),
        "a password reached the log"
    );
}

#[test]
fn starttls_injection_is_discarded() {
    // CVE-2011-0411: commands sent in clear together with STARTTLS must not
    // run after the handshake.
    let f = fixture("");
    let mut c = Client::connect(f.server.listener("smtp"));
    c.cmd("EHLO client.test");
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n");
    assert_eq!(c.reply(), "220 2.0.0 Ready to start TLS");
    let mut t = TlsClient::handshake(c.stream.try_clone().expect("clone"), &f.pki);
    // The session starts over: the injected MAIL never ran.
    assert!(t.cmd("RCPT TO:<bob@localhost>").starts_with("503"));
    let ehlo = t.cmd("EHLO client.test");
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered twice: {ehlo}");
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(t.cmd("STARTTLS").starts_with("503 5.5.1"));
    assert!(t.cmd("MAIL FROM:<alice@localhost>").starts_with("250"));
}

#[test]
fn auth_reply_codes() {
    let f = fixture("[limits]\nmax_errors = 100\n");
    // In clear: no AUTH offered, 538 when tried; STARTTLS with arguments 501.
    let mut c = Client::connect(f.server.listener("smtp"));
    let ehlo = c.cmd("EHLO client.test");
    assert!(!ehlo.contains("AUTH"), "AUTH offered without TLS: {ehlo}");
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("538 5.7.11"));
    assert!(c.cmd("STARTTLS now").starts_with("501"));
    // AUTH= on MAIL belongs to the AUTH extension: unknown where not offered.
    assert!(c
        .cmd("MAIL FROM:<x@y.test> AUTH=<>")
        .starts_with("555 5.5.4"));

    let mut t = starttls(&f, "smtp");
    assert!(t.cmd("AUTH PLAIN").starts_with("503"), "before EHLO");
    t.cmd("EHLO client.test");
    let cases: Vec<(String, &str)> = vec![
        ("AUTH CRAM-MD5".into(), "504 5.5.4"),
        ("AUTH PLAIN !!notbase64!!".into(), "501 5.5.2"),
        (
            format!(
                "AUTH PLAIN {}",
                base64::engine::general_purpose::STANDARD.encode("no-nuls")
            ),
            "501 5.5.2",
        ),
        (
            format!("AUTH PLAIN {}", plain("alice", "wrong")),
            "535 5.7.8",
        ),
        (
            format!("AUTH PLAIN {}", plain("mallory", "wonderland")),
            "535 5.7.8",
        ),
    ];
    for (cmd, want) in &cases {
        let r = t.cmd(cmd);
        assert!(r.starts_with(want), "{cmd}: want {want}, got {r}");
    }
    // "*" cancels an exchange; an over-long response is refused.
    assert_eq!(t.cmd("AUTH PLAIN"), "334");
    assert!(t.cmd("*").starts_with("501 5.0.0"));
    assert_eq!(t.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6");
    assert!(t.cmd(&"A".repeat(13_000)).starts_with("500 5.5.6"));
    // AUTH in a transaction: 503 (this MAIL, before AUTH, carries AUTH=<>:
    // accepted where AUTH is offered).
    assert!(t.cmd("MAIL FROM:<x@y.test> AUTH=<>").starts_with("250"));
    assert!(t
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("503"));
    t.cmd("RSET");
    // LOGIN done right, then AUTH twice: 503.
    assert_eq!(t.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert_eq!(t.cmd(&b64("alice")), "334 UGFzc3dvcmQ6");
    assert!(t.cmd(&b64("wonderland")).starts_with("235 2.7.0"));
    assert!(t
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("503"));
    // Authenticated: own sender only, and relaying is allowed.
    assert!(t.cmd("MAIL FROM:<bob@localhost>").starts_with("553 5.7.1"));
    // AUTH= (as Exim and sendmail send it, RFC 4954 5) is accepted and
    // discarded; a malformed one is refused.
    assert!(t
        .cmd("MAIL FROM:<alice@localhost> AUTH=alice+localhost")
        .starts_with("501 5.5.4"));
    assert!(t
        .cmd("MAIL FROM:<alice@localhost> AUTH=alice+40localhost")
        .starts_with("250"));
    assert!(t.cmd("RCPT TO:<friend@example.com>").starts_with("250"));
    assert!(
        !f.server.log().contains("wonderland"),
        "a password reached the log"
    );
}

#[test]
fn starttls_discards_a_login_made_in_clear() {
    let f = fixture("allow_plaintext_loopback = true\n");
    let mut c = Client::connect(f.server.listener("submission"));
    assert!(c.cmd("EHLO laptop.test").contains("AUTH PLAIN LOGIN"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("235"));
    assert_eq!(c.cmd("STARTTLS"), "220 2.0.0 Ready to start TLS");
    let mut t = TlsClient::handshake(c.stream.try_clone().expect("clone"), &f.pki);
    // RFC 3207 4.2: everything learnt before TLS is forgotten, the login too.
    assert!(t.cmd("EHLO laptop.test").contains("AUTH PLAIN LOGIN"));
    assert!(t
        .cmd("MAIL FROM:<alice@localhost>")
        .starts_with("530 5.7.0"));
    assert!(t
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("235"));
    assert!(t.cmd("MAIL FROM:<alice@localhost>").starts_with("250"));
}

#[test]
fn submission_needs_auth_and_smtp_does_not_relay_for_strangers() {
    let f = fixture("[relay]\nallow_from = [\"10.0.0.0/8\"]\n");
    let mut t = starttls(&f, "submission");
    t.cmd("EHLO laptop.test");
    assert!(t
        .cmd("MAIL FROM:<alice@localhost>")
        .starts_with("530 5.7.0"));
    // The plain smtp listener accepts local mail but relays for nobody here.
    let mut c = Client::connect(f.server.listener("smtp"));
    c.cmd("EHLO printer.test");
    assert!(c.cmd("MAIL FROM:<printer@localhost>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@localhost>").starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<someone@example.com>")
        .starts_with("554 5.7.1"));
}

#[test]
fn failed_auth_is_delayed_and_capped_per_address() {
    // The fixture's config ends inside its [auth] table.
    let f = fixture("max_failures = 2\n");
    let mut t = starttls(&f, "smtp");
    t.cmd("EHLO client.test");
    for _ in 0..2 {
        assert!(t
            .cmd(&format!("AUTH PLAIN {}", plain("alice", "guess")))
            .starts_with("535"));
    }
    // Even the right password is refused now, from this address.
    let r = t.cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")));
    assert!(r.starts_with("421 4.7.0"), "{r}");
}

#[test]
fn a_burst_of_auth_attempts_costs_bounded_memory() {
    // Each Argon2id check takes 19 MiB while it runs, and an attempt needs
    // no valid user: 16 at once used to take ~300 MB. At most two checks
    // run at a time now. (glibc keeps freed memory of this size unless its
    // mmap threshold is fixed, as the systemd unit does; musl ignores it.)
    let dir = TempDir::new();
    let users = dir.path().join("users");
    let line = postling::auth::passwd_line("alice", "wonderland").expect("hash");
    fs::write(&users, format!("{line}\n")).expect("users");
    let mut perms = fs::metadata(&users).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(&users, perms).expect("chmod");
    let config = format!(
        "[auth]\nusers_file = \"{}\"\nallow_plaintext_loopback = true\nmax_failures = 100\n",
        users.display()
    );
    let s = Server::start_env(
        &dir,
        &config,
        &[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")],
    );
    let status = |key: &str| -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/status", s.pid())).expect("status");
        let line = text.lines().find(|l| l.starts_with(key)).expect(key);
        line.split_whitespace()
            .nth(1)
            .expect("kB")
            .parse()
            .expect("number")
    };
    let before = status("VmHWM:");
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let mut c = s.client();
            assert!(c.cmd("EHLO burst.test").contains("AUTH PLAIN"));
            c
        })
        .collect();
    let replies: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = attempts
            .into_iter()
            .map(|mut c| {
                scope.spawn(move || c.cmd(&format!("AUTH PLAIN {}", plain("mallory", "guess"))))
            })
            .collect();
        running
            .into_iter()
            .map(|t| t.join().expect("client"))
            .collect()
    });
    for r in &replies {
        assert!(r.starts_with("535 5.7.8"), "{r}");
    }
    let grown = status("VmHWM:").saturating_sub(before);
    assert!(
        grown < 80 * 1024,
        "16 AUTH attempts raised the peak by {grown} KiB"
    );
    // The server still logs in the right user.
    let mut c = s.client();
    c.cmd("EHLO ok.test");
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain("alice", "wonderland")))
        .starts_with("235"));
}

#[test]
fn a_client_that_talks_before_the_greeting_is_dropped() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\ngreeting_delay = \"1s\"\n");
    let mut raw = TcpStream::connect(s.addr).expect("connect");
    raw.write_all(b"EHLO impatient.test\r\n").expect("send");
    let mut reply = String::new();
    BufReader::new(raw).read_line(&mut reply).expect("read");
    assert!(reply.starts_with("554 5.5.0"), "{reply}");
    // A patient client is served normally.
    assert!(Client::connect(s.addr).greeting.starts_with("220"));
}

#[test]
fn message_rate_per_address_is_capped() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\nmax_messages_per_minute_per_ip = 2\n");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    for _ in 0..2 {
        assert!(c
            .send_mail("a@b.test", &["alice@localhost"], "Subject: r\r\n\r\nhi\r\n")
            .starts_with("250"));
    }
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@localhost>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("421 4.7.0"));
    assert_eq!(s.mail("alice").len(), 2);
}

#[test]
fn open_relay_configs_are_refused_at_startup() {
    let dir = TempDir::new();
    let path = dir.path().join("open.toml");
    // A /0, and the less obvious ways to say "all of IPv4": its mapped
    // form, an IPv6 network that holds the mapped range, two halves.
    for allow in ["0.0.0.0/0", "::ffff:0.0.0.0/96", "::/1", "0.0.0.0/1"] {
        fs::write(
            &path,
            // A public address not on this machine (TEST-NET-1): refused by
            // the config check before any bind; were it not, the bind
            // would fail (exit 71), never listen beyond loopback.
            format!("[[listen]]\naddr = \"192.0.2.1:2599\"\n[relay]\nallow_from = [\"{allow}\"]\n"),
        )
        .expect("config");
        // Refused before it binds; were it accepted it would serve, so
        // the wait is bounded and the server killed, failing the test.
        let mut child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        let exited = wait_for(Duration::from_secs(20), || {
            child.try_wait().is_ok_and(|s| s.is_some())
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{allow}: the server started");
        }
        let out = child.wait_with_output().expect("output");
        assert_eq!(out.status.code(), Some(78), "{allow}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("open relay"), "{allow}: {err}");
    }
}

#[test]
fn relay_denial_battery_from_an_address_outside_allow_from() {
    // The client connects from 127.0.0.2; only 127.0.0.1 may relay.
    let dir = TempDir::new();
    let s = Server::start(&dir, "[local]\ndomains = [\"localhost\"]\n[relay]\nallow_from = [\"127.0.0.1/32\"]\n[limits]\nmax_errors = 100\n");
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind 127.0.0.2");
    socket.connect(&s.addr.into()).expect("connect");
    let mut c = Client::from_stream(socket.into());
    c.cmd("EHLO prober.test");
    assert!(c.cmd("MAIL FROM:<spammer@evil.test>").starts_with("250"));
    let probes = [
        "<victim@example.com>",
        "<victim%example.com@localhost>",
        "<example.com!victim@localhost>",
        "<\"victim@example.com\">",
        "<\"victim@example.com\"@localhost>",
        "<@localhost:victim@example.com>",
        "<victim@example.com@localhost>",
        "<victim@[192.0.2.1]>",
        "<victim@[127.0.0.1]>",
        "<victim@[IPv6:::1]>",
    ];
    for p in probes {
        let r = c.cmd(&format!("RCPT TO:{p}"));
        assert!(
            r.starts_with("554 5.7.1") || r.starts_with("501 5.1.3"),
            "{p}: {r}"
        );
        assert!(!r.starts_with('2'), "{p} accepted: {r}");
    }
    assert!(c.cmd("RCPT TO:<alice@localhost>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: probe\r\n\r\nx\r\n");
    assert!(c.cmd(".").starts_with("250"));
    assert!(s.queue().is_empty(), "something reached the queue");
}

#[test]
fn received_header_records_tls_on_port_25_too() {
    let f = fixture("");
    let mut t = starttls(&f, "smtp");
    t.cmd("EHLO mx.sender.test");
    assert!(t.cmd("MAIL FROM:<x@sender.test>").starts_with("250"));
    assert!(t.cmd("RCPT TO:<bob@localhost>").starts_with("250"));
    assert!(t.cmd("DATA").starts_with("354"));
    t.send(b"Subject: s\r\n\r\nhi\r\n.\r\n");
    assert!(t.reply().starts_with("250"));
    let (header, _) = split_message(&f.server.mail("bob")[0]);
    assert!(header.contains(" with ESMTPS id "), "{header}");
}

#[test]
fn started_as_root_it_drops_to_the_configured_user() {
    if !nix_is_root() {
        eprintln!("skipped: not running as root");
        return;
    }
    let dir = TempDir::new();
    // The data directory must belong to the user it will run as.
    let data = dir.path().join("data");
    fs::create_dir(&data).expect("data dir");
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).expect("chown to nobody");
    let s = Server::start(&dir, "user = \"nobody\"\n");
    let status = fs::read_to_string(format!("/proc/{}/status", s.pid())).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    let uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert_eq!(uids, ["65534"; 4], "real, effective, saved and fs uid");
    // It still works: port bound before the drop, files written after.
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail("a@b.test", &["alice@localhost"], "Subject: d\r\n\r\nhi\r\n")
        .starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn users_from_postling_passwd_and_openssl_passwd_6_can_log_in() {
    let dir = TempDir::new();
    let mut child = std::process::Command::new(bin())
        .args(["passwd", "carol"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("postling passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"c4rol pass\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let carol = String::from_utf8(out.stdout).expect("utf8");
    assert!(carol.starts_with("carol:$argon2id$"), "{carol}");
    // A SHA-512-crypt hash as `openssl passwd -6 -salt saltsalt secret` prints it.
    let dave = "dave:$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1\n";
    let pki = Pki::new(&dir);
    let users = dir.path().join("users");
    fs::write(&users, format!("{carol}{dave}")).expect("users");
    let mut perms = fs::metadata(&users).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    fs::set_permissions(&users, perms).expect("chmod");
    let config = format!(
        "[local]\ndomains = [\"localhost\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nusers_file = \"{}\"\n",
        pki.cert_path.display(),
        pki.key_path.display(),
        users.display()
    );
    let s = Server::start(&dir, &config);
    for (user, password) in [("carol", "c4rol pass"), ("dave", "secret")] {
        let mut c = Client::connect(s.addr);
        c.cmd("EHLO client.test");
        assert!(c.cmd("STARTTLS").starts_with("220"));
        let mut t = TlsClient::handshake(c.stream.try_clone().expect("clone"), &pki);
        t.cmd("EHLO client.test");
        let r = t.cmd(&format!("AUTH PLAIN {}", plain(user, password)));
        assert!(r.starts_with("235 2.7.0"), "{user}: {r}");
    }
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let f = fixture("");
    // A session that is open during the reload keeps working.
    let mut open = starttls(&f, "smtp");
    open.cmd("EHLO client.test");
    // Replace the certificate and key with ones from another CA.
    let other = Pki::new(&f._dir);
    fs::copy(&other.cert_path, &f.pki.cert_path).expect("cert");
    fs::copy(&other.key_path, &f.pki.key_path).expect("key");
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &f.server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    assert!(crate::util::wait_for(Duration::from_secs(5), || f
        .server
        .log()
        .contains("TLS certificate reloaded")));
    // New handshakes present the new certificate: a client trusting only
    // the new CA succeeds.
    let mut c = Client::connect(f.server.listener("smtp"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("STARTTLS").starts_with("220"));
    let mut t = TlsClient::handshake(c.stream.try_clone().expect("clone"), &other);
    assert!(t.cmd("EHLO client.test").starts_with("250"));
    assert!(
        open.cmd("NOOP").starts_with("250"),
        "the open session was dropped"
    );
}

#[test]
fn a_failed_handshake_closes_only_that_connection() {
    let f = fixture("");
    let mut bystander = Client::connect(f.server.listener("smtp"));
    let mut c = Client::connect(f.server.listener("smtp"));
    c.cmd("EHLO client.test");
    assert!(c.cmd("STARTTLS").starts_with("220"));
    c.send(b"this is not a TLS ClientHello\r\n");
    // The server may send a TLS alert first; then it closes.
    let mut rest = Vec::new();
    let eof = std::io::Read::read_to_end(&mut c.stream, &mut rest);
    assert!(eof.is_ok(), "connection not closed: {eof:?}");
    assert!(rest.len() < 64, "more than an alert came back: {rest:?}");
    assert!(bystander.cmd("NOOP").starts_with("250"));
    assert!(Client::connect(f.server.listener("smtp"))
        .greeting
        .starts_with("220"));
}

/// Sends `bytes` one at a time, 100 ms apart, until the server reacts (a
/// close, a reply or an alert); returns how many were sent by then.
fn trickle_until_closed(tcp: &TcpStream, bytes: &[u8]) -> usize {
    let mut tcp = tcp;
    for (n, b) in bytes.iter().enumerate() {
        tcp.set_nonblocking(true).expect("nonblocking");
        let reacted = !matches!(tcp.peek(&mut [0u8; 1]),
            Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).expect("blocking");
        if reacted || tcp.write_all(&[*b]).is_err() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bytes.len()
}

/// A client that sends its TLS bytes one at a time (a slowloris over TLS)
/// is cut off at the command timeout, in the handshake and after it:
/// rustls waits for a whole record, and the deadline is checked between
/// socket reads, not between records.
#[test]
fn tls_bytes_sent_one_at_a_time_do_not_stretch_the_command_timeout() {
    let f = fixture("[limits]\ncommand_timeout = \"2s\"\n");
    // The handshake, on the smtps port: the ClientHello a byte at a time.
    let tcp = TcpStream::connect(f.server.listener("smtps")).expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = ClientConnection::new(f.pki.client_config(), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    let sent = trickle_until_closed(&tcp, &hello);
    assert!(
        sent < hello.len(),
        "the whole {}-byte hello went in",
        hello.len()
    );

    // After the handshake: one long command in one record, a byte at a time.
    let mut c = starttls(&f, "smtp");
    // A round trip first, so what the server sent after the handshake
    // (session tickets) is read, and only a reaction to the trickle is seen.
    assert!(c.cmd("NOOP").starts_with("250"));
    let stream = c.io.get_mut();
    let command = format!("NOOP {}\r\n", "x".repeat(200));
    stream
        .conn
        .writer()
        .write_all(command.as_bytes())
        .expect("plaintext");
    let mut record = Vec::new();
    while stream.conn.wants_write() {
        stream.conn.write_tls(&mut record).expect("record");
    }
    let sent = trickle_until_closed(&stream.sock, &record);
    assert!(
        sent < record.len(),
        "the whole {}-byte record went in",
        record.len()
    );
    // What the server said, over TLS: the timeout's reply.
    assert_eq!(c.reply(), "421 4.4.2 Timeout exceeded, closing connection");
}
