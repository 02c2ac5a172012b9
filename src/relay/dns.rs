//! A small blocking stub resolver for the relay thread: MX and A/AAAA lookups
//! against `relay.dns_servers` or the nameservers of `/etc/resolv.conf`.
//!
//! It owns the DNS exchange only: one query over UDP (RFC 1035 4.2.1) with
//! EDNS0 (RFC 6891, 1232-byte payload), the same query over TCP with the
//! 2-byte length prefix (RFC 1035 4.2.2, RFC 7766) when the reply is
//! truncated, per-try timeouts, `attempts` rounds over the servers in order,
//! and CNAME following (RFC 1034 3.6.2, at most 8 hops). It does not cache,
//! does not do IDNA (non-ASCII names are refused), and does not decide
//! routing: null MX (RFC 7505) and implicit MX (RFC 5321 5.1) are reported as
//! [`MxAnswer`] variants for `route.rs` to act on.
//!
//! Anti-spoofing: every try uses a fresh socket (fresh source port) and a
//! random 16-bit id; a reply is accepted only from the server's address with
//! the same id, the QR bit and the same question. Anything else is ignored
//! and the resolver keeps waiting until the per-try deadline.
//!
//! Wire format: the `simple-dns` crate (0.13). Evaluated against `domain`
//! 0.12 (NLnet Labs) with base features only: `domain` pulls in a proc-macro
//! crate (syn, quote), `jiff` and `octseq` and a much larger generic API
//! (octets traits, builders, parsers) for what is here three record types;
//! `simple-dns` depends only on `bitflags`, builds a query in five lines,
//! parses a whole message into plain enums (`RData::MX`, `RData::A`, ...),
//! exposes rcode and the TC flag directly, and its name decoder only accepts
//! compression pointers that point backwards, so it cannot loop. It costs a
//! few tens of KiB more in a release binary than `domain` (RECIPES.md); we
//! take that for the smaller build and the simpler code. The sockets are ours
//! (`std::net`), so no async runtime is involved.
//!
//! [`test_server`] is a tiny loopback DNS responder for tests (this module's
//! and the integration tests' MX routing); it is small and always compiled.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::debug;
use simple_dns::rdata::{RData, OPT};
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};

/// Default time to wait for one reply from one server.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of rounds over the server list.
const DEFAULT_ATTEMPTS: u32 = 2;
/// Most CNAME hops followed for one lookup (within answers and across queries).
const MAX_CNAME_HOPS: usize = 8;
/// EDNS0 UDP payload size advertised (the DNS flag day 2020 value).
const EDNS_UDP_PAYLOAD: u16 = 1232;
/// Longest domain name in text form without the trailing dot (RFC 1035 2.3.4).
const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 2.3.4).
const MAX_LABEL_LEN: usize = 63;
/// The standard DNS port.
const DNS_PORT: u16 = 53;

/// A blocking stub resolver: a list of recursive servers, a per-try timeout
/// and a number of rounds over that list.
#[derive(Debug, Clone)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    /// When the servers come from resolv.conf: that file, re-read when it
    /// changes (a DHCP lease, a network that came up after postling).
    system: Option<Arc<Mutex<SystemServers>>>,
    timeout: Duration,
    attempts: u32,
}

/// The servers of a resolv.conf file and the file's state when read.
#[derive(Debug)]
struct SystemServers {
    path: PathBuf,
    /// Modification time, inode and size: a change to any re-reads it.
    stamp: Option<(SystemTime, u64, u64)>,
    servers: Vec<SocketAddr>,
}

impl SystemServers {
    fn current(&mut self) -> Vec<SocketAddr> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.ino(), m.len()));
        if stamp != self.stamp || self.servers.is_empty() {
            self.stamp = stamp;
            self.servers = std::fs::read_to_string(&self.path)
                .map(|text| parse_resolv_conf(&text))
                .unwrap_or_default();
            if self.servers.is_empty() {
                self.servers
                    .push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT));
            }
            debug!(
                "dns: {} server(s) from {}",
                self.servers.len(),
                self.path.display()
            );
        }
        self.servers.clone()
    }
}

/// One mail exchanger from an MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    /// Lowercased, without the trailing dot.
    pub exchange: String,
}

/// The outcome of a successful MX lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// Sorted by preference; equal preferences in random order (RFC 5321 5.1).
    Hosts(Vec<Mx>),
    /// RFC 7505: the domain accepts no mail (its only MX has exchange ".").
    NullMx,
    /// NOERROR without MX records: the caller uses the domain's A/AAAA
    /// (implicit MX, RFC 5321 5.1).
    NoMx,
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name does not exist (rcode 3): a permanent failure for the caller.
    NxDomain,
    /// Timeout, SERVFAIL, REFUSED, network error, malformed reply, CNAME loop,
    /// unusable name: try later. The text is one line, safe for logs.
    Temporary(String),
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::NxDomain => f.write_str("domain does not exist (NXDOMAIN)"),
            DnsError::Temporary(reason) => write!(f, "temporary DNS failure: {reason}"),
        }
    }
}

impl std::error::Error for DnsError {}

fn temporary(reason: impl Into<String>) -> DnsError {
    DnsError::Temporary(reason.into())
}

