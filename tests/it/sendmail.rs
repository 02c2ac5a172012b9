//! The client side of local submission: `postling sendmail` and the binary
//! invoked as `sendmail`, fed from stdin as cron and mail(1) do, talking to
//! the real daemon over `data_dir/submit.sock`. (Which envelope sender the
//! daemon allows each Unix user is tested in `submit.rs`.)

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use crate::util::{bin, split_message, wait_for, Server, TempDir};

/// The server's config, with its data_dir written in, so the client finds
/// the socket from the same file (`-C dir/postling.toml`).
pub fn config(dir: &TempDir) -> String {
    format!(
        "data_dir = {:?}\n[local]\ndomains = [\"pi.test\", \"localhost\"]\n",
        dir.path().join("data")
    )
}

/// Runs `argv0 [sendmail] -C <dir>/postling.toml ARGS` with `input` on stdin.
fn run(dir: &Path, as_sendmail: bool, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(bin());
    if as_sendmail {
        cmd.arg0("sendmail");
    } else {
        cmd.arg("sendmail");
    }
    cmd.arg("-C")
        .arg(dir.join("postling.toml"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run sendmail");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // The client may stop reading early (a "." line, an error): ignore EPIPE.
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for sendmail");
    let _ = writer.join();
    out
}

pub fn sendmail(s: &TempDir, args: &[&str], input: &[u8]) -> Output {
    run(s.path(), false, args, input)
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `n` messages in `user`'s Maildir and returns them.
pub fn mail(s: &Server, user: &str, n: usize) -> Vec<Vec<u8>> {
    assert!(
        wait_for(Duration::from_secs(10), || s.mail(user).len() >= n),
        "no mail for {user}; log:\n{}",
        s.log()
    );
    s.mail(user)
}

fn assert_crlf(msg: &[u8]) {
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
}

#[test]
fn printf_to_root_is_delivered_with_crlf_and_added_headers() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let out = sendmail(&dir, &["root"], b"Subject: x\n\nhello\n");
    ok(&out);
    let msgs = mail(&s, "root", 1);
    assert_eq!(msgs.len(), 1);
    assert_crlf(&msgs[0]);
    let (header, body) = split_message(&msgs[0]);
    assert_eq!(body, b"hello\r\n");
    assert!(header.contains("\r\nSubject: x\r\n"), "{header}");
    assert!(header.contains("\r\nFrom: <root@pi.test>\r\n"), "{header}");
    assert!(header.contains("\r\nDate: "), "{header}");
    assert!(header.contains("\r\nMessage-ID: <"), "{header}");
}

#[test]
fn a_message_without_header_is_body_only() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    // As `sendmail` (argv[0]), with a comma list and -F.
    let out = run(
        dir.path(),
        true,
        &["-F", "Backup Job", "root,alice"],
        b"hello\r\nworld",
    );
    ok(&out);
    for user in ["root", "alice"] {
        let msgs = mail(&s, user, 1);
        let (header, body) = split_message(&msgs[0]);
        assert_eq!(body, b"hello\r\nworld\r\n");
        assert!(
            header.contains("From: Backup Job <root@pi.test>"),
            "{header}"
        );
    }
}

const CRON: &str = "From: root (Cron Daemon)\n\
To: root\n\
Cc: Alice <alice@pi.test>,\n  \"Carol, C.\" <carol@pi.test>\n\
Bcc: bob\n\
Subject: Cron <root@pi> run-parts /etc/cron.daily\n\
Content-Type: text/plain; charset=UTF-8\n\
X-Cron-Env: <SHELL=/bin/sh>\n\
\n\
output line\n\
.\n\
.after dot\n";

#[test]
fn t_i_like_cron_reaches_every_recipient_without_bcc() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let out = run(dir.path(), true, &["-t", "-i"], CRON.as_bytes());
    ok(&out);
    for user in ["root", "alice", "carol", "bob"] {
        let msgs = mail(&s, user, 1);
        assert_eq!(msgs.len(), 1, "{user}");
        assert_crlf(&msgs[0]);
        let (header, body) = split_message(&msgs[0]);
        assert!(!header.to_ascii_lowercase().contains("bcc"), "{header}");
        assert!(
            header.contains("\r\nFrom: root (Cron Daemon)\r\n"),
            "{header}"
        );
        assert_eq!(header.matches("\r\nFrom:").count(), 1, "{header}");
        assert!(
            header.contains("Cc: Alice <alice@pi.test>,\r\n  \"Carol, C.\""),
            "{header}"
        );
        // -i: the "." line is message text, and so is what follows it.
        assert_eq!(body, b"output line\r\n.\r\n.after dot\r\n");
    }
}

