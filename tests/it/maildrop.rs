//! The maildrop: `sendmail` while the daemon is down leaves the message in
//! `data_dir/maildrop/`, and the daemon submits it when it starts, as the
//! file's owner, through the checks a sendmail connection gets.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sendmail::{config, mail, ok, sendmail};
use crate::util::{split_message, wait_for, Server, TempDir};

/// Who runs the suite (root in CI): the owner of sendmail's files.
fn me() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".into(), |u| u.name)
}

fn maildrop(dir: &TempDir) -> PathBuf {
    dir.path().join("data").join("maildrop")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("maildrop")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// A daemon that has run in `dir` and is now down (killed: its socket
/// file is still there, and nobody answers it).
fn down(dir: &TempDir, config: &str) {
    let mut s = Server::start(dir, config);
    s.kill();
}

#[test]
fn sendmail_leaves_mail_in_the_maildrop_while_the_daemon_is_down() {
    let dir = TempDir::new();
    down(&dir, &config(&dir));
    let md = maildrop(&dir);
    assert_eq!(fs::metadata(&md).expect("made").mode() & 0o7777, 0o1733);
    assert!(files(&md).is_empty());
    // The default sendmail_wait (a minute) is not waited: the maildrop
    // keeps the message at once, and sendmail says nothing (cron would
    // mail a note as one more message).
    let me = me();
    let started = std::time::Instant::now();
    let out = sendmail(&dir, &[&me, "alice"], b"Subject: while down\n\nhello\n");
    ok(&out);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(out.stderr.is_empty(), "{out:?}");
    let dropped = files(&md);
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let meta = fs::metadata(&dropped[0]).expect("stat");
    assert_eq!(meta.mode() & 0o777, 0o644, "complete, so readable");
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());
    let text = fs::read(&dropped[0]).expect("read");
    assert!(
        text.starts_with(b"postling-maildrop 1\nsender <"),
        "{text:?}"
    );

    // mailq counts it (its owner may read the maildrop here).
    let listed = std::process::Command::new(crate::util::bin())
        .args(["queue", "list", "--config"])
        .arg(dir.path().join("postling.toml"))
        .output()
        .expect("mailq");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("Mail queue is empty\n-- 1 message(s) in ")
            && listed.contains("waiting for postling to pick them up"),
        "{listed}"
    );

    let s = Server::start(&dir, &config(&dir));
    mail(&s, "alice", 1);
    assert!(wait_for(std::time::Duration::from_secs(5), || files(&md).is_empty()));
    for user in [me.as_str(), "alice"] {
        let got = s.mail(user);
        assert_eq!(got.len(), 1, "{user}: one copy");
        let (header, body) = split_message(&got[0]);
        assert!(header.contains("Subject: while down"), "{header}");
        assert!(
            header.contains(&format!("Return-Path: <{me}@pi.test>")),
            "{header}"
        );
        assert_eq!(body, b"hello\r\n");
    }
    assert!(
        s.log().contains("connect from=local maildrop="),
        "{}",
        s.log()
    );
    // With the daemon up again, sendmail talks to it, not to the maildrop.
    ok(&sendmail(&dir, &["alice"], b"Subject: up\n\nhi\n"));
    assert_eq!(mail(&s, "alice", 2).len(), 2);
    assert!(files(&md).is_empty());
}