impl Resolver {
    /// `servers` from config (each "ip" or "ip:port", default port 53; see
    /// [`parse_server`]); when empty, the `nameserver` lines of
    /// /etc/resolv.conf (IPv6 too, link-local ones with their %interface),
    /// read again whenever the file changes; when that has none,
    /// 127.0.0.1:53.
    pub fn new(servers: &[SocketAddr]) -> Resolver {
        if servers.is_empty() {
            return Resolver::from_resolv_conf(Path::new("/etc/resolv.conf"));
        }
        Resolver {
            servers: servers.to_vec(),
            system: None,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// The servers of the resolv.conf file at `path`, followed as it changes.
    fn from_resolv_conf(path: &Path) -> Resolver {
        Resolver {
            servers: Vec::new(),
            system: Some(Arc::new(Mutex::new(SystemServers {
                path: path.to_path_buf(),
                stamp: None,
                servers: Vec::new(),
            }))),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// Sets the time to wait for one reply from one server (default 2 s) and
    /// the number of rounds over the servers (default 2; at least 1).
    pub fn with_timeout(self, per_try: Duration, attempts: u32) -> Resolver {
        Resolver {
            timeout: per_try,
            attempts: attempts.max(1),
            ..self
        }
    }

    /// The servers this resolver asks now, in order.
    pub fn servers(&self) -> Vec<SocketAddr> {
        match &self.system {
            Some(system) => system.lock().unwrap_or_else(|p| p.into_inner()).current(),
            None => self.servers.clone(),
        }
    }

    /// The MX records of `domain`, following a CNAME at the name (max 8).
    pub fn mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        let name = check_name(domain)?;
        let records = self.lookup(&name, TYPE::MX)?;
        let mut hosts = Vec::new();
        let mut null = false;
        for record in records {
            if let Rr::Mx(preference, exchange) = record {
                if exchange.is_empty() {
                    null = true;
                } else {
                    hosts.push(Mx {
                        preference,
                        exchange,
                    });
                }
            }
        }
        if hosts.is_empty() {
            // RFC 7505 3: a "." exchange with no usable other MX means no mail.
            return Ok(if null {
                MxAnswer::NullMx
            } else {
                MxAnswer::NoMx
            });
        }
        sort_and_shuffle(&mut hosts, &mut XorShift::new());
        Ok(MxAnswer::Hosts(hosts))
    }

    /// AAAA then A records of `host` (both queried; IPv6 first in the
    /// result), following CNAMEs (max 8 hops; a CNAME chain inside one answer
    /// section is followed without a new query). NODATA for both is an empty
    /// list.
    pub fn addrs(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let name = check_name(host)?;
        let v6 = self.lookup(&name, TYPE::AAAA);
        let v4 = self.lookup(&name, TYPE::A);
        let mut out = Vec::new();
        for records in [&v6, &v4].into_iter().flatten() {
            out.extend(records.iter().filter_map(|r| match r {
                Rr::Aaaa(ip) => Some(IpAddr::V6(*ip)),
                Rr::A(ip) => Some(IpAddr::V4(*ip)),
                _ => None,
            }));
        }
        if !out.is_empty() {
            return Ok(out);
        }
        match (v6, v4) {
            (Err(DnsError::NxDomain), _) | (_, Err(DnsError::NxDomain)) => Err(DnsError::NxDomain),
            (Err(e), _) | (_, Err(e)) => Err(e),
            _ => Ok(out),
        }
    }

    /// Records of `qtype` at `name` or at the end of its CNAME chain.
    fn lookup(&self, name: &str, qtype: TYPE) -> Result<Vec<Rr>, DnsError> {
        let mut current = name.to_string();
        let mut seen = vec![current.clone()];
        loop {
            let answers = self.query(&current, qtype)?;
            let asked = current.clone();
            loop {
                let found: Vec<Rr> = answers
                    .iter()
                    .filter(|(owner, rr)| *owner == current && rr.is(qtype))
                    .map(|(_, rr)| rr.clone())
                    .collect();
                if !found.is_empty() {
                    return Ok(found);
                }
                let target = answers.iter().find_map(|(owner, rr)| match rr {
                    Rr::Cname(target) if *owner == current => Some(target.clone()),
                    _ => None,
                });
                let Some(target) = target else { break };
                if seen.contains(&target) || seen.len() > MAX_CNAME_HOPS {
                    return Err(temporary(format!(
                        "CNAME loop or chain longer than {MAX_CNAME_HOPS} at {name}"
                    )));
                }
                debug!("dns cname {current} => {target}");
                seen.push(target.clone());
                current = target;
            }
            if current == asked {
                return Ok(Vec::new()); // NODATA
            }
            // The chain leaves this answer: ask for the target itself.
            current = check_name(&current)?;
        }
    }

    /// One question, answered by the first server that gives NOERROR or
    /// NXDOMAIN; returns the answer section as (owner, record) pairs.
    ///
    /// A server that answers without recursion and without an answer (a
    /// referral: an authoritative-only server, a broken forwarder) has not
    /// answered, and the next one is asked, as glibc and Go do: taking it
    /// for "no such record" would bounce every domain's mail. A server that
    /// refuses the EDNS record (FORMERR, NOTIMP: RFC 6891 7) is asked again
    /// without it (6.2.2).
    fn query(&self, name: &str, qtype: TYPE) -> Result<Vec<(String, Rr)>, DnsError> {
        let mut last = String::from("no DNS servers configured");
        let servers = self.servers();
        for _ in 0..self.attempts {
            for server in &servers {
                for edns in [true, false] {
                    let id = (random_u64() & 0xffff) as u16;
                    let msg = build_query(id, name, qtype, edns)?;
                    let q = Expect { id, name, qtype };
                    match self.exchange(*server, &msg, &q) {
                        Ok(reply) => match reply.rcode {
                            RCODE::NoError if reply.lame => {
                                last = format!(
                                    "{server} sent a referral, not an answer, for {name} {qtype:?} \
                                     (no recursion there?)"
                                );
                                debug!("dns {last}");
                            }
                            RCODE::NoError => return Ok(reply.answers),
                            RCODE::NameError => return Err(DnsError::NxDomain),
                            rcode @ (RCODE::FormatError | RCODE::NotImplemented) if edns => {
                                debug!("dns {server} answered {rcode:?} with EDNS; asking without");
                                continue;
                            }
                            rcode => {
                                last = format!("{server} answered {rcode:?} for {name} {qtype:?}");
                                debug!("dns {last}");
                            }
                        },
                        Err(reason) => {
                            last = format!("{reason} from {server} for {name} {qtype:?}");
                            debug!("dns {last}");
                        }
                    }
                    break;
                }
            }
        }
        Err(DnsError::Temporary(last))
    }

    /// One try at one server: UDP, then TCP if the UDP reply is truncated.
    fn exchange(&self, server: SocketAddr, msg: &[u8], q: &Expect) -> Result<Reply, String> {
        let reply = self.udp(server, msg, q)?;
        if !reply.truncated {
            return Ok(reply);
        }
        debug!("dns truncated reply from {server}, retrying over TCP");
        self.tcp(server, msg, q)
    }

    fn udp(&self, server: SocketAddr, msg: &[u8], q: &Expect) -> Result<Reply, String> {
        let deadline = Instant::now() + self.timeout;
        // Connected: the kernel drops datagrams from other addresses and
        // reports ICMP port unreachable as an error at once.
        let sock = udp_connected(server).map_err(|e| format!("UDP socket: {e}"))?;
        sock.send(msg).map_err(|e| format!("UDP send: {e}"))?;
        let mut buf = vec![0u8; 65535];
        let mut malformed = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(malformed.unwrap_or_else(|| "timeout".to_string()));
            }
            sock.set_read_timeout(Some(left))
                .map_err(|e| format!("UDP timeout: {e}"))?;
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if crate::wait::is_retry(&e) => continue,
                Err(e) => return Err(format!("UDP receive: {e}")),
            };
            if from != server {
                continue; // cannot happen on a connected socket; be sure
            }
            match decode_reply(&buf[..n], q) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => continue, // not ours: keep waiting
                // Cut short with TC set (some servers and middleboxes cut
                // at any byte): the header alone says "ask over TCP" (RFC
                // 7766 5), where the whole reply is checked. Never for a
                // TCP reply, which has no TC to fall back on.
                Err(_) if buf[2] & 0x80 != 0 && buf[2] & 0x02 != 0 => {
                    return Ok(Reply {
                        rcode: RCODE::NoError,
                        truncated: true,
                        lame: false,
                        answers: Vec::new(),
                    })
                }
                Err(e) => malformed = Some(e),
            }
        }
    }

    fn tcp(&self, server: SocketAddr, msg: &[u8], q: &Expect) -> Result<Reply, String> {
        let deadline = Instant::now() + self.timeout;
        let left = || {
            let d = deadline.saturating_duration_since(Instant::now());
            // A zero timeout means "forever" to std; keep a floor.
            d.max(Duration::from_millis(1))
        };
        let mut stream =
            TcpStream::connect_timeout(&server, left()).map_err(|e| format!("TCP connect: {e}"))?;
        let io_err = |e: io::Error| {
            if crate::wait::is_retry(&e) {
                "TCP timeout".to_string()
            } else {
                format!("TCP: {e}")
            }
        };
        let len = u16::try_from(msg.len()).map_err(|_| "query too long".to_string())?;
        let mut out = Vec::with_capacity(msg.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(msg);
        stream.set_write_timeout(Some(left())).map_err(io_err)?;
        stream.write_all(&out).map_err(io_err)?;
        // The socket timeout bounds each read, not the exchange: a server
        // that sends a byte now and then is cut off at the deadline.
        let mut read_full = |buf: &mut [u8]| -> Result<(), String> {
            let mut filled = 0;
            while filled < buf.len() {
                if Instant::now() >= deadline {
                    return Err("TCP timeout".to_string());
                }
                stream.set_read_timeout(Some(left())).map_err(io_err)?;
                match stream.read(&mut buf[filled..]) {
                    Ok(0) => return Err("TCP: connection closed mid-reply".to_string()),
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            Ok(())
        };
        let mut len = [0u8; 2];
        read_full(&mut len)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        read_full(&mut buf)?;
        match decode_reply(&buf, q)? {
            Some(reply) => Ok(reply),
            None => Err("TCP reply does not match the query".to_string()),
        }
    }
}

/// A UDP socket of `to`'s family on any local port, connected to `to`
/// (which only picks the route: nothing is sent).
pub(crate) fn udp_connected(to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(to)?;
    Ok(sock)
}

/// Parses a config entry: "ip", "ip:port" or "[ipv6]:port"; default port 53.
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, DNS_PORT)),
        Err(_) => Err(format!("DNS server {s:?} is not an IP address or ip:port")),
    }
}

