//! `postling serve`: wires the threads together and runs until a signal.
//!
//! Owns startup order (open the queue and sweep what a crash left, start the
//! relay thread and re-feed it every committed message, bind, then accept),
//! the shared `Context` every session reads, and signal handling (SIGTERM and
//! SIGINT: stop accepting, let sessions finish, exit 0; a second one exits at
//! once). It does not speak SMTP.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;

use crossbeam_channel::Sender;
use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, Flags};
use crate::limiter::PerIp;
use crate::listener;
use crate::relay;
use crate::store::queue::Queue;

/// The sendmail submission socket's name in data_dir.
pub const SUBMIT_SOCKET: &str = "submit.sock";

/// What every session thread shares.
pub struct Context {
    /// The configuration; SIGHUP swaps in a new one (sessions keep the one
    /// they started with).
    config: RwLock<Arc<Config>>,
    /// How the configuration was loaded, to load it again on SIGHUP.
    flags: Flags,
    pub queue: Queue,
    /// Requests for the relay thread (newly committed messages, flush, delete).
    pub relay: Sender<relay::Request>,
    /// Set once on SIGTERM/SIGINT; sessions close when idle.
    pub shutdown: AtomicBool,
    /// Inbound TLS: the reloadable certificate and the server config.
    pub tls: Option<(Arc<crate::tls::ServerCerts>, Arc<rustls::ServerConfig>)>,
    /// Inbound AUTH users, when `auth.users_file` is set; SIGHUP reloads.
    users: RwLock<Option<Arc<crate::auth::Users>>>,
    /// Failed AUTH attempts per client address, in the last hour.
    pub auth_failures: PerIp,
    /// Messages per client address, in the last minute.
    pub message_rate: PerIp,
    /// `data_dir/lock`, held (flock) for the life of the server so a second
    /// instance cannot sweep this one's spools or relay its queue twice.
    _lock: File,
    /// The addresses the TCP listeners are bound to (real ports, also for
    /// a configured port 0): the relay will not send to itself.
    listening: Vec<SocketAddr>,
}

impl Context {
    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        // Writers only swap an Arc: a poisoned lock still holds a valid one.
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The addresses this server listens on.
    pub fn listening(&self) -> &[SocketAddr] {
        &self.listening
    }

    /// The current AUTH users, if any.
    pub fn users(&self) -> Option<Arc<crate::auth::Users>> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Locks `data_dir` for this process, creating it if needed.
pub fn lock_data_dir(data_dir: &Path) -> io::Result<File> {
    if !data_dir.is_dir() {
        // Every level made here must survive a power cut, as the queue
        // inside will: each new directory's parent is fsynced.
        let made: Vec<&Path> = data_dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .collect();
        std::fs::create_dir_all(data_dir)?;
        for dir in made {
            crate::store::sync_dir(crate::store::parent_of(dir))?;
        }
    }
    let path = data_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another postling is already running with data_dir {}",
                data_dir.display()
            ),
        )),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// SIGHUP: loads the configuration again, as at start, and swaps it in