#[test]
fn t_on_a_resent_message_uses_the_resent_recipients_and_hides_resent_bcc() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    ok(&sendmail(
        &dir,
        &["-t"],
        b"Resent-To: frank@localhost\nResent-From: root@localhost\nResent-Bcc: grace@localhost\nTo: alice@localhost\nSubject: resent\n\nbody\n",
    ));
    for user in ["frank", "grace"] {
        let (header, _) = split_message(&mail(&s, user, 1)[0]);
        assert!(!header.contains("Resent-Bcc"), "{user}: {header}");
        assert!(
            header.contains("\r\nResent-To: frank@localhost\r\n"),
            "{header}"
        );
    }
    assert!(
        s.mail("alice").is_empty(),
        "the original recipient is not sent it again"
    );
}

#[test]
fn without_i_a_dot_line_ends_the_message() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let out = sendmail(&dir, &["-t"], CRON.as_bytes());
    ok(&out);
    let msgs = mail(&s, "root", 1);
    let (_, body) = split_message(&msgs[0]);
    assert_eq!(body, b"output line\r\n");
}

#[test]
fn a_remote_recipient_is_queued_and_listed_by_bp() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let out = sendmail(
        &dir,
        &["-oi", "-oem", "-f", "root", "friend@example.org"],
        b"Subject: away\n\nhi\n",
    );
    ok(&out);
    assert!(
        wait_for(Duration::from_secs(10), || s.queue().len() == 1),
        "queue: {:?}",
        s.queue()
    );
    let (id, envelope) = &s.queue()[0];
    assert!(envelope.contains("friend@example.org"), "{envelope}");
    let out = sendmail(&dir, &["-bp"], b"");
    ok(&out);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(id.as_str()), "{listing}");
    assert!(listing.contains("friend@example.org"), "{listing}");
    // -q: the daemon is asked (over the control socket) to retry now.
    let out = sendmail(&dir, &["-q"], b"");
    ok(&out);
    assert!(
        wait_for(Duration::from_secs(10), || s
            .log()
            .contains("control: flush all")),
        "{}",
        s.log()
    );
}

#[test]
fn bs_speaks_smtp_on_stdin_and_stdout() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    // Bare LF line ends, as a person or a script at a pipe would type them.
    let script = "EHLO me\nMAIL FROM:<root@pi.test>\nRCPT TO:<root@pi.test>\nDATA\nSubject: bs\n\nvia -bs\n.\nQUIT\n";
    let out = sendmail(&dir, &["-bs"], script.as_bytes());
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "354", "250", "221"],
        "{stdout}"
    );
    let msgs = mail(&s, "root", 1);
    let (_, body) = split_message(&msgs[0]);
    assert_eq!(body, b"via -bs\r\n");
}

#[test]
fn a_large_message_is_streamed_whole() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let line = format!("{}\n", "x".repeat(99));
    let body = line.repeat(50_000); // 5 MB
    let input = format!("Subject: big\n\n{body}");
    let out = sendmail(&dir, &["-i", "root"], input.as_bytes());
    ok(&out);
    let msgs = mail(&s, "root", 1);
    let (_, stored) = split_message(&msgs[0]);
    assert_eq!(stored.len(), 50_000 * 101);
}

