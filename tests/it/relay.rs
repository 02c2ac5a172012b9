//! Outbound delivery end to end: the real server relays to real SMTP peers
//! on loopback (a second postling, and the scripted test server), with MX
//! routing through a DNS server running in this test process.

use std::fs;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use postling::relay::dns::test_server::{Record, TestDns};
use postling::relay::test_smtp::{Script, TestServer};
use rustls::ServerConfig;

use crate::util::{read_new, split_message, wait_for, Server, TempDir};

const SHORT: Duration = Duration::from_secs(20);

/// A config whose relay retries every second and whose DNS is `dns`.
fn relay_config(extra_relay: &str, dns: &TestDns) -> String {
    format!(
        "hostname = \"relay.test\"\n[local]\ndomains = [\"localhost\"]\n[relay]\ndns_servers = [\"{}\"]\nretry = [\"1s\"]\nconnect_timeout = \"2s\"\n{extra_relay}",
        dns.addr
    )
}

fn send(s: &Server, from: &str, to: &[&str], body: &str) -> String {
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(from, to, body);
    assert!(r.starts_with("250"), "{r}");
    r.rsplit(' ').next().expect("queue id").to_string()
}

/// Asserts that `s` has logged `needle`, showing the log if not.
fn assert_logged(s: &Server, needle: &str) {
    assert!(s.log().contains(needle), "{}", s.log());
}

/// Waits (SHORT) until `s` has logged `needle`, showing the log if not.
fn wait_logged(s: &Server, needle: &str) {
    assert!(wait_for(SHORT, || s.log().contains(needle)), "{}", s.log());
}

/// A postling relaying through `dns` to MX hosts on `server`'s port.
fn relaying_to(server: &TestServer, dns: &TestDns, dir: &TempDir) -> Server {
    Server::start(
        dir,
        &relay_config(&format!("mx_port = {}\n", server.addr.port()), dns),
    )
}

