//! One delivery: one queued message to one destination (the smarthost, or
//! one domain's MX hosts), trying its addresses in order. Runs on a delivery
//! thread started by the relay thread, so a slow or silent host holds up
//! only its own delivery; it reads the queue but never writes it (the relay
//! thread records the results).

use std::collections::HashMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use rustls::ClientConfig;

use super::client::{Credentials, Job, Outcome, RcptResult, TlsMode};
use super::dns::Resolver;
use super::rewrite;
use super::route::{self, Candidate, RouteError};
use super::transfer::{self, Reusable, Timeouts, TlsConfigs};
use crate::config::SmarthostTls;
use crate::server::Context;
use crate::store::envelope::Envelope;

/// Message headers scanned for From: rewriting, at most.
pub const MAX_HEADER: usize = 256 * 1024;
/// An address whose connect timed out is skipped for this long, so one
/// silent host costs one connect timeout, not one per queued message.
const DEAD_FOR: Duration = Duration::from_secs(60);
/// How long a session whose message is done stays open for the next
/// message to the same host (Postfix's smtp_connection_cache_time_limit is
/// 2 s); servers drop idle clients after minutes (RFC 5321 4.5.3.2.7).
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// Open idle sessions kept at most (one per delivery thread).
const MAX_IDLE: usize = 8;

/// What an idle session can be reused for: the same address and name,
/// TLS mode and login.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdleKey {
    addr: SocketAddr,
    host: String,
    tls: TlsMode,
    user: Option<String>,
}

struct Idle {
    key: IdleKey,
    session: Reusable,
    since: Instant,
}

/// Everything a delivery thread needs; shared by all of them.
pub struct Deliverer {
    pub ctx: Arc<Context>,
    pub resolver: Resolver,
    /// The verifying config (Mozilla roots, the system bundle, ca_file),
    /// built at first use: it costs ~1 MB of memory that direct delivery,
    /// which is opportunistic, never needs.
    verified: std::sync::OnceLock<Result<Arc<ClientConfig>, String>>,
    ca_file: Option<std::path::PathBuf>,
    pub opportunistic: Arc<ClientConfig>,
    pub timeouts: Timeouts,
    dead: Mutex<HashMap<SocketAddr, Instant>>,
    /// Open sessions waiting for another message (connection reuse).
    idle: Mutex<Vec<Idle>>,
}

