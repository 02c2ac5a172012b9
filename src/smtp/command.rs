//! The SMTP command parser: one command line in, a borrowed `Command` out.
//!
//! Parses in place (STYLE habit 2): every field borrows from the caller's line
//! buffer and nothing is allocated, which `tests/alloc.rs` proves. Grammar per
//! RFC 5321 4.1.1 (verbs), 4.1.2 (paths: Mailbox, Local-part, Domain,
//! address-literal, source routes, which are parsed and ignored per
//! 4.1.1.3/Appendix C), 4.5.3.1 (size limits), with the MAIL parameters of
//! RFC 1870 (SIZE), RFC 6152 (BODY=8BITMIME) and RFC 6531 (SMTPUTF8, and UTF-8
//! in addresses). The line handed in has its CRLF already removed; line
//! framing, bare CR/LF and line length are the connection reader's business.
//! What a command *means* in the current state is decided by the session.

use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 4.5.3.1.1: the maximum total length of a local part.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2: the maximum total length of a domain name or number.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3: the maximum total length of a path, brackets included.
pub const MAX_PATH: usize = 256;
/// RFC 1035 2.3.4: the maximum length of one label.
const MAX_LABEL: usize = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail(ReversePath<'a>, MailParams),
    Rcpt(ForwardPath<'a>),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// RFC 3207.
    StartTls,
    /// RFC 4954: the mechanism and the optional initial response.
    Auth(&'a str, Option<&'a str>),
}

/// The MAIL FROM path: `<>` (the null sender of bounces) or a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversePath<'a> {
    Null,
    Mailbox(Mailbox<'a>),
}

/// The RCPT TO path: the special `<Postmaster>` (RFC 5321 4.1.1.3) or a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath<'a> {
    Postmaster,
    Mailbox(Mailbox<'a>),
}

/// `local@domain`, borrowed from the line. A quoted local part keeps its
/// quotes, so the address is reproduced exactly as the client wrote it,
/// unless the quotes change nothing (`"alice"` is `alice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    pub local: &'a str,
    pub domain: &'a str,
}

impl Mailbox<'_> {
    /// True when the address needs SMTPUTF8 (RFC 6531 3.3).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// True when the domain is an address literal such as `[192.0.2.1]`.
    pub fn is_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

/// The MAIL parameters we advertise; any other is refused with 555.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Body,
    pub smtputf8: bool,
    /// An `AUTH=` parameter (RFC 4954 5) was given, `<>` or a valid xtext
    /// mailbox. Its value is not kept: postling never trusts a client's
    /// claim of who submitted a message, so it is discarded as RFC 4954
    /// allows.
    pub auth: bool,
}

/// Which command an error belongs to, for the enhanced status code
/// (X.1.7 is the sender's address, X.1.3 a recipient's; RFC 3463).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Mail,
    Rcpt,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not an SMTP verb at all: 500.
    Unknown,
    /// A verb we know but do not offer (EXPN, STARTTLS, AUTH, BDAT, ...): 502.
    NotImplemented,
    /// Bad arguments to a command: 501.
    Syntax(Verb, &'static str),
    /// A path that is not a valid address: 501 with X.1.7 or X.1.3.
    Address(Verb, &'static str),
    /// A parameter we do not support: 555 (RFC 5321 4.1.1.11).
    UnknownParam(Verb),
}

const fn table(chars: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < chars.len() {
        t[chars[i] as usize] = true;
        i += 1;
    }
    t
}

const fn alnum_plus(extra: &[u8]) -> [bool; 256] {
    let mut t = table(extra);
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    c = b'a';
    while c <= b'z' {
        t[c as usize] = true;
        t[(c - 32) as usize] = true;
        c += 1;
    }
    t
}

/// RFC 5322 atext, as used in RFC 5321 Atom.
static ATEXT: [bool; 256] = alnum_plus(b"!#$%&'*+-/=?^_`{|}~");
/// Let-dig and hyphen, for domain labels (RFC 5321 sub-domain).
static LDH: [bool; 256] = alnum_plus(b"-");
/// What may follow `=` in an esmtp-value (RFC 5321 4.1.2): %d33-60 / %d62-126.
static ESMTP_VALUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 33;
    while c <= 126 {
        t[c] = c != b'=' as usize;
        c += 1;
    }
    t
};

