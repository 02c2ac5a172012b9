//! Start-up, configuration errors, shutdown, and recovery of what a crash left.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::util::{bin, Server, TempDir};

fn run_with_config(config: &str) -> (i32, String) {
    let dir = TempDir::new();
    let path = dir.path().join("bad.toml");
    fs::write(&path, config).expect("write config");
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run postling");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_names_file_line_and_key_and_exits_78() {
    let cases = [
        (
            "hostname = \"a\"\n[limits]\nmax_message_size = \"25Q\"\n",
            "bad.toml:3: limits.max_message_size",
        ),
        (
            "[limits]\nmax_recipients = 10\n",
            "bad.toml:2: limits.max_recipients",
        ),
        ("\n\nbogus_key = 1\n", "bad.toml:3: bogus_key"),
        (
            "[relay]\nallow_from = [\"10.0.0.0/33\"]\n",
            "bad.toml:2: relay.allow_from",
        ),
    ];
    for (config, want) in cases {
        let (code, err) = run_with_config(config);
        assert_eq!(code, 78, "{config}: {err}");
        assert!(err.contains(want), "{config}: want {want:?} in {err:?}");
    }
    let out = Command::new(bin())
        .args(["serve", "--config", "/nonexistent/postling.toml"])
        .output()
        .expect("run postling");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/postling.toml"));
}

#[test]
fn version_and_usage() {
    let out = Command::new(bin()).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("postling "));
    let out = Command::new(bin()).arg("frobnicate").output().expect("run");
    assert!(!out.status.success());
    // Output that cannot be written (a full disk, a closed pipe) is not a
    // crash: the release build would abort on a panic.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    for arg in ["--help", "--version"] {
        let status = Command::new(bin())
            .arg(arg)
            .stdout(full.try_clone().expect("clone"))
            .status()
            .expect("run");
        assert!(status.success(), "{arg}: {status}");
    }
}

#[test]
fn sigterm_lets_the_open_transaction_finish_then_exits_0() {
    let dir = TempDir::new();
    // data_dir in the file too, for sendmail -C.
    let config = format!(
        "data_dir = {:?}\n[local]\nsendmail_wait = \"2s\"\n",
        dir.path().join("data")
    );
    let mut s = Server::start(&dir, &config);
    let mut idle = s.client();
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@localhost>");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let kill = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    // The idle session is told, the busy one may finish.
    assert_eq!(
        idle.reply(),
        "421 4.3.2 Service shutting down, try again later"
    );
    // New connections are refused once the listener is closed.
    assert!(crate::util::wait_for(Duration::from_secs(5), || {
        std::net::TcpStream::connect(s.addr).is_err()
    }));
    // The local submission socket too: sendmail hears at once that the
    // daemon is going, rather than waiting on a socket nobody answers,
    // and leaves its message in the maildrop.
    let mut sendmail = Command::new(crate::util::bin())
        .arg("sendmail")
        .arg("-C")
        .arg(dir.path().join("postling.toml"))
        .arg("root")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sendmail");
    {
        use std::io::Write as _;
        let mut stdin = sendmail.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"Subject: during shutdown\n\nhi\n");
    }
    let answered = crate::util::wait_for(Duration::from_secs(10), || {
        sendmail.try_wait().is_ok_and(|st| st.is_some())
    });
    if !answered {
        let _ = sendmail.kill();
    }
    let out = sendmail.wait_with_output().expect("sendmail output");
    assert!(answered, "sendmail hung during the shutdown grace");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        crate::util::read_dir_names(&dir.path().join("data/maildrop")).len(),
        1
    );
    c.send(b"second half\r\n");
    assert!(c.cmd(".").starts_with("250"));
    assert_eq!(
        c.reply(),
        "421 4.3.2 Service shutting down, try again later"
    );
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert_eq!(s.mail("alice").len(), 1);
    // The next start delivers what sendmail left.
    assert!(s.mail("root").is_empty());
    let s = Server::start(&dir, &config);
    assert!(crate::util::wait_for(Duration::from_secs(10), || s
        .mail("root")
        .len()
        == 1));
}

#[test]
fn startup_sweeps_half_written_spools_and_keeps_the_queue() {
    let dir = TempDir::new();
    let mut s = Server::start(&dir, "");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "a@localhost",
        &["x@example.com"],
        "Subject: q\r\n\r\nqueued\r\n",
    );
    assert!(r.starts_with("250"));
    s.kill();
    // What a crash mid-DATA leaves: an incoming entry that was never acknowledged.
    let half = s.data.join("incoming").join("0000000000000000HALF");
    fs::write(&half, "postling-envelope 1\nid 0000000000000000HALF\n").expect("write");
    let s2 = Server::start_at(dir.path(), "", "127.0.0.1:0");
    assert!(!half.exists(), "half-written spool survived start-up");
    assert_eq!(s2.queue().len(), 1);
    assert!(crate::util::wait_for(Duration::from_secs(5), || s2
        .log()
        .contains("queue: 1 message(s) waiting")));
}

