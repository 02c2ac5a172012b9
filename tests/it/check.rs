//! `postling check` against test servers on loopback: every step reports,
//! and failures carry the right hint.

use std::fs;

use base64::Engine as _;
use std::process::Command;

use postling::relay::dns::test_server::{Record, TestDns};
use postling::relay::test_smtp::{Script, TestServer};

use crate::util::{bin, Pki, TempDir};

/// Runs `postling check` with `config`; returns (exit code, stdout).
fn check(dir: &TempDir, config: &str, args: &[&str]) -> (i32, String) {
    let path = dir.path().join("check.toml");
    fs::write(&path, config).expect("config");
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .args(args)
        .output()
        .expect("run postling check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn smarthost_config(dir: &TempDir, port: u16, password: &str, ca: Option<&Pki>) -> String {
    let secret = dir.path().join("secret");
    fs::write(&secret, format!("{password}\n")).expect("secret");
    let ca_line = ca.map_or(String::new(), |p| {
        format!("ca_file = \"{}\"\n", p.ca_path.display())
    });
    format!(
        "hostname = \"pi.test\"\n[relay]\nsmarthost = \"localhost:{port}\"\nsmarthost_user = \"me\"\nsmarthost_password_file = \"{}\"\n{ca_line}",
        secret.display()
    )
}

/// Direct MX delivery, with `dns` as the resolver and `server`'s port as
/// the MX port.
fn direct_config(dns: &TestDns, server: &TestServer) -> String {
    format!(
        "hostname = \"pi.test\"\n[relay]\ndns_servers = [\"{}\"]\nmx_port = {}\n",
        dns.addr,
        server.addr.port()
    )
}

fn tls_server(pki: &Pki) -> TestServer {
    TestServer::start(Script {
        tls: Some(pki.server_config()),
        auth: Some(("me".into(), "right".into())),
        ..Script::default()
    })
    .expect("test server")
}

#[test]
fn a_refused_auth_login_is_never_followed_by_the_password() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let server = TestServer::start(Script {
        tls: Some(pki.server_config()),
        auth: Some(("me".into(), "right".into())),
        auth_mechanisms: "LOGIN".into(),
        auth_refusal: Some("454 4.7.0 Temporary authentication failure".into()),
        ..Script::default()
    })
    .expect("test server");
    let (code, out) = check(
        &dir,
        &smarthost_config(&dir, server.addr.port(), "right", Some(&pki)),
        &[],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("454 4.7.0 Temporary authentication failure"),
        "{out}"
    );
    let secret = base64::engine::general_purpose::STANDARD.encode("right");
    let user = base64::engine::general_purpose::STANDARD.encode("me");
    let lines = server.lines();
    assert!(
        !lines.iter().any(|l| l.contains(&secret) || l == &user),
        "{lines:?}"
    );
}

#[test]
fn every_step_passes_against_a_good_smarthost() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let server = tls_server(&pki);
    let (code, out) = check(
        &dir,
        &smarthost_config(&dir, server.addr.port(), "right", Some(&pki)),
        &["--send-test", "friend@example.test"],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        "OK    config: valid",
        "OK    resolve smarthost localhost",
        "OK    connect to localhost",
        "OK    greeting: 220",
        "OK    EHLO: ",
        "OK    TLS handshake: TLSv1.",
        "certificate verified",
        "certificate subject CN=",
        "OK    AUTH: accepted for me",
        "OK    send test: accepted for friend@example.test",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert_eq!(server.messages().len(), 1);
}

#[test]
fn a_server_that_is_down_fails_with_a_hint() {
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (code, out) = check(&dir, &smarthost_config(&dir, port, "x", None), &[]);
    assert_eq!(code, 69, "{out}");
    assert!(out.contains("FAIL  connect to localhost"), "{out}");
    assert!(out.contains("hint: "), "{out}");
}

#[test]
fn an_untrusted_certificate_fails_and_credentials_are_not_sent() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let server = tls_server(&pki);
    let (code, out) = check(
        &dir,
        &smarthost_config(&dir, server.addr.port(), "right", None),
        &[],
    );
    assert_eq!(code, 69, "{out}");
    assert!(out.contains("FAIL  TLS handshake"), "{out}");
    assert!(out.contains("relay.ca_file"), "hint names the fix: {out}");
    assert!(server.lines().iter().all(|l| !l.starts_with("AUTH")));
}

#[test]
fn refused_credentials_fail_with_a_hint() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let server = tls_server(&pki);
    let (code, out) = check(
        &dir,
        &smarthost_config(&dir, server.addr.port(), "wrong", Some(&pki)),
        &[],
    );
    assert_eq!(code, 69, "{out}");
    assert!(out.contains("FAIL  AUTH"), "{out}");
    assert!(out.contains("app password"), "{out}");
}

