//! Where a recipient's mail goes next: the smarthost, or the MX hosts of its
//! domain (RFC 5321 section 5.1), as an ordered list of addresses to try.
//!
//! Rules: MX hosts in preference order (equal preferences already shuffled
//! by the resolver); each host's IPv6 then IPv4 addresses; no MX record
//! means the domain itself (implicit MX); a null MX (RFC 7505) or a domain
//! that does not exist fails at once; DNS trouble is temporary. An address
//! literal (`user@[192.0.2.1]`) goes to that address. Owns no sockets: the
//! relay connects to what this returns.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use super::dns::{DnsError, MxAnswer, Resolver};
use crate::config::Smarthost;

/// One address to try, with the host name it belongs to (for TLS and logs)
/// and its MX preference (0 for a smarthost, a literal or an implicit MX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub host: String,
    pub addr: SocketAddr,
    pub preference: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Try again later (DNS timeout, SERVFAIL, MX hosts without addresses).
    Temporary(String),
    /// Give up: the text starts with an RFC 3463 code.
    Permanent(String),
}

/// At most this many MX hosts are tried per attempt, as Postfix does (5).
const MAX_MX_HOSTS: usize = 5;
/// At most this many addresses per host and address family, so one host
/// with hundreds of silent addresses cannot hold a delivery for hours
/// (Postfix stops at 5 addresses in all; this keeps two of each family for
/// each of the 5 hosts, so an IPv4-only box still reaches every host).
const MAX_ADDRESSES_PER_FAMILY: usize = 2;

/// The smarthost's addresses, looked up the system's way (so /etc/hosts works).
pub fn smarthost(sh: &Smarthost) -> Result<Vec<Candidate>, RouteError> {
    let addrs: Vec<SocketAddr> = (sh.host.as_str(), sh.port)
        .to_socket_addrs()
        .map_err(|e| RouteError::Temporary(format!("cannot resolve smarthost {}: {e}", sh.host)))?
        .collect();
    if addrs.is_empty() {
        return Err(RouteError::Temporary(format!(
            "smarthost {} has no address",
            sh.host
        )));
    }
    Ok(addrs
        .into_iter()
        .map(|addr| Candidate {
            host: sh.host.clone(),
            addr,
            preference: 0,
        })
        .collect())
}

