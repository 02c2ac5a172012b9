//! The envelope of a queued message (at the front of `queue/<id>`, and in
//! `queue/<id>.env` once delivery updated it): who sent it,
//! to whom, and how far delivery got for each recipient (RFC 5321 section 2.3.1
//! calls this the SMTP envelope; it is kept apart from the message content).
//!
//! The format is versioned, line based and strict, so a torn or tampered file
//! is rejected instead of half-read:
//!
//! ```text
//! postling-envelope 1
//! id 01H8Z2K4M7Q0003F0001
//! arrived 1714000000
//! client [192.168.1.5]%20helo=printer.lan
//! from -
//! attempts 2
//! tried 1714000300
//! warned 0
//! rcpt pending alice@example.com
//! rcpt deferred carol@example.org 451%204.3.0%20try%20later
//! rcpt failed bob@example.net 550%205.1.1%20no%20such%20user
//! rcpt delivered dave@example.com
//! end
//! ```
//!
//! Every line ends with LF. Every value is escaped: bytes outside
//! `0x21..=0x7E`, and `%`, are written `%XX` (upper-case hex), so no value can
//! contain a space or a line break and no address or reason can inject a field
//! or a line. The empty value is written `-` (and the value `-` itself as
//! `%2D`). The keys come in the fixed order shown, one `rcpt` line per
//! recipient, and the last line is `end`, so truncation is detected. The
//! parser accepts only what [`Envelope::to_bytes`] writes (canonical escapes,
//! canonical numbers), and never panics: it is a fuzz target.
//!
//! This file owns the format only; reading and writing the file belongs to
//! [`super::queue`].

use std::fmt;

const MAGIC: &str = "postling-envelope";
const VERSION: &str = "1";

/// A queued message's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The queue id (also the queue directory's name).
    pub id: String,
    /// When the message was accepted, in Unix seconds.
    pub arrived: u64,
    /// The reverse-path; `""` is the null reverse-path `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Free text about the client, e.g. `[192.168.1.5] helo=printer.lan`; informational.
    pub client: String,
    /// Delivery attempts made so far (the retry schedule is a function of it).
    pub attempts: u32,
    /// When the last attempt ended, in Unix seconds; 0 before the first.
    pub tried: u64,
    /// Whether the "delivery delayed" notice has been sent to the sender.
    pub warned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: String,
    pub state: RcptState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptState {
    /// Not tried yet.
    Pending,
    /// Tried and failed temporarily; `reason` is the last error.
    Deferred {
        reason: String,
    },
    Delivered,
    Failed {
        reason: String,
    },
}

impl RcptState {
    /// Delivered or failed: nothing more will be tried.
    pub fn is_final(&self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Failed { .. })
    }
}

