//! End to end with a real SMTP client library (lettre): what lands in the
//! Maildir and the queue.

use std::fs;

use lettre::message::Mailbox;
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};

use crate::util::{read_new, split_message, Server, TempDir};

/// `[local]` for `localhost` with `user`'s Maildir at `dir`.
fn mailbox_at(user: &str, dir: &std::path::Path) -> String {
    format!(
        "[local]\ndomains = [\"localhost\"]\nmailboxes = {{ {user} = \"{}\" }}\n",
        dir.display()
    )
}

fn transport(s: &Server) -> SmtpTransport {
    SmtpTransport::builder_dangerous(s.addr.ip().to_string())
        .port(s.addr.port())
        .hello_name(ClientId::Domain("client.test".into()))
        .build()
}

/// The envelope lists `addr` as not yet delivered (the relay thread may
/// already have tried it: tests' DNS always fails, so it is then deferred).
fn queued_for(envelope: &str, addr: &str) -> bool {
    envelope.contains(&format!("rcpt pending {addr}\n"))
        || envelope.contains(&format!("rcpt deferred {addr} "))
}

fn mailbox(addr: &str) -> Mailbox {
    addr.parse().expect("valid address")
}

#[test]
fn lettre_delivers_one_file_per_recipient_with_trace_headers() {
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        "hostname = \"pi.test\"\n[local]\ndomains = [\"localhost\", \"pi.test\"]\n",
    );
    let body = "Hello Alice,\r\n.a line that starts with a dot\r\n..and two\r\n.\r\nbye\r\n";
    let email = Message::builder()
        .from(mailbox("Cron <cron@pi.test>"))
        .to(mailbox("alice@pi.test"))
        .to(mailbox("bob@localhost"))
        .subject("backup done")
        .body(body.to_string())
        .expect("build message");
    let response = transport(&s).send(&email).expect("send");
    assert_eq!(response.code().to_string(), "250");

    for (user, addr) in [("alice", "alice@pi.test"), ("bob", "bob@localhost")] {
        let mail = s.mail(user);
        assert_eq!(mail.len(), 1, "{user} has one message");
        let (header, got_body) = split_message(&mail[0]);
        let lines: Vec<&str> = header.lines().collect();
        assert_eq!(lines[0], "Return-Path: <cron@pi.test>");
        assert_eq!(lines[1], format!("Delivered-To: {addr}"));
        assert!(
            lines[2].starts_with("Received: from client.test ([127.0.0.1])"),
            "{header}"
        );
        assert!(
            header.contains("\tby pi.test (postling session ")
                && header.contains(") with ESMTP id "),
            "{header}"
        );
        assert!(
            !header.contains("\tfor <"),
            "two recipients: no `for` clause"
        );
        assert!(header.contains("Subject: backup done"));
        // lettre sends the body as is (7bit) and then CRLF.CRLF, so the
        // stored body is ours plus that final CRLF, dots unstuffed.
        assert_eq!(
            String::from_utf8(got_body).expect("utf8"),
            format!("{body}\r\n")
        );
        let dir_new = s.data.join("mail").join(user);
        for sub in ["tmp", "new", "cur"] {
            assert!(dir_new.join(sub).is_dir(), "{user}/{sub}");
        }
        assert_eq!(fs::read_dir(dir_new.join("tmp")).expect("tmp").count(), 0);
    }
    assert!(s.queue().is_empty());
}

#[test]
fn remote_recipients_are_queued_durably() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "cron@localhost",
        &["someone@example.com", "alice@localhost"],
        "Subject: out\r\n\r\nhi\r\n",
    );
    assert!(r.starts_with("250 2.0.0 OK: queued as "), "{r}");
    let id = r.rsplit(' ').next().expect("id").to_string();
    let queue = s.queue();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0].0, id);
    assert!(
        queued_for(&queue[0].1, "someone@example.com"),
        "{}",
        queue[0].1
    );
    assert!(queue[0].1.contains("from cron@localhost"), "{}", queue[0].1);
    let message = s.queued_message(&id);
    assert!(
        !message.is_empty(),
        "queued message {id} is empty or missing"
    );
    let (header, body) = split_message(&message);
    assert!(header.starts_with("Received: from client.test"), "{header}");
    assert_eq!(body, b"hi\r\n");
    assert_eq!(s.mail("alice").len(), 1);
    // The relay thread picked it up and, with no usable DNS here, deferred it.
    let deferred = format!("id={id} to=<someone@example.com> relay=none");
    assert!(
        crate::util::wait_for(std::time::Duration::from_secs(10), || s
            .log()
            .contains(&deferred)),
        "{}",
        s.log()
    );
    assert!(crate::util::wait_for(
        std::time::Duration::from_secs(5),
        || {
            s.queue().first().is_some_and(|(_, env)| {
                env.contains("rcpt deferred someone@example.com ") && env.contains("attempts 1\n")
            })
        }
    ));
}

