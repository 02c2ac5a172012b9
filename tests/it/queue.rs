//! The queue tools against a live queue: `postling queue list|show|flush|
//! delete` and `mailq`, with the daemon running (flush and delete go
//! through its control socket) and stopped (delete works on the files,
//! flush says the daemon is not running).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::util::{bin, wait_for, Server, TempDir};

const SHORT: Duration = Duration::from_secs(20);

/// Local domain localhost; remote mail is tried once (DNS is dead, see
/// `util::isolated`) and then not again for an hour unless flushed.
const CONFIG: &str = "[local]\ndomains = [\"localhost\"]\n[relay]\nretry = [\"1h\"]\n";

/// Runs `postling queue <args> --data-dir <data>`.
fn queue(data: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("queue")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("run postling queue")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Sends one message and returns its queue id.
fn send(s: &Server, from: &str, to: &str, subject: &str) -> String {
    let mut c = s.client();
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        from,
        &[to],
        &format!("From: <{from}>\r\nSubject: {subject}\r\n\r\nhello\r\n"),
    );
    assert!(r.starts_with("250"), "{r}");
    r.rsplit(' ').next().expect("queue id").to_string()
}

/// A server with two remote messages, each tried once and deferred.
fn two_deferred(dir: &TempDir) -> (Server, String, String) {
    let s = Server::start(dir, CONFIG);
    let a = send(&s, "cron@localhost", "friend@example.com", "first");
    let b = send(&s, "", "other@example.org", "second");
    assert!(
        wait_for(SHORT, || {
            let q = s.queue();
            q.len() == 2 && q.iter().all(|(_, env)| env.contains("rcpt deferred "))
        }),
        "{}",
        s.log()
    );
    (s, a, b)
}

