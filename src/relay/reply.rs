//! The parser of SMTP replies from a remote server (the relay client's side).
//!
//! Owns framing and validating replies as RFC 5321 4.2 defines them: a
//! three-digit code, `-` on every line but the last of a multi-line reply
//! (4.2.1), CRLF line ends (2.3.8; a bare LF is taken as a line end too,
//! as Postfix and Exim take it from servers that send one: only DATA,
//! not a reply, can smuggle). It is sans-IO: the driver feeds it bytes
//! and asks for complete replies; it never touches a socket, and it does not
//! decide what a reply *means* for the transaction (that is `client.rs`).
//!
//! The remote server is untrusted, so every input costs bounded memory and
//! every oddity is an error, not a guess: an over-long line, an endless
//! multi-line reply, a code that changes between lines, a code that is not
//! three digits in 200..=599, a NUL byte, or more buffered bytes
//! than `MAX_BUFFERED`. An error is final: the parser keeps returning it, and
//! the caller drops the connection and defers what is not yet final.

use std::fmt;

/// Longest reply line we accept, CRLF included. RFC 5321 4.5.3.1.5 sets 512;
/// real servers exceed it, so we allow four times that.
pub const MAX_LINE: usize = 2048;
/// Most lines in one multi-line reply (a long EHLO list is about 20).
pub const MAX_LINES: usize = 100;
/// Most bytes held at once: unparsed input plus the lines of the reply being
/// assembled.
pub const MAX_BUFFERED: usize = 64 * 1024;
/// Longest diagnostic `ServerReply::one_line` returns.
pub const MAX_ONE_LINE: usize = 300;

/// One complete reply from the server. `lines` holds the text of each line
/// after the code and separator, lossily decoded as UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl ServerReply {
    /// A reply from its parts (for tests and synthesised diagnostics).
    pub fn new(code: u16, text: &str) -> ServerReply {
        ServerReply {
            code,
            lines: text.split('\n').map(str::to_owned).collect(),
        }
    }

    /// 2xx and 3xx: the command was accepted (completed or in progress).
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text of every line joined with `\n`, unsanitised.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// A sanitised one-line diagnostic such as `550 5.1.1 user unknown`: the
    /// code and the lines joined by spaces, every byte outside printable
    /// ASCII replaced by `?`, at most `MAX_ONE_LINE` characters. Safe to put
    /// in a log line, a bounce header or a queue listing.
    pub fn one_line(&self) -> String {
        let mut out = self.code.to_string();
        for line in &self.lines {
            if out.len() >= MAX_ONE_LINE {
                break;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            out.push(' ');
            for c in line.chars() {
                if out.len() >= MAX_ONE_LINE {
                    break;
                }
                out.push(if (' '..='~').contains(&c) { c } else { '?' });
            }
        }
        out
    }
}

