//! The DATA decoder: raw bytes from the wire in, the message out, in place.
//!
//! Sans-IO and bounded: it keeps a few bytes of state, never a line, and
//! decodes into the very buffer it reads from (dot-unstuffing only ever
//! shrinks), so a message of any size costs the same memory. Rules:
//! - only `<CRLF>.<CRLF>` ends the data (RFC 5321 4.1.1.4); the CRLF that ends
//!   the DATA command counts as the first one, so `.<CRLF>` at once is an empty
//!   message;
//! - a leading dot is removed (transparency, RFC 5321 4.5.2);
//! - a bare CR or bare LF anywhere poisons the message (no SMTP smuggling: a
//!   fake end such as `<LF>.<LF>` or `<CR>.<CR>` is never an end, and the
//!   transaction is refused once the real end arrives);
//! - a line over 1000 octets with its CRLF, not counting a dot added for
//!   transparency (RFC 5321 4.5.3.1.6), poisons it;
//! - more than `max_size` octets poisons it (RFC 1870 SIZE, 552);
//! - a message whose first line starts with a space or tab poisons it: a
//!   header section starts with a field name (RFC 5322 2.2), and the
//!   server writes its own `Received:` field just before the data, which
//!   such a line would continue (a client could forge our trace).
//!
//! Once poisoned, nothing more is produced, but the decoder keeps looking for
//! the real end so that the reply stays in step with the client. It also
//! counts `Received:` header fields for loop detection. It does not touch
//! files or sockets: the connection driver writes what it produces.

/// RFC 5321 4.5.3.1.6: 1000 octets including the CRLF.
pub const MAX_LINE: usize = 998;