#[test]
fn aliases_expand_to_mailboxes_and_remote_addresses() {
    let dir = TempDir::new();
    let aliases = dir.path().join("aliases");
    fs::write(&aliases, "# system aliases\nroot: alice, bob@example.com\npostmaster: root\nstaff: alice,\n  carol\n").expect("aliases");
    let config = format!(
        "[local]\ndomains = [\"localhost\"]\nusers = [\"alice\", \"carol\"]\naliases = \"{}\"\n",
        aliases.display()
    );
    let s = Server::start(&dir, &config);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "smartd@localhost",
        &["root@localhost"],
        "Subject: disk\r\n\r\nSMART error\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    let mail = s.mail("alice");
    assert_eq!(mail.len(), 1);
    let (header, _) = split_message(&mail[0]);
    assert!(header.contains("Delivered-To: alice@localhost"), "{header}");
    assert!(header.contains("\tfor <root@localhost>"), "{header}");
    let queue = s.queue();
    assert_eq!(queue.len(), 1);
    assert!(queued_for(&queue[0].1, "bob@example.com"), "{}", queue[0].1);

    c.send_mail(
        "x@localhost",
        &["staff@localhost"],
        "Subject: staff\r\n\r\nhi\r\n",
    );
    assert_eq!(s.mail("alice").len(), 2);
    assert_eq!(s.mail("carol").len(), 1);
    // <Postmaster> is always accepted, here through the alias chain to alice.
    c.send_mail("x@localhost", &["Postmaster"], "Subject: pm\r\n\r\nhi\r\n");
    let mail = s.mail("alice");
    assert_eq!(mail.len(), 3);
    let pm = mail
        .iter()
        .find(|m| String::from_utf8_lossy(m).contains("Subject: pm"));
    let (header, _) = split_message(pm.expect("postmaster's mail"));
    // A whole address, the domain postmaster was resolved in.
    assert!(
        header.contains("Delivered-To: alice@localhost\r\n"),
        "{header}"
    );
    assert!(c.cmd("MAIL FROM:<x@localhost>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<dave@localhost>").starts_with("550 5.1.1"));
}

/// A target without a mailbox is skipped; the rest of the alias still gets
/// the mail, postmaster's included, as in Postfix.
#[test]
fn an_alias_target_without_a_mailbox_is_skipped_not_fatal_to_the_alias() {
    let dir = TempDir::new();
    let aliases = dir.path().join("aliases");
    fs::write(
        &aliases,
        "postmaster: root\nroot: alice, carl\nteam: carl, alice\nnobody: carl\n",
    )
    .expect("aliases");
    let config = format!(
        "[local]\ndomains = [\"localhost\"]\nusers = [\"alice\"]\naliases = \"{}\"\n",
        aliases.display()
    );
    let s = Server::start(&dir, &config);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    for to in ["team@localhost", "postmaster@localhost"] {
        let r = c.send_mail("x@localhost", &[to], "Subject: t\r\n\r\nhi\r\n");
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    assert_eq!(s.mail("alice").len(), 2);
    assert!(!s.data.join("mail").join("postmaster").exists());
    assert!(!s.data.join("mail").join("carl").exists());
    assert!(c.cmd("MAIL FROM:<x@localhost>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<nobody@localhost>").starts_with("550 5.1.1"));
    assert!(s
        .log()
        .contains("target \"carl\" has no mailbox here; skipped"));
}

#[test]
fn explicit_mailbox_paths_and_plus_detail() {
    let dir = TempDir::new();
    let home = dir.path().join("home-alice-Maildir");
    let config = mailbox_at("alice", &home);
    let s = Server::start(&dir, &config);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail(
            "x@localhost",
            &["alice+backups@localhost"],
            "Subject: a\r\n\r\nhi\r\n"
        )
        .starts_with("250"));
    assert_eq!(read_new(&home).len(), 1);
    assert!(s.mail("alice").is_empty());
}

#[test]
fn smtputf8_and_8bit_mail_is_delivered() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[local]\ndomains = [\"localhost\"]\n");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .cmd("MAIL FROM:<jürgen@bücher.example> SMTPUTF8 BODY=8BITMIME")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@localhost>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send("Subject: Grüße\r\n\r\nÄpfel\r\n".as_bytes());
    assert!(c.cmd(".").starts_with("250"));
    let mail = s.mail("alice");
    let text = String::from_utf8(mail[0].clone()).expect("utf8");
    assert!(text.starts_with("Return-Path: <jürgen@bücher.example>\r\n"));
    assert!(text.contains("with UTF8SMTP id"));
    assert!(text.ends_with("\r\n\r\nÄpfel\r\n"));
}