#[test]
fn sendmail_and_mailq_never_open_the_daemons_own_files() {
    // The TLS key, the users file and the smarthost password are the
    // daemon's user's alone (chmod 600); sendmail runs as whoever calls it
    // (a user's crontab, www-data). Here the client's config names files
    // that do not exist at all: it must not care. Nor about an aliases
    // file being edited into a state the daemon would refuse at reload
    // (here a duplicate name): only the daemon reads it.
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let secrets = dir.path().join("secret");
    let aliases = dir.path().join("aliases");
    std::fs::write(&aliases, "www: root\nWWW: root\n").expect("aliases");
    let client = format!(
        "{}aliases = {aliases:?}\n[tls]\ncert = {:?}\nkey = {:?}\n[auth]\nusers_file = {:?}\n",
        config(&dir),
        secrets.join("cert.pem"),
        secrets.join("key.pem"),
        secrets.join("users"),
    );
    std::fs::write(dir.path().join("postling.toml"), client).expect("client config");
    ok(&sendmail(&dir, &["root"], b"Subject: cron\n\nout\n"));
    assert_eq!(mail(&s, "root", 1).len(), 1);
    ok(&sendmail(&dir, &["-bp"], b""));
}

#[test]
fn long_lines_are_broken_and_doubled_carriage_returns_end_one_line() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    // One-line HTML or JSON from a script: delivered, broken with CRLF SP
    // as Postfix does, rather than refused.
    let subject = "s".repeat(3000);
    let body = "x".repeat(5000);
    ok(&sendmail(
        &dir,
        &["root"],
        format!("Subject: {subject}\n\n{body}\n").as_bytes(),
    ));
    let msg = &mail(&s, "root", 1)[0];
    assert_crlf(msg);
    assert!(msg.split(|&b| b == b'\n').all(|l| l.len() <= 1000));
    let text = String::from_utf8_lossy(msg).replace("\r\n ", "");
    assert!(text.contains(&format!("\r\nSubject: {subject}\r\n")));
    assert!(text.ends_with(&format!("\r\n\r\n{body}\r\n")));
    // LF turned into CRLF twice (PHP mail()): the header stays whole.
    ok(&sendmail(
        &dir,
        &["-t"],
        b"To: root@localhost\r\r\nSubject: crcr\r\r\nContent-Type: text/html\r\r\n\r\r\n<b>hi</b>\r\r\n",
    ));
    let msgs = mail(&s, "root", 2);
    let crcr = msgs
        .iter()
        .map(|m| split_message(m))
        .find(|(h, _)| h.contains("Subject: crcr"))
        .expect("the Subject stayed in the header");
    assert!(
        crcr.0.contains("\r\nContent-Type: text/html\r\n"),
        "{}",
        crcr.0
    );
    assert_eq!(crcr.1, b"<b>hi</b>\r\n");
    // A body-only message whose one line is longer than the header
    // section may be: body from its first byte, not "header too long".
    // Compact JSON too: `{"log"` is no field name.
    let lines = [
        format!("The log follows {}", "a".repeat(1_100_000)),
        format!("{{\"log\":\"{}\"}}", "b".repeat(1_100_000)),
    ];
    for (n, line) in lines.iter().enumerate() {
        ok(&sendmail(&dir, &["root"], format!("{line}\n").as_bytes()));
        let msgs = mail(&s, "root", 3 + n);
        let big = msgs
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(&line[..20]))
            .expect("the long one");
        let (_, body) = split_message(big);
        let body = String::from_utf8_lossy(&body).replace("\r\n ", "");
        assert_eq!(&body, &format!("{line}\r\n"));
    }
}

#[test]
fn a_non_ascii_recipient_is_sent_with_smtputf8() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    ok(&sendmail(
        &dir,
        &["r@bücher.example"],
        "Subject: Bücher\n\nhi\n".as_bytes(),
    ));
    assert!(
        wait_for(Duration::from_secs(10), || s.queue().len() == 1),
        "{}",
        s.log()
    );
    let (_, envelope) = &s.queue()[0];
    assert!(
        envelope.contains("rcpt pending r@b%C3%BCcher.example"),
        "{envelope}"
    );
}