/// The `nameserver` lines of a resolv.conf text, port 53, in order. An
/// IPv6 address may carry a `%scope`, an interface name or number, which a
/// link-local address needs (NetworkManager writes `fe80::1%wlan0` for a
/// router's RDNSS); anything unparsable is skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let (addr, scope) = match word.split_once('%') {
            Some((addr, scope)) => (addr, Some(scope)),
            None => (word, None),
        };
        match (addr.parse::<IpAddr>(), scope) {
            // Only a link-local address needs its interface; on any other
            // the scope would make replies (which come without one) miss.
            (Ok(IpAddr::V6(ip)), Some(scope)) if (ip.segments()[0] & 0xffc0) == 0xfe80 => {
                let id = scope.parse::<u32>().ok().or_else(|| {
                    nix::net::if_::if_nametoindex(scope)
                        .ok()
                        .filter(|&i| i != 0)
                });
                match id {
                    Some(id) => out.push(SocketAddrV6::new(ip, DNS_PORT, 0, id).into()),
                    None => debug!("resolv.conf: no interface {scope:?} for {word}; skipped"),
                }
            }
            (Ok(ip), _) => out.push(SocketAddr::new(ip, DNS_PORT)),
            _ => {}
        }
    }
    out
}

/// Checks a name for a query and returns it lowercased without the trailing
/// dot.
fn check_name(name: &str) -> Result<String, DnsError> {
    if !name.is_ascii() {
        return Err(temporary("non-ASCII domain needs IDNA"));
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(temporary("empty domain name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(temporary(format!(
            "domain name longer than {MAX_NAME_LEN} octets"
        )));
    }
    if let Some(b) = name.bytes().find(|b| b.is_ascii_control() || *b == b' ') {
        return Err(temporary(format!(
            "domain name contains control or space byte 0x{b:02x}"
        )));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(temporary(format!("domain name {name} has an empty label")));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(temporary(format!(
                "domain name has a label longer than {MAX_LABEL_LEN} octets"
            )));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// A query for `name` (already checked) with RD set and, with `edns`, an
/// EDNS0 OPT record.
fn build_query(id: u16, name: &str, qtype: TYPE, edns: bool) -> Result<Vec<u8>, DnsError> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        wire_name(name),
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    if edns {
        *packet.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: EDNS_UDP_PAYLOAD,
            version: 0,
        });
    }
    packet
        .build_bytes_vec()
        .map_err(|e| temporary(format!("cannot encode query: {e}")))
}

/// A name in wire form from dotted text; "" and "." are the root.
fn wire_name(name: &str) -> Name<'_> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        Name::new_with_labels(&[])
    } else {
        Name::new_unchecked(name)
    }
}

/// A decoded name: labels joined by dots, lowercased, no trailing dot ("" for
/// the root). Bytes that are not printable ASCII, and dots inside a label,
/// become '?', so the text is safe for logs and never re-splits differently.
fn text_name(name: &Name<'_>) -> String {
    let mut out = String::new();
    for (i, label) in name.get_labels().iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label.as_ref() {
            out.push(if b.is_ascii_graphic() && b != b'.' {
                char::from(b.to_ascii_lowercase())
            } else {
                '?'
            });
        }
    }
    out
}

/// What a reply must match.
struct Expect<'a> {
    id: u16,
    name: &'a str,
    qtype: TYPE,
}

/// The parts of a reply the resolver uses.
#[derive(Debug)]
struct Reply {
    rcode: RCODE,
    truncated: bool,
    /// NOERROR with no answer, from a server that is not authoritative and
    /// offers no recursion: a referral, not an answer.
    lame: bool,
    answers: Vec<(String, Rr)>,
}

/// The answer records the resolver understands; others are dropped.
#[derive(Debug, Clone, PartialEq)]
enum Rr {
    Mx(u16, String),
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
}

impl Rr {
    fn is(&self, qtype: TYPE) -> bool {
        matches!(
            (self, qtype),
            (Rr::Mx(..), TYPE::MX) | (Rr::A(_), TYPE::A) | (Rr::Aaaa(_), TYPE::AAAA)
        )
    }
}

/// Decodes a reply. `Ok(None)`: not a reply to this query (wrong id, no QR
/// bit, other question), to be ignored. `Err`: the id matches but the
/// message is malformed. Never panics, whatever the bytes.
fn decode_reply(bytes: &[u8], q: &Expect) -> Result<Option<Reply>, String> {
    if bytes.len() < 12 || u16::from_be_bytes([bytes[0], bytes[1]]) != q.id {
        return Ok(None);
    }
    let packet = Packet::parse(bytes).map_err(|e| format!("malformed reply ({e})"))?;
    if !packet.has_flags(PacketFlag::RESPONSE) {
        return Ok(None);
    }
    let [question] = packet.questions.as_slice() else {
        // An error from a server that does not echo the question (FORMERR
        // from one that refuses EDNS, say) is still its answer: asking
        // again without EDNS, or the next server, beats waiting it out.
        let rcode = packet.rcode();
        if packet.questions.is_empty()
            && matches!(
                rcode,
                RCODE::FormatError | RCODE::NotImplemented | RCODE::ServerFailure | RCODE::Refused
            )
        {
            return Ok(Some(Reply {
                rcode: packet.rcode(),
                truncated: false,
                lame: false,
                answers: Vec::new(),
            }));
        }
        return Ok(None);
    };
    if text_name(&question.qname) != q.name
        || question.qtype != QTYPE::TYPE(q.qtype)
        || question.qclass != QCLASS::CLASS(CLASS::IN)
    {
        return Ok(None);
    }
    let answers = packet
        .answers
        .iter()
        .filter(|rr| rr.class == CLASS::IN)
        .filter_map(|rr| {
            let data = match &rr.rdata {
                RData::MX(mx) => Rr::Mx(mx.preference, text_name(&mx.exchange)),
                RData::A(a) => Rr::A(Ipv4Addr::from(a.address)),
                RData::AAAA(a) => Rr::Aaaa(Ipv6Addr::from(a.address)),
                RData::CNAME(c) => Rr::Cname(text_name(&c.0)),
                _ => return None,
            };
            Some((text_name(&rr.name), data))
        })
        .collect();
    Ok(Some(Reply {
        rcode: packet.rcode(),
        truncated: packet.has_flags(PacketFlag::TRUNCATION),
        // A referral names the servers to ask next (NS in the authority
        // section) and no SOA: a forwarder that does not set RA still
        // gives its NODATA answers an SOA.
        lame: packet.answers.is_empty()
            && !packet.has_flags(PacketFlag::AUTHORITATIVE_ANSWER)
            && !packet.has_flags(PacketFlag::RECURSION_AVAILABLE)
            && packet
                .name_servers
                .iter()
                .any(|rr| matches!(rr.rdata, RData::NS(_)))
            && !packet
                .name_servers
                .iter()
                .any(|rr| matches!(rr.rdata, RData::SOA(_))),
        answers,
    }))
}

