//! Command transcripts over TCP: every reply code of the command phase.

use crate::util::{Server, TempDir};

const LOCAL: &str =
    "[local]\ndomains = [\"localhost\", \"pi.lan\"]\nusers = [\"alice\", \"bob\"]\n";

/// Sends each command and checks the start of its reply ("250", "501 5.1.3", ...).
fn transcript(server: &Server, steps: &[(&str, &str)]) {
    let mut c = server.client();
    for (cmd, want) in steps {
        let got = c.cmd(cmd);
        let last = got.lines().last().unwrap_or("");
        assert!(
            last.starts_with(want),
            "{cmd:?}: want {want:?}, got {got:?}"
        );
    }
}

#[test]
fn greeting_and_ehlo_capabilities() {
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        "hostname = \"mx.test\"\n[limits]\nmax_message_size = \"1M\"\n",
    );
    let mut c = s.client();
    assert_eq!(c.greeting, "220 mx.test ESMTP postling");
    let ehlo = c.cmd("EHLO client.test");
    let lines: Vec<&str> = ehlo.lines().collect();
    assert_eq!(lines[0], "250-mx.test Hello client.test");
    for cap in [
        "PIPELINING",
        "SIZE 1048576",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(
            lines.iter().any(|l| &l[4..] == cap),
            "missing {cap} in {ehlo}"
        );
    }
    assert_eq!(c.cmd("HELO old.test"), "250 mx.test Hello old.test");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(c.is_closed());
}

#[test]
fn reply_codes_of_the_command_phase() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &format!("{LOCAL}[limits]\nmax_errors = 100\n"));
    transcript(
        &s,
        &[
            ("MAIL FROM:<a@b.test>", "503 5.5.1"),
            ("RCPT TO:<alice@localhost>", "503 5.5.1"),
            ("DATA", "503 5.5.1"),
            ("FOO", "500 5.5.1"),
            ("EXPN staff", "502 5.5.1"),
            ("STARTTLS", "502 5.5.1"),
            ("EHLO", "501 5.5.4"),
            ("EHLO client.test", "250"),
            ("VRFY alice", "252 2.5.0"),
            ("HELP", "214 2.0.0"),
            ("NOOP", "250 2.0.0"),
            ("RCPT TO:<alice@localhost>", "503 5.5.1"),
            ("MAIL FROM:<a@b.test> RET=FULL", "555 5.5.4"),
            ("MAIL FROM:<a@b.test> BODY=BINARYMIME", "501 5.5.4"),
            ("MAIL FROM:<a@b.test> SIZE=999999999999", "552 5.3.4"),
            ("MAIL FROM:<ü@b.test>", "553 5.6.7"),
            ("MAIL FROM:<a@b@c>", "501 5.1.7"),
            ("MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME", "250 2.1.0"),
            ("MAIL FROM:<c@d.test>", "503 5.5.1"),
            ("DATA", "503 5.5.1"),
            ("RCPT TO:<ü@pi.lan>", "553 5.6.7"),
            ("RCPT TO:<nobody@localhost>", "550 5.1.1"),
            ("DATA", "554 5.5.1"),
            ("RCPT TO:<alice@localhost> NOTIFY=NEVER", "555 5.5.4"),
            ("RCPT TO:<Alice@PI.LAN>", "250 2.1.5"),
            ("RCPT TO:<Postmaster>", "250 2.1.5"),
            ("RSET", "250 2.0.0"),
            ("RCPT TO:<alice@localhost>", "503 5.5.1"),
            ("MAIL FROM:<>", "250 2.1.0"),
            ("EHLO again.test", "250"),
            ("RCPT TO:<alice@localhost>", "503 5.5.1"),
            ("QUIT now", "501 5.5.4"),
            ("QUIT", "221 2.0.0"),
        ],
    );
}

#[test]
fn bad_addresses_get_501() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &format!("{LOCAL}[limits]\nmax_errors = 100\n"));
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for bad in [
        "<;sleep 1;>",
        "<a@>",
        "<@a>",
        "<a@b@c>",
        "<a@b",
        "<a b@c>",
        "<a@[999.1.1.1]>",
    ] {
        let r = c.cmd(&format!("RCPT TO:{bad}"));
        assert!(r.starts_with("501 5.1.3"), "{bad}: {r}");
    }
    let long_local = format!("RCPT TO:<{}@localhost>", "a".repeat(65));
    assert!(c.cmd(&long_local).starts_with("501 5.1.3"));
    let long_domain = format!("RCPT TO:<a@{}.test>", vec!["b".repeat(63); 4].join("."));
    assert!(c.cmd(&long_domain).starts_with("501 5.1.3"));
}

#[test]
fn helo_clients_get_no_extensions() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    transcript(
        &s,
        &[
            ("HELO old.test", "250"),
            ("MAIL FROM:<a@b.test> SIZE=10", "555 5.5.4"),
            ("MAIL FROM:<a@b.test>", "250"),
        ],
    );
}

#[test]
fn pipelined_group_gets_replies_in_order() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    // One write, as a PIPELINING client sends it (RFC 2920 3.1).
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@localhost>\r\nRCPT TO:<nobody@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n");
    assert!(c.reply().starts_with("250 2.1.0"));
    assert!(c.reply().starts_with("250 2.1.5"));
    assert!(c.reply().starts_with("550 5.1.1"));
    assert!(c.reply().starts_with("250 2.1.5"));
    assert!(c.reply().starts_with("354"));
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n");
    assert!(c.reply().starts_with("250 2.0.0 OK: queued as "));
    assert!(c.reply().starts_with("250 2.0.0"));
    assert!(c.reply().starts_with("250 2.0.0"));
    assert!(c.reply().starts_with("221"));
    assert_eq!(s.mail("alice").len(), 1);
    assert_eq!(s.mail("bob").len(), 1);
}