#[test]
fn a_failed_write_gets_451_and_leaves_no_partial_file() {
    let dir = TempDir::new();
    // alice's mailbox sits below a regular file: every write there fails
    // (ENOTDIR), as it would on a full or read-only disk.
    let blocker = dir.path().join("not-a-dir");
    fs::write(&blocker, "x").expect("blocker");
    let config = mailbox_at("alice", &blocker.join("Maildir"));
    let s = Server::start(&dir, &config);
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for to in ["bob@localhost", "alice@localhost", "x@example.com"] {
        assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
    }
    // The broken mailbox is found before the body is asked for.
    let r = c.cmd("DATA");
    assert!(r.starts_with("451 4.3.0"), "{r}");
    // Nothing was committed to the queue, and no spool is left behind.
    assert!(s.queue().is_empty());
    assert!(s.nothing_unfinished());
    // The session goes on, and mail that can be stored still is.
    assert!(c
        .send_mail("a@b.test", &["bob@localhost"], "Subject: g\r\n\r\nhi\r\n")
        .starts_with("250"));
    // The broken mailbox was found before any copy was written: bob has
    // only the acknowledged message, so the client's retry duplicates nothing.
    let bob = s.mail("bob");
    assert_eq!(bob.len(), 1);
    assert!(String::from_utf8_lossy(&bob[0]).contains("Subject: g"));
}

/// A tmpfs of 64 KiB mounted at `at` for one test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// None when this process may not mount (not root).
    fn mount(at: &std::path::Path) -> Option<SmallDisk> {
        fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "postling-test"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_mailbox_that_fills_up_leaves_no_copy_in_the_others() {
    let dir = TempDir::new();
    let Some(disk) = SmallDisk::mount(&dir.path().join("small")) else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let bob = disk.0.join("bob");
    let config = mailbox_at("bob", &bob);
    let s = Server::start(&dir, &config);
    // bob's mailbox exists and may be written to, but its disk is full:
    // only the write of bob's copy fails.
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail(
            "a@b.test",
            &["bob@localhost"],
            "Subject: first\r\n\r\nhi\r\n"
        )
        .starts_with("250"));
    let filler = disk.0.join("filler");
    let mut f = fs::File::create(&filler).expect("filler");
    while std::io::Write::write_all(&mut f, &[b'x'; 4096]).is_ok() {}
    drop(f);
    let body = format!(
        "Subject: full\r\n\r\n{}",
        ("y".repeat(78) + "\r\n").repeat(100)
    );
    let local = ["alice@localhost", "bob@localhost"];
    let with_remote = ["alice@localhost", "bob@localhost", "x@example.com"];
    for to in [&local[..], &with_remote[..]] {
        for _ in 0..2 {
            let r = c.send_mail("a@b.test", to, &body);
            assert!(r.starts_with("451 4.3.0"), "{to:?}: {r}");
        }
        // No client retry left a copy anywhere, nor a queue entry.
        assert!(s.mail("alice").is_empty(), "{to:?}");
        assert_eq!(read_new(&bob).len(), 1, "{to:?}");
        assert!(s.queue().is_empty());
        assert!(s.nothing_unfinished());
        assert_eq!(fs::read_dir(bob.join("tmp")).expect("tmp").count(), 0);
    }
    // With room again, the retry delivers once to each.
    fs::remove_file(&filler).expect("free the disk");
    assert!(c
        .send_mail("a@b.test", &with_remote, &body)
        .starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
    assert_eq!(read_new(&bob).len(), 2);
    assert_eq!(s.queue().len(), 1);
    drop(s);
}

#[test]
fn a_mailbox_it_may_not_write_to_is_found_before_any_copy_is_written() {
    // Running as nobody (the systemd unit's kind of user), with bob's new/
    // made read-only: without the check, alice got a copy at each of the
    // client's retries.
    let root = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    let dir = TempDir::new();
    if !root || !crate::util::others_can_reach(dir.path()) {
        eprintln!("skipped: needs root, and a scratch directory others can reach");
        return;
    }
    let data = dir.path().join("data");
    for d in [
        "",
        "mail",
        "mail/bob",
        "mail/bob/tmp",
        "mail/bob/new",
        "mail/bob/cur",
    ] {
        let path = data.join(d);
        fs::create_dir_all(&path).expect("mkdir");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown");
    }
    let mut perms = fs::metadata(data.join("mail/bob/new"))
        .expect("meta")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o500);
    fs::set_permissions(data.join("mail/bob/new"), perms).expect("chmod");
    let s = Server::start(
        &dir,
        "user = \"nobody\"\n[local]\ndomains = [\"localhost\"]\n",
    );
    for _ in 0..3 {
        let mut c = s.client();
        c.cmd("EHLO client.test");
        assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
        for to in ["alice@localhost", "bob@localhost"] {
            assert!(c.cmd(&format!("RCPT TO:<{to}>")).starts_with("250"));
        }
        let r = c.cmd("DATA");
        assert!(r.starts_with("451 4.3.0"), "{r}");
    }
    assert!(s.mail("alice").is_empty(), "a copy per retry");
    assert!(s.log().contains("Permission denied"), "{}", s.log());
    // One recipient alone: no duplicate is possible, and the mail is taken.
    let mut c = s.client();
    c.cmd("EHLO client.test");
    assert!(c
        .send_mail("a@b.test", &["alice@localhost"], "Subject: a\r\n\r\nhi\r\n")
        .starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
}

#[test]
fn maildirs_can_be_shared_with_a_group_for_an_imap_server() {
    use std::os::unix::fs::MetadataExt;
    // As root any group will do; otherwise one of our own.
    let egid = nix::unistd::getegid().as_raw();
    let gid = if nix::unistd::geteuid().is_root() {
        1
    } else {
        egid
    };
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        &format!("[local]\ndomains = [\"localhost\"]\nmode = \"0640\"\ngroup = \"{gid}\"\n"),
    );
    let mut c = s.client();
    c.cmd("EHLO client.test");
    for to in [
        &["alice@localhost"][..],
        &["alice@localhost", "bob@localhost"],
    ] {
        assert!(c
            .send_mail("a@b.test", to, "Subject: shared\r\n\r\nhi\r\n")
            .starts_with("250"));
    }
    let mail = s.data.join("mail");
    for d in [
        mail.clone(),
        mail.join("alice"),
        mail.join("bob/new"),
        mail.join("alice/cur"),
    ] {
        let m = fs::metadata(&d).expect("dir");
        assert_eq!(
            (m.mode() & 0o7777, m.gid()),
            (0o750, gid),
            "{}",
            d.display()
        );
    }
    for user in ["alice", "bob"] {
        for f in fs::read_dir(mail.join(user).join("new")).expect("new") {
            let m = f.expect("entry").metadata().expect("meta");
            assert_eq!((m.mode() & 0o7777, m.gid()), (0o640, gid), "{user}");
        }
    }
    assert_eq!(s.mail("alice").len(), 2);
    // The queue stays the daemon's alone.
    let queue = fs::metadata(s.data.join("queue")).expect("queue");
    assert_eq!(queue.mode() & 0o777, 0o700);

    // A group the server's user is not in is refused at start, not at
    // every delivery.
    if nix::unistd::geteuid().is_root() {
        let dir = TempDir::new();
        let config = dir.path().join("postling.toml");
        fs::write(&config, "user = \"nobody\"\n[local]\ngroup = \"1\"\n").expect("config");
        let out = std::process::Command::new(crate::util::bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("local.group"), "{stderr}");
    }
}