/// Runs the reply decoder on arbitrary bytes (for fuzz targets): it must
/// return, never panic or loop.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    let id = match bytes {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    for qtype in [TYPE::MX, TYPE::A] {
        let q = Expect {
            id,
            name: "example.com",
            qtype,
        };
        let _ = decode_reply(bytes, &q);
    }
}

/// 64 unpredictable-enough bits from the time, a process counter and std's
/// per-thread random hash keys (seeded from the OS). Not cryptographic; it
/// keeps query ids and source ports from being guessable by a blind spoofer.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(nanos);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A tiny xorshift64 generator for shuffling equal MX preferences.
struct XorShift(u64);

impl XorShift {
    fn new() -> XorShift {
        XorShift(random_u64() | 1) // never zero, or it stays zero
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in 0..n (n > 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Sorts by preference and shuffles each run of equal preferences.
fn sort_and_shuffle(hosts: &mut [Mx], rng: &mut XorShift) {
    hosts.sort_by_key(|h| h.preference);
    for run in hosts.chunk_by_mut(|a, b| a.preference == b.preference) {
        for i in (1..run.len()).rev() {
            run.swap(i, rng.below(i + 1));
        }
    }
}

/// A tiny loopback DNS responder for tests: UDP and TCP on the same
/// 127.0.0.1 port, answering from a fixed record list, with switches for
/// NXDOMAIN, SERVFAIL, truncation, dropped queries and spoofed replies.
/// Stops when dropped.
#[doc(hidden)]
pub mod test_server {
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use simple_dns::rdata::{RData, A, AAAA, CNAME, MX};
    use simple_dns::{Name, Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};

    /// A record served by [`TestDns`]. Names are matched case-insensitively,
    /// with or without a trailing dot; an MX exchange of "." is a null MX.
    #[derive(Debug, Clone)]
    pub enum Record {
        Mx(String, u16, String),
        A(String, Ipv4Addr),
        Aaaa(String, Ipv6Addr),
        Cname(String, String),
    }

    impl Record {
        /// `Record::Mx` from string slices.
        pub fn mx(name: &str, preference: u16, exchange: &str) -> Record {
            Record::Mx(name.into(), preference, exchange.into())
        }
        pub fn a(name: &str, ip: Ipv4Addr) -> Record {
            Record::A(name.into(), ip)
        }
        pub fn aaaa(name: &str, ip: Ipv6Addr) -> Record {
            Record::Aaaa(name.into(), ip)
        }
        pub fn cname(name: &str, target: &str) -> Record {
            Record::Cname(name.into(), target.into())
        }

        fn owner(&self) -> String {
            match self {
                Record::Mx(n, ..) | Record::A(n, _) | Record::Aaaa(n, _) | Record::Cname(n, _) => {
                    norm(n)
                }
            }
        }
    }

    /// What the server serves and how it misbehaves.
    #[derive(Debug, Clone)]
    pub struct Zone {
        pub records: Vec<Record>,
        /// NXDOMAIN for names with no record at all (else NOERROR, empty).
        pub nxdomain_unknown: bool,
        /// Include the records of a CNAME's target in the same answer, as
        /// recursive resolvers do (else only the CNAME is returned).
        pub chase_cnames: bool,
        /// Names answered with SERVFAIL.
        pub servfail: Vec<String>,
        /// Names whose UDP answers are empty with TC=1 (forcing TCP).
        pub truncate: Vec<String>,
        /// Names whose queries are never answered (UDP and TCP).
        pub drop: Vec<String>,
        /// Names for which a spoofed reply (wrong id, bogus A 192.0.2.66)
        /// and a garbage datagram are sent before the real UDP answer.
        pub spoof_first: Vec<String>,
        /// Answer every query as a non-recursive server that is not
        /// authoritative: NOERROR, no answer, neither AA nor RA.
        pub lame: bool,
        /// Answer FORMERR, without echoing the question, to any query that
        /// carries an EDNS OPT record.
        pub refuse_edns: bool,
        /// Answer as a forwarder that sets neither AA nor RA, but answers.
        pub no_flags: bool,
        /// Names whose UDP answers have TC=1 and are cut in the middle of
        /// their first record, so they do not parse.
        pub truncate_cut: Vec<String>,
    }

    impl Zone {
        pub fn new(records: Vec<Record>) -> Zone {
            Zone {
                records,
                nxdomain_unknown: true,
                chase_cnames: true,
                servfail: Vec::new(),
                truncate: Vec::new(),
                drop: Vec::new(),
                spoof_first: Vec::new(),
                lame: false,
                refuse_edns: false,
                no_flags: false,
                truncate_cut: Vec::new(),
            }
        }
    }

    /// A running responder; `addr` serves UDP and TCP.
    pub struct TestDns {
        pub addr: SocketAddr,
        stop: Arc<AtomicBool>,
        udp_queries: Arc<AtomicUsize>,
        tcp_queries: Arc<AtomicUsize>,
        threads: Vec<JoinHandle<()>>,
    }

    impl TestDns {
        /// Serves `records` with NXDOMAIN for unknown names.
        pub fn start(records: Vec<Record>) -> TestDns {
            TestDns::serve(Zone::new(records))
        }

        /// Serves `zone` on 127.0.0.1, UDP and TCP on one free port.
        pub fn serve(zone: Zone) -> TestDns {
            let (udp, tcp) = bind_pair();
            let addr = udp.local_addr().expect("bound UDP socket has an address");
            let zone = Arc::new(zone);
            let stop = Arc::new(AtomicBool::new(false));
            let udp_queries = Arc::new(AtomicUsize::new(0));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let mut threads = Vec::new();
            {
                let (zone, stop, count) = (zone.clone(), stop.clone(), udp_queries.clone());
                threads.push(thread::spawn(move || serve_udp(udp, &zone, &stop, &count)));
            }
            {
                let (stop, count) = (stop.clone(), tcp_queries.clone());
                threads.push(thread::spawn(move || serve_tcp(tcp, &zone, &stop, &count)));
            }
            TestDns {
                addr,
                stop,
                udp_queries,
                tcp_queries,
                threads,
            }
        }

        /// Queries received over UDP so far.
        pub fn udp_queries(&self) -> usize {
            self.udp_queries.load(Ordering::SeqCst)
        }

        /// Queries received over TCP so far.
        pub fn tcp_queries(&self) -> usize {
            self.tcp_queries.load(Ordering::SeqCst)
        }
    }

    impl Drop for TestDns {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake both loops; they see the flag and return.
            if let Ok(s) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) {
                let _ = s.send_to(b"", self.addr);
            }
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn bind_pair() -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP on 127.0.0.1");
            let port = udp
                .local_addr()
                .expect("bound socket has an address")
                .port();
            if let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return (udp, tcp);
            }
        }
        panic!("no port free for both UDP and TCP on 127.0.0.1");
    }

