//! DATA over TCP: fake end-of-data sequences (SMTP smuggling), limits, loops.

use crate::util::{split_message, Server, TempDir};

const LOCAL: &str = "[local]\ndomains = [\"localhost\"]\nusers = [\"alice\", \"bob\"]\n";

fn ready(s: &Server) -> crate::util::Client {
    let mut c = s.client();
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    c
}

#[test]
fn fake_end_of_data_never_ends_data_or_starts_a_transaction() {
    let fakes: [&[u8]; 6] = [
        b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r",
    ];
    for fake in fakes {
        let dir = TempDir::new();
        let s = Server::start(&dir, LOCAL);
        let mut c = ready(&s);
        assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<alice@localhost>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let mut attack = b"Subject: hi\r\n\r\nfirst".to_vec();
        attack.extend_from_slice(fake);
        attack.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n");
        c.send(&attack);
        let r = c.reply();
        assert!(r.starts_with("550 5.6.0"), "{fake:?}: {r}");
        // The session is still in step: the next reply is for our NOOP.
        assert!(c.cmd("NOOP").starts_with("250"), "{fake:?}");
        assert!(s.mail("alice").is_empty(), "{fake:?}");
        assert!(
            s.mail("bob").is_empty(),
            "{fake:?}: smuggled message delivered"
        );
    }
}

#[test]
fn body_is_byte_identical_after_dot_unstuffing() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = ready(&s);
    // What a client sends after stuffing: every line starting with "." doubled.
    let wire = "Subject: dots\r\n\r\n..leading dot\r\n..\r\n...two\r\nend.\r\n\r\n";
    let r = c.send_mail("a@b.test", &["alice@localhost"], wire);
    assert!(r.starts_with("250 2.0.0 OK: queued as"), "{r}");
    let mail = s.mail("alice");
    let (_, body) = split_message(&mail[0]);
    assert_eq!(
        String::from_utf8(body).expect("utf8"),
        ".leading dot\r\n.\r\n..two\r\nend.\r\n\r\n"
    );
}

#[test]
fn over_size_message_gets_552_and_earlier_mail_is_kept() {
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        &format!("{LOCAL}[limits]\nmax_message_size = \"2K\"\n"),
    );
    let mut c = ready(&s);
    let small = "Subject: small\r\n\r\nok\r\n";
    assert!(c
        .send_mail("a@b.test", &["alice@localhost"], small)
        .starts_with("250"));
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789012345678901234567890123456789\r\n".repeat(100)
    );
    let r = c.send_mail("a@b.test", &["alice@localhost"], &big);
    assert!(r.starts_with("552 5.3.4"), "{r}");
    assert!(c.cmd("NOOP").starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
    assert!(s.nothing_unfinished(), "refused message left a file behind");
}

#[test]
fn data_that_would_continue_our_received_field_gets_550() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = ready(&s);
    let forged = "\tby trusted.example with ESMTPS id FORGED; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
                  Subject: hi\r\n\r\nbody\r\n";
    let r = c.send_mail("a@b.test", &["alice@localhost"], forged);
    assert!(r.starts_with("550 5.6.0"), "{r}");
    assert!(s.mail("alice").is_empty());
    assert!(s.nothing_unfinished());
    // The session goes on.
    assert!(c
        .send_mail(
            "a@b.test",
            &["alice@localhost"],
            "Subject: ok\r\n\r\nhi\r\n"
        )
        .starts_with("250"));
    let (header, _) = split_message(&s.mail("alice")[0]);
    assert!(!header.contains("FORGED"), "{header}");
}

#[test]
fn over_long_data_line_gets_550() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = ready(&s);
    let body = format!("Subject: long\r\n\r\n{}\r\n", "x".repeat(1200));
    let r = c.send_mail("a@b.test", &["alice@localhost"], &body);
    assert!(r.starts_with("550 5.6.0"), "{r}");
    let ok = format!("Subject: long\r\n\r\n{}\r\n", "x".repeat(998));
    assert!(c
        .send_mail("a@b.test", &["alice@localhost"], &ok)
        .starts_with("250"));
    // A 998-octet line that starts with a dot is 999 on the wire: the dot
    // added for transparency does not count (RFC 5321 4.5.3.1.6).
    let dotted = format!(".{}", "x".repeat(997));
    let stuffed = format!("Subject: dotted\r\n\r\n.{dotted}\r\n");
    let r = c.send_mail("a@b.test", &["alice@localhost"], &stuffed);
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(s.mail("alice").len(), 2);
    let found = s
        .mail("alice")
        .iter()
        .any(|m| String::from_utf8_lossy(m).contains(&format!("\r\n\r\n{dotted}\r\n")));
    assert!(found, "the dotted line arrives unstuffed and whole");
}

#[test]
fn more_than_50_received_headers_is_a_loop() {
    let dir = TempDir::new();
    let s = Server::start(&dir, LOCAL);
    let mut c = ready(&s);
    let hops = |n: usize| {
        let mut m = "Received: from a by b; Thu, 1 Jan 1970 00:00:00 +0000\r\n".repeat(n);
        m.push_str("Subject: loop\r\n\r\nbody\r\n");
        m
    };
    let r = c.send_mail("a@b.test", &["alice@localhost"], &hops(51));
    assert!(r.starts_with("554 5.4.6"), "{r}");
    let r = c.send_mail("a@b.test", &["alice@localhost"], &hops(50));
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(s.mail("alice").len(), 1);
}

#[test]
fn recipients_over_the_limit_get_452_and_the_rest_get_the_mail() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[local]\ndomains = [\"localhost\"]\n");
    let mut c = ready(&s);
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for i in 0..100 {
        assert!(c
            .cmd(&format!("RCPT TO:<user{i}@localhost>"))
            .starts_with("250 2.1.5"));
    }
    // Far more 452s than max_errors (10): they are not session errors, so
    // the 100 accepted recipients still get the mail.
    for i in 100..130 {
        let r = c.cmd(&format!("RCPT TO:<user{i}@localhost>"));
        assert!(r.starts_with("452 4.5.3"), "{r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: many\r\n\r\nhi\r\n");
    assert!(c.cmd(".").starts_with("250"));
    for i in 0..100 {
        assert_eq!(s.mail(&format!("user{i}")).len(), 1, "user{i}");
    }
    assert!(s.mail("user100").is_empty());
}
