//! SMTP replies: a code, an enhanced status code and a human-readable text.
//!
//! Owns the wire form of every reply the server sends (RFC 5321 4.2, multi-line
//! replies 4.2.1) and the named replies used by the session, each with its
//! RFC 3463 enhanced status code (RFC 2034 makes them mandatory once
//! ENHANCEDSTATUSCODES is advertised; we send them always, as Postfix does).
//! It does not decide *when* a reply is sent: that is the session's job.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply. `lines` holds the text of each line of a multi-line reply;
/// the enhanced code, when present, prefixes every line (RFC 2034 section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<&'static str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A one-line reply without an enhanced status code (the 220 greeting,
    /// the EHLO response), where RFC 2034 does not use one.
    pub fn plain(code: u16, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// Appends another line to a multi-line reply.
    pub fn line(mut self, text: impl Into<Cow<'static, str>>) -> Reply {
        self.lines.push(text.into());
        self
    }

    /// 4xx and 5xx replies count as errors against the session's error limit.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Appends the wire form (CRLF line ends, `code-` continuation lines) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, text) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(sep as u8);
            if let Some(enhanced) = self.enhanced {
                out.extend_from_slice(enhanced.as_bytes());
                out.push(b' ');
            }
            // Reply text is ours, but may quote client input: never let a CR
            // or LF from it break the reply framing.
            out.extend(
                text.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.lines.last().map(|s| s.as_ref()).unwrap_or("");
        match self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, text),
            None => write!(f, "{} {}", self.code, text),
        }
    }
}

// The named replies. Codes per RFC 5321 4.2.2/4.2.3; enhanced codes per RFC 3463.

pub fn ok() -> Reply {
    Reply::new(250, "2.0.0", "OK")
}
pub fn sender_ok() -> Reply {
    Reply::new(250, "2.1.0", "Sender OK")
}
pub fn recipient_ok() -> Reply {
    Reply::new(250, "2.1.5", "Recipient OK")
}
pub fn reset_ok() -> Reply {
    Reply::new(250, "2.0.0", "Reset OK")
}
pub fn start_data() -> Reply {
    Reply::plain(354, "End data with <CR><LF>.<CR><LF>")
}
pub fn queued(id: &str) -> Reply {
    Reply::new(250, "2.0.0", format!("OK: queued as {id}"))
}
pub fn bye() -> Reply {
    Reply::new(221, "2.0.0", "Bye")
}
pub fn vrfy() -> Reply {
    Reply::new(
        252,
        "2.5.0",
        "Cannot VRFY user, but will accept message and attempt delivery",
    )
}
pub fn help() -> Reply {
    Reply::new(
        214,
        "2.0.0",
        "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP; see RFC 5321",
    )
}
pub fn unknown_command() -> Reply {
    Reply::new(500, "5.5.1", "Command unrecognized")
}
pub fn not_implemented() -> Reply {
    Reply::new(502, "5.5.1", "Command not implemented")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.2", "Line too long")
}
pub fn bare_line_ending() -> Reply {
    Reply::new(
        500,
        "5.5.2",
        "Bare CR or LF in command; lines must end with CRLF. Closing connection",
    )
}
pub fn bad_sequence(text: &'static str) -> Reply {
    Reply::new(503, "5.5.1", text)
}
pub fn no_valid_recipients() -> Reply {
    Reply::new(554, "5.5.1", "No valid recipients")
}
pub fn too_many_recipients() -> Reply {
    Reply::new(452, "4.5.3", "Too many recipients")
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0", "Too many errors, closing connection")
}
pub fn message_too_big() -> Reply {
    Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    )
}
pub fn relay_denied() -> Reply {
    Reply::new(554, "5.7.1", "Relay access denied")
}
pub fn routing_characters() -> Reply {
    Reply::new(
        554,
        "5.7.1",
        "Source routing in the local part (% ! @ \" / \\ :) is not allowed",
    )
}
pub fn unknown_user() -> Reply {
    Reply::new(550, "5.1.1", "No such user here")
}
pub fn alias_loop() -> Reply {
    Reply::new(550, "5.4.6", "Alias expansion loop for this recipient")
}
pub fn too_many_hops() -> Reply {
    Reply::new(
        554,
        "5.4.6",
        "Too many Received headers: mail loop detected",
    )
}
pub fn bad_data_line_ending() -> Reply {
    Reply::new(
        550,
        "5.6.0",
        "Message contains a bare CR or LF; lines must end with CRLF",
    )
}
pub fn folded_first_line() -> Reply {
    Reply::new(
        550,
        "5.6.0",
        "Message starts with a folded line; it must start with a header field",
    )
}
pub fn data_line_too_long() -> Reply {
    Reply::new(
        550,
        "5.6.0",
        "Message contains a line longer than 998 octets (RFC 5321 4.5.3.1.6)",
    )
}
pub fn local_error() -> Reply {
    Reply::new(451, "4.3.0", "Local error in processing, try again later")
}
pub fn command_timeout() -> Reply {
    Reply::new(421, "4.4.2", "Timeout exceeded, closing connection")
}
pub fn shutting_down() -> Reply {
    Reply::new(421, "4.3.2", "Service shutting down, try again later")
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.3.2", "Too many connections, try again later")
}
pub fn too_many_connections_from_you() -> Reply {
    Reply::new(
        421,
        "4.3.2",
        "Too many connections from your address, try again later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).expect("replies are ASCII")
    }

    #[test]
    fn one_line_with_enhanced_code() {
        assert_eq!(wire(&ok()), "250 2.0.0 OK\r\n");
    }

    #[test]
    fn multi_line_uses_dash_continuations() {
        let r = Reply::plain(250, "pi.lan")
            .line("PIPELINING")
            .line("SIZE 10");
        assert_eq!(wire(&r), "250-pi.lan\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn text_cannot_break_framing() {
        let r = Reply::new(550, "5.1.1", format!("<{}> unknown", "a\r\n250 ok"));
        assert_eq!(wire(&r), "550 5.1.1 <a  250 ok> unknown\r\n");
    }
}