impl<'a> Command<'a> {
    /// Parses one command line (without its CRLF).
    pub fn parse(line: &'a [u8]) -> Result<Command<'a>, ParseError> {
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
        if is(b"EHLO") || is(b"HELO") {
            let arg = trim(rest);
            let name = match arg.iter().position(|&b| b == b' ') {
                Some(i) => &arg[..i],
                None => arg,
            };
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err(ParseError::Syntax(Verb::Other, "Syntax: EHLO hostname"));
            }
            // Graphic ASCII only, so this cannot fail.
            let name = std::str::from_utf8(name)
                .map_err(|_| ParseError::Syntax(Verb::Other, "Syntax: EHLO hostname"))?;
            return Ok(if is(b"EHLO") {
                Command::Ehlo(name)
            } else {
                Command::Helo(name)
            });
        }
        if is(b"MAIL") {
            let args = strip_keyword(rest, b"FROM:").ok_or(ParseError::Syntax(
                Verb::Mail,
                "Syntax: MAIL FROM:<address>",
            ))?;
            let (path, params) = split_path(args, Verb::Mail)?;
            let from = if path == b"<>" {
                ReversePath::Null
            } else {
                ReversePath::Mailbox(parse_path(path, Verb::Mail)?)
            };
            return Ok(Command::Mail(from, parse_mail_params(params)?));
        }
        if is(b"RCPT") {
            let args = strip_keyword(rest, b"TO:")
                .ok_or(ParseError::Syntax(Verb::Rcpt, "Syntax: RCPT TO:<address>"))?;
            let (path, params) = split_path(args, Verb::Rcpt)?;
            if !trim(params).is_empty() {
                // We advertise no RCPT parameters (no DSN yet).
                return Err(ParseError::UnknownParam(Verb::Rcpt));
            }
            if path.eq_ignore_ascii_case(b"<postmaster>") {
                return Ok(Command::Rcpt(ForwardPath::Postmaster));
            }
            return Ok(Command::Rcpt(ForwardPath::Mailbox(parse_path(
                path,
                Verb::Rcpt,
            )?)));
        }
        let no_args = |cmd: Command<'a>, usage: &'static str| {
            if trim(rest).is_empty() {
                Ok(cmd)
            } else {
                Err(ParseError::Syntax(Verb::Other, usage))
            }
        };
        if is(b"DATA") {
            return no_args(Command::Data, "Syntax: DATA (no arguments)");
        }
        if is(b"RSET") {
            return no_args(Command::Rset, "Syntax: RSET (no arguments)");
        }
        if is(b"QUIT") {
            return no_args(Command::Quit, "Syntax: QUIT (no arguments)");
        }
        if is(b"NOOP") {
            return Ok(Command::Noop);
        }
        if is(b"HELP") {
            return Ok(Command::Help);
        }
        if is(b"VRFY") {
            return if trim(rest).is_empty() {
                Err(ParseError::Syntax(Verb::Other, "Syntax: VRFY address"))
            } else {
                Ok(Command::Vrfy)
            };
        }
        if is(b"STARTTLS") {
            return no_args(Command::StartTls, "Syntax: STARTTLS (no parameters)");
        }
        if is(b"AUTH") {
            let usage =
                ParseError::Syntax(Verb::Other, "Syntax: AUTH mechanism [initial-response]");
            let text = std::str::from_utf8(trim(rest)).map_err(|_| usage)?;
            let mut words = text.split(' ').filter(|w| !w.is_empty());
            let mechanism = words.next().ok_or(usage)?;
            let initial = words.next();
            let valid = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            if words.next().is_some() || !mechanism.bytes().all(valid) {
                return Err(usage);
            }
            return Ok(Command::Auth(mechanism, initial));
        }
        const KNOWN: [&[u8]; 6] = [b"EXPN", b"BDAT", b"ETRN", b"TURN", b"SEND", b"SAML"];
        if KNOWN.iter().any(|k| is(k)) {
            return Err(ParseError::NotImplemented);
        }
        Err(ParseError::Unknown)
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

/// `FROM:` / `TO:` case-insensitively, then optional spaces (RFC 5321 forbids
/// them, but Postfix and Sendmail accept `MAIL FROM: <a@b>` and clients send it).
fn strip_keyword<'a>(rest: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let rest = trim(rest);
    if rest.len() < keyword.len() || !rest[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(trim(&rest[keyword.len()..]))
}

/// Splits `<path> params` into the path (brackets included) and the rest.
/// A path without brackets (`MAIL FROM:a@b`) is taken up to the first space,
/// as Postfix does for old clients; it is then validated the same way.
fn split_path(args: &[u8], verb: Verb) -> Result<(&[u8], &[u8]), ParseError> {
    if args.first() == Some(&b'<') {
        // The closing bracket is the first `>` outside a quoted string.
        let mut quoted = false;
        let mut escaped = false;
        for (i, &b) in args.iter().enumerate().skip(1) {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b'>' if !quoted => {
                    let rest = &args[i + 1..];
                    if !rest.is_empty() && rest[0] != b' ' {
                        return Err(ParseError::Address(verb, "Junk after the address"));
                    }
                    return Ok((&args[..=i], rest));
                }
                _ => {}
            }
        }
        return Err(ParseError::Address(
            verb,
            "Missing > at the end of the address",
        ));
    }
    if args.is_empty() {
        return Err(ParseError::Address(verb, "Missing address"));
    }
    match args.iter().position(|&b| b == b' ') {
        Some(i) => Ok((&args[..i], &args[i..])),
        None => Ok((args, &args[args.len()..])),
    }
}

/// Validates a path (`<[@route,@route:]local@domain>` or bare `local@domain`).
fn parse_path(path: &[u8], verb: Verb) -> Result<Mailbox<'_>, ParseError> {
    let err = |why| ParseError::Address(verb, why);
    if path.len() > MAX_PATH {
        return Err(err("Address too long (RFC 5321 4.5.3.1.3)"));
    }
    let inner = match path {
        [b'<', inner @ .., b'>'] => inner,
        _ if path.first() == Some(&b'<') => return Err(err("Missing > at the end of the address")),
        _ => path,
    };
    let inner = skip_source_route(inner).ok_or(err("Bad source route"))?;
    let mailbox = std::str::from_utf8(inner).map_err(|_| err("Address is not valid UTF-8"))?;
    let at = local_part_end(inner).ok_or(err("Bad local part"))?;
    if inner.get(at) != Some(&b'@') {
        return Err(err("Address must be local-part@domain"));
    }
    let (mut local, domain) = (&mailbox[..at], &mailbox[at + 1..]);
    // `"alice"` is `alice` (RFC 5321 4.1.2: quoting that changes nothing);
    // taken without its quotes, as Postfix does, so it resolves as alice.
    if let Some(plain) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        if is_dot_string(plain) {
            local = plain;
        }
    }
    if local.len() > MAX_LOCAL_PART {
        return Err(err("Local part too long (RFC 5321 4.5.3.1.1)"));
    }
    if domain.len() > MAX_DOMAIN {
        return Err(err("Domain too long (RFC 5321 4.5.3.1.2)"));
    }
    if !valid_domain(domain.as_bytes()) {
        return Err(err("Bad domain"));
    }
    Ok(Mailbox { local, domain })
}

