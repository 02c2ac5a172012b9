//! The acceptor: one mio `Poll` over every listening socket plus a `Waker`.
//!
//! Owns binding (IPv4 and IPv6, IPV6_V6ONLY so both families can share a
//! port), accepting, the connection caps (total and per client IP; over a cap
//! the client gets `421 4.3.2` with one non-blocking write and is closed, so
//! the acceptor never blocks on a client), and handing each accepted socket
//! to a session thread of its own (a thread whose session ended waits a
//! while for the next one: `pool.rs`). It also starts the maildrop's
//! pickup, whose files become local sessions under the same caps
//! (`maildrop.rs`). It does no TLS and reads nothing
//! (STYLE habit 8). On the shutdown wake-up it stops listening and waits a
//! bounded time for sessions to finish their transaction.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Socket, Type};

use crate::config::{Listen, ListenMode};
use crate::pool::Pool;
use crate::server::Context;
use crate::smtp::{conn, reply};

const WAKER: Token = Token(usize::MAX);
const CONTROL: Token = Token(usize::MAX - 1);
const SUBMIT: Token = Token(usize::MAX - 2);
/// Session threads block on one socket and keep their buffers on the heap.
const SESSION_STACK: usize = 256 * 1024;
/// How long a shutdown waits for sessions to finish their transaction.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How soon to retry accepting after an accept error.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// listen(2) backlog.
const BACKLOG: i32 = 256;

pub struct Listeners {
    poll: Poll,
    sockets: Vec<(TcpListener, Listen)>,
    waker: Arc<Waker>,
    /// The queue tools' Unix socket (`control.rs`).
    control: Option<mio::net::UnixListener>,
    /// The sendmail submission socket.
    submit: Option<mio::net::UnixListener>,
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Binds every configured listener. Errors name the address.
pub fn bind(listen: &[Listen]) -> io::Result<Listeners> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let mut sockets = Vec::new();
    for (i, l) in listen.iter().enumerate() {
        let mut socket = bind_one(l.addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.addr)))?;
        poll.registry()
            .register(&mut socket, Token(i), Interest::READABLE)?;
        sockets.push((socket, l.clone()));
    }
    Ok(Listeners {
        poll,
        sockets,
        waker,
        control: None,
        submit: None,
    })
}

impl Listeners {
    /// The bound addresses (with the real port when port 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect()
    }

    /// Also accepts on the queue tools' control socket.
    pub fn add_control(&mut self, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::UnixListener::from_std(listener);
        self.poll
            .registry()
            .register(&mut listener, CONTROL, Interest::READABLE)?;
        self.control = Some(listener);
        Ok(())
    }

    /// Also accepts local submissions (`postling sendmail`) on `listener`.
    pub fn add_submit(&mut self, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::UnixListener::from_std(listener);
        self.poll
            .registry()
            .register(&mut listener, SUBMIT, Interest::READABLE)?;
        self.submit = Some(listener);
        Ok(())
    }

    /// Wakes the acceptor (for shutdown).
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// The accept loop; returns after a shutdown once sessions are done or
    /// the grace period is over.
    pub fn run(mut self, ctx: Arc<Context>) -> io::Result<()> {
        let tracker = Arc::new(Tracker::default());
        let mut events = Events::with_capacity(64);
        // After an accept error (EMFILE...) the backlog may still hold
        // clients, and mio is edge-triggered: look again shortly.
        let mut stalled = false;
        // With systemd's WatchdogSec=, this loop itself proves it is alive.
        let watchdog = crate::notify::watchdog_interval().map(|d| d / 2);
        let mut last_ping = Instant::now();
        let data_dir = ctx.config().data_dir.clone();
        let mut maildrop = crate::maildrop::Watch::default();
        let pickup = Arc::new(Pickup::default());
        loop {
            if maildrop.due() {
                pickup.start(&ctx, &tracker, &data_dir);
            }
            if let Some(w) = watchdog {
                if last_ping.elapsed() >= w {
                    crate::notify::notify_or_log("WATCHDOG=1");
                    last_ping = Instant::now();
                }
            }
            // Until the next ping is due, not a whole half-interval from
            // now: after a busy spell the gap could near WatchdogSec.
            let ping_in = watchdog.map(|w| w.saturating_sub(last_ping.elapsed()));
            let timeout = [stalled.then_some(ACCEPT_RETRY), ping_in]
                .into_iter()
                .flatten()
                .fold(maildrop.wait(), Duration::min);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Every listener is looked at again after a stall, the local
            // sockets too: a sendmail waiting in their backlog would
            // otherwise wait for the next local client.
            let retry = std::mem::take(&mut stalled);
            if retry {
                for (listener, l) in &self.sockets {
                    stalled |= accept_all(listener, l.mode, &ctx, &tracker, true);
                }
            }
            let submit_ready = retry || events.iter().any(|e| e.token() == SUBMIT);
            let control_ready = retry || events.iter().any(|e| e.token() == CONTROL);
            if let (Some(submit), true) = (&self.submit, submit_ready) {
                stalled |= accept_submit(submit, &ctx, &tracker, retry);
            }
            if let (Some(control), true) = (&self.control, control_ready) {
                stalled |= accept_control(control, &ctx, retry);
            }
            for event in events.iter() {
                let Some((listener, l)) = self.sockets.get(event.token().0) else {
                    continue; // the waker, or a local socket (above)
                };
                stalled |= accept_all(listener, l.mode, &ctx, &tracker, retry);
            }
            if ctx.shutdown.load(Ordering::Relaxed) {
                break;
            }
        }
        drop(self.sockets);
        // The local sockets too: a sendmail or queue tool now hears at once
        // that the daemon is going, instead of waiting on a socket nobody
        // answers during the grace period.
        drop(self.submit.take());
        drop(self.control.take());
        crate::notify::notify_or_log("STOPPING=1");
        info!(
            "shutdown: stopped listening; waiting up to {}s for sessions",
            SHUTDOWN_GRACE.as_secs()
        );
        if tracker.wait_idle(SHUTDOWN_GRACE) {
            info!("shutdown: all sessions finished");
        } else {
            warn!("shutdown: sessions still open after the grace period; exiting anyway (nothing acknowledged is lost)");
        }
        Ok(())
    }
}