#[test]
fn a_job_that_writes_slowly_is_not_cut_off_by_the_data_timeout() {
    // cron starts sendmail at a job's first output and streams the rest as
    // it comes: a long job with little output must still be mailed whole.
    let dir = TempDir::new();
    let config = format!("{}[limits]\ndata_timeout = \"1s\"\n", config(&dir));
    let s = Server::start(&dir, &config);
    let mut child = Command::new(bin())
        .arg("sendmail")
        .arg("-C")
        .arg(dir.path().join("postling.toml"))
        .arg("root")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sendmail");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"Subject: nightly\n\nstep 1 done\n")
        .expect("write");
    // Three times the daemon's DATA timeout without a byte.
    thread::sleep(Duration::from_secs(3));
    stdin.write_all(b"step 2 done\n").expect("write");
    drop(stdin);
    ok(&child.wait_with_output().expect("wait"));
    let (_, body) = split_message(&mail(&s, "root", 1)[0]);
    assert_eq!(body, b"step 1 done\r\nstep 2 done\r\n");
}

#[test]
fn recipients_over_max_recipients_get_the_message_in_a_second_transaction() {
    let dir = TempDir::new();
    let users: Vec<String> = (0..130).map(|i| format!("u{i}")).collect();
    // Only these have mailboxes: the unknown ones after them get 550s,
    // more than max_errors of them, which must not cut the message off.
    let config = config(&dir).replace("[local]\n", &format!("[local]\nusers = {users:?}\n"));
    let s = Server::start(&dir, &config);
    let unknown: Vec<String> = (0..15).map(|i| format!("x{i}")).collect();
    let args: Vec<&str> = users.iter().chain(&unknown).map(String::as_str).collect();
    let out = sendmail(&dir, &args, b"Subject: everyone\n\nhi\n");
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("sendmail: x").count(), 15, "{stderr}");
    for u in &users {
        assert_eq!(mail(&s, u, 1).len(), 1, "{u}");
    }
}

#[test]
fn an_unusable_tmpdir_falls_back_to_tmp() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    for tmpdir in ["/nonexistent-postling-tmpdir", ""] {
        let out = Command::new(bin())
            .arg("sendmail")
            .arg("-C")
            .arg(dir.path().join("postling.toml"))
            .arg("root")
            .env("TMPDIR", tmpdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"Subject: t\n\nhi\n")?;
                child.wait_with_output()
            })
            .expect("run sendmail");
        ok(&out);
    }
    assert_eq!(mail(&s, "root", 2).len(), 2);
}

#[test]
fn daemon_not_running_is_tempfail() {
    let dir = TempDir::new();
    let config = config(&dir).replace("[local]\n", "[local]\nsendmail_wait = 0\n");
    std::fs::write(dir.path().join("postling.toml"), config).expect("config");
    let out = sendmail(&dir, &["root"], b"Subject: x\n\nhello\n");
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sendmail: postling is not running (no ")
            && stderr.contains("submit.sock); message not sent"),
        "{stderr}"
    );
}

#[test]
fn sendmail_waits_for_a_daemon_that_is_starting() {
    // cron at boot, or during a restart: the daemon comes up after
    // sendmail was called, and the mail still gets through.
    let dir = TempDir::new();
    std::fs::write(dir.path().join("postling.toml"), config(&dir)).expect("config");
    let early = {
        let dir = dir.path().to_path_buf();
        thread::spawn(move || run(&dir, true, &["root"], b"Subject: early\n\nhello\n"))
    };
    thread::sleep(Duration::from_millis(1500));
    let s = Server::start(&dir, &config(&dir));
    let out = early.join().expect("sendmail thread");
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("postling is not running") && stderr.contains("; trying again for "),
        "{stderr}"
    );
    let (header, _) = split_message(&mail(&s, "root", 1)[0]);
    assert!(header.contains("Subject: early"), "{header}");
}

