//! Sender rewriting for smarthosts (`relay.rewrite_from`).
//!
//! Gmail, Fastmail and most ISP relays refuse mail whose From: is not the
//! account that authenticated. So mail from local users (cron@pi.lan,
//! root@localhost) leaves with the configured address as envelope sender and
//! in From:, keeping the display name; the original From: moves to Reply-To:
//! (unless the message already has one), so replies still reach the right
//! person. Owns the header rewrite only; which senders are local and when to
//! apply it is the relay's decision.

/// Returns the header section with From: rewritten to `new_from` (display
/// name kept) and the original From: as Reply-To: when there is none.
pub fn rewrite_header(header: &[u8], new_from: &str) -> Vec<u8> {
    let fields = split_fields(header);
    let mut out = Vec::with_capacity(header.len() + 64);
    let has_reply_to = fields.iter().any(|f| is_field(f, b"reply-to"));
    let mut seen_from = false;
    for f in &fields {
        if is_field(f, b"from") && !seen_from {
            seen_from = true;
            let value = field_value(f);
            let name = display_name(value);
            match name {
                Some(n) => out.extend_from_slice(format!("From: {n} <{new_from}>\r\n").as_bytes()),
                None => out.extend_from_slice(format!("From: <{new_from}>\r\n").as_bytes()),
            }
            if !has_reply_to {
                out.extend_from_slice(b"Reply-To:");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(f);
        }
    }
    if !seen_from {
        out.extend_from_slice(format!("From: <{new_from}>\r\n").as_bytes());
    }
    out
}

/// Splits a header section (lines ending CRLF) into fields, each with its
/// folded continuation lines and its final CRLF.
fn split_fields(header: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        if header[i] == b'\n' {
            let next = header.get(i + 1).copied();
            // A continuation line starts with space or tab (RFC 5322 2.2.3).
            if next != Some(b' ') && next != Some(b'\t') {
                fields.push(&header[start..=i]);
                start = i + 1;
            }
        }
        i += 1;
    }
    if start < header.len() {
        fields.push(&header[start..]);
    }
    fields
}

fn is_field(field: &[u8], name: &[u8]) -> bool {
    field.len() > name.len()
        && field[..name.len()].eq_ignore_ascii_case(name)
        && field[name.len()] == b':'
}

/// The raw value after "Name:", without the final CRLF.
fn field_value(field: &[u8]) -> &[u8] {
    let colon = field.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
    let v = &field[colon..];
    let v = v.strip_suffix(b"\n").unwrap_or(v);
    v.strip_suffix(b"\r").unwrap_or(v)
}