/// Accepts until the backlog is empty; true when stopped by an error
/// (EMFILE and friends), leaving clients in the backlog to retry for.
fn accept_all(
    listener: &TcpListener,
    mode: ListenMode,
    ctx: &Arc<Context>,
    tracker: &Arc<Tracker>,
    retrying: bool,
) -> bool {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => hand_off(stream, peer, mode, ctx, tracker),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return accept_failed("accept", &e, retrying),
        }
    }
}

/// Logs an accept error once when it starts, not at every retry (ten a
/// second while file descriptors run short); true: retry shortly.
fn accept_failed(what: &str, e: &io::Error, retrying: bool) -> bool {
    if retrying {
        debug!("{what} failed again: {e}");
    } else {
        error!("{what} failed: {e}; retrying shortly");
    }
    true
}

/// Accepts queue-tool connections; each runs `control::serve` on a thread.
/// True when stopped by an error, to be retried.
fn accept_control(listener: &mio::net::UnixListener, ctx: &Arc<Context>, retrying: bool) -> bool {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let stream =
                    std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(stream));
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("control: {e}");
                    continue;
                }
                let ctx = Arc::clone(ctx);
                let spawned = thread::Builder::new()
                    .name("control".into())
                    .stack_size(SESSION_STACK)
                    .spawn(move || crate::control::serve(stream, &ctx));
                if let Err(e) = spawned {
                    warn!("control: cannot start a thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return accept_failed("control: accept", &e, retrying),
        }
    }
}

/// Accepts local submissions; each runs a session thread, capped per Unix
/// user (from SO_PEERCRED) and in total by the same limits as TCP clients,
/// but counted apart from them, so no TCP client, from loopback or not,
/// can take the slots cron's mail needs. True when stopped by an error, to
/// be retried.
fn accept_submit(
    listener: &mio::net::UnixListener,
    ctx: &Arc<Context>,
    tracker: &Arc<Tracker>,
    retrying: bool,
) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let stream =
                    std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(stream));
                // Without credentials the session refuses the client itself.
                let uid = getsockopt(&stream, PeerCredentials).map_or(u32::MAX, |c| c.uid());
                let guard = match tracker.admit(Peer::Uid(uid), &ctx.config().limits, &stream) {
                    Ok(guard) => guard,
                    Err(refusal) => {
                        info!("reject local connect uid={uid}: {refusal:?} limit reached");
                        continue;
                    }
                };
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("submit: {e}");
                    continue;
                }
                let ctx = Arc::clone(ctx);
                let id = crate::store::new_id();
                let spawned = tracker.threads.run(move || {
                    let _guard = guard;
                    conn::serve_local(stream, id, &ctx);
                });
                if let Err(e) = spawned {
                    error!("submit: cannot start a session thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return accept_failed("submit: accept", &e, retrying),
        }
    }
}