#[test]
fn a_failure_after_the_message_was_sent_is_not_retried() {
    // A daemon that takes the message, then answers 451 (as postling does
    // when a later copy fails after earlier ones were stored): sendmail
    // must not send it again, which could deliver it twice.
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new();
    std::fs::write(dir.path().join("postling.toml"), config(&dir)).expect("config");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let listener =
        std::os::unix::net::UnixListener::bind(data.join("submit.sock")).expect("socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = std::sync::Arc::clone(&done);
    let daemon = thread::spawn(move || {
        let mut messages = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline
            && !finished.load(std::sync::atomic::Ordering::SeqCst)
        {
            let Ok((stream, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(20));
                continue;
            };
            stream.set_nonblocking(false).expect("blocking");
            let mut out = stream.try_clone().expect("clone");
            let mut input = BufReader::new(stream);
            out.write_all(b"220 fake\r\n").expect("greet");
            let mut in_data = false;
            let mut line = String::new();
            while input.read_line(&mut line).unwrap_or(0) > 0 {
                let reply: &[u8] = match line.trim_end() {
                    "." if in_data => {
                        messages += 1;
                        in_data = false;
                        b"451 4.3.0 Local error in processing, try again later\r\n"
                    }
                    _ if in_data => b"",
                    "DATA" => {
                        in_data = true;
                        b"354 go\r\n"
                    }
                    "QUIT" => b"221 bye\r\n",
                    _ => b"250 ok\r\n",
                };
                let _ = out.write_all(reply);
                line.clear();
            }
        }
        messages
    });
    let out = sendmail(&dir, &["root"], b"Subject: once\n\nhi\n");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("trying again"));
    assert_eq!(daemon.join().expect("fake daemon"), 1);
}

#[test]
fn tcp_clients_cannot_take_the_slots_of_local_submissions() {
    let dir = TempDir::new();
    let config = config(&dir).replace(
        "[local]\n",
        "[limits]\nmax_connections = 2\nmax_connections_per_ip = 2\n\
         max_messages_per_minute_per_ip = 1\n[local]\nsendmail_wait = 0\n",
    );
    let s = Server::start(&dir, &config);
    // Any local process, or two LAN clients, holding every TCP slot.
    let held = [s.client(), s.client()];
    let third = crate::util::Client::connect(s.addr);
    assert!(
        third.greeting.starts_with("421 4.3.2"),
        "{}",
        third.greeting
    );
    // Local submissions are counted apart, and not rate-limited: three in
    // a row all arrive (the rate limit would have refused the second).
    for n in 0..3 {
        ok(&sendmail(
            &dir,
            &["root"],
            format!("Subject: n{n}\n\nhi\n").as_bytes(),
        ));
    }
    assert_eq!(mail(&s, "root", 3).len(), 3);
    // Local slots are capped too, per Unix user: a third session of ours
    // is told so, with the connection-limit reply.
    let sock = s.data.join("submit.sock");
    let greet = |c: &std::os::unix::net::UnixStream| {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut line).expect("greeting");
        line
    };
    let ours: Vec<_> = (0..2)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("local session"))
        .collect();
    for c in &ours {
        assert!(greet(c).starts_with("220"));
    }
    let third = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    assert!(greet(&third).starts_with("421 4.3.2"));
    drop(held);
}

#[test]
fn usage_errors_exit_64() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("postling.toml"), config(&dir)).expect("config");
    let out = sendmail(&dir, &["-y", "root"], b"");
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "sendmail: unknown option -y\n"
    );
    // newaliases' flags: nothing to rebuild, and no failure for the
    // package scripts that call it after editing /etc/aliases.
    for flag in ["-bi", "-I"] {
        let out = sendmail(&dir, &[flag], b"");
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to rebuild"));
    }
    let out = run(dir.path(), true, &["-i"], b"Subject: x\n\nhi\n");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recipients"));
    // -t with no recipient header either.
    let out = sendmail(&dir, &["-t"], b"Subject: x\n\nhi\n");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn refused_recipients_are_reported_and_none_accepted_is_nouser() {
    let dir = TempDir::new();
    let config = format!("{}users = [\"root\"]\n", config(&dir));
    let s = Server::start(&dir, &config);
    let out = sendmail(&dir, &["nobody-here", "root"], b"Subject: x\n\nhi\n");
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sendmail: nobody-here@pi.test: 5"),
        "{stderr}"
    );
    assert_eq!(mail(&s, "root", 1).len(), 1);
    let out = sendmail(&dir, &["nobody-here"], b"Subject: x\n\nhi\n");
    assert_eq!(out.status.code(), Some(67), "{out:?}");
}