/// `domain`'s one MX, mx.`domain`, at 127.0.0.1.
fn mx_here(domain: &str) -> Vec<Record> {
    let host = format!("mx.{domain}");
    vec![
        Record::mx(domain, 10, &host),
        Record::a(&host, "127.0.0.1".parse().expect("ip")),
    ]
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn relays_via_mx_to_a_second_postling_and_empties_the_queue() {
    let dir_b = TempDir::new();
    let b = Server::start(
        &dir_b,
        "hostname = \"mx.example.test\"\n[local]\ndomains = [\"example.test\"]\n",
    );
    let dns = TestDns::start(mx_here("example.test"));
    let dir_a = TempDir::new();
    let a = Server::start(
        &dir_a,
        &relay_config(&format!("mx_port = {}\n", b.addr.port()), &dns),
    );
    let id = send(
        &a,
        "cron@localhost",
        &["alice@example.test"],
        "Subject: over MX\r\n\r\n..dot line\r\nbye\r\n",
    );
    assert!(
        wait_for(SHORT, || b.mail("alice").len() == 1),
        "{}",
        a.log()
    );
    let (header, body) = split_message(&b.mail("alice")[0]);
    assert_eq!(
        body, b".dot line\r\nbye\r\n",
        "dot-stuffed on the way out, unstuffed on arrival"
    );
    assert!(header.contains("Return-Path: <cron@localhost>"), "{header}");
    assert!(
        header.contains("by relay.test (postling session"),
        "our Received kept"
    );
    assert!(
        header.contains("by mx.example.test (postling session"),
        "next hop added its own"
    );
    assert!(
        wait_for(SHORT, || a.queue().is_empty()),
        "queue entry not removed"
    );
    assert!(a.log().contains(&format!(
        "id={id} to=<alice@example.test> relay=mx.example.test[127.0.0.1]:"
    )));
    assert!(a.log().contains("status=sent"));
}

/// A queue written by an earlier version (one directory per entry, with
/// `envelope` and `message` files) is delivered and emptied after an
/// upgrade: nothing queued before it is lost.
#[test]
fn a_queue_in_the_earlier_layout_is_relayed_after_an_upgrade() {
    let dir_b = TempDir::new();
    let b = Server::start(
        &dir_b,
        "hostname = \"mx.example.test\"\n[local]\ndomains = [\"example.test\"]\n",
    );
    let dns = TestDns::start(mx_here("example.test"));
    let dir_a = TempDir::new();
    let id = "0OLDLAYOUT0000000001";
    let entry = dir_a.path().join("data/queue").join(id);
    fs::create_dir_all(&entry).expect("old entry");
    let env = postling::store::envelope::Envelope::new(
        id,
        1_714_000_000,
        "cron@localhost",
        "[127.0.0.1] helo=old".into(),
        &["alice@example.test", "bob@example.test"],
    );
    fs::write(entry.join("envelope"), env.to_bytes()).expect("envelope");
    fs::write(
        entry.join("message"),
        "Subject: from before\r\n\r\nold body\r\n",
    )
    .expect("message");

    let a = Server::start(
        &dir_a,
        &relay_config(&format!("mx_port = {}\n", b.addr.port()), &dns),
    );
    assert!(
        wait_for(SHORT, || b.mail("alice").len() == 1
            && b.mail("bob").len() == 1),
        "{}",
        a.log()
    );
    let (header, body) = split_message(&b.mail("alice")[0]);
    assert!(header.contains("Subject: from before"), "{header}");
    assert_eq!(body, b"old body\r\n");
    assert!(
        wait_for(SHORT, || a.queue().is_empty() && !entry.exists()),
        "old entry not removed: {}",
        a.log()
    );
}

#[test]
fn a_host_that_is_down_defers_then_delivers_when_it_comes_up() {
    let port = free_port();
    let dir_a = TempDir::new();
    let dns = TestDns::start(mx_here("later.test"));
    let a = Server::start(&dir_a, &relay_config(&format!("mx_port = {port}\n"), &dns));
    let id = send(
        &a,
        "cron@localhost",
        &["bob@later.test"],
        "Subject: patience\r\n\r\nhi\r\n",
    );
    assert!(wait_for(SHORT, || a
        .log()
        .contains(&format!("id={id} to=<bob@later.test>"))
        && a.log().contains("status=deferred")));
    // The log line comes just before the envelope is saved: wait for both.
    assert!(
        wait_for(SHORT, || a.queue().first().is_some_and(
            |(_, env)| env.contains("rcpt deferred bob@later.test ")
        )),
        "{:?}",
        a.queue()
    );
    // The next hop comes up on that port; the retry (every 1 s here) delivers.
    let dir_b = TempDir::new();
    let b = Server::start_at(
        dir_b.path(),
        "[local]\ndomains = [\"later.test\"]\n",
        &format!("127.0.0.1:{port}"),
    );
    assert!(wait_for(SHORT, || b.mail("bob").len() == 1), "{}", a.log());
    assert!(wait_for(SHORT, || a.queue().is_empty()));
}

#[test]
fn per_recipient_results_accept_defer_reject_and_bounce() {
    let server = TestServer::start(Script {
        rcpt_replies: vec![
            ("later@peer.test".into(), "450 4.2.1 mailbox busy".into()),
            ("nobody@peer.test".into(), "550 5.1.1 no such user".into()),
        ],
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(mx_here("peer.test"));
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    let id = send(
        &a,
        "cron@localhost",
        &["ok@peer.test", "later@peer.test", "nobody@peer.test"],
        "Subject: mixed\r\n\r\nhi\r\n",
    );
    // The bounce for nobody@ reaches the local sender's Maildir.
    assert!(wait_for(SHORT, || a.mail("cron").len() == 1), "{}", a.log());
    let bounce = String::from_utf8(a.mail("cron")[0].clone()).expect("utf8");
    assert!(bounce.starts_with("Return-Path: <>\r\n"), "{bounce}");
    for want in [
        "Subject: Undelivered Mail Returned to Sender",
        "Final-Recipient: rfc822; nobody@peer.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user",
        "Remote-MTA: dns; mx.peer.test",
        "Subject: mixed",
    ] {
        assert!(bounce.contains(want), "missing {want:?} in\n{bounce}");
    }
    assert!(
        !bounce.contains("ok@peer.test"),
        "only the failed recipient is reported"
    );
    // ok@ was delivered once and never again; later@ stays deferred.
    assert!(
        wait_for(SHORT, || {
            let q = a.queue();
            q.len() == 1
                && q[0].1.contains("rcpt delivered ok@peer.test\n")
                && q[0].1.contains("rcpt deferred later@peer.test ")
                && q[0].1.contains("rcpt failed nobody@peer.test ")
        }),
        "{:?}",
        a.queue()
    );
    assert!(
        wait_for(SHORT, || a
            .log()
            .matches(&format!("id={id} to=<later@peer.test>"))
            .count()
            >= 2),
        "retried"
    );
    let ok_rcpts = server
        .lines()
        .iter()
        .filter(|l| l.contains("RCPT TO:<ok@peer.test>"))
        .count();
    assert_eq!(ok_rcpts, 1, "a delivered recipient is never sent again");
}

#[test]
fn null_mx_and_missing_domain_bounce_at_once_and_bounces_never_bounce() {
    let dns = TestDns::start(vec![Record::mx("nomail.test", 0, ".")]);
    let dir = TempDir::new();
    let a = Server::start(&dir, &relay_config("", &dns));
    send(
        &a,
        "cron@localhost",
        &["x@nomail.test"],
        "Subject: a\r\n\r\nhi\r\n",
    );
    assert!(wait_for(SHORT, || a.mail("cron").len() == 1), "{}", a.log());
    let bounce = String::from_utf8(a.mail("cron")[0].clone()).expect("utf8");
    assert!(bounce.contains("Status: 5.1.10"), "{bounce}");
    // A message from <> that fails is logged, never bounced.
    let mut c = a.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail("", &["y@nowhere.test"], "Subject: b\r\n\r\nhi\r\n")
        .starts_with("250"));
    wait_logged(&a, "a bounce never bounces");
    assert!(wait_for(SHORT, || a.queue().is_empty()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.mail("cron").len(), 1);
}

#[test]
fn a_crash_while_other_domains_are_still_running_never_loses_a_bounce() {
    // One message to three domains: one fails at once (null MX), one is
    // delivered, one hangs (its MX accepts the connection and never
    // greets). The relay is killed before the hanging one reports.
    let ok = TestServer::start(Script::default()).expect("test server");
    let port = ok.addr.port();
    let hang = TcpListener::bind(("127.0.0.2", port)).expect("bind 127.0.0.2");
    let dns = TestDns::start(vec![
        Record::mx("nomail.test", 0, "."),
        Record::mx("ok.test", 10, "mx.ok.test"),
        Record::a("mx.ok.test", "127.0.0.1".parse().expect("ip")),
        Record::mx("hang.test", 10, "mx.hang.test"),
        Record::a("mx.hang.test", "127.0.0.2".parse().expect("ip")),
    ]);
    let dir = TempDir::new();
    let config = relay_config(&format!("mx_port = {port}\n"), &dns);
    let mut a = Server::start(&dir, &config);
    let id = send(
        &a,
        "cron@localhost",
        &["x@nomail.test", "z@ok.test", "y@hang.test"],
        "Subject: three domains\r\n\r\nhi\r\n",
    );
    let env = dir.path().join("data/queue").join(format!("{id}.env"));
    assert!(
        wait_for(SHORT, || {
            let log = a.log();
            log.contains("to=<x@nomail.test>")
                && log.contains("to=<z@ok.test>")
                && fs::read_to_string(&env).is_ok_and(|e| e.contains("rcpt delivered z@ok.test"))
        }),
        "{}",
        a.log()
    );
    a.kill();
    assert!(
        a.mail("cron").is_empty(),
        "the notice is sent only at the end"
    );
    let saved = fs::read_to_string(&env).expect("envelope");
    assert!(
        !saved.contains("rcpt failed x@nomail.test"),
        "a failure is on disk before its notice went out:\n{saved}"
    );

    // Restarted with the hanging host gone (connection refused: deferred),
    // the failed recipient is tried again and its bounce goes out.
    drop(hang);
    let a = Server::start_at(dir.path(), &config, "127.0.0.1:0");
    assert!(wait_for(SHORT, || a.mail("cron").len() == 1), "{}", a.log());
    let bounce = String::from_utf8(a.mail("cron")[0].clone()).expect("utf8");
    assert!(bounce.contains("x@nomail.test"), "{bounce}");
    assert!(!bounce.contains("z@ok.test"), "{bounce}");
    wait_logged(&a, "to=<y@hang.test>");
    assert_eq!(
        ok.messages().len(),
        1,
        "the delivered recipient is not sent again"
    );
}

#[test]
fn a_primary_mx_that_greets_with_554_is_skipped_for_the_backup() {
    let backup = TestServer::start(Script::default()).expect("backup");
    let port = backup.addr.port();
    let primary = TestServer::start_on(
        format!("127.0.0.2:{port}").parse().expect("address"),
        Script {
            greeting: "554 5.3.2 mx1 not accepting mail now".into(),
            ..Script::default()
        },
    )
    .expect("primary");
    let dns = TestDns::start(vec![
        Record::mx("two.test", 10, "mx1.two.test"),
        Record::a("mx1.two.test", "127.0.0.2".parse().expect("ip")),
        Record::mx("two.test", 20, "mx2.two.test"),
        Record::a("mx2.two.test", "127.0.0.1".parse().expect("ip")),
    ]);
    let dir = TempDir::new();
    let a = Server::start(&dir, &relay_config(&format!("mx_port = {port}\n"), &dns));
    send(
        &a,
        "cron@localhost",
        &["bob@two.test"],
        "Subject: b\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || backup.messages().len() == 1),
        "{}",
        a.log()
    );
    assert!(wait_for(SHORT, || a.queue().is_empty()));
    assert_eq!(primary.lines(), ["QUIT"], "the primary only heard QUIT");
    assert!(a.mail("cron").is_empty(), "no bounce");
}

#[test]
fn a_bounce_that_cannot_be_stored_is_tried_again_not_dropped() {
    let dns = TestDns::start(vec![Record::mx("nomail.test", 0, ".")]);
    let dir = TempDir::new();
    // cron's mailbox sits below a regular file: storing its bounce fails.
    let blocker = dir.path().join("cron-home");
    fs::write(&blocker, "x").expect("blocker");
    let mailbox = blocker.join("Maildir");
    let config = relay_config("", &dns).replace(
        "[local]\n",
        &format!(
            "[local]\nmailboxes = {{ cron = \"{}\" }}\n",
            mailbox.display()
        ),
    );
    let a = Server::start(&dir, &config);
    send(
        &a,
        "cron@localhost",
        &["x@nomail.test"],
        "Subject: a\r\n\r\nhi\r\n",
    );
    wait_logged(&a, "cannot queue the Failed notice");
    // Not given up: the entry stays, and once the mailbox can be written
    // the next attempt fails the recipient again and the bounce arrives.
    assert!(wait_for(SHORT, || a.queue().len() == 1), "{}", a.log());
    fs::remove_file(&blocker).expect("unblock");
    fs::create_dir(&blocker).expect("mkdir");
    assert!(
        wait_for(SHORT, || read_new(&mailbox).len() == 1),
        "{}",
        a.log()
    );
    let bounce = String::from_utf8(read_new(&mailbox)[0].clone()).expect("utf8");
    assert!(bounce.contains("Status: 5.1.10"), "{bounce}");
    assert!(wait_for(SHORT, || a.queue().is_empty()), "{}", a.log());
}

#[test]
fn connection_dropped_mid_data_defers() {
    let server = TestServer::start(Script {
        drop_mid_data: true,
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(mx_here("drop.test"));
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    let id = send(
        &a,
        "cron@localhost",
        &["x@drop.test"],
        "Subject: a\r\n\r\nline one\r\nline two\r\n",
    );
    assert!(wait_for(SHORT, || a
        .log()
        .contains(&format!("id={id} to=<x@drop.test>"))
        && a.log().contains("status=deferred")));
    assert_eq!(a.queue().len(), 1);
    assert!(
        a.mail("cron").is_empty(),
        "a temporary failure is not bounced"
    );
}

#[test]
fn delay_notice_once_then_expiry_bounces() {
    let port = free_port(); // nothing listens: every attempt fails
    let dns = TestDns::start(mx_here("down.test"));
    let dir = TempDir::new();
    let a = Server::start(
        &dir,
        &relay_config(
            &format!("mx_port = {port}\ndelay_warning = \"2s\"\nmax_queue_time = \"5s\"\n"),
            &dns,
        ),
    );
    send(
        &a,
        "cron@localhost",
        &["x@down.test"],
        "Subject: doomed\r\n\r\nhi\r\n",
    );
    assert!(wait_for(SHORT, || a.mail("cron").len() == 2), "{}", a.log());
    let notices: Vec<String> = a
        .mail("cron")
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    let delayed = notices
        .iter()
        .filter(|n| n.contains("Action: delayed"))
        .count();
    let failed: Vec<&String> = notices
        .iter()
        .filter(|n| n.contains("Action: failed"))
        .collect();
    assert_eq!(delayed, 1, "exactly one delay notice");
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("Status: 4.4.7"), "{}", failed[0]);
    assert!(wait_for(SHORT, || a.queue().is_empty()));
}

/// A CA and a server config for "localhost"; the CA PEM is written to `dir`.
fn pki(dir: &TempDir) -> (std::path::PathBuf, Arc<ServerConfig>) {
    let pki = crate::util::Pki::new(dir);
    (pki.ca_path.clone(), pki.server_config())
}

/// Starts postling with `server` as its smarthost, AUTH as `user`/`password`
/// (the password in a file), and `extra` [relay] lines.
fn with_smarthost(
    dir: &TempDir,
    server: &TestServer,
    user: &str,
    password: &str,
    extra: &str,
) -> Server {
    let secret = dir.path().join("secret");
    fs::write(&secret, format!("{password}\n")).expect("secret");
    let config = format!(
        "[local]\ndomains = [\"localhost\"]\n[relay]\nsmarthost = \"localhost:{}\"\nsmarthost_user = \"{user}\"\nsmarthost_password_file = \"{}\"\nretry = [\"1s\"]\n{extra}",
        server.addr.port(),
        secret.display(),
    );
    Server::start(dir, &config)
}

#[test]
fn smarthost_with_starttls_auth_and_from_rewriting() {
    let dir = TempDir::new();
    let (ca, tls) = pki(&dir);
    let server = TestServer::start(Script {
        tls: Some(tls),
        auth: Some(("me@example.net".into(), "s3cret".into())),
        ..Script::default()
    })
    .expect("test server");
    let extra = format!(
        "rewrite_from = \"me@example.net\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let a = with_smarthost(&dir, &server, "me@example.net", "s3cret", &extra);
    send(
        &a,
        "cron@localhost",
        &["friend@gmail.test"],
        "From: Cron Daemon <cron@localhost>\r\nSubject: via smarthost\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || server.messages().len() == 1),
        "{}",
        a.log()
    );
    let lines = server.lines();
    let auth_at = lines
        .iter()
        .position(|l| l.starts_with("AUTH "))
        .expect("AUTH sent");
    let tls_at = lines
        .iter()
        .position(|l| l.starts_with("STARTTLS"))
        .expect("STARTTLS sent");
    assert!(tls_at < auth_at, "credentials only after TLS: {lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("MAIL FROM:<me@example.net>")),
        "{lines:?}"
    );
    let msg = String::from_utf8(server.messages()[0].clone()).expect("utf8");
    assert!(
        msg.contains("From: Cron Daemon <me@example.net>\r\n"),
        "{msg}"
    );
    assert!(
        msg.contains("Reply-To: Cron Daemon <cron@localhost>\r\n"),
        "{msg}"
    );
    assert!(wait_for(SHORT, || a.queue().is_empty()));
}

#[test]
fn messages_in_a_row_share_one_smarthost_session_which_is_closed_when_idle() {
    let dir = TempDir::new();
    let (ca, tls) = pki(&dir);
    let server = TestServer::start(Script {
        tls: Some(tls),
        auth: Some(("me@example.net".into(), "s3cret".into())),
        ..Script::default()
    })
    .expect("test server");
    let extra = format!("ca_file = \"{}\"\n", ca.display());
    let a = with_smarthost(&dir, &server, "me@example.net", "s3cret", &extra);
    for n in 1..=3 {
        send(
            &a,
            "cron@localhost",
            &["friend@gmail.test"],
            &format!("Subject: number {n}\r\n\r\nhi\r\n"),
        );
        assert!(
            wait_for(SHORT, || server.messages().len() == n),
            "{}",
            a.log()
        );
    }
    let count = |prefix: &str| {
        server
            .lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    };
    assert_eq!(count("MAIL FROM:"), 3);
    // One connection: one handshake and one login for the three messages.
    assert_eq!(count("STARTTLS"), 1, "{:?}", server.lines());
    assert_eq!(count("AUTH "), 1, "{:?}", server.lines());
    assert!(wait_for(SHORT, || a.queue().is_empty()));
    // Left idle, the session is ended with QUIT after a few seconds.
    assert!(
        wait_for(SHORT, || count("QUIT") == 1),
        "{:?}",
        server.lines()
    );
}

#[test]
fn smarthost_with_an_untrusted_certificate_defers_and_never_sends_credentials() {
    let dir = TempDir::new();
    let (_ca, tls) = pki(&dir); // the server's CA is NOT given to postling
    let server = TestServer::start(Script {
        tls: Some(tls),
        implicit_tls: true,
        auth: Some(("me@example.net".into(), "s3cret".into())),
        ..Script::default()
    })
    .expect("test server");
    let a = with_smarthost(
        &dir,
        &server,
        "me@example.net",
        "s3cret",
        "smarthost_tls = \"implicit\"\n",
    );
    let id = send(
        &a,
        "cron@localhost",
        &["friend@gmail.test"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || a
            .log()
            .contains(&format!("id={id} to=<friend@gmail.test>"))
            && a.log().contains("status=deferred")),
        "{}",
        a.log()
    );
    assert!(
        server.lines().iter().all(|l| !l.starts_with("AUTH")),
        "{:?}",
        server.lines()
    );
    assert!(server.messages().is_empty());
    assert_eq!(a.queue().len(), 1);
}

#[test]
fn sigkill_while_relaying_loses_nothing_and_resends_only_what_was_in_flight() {
    // The next hop is down while 40 messages pile up, comes up, and the
    // relaying daemon is killed partway through draining its queue.
    let port = free_port();
    let dns = TestDns::start(mx_here("far.test"));
    let dir_a = TempDir::new();
    let config_a = relay_config(&format!("mx_port = {port}\n"), &dns);
    let mut a = Server::start(&dir_a, &config_a);
    let mut c = a.client();
    c.cmd("EHLO client.test");
    let total = 40;
    for n in 0..total {
        let body = format!("Subject: relay-token-{n}\r\n\r\nhi\r\n");
        assert!(c
            .send_mail("cron@localhost", &["bob@far.test"], &body)
            .starts_with("250"));
    }
    drop(c);
    let dir_b = TempDir::new();
    let b = Server::start_at(
        dir_b.path(),
        "[local]\ndomains = [\"far.test\"]\n",
        &format!("127.0.0.1:{port}"),
    );
    // Kill once a few have arrived, well before all of them.
    assert!(wait_for(SHORT, || b.mail("bob").len() >= 3), "{}", a.log());
    a.kill();
    let before_restart = b.mail("bob").len();
    assert!(
        before_restart < total,
        "the kill came too late to test anything"
    );

    let a2 = Server::start_at(dir_a.path(), &config_a, "127.0.0.1:0");
    assert!(
        wait_for(Duration::from_secs(60), || a2.queue().is_empty()),
        "{}",
        a2.log()
    );
    let mail: Vec<String> = b
        .mail("bob")
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    let mut duplicates = 0;
    for n in 0..total {
        let copies = mail
            .iter()
            .filter(|m| m.contains(&format!("Subject: relay-token-{n}\r\n")))
            .count();
        assert!(copies >= 1, "relay-token-{n} lost");
        duplicates += copies - 1;
    }
    // Only deliveries running at the moment of the kill may repeat.
    assert!(
        duplicates <= 8,
        "{duplicates} duplicates: delivered recipients were sent again"
    );
}

#[test]
fn opportunistic_tls_that_fails_is_retried_in_clear() {
    let server = TestServer::start(Script {
        broken_tls: true,
        tls: Some(pki(&TempDir::new()).1),
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(mx_here("oddtls.test"));
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    send(
        &a,
        "cron@localhost",
        &["x@oddtls.test"],
        "Subject: clear\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || server.messages().len() == 1),
        "{}",
        a.log()
    );
    assert_logged(&a, "TLS handshake failed; retrying in clear");
    assert!(wait_for(SHORT, || a.queue().is_empty()));
}

#[test]
fn implicit_tls_smarthost_with_a_trusted_private_ca_delivers() {
    let dir = TempDir::new();
    let (ca, tls) = pki(&dir);
    let server = TestServer::start(Script {
        tls: Some(tls),
        implicit_tls: true,
        auth: Some(("u".into(), "pw".into())),
        auth_mechanisms: "LOGIN".into(),
        ..Script::default()
    })
    .expect("test server");
    let extra = format!(
        "smarthost_tls = \"implicit\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let a = with_smarthost(&dir, &server, "u", "pw", &extra);
    send(
        &a,
        "cron@localhost",
        &["friend@example.test"],
        "Subject: implicit\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || server.messages().len() == 1),
        "{}",
        a.log()
    );
    assert!(
        server.lines().iter().any(|l| l == "AUTH LOGIN"),
        "{:?}",
        server.lines()
    );
    assert!(wait_for(SHORT, || a.queue().is_empty()));
}

#[test]
fn a_failed_bounce_goes_to_postmaster_when_configured() {
    let dns = TestDns::start(vec![Record::mx("nomail.test", 0, ".")]);
    let dir = TempDir::new();
    let a = Server::start(
        &dir,
        &relay_config("double_bounce_to_postmaster = true\n", &dns),
    );
    let mut c = a.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail("", &["x@nomail.test"], "Subject: from nobody\r\n\r\nhi\r\n")
        .starts_with("250"));
    assert!(
        wait_for(SHORT, || a.mail("postmaster").len() == 1),
        "{}",
        a.log()
    );
    let notice = String::from_utf8(a.mail("postmaster")[0].clone()).expect("utf8");
    assert!(notice.contains("Status: 5.1.10"), "{notice}");
    assert!(notice.contains("Subject: from nobody"));
}

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("comm").1.split(' ').collect();
    fields[12].parse::<u64>().expect("utime") + fields[13].parse::<u64>().expect("stime")
}

/// A flush that arrives while the message it names is on the wire, and an
/// attempt that then finishes it, leaves the relay idle: it once kept the
/// id as "forced" after the message was gone and spun at 100% CPU.
#[test]
fn a_flush_during_the_last_attempt_leaves_the_relay_idle() {
    let server = TestServer::start(Script {
        data_reply_delay: Duration::from_secs(2),
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(mx_here("slow.test"));
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    let id = send(
        &a,
        "cron@localhost",
        &["x@slow.test"],
        "Subject: a\r\n\r\nhi\r\n",
    );
    assert!(wait_for(SHORT, || server.messages().len() == 1));
    for args in [vec!["flush", id.as_str()], vec!["flush"]] {
        let o = std::process::Command::new(crate::util::bin())
            .arg("queue")
            .args(&args)
            .arg("--data-dir")
            .arg(&a.data)
            .output()
            .expect("run postling queue");
        assert!(o.status.success(), "{o:?}\n{}", a.log());
    }
    assert!(wait_for(SHORT, || a
        .log()
        .contains(&format!("id={id} status=removed"))));
    let before = cpu_ticks(a.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(a.pid()) - before;
    // Idle, the server sleeps in its loops: a spinning thread would use
    // about 300 ticks of the 3 s (at 100 ticks a second).
    assert!(used < 60, "{used} ticks of CPU in 3 s of idle\n{}", a.log());
    assert_eq!(server.messages().len(), 1, "delivered once");
}

/// A delay notice that cannot be stored is tried again at the next
/// attempt, as a bounce is, rather than recorded as sent.
#[test]
fn a_delay_notice_that_cannot_be_stored_is_tried_again() {
    let port = free_port(); // nothing listens: every attempt defers
    let dns = TestDns::start(mx_here("down.test"));
    let dir = TempDir::new();
    let a = Server::start(
        &dir,
        &relay_config(
            &format!("mx_port = {port}\ndelay_warning = \"2s\"\nmax_queue_time = \"1h\"\n"),
            &dns,
        ),
    );
    // The sender's Maildir has a symlink for new/, which postling refuses.
    let maildir = a.data.join("mail").join("cron");
    for sub in ["tmp", "cur"] {
        fs::create_dir_all(maildir.join(sub)).expect("maildir");
    }
    std::os::unix::fs::symlink(dir.path(), maildir.join("new")).expect("symlink");
    let id = send(
        &a,
        "cron@localhost",
        &["x@down.test"],
        "Subject: late\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || a
            .log()
            .contains(&format!("id={id} cannot queue the Delayed notice"))),
        "{}",
        a.log()
    );
    fs::remove_file(maildir.join("new")).expect("unlink");
    fs::create_dir(maildir.join("new")).expect("new/");
    assert!(wait_for(SHORT, || a.mail("cron").len() == 1), "{}", a.log());
    let notice = String::from_utf8_lossy(&a.mail("cron")[0]).into_owned();
    assert!(notice.contains("Action: delayed"), "{notice}");
    assert_eq!(a.queue().len(), 1, "still queued");
}

/// A host that is one of our own listeners is never connected to, nor any
/// host of the same or a worse MX preference (RFC 5321 5.1): mail whose
/// best MX is us bounces at once with 5.4.6, instead of going round 50
/// times; mail with a better MX waits for it. An IPv4-mapped IPv6 address
/// of ours is ours too, and the verdict does not hang on the order of
/// hosts of equal preference.
#[test]
fn an_mx_that_is_this_server_is_never_sent_to() {
    let port = free_port();
    // A worse and an equal MX that would take the mail (and could hand it
    // straight back).
    let other = TestServer::start_on(
        format!("127.0.0.3:{port}").parse().expect("addr"),
        Script::default(),
    )
    .expect("other MX");
    let dns = TestDns::start(vec![
        Record::mx("loop.test", 10, "mx.loop.test"),
        Record::mx("loop.test", 20, "other.loop.test"),
        Record::aaaa("mx.loop.test", "::1".parse().expect("ip")),
        Record::a("mx.loop.test", "127.0.0.1".parse().expect("ip")),
        Record::a("other.loop.test", "127.0.0.3".parse().expect("ip")),
        Record::mx("mapped.test", 10, "mapped.loop.test"),
        Record::aaaa("mapped.loop.test", "::ffff:127.0.0.1".parse().expect("ip")),
        Record::mx("equal.test", 10, "other.loop.test"),
        Record::mx("equal.test", 10, "mx.loop.test"),
        Record::mx("backup.test", 10, "down.backup.test"),
        Record::mx("backup.test", 20, "mx.loop.test"),
        Record::a("down.backup.test", "127.0.0.2".parse().expect("ip")),
    ]);
    let dir = TempDir::new();
    let a = Server::start_at(
        dir.path(),
        &relay_config(&format!("mx_port = {port}\n"), &dns),
        &format!("127.0.0.1:{port}"),
    );
    for (n, domain) in ["loop.test", "mapped.test", "equal.test"]
        .iter()
        .enumerate()
    {
        send(
            &a,
            "cron@localhost",
            &[&format!("x@{domain}")],
            "Subject: a\r\n\r\nhi\r\n",
        );
        assert!(
            wait_for(SHORT, || a.mail("cron").len() == n + 1),
            "{}",
            a.log()
        );
        let bounces: Vec<String> = a
            .mail("cron")
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect();
        let want = format!("mail for {domain} loops back to myself");
        assert!(
            bounces
                .iter()
                .any(|b| b.contains("Status: 5.4.6") && b.contains(&want)),
            "{domain}: {bounces:?}"
        );
    }
    // Our own listener saw each message once, no copies; the others none.
    assert!(other.messages().is_empty());
    assert_eq!(
        a.log().matches(" accepted from=<cron@localhost>").count(),
        3,
        "{}",
        a.log()
    );

    let waiting = send(
        &a,
        "cron@localhost",
        &["y@backup.test"],
        "Subject: b\r\n\r\nhi\r\n",
    );
    assert!(
        // The delay is whole seconds since arrival: 0s, or 1s on a busy
        // machine.
        wait_for(SHORT, || a.log().lines().any(|l| {
            l.contains(&format!(
                "id={waiting} to=<y@backup.test> relay=none delay="
            )) && l.contains("s status=deferred")
        })),
        "{}",
        a.log()
    );
    assert_eq!(a.mail("cron").len(), 3, "deferred, not bounced");
    assert_eq!(a.queue().len(), 1);
}

/// Mail to an IPv6 address literal goes to that address, however its tag
/// is written (it was bounced as a "bad address literal").
#[test]
fn mail_to_an_ipv6_literal_goes_to_that_address() {
    let Ok(server) = TestServer::start_on("[::1]:0".parse().expect("addr"), Script::default())
    else {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    };
    let dns = TestDns::start(Vec::new());
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    for to in ["x@[IPv6:::1]", "y@[ipv6:::1]"] {
        send(&a, "cron@localhost", &[to], "Subject: v6\r\n\r\nhi\r\n");
    }
    assert!(
        wait_for(SHORT, || server.messages().len() == 2),
        "{}",
        a.log()
    );
    assert!(wait_for(SHORT, || a.queue().is_empty()));
    assert!(a.mail("cron").is_empty(), "nothing bounced");
}

/// Another MTA on this machine, on another port, that greets with the same
/// (default) hostname is not this server: it gets the mail.
#[test]
fn another_mta_here_with_our_hostname_is_not_a_loop() {
    let server = TestServer::start(Script {
        greeting: "220 relay.test ESMTP other".into(),
        ..Script::default()
    })
    .expect("test server");
    let dns = TestDns::start(Vec::new());
    let dir = TempDir::new();
    let a = Server::start(
        &dir,
        &relay_config(
            &format!(
                "smarthost = \"127.0.0.1:{}\"\nsmarthost_tls = \"none\"\n",
                server.addr.port()
            ),
            &dns,
        ),
    );
    send(
        &a,
        "cron@localhost",
        &["x@far.test"],
        "Subject: a\r\n\r\nhi\r\n",
    );
    assert!(
        wait_for(SHORT, || server.messages().len() == 1),
        "{}",
        a.log()
    );
    assert_logged(&a, "greeted with our own hostname relay.test");
    assert!(a.mail("cron").is_empty(), "nothing bounced");
}

/// A message to many domains is delivered to every one of them, its
/// destinations taking turns on a few delivery threads.
#[test]
fn a_message_to_many_domains_reaches_every_one() {
    let server = TestServer::start(Script::default()).expect("test server");
    let domains: Vec<String> = (0..9).map(|i| format!("d{i}.test")).collect();
    let mut records = Vec::new();
    for d in &domains {
        records.push(Record::mx(d, 10, "mx.many.test"));
    }
    records.push(Record::a("mx.many.test", "127.0.0.1".parse().expect("ip")));
    let dns = TestDns::start(records);
    let dir = TempDir::new();
    let a = relaying_to(&server, &dns, &dir);
    let to: Vec<String> = domains.iter().map(|d| format!("x@{d}")).collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    send(&a, "cron@localhost", &to, "Subject: many\r\n\r\nhi\r\n");
    assert!(wait_for(SHORT, || a.queue().is_empty()), "{}", a.log());
    assert_eq!(server.messages().len(), 9);
    assert_eq!(a.log().matches("status=sent").count(), 9, "{}", a.log());
}