#[test]
fn relay_is_denied_to_clients_outside_allow_from() {
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        &format!("{LOCAL}[relay]\nallow_from = [\"10.0.0.0/8\"]\n"),
    );
    transcript(
        &s,
        &[
            ("EHLO client.test", "250"),
            ("MAIL FROM:<a@b.test>", "250"),
            ("RCPT TO:<someone@example.com>", "554 5.7.1"),
            ("RCPT TO:<someone@[192.0.2.1]>", "554 5.7.1"),
            ("RCPT TO:<someone%example.com@localhost>", "554 5.7.1"),
            ("RCPT TO:<\"someone@example.com\"@localhost>", "554 5.7.1"),
            ("RCPT TO:<example.com!someone@localhost>", "554 5.7.1"),
            ("RCPT TO:<@localhost:someone@example.com>", "554 5.7.1"),
            ("RCPT TO:<alice@localhost>", "250"),
        ],
    );
    assert!(s.queue().is_empty());
}

#[test]
fn too_many_errors_end_the_session() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\nmax_errors = 3\n");
    let mut c = s.client();
    for _ in 0..3 {
        assert!(c.cmd("BOGUS").starts_with("500"));
    }
    // The fourth error still gets its own reply, then the 421.
    assert!(c.cmd("BOGUS").starts_with("500"));
    assert_eq!(c.reply(), "421 4.7.0 Too many errors, closing connection");
    assert!(c.is_closed());

    // A permanent refusal past the limit stays permanent: a client must
    // not retry a message that can never fit.
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        "[limits]\nmax_errors = 1\nmax_message_size = \"1K\"\n",
    );
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c.cmd("BOGUS").starts_with("500"));
    let r = c.send_mail(
        "a@b.test",
        &["alice@localhost"],
        &format!("{}\r\n", "x".repeat(70)).repeat(30),
    );
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert_eq!(c.reply(), "421 4.7.0 Too many errors, closing connection");
    assert!(c.is_closed());
    assert!(s.mail("alice").is_empty());
}

#[test]
fn over_long_command_line_gets_500_and_the_session_continues() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = s.client();
    let long = format!("NOOP {}", "x".repeat(600));
    assert_eq!(c.cmd(&long), "500 5.5.2 Line too long");
    assert!(c.cmd("NOOP").starts_with("250"));
    // Exactly 512 octets with the CRLF is allowed (RFC 5321 4.5.3.1.4).
    let max = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert!(c.cmd(&max).starts_with("250"));
    let huge = format!("NOOP {}", "x".repeat(100_000));
    assert_eq!(c.cmd(&huge), "500 5.5.2 Line too long");
    assert!(c.cmd("NOOP").starts_with("250"));
    // MAIL may be longer: its extensions' parameters raise the limit
    // (SIZE, BODY, SMTPUTF8, AUTH=, RFC 5321 4.5.3.1.4), up to 2048, as in Postfix.
    c.cmd("EHLO client.test");
    let sender = format!("{}@{}.test", "s".repeat(60), "d".repeat(60));
    let params = format!(" SIZE=12345 BODY=8BITMIME AUTH={}@b.test", "a".repeat(400));
    let mail = format!("MAIL FROM:<{sender}>{params}");
    assert!(mail.len() > 510, "{}", mail.len());
    let r = c.cmd(&mail);
    assert!(!r.starts_with("500"), "{r}");
    let over = format!("MAIL FROM:<a@b.test> AUTH={}@b.test", "a".repeat(2100));
    assert_eq!(c.cmd(&over), "500 5.5.2 Line too long");
}

#[test]
fn bare_lf_or_cr_in_a_command_is_refused_and_closes() {
    for bad in [
        &b"NOOP\nMAIL FROM:<a@b.test>\r\n"[..],
        b"NOOP\rMAIL FROM:<a@b.test>\r\n",
    ] {
        let dir = TempDir::new();
        let s = Server::start(&dir, LOCAL);
        let mut c = s.client();
        c.cmd("EHLO client.test");
        c.send(bad);
        assert!(c.reply().starts_with("500 5.5.2"));
        assert!(
            c.is_closed(),
            "the MAIL after the bare line ending must never run"
        );
    }
}

#[test]
fn bare_lf_after_an_over_long_line_is_refused_however_it_is_split() {
    // Regression: in the discard mode of an over-long line, a bare LF used to
    // end the line when it arrived in a later read, and the next command ran.
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.send(&[b'A'; 600]);
    std::thread::sleep(std::time::Duration::from_millis(100));
    c.send(b"\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@localhost>\r\n");
    assert!(c.reply().starts_with("500 5.5.2 Bare CR or LF"));
    assert!(c.is_closed(), "the MAIL after the bare LF must never run");
}

#[test]
fn quotes_that_change_nothing_are_dropped_and_others_still_refused() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail(
            "a@b.test",
            &["\"alice\"@localhost"],
            "Subject: q\r\n\r\nhi\r\n"
        )
        .starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<\"alice@example.com\"@localhost>");
    assert!(r.starts_with("5"), "{r}");
}