#[test]
fn list_show_json_and_mailq_read_the_live_queue() {
    let dir = TempDir::new();
    let (s, a, b) = two_deferred(&dir);

    let o = queue(&s.data, &["list"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.starts_with("-Queue ID- "), "{out}");
    assert!(out.contains(&format!("{a} ")), "{out}");
    assert!(out.contains(&format!("{b} ")), "{out}");
    assert!(out.contains("  cron@localhost\n"), "{out}");
    assert!(out.contains("  MAILER-DAEMON\n"), "null sender: {out}");
    assert!(out.contains("friend@example.com\n"), "{out}");
    assert!(out.contains("other@example.org\n"), "{out}");
    // The last error stands in parentheses above the recipient.
    let reason = out
        .lines()
        .find(|l| l.trim_start().starts_with('('))
        .expect("a deferral reason");
    assert!(reason.trim().ends_with(')'), "{out}");
    assert!(out.ends_with("in 2 Requests.\n"), "{out}");
    // `queue` alone lists too.
    let o = queue(&s.data, &[]);
    assert_eq!(stdout(&o), out);

    let o = queue(&s.data, &["list", "--json"]);
    assert!(o.status.success(), "{}", show(&o));
    let json = stdout(&o);
    assert!(
        json.starts_with("[\n{\"id\":") && json.ends_with("}\n]\n"),
        "{json}"
    );
    assert!(
        json.contains(&format!("{{\"id\":\"{a}\",\"arrival\":")),
        "{json}"
    );
    assert!(json.contains("\"sender\":\"cron@localhost\""), "{json}");
    assert!(json.contains("\"sender\":\"\""), "{json}");
    assert!(json.contains("\"attempts\":1"), "{json}");
    assert!(
        json.contains("{\"address\":\"friend@example.com\",\"state\":\"deferred\",\"reason\":\""),
        "{json}"
    );
    assert_eq!(json.matches("\"id\":").count(), 2, "{json}");

    let o = queue(&s.data, &["show", &a]);
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("id: {a}\n")), "{out}");
    assert!(out.contains("sender: cron@localhost\n"), "{out}");
    assert!(
        out.contains("recipient: friend@example.com deferred ("),
        "{out}"
    );
    assert!(out.contains("Subject: first\n"), "{out}");
    assert!(!out.contains("hello"), "header only: {out}");

    // Invoked as `mailq` through a symlink, the binary lists the queue.
    let mailq = dir.path().join("mailq");
    std::os::unix::fs::symlink(bin(), &mailq).expect("symlink");
    let o = Command::new(&mailq)
        .arg("--data-dir")
        .arg(&s.data)
        .output()
        .expect("run mailq");
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains(&format!("{a} ")), "{}", show(&o));
    let o = Command::new(&mailq)
        .args(["--json", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("run mailq --json");
    assert!(stdout(&o).starts_with("[\n{\"id\":"), "{}", show(&o));
}

#[test]
fn unknown_and_malformed_ids() {
    let dir = TempDir::new();
    let s = Server::start(&dir, CONFIG);
    for cmd in ["show", "flush", "delete"] {
        let o = queue(&s.data, &[cmd, "0NOSUCHID0000000000"]);
        assert_eq!(o.status.code(), Some(66), "{cmd}: {}", show(&o));
        let o = queue(&s.data, &[cmd, "../etc"]);
        assert_eq!(o.status.code(), Some(64), "{cmd}: {}", show(&o));
    }
    let o = queue(&s.data, &["list"]);
    assert_eq!(stdout(&o), "Mail queue is empty\n", "{}", show(&o));
}

/// Needs the control socket wired into the server.
#[test]
fn delete_while_running_goes_through_the_daemon() {
    let dir = TempDir::new();
    let (s, a, b) = two_deferred(&dir);
    let o = queue(&s.data, &["delete", &a]);
    assert!(o.status.success(), "{}\n{}", show(&o), s.log());
    assert_eq!(stdout(&o), format!("{a}: deleted\n"));
    assert!(!s.data.join("queue").join(&a).exists());
    // The log is read from the daemon's stderr by another thread.
    assert!(
        wait_for(SHORT, || s
            .log()
            .contains(&format!("id={a} status=deleted"))),
        "{}",
        s.log()
    );
    let out = stdout(&queue(&s.data, &["list"]));
    assert!(!out.contains(&a) && out.contains(&b), "{out}");
    assert!(out.ends_with("in 1 Request.\n"), "{out}");
    // Gone: a second delete is an unknown id.
    let o = queue(&s.data, &["delete", &a]);
    assert_eq!(o.status.code(), Some(66), "{}", show(&o));
}

/// Needs the control socket wired into the server.
#[test]
fn flush_while_running_makes_a_new_attempt() {
    let dir = TempDir::new();
    let (s, a, _b) = two_deferred(&dir);
    let o = queue(&s.data, &["flush", &a]);
    assert!(o.status.success(), "{}\n{}", show(&o), s.log());
    assert!(
        wait_for(SHORT, || s
            .log()
            .contains(&format!("id={a} flush: trying now"))),
        "{}",
        s.log()
    );
    assert!(
        s.log().contains(&format!("control: flush id={a}")),
        "{}",
        s.log()
    );
    // The retry schedule says an hour; the flush made the second attempt now.
    assert!(
        wait_for(SHORT, || s
            .queue()
            .iter()
            .any(|(id, env)| *id == a && env.contains("\nattempts 2\n"))),
        "{}",
        s.log()
    );
    let o = queue(&s.data, &["flush"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        wait_for(SHORT, || s.log().contains("control: flush all")),
        "{}",
        s.log()
    );
}

#[test]
fn with_the_daemon_stopped_delete_works_and_flush_says_so() {
    let dir = TempDir::new();
    let (mut s, a, b) = two_deferred(&dir);
    s.kill();
    let o = queue(&s.data, &["flush"]);
    assert_eq!(o.status.code(), Some(75), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("postling is not running"),
        "{}",
        show(&o)
    );
    let o = queue(&s.data, &["delete", &a]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(!s.data.join("queue").join(&a).exists());
    let out = stdout(&queue(&s.data, &["list"]));
    assert!(!out.contains(&a) && out.contains(&b), "{out}");
    // Nothing half-removed is left for the next start to find.
    let incoming: Vec<_> = std::fs::read_dir(s.data.join("incoming"))
        .expect("incoming")
        .collect();
    assert!(incoming.is_empty());
}
