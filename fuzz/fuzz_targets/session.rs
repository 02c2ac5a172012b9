//! Fuzz target `session`: a whole SMTP server session from the client's bytes.
//!
//! The first input byte picks the peer address (inside or outside the relay
//! `allow_from`, loopback or not), the listener mode, whether STARTTLS is
//! offered, whether the spool "fails", and the DATA chunk size; the rest is
//! what the client sends. It is framed as `smtp/conn.rs` frames it (CRLF
//! lines, a bare CR or LF closes, RFC 4954's 12288-octet frame), each line
//! goes to `Session::command`, and the driver's part of each action is played
//! without I/O: after `Data` the following bytes go through the real
//! `DataDecoder` until the end marker, then `data_done`; `StartTls` is
//! answered with `tls_started`; `Authenticate` with `auth_done` (alice/secret
//! is the one good password). Two files are written once at start-up (an
//! aliases file, so that alias expansion is reached, and the users file that
//! `[auth]` requires); nothing else touches the disk or the network.
//!
//! Checks, besides "never panics": every reply is a well-formed SMTP reply
//! (its wire form parses with postling's own relay reply parser to the same
//! code and line count), a transaction handed to DATA has recipients, and
//! its `Received:` field is one CRLF-terminated header field.

#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postling::config::{Config, ListenMode};
use postling::relay::reply::ReplyParser;
use postling::smtp::data::{DataDecoder, DataError};
use postling::smtp::reply::Reply;
use postling::smtp::session::{Action, DataResult, Session};

/// conn.rs frames lines of up to RFC 4954's 12288 octets (CRLF included);
/// the session itself refuses commands over 512.
const MAX_FRAME: usize = 12288 - 2;

const ALIASES: &str = "postmaster: root\nroot: alice\nteam: alice, bob, carol@example.com\n";
// Never read by the session: the fuzz driver plays the verifier.
const USERS: &str = "alice:$6$salt$hash\n";

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let aliases = dir.join(format!("postling-fuzz-aliases-{pid}"));
        let users = dir.join(format!("postling-fuzz-users-{pid}"));
        std::fs::write(&aliases, ALIASES).expect("temp dir is writable");
        std::fs::write(&users, USERS).expect("temp dir is writable");
        let text = format!(
            "hostname = \"mx.test\"\n\
             [local]\n\
             domains = [\"localhost\", \"example.org\"]\n\
             users = [\"alice\", \"bob\"]\n\
             aliases = {:?}\n\
             [relay]\n\
             allow_from = [\"10.0.0.0/8\", \"::1\"]\n\
             [auth]\n\
             users_file = {:?}\n\
             allow_plaintext_loopback = true\n\
             [limits]\n\
             max_errors = 50\n\
             max_received_headers = 3\n\
             max_message_size = \"8K\"\n",
            aliases.display().to_string(),
            users.display().to_string(),
        );
        let config = postling::config::parse(&text, None, &Default::default())
            .unwrap_or_else(|e| panic!("fuzz config does not parse: {e}"));
        let _ = std::fs::remove_file(&aliases);
        let _ = std::fs::remove_file(&users);
        config
    })
}

/// Checks a reply's wire form with the relay client's (strict) parser.
fn check_reply(r: &Reply) {
    assert!((200..=599).contains(&r.code), "{r:?}");
    assert!(!r.lines.is_empty(), "{r:?}");
    let _ = r.to_string();
    let mut wire = Vec::new();
    r.write_to(&mut wire);
    let mut p = ReplyParser::new();
    p.feed(&wire);
    match p.next() {
        Ok(Some(parsed)) => {
            assert_eq!(parsed.code, r.code, "{r:?}");
            assert_eq!(parsed.lines.len(), r.lines.len(), "{r:?}");
        }
        other => panic!("reply {r:?} is not well formed on the wire: {other:?}"),
    }
    assert_eq!(p.buffered(), 0, "reply {r:?} has bytes after its end");
}

/// One framed line, as conn.rs's `Input::take_line` frames it.
enum Line<'a> {
    Command(&'a [u8]),
    TooLong,
    BareEnding,
}