#[test]
fn local_mail_is_written_straight_into_the_maildir_and_a_dropped_one_is_removed() {
    let dir = TempDir::new();
    let aliases = dir.path().join("aliases");
    fs::write(&aliases, "both: alice, bob\n").expect("aliases");
    let s = Server::start(
        &dir,
        &format!(
            "[local]\ndomains = [\"localhost\"]\naliases = \"{}\"\n",
            aliases.display()
        ),
    );
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    assert!(c.cmd("RCPT TO:<both@localhost>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: half\r\n\r\nthe first half");
    // While the body arrives it sits in the first mailbox's tmp/, with no
    // spool file beside it.
    let tmp = s.data.join("mail/alice/tmp");
    assert!(crate::util::wait_for(
        std::time::Duration::from_secs(5),
        || fs::read_dir(&tmp).map_or(0, |d| d.count()) == 1
    ));
    assert_eq!(s.unfinished(), 1, "only the Maildir draft exists");
    // The client goes away: the draft is removed, nothing is delivered.
    drop(c);
    assert!(s.nothing_unfinished());
    assert!(s.mail("alice").is_empty() && s.mail("bob").is_empty());

    // A finished one reaches both mailboxes, each with its own header.
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "a@b.test",
        &["both@localhost"],
        "Subject: whole\r\n\r\nall\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    for user in ["alice", "bob"] {
        let mail = s.mail(user);
        assert_eq!(mail.len(), 1, "{user}");
        let text = String::from_utf8_lossy(&mail[0]).into_owned();
        assert!(
            text.starts_with(&format!(
                "Return-Path: <a@b.test>\r\nDelivered-To: {user}@localhost\r\nReceived: from client.test"
            )),
            "{text}"
        );
        assert!(text.ends_with("Subject: whole\r\n\r\nall\r\n"), "{text}");
    }
    assert_eq!(s.unfinished(), 0);
    assert!(s.queue().is_empty());
}