/// The display name of `Name <addr>` (quotes kept as written), unfolded,
/// or of `addr (Name)` (the comment form cron uses), quoted; None for a
/// bare address, a group or a list, or anything not whole: the `<` that
/// starts the address is looked for outside quoted strings and comments,
/// so `"Smith <ops>" <root@pi.lan>` keeps its whole name.
fn display_name(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let unfolded: String = text
        .chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    let (mut quoted, mut depth, mut escaped) = (false, 0u32, false);
    let (mut comment, mut last_comment) = (String::new(), None);
    let mut angle = None;
    for (i, c) in unfolded.char_indices() {
        if escaped {
            escaped = false;
            if depth > 0 {
                comment.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => {
                if depth > 0 {
                    comment.push(c);
                }
                depth += 1;
            }
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    last_comment = Some(std::mem::take(&mut comment));
                } else {
                    comment.push(c);
                }
            }
            '<' if !quoted && depth == 0 => {
                angle = Some(i);
                break;
            }
            ',' | ';' | ':' if !quoted && depth == 0 => return None,
            _ if depth > 0 => comment.push(c),
            _ => {}
        }
    }
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let name = match angle {
        Some(i) => words(&unfolded[..i]),
        None if quoted || depth > 0 => return None,
        None => {
            let name = words(&last_comment?);
            if name.is_empty() {
                return None;
            }
            // Encoded-words (`=?UTF-8?Q?J=C3=BCrgen?=`) and plain atoms make
            // a phrase as they are; inside quotes an encoded-word is not
            // decoded (RFC 2047 5), so only other text is quoted.
            let atom = |w: &str| {
                is_encoded_word(w)
                    || w.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=^_`{|}~".contains(&b))
            };
            if name.split(' ').all(atom) {
                name
            } else {
                format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
            }
        }
    };
    (!name.is_empty()).then_some(name)
}

/// An RFC 2047 encoded-word as a phrase may hold one (section 5.3):
/// `=?charset?Q?text?=` or `?B?`, the text only of the characters allowed
/// there, so nothing in it can end the phrase or start an address.
fn is_encoded_word(w: &str) -> bool {
    let Some(inner) = w.strip_prefix("=?").and_then(|w| w.strip_suffix("?=")) else {
        return false;
    };
    let mut parts = inner.split('?');
    let (Some(charset), Some(encoding), Some(text), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !charset.is_empty()
        && charset
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_*".contains(&b))
        && matches!(encoding, "Q" | "q" | "B" | "b")
        && !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!*+-/=_".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::rewrite_header;

    fn rw(header: &str) -> String {
        String::from_utf8(rewrite_header(header.as_bytes(), "me@example.net")).expect("utf8")
    }

    #[test]
    fn keeps_display_name_and_adds_reply_to() {
        assert_eq!(
            rw("Subject: x\r\nFrom: Cron Daemon <root@pi.lan>\r\nTo: a@b\r\n"),
            "Subject: x\r\nFrom: Cron Daemon <me@example.net>\r\nReply-To: Cron Daemon <root@pi.lan>\r\nTo: a@b\r\n"
        );
    }

    #[test]
    fn a_less_than_sign_inside_the_name_and_cron_s_comment_form() {
        assert_eq!(
            rw("From: \"Smith <ops>\" <root@pi.lan>\r\n"),
            "From: \"Smith <ops>\" <me@example.net>\r\nReply-To: \"Smith <ops>\" <root@pi.lan>\r\n"
        );
        assert_eq!(
            rw("From: root (Cron Daemon)\r\n"),
            "From: Cron Daemon <me@example.net>\r\nReply-To: root (Cron Daemon)\r\n"
        );
        assert_eq!(
            rw("From: root@pi.lan (a \"quoted\" (nested) name)\r\n"),
            "From: \"a \\\"quoted\\\" (nested) name\" <me@example.net>\r\nReply-To: root@pi.lan (a \"quoted\" (nested) name)\r\n"
        );
        assert_eq!(
            rw("From: root (=?UTF-8?Q?J=C3=BCrgen?= Cron)\r\n"),
            "From: =?UTF-8?Q?J=C3=BCrgen?= Cron <me@example.net>\r\nReply-To: root (=?UTF-8?Q?J=C3=BCrgen?= Cron)\r\n"
        );
        // Look-alikes are quoted, so nothing in them becomes an address.
        assert_eq!(
            rw("From: root (=?a?<evil@x.test>?=)\r\n"),
            "From: \"=?a?<evil@x.test>?=\" <me@example.net>\r\nReply-To: root (=?a?<evil@x.test>?=)\r\n"
        );
        // Unbalanced: no name rather than half of one.
        assert_eq!(
            rw("From: \"Smith <root@pi.lan>\r\n"),
            "From: <me@example.net>\r\nReply-To: \"Smith <root@pi.lan>\r\n"
        );
    }

    #[test]
    fn bare_address_and_quoted_names() {
        assert_eq!(
            rw("From: root@pi.lan\r\n"),
            "From: <me@example.net>\r\nReply-To: root@pi.lan\r\n"
        );
        assert_eq!(
            rw("From: \"Smart, Disk\" <smartd@pi.lan>\r\n"),
            "From: \"Smart, Disk\" <me@example.net>\r\nReply-To: \"Smart, Disk\" <smartd@pi.lan>\r\n"
        );
    }

    #[test]
    fn existing_reply_to_is_kept_and_folding_is_handled() {
        assert_eq!(
            rw("From: Long\r\n Name <a@pi.lan>\r\nReply-To: list@x\r\n"),
            "From: Long Name <me@example.net>\r\nReply-To: list@x\r\n"
        );
    }

    #[test]
    fn missing_from_is_added() {
        assert_eq!(
            rw("Subject: s\r\n"),
            "Subject: s\r\nFrom: <me@example.net>\r\n"
        );
    }

    #[test]
    fn from_inside_another_field_is_not_touched() {
        assert_eq!(
            rw("X-Note: From: x\r\nFrom: a@pi.lan\r\n"),
            "X-Note: From: x\r\nFrom: <me@example.net>\r\nReply-To: a@pi.lan\r\n"
        );
    }
}