/// for new sessions (aliases, local domains and users, relay policy,
/// limits, AUTH users), and re-reads the TLS certificate and key. Sessions
/// already open keep what they started with. A new configuration that does
/// not load is logged and the running one kept. Listeners, data_dir, user,
/// the TLS file paths and the relay's retry, expiry, DNS and CA settings
/// need a restart; a change to them is logged and otherwise ignored.
fn reload(ctx: &Context) {
    let old = ctx.config();
    let load = |flags: &Flags| {
        crate::config::load(flags)
            .map_err(|e| warn!("SIGHUP: new configuration rejected, keeping the running one: {e}"))
    };
    let Ok(mut new) = load(&ctx.flags) else {
        return;
    };
    let data_dir_changed = new.data_dir != old.data_dir;
    if data_dir_changed {
        // What follows data_dir (the default maildir_root, the checks that
        // Maildirs stay out of the queue) must follow the running one.
        let pinned = Flags {
            data_dir: Some(old.data_dir.clone()),
            ..ctx.flags.clone()
        };
        let Ok(pinned) = load(&pinned) else {
            return;
        };
        new = pinned;
    }
    let users = match &new.auth.users_file {
        Some(path) => match crate::auth::Users::load(path) {
            Ok(u) => Some(Arc::new(u)),
            Err(e) => {
                warn!("SIGHUP: new configuration rejected, keeping the running one: [auth]: {e}");
                return;
            }
        },
        None => None,
    };
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let fixed: [(&str, bool); 9] = [
        ("listen", same(&old.listen, &new.listen)),
        ("data_dir", !data_dir_changed),
        ("user", old.user == new.user),
        ("tls", old.tls == new.tls),
        ("relay.retry", old.relay.retry == new.relay.retry),
        (
            "relay.max_queue_time / delay_warning",
            old.relay.max_queue_time == new.relay.max_queue_time
                && old.relay.delay_warning == new.relay.delay_warning,
        ),
        (
            "relay.dns_servers",
            old.relay.dns_servers == new.relay.dns_servers,
        ),
        ("relay.ca_file", old.relay.ca_file == new.relay.ca_file),
        (
            "local.mode / local.group",
            old.local.sharing == new.local.sharing,
        ),
    ];
    for (key, unchanged) in fixed {
        if !unchanged {
            warn!("SIGHUP: {key} changed; that takes a restart (keeping the running value where it matters)");
        }
    }
    // Keep what running parts were built from.
    new.listen = old.listen.clone();
    new.data_dir = old.data_dir.clone();
    new.user = old.user.clone();
    new.tls = old.tls.clone();
    new.local.sharing = old.local.sharing;
    *ctx.users.write().unwrap_or_else(|p| p.into_inner()) = users;
    *ctx.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    info!("SIGHUP: configuration reloaded");
    if let Some((certs, _)) = &ctx.tls {
        match certs.reload() {
            Ok(()) => info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => warn!("SIGHUP: TLS certificate not reloaded, keeping the old one: {e}"),
        }
    }
}

type Tls = (Arc<crate::tls::ServerCerts>, Arc<rustls::ServerConfig>);

/// The inbound TLS certificate and key, when `[tls]` is set.
fn load_tls(config: &Config) -> io::Result<Option<Tls>> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let in_tls = |e: crate::tls::TlsError| io::Error::other(format!("[tls]: {e}"));
    let certs = crate::tls::ServerCerts::load(&files.cert, &files.key).map_err(in_tls)?;
    let server = crate::tls::server_config(Arc::clone(&certs)).map_err(in_tls)?;
    Ok(Some((certs, server)))
}

/// The inbound AUTH users, when `auth.users_file` is set.
fn load_users(config: &Config) -> io::Result<Option<crate::auth::Users>> {
    let Some(path) = &config.auth.users_file else {
        return Ok(None);
    };
    crate::auth::Users::load(path)
        .map(Some)
        .map_err(|e| io::Error::other(format!("[auth]: {e}")))
}

fn lookup_user(name: &str) -> io::Result<nix::unistd::User> {
    nix::unistd::User::from_name(name)
        .map_err(io::Error::from)?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("user {name}: no such user"),
            )
        })
}