    fn serve_udp(sock: UdpSocket, zone: &Zone, stop: &AtomicBool, count: &AtomicUsize) {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                thread::sleep(Duration::from_millis(5)); // never spin on an error
                continue;
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            count.fetch_add(1, Ordering::SeqCst);
            let Some((reply, qname)) = answer(zone, &buf[..n], true) else {
                continue;
            };
            if zone.spoof_first.contains(&qname) {
                // A right reply with a bogus address from another port, a
                // wrong id, a wrong question, and a truncated right id.
                if let Ok(other) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) {
                    if let Some(spoof) = spoofed(&buf[..n], 0, &qname) {
                        let _ = other.send_to(&spoof, from);
                    }
                }
                let spoofs = [
                    spoofed(&buf[..n], 1, &qname),
                    spoofed(&buf[..n], 0, "evil.test"),
                ];
                for spoof in spoofs.iter().flatten() {
                    let _ = sock.send_to(spoof, from);
                }
                let mut garbage = reply.clone();
                garbage.truncate(14);
                let _ = sock.send_to(&garbage, from);
            }
            let _ = sock.send_to(&reply, from);
        }
    }

    fn serve_tcp(listener: TcpListener, zone: &Zone, stop: &AtomicBool, count: &AtomicUsize) {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            // One connection at a time, several queries per connection.
            loop {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).is_err() {
                    break;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut query).is_err() {
                    break;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let Some((reply, _)) = answer(zone, &query, false) else {
                    break;
                };
                let Ok(len) = u16::try_from(reply.len()) else {
                    break;
                };
                let mut out = len.to_be_bytes().to_vec();
                out.extend_from_slice(&reply);
                if stream.write_all(&out).is_err() {
                    break;
                }
            }
        }
    }

    fn norm(name: &str) -> String {
        name.trim_end_matches('.').to_ascii_lowercase()
    }

    /// The reply to `query` and its normalised question name, or None to
    /// stay silent.
    fn answer(zone: &Zone, query: &[u8], udp: bool) -> Option<(Vec<u8>, String)> {
        let query = Packet::parse(query).ok()?;
        let question = query.questions.first()?.clone();
        let qname = norm(&question.qname.to_string());
        if zone.drop.contains(&qname) {
            return None;
        }
        let qtype = match question.qtype {
            QTYPE::TYPE(t) => t,
            _ => TYPE::Unknown(0),
        };
        let (records, exists) = lookup(zone, &qname, qtype);
        let mut reply = Packet::new_reply(query.id());
        if !zone.lame && !zone.no_flags {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
        }
        if query.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        reply.questions.push(question.clone());
        if zone.lame {
            // A referral: no answer, the servers to ask next instead.
            reply.name_servers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                3600,
                RData::NS(simple_dns::rdata::NS(Name::new_unchecked(
                    "a.gtld-servers.test",
                ))),
            ));
        } else if zone.refuse_edns && query.opt().is_some() {
            // As some old servers do: FORMERR, without the question.
            *reply.rcode_mut() = RCODE::FormatError;
            reply.questions.clear();
        } else if zone.servfail.contains(&qname) {
            *reply.rcode_mut() = RCODE::ServerFailure;
        } else if udp && zone.truncate.contains(&qname) {
            reply.set_flags(PacketFlag::TRUNCATION);
        } else {
            for r in &records {
                reply.answers.push(to_rr(r));
            }
            if !exists && zone.nxdomain_unknown {
                *reply.rcode_mut() = RCODE::NameError;
            }
        }
        if udp && zone.truncate_cut.contains(&qname) {
            reply.set_flags(PacketFlag::TRUNCATION);
            let mut bytes = reply.build_bytes_vec().ok()?;
            // The header, the question and a few bytes of the first answer.
            let question_end = 12 + qname.len() + 2 + 4;
            bytes.truncate((question_end + 5).min(bytes.len()));
            return Some((bytes, qname));
        }
        Some((reply.build_bytes_vec().ok()?, qname))
    }

    /// The answer records for (qname, qtype), and whether the last name of
    /// the chain exists.
    fn lookup(zone: &Zone, qname: &str, qtype: TYPE) -> (Vec<Record>, bool) {
        let mut out = Vec::new();
        let mut current = qname.to_string();
        let mut seen = HashSet::new();
        loop {
            let at: Vec<&Record> = zone
                .records
                .iter()
                .filter(|r| r.owner() == current)
                .collect();
            let exists = !at.is_empty();
            let cname = at.iter().find_map(|r| match r {
                Record::Cname(_, t) if qtype != TYPE::CNAME => Some(norm(t)),
                _ => None,
            });
            if let Some(target) = cname {
                out.extend(
                    at.iter()
                        .filter(|r| matches!(r, Record::Cname(..)))
                        .map(|r| (*r).clone()),
                );
                if !zone.chase_cnames || !seen.insert(current.clone()) {
                    return (out, true);
                }
                current = target;
                continue;
            }
            out.extend(at.into_iter().filter(|r| is_type(r, qtype)).cloned());
            return (out, exists);
        }
    }

    fn is_type(r: &Record, qtype: TYPE) -> bool {
        matches!(
            (r, qtype),
            (Record::Mx(..), TYPE::MX)
                | (Record::A(..), TYPE::A)
                | (Record::Aaaa(..), TYPE::AAAA)
                | (Record::Cname(..), TYPE::CNAME)
        )
    }

    fn to_rr(r: &Record) -> ResourceRecord<'_> {
        let (owner, data) = match r {
            Record::Mx(n, p, x) => (
                n,
                RData::MX(MX {
                    preference: *p,
                    exchange: super::wire_name(x),
                }),
            ),
            Record::A(n, ip) => (n, RData::A(A::from(*ip))),
            Record::Aaaa(n, ip) => (n, RData::AAAA(AAAA::from(*ip))),
            Record::Cname(n, t) => (n, RData::CNAME(CNAME(super::wire_name(t)))),
        };
        ResourceRecord::new(
            Name::new_unchecked(owner.trim_end_matches('.')),
            CLASS::IN,
            60,
            data,
        )
    }

    /// A reply with the query's id + `id_delta`, the question renamed to
    /// `qname`, and a bogus A record 192.0.2.66.
    fn spoofed(query: &[u8], id_delta: u16, qname: &str) -> Option<Vec<u8>> {
        let query = Packet::parse(query).ok()?;
        let mut question = query.questions.first()?.clone();
        question.qname = Name::new_unchecked(qname);
        let mut reply = Packet::new_reply(query.id().wrapping_add(id_delta));
        reply.answers.push(ResourceRecord::new(
            question.qname.clone(),
            CLASS::IN,
            60,
            RData::A(A::from(Ipv4Addr::new(192, 0, 2, 66))),
        ));
        reply.questions.push(question);
        reply.build_bytes_vec().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{Record, TestDns, Zone};
    use super::*;

    const T: Duration = Duration::from_millis(200);

    fn resolver(dns: &TestDns) -> Resolver {
        Resolver::new(&[dns.addr]).with_timeout(T, 1)
    }

    fn mx(pref: u16, host: &str) -> Mx {
        Mx {
            preference: pref,
            exchange: host.into(),
        }
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn temp(r: Result<impl fmt::Debug, DnsError>) -> String {
        match r {
            Err(DnsError::Temporary(s)) => s,
            other => panic!("expected Temporary, got {other:?}"),
        }
    }

    #[test]
    fn mx_sorted_by_preference() {
        let dns = TestDns::start(vec![
            Record::mx("example.test", 30, "c.example.test"),
            Record::mx("example.test", 10, "A.Example.Test."),
            Record::mx("example.test", 20, "b.example.test"),
        ]);
        let want = MxAnswer::Hosts(vec![
            mx(10, "a.example.test"),
            mx(20, "b.example.test"),
            mx(30, "c.example.test"),
        ]);
        let r = resolver(&dns);
        assert_eq!(r.mx("example.test"), Ok(want.clone()));
        assert_eq!(r.mx("EXAMPLE.test."), Ok(want));
    }

    #[test]
    fn mx_equal_preferences_are_shuffled() {
        let dns = TestDns::start(vec![
            Record::mx("example.test", 10, "a.example.test"),
            Record::mx("example.test", 10, "b.example.test"),
            Record::mx("example.test", 5, "first.example.test"),
        ]);
        let r = resolver(&dns);
        let (mut ab, mut ba) = (0, 0);
        for _ in 0..50 {
            let Ok(MxAnswer::Hosts(hosts)) = r.mx("example.test") else {
                panic!("no hosts")
            };
            assert_eq!(hosts[0], mx(5, "first.example.test"));
            match hosts[1].exchange.as_str() {
                "a.example.test" => ab += 1,
                _ => ba += 1,
            }
        }
        assert!(ab > 0 && ba > 0, "ab={ab} ba={ba}");
    }

    #[test]
    fn shuffle_keeps_preference_order() {
        let mut rng = XorShift::new();
        for _ in 0..100 {
            let mut hosts: Vec<Mx> = (0..20u16).map(|i| mx(i % 4, &format!("h{i}"))).collect();
            sort_and_shuffle(&mut hosts, &mut rng);
            assert!(hosts.windows(2).all(|w| w[0].preference <= w[1].preference));
            assert_eq!(hosts.len(), 20);
        }
    }

    #[test]
    fn null_mx() {
        let dns = TestDns::start(vec![Record::mx("nomail.test", 0, ".")]);
        assert_eq!(resolver(&dns).mx("nomail.test"), Ok(MxAnswer::NullMx));
    }

    #[test]
    fn null_mx_beside_real_mx_is_ignored() {
        let dns = TestDns::start(vec![
            Record::mx("odd.test", 0, "."),
            Record::mx("odd.test", 10, "mx.odd.test"),
        ]);
        let want = MxAnswer::Hosts(vec![mx(10, "mx.odd.test")]);
        assert_eq!(resolver(&dns).mx("odd.test"), Ok(want));
    }

    #[test]
    fn no_mx_when_name_exists_without_mx() {
        let dns = TestDns::start(vec![Record::a("plain.test", Ipv4Addr::new(192, 0, 2, 1))]);
        assert_eq!(resolver(&dns).mx("plain.test"), Ok(MxAnswer::NoMx));
    }

    #[test]
    fn nxdomain() {
        let dns = TestDns::start(vec![]);
        let r = resolver(&dns);
        assert_eq!(r.mx("missing.test"), Err(DnsError::NxDomain));
        assert_eq!(r.addrs("missing.test"), Err(DnsError::NxDomain));
    }

    #[test]
    fn servfail_is_temporary() {
        let mut zone = Zone::new(vec![Record::mx("broken.test", 10, "mx.broken.test")]);
        zone.servfail.push("broken.test".into());
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(T, 2);
        let reason = temp(r.mx("broken.test"));
        assert!(reason.contains("ServerFailure"), "{reason}");
        assert_eq!(dns.udp_queries(), 2, "one query per attempt");
        assert!(temp(r.addrs("broken.test")).contains("ServerFailure"));
    }

    #[test]
    fn a_referral_is_no_answer_and_the_next_server_is_asked() {
        let records = vec![Record::mx("ok.test", 10, "mx.ok.test")];
        let mut zone = Zone::new(records.clone());
        zone.lame = true;
        let lame = TestDns::serve(zone);
        let good = TestDns::start(records);
        let r = Resolver::new(&[lame.addr, good.addr]).with_timeout(T, 1);
        assert_eq!(
            r.mx("ok.test"),
            Ok(MxAnswer::Hosts(vec![mx(10, "mx.ok.test")]))
        );
        // Alone, it is a temporary failure, never "no such record".
        let alone = Resolver::new(&[lame.addr]).with_timeout(T, 1);
        assert!(temp(alone.mx("ok.test")).contains("referral"));
        assert!(temp(alone.addrs("ok.test")).contains("referral"));
    }

    /// NODATA from a forwarder that sets neither AA nor RA (some container
    /// DNS proxies) is an answer: no NS records say "ask elsewhere".
    #[test]
    fn an_answer_without_flags_is_no_referral() {
        let mut zone = Zone::new(vec![Record::a("plain.test", Ipv4Addr::new(192, 0, 2, 1))]);
        zone.no_flags = true;
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(T, 1);
        assert_eq!(r.mx("plain.test"), Ok(MxAnswer::NoMx));
    }

    /// The "truncated, so go to TCP" reading of a reply that does not
    /// parse is for UDP only: a broken TCP reply is an error, never an
    /// empty answer (which would bounce the mail as "no MX, no address").
    #[test]
    fn a_broken_tcp_reply_with_tc_set_is_an_error() {
        let err = tcp_exchange_with(Duration::from_millis(500), |sock| {
            // Id 7, QR and TC set, one question promised, none sent.
            let _ = sock.write_all(&[0, 12, 0, 7, 0x82, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]);
        })
        .expect_err("not an answer");
        assert!(err.contains("malformed"), "{err}");
    }

    /// One TCP try (query id 7, x.test MX) against a server that reads the
    /// query and then does `reply` on its socket.
    fn tcp_exchange_with(
        timeout: Duration,
        reply: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
    ) -> Result<Reply, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let Ok((mut sock, _)) = listener.accept() else {
                return;
            };
            let mut query = [0u8; 512];
            let _ = sock.read(&mut query);
            reply(&mut sock);
        });
        let r = Resolver::new(&[addr]).with_timeout(timeout, 1);
        let msg = build_query(7, "x.test", TYPE::MX, true).expect("query");
        let q = Expect {
            id: 7,
            name: "x.test",
            qtype: TYPE::MX,
        };
        let result = r.tcp(addr, &msg, &q);
        let _ = server.join();
        result
    }

    #[test]
    fn a_server_that_refuses_edns_is_asked_without_it() {
        let mut zone = Zone::new(vec![Record::mx("old.test", 10, "mx.old.test")]);
        zone.refuse_edns = true;
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(T, 1);
        assert_eq!(
            r.mx("old.test"),
            Ok(MxAnswer::Hosts(vec![mx(10, "mx.old.test")]))
        );
        assert_eq!(dns.udp_queries(), 2);
    }

    #[test]
    fn a_truncated_reply_cut_mid_record_goes_to_tcp() {
        let mut zone = Zone::new(vec![Record::mx("cut.test", 10, "mx.cut.test")]);
        zone.truncate_cut.push("cut.test".into());
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(T, 1);
        assert_eq!(
            r.mx("cut.test"),
            Ok(MxAnswer::Hosts(vec![mx(10, "mx.cut.test")]))
        );
        assert_eq!(dns.tcp_queries(), 1);
    }

    /// A TCP server that sends its reply a byte at a time is cut off at
    /// the try's deadline, not after each byte's.
    #[test]
    fn a_trickling_tcp_reply_is_cut_off_at_the_deadline() {
        let result = tcp_exchange_with(Duration::from_millis(300), |sock| {
            // Announces 60,000 bytes, then sends 40 of them 50 ms apart:
            // 2 s in all, every gap far inside the 300 ms read timeout.
            let _ = sock.write_all(&60_000u16.to_be_bytes());
            for _ in 0..40 {
                if sock.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        assert_eq!(result.expect_err("no whole reply"), "TCP timeout");
    }

    #[test]
    fn timeout_is_temporary_within_the_configured_time() {
        let mut zone = Zone::new(vec![Record::mx("slow.test", 10, "mx.slow.test")]);
        zone.drop.push("slow.test".into());
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(T, 2);
        let start = Instant::now();
        let reason = temp(r.mx("slow.test"));
        let took = start.elapsed();
        assert!(reason.contains("timeout"), "{reason}");
        assert!(took >= 2 * T, "{took:?}");
        assert!(took < 2 * T + Duration::from_secs(2), "{took:?}");
        assert_eq!(dns.udp_queries(), 2);
    }

    #[test]
    fn truncated_udp_falls_back_to_tcp() {
        let mut records: Vec<Record> = (0..40)
            .map(|i| {
                Record::mx(
                    "big.test",
                    i,
                    &format!("mx{i}.a-rather-long-host-name.big.test"),
                )
            })
            .collect();
        records.push(Record::a("host.big.test", Ipv4Addr::new(192, 0, 2, 7)));
        let mut zone = Zone::new(records);
        zone.truncate = vec!["big.test".into(), "host.big.test".into()];
        let dns = TestDns::serve(zone);
        let r = resolver(&dns);
        let Ok(MxAnswer::Hosts(hosts)) = r.mx("big.test") else {
            panic!("no hosts")
        };
        assert_eq!(hosts.len(), 40);
        assert_eq!(hosts[39], mx(39, "mx39.a-rather-long-host-name.big.test"));
        assert_eq!(r.addrs("host.big.test"), Ok(vec![v4("192.0.2.7")]));
        assert_eq!(dns.tcp_queries(), 3, "MX, AAAA and A over TCP");
    }

    fn cname_records() -> Vec<Record> {
        vec![
            Record::cname("alias.test", "middle.test"),
            Record::cname("middle.test", "real.test."),
            Record::mx("real.test", 10, "mx.real.test"),
            Record::a("real.test", Ipv4Addr::new(192, 0, 2, 9)),
            Record::aaaa("real.test", "2001:db8::9".parse().expect("v6")),
        ]
    }

    #[test]
    fn cname_followed_within_one_answer() {
        let dns = TestDns::start(cname_records());
        let r = resolver(&dns);
        assert_eq!(
            r.mx("alias.test"),
            Ok(MxAnswer::Hosts(vec![mx(10, "mx.real.test")]))
        );
        assert_eq!(dns.udp_queries(), 1, "no new query for an answered chain");
        assert_eq!(
            r.addrs("alias.test"),
            Ok(vec![v4("2001:db8::9"), v4("192.0.2.9")])
        );
    }

    #[test]
    fn cname_followed_with_new_queries() {
        let mut zone = Zone::new(cname_records());
        zone.chase_cnames = false;
        let dns = TestDns::serve(zone);
        let r = resolver(&dns);
        assert_eq!(
            r.mx("alias.test"),
            Ok(MxAnswer::Hosts(vec![mx(10, "mx.real.test")]))
        );
        assert_eq!(dns.udp_queries(), 3);
        assert_eq!(
            r.addrs("alias.test"),
            Ok(vec![v4("2001:db8::9"), v4("192.0.2.9")])
        );
    }

    #[test]
    fn cname_to_missing_name_is_nxdomain() {
        let dns = TestDns::start(vec![Record::cname("dangling.test", "gone.test")]);
        assert_eq!(resolver(&dns).mx("dangling.test"), Err(DnsError::NxDomain));
    }

    #[test]
    fn cname_loop_is_temporary() {
        let records = vec![
            Record::cname("a.test", "b.test"),
            Record::cname("b.test", "a.test"),
        ];
        for chase in [true, false] {
            let mut zone = Zone::new(records.clone());
            zone.chase_cnames = chase;
            let dns = TestDns::serve(zone);
            let reason = temp(resolver(&dns).mx("a.test"));
            assert!(reason.contains("CNAME loop"), "{reason}");
            assert!(dns.udp_queries() <= MAX_CNAME_HOPS + 1);
        }
    }

    #[test]
    fn cname_chain_longer_than_eight_is_temporary() {
        let mut records: Vec<Record> = (0..10)
            .map(|i| Record::cname(&format!("c{i}.test"), &format!("c{}.test", i + 1)))
            .collect();
        records.push(Record::a("c10.test", Ipv4Addr::new(192, 0, 2, 10)));
        let mut zone = Zone::new(records.clone());
        zone.chase_cnames = false;
        let dns = TestDns::serve(zone);
        let r = resolver(&dns);
        assert!(temp(r.addrs("c0.test")).contains("longer than 8"));
        // Eight hops are fine.
        assert_eq!(r.addrs("c2.test"), Ok(vec![v4("192.0.2.10")]));
    }

    #[test]
    fn second_server_used_when_first_does_not_answer() {
        let mut silent = Zone::new(vec![]);
        silent.drop.push("example.test".into());
        let silent = TestDns::serve(silent);
        let good = TestDns::start(vec![Record::mx("example.test", 10, "mx.example.test")]);
        let r = Resolver::new(&[silent.addr, good.addr]).with_timeout(T, 1);
        let want = Ok(MxAnswer::Hosts(vec![mx(10, "mx.example.test")]));
        assert_eq!(r.mx("example.test"), want);
        assert_eq!(silent.udp_queries(), 1);
        assert_eq!(good.udp_queries(), 1);
    }

    #[test]
    fn closed_port_moves_on_quickly() {
        let closed = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        let good = TestDns::start(vec![Record::a("h.test", Ipv4Addr::new(192, 0, 2, 1))]);
        let r = Resolver::new(&[closed_addr, good.addr]).with_timeout(Duration::from_secs(5), 1);
        let start = Instant::now();
        assert_eq!(r.addrs("h.test"), Ok(vec![v4("192.0.2.1")]));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn spoofed_and_garbage_datagrams_are_ignored() {
        let mut zone = Zone::new(vec![Record::a("target.test", Ipv4Addr::new(192, 0, 2, 1))]);
        zone.spoof_first.push("target.test".into());
        let dns = TestDns::serve(zone);
        let r = Resolver::new(&[dns.addr]).with_timeout(Duration::from_secs(2), 1);
        assert_eq!(r.addrs("target.test"), Ok(vec![v4("192.0.2.1")]));
    }

    #[test]
    fn addrs_nodata_is_empty() {
        let dns = TestDns::start(vec![Record::mx("mailonly.test", 10, "mx.test")]);
        assert_eq!(resolver(&dns).addrs("mailonly.test"), Ok(vec![]));
    }

    #[test]
    fn addrs_ipv6_first() {
        let dns = TestDns::start(vec![
            Record::a("dual.test", Ipv4Addr::new(192, 0, 2, 1)),
            Record::a("dual.test", Ipv4Addr::new(192, 0, 2, 2)),
            Record::aaaa("dual.test", Ipv6Addr::LOCALHOST),
        ]);
        assert_eq!(
            resolver(&dns).addrs("dual.test"),
            Ok(vec![v4("::1"), v4("192.0.2.1"), v4("192.0.2.2")])
        );
    }

    #[test]
    fn bad_names_are_refused_without_a_query() {
        let dns = TestDns::start(vec![]);
        let r = resolver(&dns);
        assert_eq!(
            r.mx("bücher.example"),
            Err(DnsError::Temporary("non-ASCII domain needs IDNA".into()))
        );
        let long = format!("{}.test", ["abcdefghi"; 25].join("."));
        assert!(long.len() > 253);
        assert!(temp(r.mx(&long)).contains("253"));
        assert!(temp(r.addrs(&format!("{}.test", "x".repeat(64)))).contains("63"));
        assert!(temp(r.mx("a..test")).contains("empty label"));
        assert!(temp(r.mx("")).contains("empty"));
        assert!(temp(r.mx(".")).contains("empty"));
        assert!(temp(r.mx("a b.test")).contains("space"));
        assert!(temp(r.mx("a\r\n.test")).contains("control"));
        assert_eq!(dns.udp_queries(), 0);
        // The longest legal names and labels are fine.
        assert_eq!(check_name(&"a".repeat(63)), Ok("a".repeat(63)));
        let max = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(check_name(&max).is_ok());
    }

    #[test]
    fn error_display_is_one_line() {
        assert_eq!(
            DnsError::NxDomain.to_string(),
            "domain does not exist (NXDOMAIN)"
        );
        assert_eq!(
            DnsError::Temporary("timeout".into()).to_string(),
            "temporary DNS failure: timeout"
        );
    }

    #[test]
    fn query_has_rd_edns_and_the_question() {
        let bytes = build_query(0x1234, "example.test", TYPE::MX, true).expect("encodes");
        let p = Packet::parse(&bytes).expect("parses");
        assert_eq!(p.id(), 0x1234);
        assert!(p.has_flags(PacketFlag::RECURSION_DESIRED));
        assert!(!p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.opt().map(|o| o.udp_packet_size), Some(EDNS_UDP_PAYLOAD));
        let plain = build_query(0x1234, "example.test", TYPE::MX, false).expect("encodes");
        assert!(Packet::parse(&plain).expect("parses").opt().is_none());
        assert_eq!(text_name(&p.questions[0].qname), "example.test");
        assert_eq!(p.questions[0].qtype, QTYPE::TYPE(TYPE::MX));
    }

    #[test]
    fn resolv_conf() {
        let text = "\
# generated by resolvconf
search lan example.com
options ndots:2 timeout:1
nameserver 192.168.1.1   # the router
nameserver\t2001:db8::53
;nameserver 10.9.9.9
nameserver fe80::2%1
nameserver 2001:db8::54%eth0
nameserver fe80::3%no-such-interface9
nameserver not-an-address
nameserver
domain lan
";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                SocketAddr::new(v4("192.168.1.1"), 53),
                SocketAddr::new(v4("2001:db8::53"), 53),
                SocketAddrV6::new("fe80::2".parse().expect("ip"), 53, 0, 1).into(),
                SocketAddr::new(v4("2001:db8::54"), 53),
            ]
        );
        // An interface by name gets its index (here lo, which every Linux
        // box has).
        let lo = nix::net::if_::if_nametoindex("lo").expect("lo");
        assert_eq!(
            parse_resolv_conf("nameserver fe80::1%lo\n"),
            vec![SocketAddr::from(SocketAddrV6::new(
                "fe80::1".parse().expect("ip"),
                53,
                0,
                lo
            ))]
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    /// resolv.conf is followed: a DHCP lease or a network that comes up
    /// after start changes the servers without a restart.
    #[test]
    fn resolv_conf_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("postling-resolv-{}", random_u64()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("resolv.conf");
        let servers = |text: &str| {
            text.lines()
                .map(|ip| SocketAddr::new(v4(ip), 53))
                .collect::<Vec<_>>()
        };
        std::fs::write(&path, "nameserver 192.0.2.1\n").expect("write");
        let r = Resolver::from_resolv_conf(&path);
        assert_eq!(r.servers(), servers("192.0.2.1"));
        // Rewritten in place, then replaced whole (as resolvconf and
        // NetworkManager do).
        std::fs::write(&path, "nameserver 192.0.2.2\nnameserver ::1\n").expect("write");
        assert_eq!(r.servers(), servers("192.0.2.2\n::1"));
        let tmp = dir.join("resolv.conf.new");
        std::fs::write(&tmp, "nameserver 192.0.2.3\n").expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        assert_eq!(r.servers(), servers("192.0.2.3"));
        // Gone (a network going down): the local fallback.
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(r.servers(), servers("127.0.0.1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resolver_defaults() {
        let r = Resolver::new(&[]);
        assert!(!r.servers().is_empty());
        assert_eq!(r.timeout, DEFAULT_TIMEOUT);
        assert_eq!(r.attempts, DEFAULT_ATTEMPTS);
        let r = r.with_timeout(T, 0);
        assert_eq!((r.timeout, r.attempts), (T, 1));
    }

    #[test]
    fn server_entries() {
        assert_eq!(
            parse_server("9.9.9.9"),
            Ok(SocketAddr::new(v4("9.9.9.9"), 53))
        );
        assert_eq!(
            parse_server("127.0.0.1:5353"),
            Ok(SocketAddr::new(v4("127.0.0.1"), 5353))
        );
        assert_eq!(parse_server("::1"), Ok(SocketAddr::new(v4("::1"), 53)));
        assert_eq!(
            parse_server("[::1]:5353"),
            Ok(SocketAddr::new(v4("::1"), 5353))
        );
        assert!(parse_server("dns.google").is_err());
    }

    /// A well-formed reply with compression, CNAME, MX, A and AAAA.
    fn sample_reply(id: u16) -> Vec<u8> {
        let mut p = Packet::new_reply(id);
        p.questions.push(Question::new(
            Name::new_unchecked("example.com"),
            QTYPE::TYPE(TYPE::MX),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let rr = |name, data| {
            simple_dns::ResourceRecord::new(Name::new_unchecked(name), CLASS::IN, 60, data)
        };
        p.answers.push(rr(
            "example.com",
            RData::CNAME(simple_dns::rdata::CNAME(Name::new_unchecked(
                "mail.example.com",
            ))),
        ));
        p.answers.push(rr(
            "mail.example.com",
            RData::MX(simple_dns::rdata::MX {
                preference: 10,
                exchange: Name::new_unchecked("mx.mail.example.com"),
            }),
        ));
        p.answers.push(rr(
            "mx.mail.example.com",
            RData::A(simple_dns::rdata::A {
                address: 0x7f000001,
            }),
        ));
        p.answers.push(rr(
            "mx.mail.example.com",
            RData::AAAA(simple_dns::rdata::AAAA { address: 1 }),
        ));
        p.build_bytes_vec_compressed().expect("encodes")
    }

    #[test]
    fn sample_reply_decodes() {
        let bytes = sample_reply(7);
        let q = Expect {
            id: 7,
            name: "example.com",
            qtype: TYPE::MX,
        };
        let reply = decode_reply(&bytes, &q).expect("valid").expect("ours");
        assert_eq!(reply.answers.len(), 4);
        assert_eq!(
            reply.answers[1],
            (
                "mail.example.com".into(),
                Rr::Mx(10, "mx.mail.example.com".into())
            )
        );
        // Wrong id or question: not ours.
        assert!(decode_reply(&bytes, &Expect { id: 8, ..q })
            .expect("ignored")
            .is_none());
        let other = Expect {
            id: 7,
            name: "example.org",
            qtype: TYPE::MX,
        };
        assert!(decode_reply(&bytes, &other).expect("ignored").is_none());
        let other = Expect {
            id: 7,
            name: "example.com",
            qtype: TYPE::A,
        };
        assert!(decode_reply(&bytes, &other).expect("ignored").is_none());
    }

    #[test]
    fn hostile_packets_do_not_panic_or_loop() {
        let good = sample_reply(7);
        // Every truncation.
        for n in 0..good.len() {
            fuzz_decode(&good[..n]);
        }
        // Compression pointers to themselves, forwards, and in a cycle.
        let mut header = vec![0, 7, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        for tail in [
            &[0xc0, 12, 0, 15, 0, 1][..],
            &[0xc0, 14, 0xc0, 12, 0, 15, 0, 1],
            &[1, b'a', 0xc0, 12, 0, 15, 0, 1],
            &[0xff, 0xff, 0, 15, 0, 1],
            &[0x3f],
            &[
                7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0, 0, 15, 0, 1,
                0xc0, 29, 0, 15, 0, 1, 0, 0, 0, 60, 0xff, 0xff,
            ],
        ] {
            let mut p = header.clone();
            p.extend_from_slice(tail);
            fuzz_decode(&p);
        }
        header.truncate(4);
        fuzz_decode(&header);
        // Random bytes, and random mutations of a good reply.
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let len = rng.below(600);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = good.clone();
                for _ in 0..1 + rng.below(6) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                let keep = b.len() - rng.below(8).min(b.len());
                b.truncate(keep);
                b
            };
            fuzz_decode(&bytes);
        }
    }
}
