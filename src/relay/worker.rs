//! The relay thread's loop and one delivery attempt (see `relay/mod.rs`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, info, warn};
use rustls::ClientConfig;

use super::bounce::{self, Entry, Kind};
use super::client::{Credentials, Job, RcptResult, TlsMode};
use super::dns::Resolver;
use super::rewrite;
use super::route::{self, Candidate, RouteError};
use super::schedule::Schedule;
use super::transfer::{self, Timeouts};
use crate::config::SmarthostTls;
use crate::local::Target;
use crate::server::Context;
use crate::smtp::conn::unix_now;
use crate::smtp::message::{Message, Recipient};
use crate::store::envelope::{Envelope, RcptState};

/// What the relay thread is asked to do.
#[derive(Debug)]
pub enum Request {
    /// A message was committed to the queue.
    Queued(String),
    /// Try now: one message, or every message.
    Flush(Option<String>),
    /// Remove a message from the queue; the result is sent back.
    Delete(String, Sender<Result<(), String>>),
}

/// The longest the thread sleeps without looking at the clock again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Message headers quoted in bounces / scanned for From: rewriting.
const MAX_HEADER: usize = 256 * 1024;
/// Marks envelopes of notices we generated: a failed notice is never
/// answered with another one.
const NOTICE_CLIENT: &str = "postling notice";

struct Relay {
    ctx: Arc<Context>,
    schedule: Schedule,
    resolver: Resolver,
    verified: Arc<ClientConfig>,
    opportunistic: Arc<ClientConfig>,
    timeouts: Timeouts,
    /// Every queued envelope, by id.
    pending: HashMap<String, Envelope>,
    /// Ids to try at the next pass whatever the schedule says.
    forced: HashSet<String>,
    /// Addresses that refused a connection in this pass: not tried again
    /// until the next pass, so one dead host costs one timeout.
    dead: HashSet<SocketAddr>,
}

/// Starts the relay thread. Fails only when the TLS trust store cannot be
/// built (an unreadable `relay.ca_file`).
pub fn spawn(ctx: Arc<Context>, requests: Receiver<Request>) -> io::Result<JoinHandle<()>> {
    let relay_cfg = &ctx.config.relay;
    let verified = crate::tls::client_config(relay_cfg.ca_file.as_deref())
        .map_err(|e| io::Error::other(format!("relay TLS: {e}")))?;
    let relay = Relay {
        schedule: Schedule {
            retry: relay_cfg.retry.clone(),
            max_queue_time: relay_cfg.max_queue_time,
            delay_warning: relay_cfg.delay_warning,
        },
        resolver: Resolver::new(&relay_cfg.dns_servers),
        verified,
        opportunistic: crate::tls::insecure_client_config(),
        timeouts: Timeouts::default(),
        pending: HashMap::new(),
        forced: HashSet::new(),
        dead: HashSet::new(),
        ctx,
    };
    thread::Builder::new()
        .name("relay".into())
        .spawn(move || relay.run(requests))
}