impl Deliverer {
    pub fn new(
        ctx: Arc<Context>,
        resolver: Resolver,
        ca_file: Option<std::path::PathBuf>,
        opportunistic: Arc<ClientConfig>,
        timeouts: Timeouts,
    ) -> Deliverer {
        Deliverer {
            ctx,
            resolver,
            verified: std::sync::OnceLock::new(),
            ca_file,
            opportunistic,
            timeouts,
            dead: Mutex::new(HashMap::new()),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Plain values: a panicked holder left the list consistent.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle session for `key`, if one is open and fresh.
    fn take_idle(&self, key: &IdleKey) -> Option<Reusable> {
        self.close_expired();
        let mut idle = self.idle();
        let at = idle.iter().position(|i| i.key == *key)?;
        Some(idle.swap_remove(at).session)
    }

    /// Keeps `session`, if the last message left one open, for the next
    /// message to the same host; the oldest idle session makes room when
    /// the list is full.
    fn put_idle(&self, key: IdleKey, session: Option<Reusable>) {
        let Some(session) = session else {
            return;
        };
        let oldest = {
            let mut idle = self.idle();
            idle.push(Idle {
                key,
                session,
                since: Instant::now(),
            });
            (idle.len() > MAX_IDLE).then(|| idle.remove(0))
        };
        if let Some(old) = oldest {
            old.session.close();
        }
    }

    /// Closes the sessions idle for longer than [`IDLE_FOR`]; true if any
    /// idle session is still open (the relay thread then wakes again
    /// within `IDLE_FOR` to close it in time).
    pub fn close_expired(&self) -> bool {
        let (expired, open) = {
            let mut idle = self.idle();
            // The relay loop asks at every turn: nothing to do is the
            // common case.
            if idle.is_empty() {
                return false;
            }
            let (expired, kept): (Vec<Idle>, Vec<Idle>) =
                idle.drain(..).partition(|i| i.since.elapsed() >= IDLE_FOR);
            *idle = kept;
            (expired, !idle.is_empty())
        };
        for i in expired {
            debug!(
                "closing the idle session to {} [{}]",
                i.key.host, i.key.addr
            );
            i.session.close();
        }
        open
    }

    fn is_dead(&self, addr: SocketAddr) -> bool {
        // The map holds plain values: a panicked holder left it consistent.
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        dead.get(&addr)
            .is_some_and(|since| since.elapsed() < DEAD_FOR)
    }

    fn mark_dead(&self, addr: SocketAddr) {
        let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        dead.retain(|_, since| since.elapsed() < DEAD_FOR);
        dead.insert(addr, Instant::now());
    }

    /// Delivers to one destination, trying its hosts in order; returns a
    /// result for every index in `idxs`, with the host that gave it.
    pub fn deliver_to(
        &self,
        env: &Envelope,
        dest: &Dest,
        idxs: &[usize],
    ) -> Vec<(usize, RcptResult, Option<String>)> {
        let all = |r: RcptResult| {
            idxs.iter()
                .map(|&i| (i, r.clone(), None))
                .collect::<Vec<_>>()
        };
        let relay_cfg = &self.ctx.config().relay;
        let (candidates, tls) = match (dest, &relay_cfg.smarthost) {
            (Dest::Smarthost, Some(sh)) => {
                let tls = match sh.tls {
                    SmarthostTls::StartTls => TlsMode::RequireStartTls,
                    SmarthostTls::Implicit => TlsMode::Implicit,
                    SmarthostTls::None => TlsMode::None,
                };
                (route::smarthost(sh), tls)
            }
            (Dest::Domain(d), _) => (
                route::direct(&self.resolver, d, relay_cfg.mx_port),
                TlsMode::Opportunistic,
            ),
            // A reload removed the smarthost after this attempt was planned:
            // the next attempt goes where the new config says.
            (Dest::Smarthost, None) => {
                return all(RcptResult::Deferred {
                    reason: "relay.smarthost was removed by a reload; trying again".into(),
                })
            }
        };
        let candidates = match candidates {
            Ok(c) => c,
            Err(RouteError::Permanent(reason)) => return all(RcptResult::Failed { reason }),
            Err(RouteError::Temporary(reason)) => return all(RcptResult::Deferred { reason }),
        };
        // RFC 5321 5.1, as Postfix does: when one of the hosts is this
        // server (an MX record or the smarthost pointing back at one of
        // our own listeners), it and every host of the same or a worse
        // preference are dropped; with nothing better left the mail can
        // never leave and is returned, instead of going round until the
        // Received count stops it.
        let candidates = match candidates.iter().find(|c| self.is_us(c.addr)) {
            Some(us) => {
                let ours = us.preference;
                warn!(
                    "id={} {} [{}] is this server: hosts of preference {ours} and worse are not tried",
                    env.id, us.host, us.addr
                );
                let better: Vec<Candidate> = candidates
                    .into_iter()
                    .filter(|c| c.preference < ours)
                    .collect();
                if better.is_empty() {
                    let target = match dest {
                        Dest::Smarthost => "the smarthost",
                        Dest::Domain(d) => d.as_str(),
                    };
                    return all(RcptResult::Failed {
                        reason: format!("5.4.6 mail for {target} loops back to myself"),
                    });
                }
                better
            }
            None => candidates,
        };
        // The smarthost's login only ever goes to the smarthost the
        // candidates came from (the same config snapshot): never to a
        // domain's MX, nor to the old smarthost after a reload changed it.
        let auth = match (dest, &relay_cfg.smarthost) {
            (Dest::Smarthost, Some(sh)) => match credentials(sh) {
                Ok(a) => a,
                Err(reason) => return all(RcptResult::Deferred { reason }),
            },
            _ => None,
        };
        let recipients: Vec<String> = idxs
            .iter()
            .map(|&i| env.recipients[i].address.clone())
            .collect();
        let mut last_reason = String::from("no host could be reached");
        for (n, cand) in candidates.iter().enumerate() {
            if self.is_dead(cand.addr) {
                last_reason = format!(
                    "{} [{}] did not answer a connection less than a minute ago",
                    cand.host, cand.addr
                );
                continue;
            }
            let mut outcome = match self.session(env, cand, &recipients, tls, auth.clone()) {
                Ok(o) => o,
                Err(reason) => {
                    last_reason = reason;
                    continue;
                }
            };
            if outcome.retry_in_clear() {
                // Opportunistic TLS failed: this host again in clear, as
                // Postfix's `may` level does.
                info!(
                    "id={} {} [{}]: TLS handshake failed; retrying in clear",
                    env.id, cand.host, cand.addr
                );
                match self.session(env, cand, &recipients, TlsMode::None, None) {
                    Ok(o) => outcome = o,
                    Err(reason) => {
                        last_reason = reason;
                        continue;
                    }
                }
            }
            let all_deferred = outcome
                .recipients
                .iter()
                .all(|(_, r)| matches!(r, RcptResult::Deferred { .. }));
            if all_deferred && n + 1 < candidates.len() {
                if let Some((_, RcptResult::Deferred { reason })) = outcome.recipients.first() {
                    last_reason = reason.clone();
                }
                continue;
            }
            let host = format!("{}[{}]:{}", cand.host, cand.addr.ip(), cand.addr.port());
            return idxs
                .iter()
                .zip(outcome.recipients)
                .map(|(&i, (_, r))| (i, r, Some(host.clone())))
                .collect();
        }
        all(RcptResult::Deferred {
            reason: last_reason,
        })
    }

    /// Sends the message to one candidate: over an idle session to it
    /// when one is open, else over a new connection; a session that ends
    /// cleanly is kept open for the next message.
    fn session(
        &self,
        env: &Envelope,
        cand: &Candidate,
        recipients: &[String],
        tls: TlsMode,
        auth: Option<Credentials>,
    ) -> Result<Outcome, String> {
        let mut msg = self
            .open_message(env)
            .map_err(|e| format!("cannot read queued message: {e}"))?;
        let key = IdleKey {
            addr: cand.addr,
            host: cand.host.clone(),
            tls,
            user: auth.as_ref().map(|a| a.user.clone()),
        };
        let job = Job {
            id: env.id.clone(),
            helo: self.ctx.config().hostname.clone(),
            sender: msg.sender.clone(),
            recipients: recipients.to_vec(),
            size: msg.size,
            eightbit: msg.eightbit,
            smtputf8: !env.sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
            tls,
            auth,
        };
        let verified = match tls {
            TlsMode::RequireStartTls | TlsMode::Implicit => self.verified()?,
            TlsMode::Opportunistic | TlsMode::None => Arc::clone(&self.opportunistic),
        };
        let configs = TlsConfigs {
            verified: &verified,
            opportunistic: &self.opportunistic,
        };
        if let Some(open) = self.take_idle(&key) {
            debug!(
                "id={} reusing the session to {} [{}]",
                env.id, cand.host, cand.addr
            );
            match open.send(job.clone(), &mut msg.reader, configs, &self.timeouts) {
                Ok((outcome, again)) => {
                    self.put_idle(key, again);
                    return Ok(outcome);
                }
                // Closed by the server while idle; nothing was sent.
                Err(transfer::Closed) => debug!(
                    "id={} the idle session to {} [{}] was closed; connecting anew",
                    env.id, cand.host, cand.addr
                ),
            }
        }
        let relay_cfg = &self.ctx.config().relay;
        let stream =
            TcpStream::connect_timeout(&cand.addr, relay_cfg.connect_timeout).map_err(|e| {
                // A refusal costs nothing; only a silent host (a timeout) is
                // worth remembering.
                if e.kind() == io::ErrorKind::TimedOut {
                    self.mark_dead(cand.addr);
                }
                format!("connect to {} [{}]: {e}", cand.host, cand.addr)
            })?;
        // Every command is one write followed by a wait for the reply, so
        // Nagle's algorithm could only delay them.
        if let Err(e) = stream.set_nodelay(true) {
            debug!("id={} TCP_NODELAY: {e}", env.id);
        }
        debug!(
            "id={} connected to {} [{}] tls={:?}",
            env.id, cand.host, cand.addr, tls
        );
        let (outcome, again) = transfer::deliver(
            stream,
            &cand.host,
            job,
            &mut msg.reader,
            configs,
            &self.timeouts,
            true,
        );
        self.put_idle(key, again);
        Ok(outcome)
    }

    fn verified(&self) -> Result<Arc<ClientConfig>, String> {
        self.verified
            .get_or_init(|| {
                crate::tls::client_config(self.ca_file.as_deref())
                    .map_err(|e| format!("TLS trust store: {e}"))
            })
            .clone()
    }

    /// The message as it will be sent: From: rewritten for local senders
    /// when `relay.rewrite_from` is set.
    fn open_message(&self, env: &Envelope) -> io::Result<Outgoing> {
        let mut file = self.ctx.queue.open_message(&env.id)?;
        let len = file.len();
        let eightbit = has_8bit(&mut file)?;
        file.seek(SeekFrom::Start(0))?;
        let config = self.ctx.config();
        let rewrite_to = config
            .relay
            .rewrite_from
            .as_ref()
            .filter(|_| self.is_local_sender(&env.sender));
        let Some(new_from) = rewrite_to else {
            return Ok(Outgoing {
                reader: Box::new(file),
                size: len,
                eightbit,
                sender: env.sender.clone(),
            });
        };
        let header = read_header(&mut file)?;
        let Some(end) = header_end(&header) else {
            // No header/body boundary within the limit: send unchanged,
            // except the envelope sender.
            file.seek(SeekFrom::Start(0))?;
            return Ok(Outgoing {
                reader: Box::new(file),
                size: len,
                eightbit,
                sender: new_from.clone(),
            });
        };
        let new_header = rewrite::rewrite_header(&header[..end], new_from);
        file.seek(SeekFrom::Start(end as u64))?;
        Ok(Outgoing {
            size: new_header.len() as u64 + len - end as u64,
            reader: Box::new(Cursor::new(new_header).chain(file)),
            eightbit,
            sender: new_from.clone(),
        })
    }

    fn is_local_sender(&self, sender: &str) -> bool {
        !sender.is_empty()
            && match sender.rsplit_once('@') {
                None => true,
                Some((_, domain)) => self.ctx.config().local.is_local_domain(domain),
            }
    }
}

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Smarthost,
    Domain(String),
}

struct Outgoing {
    reader: Box<dyn Read>,
    size: u64,
    eightbit: bool,
    sender: String,
}

pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Whether the message has any byte >= 0x80 (BODY=8BITMIME needed).
fn has_8bit(file: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        if buf[..n].iter().any(|&b| b >= 0x80) {
            return Ok(true);
        }
    }
}

