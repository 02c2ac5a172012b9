//! The maildrop: `sendmail` while the daemon is down leaves the message in
//! `data_dir/maildrop/`, and the daemon submits it when it starts, as the
//! file's owner, through the checks a sendmail connection gets.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sendmail::{config, mail, ok, sendmail};
use crate::util::{split_message, wait_for, Server, TempDir};

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
    // keeps the message at once.
    let started = std::time::Instant::now();
    let out = sendmail(&dir, &["root", "alice"], b"Subject: while down\n\nhello\n");
    ok(&out);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("postling is not running; the message waits in ")
            && stderr.contains("/maildrop/"),
        "{stderr}"
    );
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

    // mailq counts it (root may read the maildrop).
    let listed = std::process::Command::new(crate::util::bin())
        .args(["queue", "list", "--config"])
        .arg(dir.path().join("postling.toml"))
        .output()
        .expect("mailq");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("Mail queue is empty\n-- 1 file(s) in ")
            && listed.contains("waiting for postling to start"),
        "{listed}"
    );

    let s = Server::start(&dir, &config(&dir));
    for user in ["root", "alice"] {
        let (header, body) = split_message(&mail(&s, user, 1)[0]);
        assert!(header.contains("Subject: while down"), "{header}");
        assert!(header.contains("Return-Path: <root@pi.test>"), "{header}");
        assert_eq!(body, b"hello\r\n");
    }
    assert!(wait_for(std::time::Duration::from_secs(5), || files(&md).is_empty()));
    assert!(
        s.log().contains("connect from=local maildrop="),
        "{}",
        s.log()
    );
    // With the daemon up again, sendmail talks to it, not to the maildrop.
    ok(&sendmail(&dir, &["root"], b"Subject: up\n\nhi\n"));
    assert_eq!(mail(&s, "root", 2).len(), 2);
    assert!(files(&md).is_empty());
}

#[test]
fn refused_recipients_of_a_dropped_message_are_bounced_to_the_sender() {
    let dir = TempDir::new();
    let config = config(&dir).replace("[local]\n", "[local]\nusers = [\"root\"]\n");
    down(&dir, &config);
    ok(&sendmail(
        &dir,
        &["root", "nosuch"],
        b"Subject: half\n\nhello\n",
    ));
    let s = Server::start(&dir, &config);
    let got = mail(&s, "root", 2);
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
    // The original header is quoted; the original itself reached root.
    assert!(text.contains("Subject: half"), "{text}");
    assert!(headers[1 - bounce].contains("Subject: half"));
    assert!(wait_for(std::time::Duration::from_secs(5), || files(
        &maildrop(&dir)
    )
    .is_empty()));
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

#[test]
fn the_pickup_trusts_the_files_owner_not_its_content() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: making files of another user needs root");
        return;
    }
    let dir = TempDir::new();
    down(&dir, &config(&dir));
    let md = maildrop(&dir);
    let message = "Subject: from nobody\r\n\r\nhi\r\n.\r\n";
    let envelope = "postling-maildrop 1\nsender <boss@example.net>\nrcpt <alice@pi.test>\nend\n";
    // nobody's file asks for another sender: the daemon uses nobody's own.
    drop_file(&md, "a1", &format!("{envelope}{message}"), 65534, true);
    // Still being written (not yet readable): left alone.
    let unfinished = drop_file(&md, "a2", &format!("{envelope}{message}"), 65534, false);
    // A second name for a file elsewhere (a file another user could read
    // this way): refused, and only the maildrop's name removed.
    let elsewhere = dir.path().join("elsewhere");
    drop_file(
        dir.path(),
        "elsewhere",
        &format!("{envelope}{message}"),
        65534,
        true,
    );
    fs::hard_link(&elsewhere, md.join("a3")).expect("link");
    // Not what sendmail writes: removed.
    drop_file(&md, "a4", "hello\n", 65534, true);
    std::os::unix::fs::symlink(&elsewhere, md.join("a5")).expect("symlink");

    let s = Server::start(&dir, &config(&dir));
    let got = mail(&s, "alice", 1);
    assert!(wait_for(std::time::Duration::from_secs(5), || files(&md)
        .len()
        == 1));
    assert_eq!(files(&md), vec![unfinished]);
    assert_eq!(got.len(), 1, "the hard link and the symlink sent nothing");
    let (header, _) = split_message(&got[0]);
    assert!(
        header.starts_with("Return-Path: <nobody@pi.test>"),
        "{header}"
    );
    assert!(!header.contains("boss@"), "{header}");
    assert!(elsewhere.exists(), "the other link is kept");
    let log = s.log();
    for needle in [
        "maildrop: a3 from uid=65534: a file with another link; removed",
        "maildrop: a4 from uid=65534: not a maildrop file (no postling-maildrop line); removed",
        "maildrop: a5 from uid=0: not a regular file; removed",
        "sender <boss@example.net> replaced by <nobody@pi.test>",
    ] {
        assert!(log.contains(needle), "{needle}\n{log}");
    }
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