/// Why an envelope file was rejected, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError {
    pub line: usize,
    pub kind: EnvelopeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeErrorKind {
    /// The first line is not `postling-envelope <version>`.
    NotAnEnvelope,
    /// The first line names a version this build does not read.
    UnknownVersion,
    /// A line whose key is not one of the known keys.
    UnknownKey,
    /// A known key appeared where the named field was required.
    MissingField(&'static str),
    /// A header key (`id`, `arrived`, ... `warned`) appeared twice.
    DuplicateField(&'static str),
    /// Too few or too many space-separated fields on the line.
    FieldCount,
    /// A byte that the writer would have escaped (space runs, control bytes, ...).
    BadByte,
    /// `%` not followed by two upper-case hex digits, or an escape the writer would not produce.
    BadEscape,
    /// An unescaped value is not UTF-8.
    NotUtf8,
    /// A number (`arrived`, `attempts`, `tried`, `warned`) is not canonical decimal, or out of range.
    BadNumber,
    /// A `rcpt` state other than `pending`, `deferred`, `delivered`, `failed`.
    UnknownState,
    /// The input ends before the `end` line (truncated file).
    MissingEnd,
    /// The last line has no terminating LF.
    UnterminatedLine,
    /// Bytes after the `end` line.
    TrailingData,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use EnvelopeErrorKind::*;
        write!(f, "envelope line {}: ", self.line)?;
        match &self.kind {
            NotAnEnvelope => write!(f, "not a postling envelope (expected `{MAGIC} {VERSION}`)"),
            UnknownVersion => write!(f, "unknown envelope version (this build reads {VERSION})"),
            UnknownKey => write!(f, "unknown key"),
            MissingField(k) => write!(f, "missing field `{k}`"),
            DuplicateField(k) => write!(f, "duplicate field `{k}`"),
            FieldCount => write!(f, "wrong number of fields"),
            BadByte => write!(f, "unescaped space or control byte"),
            BadEscape => write!(f, "bad %-escape"),
            NotUtf8 => write!(f, "value is not UTF-8"),
            BadNumber => write!(f, "not a decimal number"),
            UnknownState => write!(f, "unknown recipient state"),
            MissingEnd => write!(f, "missing `end` line (truncated file?)"),
            UnterminatedLine => write!(f, "line not terminated by LF (truncated file?)"),
            TrailingData => write!(f, "data after `end`"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

impl From<EnvelopeError> for std::io::Error {
    fn from(e: EnvelopeError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Header keys in their required order, then the repeated `rcpt`, then `end`.
const HEADER_KEYS: [&str; 7] = [
    "id", "arrived", "client", "from", "attempts", "tried", "warned",
];

impl Envelope {
    /// A freshly queued message: every recipient pending, never tried.
    pub fn new(
        id: &str,
        arrived: u64,
        sender: &str,
        client: String,
        recipients: &[&str],
    ) -> Envelope {
        Envelope {
            id: id.to_owned(),
            arrived,
            sender: sender.to_owned(),
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: (*a).to_owned(),
                    state: RcptState::Pending,
                })
                .collect(),
            client,
            attempts: 0,
            tried: 0,
            warned: false,
        }
    }

    /// Serializes to the envelope file format (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + 64 * self.recipients.len());
        out.extend_from_slice(MAGIC.as_bytes());
        out.push(b' ');
        out.extend_from_slice(VERSION.as_bytes());
        out.push(b'\n');
        field(&mut out, "id", &[&self.id]);
        out.extend_from_slice(format!("arrived {}\n", self.arrived).as_bytes());
        field(&mut out, "client", &[&self.client]);
        field(&mut out, "from", &[&self.sender]);
        out.extend_from_slice(format!("attempts {}\n", self.attempts).as_bytes());
        out.extend_from_slice(format!("tried {}\n", self.tried).as_bytes());
        out.extend_from_slice(format!("warned {}\n", u8::from(self.warned)).as_bytes());
        for r in &self.recipients {
            match &r.state {
                RcptState::Pending => field(&mut out, "rcpt pending", &[&r.address]),
                RcptState::Deferred { reason } => {
                    field(&mut out, "rcpt deferred", &[&r.address, reason])
                }
                RcptState::Delivered => field(&mut out, "rcpt delivered", &[&r.address]),
                RcptState::Failed { reason } => {
                    field(&mut out, "rcpt failed", &[&r.address, reason])
                }
            }
        }
        out.extend_from_slice(b"end\n");
        out
    }

    /// Parses an envelope file; accepts exactly what [`Envelope::to_bytes`] writes.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let mut lines = Lines {
            rest: bytes,
            line: 0,
        };
        let err = |line, kind| EnvelopeError { line, kind };

        let (n, first) = lines
            .next_line()?
            .ok_or(err(1, EnvelopeErrorKind::NotAnEnvelope))?;
        match split_fields(first) {
            Some(f) if f.len() == 2 && f[0] == MAGIC.as_bytes() => {
                if f[1] != VERSION.as_bytes() {
                    return Err(err(n, EnvelopeErrorKind::UnknownVersion));
                }
            }
            _ => return Err(err(n, EnvelopeErrorKind::NotAnEnvelope)),
        }

        let mut header: [String; 7] = Default::default();
        for (i, want) in HEADER_KEYS.iter().enumerate() {
            let Some((n, line)) = lines.next_line()? else {
                return Err(err(lines.line + 1, EnvelopeErrorKind::MissingEnd));
            };
            let fields = split_fields(line).ok_or(err(n, EnvelopeErrorKind::BadByte))?;
            let key = fields[0];
            if key != want.as_bytes() {
                return Err(err(n, misplaced(key, i)));
            }
            if fields.len() != 2 {
                return Err(err(n, EnvelopeErrorKind::FieldCount));
            }
            header[i] = unescape(fields[1]).map_err(|k| err(n, k))?;
        }
        let [id, arrived, client, sender, attempts, tried, warned] = header;
        let arrived = parse_u64(&arrived).ok_or(err(3, EnvelopeErrorKind::BadNumber))?;
        let attempts = parse_u64(&attempts)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(err(6, EnvelopeErrorKind::BadNumber))?;
        let tried = parse_u64(&tried).ok_or(err(7, EnvelopeErrorKind::BadNumber))?;
        let warned = match warned.as_str() {
            "0" => false,
            "1" => true,
            _ => return Err(err(8, EnvelopeErrorKind::BadNumber)),
        };

        let mut recipients = Vec::new();
        loop {
            let Some((n, line)) = lines.next_line()? else {
                return Err(err(lines.line + 1, EnvelopeErrorKind::MissingEnd));
            };
            let fields = split_fields(line).ok_or(err(n, EnvelopeErrorKind::BadByte))?;
            match fields[0] {
                b"end" => {
                    if fields.len() != 1 {
                        return Err(err(n, EnvelopeErrorKind::FieldCount));
                    }
                    if !lines.rest.is_empty() {
                        return Err(err(n + 1, EnvelopeErrorKind::TrailingData));
                    }
                    break;
                }
                b"rcpt" => recipients.push(parse_rcpt(&fields).map_err(|k| err(n, k))?),
                key => return Err(err(n, misplaced(key, HEADER_KEYS.len()))),
            }
        }
        Ok(Envelope {
            id,
            arrived,
            sender,
            recipients,
            client,
            attempts,
            tried,
            warned,
        })
    }
}

/// The error for `key` found where field number `expected` (an index into
/// [`HEADER_KEYS`], or its length for the `rcpt`/`end` part) was due.
fn misplaced(key: &[u8], expected: usize) -> EnvelopeErrorKind {
    let due = || {
        // `expected` indexes HEADER_KEYS in the header part; past it every
        // known key is handled by the caller, so "end" is only a fallback.
        EnvelopeErrorKind::MissingField(HEADER_KEYS.get(expected).copied().unwrap_or("end"))
    };
    match HEADER_KEYS.iter().position(|k| k.as_bytes() == key) {
        Some(pos) if pos < expected => EnvelopeErrorKind::DuplicateField(HEADER_KEYS[pos]),
        Some(_) => due(),
        None if key == b"rcpt" || key == b"end" => due(),
        None => EnvelopeErrorKind::UnknownKey,
    }
}

fn parse_rcpt(fields: &[&[u8]]) -> Result<Recipient, EnvelopeErrorKind> {
    let state = match (fields.get(1).copied(), fields.len()) {
        (Some(b"pending"), 3) => RcptState::Pending,
        (Some(b"deferred"), 4) => RcptState::Deferred {
            reason: unescape(fields[3])?,
        },
        (Some(b"delivered"), 3) => RcptState::Delivered,
        (Some(b"failed"), 4) => RcptState::Failed {
            reason: unescape(fields[3])?,
        },
        (Some(b"pending" | b"deferred" | b"delivered" | b"failed"), _) | (None, _) => {
            return Err(EnvelopeErrorKind::FieldCount)
        }
        (Some(_), _) => return Err(EnvelopeErrorKind::UnknownState),
    };
    let address = unescape(fields[2])?;
    Ok(Recipient { address, state })
}

/// Writes `key` and the escaped `values`, space separated, and LF.
fn field(out: &mut Vec<u8>, key: &str, values: &[&str]) {
    out.extend_from_slice(key.as_bytes());
    for v in values {
        out.push(b' ');
        escape_into(out, v);
    }
    out.push(b'\n');
}

fn needs_escape(b: u8) -> bool {
    !(0x21..=0x7E).contains(&b) || b == b'%'
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn escape_into(out: &mut Vec<u8>, value: &str) {
    match value {
        "" => out.push(b'-'),
        "-" => out.extend_from_slice(b"%2D"),
        _ => {
            for &b in value.as_bytes() {
                if needs_escape(b) {
                    out.extend_from_slice(&[
                        b'%',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 15)],
                    ]);
                } else {
                    out.push(b);
                }
            }
        }
    }
}

fn unhex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Reverses [`escape_into`], rejecting anything it would not have produced.
fn unescape(field: &[u8]) -> Result<String, EnvelopeErrorKind> {
    match field {
        b"-" => return Ok(String::new()),
        b"%2D" => return Ok("-".to_owned()),
        _ => {}
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b == b'%' {
            let hi = field.get(i + 1).copied().and_then(unhex);
            let lo = field.get(i + 2).copied().and_then(unhex);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(EnvelopeErrorKind::BadEscape);
            };
            let decoded = hi << 4 | lo;
            if !needs_escape(decoded) {
                return Err(EnvelopeErrorKind::BadEscape);
            }
            out.push(decoded);
            i += 3;
        } else {
            // split_fields only yields bytes in 0x21..=0x7E.
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| EnvelopeErrorKind::NotUtf8)
}

/// A canonical decimal u64: digits only, no leading zero (except "0"), no overflow.
fn parse_u64(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Splits a line on single spaces (always at least one field, so `fields[0]`
/// exists; the parser checks the count before any other index). `None` if a byte is outside `0x21..=0x7E`
/// (other than the single separating spaces) or a field is empty.
fn split_fields(line: &[u8]) -> Option<Vec<&[u8]>> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let ok = fields
        .iter()
        .all(|f| !f.is_empty() && f.iter().all(|b| (0x21..=0x7E).contains(b)));
    ok.then_some(fields)
}

/// LF-terminated lines with 1-based numbers.
struct Lines<'a> {
    rest: &'a [u8],
    line: usize,
}

impl<'a> Lines<'a> {
    /// The next line without its LF; `Ok(None)` at the end of input; an error
    /// for a final line with no LF.
    fn next_line(&mut self) -> Result<Option<(usize, &'a [u8])>, EnvelopeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        self.line += 1;
        match self.rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line = &self.rest[..end];
                self.rest = &self.rest[end + 1..];
                Ok(Some((self.line, line)))
            }
            None => Err(EnvelopeError {
                line: self.line,
                kind: EnvelopeErrorKind::UnterminatedLine,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EnvelopeErrorKind::*;
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            id: "0ABCDEF1234567890XYZ".into(),
            arrived: 1_714_000_000,
            sender: "bob@example.com".into(),
            recipients: vec![
                Recipient {
                    address: "alice@example.com".into(),
                    state: RcptState::Pending,
                },
                Recipient {
                    address: "carol@example.org".into(),
                    state: RcptState::Delivered,
                },
                Recipient {
                    address: "dave@example.net".into(),
                    state: RcptState::Failed {
                        reason: "550 5.1.1 no such user".into(),
                    },
                },
            ],
            client: "[192.168.1.5] helo=printer.lan".into(),
            attempts: 0,
            tried: 0,
            warned: false,
        }
    }

    fn roundtrip(e: &Envelope) {
        let bytes = e.to_bytes();
        assert_eq!(&Envelope::parse(&bytes).expect("parses"), e);
        // Every line is printable ASCII with single spaces.
        for line in bytes.split(|&b| b == b'\n') {
            assert!(line.iter().all(|&b| (0x20..=0x7E).contains(&b)), "{line:?}");
        }
    }

    #[test]
    fn sample_format() {
        let text = String::from_utf8(sample().to_bytes()).expect("ascii");
        assert_eq!(
            text,
            "postling-envelope 1\nid 0ABCDEF1234567890XYZ\narrived 1714000000\n\
             client [192.168.1.5]%20helo=printer.lan\nfrom bob@example.com\n\
             attempts 0\ntried 0\nwarned 0\n\
             rcpt pending alice@example.com\nrcpt delivered carol@example.org\n\
             rcpt failed dave@example.net 550%205.1.1%20no%20such%20user\nend\n"
        );
        roundtrip(&sample());
    }

    #[test]
    fn roundtrip_hostile_values() {
        let hostile = [
            "",
            "-",
            "--",
            "%",
            "%2D",
            "a b",
            "line\r\nrcpt pending evil@x",
            "nul\0byte",
            "\n",
            " ",
            "tab\there",
            "ünïcødé@exämple.org",
            "日本語",
            "end",
            "\x7f\x01",
        ];
        for h in hostile {
            let mut e = sample();
            e.sender = h.into();
            e.client = h.into();
            e.id = h.into();
            e.recipients.push(Recipient {
                address: h.into(),
                state: RcptState::Pending,
            });
            e.recipients.push(Recipient {
                address: h.into(),
                state: RcptState::Failed { reason: h.into() },
            });
            e.recipients.push(Recipient {
                address: h.into(),
                state: RcptState::Deferred { reason: h.into() },
            });
            roundtrip(&e);
            assert_eq!(
                Envelope::parse(&e.to_bytes())
                    .expect("parses")
                    .recipients
                    .len(),
                6
            );
        }
    }

    #[test]
    fn roundtrip_edge_envelopes() {
        let mut e = sample();
        e.recipients.clear();
        e.arrived = 0;
        roundtrip(&e);
        e.arrived = u64::MAX;
        e.attempts = u32::MAX;
        e.tried = u64::MAX;
        e.warned = true;
        roundtrip(&e);
        e.sender.clear();
        assert!(String::from_utf8(e.to_bytes())
            .expect("ascii")
            .contains("\nfrom -\n"));
        roundtrip(&e);
    }

    /// The sample text with `from` replaced by `to` (must occur).
    fn edit(from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8(sample().to_bytes()).expect("ascii");
        assert!(text.contains(from), "{from}");
        text.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn minimal_envelope_parses() {
        let e = Envelope::parse(
            b"postling-envelope 1\nid X\narrived 1\nclient -\nfrom -\nattempts 0\ntried 0\nwarned 0\nend\n",
        )
            .expect("minimal envelope");
        assert_eq!((e.id.as_str(), e.arrived, e.sender.as_str()), ("X", 1, ""));
        assert!(e.recipients.is_empty());
    }

    #[test]
    fn rejects_malformed() {
        // (input, line, kind) — one case a line.
        let cases: Vec<(Vec<u8>, usize, EnvelopeErrorKind)> = vec![
            (b"".to_vec(), 1, NotAnEnvelope),
            (
                edit("postling-envelope 1", "postling-envelope 2"),
                1,
                UnknownVersion,
            ),
            (
                edit("postling-envelope 1", "postling-envelope"),
                1,
                NotAnEnvelope,
            ),
            (edit("postling-envelope 1", "hello 1"), 1, NotAnEnvelope),
            (edit("\narrived ", "\nbogus 1\narrived "), 3, UnknownKey),
            (edit("rcpt pending", "bcc pending"), 9, UnknownKey),
            (edit("id 0ABCDEF1234567890XYZ\n", ""), 2, MissingField("id")),
            (
                edit("client [192.168.1.5]%20helo=printer.lan\n", ""),
                4,
                MissingField("client"),
            ),
            (edit("from bob@example.com\n", ""), 5, MissingField("from")),
            (
                edit("rcpt pending", "id X\nrcpt pending"),
                9,
                DuplicateField("id"),
            ),
            (
                edit("rcpt pending", "from x\nrcpt pending"),
                9,
                DuplicateField("from"),
            ),
            (edit("arrived 1714000000", "arrived 17x"), 3, BadNumber),
            (edit("arrived 1714000000", "arrived 01"), 3, BadNumber),
            (
                edit("arrived 1714000000", "arrived 18446744073709551616"),
                3,
                BadNumber,
            ),
            (edit("arrived 1714000000", "arrived -"), 3, BadNumber),
            (
                edit("from bob@example.com", "from bob@example.com extra"),
                5,
                FieldCount,
            ),
            (edit("from bob@example.com", "from  bob"), 5, BadByte),
            (edit("from bob@example.com", "from bob\r"), 5, BadByte),
            (edit("from bob@example.com", "from bob\tx"), 5, BadByte),
            (edit("from bob@example.com", "from b\u{e9}b"), 5, BadByte),
            (edit("from bob@example.com", "from bob "), 5, BadByte),
            (edit("from bob@example.com", "from bob%2"), 5, BadEscape),
            (edit("from bob@example.com", "from bob%zz"), 5, BadEscape),
            (edit("from bob@example.com", "from bob%0a"), 5, BadEscape),
            (edit("from bob@example.com", "from bob%41"), 5, BadEscape),
            (edit("from bob@example.com", "from a%2Db"), 5, BadEscape),
            (edit("from bob@example.com", "from %FF"), 5, NotUtf8),
            (
                edit(
                    "rcpt pending alice@example.com",
                    "rcpt maybe alice@example.com",
                ),
                9,
                UnknownState,
            ),
            (
                edit("rcpt pending alice@example.com", "rcpt pending"),
                9,
                FieldCount,
            ),
            (
                edit("rcpt pending alice@example.com", "rcpt"),
                9,
                FieldCount,
            ),
            (
                edit("rcpt pending alice@example.com", "rcpt pending a why"),
                9,
                FieldCount,
            ),
            (
                edit(
                    "rcpt failed dave@example.net 550",
                    "rcpt failed dave@example.net",
                ),
                11,
                FieldCount,
            ),
            (edit("end\n", ""), 12, MissingEnd),
            (edit("end\n", "end"), 12, UnterminatedLine),
            (edit("end\n", "end now\n"), 12, FieldCount),
            (edit("end\n", "end\n\n"), 13, TrailingData),
            (edit("end\n", "end\nend\n"), 13, TrailingData),
            (edit("attempts 0", "attempts 4294967296"), 6, BadNumber),
            (edit("tried 0", "tried x"), 7, BadNumber),
            (edit("warned 0", "warned 2"), 8, BadNumber),
            (edit("attempts 0\n", ""), 6, MissingField("attempts")),
            (
                edit(
                    "rcpt pending alice@example.com",
                    "rcpt deferred alice@example.com",
                ),
                9,
                FieldCount,
            ),
            (b"postling-envelope 1\nid X\n".to_vec(), 3, MissingEnd),
        ];
        for (input, line, kind) in cases {
            let e = Envelope::parse(&input).expect_err(&String::from_utf8_lossy(&input));
            assert_eq!(
                (e.line, &e.kind),
                (line, &kind),
                "{}",
                String::from_utf8_lossy(&input)
            );
            assert!(e
                .to_string()
                .starts_with(&format!("envelope line {line}: ")));
        }
    }

    /// A small xorshift generator: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Parse must never panic; whatever it accepts must re-serialize to the
    /// same bytes (the format is canonical).
    fn check(input: &[u8]) {
        if let Ok(e) = Envelope::parse(input) {
            assert_eq!(e.to_bytes(), input, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn never_panics_on_mutations() {
        let mut e = sample();
        e.sender = "weird %\r\n\0 ü".into();
        let base = e.to_bytes();
        for len in 0..=base.len() {
            check(&base[..len]);
            check(&base[len..]);
        }
        let alphabet = b"% -\n\r\0AZaz09%2D\xff\xc3end rcpt";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let mut v = base.clone();
            for _ in 0..1 + rng.below(4) {
                let pos = rng.below(v.len() + 1);
                match rng.below(4) {
                    0 if pos < v.len() => v[pos] = alphabet[rng.below(alphabet.len())],
                    1 if pos < v.len() => {
                        v.remove(pos);
                    }
                    2 => v.insert(pos, alphabet[rng.below(alphabet.len())]),
                    _ => v.truncate(pos),
                }
            }
            check(&v);
        }
        for _ in 0..2_000 {
            let v: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            check(&v);
        }
    }
}