#[test]
fn refused_recipients_of_a_dropped_message_are_bounced_to_the_sender() {
    let dir = TempDir::new();
    let me = me();
    let config = config(&dir).replace("[local]\n", &format!("[local]\nusers = [\"{me}\"]\n"));
    down(&dir, &config);
    ok(&sendmail(
        &dir,
        &[&me, "nosuch"],
        b"Subject: half\n\nhello\n",
    ));
    let s = Server::start(&dir, &config);
    let got = mail(&s, &me, 2);
    assert!(wait_for(std::time::Duration::from_secs(5), || files(
        &maildrop(&dir)
    )
    .is_empty()));
    let got = if got.len() == 2 { got } else { s.mail(&me) };
    assert_eq!(got.len(), 2, "the message and one bounce");
    let headers: Vec<String> = got.iter().map(|m| split_message(m).0).collect();
    let bounce = headers
        .iter()
        .position(|h| h.contains("Subject: Undelivered Mail Returned to Sender"))
        .unwrap_or_else(|| panic!("no bounce: {headers:?}"));
    let text = String::from_utf8_lossy(&got[bounce]).into_owned();
    assert!(text.contains("<nosuch@pi.test>: 550 5.1.1"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nosuch@pi.test"),
        "{text}"
    );
    // The original header is quoted; the original itself arrived.
    assert!(text.contains("Subject: half"), "{text}");
    assert!(headers[1 - bounce].contains("Subject: half"));
}

#[test]
fn a_file_that_cannot_be_submitted_in_time_bounces() {
    // bob's Maildir cannot be made (451 at the end of DATA, and no copy
    // anywhere): a temporary failure, retried at each pass until the file
    // is relay.max_queue_time old. This one is older: it bounces, and the
    // file goes.
    let dir = TempDir::new();
    let me = me();
    let config = config(&dir).replace(
        "[local]\n",
        "[local]\nmailboxes = { bob = \"/proc/postling-test/bob\" }\n",
    ) + "[relay]\nmax_queue_time = \"1m\"\n";
    down(&dir, &config);
    ok(&sendmail(&dir, &[&me, "bob"], b"Subject: late\n\nhello\n"));
    let dropped = files(&maildrop(&dir));
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
    fs::File::options()
        .write(true)
        .open(&dropped[0])
        .and_then(|f| f.set_modified(old))
        .expect("age the file");
    let s = Server::start(&dir, &config);
    let got = mail(&s, &me, 1);
    assert!(
        wait_for(std::time::Duration::from_secs(5), || files(&maildrop(&dir))
            .is_empty()),
        "{}",
        s.log()
    );
    assert_eq!(s.mail(&me).len(), 1, "the bounce only");
    let text = String::from_utf8_lossy(&got[0]);
    assert!(
        text.contains("Subject: Undelivered Mail Returned to Sender"),
        "{text}"
    );
    for rcpt in [format!("{me}@pi.test"), "bob@pi.test".to_string()] {
        assert!(
            text.contains(&format!("<{rcpt}>: 4.4.7 not submitted in time, last: ")),
            "{text}"
        );
    }
    assert!(text.contains("Subject: late"), "{text}");
}

/// Writes a maildrop file as a sendmail of user `uid` would: mode 0644
/// (complete) unless `complete` is false.
fn drop_file(dir: &Path, name: &str, text: &str, uid: u32, complete: bool) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write");
    let mode = if complete { 0o644 } else { 0o600 };
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(&path, Some(uid), Some(uid)).expect("chown");
    path
}

/// The n-th name of the kind sendmail gives (32 hex digits).
fn name(n: u32) -> String {
    format!("{n:032x}")
}