/// Whether `s` is a whole `local-part@domain` with a dot-string local part,
/// as MAIL and RCPT accept it (aliases check their remote targets with it).
pub fn is_address(s: &str) -> bool {
    let b = s.as_bytes();
    match local_part_end(b) {
        Some(at) if !s.starts_with('"') && b.get(at) == Some(&b'@') => {
            at <= MAX_LOCAL_PART && b.len() - at - 1 <= MAX_DOMAIN && valid_domain(&b[at + 1..])
        }
        _ => false,
    }
}

/// Characters that change how the text around them is shown without
/// showing themselves: bidirectional overrides and isolates (an address
/// that reads backwards, CVE-2021-42574 style), line and paragraph
/// separators, zero-width characters and the byte-order mark.
pub fn hides_text(c: char) -> bool {
    matches!(
        u32::from(c),
        0x061c | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2069 | 0xfeff
    )
}

/// Whether `s` is a dot-string local part (`a.b+c`), nothing else.
pub fn is_dot_string(s: &str) -> bool {
    !s.starts_with('"') && local_part_end(s.as_bytes()) == Some(s.len())
}

/// Skips an RFC 5321 A-d-l (`@one,@two:`), which servers must accept and ignore.
fn skip_source_route(s: &[u8]) -> Option<&[u8]> {
    if s.first() != Some(&b'@') {
        return Some(s);
    }
    let colon = s.iter().position(|&b| b == b':')?;
    for hop in s[..colon].split(|&b| b == b',') {
        match hop {
            [b'@', domain @ ..] if valid_domain(domain) => {}
            _ => return None,
        }
    }
    Some(&s[colon + 1..])
}

