//! What a finished transaction hands to delivery: the envelope (sender and
//! accepted recipients with where each one's mail goes) and the trace data
//! for the `Received:` header (RFC 5321 4.4).
//!
//! Owns the text of the `Received:` field; it does not write files (that is
//! `deliver.rs`) and does not decide who is accepted (that is the session).

use std::net::IpAddr;
use std::path::Path;

use crate::local::Target;

/// One accepted recipient: the address as given at RCPT and its expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: String,
    pub targets: Vec<Target>,
}

impl Recipient {
    /// The domain part of the address, for `Delivered-To:` on local copies.
    pub fn domain(&self) -> &str {
        self.address.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

/// A local Maildir copy to write, deduplicated across recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxCopy<'a> {
    pub dir: &'a Path,
    /// `user@domain`, for the `Delivered-To:` field.
    pub delivered_to: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The session id, for logs.
    pub session: String,
    /// The reverse-path; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub helo: String,
    pub peer: IpAddr,
    /// `SMTP`, `ESMTP`, `ESMTPSA`, `UTF8SMTP`... (RFC 3848, RFC 6531 3.7.3).
    pub protocol: &'static str,
    /// TLS protocol and cipher, when the session was encrypted.
    pub tls: Option<String>,
    /// The Unix login, for a local submission (the sendmail socket).
    pub local_user: Option<String>,
}

impl Message {
    /// The `Received:` field for the top of the message, CRLF-terminated.
    pub fn received_header(&self, hostname: &str, id: &str, now: u64) -> String {
        let peer = match self.peer {
            IpAddr::V4(ip) => format!("[{ip}]"),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => format!("[{v4}]"),
                None => format!("[IPv6:{ip}]"),
            },
        };
        let mut h = match &self.local_user {
            // A local program: no network peer to name (as Postfix's
            // "from userid" line).
            Some(login) => format!(
                "Received: by {} (postling session {}, from user {}) with {} id {}",
                hostname, self.session, login, self.protocol, id
            ),
            None => format!(
                "Received: from {} ({})\r\n\tby {} (postling session {}) with {} id {}",
                // Any graphic ASCII passes EHLO; these would open or close
                // a comment or a quoted string (RFC 5322 3.2) and change
                // what follows.
                self.helo.replace(['(', ')', '\\', '"'], "?"),
                peer,
                hostname,
                self.session,
                self.protocol,
                id
            ),
        };
        if let Some(tls) = &self.tls {
            h.push_str(&format!("\r\n\t(using {tls})"));
        }
        // Name the recipient only when there is exactly one, so a Bcc
        // recipient is never shown to the others (as Postfix does).
        if let [only] = self.recipients.as_slice() {
            h.push_str(&format!("\r\n\tfor <{}>", only.address));
        }
        h.push_str(&format!("; {}\r\n", crate::date::rfc5322(now)));
        h
    }

    /// Every distinct local mailbox, with the address it was reached through.
    pub fn mailboxes(&self) -> Vec<MailboxCopy<'_>> {
        let mut out: Vec<MailboxCopy> = Vec::new();
        for r in &self.recipients {
            for t in &r.targets {
                if let Target::Mailbox { user, dir } = t {
                    if !out.iter().any(|c| c.dir == dir.as_path()) {
                        out.push(MailboxCopy {
                            dir,
                            delivered_to: format!("{}@{}", user, r.domain()),
                        });
                    }
                }
            }
        }
        out
    }

    /// Every distinct remote address, in order of first appearance.
    pub fn remote(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.recipients {
            for t in &r.targets {
                if let Target::Remote(addr) = t {
                    if !out.iter().any(|a| same_address(a, addr)) {
                        out.push(addr);
                    }
                }
            }
        }
        out
    }
}

/// Domains compare case-insensitively; local parts exactly (RFC 5321 2.4).
fn same_address(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn msg(recipients: Vec<Recipient>) -> Message {
        Message {
            session: "S1".into(),
            sender: "a@b.c".into(),
            recipients,
            helo: "printer.lan".into(),
            peer: "192.168.1.5".parse().expect("valid literal"),
            protocol: "ESMTP",
            tls: None,
            local_user: None,
        }
    }

    fn mailbox(user: &str) -> Target {
        Target::Mailbox {
            user: user.into(),
            dir: PathBuf::from(format!("/m/{user}")),
        }
    }

    #[test]
    fn received_names_single_recipient_only() {
        let one = msg(vec![Recipient {
            address: "x@pi.lan".into(),
            targets: vec![mailbox("x")],
        }]);
        assert_eq!(
            one.received_header("pi.lan", "ID1", 0),
            "Received: from printer.lan ([192.168.1.5])\r\n\tby pi.lan (postling session S1) with ESMTP id ID1\r\n\tfor <x@pi.lan>; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        let two = msg(vec![
            Recipient {
                address: "x@pi.lan".into(),
                targets: vec![mailbox("x")],
            },
            Recipient {
                address: "y@pi.lan".into(),
                targets: vec![mailbox("y")],
            },
        ]);
        assert!(!two.received_header("pi.lan", "ID1", 0).contains("for <"));
        let mut odd = msg(Vec::new());
        odd.helo = "x(y)\\\"".into();
        assert!(odd
            .received_header("pi.lan", "ID1", 0)
            .starts_with("Received: from x?y??? ([192.168.1.5])\r\n"));
    }

    #[test]
    fn copies_are_deduplicated() {
        let m = msg(vec![
            Recipient {
                address: "root@pi.lan".into(),
                targets: vec![mailbox("alice"), Target::Remote("b@x.org".into())],
            },
            Recipient {
                address: "alice@localhost".into(),
                targets: vec![mailbox("alice")],
            },
            Recipient {
                address: "B@x.org".into(),
                targets: vec![Target::Remote("B@x.org".into())],
            },
        ]);
        let copies = m.mailboxes();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].delivered_to, "alice@pi.lan");
        assert_eq!(
            m.remote(),
            vec!["b@x.org", "B@x.org"],
            "local parts are case-sensitive"
        );
        let m = msg(vec![
            Recipient {
                address: "b@X.org".into(),
                targets: vec![Target::Remote("b@X.org".into())],
            },
            Recipient {
                address: "b@x.ORG".into(),
                targets: vec![Target::Remote("b@x.ORG".into())],
            },
        ]);
        assert_eq!(m.remote(), vec!["b@X.org"], "domains are not");
    }
}