impl fmt::Display for ServerReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Why the server's output could not be parsed. Each is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    LineTooLong,
    TooManyLines,
    CodeChanged { first: u16, then: u16 },
    BadCode,
    CodeOutOfRange(u16),
    BadSeparator,
    Nul,
    TooMuchBuffered,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::LineTooLong => write!(f, "reply line longer than {MAX_LINE} bytes"),
            ReplyError::TooManyLines => write!(f, "reply with more than {MAX_LINES} lines"),
            ReplyError::CodeChanged { first, then } => {
                write!(
                    f,
                    "reply code changed from {first} to {then} within one reply"
                )
            }
            ReplyError::BadCode => write!(f, "reply line does not start with a three-digit code"),
            ReplyError::CodeOutOfRange(c) => write!(f, "reply code {c} outside 200..=599"),
            ReplyError::BadSeparator => write!(f, "reply code not followed by space or hyphen"),
            ReplyError::Nul => write!(f, "NUL byte in reply"),
            ReplyError::TooMuchBuffered => {
                write!(f, "more than {MAX_BUFFERED} bytes of reply buffered")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// Incremental reply parser: `feed` bytes as they arrive, then call `next`
/// until it returns `Ok(None)` (need more input).
#[derive(Debug, Default)]
pub struct ReplyParser {
    /// Unparsed input.
    buf: Vec<u8>,
    /// Lines of the multi-line reply being assembled, and its code.
    code: Option<u16>,
    lines: Vec<String>,
    /// Bytes held in `lines`, counted against `MAX_BUFFERED`.
    held: usize,
    error: Option<ReplyError>,
}

impl ReplyParser {
    pub fn new() -> ReplyParser {
        ReplyParser::default()
    }

    /// Appends input. Input beyond `MAX_BUFFERED` is not stored; the next
    /// call to `next` reports it.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.buf.len() + self.held + bytes.len() > MAX_BUFFERED {
            self.error = Some(ReplyError::TooMuchBuffered);
            self.buf = Vec::new();
            self.lines = Vec::new();
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet returned as part of a reply. After STARTTLS's
    /// 220 this must be zero, or the server (or a man in the middle) sent
    /// data in clear that must not be read as if it came over TLS.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.held
    }

    /// The next complete reply, `Ok(None)` if more input is needed, or the
    /// (final) error.
    // Not an Iterator: "need more input" and "error" are different answers.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<ServerReply>, ReplyError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.parse() {
            Ok(r) => Ok(r),
            Err(e) => {
                self.error = Some(e.clone());
                self.buf = Vec::new();
                self.lines = Vec::new();
                Err(e)
            }
        }
    }

    fn parse(&mut self) -> Result<Option<ServerReply>, ReplyError> {
        loop {
            let Some(lf) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.buf.contains(&0) {
                    return Err(ReplyError::Nul);
                }
                if self.buf.len() >= MAX_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok(None);
            };
            if lf + 1 > MAX_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let end = if lf > 0 && self.buf[lf - 1] == b'\r' {
                lf - 1
            } else {
                lf
            };
            let line = &self.buf[..end];
            let (code, last, text) = parse_line(line)?;
            if let Some(first) = self.code {
                if first != code {
                    return Err(ReplyError::CodeChanged { first, then: code });
                }
            }
            if self.lines.len() >= MAX_LINES {
                return Err(ReplyError::TooManyLines);
            }
            let text = String::from_utf8_lossy(text).into_owned();
            self.held += lf + 1;
            self.lines.push(text);
            self.buf.drain(..=lf);
            if last {
                self.code = None;
                self.held = 0;
                return Ok(Some(ServerReply {
                    code,
                    lines: std::mem::take(&mut self.lines),
                }));
            }
            self.code = Some(code);
        }
    }
}