impl Relay {
    fn run(mut self, requests: Receiver<Request>) {
        loop {
            let now = unix_now();
            let wait = match self.next_due(now) {
                Some(due) if due <= now => Duration::ZERO,
                Some(due) => Duration::from_secs(due - now).min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            match requests.recv_timeout(wait) {
                Ok(req) => {
                    self.handle(req);
                    // Take everything already waiting before delivering.
                    while let Ok(req) = requests.try_recv() {
                        self.handle(req);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.run_due();
        }
    }

    fn next_due(&self, now: u64) -> Option<u64> {
        if !self.forced.is_empty() {
            return Some(0);
        }
        self.pending
            .values()
            .map(|e| self.schedule.next_due(e, now))
            .min()
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Queued(id) => self.load(&id),
            Request::Flush(None) => {
                info!(
                    "flush: trying all {} queued message(s) now",
                    self.pending.len()
                );
                self.forced.extend(self.pending.keys().cloned());
            }
            Request::Flush(Some(id)) => {
                if !self.pending.contains_key(&id) {
                    self.load(&id);
                }
                if self.pending.contains_key(&id) {
                    info!("id={id} flush: trying now");
                    self.forced.insert(id);
                }
            }
            Request::Delete(id, reply) => {
                self.pending.remove(&id);
                self.forced.remove(&id);
                let result = self.ctx.queue.remove(&id).map_err(|e| e.to_string());
                if result.is_ok() {
                    info!("id={id} status=deleted (by the queue tool)");
                }
                let _ = reply.send(result);
            }
        }
    }

    fn load(&mut self, id: &str) {
        match self.ctx.queue.load(id) {
            Ok(env) => {
                self.pending.insert(id.to_string(), env);
            }
            Err(e) => error!("id={id} cannot load envelope: {e}"),
        }
    }

    /// Runs every due attempt, oldest due first.
    fn run_due(&mut self) {
        let now = unix_now();
        let mut due: Vec<(u64, String)> = self
            .pending
            .iter()
            .map(|(id, e)| (self.schedule.next_due(e, now), id.clone()))
            .filter(|(d, id)| *d <= now || self.forced.contains(id))
            .collect();
        if due.is_empty() {
            return;
        }
        due.sort();
        self.forced.clear();
        self.dead.clear();
        for (_, id) in due {
            self.attempt(&id);
        }
    }

    /// One delivery attempt for every unfinished recipient of `id`.
    fn attempt(&mut self, id: &str) {
        let Some(mut env) = self.pending.remove(id) else {
            return;
        };
        let path = match self.ctx.queue.message_path(id) {
            Ok(p) if p.exists() => p,
            _ => {
                warn!("id={id} message file gone; dropping it from the relay");
                return;
            }
        };
        let now = unix_now();
        let todo: Vec<usize> = (0..env.recipients.len())
            .filter(|&i| !env.recipients[i].state.is_final())
            .collect();
        let mut remote_mta: HashMap<usize, String> = HashMap::new();
        let mut newly_failed = Vec::new();
        for (dest, idxs) in self.group(&env, &todo) {
            for (i, result, host) in self.deliver_to(&env, &path, &dest, &idxs) {
                let addr = env.recipients[i].address.clone();
                let delay = now.saturating_sub(env.arrived);
                let relay_name = host.clone().unwrap_or_else(|| "none".into());
                env.recipients[i].state = match result {
                    RcptResult::Delivered { reply } => {
                        info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=sent ({reply})");
                        RcptState::Delivered
                    }
                    RcptResult::Deferred { reason } => {
                        info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=deferred ({reason})");
                        RcptState::Deferred { reason }
                    }
                    RcptResult::Failed { reason } => {
                        info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=bounced ({reason})");
                        newly_failed.push(i);
                        RcptState::Failed { reason }
                    }
                };
                if let Some(h) = host {
                    remote_mta.insert(i, h);
                }
            }
        }
        env.attempts = env.attempts.saturating_add(1);
        env.tried = now;

        if self.schedule.expired(&env, now) {
            let days = self.schedule.max_queue_time.as_secs() / 86_400;
            for (i, r) in env.recipients.iter_mut().enumerate() {
                let last = match &r.state {
                    RcptState::Pending => "never tried".to_string(),
                    RcptState::Deferred { reason } => reason.clone(),
                    RcptState::Delivered | RcptState::Failed { .. } => continue,
                };
                let reason = format!("4.4.7 delivery time expired ({days}d); last error: {last}");
                info!("id={id} to=<{}> status=expired ({reason})", r.address);
                r.state = RcptState::Failed { reason };
                newly_failed.push(i);
            }
        }

        // Notices go out before the envelope is saved: a crash in between
        // repeats a notice rather than losing it.
        if !newly_failed.is_empty() {
            let entries = entries(&env, &newly_failed, &remote_mta);
            self.notify(&env, &path, &entries, Kind::Failed);
        } else if self.schedule.should_warn(&env, now) {
            let deferred: Vec<usize> = (0..env.recipients.len())
                .filter(|&i| matches!(env.recipients[i].state, RcptState::Deferred { .. }))
                .collect();
            if !deferred.is_empty() {
                let entries = entries(&env, &deferred, &remote_mta);
                self.notify(&env, &path, &entries, Kind::Delayed);
            }
            env.warned = true;
        }

        if env.recipients.iter().all(|r| r.state.is_final()) {
            match self.ctx.queue.remove(id) {
                Ok(()) => info!("id={id} status=removed (all recipients done)"),
                Err(e) => error!("id={id} cannot remove finished entry: {e}"),
            }
            return;
        }
        if let Err(e) = self.ctx.queue.save(&env) {
            // The old envelope stays: the next attempt may repeat a
            // delivery (a duplicate), never skip one.
            error!("id={id} cannot save envelope: {e}");
        }
        debug!(
            "id={id} next attempt at {}",
            self.schedule.next_due(&env, now)
        );
        self.pending.insert(id.to_string(), env);
    }

    /// Unfinished recipients grouped by where they go: one group for the
    /// smarthost, else one per domain.
    fn group(&self, env: &Envelope, todo: &[usize]) -> Vec<(Dest, Vec<usize>)> {
        let mut groups: Vec<(Dest, Vec<usize>)> = Vec::new();
        for &i in todo {
            let dest = match &self.ctx.config.relay.smarthost {
                Some(_) => Dest::Smarthost,
                None => Dest::Domain(domain_of(&env.recipients[i].address).to_ascii_lowercase()),
            };
            match groups.iter_mut().find(|(d, _)| *d == dest) {
                Some((_, v)) => v.push(i),
                None => groups.push((dest, vec![i])),
            }
        }
        groups
    }

    /// Delivers to one destination, trying its hosts in order; returns a
    /// result for every index in `idxs`, with the host that gave it.
    fn deliver_to(
        &mut self,
        env: &Envelope,
        path: &Path,
        dest: &Dest,
        idxs: &[usize],
    ) -> Vec<(usize, RcptResult, Option<String>)> {
        let all = |r: RcptResult| {
            idxs.iter()
                .map(|&i| (i, r.clone(), None))
                .collect::<Vec<_>>()
        };
        let relay_cfg = &self.ctx.config.relay;
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
            (Dest::Smarthost, None) => unreachable!("Smarthost groups exist only with a smarthost"),
        };
        let candidates = match candidates {
            Ok(c) => c,
            Err(RouteError::Permanent(reason)) => return all(RcptResult::Failed { reason }),
            Err(RouteError::Temporary(reason)) => return all(RcptResult::Deferred { reason }),
        };
        let auth = match self.credentials() {
            Ok(a) => a,
            Err(reason) => return all(RcptResult::Deferred { reason }),
        };
        let recipients: Vec<String> = idxs
            .iter()
            .map(|&i| env.recipients[i].address.clone())
            .collect();
        let mut last_reason = String::from("no host could be reached");
        for (n, cand) in candidates.iter().enumerate() {
            if self.dead.contains(&cand.addr) {
                last_reason = format!(
                    "{} [{}] did not answer earlier in this run",
                    cand.host, cand.addr
                );
                continue;
            }
            let mut outcome = match self.session(env, path, cand, &recipients, tls, auth.clone()) {
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
                match self.session(env, path, cand, &recipients, TlsMode::None, None) {
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

    /// Connects to one candidate and runs one SMTP session.
    fn session(
        &mut self,
        env: &Envelope,
        path: &Path,
        cand: &Candidate,
        recipients: &[String],
        tls: TlsMode,
        auth: Option<Credentials>,
    ) -> Result<super::client::Outcome, String> {
        let relay_cfg = &self.ctx.config.relay;
        let stream =
            TcpStream::connect_timeout(&cand.addr, relay_cfg.connect_timeout).map_err(|e| {
                self.dead.insert(cand.addr);
                format!("connect to {} [{}]: {e}", cand.host, cand.addr)
            })?;
        let mut msg = self
            .open_message(env, path)
            .map_err(|e| format!("cannot read queued message: {e}"))?;
        let job = Job {
            id: env.id.clone(),
            helo: self.ctx.config.hostname.clone(),
            sender: msg.sender,
            recipients: recipients.to_vec(),
            size: msg.size,
            eightbit: msg.eightbit,
            smtputf8: !env.sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()),
            tls,
            auth,
        };
        debug!(
            "id={} connected to {} [{}] tls={:?}",
            env.id, cand.host, cand.addr, tls
        );
        Ok(transfer::deliver(
            stream,
            &cand.host,
            job,
            &mut msg.reader,
            &self.verified,
            &self.opportunistic,
            &self.timeouts,
        ))
    }

    /// The smarthost credentials, read fresh (so a changed password file
    /// needs no restart).
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        let Some((user, file)) = self
            .ctx
            .config
            .relay
            .smarthost
            .as_ref()
            .and_then(|s| s.auth.as_ref())
        else {
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

    /// The message as it will be sent: From: rewritten for local senders
    /// when `relay.rewrite_from` is set.
    fn open_message(&self, env: &Envelope, path: &Path) -> io::Result<Outgoing> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let eightbit = has_8bit(&mut file)?;
        file.seek(SeekFrom::Start(0))?;
        let rewrite_to = self
            .ctx
            .config
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
                Some((_, domain)) => self.ctx.config.local.is_local_domain(domain),
            }
    }

    /// Sends a bounce or delay notice about `env` to its sender. A notice
    /// about a notice, or about a message from `<>`, is only logged (or
    /// given to the local postmaster when so configured): bounces never
    /// bounce.
    fn notify(&self, env: &Envelope, path: &Path, entries: &[Entry<'_>], kind: Kind) {
        let to = if env.client == NOTICE_CLIENT || env.sender.is_empty() {
            warn!(
                "id={} undeliverable message from <{}>: not bounced (a bounce never bounces)",
                env.id, env.sender
            );
            if kind != Kind::Failed
                || !self.ctx.config.relay.double_bounce_to_postmaster
                || env.client == NOTICE_CLIENT
            {
                return;
            }
            let domain = self
                .ctx
                .config
                .local
                .domains
                .first()
                .map_or("localhost", String::as_str);
            format!("postmaster@{domain}")
        } else {
            env.sender.clone()
        };
        let header = File::open(path)
            .and_then(|mut f| read_header(&mut f))
            .unwrap_or_default();
        let text = bounce::render(
            kind,
            &self.ctx.config.hostname,
            env,
            entries,
            &header,
            unix_now(),
        );
        match self.inject(&to, &text) {
            Ok(nid) => info!("id={} notice={nid} kind={kind:?} to=<{to}>", env.id),
            Err(e) => error!(
                "id={} cannot queue the {kind:?} notice to <{to}>: {e}",
                env.id
            ),
        }
    }

    /// Stores a locally generated message from `<>` for `to` the way an
    /// inbound one is stored: Maildir for local users, queue otherwise.
    fn inject(&self, to: &str, text: &[u8]) -> io::Result<String> {
        let local = &self.ctx.config.local;
        let (local_part, domain) = to.rsplit_once('@').unwrap_or((to, "localhost"));
        let targets = if local.is_local_domain(domain) {
            local
                .resolve(local_part, domain)
                .or_else(|_| local.resolve("postmaster", domain))
                .map_err(|e| io::Error::other(format!("no local mailbox for <{to}>: {e:?}")))?
        } else {
            vec![Target::Remote(to.to_string())]
        };
        let message = Message {
            session: NOTICE_CLIENT.to_string(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: to.to_string(),
                targets,
            }],
            helo: self.ctx.config.hostname.clone(),
            peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
            protocol: "local",
        };
        let mut spool = self.ctx.queue.begin()?;
        let id = spool.id().to_string();
        spool.file().write_all(text)?;
        crate::deliver::store_with_client(
            &message,
            spool,
            text.len() as u64,
            &self.ctx,
            NOTICE_CLIENT,
        )?;
        Ok(id)
    }
}

/// Where a group of recipients goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    Smarthost,
    Domain(String),
}

struct Outgoing {
    reader: Box<dyn Read>,
    size: u64,
    eightbit: bool,
    sender: String,
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Bounce entries for the given recipients.
fn entries<'a>(
    env: &'a Envelope,
    idxs: &[usize],
    remote: &'a HashMap<usize, String>,
) -> Vec<Entry<'a>> {
    idxs.iter()
        .map(|&i| {
            let r = &env.recipients[i];
            let diagnostic = match &r.state {
                RcptState::Failed { reason } | RcptState::Deferred { reason } => reason.as_str(),
                _ => "",
            };
            Entry {
                address: &r.address,
                diagnostic,
                remote_mta: remote.get(&i).map(String::as_str),
            }
        })
        .collect()
}

/// Whether the file has any byte >= 0x80 (BODY=8BITMIME needed).
fn has_8bit(file: &mut File) -> io::Result<bool> {
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
fn read_header(file: &mut File) -> io::Result<Vec<u8>> {
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