/// The maildrop's pickup: one pass at a time, on a session thread.
#[derive(Default)]
struct Pickup {
    running: AtomicBool,
    memory: Mutex<crate::maildrop::Memory>,
}

impl Pickup {
    /// Starts a pass, unless one is still running (the next tick looks
    /// again).
    fn start(self: &Arc<Self>, ctx: &Arc<Context>, tracker: &Arc<Tracker>, data_dir: &Path) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, ctx, sessions, data_dir) = (
            Arc::clone(self),
            Arc::clone(ctx),
            Arc::clone(tracker),
            data_dir.to_path_buf(),
        );
        let spawned = tracker.threads.run(move || {
            let mut memory = me.memory.lock().unwrap_or_else(|e| e.into_inner());
            crate::maildrop::pass(&ctx, &data_dir, &mut memory, &mut |uid, name| {
                pickup_session(&ctx, &sessions, uid, name)
            });
            drop(memory);
            me.running.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            error!("maildrop: cannot start the pickup: {e}");
            self.running.store(false, Ordering::Release);
        }
    }
}

/// A local session for the owner of maildrop file `name`, as if user `uid`
/// had connected to the submission socket (same slots, same rules): the
/// client's end of the socket pair it serves, or None for now.
fn pickup_session(
    ctx: &Arc<Context>,
    tracker: &Arc<Tracker>,
    uid: u32,
    name: &str,
) -> Option<std::os::unix::net::UnixStream> {
    let (client, server) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            warn!("maildrop: {e}");
            return None;
        }
    };
    let guard = match tracker.admit(Peer::Uid(uid), &ctx.config().limits, &server) {
        Ok(guard) => guard,
        Err(refusal) => {
            info!("maildrop: {name} waits: uid={uid} {refusal:?} limit reached");
            return None;
        }
    };
    let ctx = Arc::clone(ctx);
    let (id, origin) = (crate::store::new_id(), format!("maildrop={name}"));
    let spawned = tracker.threads.run(move || {
        let _guard = guard;
        // Owning a file proves less than a socket's peer: no -f for anyone.
        conn::serve_local_as(server, id, &ctx, uid, &origin, false);
    });
    match spawned {
        Ok(()) => Some(client),
        Err(e) => {
            error!("maildrop: cannot start a session thread: {e}");
            None
        }
    }
}

/// An IPv4 client reaching an IPv6 socket shows up as ::ffff:a.b.c.d.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn hand_off(
    mut stream: TcpStream,
    peer: SocketAddr,
    mode: ListenMode,
    ctx: &Arc<Context>,
    tracker: &Arc<Tracker>,
) {
    let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
    let guard = match tracker.admit(Peer::Ip(peer.ip()), &ctx.config().limits, &mut stream) {
        Ok(g) => g,
        Err(refusal) => {
            info!("reject connect from={peer}: {refusal:?} limit reached");
            return;
        }
    };
    let std_stream: std::net::TcpStream = std::os::fd::OwnedFd::from(stream).into();
    if let Err(e) = std_stream.set_nonblocking(false) {
        warn!("connect from={peer}: {e}");
        return;
    }
    let id = crate::store::new_id();
    let ctx = Arc::clone(ctx);
    let spawned = tracker.threads.run(move || {
        let _guard = guard;
        conn::serve(std_stream, peer, id, mode, &ctx);
    });
    if let Err(e) = spawned {
        error!("connect from={peer}: cannot start a session thread: {e}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    fn reply(self) -> reply::Reply {
        match self {
            Refusal::Total => reply::too_many_connections(),
            Refusal::PerIp => reply::too_many_connections_from_you(),
        }
    }
}

/// Who a session is counted against: a TCP client's address, or the Unix
/// user of a local submission. The two kinds have a total each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    Ip(IpAddr),
    Uid(u32),
}

/// Open sessions, in total and per client, and the threads that run them.
struct Tracker {
    counts: Mutex<Counts>,
    idle: Condvar,
    threads: Arc<Pool>,
}