/// Splits one line (CRLF removed) into code, "is last line", and text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    if line.contains(&0) {
        return Err(ReplyError::Nul);
    }
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(ReplyError::BadCode);
    }
    let code = line[..3]
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    if !(200..=599).contains(&code) {
        return Err(ReplyError::CodeOutOfRange(code));
    }
    match line.get(3) {
        // RFC 5321 4.2: the text is optional, "250" alone is a last line.
        None => Ok((code, true, &[])),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::BadSeparator),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<ServerReply>, ReplyError> {
        let mut p = ReplyParser::new();
        p.feed(input);
        let mut out = Vec::new();
        while let Some(r) = p.next()? {
            out.push(r);
        }
        Ok(out)
    }

    /// Feeds one byte at a time, which must give the same result.
    fn parse_bytewise(input: &[u8]) -> Result<Vec<ServerReply>, ReplyError> {
        let mut p = ReplyParser::new();
        let mut out = Vec::new();
        for b in input {
            p.feed(std::slice::from_ref(b));
            while let Some(r) = p.next()? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn r(code: u16, lines: &[&str]) -> ServerReply {
        ServerReply {
            code,
            lines: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn good_inputs() {
        let cases: &[(&[u8], Vec<ServerReply>)] = &[
            (b"220 mx.test ESMTP\r\n", vec![r(220, &["mx.test ESMTP"])]),
            (b"250\r\n", vec![r(250, &[""])]),
            (b"250 \r\n", vec![r(250, &[""])]),
            (
                b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
                vec![r(250, &["mx.test", "PIPELINING", "SIZE 1000"])],
            ),
            (
                b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n",
                vec![r(250, &["ok"]), r(550, &["5.1.1 no"]), r(354, &["go"])],
            ),
            (b"250 caf\xc3\xa9\r\n", vec![r(250, &["caf\u{e9}"])]),
            (b"250 \xff\r\n", vec![r(250, &["\u{fffd}"])]),
            (b"599 x\r\n", vec![r(599, &["x"])]),
            (b"250-a\r\n", vec![]),
            (b"250 incomplete", vec![]),
            (b"", vec![]),
        ];
        for (input, want) in cases {
            assert_eq!(&parse_all(input).unwrap(), want, "{input:?}");
            assert_eq!(&parse_bytewise(input).unwrap(), want, "{input:?}");
        }
    }

    #[test]
    fn hostile_inputs() {
        let long = [b"250 ".as_slice(), &[b'a'; MAX_LINE], b"\r\n"].concat();
        let endless_no_lf = [b"250 ".as_slice(), &[b'a'; MAX_LINE]].concat();
        let many: Vec<u8> = b"250-x\r\n".repeat(MAX_LINES + 1);
        let cases: &[(&[u8], ReplyError)] = &[
            (&long, ReplyError::LineTooLong),
            (&endless_no_lf, ReplyError::LineTooLong),
            (&many, ReplyError::TooManyLines),
            (
                b"250-a\r\n251 b\r\n",
                ReplyError::CodeChanged {
                    first: 250,
                    then: 251,
                },
            ),
            (b"25a ok\r\n", ReplyError::BadCode),
            (b"ok\r\n", ReplyError::BadCode),
            (b"\r\n", ReplyError::BadCode),
            (b"HTTP/1.1 400 Bad\r\n", ReplyError::BadCode),
            (b"199 x\r\n", ReplyError::CodeOutOfRange(199)),
            (b"600 x\r\n", ReplyError::CodeOutOfRange(600)),
            (b"000 x\r\n", ReplyError::CodeOutOfRange(0)),
            (b"250x\r\n", ReplyError::BadSeparator),
            (b"250 a\0b\r\n", ReplyError::Nul),
            (b"250 a\0", ReplyError::Nul),
            (b"\n", ReplyError::BadCode),
        ];
        for (input, want) in cases {
            assert_eq!(parse_all(input).as_ref(), Err(want), "{input:?}");
            assert_eq!(parse_bytewise(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn a_bare_lf_ends_a_line_as_postfix_takes_it() {
        let mut p = ReplyParser::new();
        p.feed(b"250-mx.test\n250-PIPELINING\r\n250 8BITMIME\n220 next\n");
        let r = p.next().expect("parses").expect("complete");
        assert_eq!((r.code, r.lines.len()), (250, 3));
        assert_eq!(r.lines[2], "8BITMIME");
        assert_eq!(p.next().expect("parses").map(|r| r.code), Some(220));
    }

    #[test]
    fn error_is_final() {
        let mut p = ReplyParser::new();
        p.feed(b"25a\r\n");
        assert_eq!(p.next(), Err(ReplyError::BadCode));
        p.feed(b"250 ok\r\n");
        assert_eq!(p.next(), Err(ReplyError::BadCode));
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        // Endless continuation lines of legal length, fed in chunks, with
        // the caller draining as it should: stops at MAX_LINES.
        let mut p = ReplyParser::new();
        let line = [b"250-".as_slice(), &[b'x'; 1000], b"\r\n"].concat();
        let mut err = None;
        for _ in 0..10_000 {
            p.feed(&line);
            assert!(p.buffered() <= MAX_BUFFERED);
            match p.next() {
                Ok(None) => {}
                Ok(Some(_)) => panic!("no reply expected"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err.expect("an error before 10 MB");
        assert!(
            matches!(err, ReplyError::TooMuchBuffered | ReplyError::TooManyLines),
            "{err}"
        );

        // A caller that never drains: feed refuses past the cap.
        let mut p = ReplyParser::new();
        for _ in 0..1000 {
            p.feed(&[b'2'; 1000]);
        }
        assert!(p.buffered() <= MAX_BUFFERED);
        assert_eq!(p.next(), Err(ReplyError::TooMuchBuffered));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every result is fine, panics are not.
        let mut seed: u32 = 0x1234_5678;
        let alphabet = b"0123456789 -\r\n\0\xffaZ";
        for _ in 0..2000 {
            let mut p = ReplyParser::new();
            for _ in 0..64 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let b = alphabet[(seed >> 16) as usize % alphabet.len()];
                p.feed(&[b]);
                if let Ok(Some(reply)) = p.next() {
                    assert!(reply.one_line().len() <= MAX_ONE_LINE);
                }
            }
        }
    }

    #[test]
    fn one_line_is_sanitised_and_short() {
        let reply = r(
            550,
            &[
                "5.1.1 user\tunknown\u{1b}[31m",
                "  second line ",
                "caf\u{e9}",
            ],
        );
        assert_eq!(
            reply.one_line(),
            "550 5.1.1 user?unknown?[31m second line caf?"
        );
        let long = r(250, &[&"x".repeat(1000), "more"]);
        assert_eq!(long.one_line().len(), MAX_ONE_LINE);
        assert_eq!(r(250, &[""]).one_line(), "250");
        assert!(r(250, &["a"]).is_positive());
        assert!(r(354, &["a"]).is_positive());
        assert!(r(451, &["a"]).is_transient());
        assert!(r(554, &["a"]).is_permanent());
        assert_eq!(r(250, &["a", "b"]).text(), "a\nb");
    }
}