/// What `serve` checks before it runs, beyond the config file itself: the
/// TLS certificate and key, the users file, the relay's CA file, the
/// `user` to run as and the `local.group` it must hold. For `postling
/// check`, one `(step, Ok(detail) | Err(reason))` per configured item.
pub fn preflight(config: &Config) -> Vec<(String, Preflight)> {
    let mut steps = Vec::new();
    if config.tls.is_some() {
        let r = load_tls(config).map(|_| "certificate and key load and match".to_string());
        steps.push(("tls".to_string(), r.map_err(|e| e.to_string()).into()));
    }
    if config.auth.users_file.is_some() {
        let r = load_users(config).map(|u| {
            let n = u.map_or(0, |u| u.len());
            format!("users file: {n} user(s)")
        });
        steps.push(("auth".to_string(), r.map_err(|e| e.to_string()).into()));
    }
    if let Some(ca) = &config.relay.ca_file {
        let r = crate::tls::check_ca_file(ca)
            .map(|()| format!("{} loads", ca.display()))
            .map_err(|e| format!("relay.ca_file: {e}"));
        steps.push(("relay.ca_file".to_string(), r.into()));
    }
    let user = config.user.as_deref().map(lookup_user);
    if let Some(r) = &user {
        let r = r
            .as_ref()
            .map(|u| format!("{} (uid {}, gid {})", u.name, u.uid, u.gid))
            .map_err(|e| e.to_string());
        steps.push(("user".to_string(), r.into()));
    }
    if let Some(gid) = config.local.sharing.gid {
        // Whose groups count: `user`'s, after initgroups; without it, the
        // user the packaged unit runs as (User=postling) when check runs
        // as root, since root itself holds every group.
        let daemon_user = match user {
            Some(Ok(u)) => Some(u),
            Some(Err(_)) => None,
            None if nix::unistd::geteuid().is_root() => lookup_user("postling").ok(),
            None => None,
        };
        let held = daemon_user.as_ref().map(|u| {
            std::ffi::CString::new(u.name.as_str())
                .ok()
                .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
                .is_some_and(|groups| groups.contains(&nix::unistd::Gid::from_raw(gid)))
        });
        // Only `user` says for sure who the daemon is; the unit's user
        // may get the group from SupplementaryGroups= instead.
        let sure = config.user.is_some();
        let step = match (held, &daemon_user) {
            (Some(true), Some(u)) => Preflight::Ok(format!("user {} is in group {gid}", u.name)),
            (Some(false), Some(u)) if sure => Preflight::Fail(format!(
                "user {} is not in group {gid}; add it (usermod -aG) and restart",
                u.name
            )),
            (Some(false), Some(u)) => Preflight::Note(format!(
                "user {} is not in group {gid}: if the daemon runs as {0}, add it (usermod -aG), \
                 or give the group in the unit (SupplementaryGroups=)",
                u.name
            )),
            _ => Preflight::Note(format!(
                "group {gid}: the user the daemon runs as must be in it (see `id <user>`)"
            )),
        };
        steps.push(("local.group".to_string(), step));
    }
    steps
}

/// One item `serve` checks before it runs, as `postling check` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    Ok(String),
    /// `serve` would refuse to start.
    Fail(String),
    /// Cannot be told from here.
    Note(String),
}

impl From<Result<String, String>> for Preflight {
    fn from(r: Result<String, String>) -> Preflight {
        match r {
            Ok(detail) => Preflight::Ok(detail),
            Err(reason) => Preflight::Fail(reason),
        }
    }
}

/// `local.group` must be one this process holds, or every delivery would
/// fail at its first `fchown`: refused at start instead, with the fix.
fn check_sharing_group(gid: Option<u32>) -> io::Result<()> {
    use nix::unistd::{getegid, geteuid, getgroups, Gid};
    let Some(gid) = gid else {
        return Ok(());
    };
    let held = geteuid().is_root()
        || getegid().as_raw() == gid
        || getgroups().is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)));
    if held {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "local.group: this process (uid {}) is not in group {gid}; add its user to \
             the group (usermod -aG) and restart",
            geteuid()
        ),
    ))
}

/// Becomes `user` when running as root (initgroups, setgid, then setuid,
/// and a check that root cannot be regained): the user keeps the groups
/// /etc/group gives it, such as a `local.group` shared with an IMAP
/// server. Not root: nothing to do.
fn drop_privileges(user: Option<&str>) -> io::Result<()> {
    use nix::unistd::{initgroups, setgid, setuid, Uid};
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let Some(name) = user else {
        warn!("running as root: set `user` in the config to drop privileges after binding");
        return Ok(());
    };
    let entry = lookup_user(name)?;
    let login = std::ffi::CString::new(name).map_err(io::Error::other)?;
    initgroups(&login, entry.gid).map_err(io::Error::from)?;
    setgid(entry.gid).map_err(io::Error::from)?;
    setuid(entry.uid).map_err(io::Error::from)?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(io::Error::other(format!(
            "could not drop root: still root after becoming {name}"
        )));
    }
    info!("running as user={name} uid={} gid={}", entry.uid, entry.gid);
    Ok(())
}

