//! Delivery status notifications: the bounce and the "delayed" notice
//! (RFC 3464 message/delivery-status inside RFC 6522 multipart/report).
//!
//! Owns only the text of the notice, as a pure function of the envelope, the
//! recipients' results and `now`. Every value that came from outside (an
//! address, a remote server's reply, the original headers) is cleaned of CR,
//! LF and other control bytes before it goes into a header or a DSN field, so
//! nothing can inject a header or a part. Whether and where a notice is sent
//! (never for a null sender) is the relay's decision.

use crate::date::rfc5322;
use crate::store::envelope::Envelope;

/// The original message's header is quoted up to this size.
const MAX_QUOTED_HEADER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The recipients failed for good: "Undelivered Mail Returned to Sender".
    Failed,
    /// Still being retried: the one warning after `delay_warning`.
    Delayed,
}

/// One recipient's line in the report.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub address: &'a str,
    /// The error as seen, e.g. "550 5.1.1 <x@y>: user unknown".
    pub diagnostic: &'a str,
    /// The host that said it, when a remote server did.
    pub remote_mta: Option<&'a str>,
}

/// Renders the complete notice (headers and body, CRLF line ends) for
/// `to`: the message's sender, or the postmaster for a bounce about a
/// bounce.
pub fn render(
    kind: Kind,
    hostname: &str,
    to: &str,
    env: &Envelope,
    entries: &[Entry<'_>],
    original_header: &[u8],
    now: u64,
) -> Vec<u8> {
    // Within RFC 2046's 70 characters whatever the hostname: a queue id
    // is 32 at most.
    let boundary = format!("{}.{}/postling", env.id, now);
    let (subject, action, default_status) = match kind {
        Kind::Failed => ("Undelivered Mail Returned to Sender", "failed", "5.0.0"),
        Kind::Delayed => ("Delayed Mail (still being retried)", "delayed", "4.0.0"),
    };
    let mut m = String::new();
    let host = clean(hostname);
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", clean(to)));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", rfc5322(now)));
    m.push_str(&format!(
        "Message-ID: <{}.{}.{}@{host}>\r\n",
        env.id, action, now
    ));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    m.push_str("\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

    // Part 1: for people.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    );
    m.push_str(&format!("This is the mail system at host {host}.\r\n\r\n"));
    match kind {
        Kind::Failed => m.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. The reasons are below.\r\n",
        ),
        Kind::Delayed => m.push_str(
            "Your message could not be delivered yet to one or more recipients.\r\n\
             It is still in the queue and will be tried again; you do not need\r\n\
             to send it again. You will be told if it finally fails.\r\n",
        ),
    }
    m.push_str("\r\n");
    for e in entries {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            clean(e.address),
            clean(e.diagnostic)
        ));
    }

    // Part 2: for programs (RFC 3464 section 2).
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str("Content-Type: message/delivery-status\r\n\r\n");
    m.push_str(&format!("Reporting-MTA: dns; {host}\r\n"));
    m.push_str(&format!("X-Postling-Queue-ID: {}\r\n", clean(&env.id)));
    m.push_str(&format!("Arrival-Date: {}\r\n", rfc5322(env.arrived)));
    for e in entries {
        m.push_str("\r\n");
        m.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            clean(e.address)
        ));
        m.push_str(&format!("Action: {action}\r\n"));
        // A delayed recipient is still being tried, so its status is
        // transient (RFC 3463) even when the last reply was a 5xx that
        // postling retries (a 5xx greeting, say).
        let status = enhanced_code(e.diagnostic)
            .filter(|code| kind == Kind::Failed || code.starts_with('4'))
            .unwrap_or(default_status);
        m.push_str(&format!("Status: {status}\r\n"));
        if let Some(mta) = e.remote_mta {
            m.push_str(&format!("Remote-MTA: dns; {}\r\n", clean(mta_name(mta))));
        }
        // "smtp" is for a server's reply (RFC 3464 section 2.3.6); postling's
        // own reasons (connection refused, expiry, null MX) are its own type,
        // as Postfix's are "X-Postfix".
        let diagnostic_type = if is_reply(e.diagnostic) {
            "smtp"
        } else {
            "X-Postling"
        };
        m.push_str(&format!(
            "Diagnostic-Code: {diagnostic_type}; {}\r\n",
            clean(e.diagnostic)
        ));
        m.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322(now)));
    }

    // Part 3: the original header (RFC 6522 text/rfc822-headers).
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str("Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(&quoted_header(original_header));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Replaces control bytes (CR, LF, NUL, ...) with spaces: one line, safe in
/// any header or DSN field.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The host's name in the relay's "host[address]:port".
fn mta_name(host: &str) -> &str {
    host.split('[').next().unwrap_or(host)
}

/// Whether a diagnostic is a server's reply: "550 5.1.1 ...", "421-...".
fn is_reply(diagnostic: &str) -> bool {
    let b = diagnostic.as_bytes();
    b.len() >= 3
        && matches!(b[0], b'2'..=b'5')
        && b[1..3].iter().all(u8::is_ascii_digit)
        && matches!(b.get(3), None | Some(b' ' | b'-'))
}

/// The RFC 3463 code in a reply such as "550 5.1.1 unknown", or at the
/// start of our own reasons ("5.1.10 null MX"), if any.
fn enhanced_code(diagnostic: &str) -> Option<&str> {
    diagnostic.split_whitespace().take(2).find(|code| {
        let parts: Vec<&str> = code.split('.').collect();
        parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The header section up to its empty line, at most MAX_QUOTED_HEADER
/// bytes, cut at a line end, with CRLF line ends and no boundary-like line.
fn quoted_header(message: &[u8]) -> Vec<u8> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let mut header = &message[..end.min(MAX_QUOTED_HEADER)];
    if let Some(last) = header.iter().rposition(|&b| b == b'\n') {
        header = &header[..=last];
    }
    let mut out = Vec::with_capacity(header.len());
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        // A line starting "--" could look like our boundary; indent it.
        if line.starts_with(b"--") {
            out.push(b' ');
        }
        out.extend(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope::new("Q1", 0, "cron@pi.lan", String::new(), &["x@example.com"])
    }

    /// The delay notice about `entries` to cron@pi.lan, with no header.
    fn delayed(entries: &[Entry<'_>]) -> String {
        String::from_utf8(render(
            Kind::Delayed,
            "pi.lan",
            "cron@pi.lan",
            &env(),
            entries,
            b"",
            0,
        ))
        .expect("utf8")
    }

    #[test]
    fn failed_notice_has_the_rfc3464_fields() {
        let entries = [Entry {
            address: "x@example.com",
            diagnostic: "550 5.1.1 <x@example.com>: user unknown",
            remote_mta: Some("mx.example.com[192.0.2.1]:25"),
        }];
        let text = String::from_utf8(render(
            Kind::Failed,
            "pi.lan",
            "cron@pi.lan",
            &env(),
            &entries,
            b"Received: a\r\nSubject: hello\r\n\r\nbody\r\n",
            86_400,
        ))
        .expect("utf8");
        for want in [
            "From: Mail Delivery System <MAILER-DAEMON@pi.lan>\r\n",
            "To: <cron@pi.lan>\r\n",
            "Subject: Undelivered Mail Returned to Sender\r\n",
            "Auto-Submitted: auto-replied\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Reporting-MTA: dns; pi.lan\r\n",
            "Final-Recipient: rfc822; x@example.com\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Remote-MTA: dns; mx.example.com\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 <x@example.com>: user unknown\r\n",
            "Content-Type: text/rfc822-headers\r\n",
            "Subject: hello\r\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("body\r\n"), "only the header is quoted");
        assert!(text.ends_with("--\r\n"));
    }

    #[test]
    fn delayed_notice() {
        let entries = [Entry {
            address: "x@example.com",
            diagnostic: "connection refused",
            remote_mta: None,
        }];
        let text = delayed(&entries);
        assert!(text.contains("Action: delayed\r\nStatus: 4.0.0\r\n"));
        assert!(text.contains("Diagnostic-Code: X-Postling; connection refused\r\n"));
        assert!(text.contains("Subject: Delayed Mail"));
    }

    #[test]
    fn a_delayed_recipient_never_has_a_permanent_status() {
        let entries = [
            Entry {
                address: "x@example.com",
                diagnostic: "554 5.7.1 go away (in reply to the greeting)",
                remote_mta: Some("192.0.2.7[192.0.2.7]:25"),
            },
            Entry {
                address: "y@example.com",
                diagnostic: "451 4.3.0 try later",
                remote_mta: None,
            },
        ];
        let text = delayed(&entries);
        assert!(
            text.contains("Action: delayed\r\nStatus: 4.0.0\r\nRemote-MTA: dns; 192.0.2.7\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Action: delayed\r\nStatus: 4.3.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Diagnostic-Code: smtp; 554 5.7.1 go away"),
            "{text}"
        );
    }

    #[test]
    fn the_boundary_is_short_whatever_the_hostname() {
        let host = format!("{}.example.net", "a".repeat(60));
        let text = String::from_utf8(render(
            Kind::Failed,
            &host,
            "postmaster@pi.lan",
            &env(),
            &[],
            b"",
            0,
        ))
        .expect("utf8");
        let start = text.find("boundary=\"").expect("boundary") + 10;
        let len = text[start..].find('"').expect("end");
        assert!(len <= 70, "{len}");
        assert!(text.contains("To: <postmaster@pi.lan>\r\n"), "{text}");
    }

    #[test]
    fn nothing_from_outside_can_inject_a_header_or_part() {
        let mut e = env();
        e.sender = "a@b\r\nBcc: victim@x".into();
        let entries = [Entry {
            address: "x@y\r\nSubject: evil",
            diagnostic: "550 nope\r\n\r\n--boundary\r\nContent-Type: text/html",
            remote_mta: Some("mx\nX-Evil: 1"),
        }];
        let text = String::from_utf8(render(
            Kind::Failed,
            "pi.lan",
            &e.sender,
            &e,
            &entries,
            b"Subject: s\r\n--x\r\n\r\n",
            0,
        ))
        .expect("utf8");
        for line in text.split("\r\n") {
            assert!(!line.starts_with("Bcc:"), "{line}");
            assert!(!line.starts_with("Subject: evil"), "{line}");
            assert!(!line.starts_with("X-Evil"), "{line}");
            assert!(!line.starts_with("Content-Type: text/html"), "{line}");
            assert!(!line.contains('\r') && !line.contains('\n'));
        }
        assert!(
            text.contains("\r\n --x\r\n"),
            "boundary-like header line indented"
        );
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(enhanced_code("550 5.1.1 unknown"), Some("5.1.1"));
        assert_eq!(enhanced_code("451 4.3.0"), Some("4.3.0"));
        assert_eq!(enhanced_code("550 unknown user"), None);
        assert_eq!(enhanced_code("5.1.10 null MX"), Some("5.1.10"));
        assert_eq!(enhanced_code("550 5.1"), None);
        assert_eq!(enhanced_code(""), None);
    }
}