/// Returns the index just past a valid Dot-string or Quoted-string local part.
fn local_part_end(s: &[u8]) -> Option<usize> {
    if s.first() == Some(&b'"') {
        // Quoted-string: qtextSMTP = %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP = "\" %d32-126,
        // plus UTF-8 with SMTPUTF8 (RFC 6531 3.3).
        let mut i = 1;
        while i < s.len() {
            match s[i] {
                b'"' => return Some(i + 1),
                b'\\' => {
                    let next = *s.get(i + 1)?;
                    if !(32..=126).contains(&next) {
                        return None;
                    }
                    i += 2;
                }
                32..=126 | 0x80..=0xff => i += 1,
                _ => return None,
            }
        }
        return None;
    }
    // Dot-string: Atom *("." Atom), where UTF-8 counts as atext (RFC 6531).
    let mut i = 0;
    let mut atom_len = 0;
    while i < s.len() {
        let b = s[i];
        if ATEXT[b as usize] || b >= 0x80 {
            atom_len += 1;
        } else if b == b'.' {
            if atom_len == 0 {
                return None;
            }
            atom_len = 0;
        } else {
            break;
        }
        i += 1;
    }
    (atom_len > 0).then_some(i)
}

/// Domain = sub-domain *("." sub-domain), or an address literal `[...]`.
/// UTF-8 labels (U-labels, RFC 6531) are accepted byte-wise.
fn valid_domain(d: &[u8]) -> bool {
    if let [b'[', literal @ .., b']'] = d {
        return valid_literal(literal);
    }
    if d.is_empty() || d.len() > MAX_DOMAIN {
        return false;
    }
    d.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL
            && label[0] != b'-'
            && label[label.len() - 1] != b'-'
            && label.iter().all(|&b| LDH[b as usize] || b >= 0x80)
    })
}

fn valid_literal(lit: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(lit) else {
        return false;
    };
    // The tag is case-insensitive (RFC 5321 4.1.3, RFC 5234 2.3).
    if let Some(tag) = text.get(..5).filter(|t| t.eq_ignore_ascii_case("IPv6:")) {
        return text[tag.len()..].parse::<Ipv6Addr>().is_ok();
    }
    text.parse::<Ipv4Addr>().is_ok()
}