#[test]
fn a_message_over_the_size_limit_is_a_data_error_and_nothing_is_sent() {
    let dir = TempDir::new();
    let config = format!("{}[limits]\nmax_message_size = \"1K\"\n", config(&dir));
    let s = Server::start(&dir, &config);
    let line = format!("{}\n", "x".repeat(70));
    // Refused before the daemon is asked (and before the temporary file
    // holds more than the limit).
    for lines in [20, 1000] {
        let input = format!("Subject: big\n\n{}", line.repeat(lines));
        let out = sendmail(&dir, &["root"], input.as_bytes());
        assert_eq!(out.status.code(), Some(65), "{lines}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("max_message_size"), "{stderr}");
    }
    // Dots added for transparency do not count: a message of dot lines
    // just under the limit goes.
    let dots = ".\n".repeat(200);
    ok(&sendmail(
        &dir,
        &["-i", "root"],
        format!("Subject: dots\n\n{dots}").as_bytes(),
    ));
    ok(&sendmail(&dir, &["root"], b"Subject: small\n\nhi\n"));
    assert_eq!(mail(&s, "root", 2).len(), 2);
}

#[test]
fn an_endless_header_is_a_data_error() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("postling.toml"), config(&dir)).expect("config");
    let input = b"X-Filler: some header text here\n".repeat(40_000); // 1.3 MB
    let out = sendmail(&dir, &["root"], &input);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "sendmail: header too long\n"
    );
}

#[test]
fn the_envelope_sender_is_the_unix_user_unless_trusted() {
    let dir = TempDir::new();
    let s = Server::start(&dir, &config(&dir));
    let message = b"Subject: who\n\nhi\n";
    // root is trusted: -f is honoured.
    ok(&sendmail(
        &dir,
        &["-f", "backup@example.net", "alice"],
        message,
    ));
    // nobody is not: -f is ignored, the envelope sender is its own address.
    if !crate::util::others_can_reach(Path::new(bin())) || !crate::util::others_can_reach(&s.data) {
        eprintln!("skipped: this checkout is not reachable by the user nobody");
        return;
    }
    let mut cmd = Command::new(bin());
    cmd.args(["sendmail", "-C"])
        .arg(dir.path().join("postling.toml"))
        .args(["-f", "boss@example.net", "alice"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("sendmail as nobody");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message)
        .expect("write");
    ok(&child.wait_with_output().expect("wait"));
    assert!(wait_for(Duration::from_secs(5), || s.mail("alice").len() == 2));
    let senders: Vec<String> = s
        .mail("alice")
        .iter()
        .map(|m| split_message(m).0.lines().next().unwrap_or("").to_string())
        .collect();
    assert!(
        senders.contains(&"Return-Path: <backup@example.net>".to_string()),
        "{senders:?}"
    );
    assert!(
        senders.contains(&"Return-Path: <nobody@pi.test>".to_string()),
        "{senders:?}"
    );
    // The From: sendmail adds names the sender the daemon really used.
    for m in s.mail("alice") {
        let (header, _) = split_message(&m);
        let want = if header.starts_with("Return-Path: <nobody@") {
            "\r\nFrom: <nobody@pi.test>\r\n"
        } else {
            "\r\nFrom: <backup@example.net>\r\n"
        };
        assert!(header.contains(want), "{header}");
        assert!(!header.contains("boss@"), "{header}");
    }
}