/// Frames the next line of `input`; None when the input ends mid-line.
fn take_line<'a>(input: &mut &'a [u8]) -> Option<Line<'a>> {
    let i = input.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = if input[i] == b'\n' {
        *input = &input[i + 1..];
        return Some(Line::BareEnding);
    } else {
        match input.get(i + 1) {
            None => return None,
            Some(b'\n') => &input[..i],
            Some(_) => {
                *input = &input[i + 1..];
                return Some(Line::BareEnding);
            }
        }
    };
    *input = &input[i + 2..];
    Some(if line.len() > MAX_FRAME {
        Line::TooLong
    } else {
        Line::Command(line)
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&knob, mut input)) = bytes.split_first() else {
        return;
    };
    let config = config();
    let peer: IpAddr = ["127.0.0.1", "10.1.2.3", "::1", "::ffff:192.0.2.7"][usize::from(knob & 3)]
        .parse()
        .expect("literal address");
    let mode = [
        ListenMode::Smtp,
        ListenMode::Submission,
        ListenMode::Smtps,
        ListenMode::Smtp,
    ][usize::from((knob >> 2) & 3)];
    let tls_ready = knob & 0x10 != 0;
    let storage_fails = knob & 0x20 != 0;
    let chunk = [1, 7, 512, usize::MAX][usize::from(knob >> 6)];

    let mut session = Session::new(config, "FUZZ".into(), peer, mode, tls_ready);
    if mode == ListenMode::Smtps {
        session.tls_started("TLSv1.3 TLS13_AES_128_GCM_SHA256".into());
    }
    check_reply(&session.greeting());
    while let Some(line) = take_line(&mut input) {
        let mut action = match line {
            Line::Command(l) => session.command(l),
            Line::TooLong => session.line_too_long(),
            Line::BareEnding => session.bare_line_ending(),
        };
        // Play the driver's part until the session has a reply to send.
        loop {
            action = match action {
                Action::Reply(r) => {
                    check_reply(&r);
                    break;
                }
                Action::Close(r) => {
                    check_reply(&r);
                    return;
                }
                Action::StartTls(r) => {
                    check_reply(&r);
                    assert_eq!(r.code, 220, "{r:?}");
                    session.tls_started("TLSv1.3 TLS13_AES_128_GCM_SHA256".into());
                    break;
                }
                Action::Authenticate { user, password } => {
                    let ok = user == "alice" && password == "secret";
                    session.auth_done(user, ok)
                }
                Action::Data(message) => {
                    assert!(!message.recipients.is_empty(), "DATA without recipients");
                    let header = message.received_header(&config.hostname, "ID", 1_700_000_000);
                    assert!(header.starts_with("Received: ") && header.ends_with("\r\n"));
                    // One field: every line break is followed by folding whitespace.
                    for w in header.as_bytes().windows(3) {
                        if &w[..2] == b"\r\n" {
                            assert!(w[2] == b'\t' || w[2] == b' ', "unfolded: {header:?}");
                        }
                    }
                    let _ = message.mailboxes();
                    let _ = message.remote();
                    let Some(result) = receive(&mut input, chunk, storage_fails) else {
                        return; // the client hung up inside DATA
                    };
                    match session.data_done(result) {
                        Action::Data(_) => panic!("data_done started another DATA"),
                        other => other,
                    }
                }
            };
        }
    }
});

/// Streams `input` through the DATA decoder, `chunk` bytes at a time, and
/// returns the verdict as conn.rs reports it; None if the end never came.
fn receive(input: &mut &[u8], chunk: usize, storage_fails: bool) -> Option<DataResult> {
    let config = config();
    let mut decoder = DataDecoder::new(config.limits.max_message_size);
    if storage_fails {
        decoder.fail(DataError::Storage);
    }
    loop {
        if input.is_empty() {
            return None;
        }
        let n = chunk.min(input.len());
        let mut buf = input[..n].to_vec();
        let step = decoder.decode(&mut buf);
        assert!(step.produced <= step.consumed && step.consumed <= n, "{step:?}");
        *input = &input[step.consumed..];
        if step.done {
            break;
        }
    }
    Some(match decoder.finish() {
        Err(e) => DataResult::Refused(e),
        Ok(stats) if stats.received_headers > config.limits.max_received_headers => {
            DataResult::Loop
        }
        Ok(_) => DataResult::Stored { id: "ID".into() },
    })
}