/// The first MAX_HEADER bytes (or less) of the message.
pub fn read_header(file: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut header = Vec::new();
    Read::by_ref(file)
        .take(MAX_HEADER as u64)
        .read_to_end(&mut header)?;
    Ok(header)
}

/// The index just past the header's empty line, if it is within `bytes`.
fn header_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
}

impl Deliverer {
    /// Whether `addr` is one of this server's own listeners: its port is
    /// one we listen on, at that address or a wildcard of its family, and
    /// the address is this machine's. Another MTA on this box, on another
    /// port, is not us. An IPv4-mapped address counts as the IPv4 one.
    fn is_us(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.ctx.listening().iter().any(|l| {
            l.port() == addr.port()
                && l.is_ipv4() == addr.is_ipv4()
                && (l.ip().is_unspecified() || l.ip() == addr.ip())
        }) && is_here(addr)
    }
}

/// Whether `addr` is this machine: a loopback or unspecified address, or
/// one the kernel would also pick as our own end of a connection to it (a
/// UDP "connect" only picks the route; nothing is sent).
fn is_here(addr: SocketAddr) -> bool {
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    super::dns::udp_connected(addr)
        .and_then(|s| s.local_addr())
        .is_ok_and(|local| local.ip() == ip)
}

/// `sh`'s credentials, the password read fresh (so a changed password file
/// needs no restart).
fn credentials(sh: &crate::config::Smarthost) -> Result<Option<Credentials>, String> {
    let Some((user, file)) = &sh.auth else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "cannot read smarthost_password_file {}: {e}",
            file.display()
        )
    })?;
    let password = text.lines().next().unwrap_or("").to_string();
    Ok(Some(Credentials {
        user: user.clone(),
        password,
    }))
}

#[cfg(test)]
mod tests {
    use super::is_here;

    #[test]
    fn which_addresses_are_this_machine() {
        for here in ["127.0.0.1:25", "127.0.0.2:25", "0.0.0.0:25", "[::1]:25"] {
            assert!(is_here(here.parse().expect("addr")), "{here}");
        }
        // TEST-NET-1 and -3 (RFC 5737): never an address of this machine.
        for away in ["192.0.2.1:25", "203.0.113.9:25"] {
            assert!(!is_here(away.parse().expect("addr")), "{away}");
        }
    }
}
