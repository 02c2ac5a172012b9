//! Fuzz target `reply`: the relay client's parser of remote SMTP replies.
//!
//! The input is split into chunks (each chunk's first byte is its length),
//! fed one at a time, draining complete replies after each. Checks that
//! memory stays bounded, every reply is well formed, errors are final, and
//! the one-line diagnostic is safe to log.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postling::relay::reply::{ReplyParser, MAX_BUFFERED, MAX_LINES, MAX_ONE_LINE};

fuzz_target!(|input: &[u8]| {
    let mut p = ReplyParser::new();
    let mut rest = input;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        p.feed(chunk);
        assert!(p.buffered() <= MAX_BUFFERED, "buffered {}", p.buffered());
        loop {
            match p.next() {
                Ok(Some(reply)) => {
                    assert!((200..=599).contains(&reply.code), "{reply:?}");
                    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_LINES);
                    let line = reply.one_line();
                    assert!(line.len() <= MAX_ONE_LINE, "{line:?}");
                    assert!(line.bytes().all(|b| (b' '..=b'~').contains(&b)), "{line:?}");
                    assert!(line.starts_with(&reply.code.to_string()));
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    p.feed(b"250 ok\r\n");
                    assert_eq!(p.next(), Err(e), "an error must be final");
                    return;
                }
            }
        }
    }
});
