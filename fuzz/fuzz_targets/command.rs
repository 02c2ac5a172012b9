//! Fuzz target `command`: one SMTP command line into `Command::parse`.
//!
//! Beyond "never panics", checks what the session relies on: a HELO name is
//! one printable ASCII word, a mailbox keeps RFC 5321 4.5.3.1's length limits,
//! and the `local@domain` the session stores re-parses to the same mailbox
//! (so an address written into the queue means what the client sent).

#![no_main]

use libfuzzer_sys::fuzz_target;
use postling::smtp::command::{
    Command, ForwardPath, Mailbox, ReversePath, MAX_DOMAIN, MAX_LOCAL_PART,
};

fuzz_target!(|line: &[u8]| {
    let Ok(cmd) = Command::parse(line) else {
        return;
    };
    match cmd {
        Command::Ehlo(name) | Command::Helo(name) => {
            assert!(!name.is_empty(), "empty HELO name from {line:?}");
            assert!(
                name.bytes().all(|b| b.is_ascii_graphic()),
                "HELO name {name:?} has a space or control byte"
            );
        }
        Command::Mail(ReversePath::Mailbox(m), _) => check_mailbox(m, "MAIL FROM:", line),
        Command::Rcpt(ForwardPath::Mailbox(m)) => check_mailbox(m, "RCPT TO:", line),
        _ => {}
    }
});

fn check_mailbox(m: Mailbox<'_>, verb: &str, line: &[u8]) {
    assert!(!m.local.is_empty() && !m.domain.is_empty(), "{m:?} from {line:?}");
    assert!(m.local.len() <= MAX_LOCAL_PART, "{m:?} from {line:?}");
    assert!(m.domain.len() <= MAX_DOMAIN, "{m:?} from {line:?}");
    // The session stores `local@domain`; written back in a command it must
    // name the same mailbox.
    let again = format!("{verb}<{}@{}>", m.local, m.domain);
    let parsed = Command::parse(again.as_bytes());
    let same = match parsed {
        Ok(Command::Mail(ReversePath::Mailbox(n), _)) | Ok(Command::Rcpt(ForwardPath::Mailbox(n))) => {
            n == m
        }
        _ => false,
    };
    assert!(same, "{line:?} gave {m:?}, but {again:?} parses as {parsed:?}");
}