/// What a crash left in Maildir `tmp/` directories (files older than the
/// Maildir spec's 36 hours: newer ones may belong to a running delivery).
fn sweep_maildirs(config: &Config) {
    const AGE: std::time::Duration = std::time::Duration::from_secs(36 * 3600);
    let local = &config.local;
    let mut dirs: Vec<std::path::PathBuf> = local.mailboxes.values().cloned().collect();
    if let Ok(entries) = std::fs::read_dir(&local.maildir_root) {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    let removed: usize = dirs
        .iter()
        .map(|d| crate::store::maildir::sweep_tmp(d, AGE))
        .sum();
    if removed > 0 {
        info!("startup: removed {removed} stale file(s) from Maildir tmp/ directories");
    }
}

/// A server that is bound and ready to run.
pub struct Server {
    ctx: Arc<Context>,
    listeners: listener::Listeners,
}

impl Server {
    /// Binds every listener, locks data_dir, opens the queue (sweeping a
    /// crash's leftovers) and starts the relay thread with every committed
    /// message.
    pub fn start(config: Config, flags: Flags) -> io::Result<Server> {
        // Bind first and lock before touching the queue: a second instance
        // started by mistake fails here without sweeping our spools.
        let mut listeners = listener::bind(&config.listen)?;
        let in_data_dir = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("data_dir {}: {e}", config.data_dir.display()),
            )
        };
        let tls = load_tls(&config)?;
        let users = load_users(&config)?;
        // Ports are bound and root-only files (TLS key, users) read: from
        // here on, run as the configured user.
        drop_privileges(config.user.as_deref())?;
        check_sharing_group(config.local.sharing.gid)?;
        let lock = lock_data_dir(&config.data_dir).map_err(in_data_dir)?;
        let (queue, pending) = Queue::open(&config.data_dir).map_err(in_data_dir)?;
        // Where sendmail leaves mail while this daemon is down.
        crate::maildrop::prepare(&config.data_dir).map_err(in_data_dir)?;
        // After the lock: a control.sock already there is a dead daemon's.
        listeners.add_control(crate::control::bind(&config.data_dir).map_err(in_data_dir)?)?;
        // Any local user may submit (the peer's uid decides the sender).
        let submit = crate::control::bind_socket(&config.data_dir, SUBMIT_SOCKET, 0o666);
        listeners.add_submit(submit.map_err(in_data_dir)?)?;
        if let Some(mask) = config.local.sharing.umask() {
            // Maildir modes come from mkdir(2) and open(2). Set only now:
            // data_dir, the lock and the sockets above are made under the
            // umask postling was started with; the queue's files and
            // directories have owner-only modes of their own.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
        }
        sweep_maildirs(&config);
        let (tx, rx) = crossbeam_channel::unbounded();
        if !pending.is_empty() {
            info!("queue: {} message(s) waiting from before", pending.len());
        }
        for id in pending {
            // The receiver is alive: it is still in this scope.
            let _ = tx.send(relay::Request::Queued(id));
        }
        let ctx = Arc::new(Context {
            config: RwLock::new(Arc::new(config)),
            flags,
            queue,
            relay: tx,
            shutdown: AtomicBool::new(false),
            tls,
            users: RwLock::new(users.map(Arc::new)),
            auth_failures: PerIp::new(std::time::Duration::from_secs(3600)),
            message_rate: PerIp::new(std::time::Duration::from_secs(60)),
            _lock: lock,
            listening: listeners.local_addrs(),
        });
        relay::spawn(Arc::clone(&ctx), rx)?;
        Ok(Server { ctx, listeners })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.local_addrs()
    }

    /// Returns a function that asks the server to shut down, as SIGTERM does.
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let ctx = Arc::clone(&self.ctx);
        let waker = self.listeners.waker();
        move || {
            ctx.shutdown.store(true, Ordering::Relaxed);
            if let Err(e) = waker.wake() {
                warn!("cannot wake the acceptor: {e}");
            }
        }
    }

    /// Installs the signal handlers and accepts until shut down.
    pub fn run(self) -> io::Result<()> {
        let stop = self.stopper();
        let ctx = Arc::clone(&self.ctx);
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut stopping = false;
                for signal in signals.forever() {
                    match signal {
                        SIGHUP => reload(&ctx),
                        _ if stopping => {
                            warn!("second signal: exiting now");
                            std::process::exit(0);
                        }
                        _ => {
                            info!("signal {signal}: shutting down");
                            stopping = true;
                            stop();
                        }
                    }
                }
            })?;
        let config = self.ctx.config();
        for (addr, l) in self.local_addrs().iter().zip(&config.listen) {
            info!(
                "listening addr={addr} mode={}",
                format!("{:?}", l.mode).to_lowercase()
            );
        }
        crate::notify::notify_or_log("READY=1");
        self.listeners.run(self.ctx)
    }
}
