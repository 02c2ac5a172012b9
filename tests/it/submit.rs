//! The daemon side of local submission: ESMTP over `data_dir/submit.sock`,
//! where the peer's Unix user (SO_PEERCRED) is the identity.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::util::{split_message, Server, TempDir};

const CONFIG: &str =
    "[local]\ndomains = [\"pi.test\", \"localhost\"]\n[relay]\nallow_from = [\"10.0.0.0/8\"]\n";

/// Sends `script` (CRLF lines) over the socket, returns every reply line.
fn converse(stream: UnixStream, script: &str) -> Vec<String> {
    let mut w = stream.try_clone().expect("clone");
    w.write_all(script.as_bytes()).expect("write");
    let mut out = Vec::new();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        out.push(line);
    }
    out
}

const SCRIPT: &str = "EHLO localhost\r\nMAIL FROM:<boss@example.com>\r\nRCPT TO:<alice@pi.test>\r\nRCPT TO:<friend@example.org>\r\nDATA\r\nSubject: local\r\n\r\nhi\r\n.\r\nQUIT\r\n";

#[test]
fn root_is_trusted_and_local_submissions_may_relay() {
    let dir = TempDir::new();
    let s = Server::start(&dir, CONFIG);
    let stream = UnixStream::connect(s.data.join("submit.sock")).expect("submit.sock");
    let replies = converse(stream, SCRIPT);
    assert!(
        replies
            .iter()
            .any(|r| r.starts_with("250 2.0.0 OK: queued as")),
        "{replies:?}"
    );
    let (header, _) = split_message(&s.mail("alice")[0]);
    assert!(
        header.starts_with("Return-Path: <boss@example.com>"),
        "{header}"
    );
    assert!(
        header.contains("(postling session ") && header.contains(", from user root)"),
        "{header}"
    );
    // allow_from does not include loopback, yet a local program may relay.
    assert_eq!(s.queue().len(), 1);
}

#[test]
fn an_untrusted_user_always_sends_as_itself() {
    let dir = TempDir::new();
    let s = Server::start(&dir, CONFIG);
    let socket = s.data.join("submit.sock");
    if !crate::util::others_can_reach(&s.data) {
        eprintln!("skipped: the data directory is not reachable by the user nobody");
        return;
    }
    // A small client running as `nobody` (uid 65534).
    let py = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall({:?}.encode())\nsys.stdout.write(s.makefile().read())\n",
        socket.display().to_string(),
        SCRIPT
    );
    let out = match Command::new("python3")
        .arg("-c")
        .arg(&py)
        .uid(65534)
        .gid(65534)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run python3 as nobody: {e}");
            return;
        }
    };
    if !out.status.success() && out.stdout.is_empty() {
        eprintln!(
            "skipped: python3 did not run as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let replies = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        replies.contains("250 2.0.0 OK: queued as"),
        "{replies}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (header, _) = split_message(&s.mail("alice")[0]);
    assert!(
        header.starts_with("Return-Path: <nobody@pi.test>"),
        "{header}"
    );
    assert!(s
        .log()
        .contains("sender <boss@example.com> replaced by <nobody@pi.test>"));
}

#[test]
fn the_submit_socket_is_open_to_every_local_user() {
    let dir = TempDir::new();
    let s = Server::start(&dir, CONFIG);
    let meta = std::fs::metadata(s.data.join("submit.sock")).expect("socket");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o666
    );
    let control = std::fs::metadata(s.data.join("control.sock")).expect("control");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&control.permissions()) & 0o777,
        0o600
    );
}
