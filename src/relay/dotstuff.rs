//! The outbound DATA encoder: a queued message in, CRLF-clean dot-stuffed
//! wire bytes out.
//!
//! Owns RFC 5321 4.5.2 transparency (a line starting with `.` gets another
//! `.`), line-ending normalisation (2.3.8: a bare LF or bare CR becomes CRLF,
//! so what we send can only be read one way, whatever a receiver's parser
//! does with bare line ends: no SMTP smuggling through us), and the
//! terminator (the message always ends with CRLF before `.` CRLF). It works
//! on chunks of any size, keeping two bits of state between them. It does not
//! fold over-long lines (RFC 5321 4.5.3.1.6's 1000 octets): the inbound side
//! already bounds them, and rewriting a body would break DKIM signatures.

/// Encodes a message in chunks: `encode` each chunk, then `finish` once.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    /// The last byte written ended a line (or nothing was written yet).
    at_line_start: bool,
    /// The last input byte was a CR, already written as CRLF; an LF right
    /// after it belongs to it.
    after_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new()
    }
}

impl DotStuffer {
    pub fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            after_cr: false,
        }
    }

    /// Appends the encoding of `input` to `out`.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 32 + 2);
        for &b in input {
            match b {
                b'\r' => {
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                    self.after_cr = true;
                }
                b'\n' => {
                    if !self.after_cr {
                        out.extend_from_slice(b"\r\n");
                        self.at_line_start = true;
                    }
                    self.after_cr = false;
                }
                _ => {
                    if self.at_line_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    self.at_line_start = false;
                    self.after_cr = false;
                }
            }
        }
    }

    /// Appends the end of the message: a CRLF if the last line lacked one,
    /// then `.` CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        *self = DotStuffer::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> Vec<u8> {
        let mut d = DotStuffer::new();
        let mut out = Vec::new();
        d.encode(input, &mut out);
        d.finish(&mut out);
        out
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
            (b"a\rb", b"a\r\nb\r\n.\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
            (b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"..x\r\n", b"...x\r\n.\r\n"),
            (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            (b" .x", b" .x\r\n.\r\n"),
            (b"\r\n\r\n", b"\r\n\r\n.\r\n"),
            (b"\xff\0\x80", b"\xff\0\x80\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(whole(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let input: &[u8] = b"Subject: x\r\n\r\n.leading\r\nbare\nlf\rcr\r\r\n..two\n.\r\nend";
        let want = whole(input);
        for split in 0..=input.len() {
            for size in 1..=4 {
                let mut d = DotStuffer::new();
                let mut out = Vec::new();
                d.encode(&input[..split], &mut out);
                for chunk in input[split..].chunks(size) {
                    d.encode(chunk, &mut out);
                }
                d.finish(&mut out);
                assert_eq!(out, want, "split at {split}, chunks of {size}");
            }
        }
    }

    #[test]
    fn output_has_only_crlf_line_ends() {
        let out = whole(b"\r\r\n\n\r\n\r.\n.\r");
        for (i, &b) in out.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "{out:?}");
            }
            if b == b'\n' {
                assert_eq!(out[i - 1], b'\r', "{out:?}");
            }
        }
        assert!(out.ends_with(b"\r\n.\r\n"));
    }
}