/// Why a message was refused by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    TooBig,
    BareLineEnding,
    LineTooLong,
    /// The first line is folded (starts with SP or HT).
    FoldedStart,
    /// The sink failed (disk full, permission): set by the driver via `fail`.
    Storage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF).
    Bol,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.<CR>` at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line; only LF may follow.
    Cr,
}

/// The result of one `decode` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used; bytes after the end marker are left for the next command.
    pub consumed: usize,
    /// Output bytes now at the front of the buffer.
    pub produced: usize,
    /// The end marker was seen.
    pub done: bool,
}

/// What a successfully decoded message looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub size: u64,
    pub received_headers: usize,
}

#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    line_len: usize,
    size: u64,
    max_size: u64,
    error: Option<DataError>,
    headers: HeaderScan,
}

impl DataDecoder {
    pub fn new(max_size: u64) -> DataDecoder {
        DataDecoder {
            state: State::Bol,
            line_len: 0,
            size: 0,
            max_size,
            error: None,
            headers: HeaderScan::default(),
        }
    }

    /// Marks the message as refused and stops output. When several errors
    /// occur, the most serious wins, so the verdict never depends on how
    /// the input was split into reads (found by fuzzing: the size is
    /// counted per call, the others per byte).
    pub fn fail(&mut self, error: DataError) {
        let rank = |e: DataError| match e {
            DataError::TooBig => 0,
            DataError::FoldedStart => 1,
            DataError::LineTooLong => 2,
            DataError::BareLineEnding => 3,
            DataError::Storage => 4,
        };
        if self.error.is_none_or(|old| rank(error) > rank(old)) {
            self.error = Some(error);
        }
    }

    /// Decodes `buf` in place. Afterwards `buf[..produced]` holds the decoded
    /// bytes; the caller must write them out before the next call.
    /// The message has already grown past the size limit.
    pub fn too_big(&self) -> bool {
        self.error == Some(DataError::TooBig)
    }

    pub fn decode(&mut self, buf: &mut [u8]) -> Decoded {
        let mut out = 0;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Mid => {
                    // The hot path: copy a run up to the next CR or LF at once.
                    let run = buf[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(buf.len() - i);
                    buf.copy_within(i..i + run, out);
                    out += run;
                    self.line_len += run;
                    i += run;
                    if i == buf.len() {
                        break;
                    }
                    if buf[i] == b'\r' {
                        // Written now so output never runs ahead of input
                        // (in-place); a bare CR poisons the message anyway.
                        buf[out] = b'\r';
                        out += 1;
                        self.state = State::Cr;
                    } else {
                        self.fail(DataError::BareLineEnding);
                    }
                    i += 1;
                    continue;
                }
                State::Bol => match b {
                    b'.' => {
                        // Not counted: the 1000-octet limit excludes the
                        // dot added for transparency (RFC 5321 4.5.3.1.6).
                        self.state = State::Dot;
                    }
                    b'\r' => {
                        buf[out] = b'\r';
                        out += 1;
                        self.state = State::Cr;
                    }
                    b'\n' => {
                        self.fail(DataError::BareLineEnding);
                        self.state = State::Mid;
                    }
                    _ => {
                        buf[out] = b;
                        out += 1;
                        self.line_len += 1;
                        self.state = State::Mid;
                    }
                },
                State::Dot => match b {
                    b'\r' => self.state = State::DotCr,
                    b'\n' => {
                        self.fail(DataError::BareLineEnding);
                        self.state = State::Mid;
                    }
                    _ => {
                        // Transparency: the leading dot is dropped.
                        buf[out] = b;
                        out += 1;
                        self.line_len += 1;
                        self.state = State::Mid;
                    }
                },
                State::DotCr => {
                    if b == b'\n' {
                        let produced = self.account(buf, out);
                        self.state = State::Bol;
                        return Decoded {
                            consumed: i + 1,
                            produced,
                            done: true,
                        };
                    }
                    self.fail(DataError::BareLineEnding);
                    self.state = State::Mid;
                    continue; // reprocess this byte inside the line
                }
                State::Cr => {
                    if b == b'\n' {
                        if self.line_len > MAX_LINE {
                            self.fail(DataError::LineTooLong);
                        }
                        buf[out] = b'\n';
                        out += 1;
                        self.line_len = 0;
                        self.state = State::Bol;
                    } else {
                        self.fail(DataError::BareLineEnding);
                        self.state = State::Mid;
                        continue;
                    }
                }
            }
            i += 1;
        }
        if self.line_len > MAX_LINE {
            self.fail(DataError::LineTooLong);
        }
        Decoded {
            consumed: buf.len(),
            produced: self.account(buf, out),
            done: false,
        }
    }

    /// Counts the produced bytes against the size limit and the header scan;
    /// returns how many the caller may write (none once refused).
    fn account(&mut self, buf: &[u8], out: usize) -> usize {
        if self.error.is_some() {
            return 0;
        }
        if self.size == 0 && matches!(buf[..out].first(), Some(b' ' | b'\t')) {
            self.fail(DataError::FoldedStart);
            return 0;
        }
        self.size += out as u64;
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
            return 0;
        }
        self.headers.observe(&buf[..out]);
        out
    }

    /// The verdict once `done` was seen.
    pub fn finish(&self) -> Result<Stats, DataError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(Stats {
                size: self.size,
                received_headers: self.headers.received,
            }),
        }
    }
}

/// Counts `Received:` fields in the header section (RFC 5322 2.2), stopping
/// at the first empty line. Sees only CRLF-clean output.
#[derive(Debug, Default)]
struct HeaderScan {
    done: bool,
    /// Position in the current line; `usize::MAX` once it cannot match.
    pos: usize,
    received: usize,
}

impl HeaderScan {
    const NAME: &'static [u8] = b"received:";

    fn observe(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            match b {
                b'\n' => {
                    if self.pos == 1 {
                        // The line was just CR: the empty line ending the header.
                        self.done = true;
                    }
                    self.pos = 0;
                }
                _ if self.pos == usize::MAX => {}
                b'\r' if self.pos == 0 => self.pos = 1,
                _ if self.pos < Self::NAME.len()
                    && b.eq_ignore_ascii_case(&Self::NAME[self.pos]) =>
                {
                    self.pos += 1;
                    if self.pos == Self::NAME.len() {
                        self.received += 1;
                        self.pos = usize::MAX;
                    }
                }
                _ => self.pos = usize::MAX,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns the output, the bytes
    /// left after the end marker (None if no end was found) and the verdict.
    fn run(
        input: &[u8],
        chunk: usize,
        max: u64,
    ) -> (Vec<u8>, Option<Vec<u8>>, Result<Stats, DataError>) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + chunk).min(input.len());
            let mut buf = input[pos..end].to_vec();
            let r = d.decode(&mut buf);
            out.extend_from_slice(&buf[..r.produced]);
            pos += r.consumed;
            if r.done {
                return (out, Some(input[pos..].to_vec()), d.finish());
            }
        }
        (out, None, d.finish())
    }

    fn every_chunking(
        input: &[u8],
        max: u64,
    ) -> (Vec<u8>, Option<Vec<u8>>, Result<Stats, DataError>) {
        let first = run(input, input.len().max(1), max);
        for chunk in 1..input.len().min(12) {
            let other = run(input, chunk, max);
            // A refused message's partial output is thrown away, so only a
            // good one's output must not depend on how the input was split.
            if first.2.is_ok() {
                assert_eq!(other.0, first.0, "chunk size {chunk}: output differs");
            }
            assert_eq!(
                (&other.1, &other.2),
                (&first.1, &first.2),
                "chunk size {chunk} differs"
            );
        }
        first
    }

    #[test]
    fn unstuffs_and_ends() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            (b".\r\n", b"", b""),
            (b"a\r\n.\r\n", b"a\r\n", b""),
            (b"..\r\n.\r\n", b".\r\n", b""),
            (b"..x\r\n.y\r\n.\r\nQUIT\r\n", b".x\r\ny\r\n", b"QUIT\r\n"),
            (b"a.\r\n.\r\n", b"a.\r\n", b""),
            (b"\r\n\r\n.\r\n", b"\r\n\r\n", b""),
        ];
        for (input, want, rest) in cases {
            let (out, left, verdict) = every_chunking(input, 1000);
            assert_eq!(out, *want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(left.as_deref(), Some(*rest));
            assert!(verdict.is_ok());
        }
    }

    #[test]
    fn fake_ends_never_end_and_poison() {
        let fakes: &[&[u8]] = &[
            b"a\n.\n",
            b"a\r.\r",
            b"a\n.\r\n",
            b"a\r\n.\n",
            b"a\r.\r\n",
            b"a\r\n.\r",
            b"a\n.\nMAIL FROM:<x@y>\r\n",
        ];
        for fake in fakes {
            // Without the real end, it is never done.
            let (_, left, _) = every_chunking(fake, 1000);
            assert_eq!(
                left,
                None,
                "{:?} ended the data",
                String::from_utf8_lossy(fake)
            );
            // With the real end after it, it ends there, refused.
            let mut input = fake.to_vec();
            input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
            let (_, left, verdict) = every_chunking(&input, 1000);
            assert_eq!(left.as_deref(), Some(&b"NOOP\r\n"[..]));
            assert_eq!(verdict, Err(DataError::BareLineEnding));
        }
    }

    #[test]
    fn size_limit() {
        let (_, left, verdict) = every_chunking(b"0123456789\r\n.\r\n", 12);
        assert_eq!(left.as_deref(), Some(&b""[..]));
        assert_eq!(verdict.map(|s| s.size), Ok(12));
        let (out, left, verdict) = every_chunking(b"0123456789\r\nab\r\n.\r\n", 12);
        assert_eq!(left.as_deref(), Some(&b""[..]));
        assert_eq!(verdict, Err(DataError::TooBig));
        assert!(out.len() <= 12);
    }

    #[test]
    fn line_length_limit() {
        let ok = [vec![b'x'; MAX_LINE], b"\r\n.\r\n".to_vec()].concat();
        assert!(run(&ok, 4096, 1 << 20).2.is_ok());
        let long = [vec![b'x'; MAX_LINE + 1], b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(run(&long, 4096, 1 << 20).2, Err(DataError::LineTooLong));
        assert_eq!(run(&long, 7, 1 << 20).2, Err(DataError::LineTooLong));
        // The dot added for transparency is not counted (RFC 5321
        // 4.5.3.1.6): a 998-octet line that starts with a dot is 999 on the
        // wire, and fine.
        let stuffed = |n: usize| [b"..".to_vec(), vec![b'x'; n], b"\r\n.\r\n".to_vec()].concat();
        assert!(run(&stuffed(MAX_LINE - 1), 100, 1 << 20).2.is_ok());
        assert_eq!(
            run(&stuffed(MAX_LINE), 100, 1 << 20).2,
            Err(DataError::LineTooLong)
        );
    }

    #[test]
    fn a_folded_first_line_is_refused() {
        // It would continue the Received: field the server writes first.
        for input in [
            &b" by forged.example; Mon, 1 Jan 2024\r\nSubject: x\r\n\r\nhi\r\n.\r\n"[..],
            b"\tx\r\n.\r\nNOOP\r\n",
            b".\tx\r\n.\r\n",
        ] {
            let (_, left, verdict) = every_chunking(input, 1 << 20);
            assert!(left.is_some(), "{:?}", String::from_utf8_lossy(input));
            assert_eq!(verdict, Err(DataError::FoldedStart));
        }
        // Folding anywhere later is ordinary.
        let (_, _, verdict) = every_chunking(b"Subject: a\r\n b\r\n\r\n c\r\n.\r\n", 1 << 20);
        assert!(verdict.is_ok());
    }

    #[test]
    fn counts_received_headers_only_in_header() {
        let msg = b"Received: a\r\nreceived: b\r\nX-Received: c\r\nSubject: Received: d\r\n\r\nReceived: body\r\n.\r\n";
        let (_, _, verdict) = every_chunking(msg, 1 << 20);
        assert_eq!(verdict.map(|s| s.received_headers), Ok(2));
    }

    #[test]
    fn storage_failure_wins_and_still_finds_end() {
        let mut d = DataDecoder::new(100);
        d.fail(DataError::Storage);
        let mut buf = b"hello\r\n.\r\nQUIT\r\n".to_vec();
        let r = d.decode(&mut buf);
        assert!(r.done);
        assert_eq!(r.produced, 0);
        assert_eq!(r.consumed, 10);
        assert_eq!(d.finish(), Err(DataError::Storage));
    }
}