/// RFC 3461 4: printable ASCII except `+` and `=`, which appear only as
/// `+` and two upper-case hex digits.
fn is_xtext(v: &[u8]) -> bool {
    let hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'+' if v.len() > i + 2 && hex(v[i + 1]) && hex(v[i + 2]) => i += 3,
            b'!'..=b'~' if v[i] != b'+' && v[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    !v.is_empty()
}

fn parse_mail_params(params: &[u8]) -> Result<MailParams, ParseError> {
    let mut out = MailParams::default();
    let (mut seen_size, mut seen_body) = (false, false);
    let bad = |why| ParseError::Syntax(Verb::Mail, why);
    for param in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.iter().position(|&b| b == b'=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if value.is_some_and(|v| v.is_empty() || !v.iter().all(|&b| ESMTP_VALUE[b as usize])) {
            return Err(bad("Bad parameter value"));
        }
        if key.eq_ignore_ascii_case(b"SIZE") {
            let v = value.ok_or(bad("SIZE needs a value"))?;
            if seen_size || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
                return Err(bad("Bad SIZE parameter"));
            }
            // 20 digits fit in u128; a u64 overflow means "too big", saturate.
            let n = v.iter().fold(0u128, |n, &d| n * 10 + u128::from(d - b'0'));
            out.size = Some(u64::try_from(n).unwrap_or(u64::MAX));
            seen_size = true;
        } else if key.eq_ignore_ascii_case(b"BODY") {
            let v = value.ok_or(bad("BODY needs a value"))?;
            if seen_body {
                return Err(bad("Duplicate BODY parameter"));
            }
            out.body = if v.eq_ignore_ascii_case(b"7BIT") {
                Body::SevenBit
            } else if v.eq_ignore_ascii_case(b"8BITMIME") {
                Body::EightBitMime
            } else {
                return Err(bad("BODY must be 7BIT or 8BITMIME"));
            };
            seen_body = true;
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            if value.is_some() || out.smtputf8 {
                return Err(bad("Bad SMTPUTF8 parameter"));
            }
            out.smtputf8 = true;
        } else if key.eq_ignore_ascii_case(b"AUTH") {
            let v = value.ok_or(bad("AUTH needs a value"))?;
            if out.auth || !(v == b"<>" || is_xtext(v)) {
                return Err(bad("Bad AUTH parameter"));
            }
            out.auth = true;
        } else {
            return Err(ParseError::UnknownParam(Verb::Mail));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb<'a>(local: &'a str, domain: &'a str) -> Mailbox<'a> {
        Mailbox { local, domain }
    }

    fn parse(line: &str) -> Result<Command<'_>, ParseError> {
        Command::parse(line.as_bytes())
    }

    #[test]
    fn verbs() {
        use Command::*;
        let cases: &[(&str, Command)] = &[
            ("EHLO pi.lan", Ehlo("pi.lan")),
            ("ehlo [192.0.2.1]", Ehlo("[192.0.2.1]")),
            ("HELO printer junk after", Helo("printer")),
            ("DATA", Data),
            ("data", Data),
            ("RSET", Rset),
            ("NOOP whatever", Noop),
            ("QUIT", Quit),
            ("HELP", Help),
            ("HELP MAIL", Help),
            ("VRFY root", Vrfy),
            ("starttls", StartTls),
            ("AUTH PLAIN", Auth("PLAIN", None)),
            ("auth login dXNlcg==", Auth("login", Some("dXNlcg=="))),
            ("AUTH PLAIN =", Auth("PLAIN", Some("="))),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Ok(*want), "{line}");
        }
    }

    #[test]
    fn verb_errors() {
        use ParseError::*;
        let cases: &[(&str, ParseError)] = &[
            ("", Unknown),
            ("FOO", Unknown),
            ("MAILFROM:<a@b>", Unknown),
            ("EXPN list", NotImplemented),
            (
                "STARTTLS now",
                Syntax(Verb::Other, "Syntax: STARTTLS (no parameters)"),
            ),
            (
                "AUTH",
                Syntax(Verb::Other, "Syntax: AUTH mechanism [initial-response]"),
            ),
            (
                "AUTH PLAIN a b",
                Syntax(Verb::Other, "Syntax: AUTH mechanism [initial-response]"),
            ),
            ("EHLO", Syntax(Verb::Other, "Syntax: EHLO hostname")),
            ("EHLO ", Syntax(Verb::Other, "Syntax: EHLO hostname")),
            ("DATA x", Syntax(Verb::Other, "Syntax: DATA (no arguments)")),
            (
                "QUIT now",
                Syntax(Verb::Other, "Syntax: QUIT (no arguments)"),
            ),
            ("VRFY", Syntax(Verb::Other, "Syntax: VRFY address")),
            (
                "MAIL <a@b>",
                Syntax(Verb::Mail, "Syntax: MAIL FROM:<address>"),
            ),
            (
                "RCPT FROM:<a@b>",
                Syntax(Verb::Rcpt, "Syntax: RCPT TO:<address>"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Err(*want), "{line}");
        }
    }

    #[test]
    fn mail_paths() {
        use ReversePath::*;
        let p = MailParams::default();
        let cases: &[(&str, Command)] = &[
            ("MAIL FROM:<>", Command::Mail(Null, p)),
            (
                "MAIL FROM:<a@b.c>",
                Command::Mail(Mailbox(mb("a", "b.c")), p),
            ),
            (
                "mail from:<a@b.c>",
                Command::Mail(Mailbox(mb("a", "b.c")), p),
            ),
            (
                "MAIL FROM: <a@b.c>",
                Command::Mail(Mailbox(mb("a", "b.c")), p),
            ),
            ("MAIL FROM:a@b.c", Command::Mail(Mailbox(mb("a", "b.c")), p)),
            (
                "MAIL FROM:<@r1,@r2:a@b.c>",
                Command::Mail(Mailbox(mb("a", "b.c")), p),
            ),
            (
                "MAIL FROM:<\"a b\"@b.c>",
                Command::Mail(Mailbox(mb("\"a b\"", "b.c")), p),
            ),
            (
                "MAIL FROM:<\"a>b\"@b.c>",
                Command::Mail(Mailbox(mb("\"a>b\"", "b.c")), p),
            ),
            (
                "MAIL FROM:<\"a.b+c\"@b.c>",
                Command::Mail(Mailbox(mb("a.b+c", "b.c")), p),
            ),
            (
                "MAIL FROM:<\"a..b\"@b.c>",
                Command::Mail(Mailbox(mb("\"a..b\"", "b.c")), p),
            ),
            (
                "MAIL FROM:<a.b+c@[192.0.2.1]>",
                Command::Mail(Mailbox(mb("a.b+c", "[192.0.2.1]")), p),
            ),
            (
                "MAIL FROM:<a@[IPv6:2001:db8::1]>",
                Command::Mail(Mailbox(mb("a", "[IPv6:2001:db8::1]")), p),
            ),
            (
                "MAIL FROM:<a@[ipv6:2001:db8::1]>",
                Command::Mail(Mailbox(mb("a", "[ipv6:2001:db8::1]")), p),
            ),
            (
                "MAIL FROM:<ü@bücher.de>",
                Command::Mail(Mailbox(mb("ü", "bücher.de")), p),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Ok(*want), "{line}");
        }
    }

    #[test]
    fn bad_addresses() {
        let cases = [
            "RCPT TO:<;sleep 1;>",
            "RCPT TO:<a@>",
            "RCPT TO:<@a>",
            "RCPT TO:<a@b@c>",
            "RCPT TO:<a>",
            "RCPT TO:<>",
            "RCPT TO:<a@b",
            "RCPT TO:<a@b>junk",
            "RCPT TO:<.a@b>",
            "RCPT TO:<a..b@c>",
            "RCPT TO:<a.@b>",
            "RCPT TO:<a@-b.c>",
            "RCPT TO:<a@b..c>",
            "RCPT TO:<a@b_c>",
            "RCPT TO:<a@[300.1.1.1]>",
            "RCPT TO:<a@[foo:bar]>",
            "RCPT TO:<\"unterminated@b>",
            "RCPT TO:<a b@c>",
            "RCPT TO:",
        ];
        for line in cases {
            match parse(line) {
                Err(ParseError::Address(Verb::Rcpt, _)) => {}
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn length_limits() {
        let local64 = "a".repeat(64);
        let ok = format!("RCPT TO:<{local64}@b.c>");
        assert!(parse(&ok).is_ok());
        let local65 = format!("RCPT TO:<{}@b.c>", "a".repeat(65));
        assert_eq!(
            parse(&local65),
            Err(ParseError::Address(
                Verb::Rcpt,
                "Local part too long (RFC 5321 4.5.3.1.1)"
            ))
        );
        let label = "a".repeat(63);
        let domain = [label.as_str(); 4].join("."); // 255 octets
        assert_eq!(domain.len(), 255);
        assert!(
            parse(&format!("RCPT TO:<b@{domain}>")).is_err(),
            "path is 260 > 256"
        );
        let long_label = format!("RCPT TO:<b@{}.c>", "a".repeat(64));
        assert_eq!(
            parse(&long_label),
            Err(ParseError::Address(Verb::Rcpt, "Bad domain"))
        );
        let path = format!(
            "RCPT TO:<{}@{}>",
            "a".repeat(64),
            "b".repeat(63) + "." + &"c".repeat(63) + "." + &"d".repeat(60)
        );
        assert!(path.len() - "RCPT TO:".len() <= MAX_PATH);
        assert!(parse(&path).is_ok());
    }

    #[test]
    fn rcpt_postmaster_and_params() {
        assert_eq!(
            parse("RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt(ForwardPath::Postmaster))
        );
        assert_eq!(
            parse("RCPT TO:<POSTMASTER>"),
            Ok(Command::Rcpt(ForwardPath::Postmaster))
        );
        assert_eq!(
            parse("RCPT TO:<postmaster@pi.lan>"),
            Ok(Command::Rcpt(ForwardPath::Mailbox(mb(
                "postmaster",
                "pi.lan"
            ))))
        );
        assert_eq!(
            parse("RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(ParseError::UnknownParam(Verb::Rcpt))
        );
        assert_eq!(
            parse("RCPT TO:<a@b>  "),
            Ok(Command::Rcpt(ForwardPath::Mailbox(mb("a", "b"))))
        );
    }

    #[test]
    fn mail_params() {
        let from = ReversePath::Mailbox(mb("a", "b"));
        let cases: &[(&str, Result<MailParams, ParseError>)] = &[
            (
                "SIZE=1000",
                Ok(MailParams {
                    size: Some(1000),
                    ..Default::default()
                }),
            ),
            (
                "size=0 body=8bitmime smtputf8 auth=<>",
                Ok(MailParams {
                    size: Some(0),
                    body: Body::EightBitMime,
                    smtputf8: true,
                    auth: true,
                }),
            ),
            ("BODY=7BIT", Ok(MailParams::default())),
            (
                "SIZE=99999999999999999999",
                Ok(MailParams {
                    size: Some(u64::MAX),
                    ..Default::default()
                }),
            ),
            (
                "SIZE=999999999999999999999",
                Err(ParseError::Syntax(Verb::Mail, "Bad SIZE parameter")),
            ),
            (
                "SIZE=12a",
                Err(ParseError::Syntax(Verb::Mail, "Bad SIZE parameter")),
            ),
            (
                "SIZE=1 SIZE=2",
                Err(ParseError::Syntax(Verb::Mail, "Bad SIZE parameter")),
            ),
            (
                "SIZE",
                Err(ParseError::Syntax(Verb::Mail, "SIZE needs a value")),
            ),
            (
                "SIZE=",
                Err(ParseError::Syntax(Verb::Mail, "Bad parameter value")),
            ),
            (
                "BODY=BINARYMIME",
                Err(ParseError::Syntax(
                    Verb::Mail,
                    "BODY must be 7BIT or 8BITMIME",
                )),
            ),
            (
                "SMTPUTF8=yes",
                Err(ParseError::Syntax(Verb::Mail, "Bad SMTPUTF8 parameter")),
            ),
            ("RET=FULL", Err(ParseError::UnknownParam(Verb::Mail))),
            (
                "AUTH=<>",
                Ok(MailParams {
                    auth: true,
                    ..Default::default()
                }),
            ),
            (
                "AUTH=bob+40example.org",
                Ok(MailParams {
                    auth: true,
                    ..Default::default()
                }),
            ),
            (
                "AUTH=a+4",
                Err(ParseError::Syntax(Verb::Mail, "Bad AUTH parameter")),
            ),
            (
                "AUTH=a+zz",
                Err(ParseError::Syntax(Verb::Mail, "Bad AUTH parameter")),
            ),
            (
                "AUTH=<> AUTH=<>",
                Err(ParseError::Syntax(Verb::Mail, "Bad AUTH parameter")),
            ),
            (
                "AUTH",
                Err(ParseError::Syntax(Verb::Mail, "AUTH needs a value")),
            ),
            ("X-FOO", Err(ParseError::UnknownParam(Verb::Mail))),
        ];
        for (params, want) in cases {
            let line = format!("MAIL FROM:<a@b> {params}");
            assert_eq!(
                Command::parse(line.as_bytes()),
                want.map(|p| Command::Mail(from, p)),
                "{params}"
            );
        }
    }

    #[test]
    fn utf8_detection() {
        assert!(mb("ü", "b").is_utf8());
        assert!(mb("a", "bücher.de").is_utf8());
        assert!(!mb("a", "b").is_utf8());
        assert!(parse("RCPT TO:<\u{ff}@b>").is_ok());
        assert!(
            Command::parse(b"RCPT TO:<\xff@b>").is_err(),
            "invalid UTF-8"
        );
    }
}