/// The addresses to try for `domain`, in order.
pub fn direct(resolver: &Resolver, domain: &str, port: u16) -> Result<Vec<Candidate>, RouteError> {
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        // The tag is case-insensitive (RFC 5321 4.1.3, RFC 5234 2.3).
        let address = match literal.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => &literal[5..],
            _ => literal,
        };
        let ip = address
            .parse::<IpAddr>()
            .map_err(|_| RouteError::Permanent(format!("5.1.2 bad address literal [{literal}]")))?;
        return Ok(vec![Candidate {
            host: ip.to_string(),
            addr: SocketAddr::new(ip, port),
            preference: 0,
        }]);
    }
    if !domain.is_ascii() {
        // Waiting would not help: this build cannot convert U-labels to
        // A-labels (IDNA), so fail at once with a clear reason.
        return Err(RouteError::Permanent(format!(
            "5.1.2 domain {domain} needs IDNA, which this server does not support yet"
        )));
    }
    let hosts = match resolver.mx(domain) {
        Ok(MxAnswer::Hosts(mx)) => mx.into_iter().map(|m| (m.preference, m.exchange)).collect(),
        Ok(MxAnswer::NoMx) => vec![(0, domain.to_ascii_lowercase())],
        Ok(MxAnswer::NullMx) => {
            return Err(RouteError::Permanent(format!(
                "5.1.10 domain {domain} does not accept mail (null MX, RFC 7505)"
            )))
        }
        Err(DnsError::NxDomain) => {
            return Err(RouteError::Permanent(format!(
                "5.1.2 domain {domain} does not exist"
            )))
        }
        Err(DnsError::Temporary(why)) => {
            return Err(RouteError::Temporary(format!(
                "MX lookup for {domain}: {why}"
            )))
        }
    };
    let mut out = Vec::new();
    let mut last_error = None;
    for (preference, host) in hosts.iter().take(MAX_MX_HOSTS) {
        match resolver.addrs(host) {
            Ok(ips) => {
                // IPv6 first, then IPv4 (the resolver's order), a few of
                // each, so that a broken IPv6 path cannot use up the
                // host's share.
                let mut taken = [0; 2];
                for ip in ips {
                    let addr = SocketAddr::new(ip, port);
                    let family = usize::from(ip.is_ipv4());
                    if taken[family] < MAX_ADDRESSES_PER_FAMILY
                        && !out.iter().any(|c: &Candidate| c.addr == addr)
                    {
                        taken[family] += 1;
                        out.push(Candidate {
                            host: host.clone(),
                            addr,
                            preference: *preference,
                        });
                    }
                }
            }
            Err(e) => last_error = Some(format!("address lookup for {host}: {e}")),
        }
    }
    if out.is_empty() {
        // An implicit MX whose name has no address: nothing will ever work.
        if hosts.len() == 1 && hosts[0].1.eq_ignore_ascii_case(domain) && last_error.is_none() {
            return Err(RouteError::Permanent(format!(
                "5.1.2 domain {domain} has no MX and no address"
            )));
        }
        return Err(RouteError::Temporary(last_error.unwrap_or_else(|| {
            format!("no address for the MX hosts of {domain}")
        })));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::dns::test_server::{Record, TestDns};
    use std::time::Duration;

    fn resolver(dns: &TestDns) -> Resolver {
        Resolver::new(&[dns.addr]).with_timeout(Duration::from_millis(300), 1)
    }

    fn hosts(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| format!("{} {}", c.host, c.addr)).collect()
    }

    #[test]
    fn mx_hosts_in_preference_order_ipv6_first() {
        let dns = TestDns::start(vec![
            Record::mx("example.test", 20, "backup.example.test"),
            Record::mx("example.test", 10, "mail.example.test"),
            Record::a("mail.example.test", "127.0.0.5".parse().expect("ip")),
            Record::aaaa("mail.example.test", "::1".parse().expect("ip")),
            Record::a("backup.example.test", "127.0.0.6".parse().expect("ip")),
        ]);
        let got = direct(&resolver(&dns), "example.test", 2525).expect("route");
        assert_eq!(
            hosts(&got),
            [
                "mail.example.test [::1]:2525",
                "mail.example.test 127.0.0.5:2525",
                "backup.example.test 127.0.0.6:2525"
            ]
        );
    }

    #[test]
    fn addresses_are_capped_and_deduplicated() {
        let mut records = vec![
            Record::mx("many.test", 10, "a.many.test"),
            Record::mx("many.test", 20, "b.many.test"),
            Record::aaaa("a.many.test", "::1".parse().expect("ip")),
            Record::aaaa("a.many.test", "::2".parse().expect("ip")),
            Record::aaaa("a.many.test", "::3".parse().expect("ip")),
        ];
        for i in 1..=200u8 {
            let ip = std::net::Ipv4Addr::new(127, 0, 1, i);
            records.push(Record::a("a.many.test", ip));
            records.push(Record::a("b.many.test", ip));
        }
        records.push(Record::a("b.many.test", "127.0.2.1".parse().expect("ip")));
        let dns = TestDns::start(records);
        let got = hosts(&direct(&resolver(&dns), "many.test", 25).expect("route"));
        // Two of each family for a, then b's addresses that a did not have.
        assert_eq!(got.len(), 4 + 2, "{got:?}");
        assert!(
            got[..2].iter().all(|h| h.starts_with("a.many.test [::")),
            "{got:?}"
        );
        assert!(
            got[2..4]
                .iter()
                .all(|h| h.starts_with("a.many.test 127.0.1.")),
            "{got:?}"
        );
        assert!(
            got[4..].iter().all(|h| h.starts_with("b.many.test ")),
            "{got:?}"
        );
        let unique: std::collections::HashSet<_> = got
            .iter()
            .map(|h| h.split(' ').nth(1).expect("addr"))
            .collect();
        assert_eq!(unique.len(), got.len(), "{got:?}");
    }

    #[test]
    fn implicit_null_missing_and_literal() {
        let dns = TestDns::start(vec![
            Record::a("nomx.test", "127.0.0.7".parse().expect("ip")),
            Record::mx("null.test", 0, "."),
            Record::mx("dangling.test", 10, "gone.test"),
        ]);
        let r = resolver(&dns);
        assert_eq!(
            hosts(&direct(&r, "nomx.test", 25).expect("implicit MX")),
            ["nomx.test 127.0.0.7:25"]
        );
        match direct(&r, "null.test", 25) {
            Err(RouteError::Permanent(m)) => assert!(m.starts_with("5.1.10 "), "{m}"),
            other => panic!("{other:?}"),
        }
        match direct(&r, "nowhere.test", 25) {
            Err(RouteError::Permanent(m)) => assert!(m.starts_with("5.1.2 "), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            direct(&r, "dangling.test", 25),
            Err(RouteError::Temporary(_))
        ));
        assert_eq!(
            hosts(&direct(&r, "[127.0.0.9]", 25).expect("literal")),
            ["127.0.0.9 127.0.0.9:25"]
        );
        for literal in ["[IPv6:::1]", "[ipv6:::1]"] {
            assert_eq!(
                hosts(&direct(&r, literal, 25).expect("literal")),
                ["::1 [::1]:25"]
            );
        }
        assert!(matches!(
            direct(&r, "bücher.test", 25),
            Err(RouteError::Permanent(_))
        ));
    }

    #[test]
    fn dns_failure_is_temporary() {
        let dns = TestDns::serve({
            let mut z = crate::relay::dns::test_server::Zone::new(vec![]);
            z.servfail.push("broken.test".into());
            z
        });
        assert!(matches!(
            direct(&resolver(&dns), "broken.test", 25),
            Err(RouteError::Temporary(_))
        ));
    }
}