#[test]
fn listens_on_ipv6_and_ipv4_at_once() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let dir = TempDir::new();
    let config = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"[::1]:0\"\n";
    let data = dir.path().join("data");
    fs::write(dir.path().join("v6.toml"), crate::util::isolated(config)).expect("config");
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.path().join("v6.toml"))
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let stderr = child.stderr.take().expect("stderr");
    let mut addrs = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.expect("log line");
        if let Some(rest) = line.split("listening addr=").nth(1) {
            addrs.push(
                rest.split_whitespace()
                    .next()
                    .expect("addr")
                    .parse::<std::net::SocketAddr>()
                    .expect("addr"),
            );
            if addrs.len() == 2 {
                break;
            }
        }
    }
    for addr in &addrs {
        let mut c = crate::util::Client::connect(*addr);
        c.cmd("EHLO v6.test");
        assert!(c
            .send_mail("a@b.test", &["alice@localhost"], "Subject: v\r\n\r\nhi\r\n")
            .starts_with("250"));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mail = crate::util::read_new(&data.join("mail").join("alice"));
    assert_eq!(mail.len(), 2);
    let text: Vec<String> = mail
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert!(text.iter().any(|t| t.contains("([IPv6:::1])")), "{text:?}");
    assert!(text.iter().any(|t| t.contains("([127.0.0.1])")), "{text:?}");
}

#[test]
fn a_second_instance_on_the_same_data_dir_refuses_and_sweeps_nothing() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@localhost>");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: in flight\r\n\r\nhalf");
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("run postling");
    assert_eq!(out.status.code(), Some(71));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another postling is already running"), "{err}");
    // The first instance's transaction is untouched.
    c.send(b" and the rest\r\n");
    assert!(c.cmd(".").starts_with("250"));
    assert_eq!(s.mail("alice").len(), 1);
}

#[test]
fn tells_systemd_it_is_ready_and_pings_the_watchdog() {
    let dir = TempDir::new();
    let path = dir.path().join("notify.sock");
    let sink = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    sink.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let s = crate::util::Server::start_env(
        &dir,
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("utf8 path")),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let n = sink.recv(&mut buf).expect("a notification within 10 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY=1 comes once the listener accepts.
    assert!(s.client().greeting.starts_with("220"));
}

fn sighup(s: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn sighup_picks_up_a_changed_aliases_file_and_rejects_a_broken_config() {
    let dir = TempDir::new();
    let aliases = dir.path().join("aliases");
    fs::write(&aliases, "root: alice\n").expect("aliases");
    let config = format!(
        "[local]\ndomains = [\"localhost\"]\naliases = \"{}\"\n",
        aliases.display()
    );
    let s = Server::start(&dir, &config);
    let mut open = s.client();
    open.cmd("EHLO client.test");
    let send = |c: &mut crate::util::Client| {
        assert!(c
            .send_mail(
                "cron@localhost",
                &["root@localhost"],
                "Subject: r\r\n\r\nhi\r\n"
            )
            .starts_with("250"));
    };
    send(&mut open);
    assert_eq!(s.mail("alice").len(), 1);

    fs::write(&aliases, "root: bob\n").expect("aliases");
    sighup(&s);
    assert!(crate::util::wait_for(Duration::from_secs(5), || s
        .log()
        .contains("SIGHUP: configuration reloaded")));
    let mut fresh = s.client();
    fresh.cmd("EHLO client.test");
    send(&mut fresh);
    assert_eq!(
        s.mail("bob").len(),
        1,
        "the new alias applies to new sessions"
    );

    // A broken config is rejected; the server keeps running the old one.
    fs::write(s_config(&dir), "[limits]\nmax_recipients = \"lots\"\n").expect("config");
    sighup(&s);
    assert!(crate::util::wait_for(Duration::from_secs(5), || s
        .log()
        .contains("new configuration rejected")));
    let mut after = s.client();
    after.cmd("EHLO client.test");
    send(&mut after);
    assert_eq!(s.mail("bob").len(), 2);
    // The session open during both reloads still works.
    assert!(open.cmd("NOOP").starts_with("250"));
}

fn s_config(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("postling.toml")
}

/// A reload that changes `data_dir` keeps the running one for everything,
/// the Maildirs that live under it by default included.
#[test]
fn sighup_with_a_new_data_dir_keeps_delivering_under_the_running_one() {
    let dir = TempDir::new();
    let config = |data: &str| {
        format!(
            "data_dir = \"{}\"\n[local]\ndomains = [\"localhost\"]\n",
            dir.path().join(data).display()
        )
    };
    let s = Server::start_own_data_dir(&dir, &config("data"));
    fs::write(s_config(&dir), crate::util::isolated(&config("data2"))).expect("config");
    sighup(&s);
    assert!(crate::util::wait_for(Duration::from_secs(5), || s
        .log()
        .contains("SIGHUP: configuration reloaded")));
    assert!(s
        .log()
        .contains("SIGHUP: data_dir changed; that takes a restart"));
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "cron@localhost",
        &["alice@localhost"],
        "Subject: r\r\n\r\nhi\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(s.mail("alice").len(), 1, "{}", s.log());
    assert!(!dir.path().join("data2").exists());
}