impl Default for Tracker {
    fn default() -> Tracker {
        Tracker {
            counts: Mutex::default(),
            idle: Condvar::new(),
            threads: Arc::new(Pool::new("session", SESSION_STACK)),
        }
    }
}

#[derive(Default)]
struct Counts {
    /// Sessions of TCP clients, and of local submissions.
    tcp: usize,
    local: usize,
    per_peer: HashMap<Peer, usize>,
}

impl Counts {
    fn total(&mut self, peer: Peer) -> &mut usize {
        match peer {
            Peer::Ip(_) => &mut self.tcp,
            Peer::Uid(_) => &mut self.local,
        }
    }
}

/// Releases one slot when the session thread ends, however it ends.
struct Guard {
    tracker: Arc<Tracker>,
    peer: Peer,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A panicking session cannot leave the counts half-updated: each
        // update is a plain integer change. So a poisoned lock is still sound.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(
        self: &Arc<Self>,
        peer: Peer,
        max: usize,
        max_per_peer: usize,
    ) -> Result<Guard, Refusal> {
        let mut c = self.lock();
        if *c.total(peer) >= max {
            return Err(Refusal::Total);
        }
        let n = c.per_peer.entry(peer).or_insert(0);
        if *n >= max_per_peer {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        *c.total(peer) += 1;
        Ok(Guard {
            tracker: Arc::clone(self),
            peer,
        })
    }

    /// Takes a slot for `peer` under `limits`, or tells the client why not
    /// (one non-blocking write: the acceptor never waits on a client).
    fn admit(
        self: &Arc<Self>,
        peer: Peer,
        limits: &crate::config::Limits,
        mut client: impl Write,
    ) -> Result<Guard, Refusal> {
        self.acquire(peer, limits.max_connections, limits.max_connections_per_ip)
            .inspect_err(|refusal| {
                let mut out = Vec::new();
                refusal.reply().write_to(&mut out);
                let _ = client.write(&out);
            })
    }

    /// Waits until no session is open or `grace` has passed; true if idle.
    fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut c = self.lock();
        while c.tcp + c.local > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = match self.idle.wait_timeout(c, left) {
                Ok((c, _)) => c,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut c = self.tracker.lock();
        *c.total(self.peer) -= 1;
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
        if c.tcp + c.local == 0 {
            self.tracker.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_ip() {
        let t = Arc::new(Tracker::default());
        let a = Peer::Ip("10.0.0.1".parse().expect("literal"));
        let b = Peer::Ip("10.0.0.2".parse().expect("literal"));
        let g1 = t.acquire(a, 3, 2).expect("first");
        let _g2 = t.acquire(a, 3, 2).expect("second");
        assert_eq!(t.acquire(a, 3, 2).err(), Some(Refusal::PerIp));
        let _g3 = t.acquire(b, 3, 2).expect("other ip");
        assert_eq!(t.acquire(b, 3, 2).err(), Some(Refusal::Total));
        drop(g1);
        assert!(t.acquire(a, 3, 2).is_ok());
        assert!(!t.wait_idle(Duration::from_millis(10)));
    }

    #[test]
    fn local_users_are_capped_apart_from_tcp_clients() {
        let t = Arc::new(Tracker::default());
        let loopback = Peer::Ip("127.0.0.1".parse().expect("literal"));
        let _tcp: Vec<Guard> = (0..2)
            .map(|_| t.acquire(loopback, 2, 2).expect("tcp"))
            .collect();
        assert_eq!(t.acquire(loopback, 2, 2).err(), Some(Refusal::Total));
        // Every TCP slot is taken; cron's mail still gets in.
        let root = t.acquire(Peer::Uid(0), 2, 1).expect("root");
        assert_eq!(t.acquire(Peer::Uid(0), 2, 1).err(), Some(Refusal::PerIp));
        let _alice = t.acquire(Peer::Uid(1000), 2, 1).expect("another user");
        assert_eq!(t.acquire(Peer::Uid(1001), 2, 1).err(), Some(Refusal::Total));
        drop(root);
        assert!(t.acquire(Peer::Uid(0), 2, 1).is_ok());
    }

    #[test]
    fn mapped_v4_is_v4() {
        let mapped: IpAddr = "::ffff:192.168.1.5".parse().expect("literal");
        assert_eq!(
            canonical(mapped),
            "192.168.1.5".parse::<IpAddr>().expect("literal")
        );
    }
}