#[test]
fn offline_only_validates_and_a_bad_config_names_the_line() {
    let dir = TempDir::new();
    let (code, out) = check(
        &dir,
        "[relay]\nsmarthost = \"10.255.255.1:587\"\n",
        &["--offline"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK    config: valid"));
    assert!(
        !out.contains("connect"),
        "--offline touched the network: {out}"
    );
    let (code, out) = check(&dir, "[limits]\nmax_recipients = 5\n", &["--offline"]);
    assert_eq!(code, 78);
    assert!(out.contains("check.toml:2: limits.max_recipients"), "{out}");
}

#[test]
fn direct_mode_resolves_the_mx_of_the_test_address() {
    let server = TestServer::start(Script::default()).expect("test server");
    let dns = TestDns::start(vec![
        Record::mx("peer.test", 10, "mx.peer.test"),
        Record::a("mx.peer.test", "127.0.0.1".parse().expect("ip")),
    ]);
    let dir = TempDir::new();
    let config = direct_config(&dns, &server);
    let (code, out) = check(&dir, &config, &["--send-test", "x@peer.test"]);
    // The test server offers no STARTTLS: direct delivery does not need it.
    assert!(
        out.contains("OK    resolve MX of peer.test: mx.peer.test [127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains("OK    send test: accepted for x@peer.test"),
        "{out}"
    );
    assert!(
        out.contains("STARTTLS not offered: mail to this host goes unencrypted"),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
}

/// `check` makes the checks `serve` makes before it runs (TLS files, the
/// users file, the user to run as) and shows config warnings, so "check,
/// then restart" never restarts into a daemon that will not start.
#[test]
fn offline_checks_the_files_serve_needs_and_shows_its_warnings() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let junk = dir.path().join("junk.pem");
    fs::write(&junk, "junk\n").expect("junk");
    let users = dir.path().join("users");
    fs::write(&users, "alice:plaintext\n").expect("users");
    fs::set_permissions(&users, fs::Permissions::from_mode(0o600)).expect("chmod");
    let tls = |cert: &std::path::Path| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            pki.key_path.display()
        )
    };
    let (code, out) = check(&dir, &tls(&pki.cert_path), &["--offline"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK    tls: certificate and key load"), "{out}");
    let (code, out) = check(&dir, &tls(&junk), &["--offline"]);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("FAIL  tls: [tls]: "), "{out}");
    let (code, out) = check(
        &dir,
        &format!("[auth]\nusers_file = \"{}\"\n", users.display()),
        &["--offline"],
    );
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("FAIL  auth: [auth]: ") && out.contains("not a hash"),
        "{out}"
    );
    let (code, out) = check(&dir, "user = \"no-such-user-here\"\n", &["--offline"]);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("FAIL  user: user no-such-user-here: no such user"),
        "{out}"
    );

    let aliases = dir.path().join("aliases");
    fs::write(
        &aliases,
        "team: alice, carl\nabuse: root\nwww: root\nroot: team\n",
    )
    .expect("aliases");
    let (code, out) = check(
        &dir,
        &format!(
            "[local]\nusers = [\"alice\"]\naliases = \"{}\"\n",
            aliases.display()
        ),
        &["--offline"],
    );
    assert_eq!(code, 0, "{out}");
    // Once, with the line it is on, however many aliases lead to it.
    let warning = "aliases:1: alias \"team\": target \"carl\" has no mailbox here; it is skipped";
    assert_eq!(out.matches(warning).count(), 1, "{out}");
    assert!(out.contains("WARN  "), "{out}");
}

/// An MX address that refuses (its IPv6 one, on a line with IPv4 only) is
/// not a failure when the next address takes the mail, as in the relay.
#[test]
fn an_address_that_refuses_is_not_a_failure_when_the_next_one_answers() {
    let server = TestServer::start(Script::default()).expect("test server");
    let dns = TestDns::start(vec![
        Record::mx("peer.test", 10, "mx.peer.test"),
        Record::aaaa("mx.peer.test", "::1".parse().expect("ip")),
        Record::a("mx.peer.test", "127.0.0.1".parse().expect("ip")),
    ]);
    let dir = TempDir::new();
    let config = direct_config(&dns, &server);
    let (code, out) = check(&dir, &config, &["--send-test", "x@peer.test"]);
    assert!(out.contains("trying the next address"), "{out}");
    assert!(
        out.contains("OK    send test: accepted for x@peer.test"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(code, 0, "{out}");
    // An address without a domain tests nothing: a failure, not a pass.
    let (code, out) = check(&dir, &config, &["--send-test", "root"]);
    assert_eq!(code, 69, "{out}");
    assert!(out.contains("FAIL  send test: root has no domain"), "{out}");
}

/// In direct delivery TLS is opportunistic: a failed handshake is retried
/// in clear by the relay, so `check` does the same and passes.
#[test]
fn direct_mode_falls_back_to_clear_when_tls_fails_as_the_relay_does() {
    let dir = TempDir::new();
    let pki = Pki::new(&dir);
    let server = TestServer::start(Script {
        tls: Some(pki.server_config()),
        broken_tls: true,
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(vec![
        Record::mx("peer.test", 10, "mx.peer.test"),
        Record::a("mx.peer.test", "127.0.0.1".parse().expect("ip")),
    ]);
    let config = direct_config(&dns, &server);
    let (code, out) = check(&dir, &config, &["--send-test", "x@peer.test"]);
    assert!(out.contains("TLS handshake failed: "), "{out}");
    assert!(
        out.contains("the relay sends to this host in clear then"),
        "{out}"
    );
    assert!(
        out.contains("OK    send test: accepted for x@peer.test"),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
}