#[test]
fn the_pickup_trusts_the_files_owner_not_its_content() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: making files of another user needs root");
        return;
    }
    let dir = TempDir::new();
    down(&dir, &config(&dir));
    let md = maildrop(&dir);
    let message = "Subject: dropped\r\n\r\nhi\r\n.\r\n";
    let envelope = "postling-maildrop 1\nsender <boss@example.net>\nrcpt <alice@pi.test>\nend\n";
    let whole = format!("{envelope}{message}");
    // nobody's file asks for another sender: the daemon uses nobody's own.
    drop_file(&md, &name(1), &whole, 65534, true);
    // root's too: a root-owned file can be renamed in from a directory
    // another user controls, so ownership is no proof for -f.
    drop_file(&md, &name(7), &whole, 0, true);
    // Still being written (not yet readable): left alone.
    let unfinished = drop_file(&md, &name(2), &whole, 65534, false);
    // A second name for a file elsewhere (a file another user could read
    // this way): refused, and only the maildrop's name removed.
    let elsewhere = dir.path().join("elsewhere");
    drop_file(dir.path(), "elsewhere", &whole, 65534, true);
    fs::hard_link(&elsewhere, md.join(name(3))).expect("link");
    // Not what sendmail writes: removed.
    drop_file(&md, &name(4), "hello\n", 65534, true);
    std::os::unix::fs::symlink(&elsewhere, md.join(name(5))).expect("symlink");
    // A message without its final dot (a file still being written to):
    // the pickup would wait in DATA for the rest.
    let undotted = format!("{envelope}Subject: x\r\n\r\nhi\r\n");
    drop_file(&md, &name(6), &undotted, 65534, true);
    // A name sendmail never gives.
    drop_file(&md, "foo\nbar", &whole, 65534, true);

    let s = Server::start(&dir, &config(&dir));
    mail(&s, "alice", 2);
    assert!(wait_for(std::time::Duration::from_secs(5), || files(&md)
        .len()
        == 1));
    assert_eq!(files(&md), vec![unfinished]);
    let got = s.mail("alice");
    assert_eq!(got.len(), 2, "only the two sound files sent anything");
    let mut senders: Vec<String> = got
        .iter()
        .map(|m| split_message(m).0.lines().next().unwrap_or("").to_string())
        .collect();
    senders.sort();
    assert_eq!(
        senders,
        [
            "Return-Path: <nobody@pi.test>",
            "Return-Path: <root@pi.test>"
        ]
    );
    assert!(elsewhere.exists(), "the other link is kept");
    let log = s.log();
    for needle in [
        format!("maildrop: {} from uid=65534: a file with another link; removed", name(3)),
        format!("maildrop: {} from uid=65534: not a maildrop file (no postling-maildrop line); removed", name(4)),
        format!("maildrop: {} from uid=0: not a regular file; removed", name(5)),
        format!("maildrop: {} from uid=65534: not a maildrop file (the message does not end with a dot line); removed", name(6)),
        "/foo\\nbar\" from uid=65534: not a name sendmail gives; removed".to_string(),
        "sender <boss@example.net> replaced by <nobody@pi.test>".to_string(),
        "sender <boss@example.net> replaced by <root@pi.test>".to_string(),
    ] {
        assert!(log.contains(&needle), "{needle}\n{log}");
    }
}

#[test]
fn a_message_over_the_size_limit_bounces_unread() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: making files of another user needs root");
        return;
    }
    let dir = TempDir::new();
    let config = config(&dir).replace(
        "[local]\n",
        "[limits]\nmax_message_size = \"1K\"\n[local]\n",
    );
    down(&dir, &config);
    let md = maildrop(&dir);
    let envelope = "postling-maildrop 1\nsender <>\nrcpt <alice@pi.test>\nend\n";
    let path = drop_file(&md, &name(1), envelope, 65534, true);
    // Sparse: it claims a terabyte and takes no disk.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(1 << 40).expect("grow");
    use std::os::unix::fs::FileExt;
    file.write_at(b"\r\n.\r\n", (1 << 40) - 5).expect("end");
    let s = Server::start(&dir, &config);
    let got = mail(&s, "nobody", 1);
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("<alice@pi.test>: 552 5.3.4"), "{text}");
    assert!(wait_for(std::time::Duration::from_secs(5), || files(&md).is_empty()));
    assert!(s.mail("alice").is_empty());
}

#[test]
fn an_unprivileged_users_message_waits_and_goes_out_as_that_user() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let dir = TempDir::new();
    down(&dir, &config(&dir));
    let bin = Path::new(crate::util::bin());
    if !nix::unistd::getuid().is_root()
        || !crate::util::others_can_reach(bin)
        || !crate::util::others_can_reach(&maildrop(&dir))
    {
        eprintln!("skipped: needs root and a checkout the user nobody can reach");
        return;
    }
    let mut child = Command::new(bin)
        .args(["sendmail", "-C"])
        .arg(dir.path().join("postling.toml"))
        .args(["-f", "boss@example.net", "alice"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sendmail as nobody");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Subject: from nobody\n\nhi\n")
        .expect("write");
    ok(&child.wait_with_output().expect("wait"));
    let dropped = files(&maildrop(&dir));
    assert_eq!(dropped.len(), 1);
    assert_eq!(fs::metadata(&dropped[0]).expect("stat").uid(), 65534);
    let s = Server::start(&dir, &config(&dir));
    let (header, _) = split_message(&mail(&s, "alice", 1)[0]);
    assert!(
        header.starts_with("Return-Path: <nobody@pi.test>"),
        "{header}"
    );
    assert!(header.contains("From: <nobody@pi.test>"), "{header}");
}
