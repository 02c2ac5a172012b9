//! Raw TOML file + command-line flags in, validated `Config` out. This module
//! owns the config schema (every key optional, unknown keys refused), the
//! defaults that let `postling serve` run with no file at all, the precedence
//! of flags over the file, every range check on a limit, and error messages
//! that name the file, the 1-based line and the dotted key
//! (`postling.toml:7: limits.max_message_size: invalid size "25Q" ...`).
//! It does not open sockets or create directories; it loads the aliases file
//! through `crate::aliases` and hands the `[local]` policy to `crate::local`.
//!
//! Errors carry their position because every value is deserialized with its
//! span (`toml::Spanned`, or custom `Deserialize` impls whose errors toml
//! attaches to the value); the dotted key for a span is found by
//! deserializing the same text once more into a tree of spanned keys.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::aliases::{self, Aliases};
use crate::local::{self, Local, ResolveError};
use crate::store::maildir::Sharing;

/// Command-line flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--config FILE`; `None` runs on defaults.
    pub config: Option<PathBuf>,
    /// `--listen ADDR`, repeatable; if any, they replace the file's
    /// `[[listen]]` blocks entirely, all in mode smtp.
    pub listen: Vec<SocketAddr>,
    /// `--data-dir DIR`, overrides `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// Loaded by a client tool (`sendmail`, `mailq`, the queue commands),
    /// which any user may run: the daemon's own files (TLS certificate and
    /// key, smarthost password, CA file, users file), which are its
    /// user's alone, are not opened, as Postfix's sendmail never reads them.
    pub client: bool,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// EHLO name and Received headers. Default: /proc/sys/kernel/hostname,
    /// falling back to "localhost".
    pub hostname: String,
    /// Queue and state. Default "./postling-data"; `--data-dir` overrides.
    pub data_dir: PathBuf,
    /// When started as root (not by systemd with `User=`): the user to run
    /// as once the ports are bound. None: stay as started (with a warning
    /// when that is root).
    pub user: Option<String>,
    /// Sockets to listen on, never empty, addresses unique. Default one:
    /// 127.0.0.1:2525 smtp.
    pub listen: Vec<Listen>,
    pub limits: Limits,
    pub local: Local,
    pub relay: Relay,
    /// Certificate and key for STARTTLS and smtps; None: no inbound TLS.
    pub tls: Option<TlsFiles>,
    pub auth: Auth,
}

/// PEM files for inbound TLS, re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Inbound AUTH (RFC 4954).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// `user:HASH` lines (SHA-512-crypt or Argon2id); None: no AUTH.
    pub users_file: Option<PathBuf>,
    /// Offer AUTH without TLS to loopback clients. Default false: never
    /// without TLS.
    pub allow_plaintext_loopback: bool,
    /// Which envelope senders an authenticated user may use.
    pub senders: SenderPolicy,
    /// Failed AUTH attempts per client address (per hour) before further
    /// attempts are refused. Default 10.
    pub max_failures: u32,
}

/// Envelope senders an authenticated user may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SenderPolicy {
    /// Their own address: `user@<a local domain>` (or the login itself when
    /// it is an address), `relay.rewrite_from`, or `<>`. The default.
    #[default]
    Own,
    /// Any sender.
    Any,
}

/// One `[[listen]]` block.
#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: SocketAddr,
    pub mode: ListenMode,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenMode {
    /// Port 25 style (RFC 5321): STARTTLS offered when [tls] is set; relays
    /// only for relay.allow_from or an authenticated client.
    #[default]
    Smtp,
    /// Port 587 (RFC 6409): AUTH required before MAIL; needs [tls] and [auth].
    Submission,
    /// Port 465 (RFC 8314): TLS from the first byte, then like submission.
    Smtps,
    /// The sendmail submission socket (`data_dir/submit.sock`); internal,
    /// never written in the config file. The Unix user is the identity.
    Local,
}

/// Resource limits: each bounds what one client can cost us.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised as SIZE, RFC 1870).
    /// Default 25M; at least 1K. Written as bytes or "512", "64K", "25M",
    /// "1G" (K = 1024).
    pub max_message_size: u64,
    /// Recipients per transaction. Default 100, which is also the floor
    /// (RFC 5321 4.5.3.1.8).
    pub max_recipients: usize,
    /// Concurrent sessions; over it clients get 421 4.3.2. Default 64, >= 1.
    pub max_connections: usize,
    /// Concurrent sessions from one IP address. Default 16, >= 1.
    pub max_connections_per_ip: usize,
    /// Time to wait for a command. Default 5m (RFC 5321 4.5.3.2); > 0.
    pub command_timeout: Duration,
    /// During DATA: the longest silence, and the base of the whole DATA
    /// phase, which may take one more second per KiB received (so a slow
    /// but steady sender is never cut, a trickle is). Default 10m; > 0.
    pub data_timeout: Duration,
    /// Protocol errors before the session is closed with 421. Default 10, >= 1.
    pub max_errors: u32,
    /// More Received: headers than this is a mail loop (554 5.4.6; loop
    /// detection by counting them is RFC 5321 6.3). Default 50, >= 1.
    pub max_received_headers: usize,
    /// Wait this long before the 220 and drop clients that talk first
    /// (554 5.5.0); None: no wait, but a client whose bytes are already
    /// there is still dropped. Default none.
    pub greeting_delay: Option<Duration>,
    /// Messages one client address may send per minute (over it: 421
    /// 4.7.0); 0: no limit. Default 0.
    pub max_messages_per_minute_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 64,
            max_connections_per_ip: 16,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            max_errors: 10,
            max_received_headers: 50,
            greeting_delay: None,
            max_messages_per_minute_per_ip: 0,
        }
    }
}

/// Relay policy (who may send mail to non-local domains) and outbound
/// delivery (where it goes, how it is retried).
#[derive(Debug, Clone)]
pub struct Relay {
    /// Networks allowed to relay. Default: loopback and the private ranges
    /// 127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16,
    /// fd00::/8.
    pub allow_from: Vec<Cidr>,
    /// Send all non-local mail through this host; None: direct to each
    /// domain's MX hosts.
    pub smarthost: Option<Smarthost>,
    /// Envelope sender and From: for mail from local users, when relaying.
    pub rewrite_from: Option<String>,
    /// Waits between attempts; the last repeats. Default 1m 5m 15m 30m 1h 2h 4h.
    pub retry: Vec<Duration>,
    /// Give up and bounce after this long (and at least the attempts the
    /// schedule makes in that time). Default 5d.
    pub max_queue_time: Duration,
    /// Tell the sender once that delivery is delayed; None: never. Default 4h.
    pub delay_warning: Option<Duration>,
    /// Name servers for MX lookups; empty: those of /etc/resolv.conf.
    pub dns_servers: Vec<SocketAddr>,
    /// TCP port for direct MX delivery. Default 25 (tests use another).
    pub mx_port: u16,
    /// Extra PEM trust anchors for the smarthost (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Deliver undeliverable bounces (null sender) to the local postmaster
    /// instead of only logging them. Default false.
    pub double_bounce_to_postmaster: bool,
    /// How long to wait for a TCP connection to a remote host. Default 30s.
    pub connect_timeout: Duration,
}

/// How to reach the smarthost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smarthost {
    pub host: String,
    pub port: u16,
    pub tls: SmarthostTls,
    /// AUTH user and the file whose first line is the password.
    pub auth: Option<(String, PathBuf)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmarthostTls {
    /// STARTTLS, required and verified (port 587 by default).
    StartTls,
    /// TLS from the first byte, verified (port 465 by default).
    Implicit,
    /// No TLS at all (port 25 by default); AUTH is then refused.
    None,
}

impl Relay {
    /// Whether `ip` is in one of the `allow_from` networks.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_from.iter().any(|net| net.contains(ip))
    }
}

impl Default for Relay {
    fn default() -> Relay {
        let nets = [
            "127.0.0.0/8",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fd00::/8",
        ];
        let m = |n: u64| Duration::from_secs(60 * n);
        Relay {
            // The literals above are valid networks: tested by `defaults`.
            allow_from: nets
                .iter()
                .map(|n| n.parse().expect("valid default network"))
                .collect(),
            smarthost: None,
            rewrite_from: None,
            retry: vec![m(1), m(5), m(15), m(30), m(60), m(120), m(240)],
            max_queue_time: m(5 * 24 * 60),
            delay_warning: Some(m(240)),
            dns_servers: Vec::new(),
            mx_port: 25,
            ca_file: None,
            double_bounce_to_postmaster: false,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// An IP network: address plus prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether this network is too wide to be anyone's own: wider than a
    /// /8 of IPv4 (also as IPv4-mapped IPv6, `::ffff:0.0.0.0/96`, or an
    /// IPv6 network that holds all of those, `::/1`), or an IPv6 network
    /// wider than /16 outside the private ranges (`fc00::/7`, `fe80::/10`),
    /// or a wide slice of 6to4 or Teredo, which carry IPv4 addresses.
    /// Such a network in `relay.allow_from` lets most of the Internet relay.
    pub fn is_too_wide(&self) -> bool {
        const MAPPED: u128 = 0xffff_0000_0000; // ::ffff:0.0.0.0
        match self.addr {
            IpAddr::V4(_) => self.prefix < 8,
            IpAddr::V6(net) => {
                let net = u128::from(net);
                let inside = |base: u128, len: u8| {
                    self.prefix >= len && u128::from(masked6(net.into(), len)) == base
                };
                if inside(MAPPED, 96) {
                    return self.prefix - 96 < 8;
                }
                let holds_ipv4 =
                    self.prefix < 96 && u128::from(masked6(MAPPED.into(), self.prefix)) == net;
                let private = inside(0xfc00 << 112, 7) || inside(0xfe80 << 112, 10);
                // 6to4 (2002::/16) and Teredo (2001::/32) carry an IPv4
                // address in them: a wide slice of those is IPv4 too.
                let holds = |base: u128, len: u8| {
                    self.prefix <= len && u128::from(masked6(base.into(), self.prefix)) == net
                };
                let tunnels = holds(0x2002 << 112, 16)
                    || (inside(0x2002 << 112, 16) && self.prefix < 24)
                    || holds(0x2001 << 112, 32)
                    || (inside(0x2001 << 112, 32) && self.prefix < 40);
                holds_ipv4 || tunnels || (self.prefix < 16 && !private)
            }
        }
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) matches IPv4 networks, and an IPv4 address matches
    /// IPv6 networks through its mapped form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => masked4(ip, self.prefix) == net,
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| masked4(ip, self.prefix) == net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => masked6(ip, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V4(ip)) => masked6(ip.to_ipv6_mapped(), self.prefix) == net,
        }
    }
}

fn masked4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn masked6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

/// Why a string is not a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

impl FromStr for Cidr {
    type Err = CidrError;

    /// "10.0.0.0/8", "fd00::/8", or a bare address meaning /32 (/128).
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || {
            CidrError(format!("invalid network \"{s}\" (expected an address or address/prefix, e.g. \"192.168.0.0/16\")"))
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| {
                    CidrError(format!(
                        "invalid network \"{s}\": prefix length must be 0..={max}"
                    ))
                })?
            }
            Some(_) => return Err(bad()),
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(masked4(a, prefix)),
            IpAddr::V6(a) => IpAddr::V6(masked6(a, prefix)),
        };
        if network != addr {
            return Err(CidrError(format!(
                "invalid network \"{s}\": host bits are set (did you mean \"{network}/{prefix}\"?)"
            )));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ListenMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ListenMode, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "smtp" => Ok(ListenMode::Smtp),
            "submission" => Ok(ListenMode::Submission),
            "smtps" => Ok(ListenMode::Smtps),
            _ => Err(de::Error::custom(format!(
                "unknown mode \"{s}\" (expected \"smtp\", \"submission\" or \"smtps\")"
            ))),
        }
    }
}

/// A config error, positioned as precisely as we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    /// 1-based.
    pub line: Option<usize>,
    /// Dotted key: "limits.max_recipients", "listen[0].mode" (0-based index),
    /// "local.mailboxes.alice", or a flag such as "--listen".
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// What `postling serve` with no config file and no flags runs on.
    pub fn defaults() -> Config {
        // The empty document with no flags is valid: tested by `defaults`.
        parse("", None, &Flags::default()).expect("defaults are valid")
    }
}

/// Reads the file named by `--config` (if any), applies the flags,
/// validates, and loads the aliases file.
/// Where the installed daemon's config lives (the systemd unit passes it);
/// the local tools (queue, mailq, check, sendmail) read it when not told.
pub const INSTALLED_CONFIG: &str = "/etc/postling/postling.toml";

/// `path`, else the installed config if there is one, else none (the
/// built-in defaults).
pub fn installed_or(path: Option<PathBuf>) -> Option<PathBuf> {
    path.or_else(|| Some(PathBuf::from(INSTALLED_CONFIG)).filter(|p| p.exists()))
}

pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let Some(path) = &flags.config else {
        return parse("", None, flags);
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.clone()),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    log::debug!("config: read {}", path.display());
    parse(&text, Some(path), flags)
}

/// `load` from a string. `file` only names it in errors; paths in it are
/// taken as written (relative to the working directory).
pub fn parse(text: &str, file: Option<&Path>, flags: &Flags) -> Result<Config, ConfigError> {
    let ctx = Ctx {
        text,
        file,
        keys: OnceCell::new(),
        open_files: !flags.client,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    build(raw, &ctx, flags)
}

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    data_dir: Option<Spanned<PathBuf>>,
    listen: Option<Spanned<Vec<RawListen>>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    relay: RawRelay,
    tls: Option<RawTls>,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: Option<Spanned<PathBuf>>,
    allow_plaintext_loopback: Option<bool>,
    senders: Option<Spanned<String>>,
    max_failures: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    addr: Spanned<Addr>,
    #[serde(default)]
    mode: ListenMode,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_size: Option<Spanned<Size>>,
    max_recipients: Option<Spanned<usize>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_ip: Option<Spanned<usize>>,
    command_timeout: Option<Spanned<Secs>>,
    data_timeout: Option<Spanned<Secs>>,
    max_errors: Option<Spanned<u32>>,
    max_received_headers: Option<Spanned<usize>>,
    greeting_delay: Option<Spanned<OptSecs>>,
    max_messages_per_minute_per_ip: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    domains: Option<Vec<Spanned<String>>>,
    maildir_root: Option<Spanned<PathBuf>>,
    users: Option<Vec<Spanned<String>>>,
    mailboxes: Option<BTreeMap<String, Spanned<PathBuf>>>,
    aliases: Option<Spanned<PathBuf>>,
    trusted_users: Option<Vec<String>>,
    sendmail_wait: Option<Spanned<OptSecs>>,
    mode: Option<Spanned<FileMode>>,
    group: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    // Parsed in `build`: toml gives errors inside arrays the whole array's
    // span, and we want the element's line.
    allow_from: Option<Vec<Spanned<String>>>,
    smarthost: Option<Spanned<String>>,
    smarthost_tls: Option<Spanned<String>>,
    smarthost_user: Option<Spanned<String>>,
    smarthost_password_file: Option<Spanned<PathBuf>>,
    rewrite_from: Option<Spanned<String>>,
    retry: Option<Spanned<Vec<Spanned<Secs>>>>,
    max_queue_time: Option<Spanned<Secs>>,
    delay_warning: Option<Spanned<OptSecs>>,
    dns_servers: Option<Vec<Spanned<String>>>,
    mx_port: Option<Spanned<u16>>,
    ca_file: Option<Spanned<PathBuf>>,
    double_bounce_to_postmaster: Option<bool>,
    connect_timeout: Option<Spanned<Secs>>,
}

/// A duration, or "off" (also any zero: 0, "0s", "0h") for none.
#[derive(Clone, Copy)]
struct OptSecs(Option<Duration>);

impl<'de> Deserialize<'de> for OptSecs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OptSecs, D::Error> {
        d.deserialize_any(NumberOrString {
            expecting: "a duration such as \"4h\", or \"off\"",
            parse: |s| match (s, parse_duration(s)) {
                ("off", _) => Ok(OptSecs(None)),
                (_, Some(d)) if d.is_zero() => Ok(OptSecs(None)),
                (_, Some(d)) if d > MAX_DURATION => {
                    Err(format!("duration \"{s}\" is too long (at most 365d)"))
                }
                (_, Some(d)) => Ok(OptSecs(Some(d))),
                (_, None) => Err(format!(
                    "invalid duration \"{s}\" (expected e.g. \"4h\", or \"off\")"
                )),
            },
        })
    }
}

/// The mode of Maildir files: octal digits as a string ("0640") or a TOML
/// octal integer (0o640). The owner keeps read and write; nothing may be
/// executable, special, or writable by others.
#[derive(Clone, Copy)]
struct FileMode(u32);

impl FileMode {
    fn check(mode: u32) -> Result<FileMode, String> {
        if mode > 0o777 || mode & 0o600 != 0o600 || mode & 0o113 != 0 {
            return Err(format!(
                "mode {mode:04o} is not allowed (from 0600 to 0664, no x bits, \
                 not writable by others; e.g. \"0640\")"
            ));
        }
        Ok(FileMode(mode))
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileMode, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FileMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a file mode such as \"0640\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FileMode, E> {
                u32::try_from(v)
                    .map_err(|_| E::custom(format!("mode {v} is negative")))
                    .and_then(|m| FileMode::check(m).map_err(E::custom))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FileMode, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileMode, E> {
                let octal =
                    !v.is_empty() && v.len() <= 4 && v.bytes().all(|b| (b'0'..=b'7').contains(&b));
                if !octal {
                    return Err(E::custom(format!(
                        "invalid mode \"{v}\" (expected octal digits, e.g. \"0640\")"
                    )));
                }
                let mode = u32::from_str_radix(v, 8).map_err(E::custom)?;
                FileMode::check(mode).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A group by name (looked up in the group database) or by number.
fn group_id(ctx: &Ctx<'_>, group: &Spanned<String>) -> Result<u32, ConfigError> {
    let name = group.get_ref();
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse()
            .map_err(|_| ctx.error(group, format!("invalid group id \"{name}\"")));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ctx.error(group, format!("unknown group \"{name}\""))),
        Err(e) => Err(ctx.error(group, format!("cannot look up group \"{name}\": {e}"))),
    }
}

/// A listen address: "0.0.0.0:25", "[::]:25".
struct Addr(SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Addr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Addr).map_err(|_| {
            de::Error::custom(format!(
                "invalid address \"{s}\" (expected IP:PORT, e.g. \"0.0.0.0:25\" or \"[::]:25\")"
            ))
        })
    }
}

/// A byte count: an integer, or a string with optional K, M or G suffix.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        d.deserialize_any(NumberOrString {
            expecting: "a size such as 1048576 or \"25M\"",
            parse: |s| {
                parse_size(s).map(Size).ok_or_else(|| {
                    format!(
                        "invalid size \"{s}\" (expected a number with optional K, M or G suffix)"
                    )
                })
            },
        })
    }
}

/// The longest duration any key accepts: beyond it, adding it to a clock
/// could overflow, and no mail server needs to wait a year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A positive duration: integer seconds, or a string with s, m, h or d suffix.
#[derive(Clone, Copy)]
struct Secs(Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secs, D::Error> {
        d.deserialize_any(NumberOrString {
            expecting: "a duration such as 300 or \"5m\"",
            parse: |s| match parse_duration(s) {
                Some(d) if d.is_zero() => Err("duration must be greater than zero".to_string()),
                Some(d) if d > MAX_DURATION => {
                    Err(format!("duration \"{s}\" is too long (at most 365d)"))
                }
                Some(d) => Ok(Secs(d)),
                None => Err(format!(
                    "invalid duration \"{s}\" (expected a number with optional s, m, h or d suffix)"
                )),
            },
        })
    }
}

/// Accepts a non-negative integer (as its decimal text) or a string, and
/// hands either to `parse`.
struct NumberOrString<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for NumberOrString<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!(
                "{v} is negative (expected {})",
                self.expecting
            )));
        }
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.parse)(&v.to_string()).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// "512", "64K", "25M", "1G" (binary multiples, suffix case-insensitive).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()?.to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    parse_digits(digits)?.checked_mul(mult)
}

/// "30s", "5m", "1h", "2d", or bare seconds "300".
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let (digits, mult) = match s.as_bytes().last()? {
        b's' => (&s[..s.len() - 1], 1u64),
        b'm' => (&s[..s.len() - 1], 60),
        b'h' => (&s[..s.len() - 1], 60 * 60),
        b'd' => (&s[..s.len() - 1], 24 * 60 * 60),
        _ => (s, 1),
    };
    parse_digits(digits)?
        .checked_mul(mult)
        .map(Duration::from_secs)
}

/// ASCII digits only: no sign, no spaces, no empty string.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

// ---------------------------------------------------------------------------
// Validation.

fn build(raw: RawConfig, ctx: &Ctx<'_>, flags: &Flags) -> Result<Config, ConfigError> {
    let hostname = match raw.hostname {
        Some(h) => {
            if !local::is_domain(h.get_ref()) {
                return Err(ctx.error(
                    &h,
                    format!(
                        "invalid hostname \"{}\" (expected a domain name such as \"pi.lan\")",
                        h.get_ref()
                    ),
                ));
            }
            h.into_inner()
        }
        None => system_hostname(),
    };

    let data_dir = match (&flags.data_dir, raw.data_dir) {
        (Some(dir), _) if dir.as_os_str().is_empty() => {
            return Err(flag_error("--data-dir", "must not be empty"))
        }
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) if dir.get_ref().as_os_str().is_empty() => {
            return Err(ctx.error(&dir, "must not be empty"))
        }
        (None, Some(dir)) => dir.into_inner(),
        (None, None) => PathBuf::from("./postling-data"),
    };

    let listen = if !flags.listen.is_empty() {
        let mut seen = Vec::new();
        for addr in &flags.listen {
            if seen.contains(addr) {
                return Err(flag_error(
                    "--listen",
                    &format!("duplicate listen address {addr}"),
                ));
            }
            seen.push(*addr);
        }
        seen.into_iter()
            .map(|addr| Listen {
                addr,
                mode: ListenMode::Smtp,
            })
            .collect()
    } else if let Some(list) = raw.listen {
        if list.get_ref().is_empty() {
            return Err(ctx.error(&list, "at least one listener is needed"));
        }
        let mut lines = HashMap::new();
        let mut out = Vec::new();
        for l in list.into_inner() {
            let addr = l.addr.get_ref().0;
            let line = ctx.line(l.addr.span());
            // Port 0 asks the kernel for any free port: never a duplicate.
            if let Some(first) = lines.insert(addr, line).filter(|_| addr.port() != 0) {
                return Err(ctx.error(
                    &l.addr,
                    format!("duplicate listen address {addr} (first on line {first})"),
                ));
            }
            out.push(Listen { addr, mode: l.mode });
        }
        out
    } else {
        vec![Listen {
            addr: SocketAddr::from(([127, 0, 0, 1], 2525)),
            mode: ListenMode::Smtp,
        }]
    };

    let limits = build_limits(raw.limits, ctx)?;
    let local = build_local(raw.local, &data_dir, ctx)?;
    let relay = build_relay(raw.relay, ctx)?;
    let tls = match raw.tls {
        Some(t) => Some(TlsFiles {
            cert: readable(ctx, t.cert)?,
            key: readable(ctx, t.key)?,
        }),
        None => None,
    };
    let auth = build_auth(raw.auth, ctx)?;
    check_listeners(&listen, &relay, tls.is_some(), &auth, ctx)?;
    let user = match raw.user {
        Some(u) if u.get_ref().is_empty() || u.get_ref().contains([':', '/', ' ']) => {
            return Err(ctx.error(&u, format!("invalid user name \"{}\"", u.get_ref())))
        }
        u => u.map(Spanned::into_inner),
    };
    Ok(Config {
        hostname,
        user,
        data_dir,
        listen,
        limits,
        local,
        relay,
        tls,
        auth,
    })
}

fn build_limits(raw: RawLimits, ctx: &Ctx<'_>) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    // Each limit: its default, and the floor with the reason for it.
    Ok(Limits {
        max_message_size: at_least(
            ctx,
            raw.max_message_size,
            Size(d.max_message_size),
            Size(1024),
            "1K",
        )?
        .0,
        max_recipients: at_least(
            ctx,
            raw.max_recipients,
            d.max_recipients,
            100,
            "100 (RFC 5321 4.5.3.1.8)",
        )?,
        max_connections: at_least(ctx, raw.max_connections, d.max_connections, 1, "1")?,
        max_connections_per_ip: at_least(
            ctx,
            raw.max_connections_per_ip,
            d.max_connections_per_ip,
            1,
            "1",
        )?,
        command_timeout: raw
            .command_timeout
            .map_or(d.command_timeout, |s| s.into_inner().0),
        data_timeout: raw
            .data_timeout
            .map_or(d.data_timeout, |s| s.into_inner().0),
        max_errors: at_least(ctx, raw.max_errors, d.max_errors, 1, "1")?,
        max_received_headers: at_least(
            ctx,
            raw.max_received_headers,
            d.max_received_headers,
            1,
            "1",
        )?,
        greeting_delay: raw.greeting_delay.and_then(|s| s.into_inner().0),
        max_messages_per_minute_per_ip: raw
            .max_messages_per_minute_per_ip
            .map_or(d.max_messages_per_minute_per_ip, |s| s.into_inner()),
    })
}

fn build_relay(raw: RawRelay, ctx: &Ctx<'_>) -> Result<Relay, ConfigError> {
    let d = Relay::default();
    let allow_from = match raw.allow_from {
        Some(list) => {
            let parse = |net: &Spanned<String>| {
                net.get_ref()
                    .parse()
                    .map_err(|e: CidrError| ctx.error(net, e.0))
            };
            list.iter().map(parse).collect::<Result<_, _>>()?
        }
        None => d.allow_from,
    };
    let tls = match &raw.smarthost_tls {
        None => SmarthostTls::StartTls,
        Some(t) => match t.get_ref().as_str() {
            "starttls" => SmarthostTls::StartTls,
            "implicit" => SmarthostTls::Implicit,
            "none" => SmarthostTls::None,
            other => {
                return Err(ctx.error(
                    t,
                    format!(
                    "invalid value \"{other}\" (expected \"starttls\", \"implicit\" or \"none\")"
                ),
                ))
            }
        },
    };
    let auth = match (raw.smarthost_user, raw.smarthost_password_file) {
        (None, None) => None,
        (Some(u), Some(f)) => {
            if tls == SmarthostTls::None {
                return Err(ctx.error(
                    &u,
                    "AUTH needs TLS: credentials are never sent in clear (set smarthost_tls = \"starttls\" or \"implicit\")",
                ));
            }
            Some((u.into_inner(), readable(ctx, f)?))
        }
        (Some(u), None) => return Err(ctx.error(&u, "needs relay.smarthost_password_file too")),
        (None, Some(f)) => return Err(ctx.error(&f, "needs relay.smarthost_user too")),
    };
    let smarthost = match raw.smarthost {
        None => {
            if let Some(t) = &raw.smarthost_tls {
                return Err(ctx.error(t, "needs relay.smarthost"));
            }
            if auth.is_some() {
                return Err(ConfigError {
                    file: ctx.file.map(Path::to_path_buf),
                    line: None,
                    key: Some("relay.smarthost_user".into()),
                    message: "needs relay.smarthost".into(),
                });
            }
            None
        }
        Some(h) => {
            let default_port = match tls {
                SmarthostTls::StartTls => 587,
                SmarthostTls::Implicit => 465,
                SmarthostTls::None => 25,
            };
            let (host, port) = split_host_port(h.get_ref(), default_port).ok_or_else(|| {
                ctx.error(
                    &h,
                    format!("invalid smarthost \"{}\" (expected HOST or HOST:PORT, e.g. \"smtp.example.net:587\")", h.get_ref()),
                )
            })?;
            Some(Smarthost {
                host,
                port,
                tls,
                auth,
            })
        }
    };
    let rewrite_from = match raw.rewrite_from {
        None => None,
        Some(a) => {
            let ok = a.get_ref().rsplit_once('@').is_some_and(|(l, dom)| {
                !l.is_empty()
                    && local::is_domain(dom)
                    && !a.get_ref().contains(['<', '>', ' ', '"'])
            });
            if !ok {
                return Err(ctx.error(
                    &a,
                    format!("invalid address \"{}\" (expected user@domain)", a.get_ref()),
                ));
            }
            Some(a.into_inner())
        }
    };
    let retry = match raw.retry {
        None => d.retry,
        Some(list) if list.get_ref().is_empty() => {
            return Err(ctx.error(&list, "needs at least one interval"))
        }
        Some(list) => list
            .into_inner()
            .into_iter()
            .map(|s| s.into_inner().0)
            .collect(),
    };
    let mut dns_servers = Vec::new();
    for s in raw.dns_servers.iter().flatten() {
        let text = s.get_ref();
        let addr = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| ctx.error(s, format!("invalid name server \"{text}\" (expected an IP address, optionally with :PORT)")))?;
        dns_servers.push(addr);
    }
    let mx_port = match raw.mx_port {
        Some(p) if *p.get_ref() == 0 => {
            return Err(ctx.error(&p, "must be a port number 1..=65535"))
        }
        Some(p) => p.into_inner(),
        None => d.mx_port,
    };
    Ok(Relay {
        allow_from,
        smarthost,
        rewrite_from,
        retry,
        max_queue_time: raw
            .max_queue_time
            .map_or(d.max_queue_time, |s| s.into_inner().0),
        delay_warning: raw
            .delay_warning
            .map_or(d.delay_warning, |s| s.into_inner().0),
        dns_servers,
        mx_port,
        ca_file: match raw.ca_file {
            Some(f) => Some(readable(ctx, f)?),
            None => None,
        },
        double_bounce_to_postmaster: raw
            .double_bounce_to_postmaster
            .unwrap_or(d.double_bounce_to_postmaster),
        connect_timeout: raw
            .connect_timeout
            .map_or(d.connect_timeout, |s| s.into_inner().0),
    })
}

fn build_auth(raw: RawAuth, ctx: &Ctx<'_>) -> Result<Auth, ConfigError> {
    let users_file = match raw.users_file {
        Some(f) => Some(readable(ctx, f)?),
        None => None,
    };
    let senders = match raw.senders {
        None => SenderPolicy::Own,
        Some(s) => match s.get_ref().as_str() {
            "own" => SenderPolicy::Own,
            "any" => SenderPolicy::Any,
            other => {
                return Err(ctx.error(
                    &s,
                    format!("invalid value \"{other}\" (expected \"own\" or \"any\")"),
                ))
            }
        },
    };
    Ok(Auth {
        users_file,
        allow_plaintext_loopback: raw.allow_plaintext_loopback.unwrap_or(false),
        senders,
        max_failures: at_least(ctx, raw.max_failures, 10, 1, "1")?,
    })
}

/// Refuses configurations that could not work or would be an open relay:
/// submission/smtps without TLS and AUTH, and a listener reachable from
/// outside whose allow_from lets the whole Internet relay.
fn check_listeners(
    listen: &[Listen],
    relay: &Relay,
    tls: bool,
    auth: &Auth,
    ctx: &Ctx<'_>,
) -> Result<(), ConfigError> {
    let err = |key: String, message: String| ConfigError {
        file: ctx.file.map(Path::to_path_buf),
        line: None,
        key: Some(key),
        message,
    };
    for (i, l) in listen.iter().enumerate() {
        let key = format!("listen[{i}].mode");
        if l.mode != ListenMode::Smtp && !tls {
            return Err(err(
                key,
                format!(
                    "{} on {} needs a [tls] cert and key",
                    mode_name(l.mode),
                    l.addr
                ),
            ));
        }
        if l.mode != ListenMode::Smtp && auth.users_file.is_none() {
            return Err(err(
                key,
                format!(
                    "{} on {} needs [auth] users_file",
                    mode_name(l.mode),
                    l.addr
                ),
            ));
        }
        let everyone = relay.allow_from.iter().find(|n| n.is_too_wide());
        let ip = l.addr.ip();
        let private = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        };
        if let Some(wide) = everyone.filter(|_| !private) {
            return Err(err(
                "relay.allow_from".into(),
                format!(
                    "contains {wide}, a network wider than anyone's own, while {} listens on {}: that is an open relay for much of the Internet; list your own networks instead",
                    mode_name(l.mode),
                    l.addr
                ),
            ));
        }
    }
    Ok(())
}

fn mode_name(mode: ListenMode) -> &'static str {
    match mode {
        ListenMode::Smtp => "smtp",
        ListenMode::Submission => "submission",
        ListenMode::Smtps => "smtps",
        ListenMode::Local => "local",
    }
}

/// A path that must be readable now, so a typo fails at start with the
/// file, line and key rather than at the first delivery (not checked for a
/// client tool: [`Flags::client`]).
fn readable(ctx: &Ctx<'_>, path: Spanned<PathBuf>) -> Result<PathBuf, ConfigError> {
    if !ctx.open_files {
        return Ok(path.into_inner());
    }
    match std::fs::File::open(path.get_ref()) {
        Ok(_) => Ok(path.into_inner()),
        Err(e) => Err(ctx.error(
            &path,
            format!("cannot read \"{}\": {e}", path.get_ref().display()),
        )),
    }
}

/// "host", "host:587", "[2001:db8::1]:25", "192.0.2.1".
fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<Ipv6Addr>().ok()?;
        match after {
            "" => (h, default_port),
            p => (h, p.strip_prefix(':')?.parse().ok()?),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default_port),
        }
    };
    let valid = host.parse::<IpAddr>().is_ok() || local::is_domain(host);
    (valid && port != 0).then(|| (host.to_ascii_lowercase(), port))
}

/// `value` (or `default`), refusing anything below `min`.
fn at_least<T: PartialOrd + Copy>(
    ctx: &Ctx<'_>,
    value: Option<Spanned<T>>,
    default: T,
    min: T,
    min_text: &str,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if *v.get_ref() < min => Err(ctx.error(&v, format!("must be at least {min_text}"))),
        Some(v) => Ok(v.into_inner()),
    }
}

/// `local.sendmail_wait` unless set: long enough for a restart, a reload
/// or a busy spell at the connection cap.
const SENDMAIL_WAIT: Duration = Duration::from_secs(60);

const QUEUE_CLASH: &str = "must not be data_dir or inside its incoming/, queue/, corrupt/ or \
     maildrop/: Maildirs there would be taken for queue entries or sendmail's files (and \
     mail to users named incoming or queue would be swept away at start)";

/// True when Maildirs at `path` (or under it) would share directories with
/// the queue in `data_dir`. Compared as absolute paths, without resolving
/// symlinks.
fn clashes_with_queue(path: &Path, data_dir: &Path) -> bool {
    let (Ok(path), Ok(data)) = (std::path::absolute(path), std::path::absolute(data_dir)) else {
        return false;
    };
    path.components().eq(data.components())
        || ["incoming", "queue", "corrupt", crate::maildrop::DIR]
            .iter()
            .any(|own| path.starts_with(data.join(own)))
}

fn build_local(raw: RawLocal, data_dir: &Path, ctx: &Ctx<'_>) -> Result<Local, ConfigError> {
    let mut domains = Vec::new();
    if raw.domains.as_ref().is_some_and(Vec::is_empty) {
        // Bare names (`sendmail root`) and <Postmaster> use the first.
        return Err(ConfigError {
            file: ctx.file.map(Path::to_path_buf),
            line: None,
            key: Some("local.domains".into()),
            message: "needs at least one domain (bare names and <Postmaster> use the first)".into(),
        });
    }
    for d in raw.domains.iter().flatten() {
        let name = d.get_ref().to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name).to_string();
        if !local::is_domain(&name) {
            return Err(ctx.error(d, format!("invalid domain \"{}\"", d.get_ref())));
        }
        if !domains.contains(&name) {
            domains.push(name);
        }
    }
    if raw.domains.is_none() {
        domains.push("localhost".to_string());
    }

    let maildir_root = match raw.maildir_root {
        Some(root) if root.get_ref().as_os_str().is_empty() => {
            return Err(ctx.error(&root, "must not be empty"))
        }
        Some(root) if clashes_with_queue(root.get_ref(), data_dir) => {
            return Err(ctx.error(&root, QUEUE_CLASH))
        }
        Some(root) => root.into_inner(),
        None => data_dir.join("mail"),
    };

    let users = match raw.users {
        None => None,
        Some(list) => {
            let mut users = Vec::new();
            for u in list {
                let name = u.get_ref().to_ascii_lowercase();
                if !local::is_safe_name(&name) {
                    return Err(ctx.error(
                        &u,
                        format!("invalid user name \"{}\" ({SAFE_NAME})", u.get_ref()),
                    ));
                }
                if !users.contains(&name) {
                    users.push(name);
                }
            }
            Some(users)
        }
    };

    let mut mailboxes = BTreeMap::new();
    for (user, dir) in raw.mailboxes.unwrap_or_default() {
        let name = user.to_ascii_lowercase();
        if !local::is_safe_name(&name) {
            return Err(ctx.error(&dir, format!("invalid user name \"{user}\" ({SAFE_NAME})")));
        }
        if !dir.get_ref().is_absolute() {
            return Err(ctx.error(
                &dir,
                format!(
                    "mailbox path \"{}\" must be absolute",
                    dir.get_ref().display()
                ),
            ));
        }
        if clashes_with_queue(dir.get_ref(), data_dir) {
            return Err(ctx.error(&dir, QUEUE_CLASH));
        }
        if mailboxes.insert(name, dir.get_ref().clone()).is_some() {
            return Err(ctx.error(
                &dir,
                format!("user \"{user}\" has two mailboxes (names are case-insensitive)"),
            ));
        }
    }

    let sharing = Sharing {
        file_mode: raw
            .mode
            .map_or(Sharing::default().file_mode, |m| m.into_inner().0),
        gid: raw.group.as_ref().map(|g| group_id(ctx, g)).transpose()?,
    };
    let mut local = Local {
        domains,
        maildir_root,
        users,
        mailboxes,
        aliases: Aliases::default(),
        trusted_users: raw.trusted_users.unwrap_or_default(),
        sendmail_wait: raw
            .sendmail_wait
            .map_or(SENDMAIL_WAIT, |s| s.into_inner().0.unwrap_or_default()),
        sharing,
    };
    // Only the daemon expands aliases: sendmail and the queue tools never
    // read the file, so a mistake in it (or a mode that keeps it from the
    // caller) cannot stop cron's mail while the daemon runs on.
    if let Some(path) = raw.aliases.filter(|_| ctx.open_files) {
        local.aliases = aliases::load(path.get_ref()).map_err(|e| match e.line {
            // Unreadable: point at the config line that names the file.
            None => ctx.error(
                &path,
                format!(
                    "cannot read \"{}\": {}",
                    path.get_ref().display(),
                    e.message.trim_start_matches("cannot read: ")
                ),
            ),
            Some(_) => e,
        })?;
        check_aliases(&local, path.get_ref())?;
    }
    Ok(local)
}

const SAFE_NAME: &str =
    "letters, digits, '.', '_' and '-', not starting with '.' or '-', at most 64 bytes";

/// Expands every alias once so that loops and targets nobody receives are
/// reported at startup, not as 550s at RCPT time.
fn check_aliases(local: &Local, path: &Path) -> Result<(), ConfigError> {
    let mut skipped = Vec::new();
    for name in local.aliases.names() {
        let why = match local.expand_noting(name, &mut skipped) {
            Ok(_) => continue,
            Err(ResolveError::AliasLoop) => "loops (or expands to over 1000 targets or 20 levels)",
            Err(ResolveError::UnknownUser) => {
                // Stock alias files name system users (root, daemon) that
                // have no mailbox here; mail to such an alias gets 550,
                // except the postmaster's, which gets a mailbox of its own.
                let outcome = if name == "postmaster" {
                    "its mail goes to a \"postmaster\" Maildir".to_string()
                } else {
                    "mail to it will be refused".to_string()
                };
                log::warn!(
                    "{}:{}: no target of alias \"{name}\" has a mailbox here; {outcome}",
                    path.display(),
                    local.aliases.line(name).unwrap_or(0)
                );
                continue;
            }
            Err(ResolveError::RoutingCharacters) => {
                "expands to a local name with routing characters"
            }
        };
        return Err(ConfigError {
            file: Some(path.to_path_buf()),
            line: local.aliases.line(name),
            key: None,
            message: format!("alias \"{name}\" {why}"),
        });
    }
    // Once per target, where it is written: every alias that leads to
    // `root` would otherwise repeat `root`'s stale entry.
    for (n, (alias, target)) in skipped.iter().enumerate() {
        if skipped[..n].iter().any(|(a, t)| a == alias && t == target) {
            continue;
        }
        log::warn!(
            "{}:{}: alias \"{alias}\": target \"{target}\" has no mailbox here; it is skipped",
            path.display(),
            local.aliases.line(alias).unwrap_or(0)
        );
    }
    Ok(())
}

fn system_hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() || name == "(none)" {
        "localhost".to_string()
    } else {
        name.to_string()
    }
}

fn flag_error(flag: &str, message: &str) -> ConfigError {
    ConfigError {
        file: None,
        line: None,
        key: Some(flag.to_string()),
        message: message.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Positions: byte span -> line and dotted key.

/// A dotted key and the span of its key or its value.
type KeySpan = (String, Range<usize>);

struct Ctx<'a> {
    text: &'a str,
    file: Option<&'a Path>,
    /// Every key and value in the document with its dotted path, built on
    /// the first error only.
    keys: OnceCell<Option<Vec<KeySpan>>>,
    /// Whether [`readable`] opens the files it is given.
    open_files: bool,
}

impl Ctx<'_> {
    fn error<T>(&self, at: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error_at(Some(at.span()), message.into())
    }

    fn error_at(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        ConfigError {
            file: self.file.map(Path::to_path_buf),
            line: span.as_ref().map(|s| self.line(s.clone())),
            key: span.and_then(|s| self.key_at(s)),
            message,
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut message = e
            .message()
            .trim()
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        // "expected struct RawLimits" names our private types: say "a table".
        if let Some(at) = message.find("struct Raw") {
            let end = message[at + 7..]
                .find(|c: char| !c.is_ascii_alphanumeric())
                .map_or(message.len(), |i| at + 7 + i);
            message.replace_range(at..end, "a table");
        }
        self.error_at(e.span(), message)
    }

    /// 1-based line of a span's start.
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// The narrowest key or value whose span holds all of `span`; when the
    /// document does not parse at all, a guess from the text of the line.
    fn key_at(&self, span: Range<usize>) -> Option<String> {
        let keys = self.keys.get_or_init(|| {
            let tree: Node = toml::from_str(self.text).ok()?;
            let mut out = Vec::new();
            walk(&tree, "", &mut out);
            Some(out)
        });
        match keys {
            Some(keys) => keys
                .iter()
                .filter(|(_, s)| s.start <= span.start && span.end <= s.end)
                .min_by_key(|(_, s)| s.len())
                .map(|(k, _)| k.clone()),
            None => guess_key(self.text, span.start),
        }
    }
}

/// A document reduced to its spanned keys.
enum Node {
    Table(Vec<(Spanned<String>, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Table(entries))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
}

fn walk(node: &Node, path: &str, out: &mut Vec<KeySpan>) {
    match node {
        Node::Table(entries) => {
            for (key, value) in entries {
                let path = if path.is_empty() {
                    key.get_ref().clone()
                } else {
                    format!("{path}.{}", key.get_ref())
                };
                out.push((path.clone(), key.span()));
                out.push((path.clone(), value.span()));
                walk(value.get_ref(), &path, out);
            }
        }
        Node::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push((path.clone(), item.span()));
                walk(item.get_ref(), &path, out);
            }
        }
        Node::Leaf => {}
    }
}

/// When the document does not parse into the key tree (a syntax error, or a
/// table only implied by a dotted header such as `[local.mailboxes]`, which
/// toml gives no span): the key before `=` on the error's line, under the
/// nearest preceding `[table]` or `[[array]]` header (indexed by counting
/// that header's earlier occurrences).
fn guess_key(text: &str, offset: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let n = text[..offset.min(text.len())].matches('\n').count();
    let header = |i: usize| -> Option<String> {
        if let Some(name) = array_header(lines[i]) {
            let index = lines[..i]
                .iter()
                .filter(|l| array_header(l) == Some(name))
                .count();
            return Some(format!("{name}[{index}]"));
        }
        let (name, _) = lines[i].trim().strip_prefix('[')?.split_once(']')?;
        unquote(name)
    };
    let line = lines.get(n)?.trim();
    if line.starts_with('[') {
        return header(n);
    }
    let key = unquote(line.split_once('=')?.0)?;
    match (0..n)
        .rev()
        .find(|&i| lines[i].trim().starts_with('['))
        .and_then(header)
    {
        Some(table) => Some(format!("{table}.{key}")),
        None => Some(key),
    }
}

/// `[[name]]` -> "name".
fn array_header(line: &str) -> Option<&str> {
    let (name, _) = line.trim().strip_prefix("[[")?.split_once("]]")?;
    Some(name.trim())
}

/// A key as written, without its quotes.
fn unquote(key: &str) -> Option<String> {
    let key = key.trim();
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(key);
    (!key.is_empty()).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::Target;
    use crate::store::testdir::TestDir;

    const FILE: &str = "postling.toml";

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Some(Path::new(FILE)), &Flags::default())
    }

    fn err(text: &str) -> String {
        match p(text) {
            Ok(c) => panic!("expected an error for {text:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A scratch directory for this test, removed when dropped.
    fn scratch(name: &str) -> TestDir {
        TestDir::new(&format!("config-{name}"))
    }

    #[test]
    fn defaults() {
        let c = Config::defaults();
        assert_eq!(c.hostname, system_hostname());
        assert!(!c.hostname.is_empty());
        assert_eq!(c.data_dir, Path::new("./postling-data"));
        assert_eq!(c.listen.len(), 1);
        assert_eq!(c.listen[0].addr, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.listen[0].mode, ListenMode::Smtp);
        let l = &c.limits;
        assert_eq!(
            (
                l.max_message_size,
                l.max_recipients,
                l.max_connections,
                l.max_connections_per_ip
            ),
            (25 << 20, 100, 64, 16)
        );
        assert_eq!(
            (l.command_timeout.as_secs(), l.data_timeout.as_secs()),
            (300, 600)
        );
        assert_eq!((l.max_errors, l.max_received_headers), (10, 50));
        assert_eq!(c.local.domains, ["localhost"]);
        assert_eq!(c.local.maildir_root, Path::new("./postling-data/mail"));
        assert_eq!(c.local.users, None);
        assert!(c.local.mailboxes.is_empty() && c.local.aliases.names().next().is_none());
        let nets: Vec<String> = c.relay.allow_from.iter().map(Cidr::to_string).collect();
        assert_eq!(
            nets,
            [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fd00::/8"
            ]
        );
        assert_eq!(format!("{c:?}"), format!("{:?}", p("").unwrap()));
        assert_eq!(
            format!("{c:?}"),
            format!("{:?}", load(&Flags::default()).unwrap())
        );
        // Empty tables are the same as absent ones.
        assert_eq!(
            format!("{c:?}"),
            format!("{:?}", p("[limits]\n[local]\n[relay]\n").unwrap())
        );
    }

    #[test]
    fn a_client_tool_does_not_open_the_daemons_files() {
        let text = "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n";
        let daemon = parse(text, None, &Flags::default()).unwrap_err();
        assert!(daemon.to_string().contains("cannot read"), "{daemon}");
        let client = Flags {
            client: true,
            ..Flags::default()
        };
        let c = parse(text, None, &client).expect("a client does not open them");
        assert_eq!(c.tls.expect("tls").key, Path::new("/nonexistent/key.pem"));
    }

    #[test]
    fn maildir_mode_and_group() {
        let c = p("[local]\nmode = \"0640\"\ngroup = \"root\"\n").unwrap();
        assert_eq!(
            c.local.sharing,
            Sharing {
                file_mode: 0o640,
                gid: Some(0)
            }
        );
        let c = p("[local]\nmode = 0o644\ngroup = \"4242\"\n").unwrap();
        assert_eq!(
            (c.local.sharing.file_mode, c.local.sharing.gid),
            (0o644, Some(4242))
        );
        assert_eq!(p("").unwrap().local.sharing, Sharing::default());
        for (text, want) in [
            ("mode = \"0755\"", "local.mode: mode 0755 is not allowed"),
            ("mode = \"0646\"", "local.mode: mode 0646 is not allowed"),
            ("mode = \"0400\"", "local.mode: mode 0400 is not allowed"),
            (
                "mode = \"rw-r-----\"",
                "local.mode: invalid mode \"rw-r-----\"",
            ),
            ("mode = 640", "local.mode: mode 1200 is not allowed"),
            (
                "group = \"no-such-group-postling\"",
                "local.group: unknown group",
            ),
        ] {
            let e = p(&format!("[local]\n{text}\n")).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_zero_duration_where_off_is_allowed_means_off() {
        for zero in ["0", "\"0\"", "\"0s\"", "\"0m\"", "\"0h\"", "\"off\""] {
            let c = p(&format!(
                "[limits]\ngreeting_delay = {zero}\n[relay]\ndelay_warning = {zero}\n"
            ))
            .unwrap();
            assert_eq!(c.limits.greeting_delay, None, "{zero}");
            assert_eq!(c.relay.delay_warning, None, "{zero}");
        }
        let c = p("[limits]\ngreeting_delay = \"2s\"\n").unwrap();
        assert_eq!(c.limits.greeting_delay, Some(Duration::from_secs(2)));
    }

    #[test]
    fn every_key() {
        let dir = scratch("every-key");
        let aliases = dir.path().join("aliases");
        std::fs::write(&aliases, "root: alice, bob@example.com\n").unwrap();
        let text = format!(
            r#"
hostname = "pi.lan"
data_dir = "/var/lib/postling"

[[listen]]
addr = "0.0.0.0:25"
mode = "smtp"

[[listen]]
addr = "[::]:2525"

[limits]
max_message_size = "10M"
max_recipients = 200
max_connections = 8
max_connections_per_ip = 2
command_timeout = "30s"
data_timeout = 120
max_errors = 3
max_received_headers = 30

[local]
domains = ["localhost", "Pi.LAN", "pi.lan"]
maildir_root = "/var/mail"
users = ["alice", "Bob"]
mailboxes = {{ Alice = "/home/alice/Maildir" }}
aliases = "{}"

[relay]
allow_from = ["192.168.1.0/24", "2001:db8::/32", "10.1.2.3"]
"#,
            aliases.display()
        );
        let c = p(&text).unwrap();
        assert_eq!(c.hostname, "pi.lan");
        assert_eq!(c.data_dir, Path::new("/var/lib/postling"));
        let listen: Vec<_> = c
            .listen
            .iter()
            .map(|l| (l.addr.to_string(), l.mode))
            .collect();
        assert_eq!(
            listen,
            [
                ("0.0.0.0:25".to_string(), ListenMode::Smtp),
                ("[::]:2525".to_string(), ListenMode::Smtp)
            ]
        );
        let l = &c.limits;
        assert_eq!(
            (
                l.max_message_size,
                l.max_recipients,
                l.max_connections,
                l.max_connections_per_ip
            ),
            (10 << 20, 200, 8, 2)
        );
        assert_eq!(
            (l.command_timeout.as_secs(), l.data_timeout.as_secs()),
            (30, 120)
        );
        assert_eq!((l.max_errors, l.max_received_headers), (3, 30));
        assert_eq!(c.local.domains, ["localhost", "pi.lan"]);
        assert_eq!(c.local.maildir_root, Path::new("/var/mail"));
        assert_eq!(
            c.local.users,
            Some(vec!["alice".to_string(), "bob".to_string()])
        );
        assert_eq!(
            c.local.mailboxes,
            BTreeMap::from([("alice".to_string(), PathBuf::from("/home/alice/Maildir"))])
        );
        assert_eq!(
            c.local.resolve("root", "PI.lan"),
            Ok(vec![
                Target::Mailbox {
                    user: "alice".into(),
                    dir: "/home/alice/Maildir".into()
                },
                Target::Remote("bob@example.com".into())
            ])
        );
        let nets: Vec<String> = c.relay.allow_from.iter().map(Cidr::to_string).collect();
        assert_eq!(nets, ["192.168.1.0/24", "2001:db8::/32", "10.1.2.3/32"]);
        assert!(c.relay.allows("192.168.1.77".parse().unwrap()));
        assert!(!c.relay.allows("127.0.0.1".parse().unwrap()));
        // The same file through `load`.
        let file = dir.path().join("postling.toml");
        std::fs::write(&file, &text).unwrap();
        let loaded = load(&Flags {
            config: Some(file),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(format!("{loaded:?}"), format!("{c:?}"));
    }

    #[test]
    fn flags_override() {
        let text = "data_dir = \"/srv/p\"\n[[listen]]\naddr = \"0.0.0.0:25\"\n";
        let flags = Flags {
            config: None,
            listen: vec!["127.0.0.1:25".parse().unwrap(), "[::1]:25".parse().unwrap()],
            data_dir: Some("/tmp/d".into()),
            client: false,
        };
        let c = parse(text, None, &flags).unwrap();
        let addrs: Vec<String> = c.listen.iter().map(|l| l.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:25", "[::1]:25"]);
        assert!(c.listen.iter().all(|l| l.mode == ListenMode::Smtp));
        assert_eq!(c.data_dir, Path::new("/tmp/d"));
        // --data-dir moves the default maildir_root...
        assert_eq!(c.local.maildir_root, Path::new("/tmp/d/mail"));
        // ...but not an explicit one.
        let c = parse("[local]\nmaildir_root = \"/var/mail\"\n", None, &flags).unwrap();
        assert_eq!(c.local.maildir_root, Path::new("/var/mail"));
        // Without flags the file's values stand.
        let c = p(text).unwrap();
        assert_eq!(
            (c.data_dir.as_path(), c.local.maildir_root.as_path()),
            (Path::new("/srv/p"), Path::new("/srv/p/mail"))
        );
        assert_eq!(c.listen[0].addr.to_string(), "0.0.0.0:25");
        // Flag errors name the flag.
        let dup = Flags {
            listen: vec!["127.0.0.1:25".parse().unwrap(); 2],
            ..Flags::default()
        };
        assert_eq!(
            parse("", None, &dup).unwrap_err().to_string(),
            "--listen: duplicate listen address 127.0.0.1:25"
        );
        let empty = Flags {
            data_dir: Some(PathBuf::new()),
            ..Flags::default()
        };
        assert_eq!(
            parse("", None, &empty).unwrap_err().to_string(),
            "--data-dir: must not be empty"
        );
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        // (file text, expected message prefix)
        let cases: &[(&str, &str)] = &[
            ("[limits]\nmax_message_size = \"25Q\"\n", "postling.toml:2: limits.max_message_size: invalid size \"25Q\" (expected a number with optional K, M or G suffix)"),
            ("[limits]\nmax_message_size = 512\n", "postling.toml:2: limits.max_message_size: must be at least 1K"),
            ("[limits]\ncommand_timeout = 9223372036854775807\n", "postling.toml:2: limits.command_timeout: duration \"9223372036854775807\" is too long"),
            ("[relay]\ndelay_warning = \"400d\"\n", "postling.toml:2: relay.delay_warning: duration \"400d\" is too long"),
            ("[limits]\nmax_message_size = \"-5M\"\n", "postling.toml:2: limits.max_message_size: invalid size \"-5M\""),
            ("[limits]\nmax_message_size = -5\n", "postling.toml:2: limits.max_message_size: -5 is negative"),
            ("[limits]\nmax_message_size = \"99999999999G\"\n", "postling.toml:2: limits.max_message_size: invalid size"),
            ("\n[limits]\ncommand_timeout = \"5x\"\n", "postling.toml:3: limits.command_timeout: invalid duration \"5x\" (expected a number with optional s, m, h or d suffix)"),
            ("[limits]\ndata_timeout = \"0m\"\n", "postling.toml:2: limits.data_timeout: duration must be greater than zero"),
            ("[limits]\ndata_timeout = 0\n", "postling.toml:2: limits.data_timeout: duration must be greater than zero"),
            ("[limits]\ndata_timeout = \"m\"\n", "postling.toml:2: limits.data_timeout: invalid duration \"m\""),
            ("[limits]\ncommand_timeout = 1.5\n", "postling.toml:2: limits.command_timeout: invalid type: floating point `1.5`"),
            ("[limits]\nmax_recipients = 99\n", "postling.toml:2: limits.max_recipients: must be at least 100 (RFC 5321 4.5.3.1.8)"),
            ("[limits]\nmax_recipients = \"x\"\n", "postling.toml:2: limits.max_recipients: invalid type: string \"x\", expected usize"),
            ("[limits]\nmax_connections = 0\n", "postling.toml:2: limits.max_connections: must be at least 1"),
            ("[limits]\nmax_connections_per_ip = -1\n", "postling.toml:2: limits.max_connections_per_ip: invalid value: integer `-1`"),
            ("[limits]\nmax_errors = 0\n", "postling.toml:2: limits.max_errors: must be at least 1"),
            ("[limits]\nmax_received_headers = 0\n", "postling.toml:2: limits.max_received_headers: must be at least 1"),
            ("[limits]\nmax_recipients = 100\nbogus = 1\n", "postling.toml:3: limits.bogus: unknown field `bogus`, expected one of"),
            ("hostname = \"a\"\nbogus = 1\n", "postling.toml:2: bogus: unknown field `bogus`, expected one of `hostname`"),
            ("[bogus]\n", "postling.toml:1: bogus: unknown field `bogus`"),
            ("[local.mailboxes]\nalice = \"/m\"\n[local.bogus]\n", "postling.toml:3: local.bogus: unknown field `bogus`"),
            ("limits = 5\n", "postling.toml:1: limits: invalid type: integer `5`, expected a table"),
            ("hostname = \"a b\"\n", "postling.toml:1: hostname: invalid hostname \"a b\""),
            // toml 0.9 says "duplicate key"; 0.8 added the key, which the prefix already names.
            ("hostname = \"x\"\nhostname = \"y\"\n", "postling.toml:2: hostname: duplicate key"),
            ("data_dir = \"\"\n", "postling.toml:1: data_dir: must not be empty"),
            ("[relay]\nallow_from = [\"10.0.0.0/8\",\n  \"banana\"]\n", "postling.toml:3: relay.allow_from[1]: invalid network \"banana\""),
            ("[relay]\nallow_from = [\"10.0.0.1/8\"]\n", "postling.toml:2: relay.allow_from[0]: invalid network \"10.0.0.1/8\": host bits are set (did you mean \"10.0.0.0/8\"?)"),
            ("[relay]\nallow_from = [\"10.0.0.0/33\"]\n", "postling.toml:2: relay.allow_from[0]: invalid network \"10.0.0.0/33\": prefix length must be 0..=32"),
            ("[relay]\nallow_from = [\"fd00::1/8\"]\n", "postling.toml:2: relay.allow_from[0]: invalid network \"fd00::1/8\": host bits are set (did you mean \"fd00::/8\"?)"),
            ("[[listen]]\naddr = \"0.0.0.0:587\"\nmode = \"submission\"\n", "postling.toml: listen[0].mode: submission on 0.0.0.0:587 needs a [tls] cert and key"),
            ("[[listen]]\naddr = \"0.0.0.0:25\"\nmode = \"lmtp\"\n", "postling.toml:3: listen[0].mode: unknown mode \"lmtp\""),
            ("[[listen]]\naddr = \"0.0.0.0:25\"\n[[listen]]\naddr = \"0.0.0.0:465\"\nmode = \"smtps\"\n", "postling.toml: listen[1].mode: smtps on 0.0.0.0:465 needs a [tls] cert and key"),
            ("[[listen]]\naddr = \"0.0.0.0:25\"\nmode = \"lmtp\"\n", "postling.toml:3: listen[0].mode: unknown mode \"lmtp\" (expected \"smtp\", \"submission\" or \"smtps\")"),
            ("[[listen]]\naddr = \"0.0.0.0\"\n", "postling.toml:2: listen[0].addr: invalid address \"0.0.0.0\" (expected IP:PORT"),
            ("[[listen]]\naddr = \"0.0.0.0:25\"\n\n[[listen]]\naddr = \"0.0.0.0:25\"\n", "postling.toml:5: listen[1].addr: duplicate listen address 0.0.0.0:25 (first on line 2)"),
            ("[[listen]]\nmode = \"smtp\"\n", "postling.toml:1: listen: missing field `addr`"),
            ("[[listen]]\naddr = \"[::]:25\"\nport = 25\n", "postling.toml:3: listen[0].port: unknown field `port`"),
            ("listen = []\n", "postling.toml:1: listen: at least one listener is needed"),
            ("[local]\nmailboxes = { alice = \"Maildir\" }\n", "postling.toml:2: local.mailboxes.alice: mailbox path \"Maildir\" must be absolute"),
            ("[local.mailboxes]\nbob = \"/b\"\nalice = \"rel/dir\"\n", "postling.toml:3: local.mailboxes.alice: mailbox path \"rel/dir\" must be absolute"),
            ("[local]\nmailboxes = { \"../x\" = \"/b\" }\n", "postling.toml:2: local.mailboxes.../x: invalid user name \"../x\""),
            ("[local]\nusers = [\"ok\", \"bad/name\"]\n", "postling.toml:2: local.users[1]: invalid user name \"bad/name\""),
            ("[local]\ndomains = [\"pi.lan\", \"bad_domain\"]\n", "postling.toml:2: local.domains[1]: invalid domain \"bad_domain\""),
            ("[local]\ndomains = []\n", "postling.toml: local.domains: needs at least one domain (bare names and <Postmaster> use the first)"),
            ("[local]\nmaildir_root = \"\"\n", "postling.toml:2: local.maildir_root: must not be empty"),
            ("data_dir = \"/var/lib/postling\"\n[local]\nmaildir_root = \"/var/lib/postling/\"\n", "postling.toml:3: local.maildir_root: must not be data_dir or inside its incoming/"),
            ("data_dir = \"/var/lib/postling\"\n[local]\nmaildir_root = \"/var/lib/./postling/queue/x\"\n", "postling.toml:3: local.maildir_root: must not be data_dir or inside its incoming/"),
            ("data_dir = \"/d\"\n[local.mailboxes]\nalice = \"/d/incoming\"\n", "postling.toml:3: local.mailboxes.alice: must not be data_dir or inside its incoming/"),
            ("data_dir = \"/d\"\n[local.mailboxes]\nalice = \"/d/maildrop/x\"\n", "postling.toml:3: local.mailboxes.alice: must not be data_dir or inside its incoming/"),
            ("[local]\naliases = \"/nonexistent/aliases\"\n", "postling.toml:2: local.aliases: cannot read \"/nonexistent/aliases\": No such file or directory"),
            ("[limits]\nmax_recipients = 10 0\n", "postling.toml:2: limits.max_recipients: string values must be quoted"),
            ("hostname = \"x\n", "postling.toml:1: hostname: invalid basic string"),
            // Dotted headers leave `local` without a span: the line-based fallback names the key.
            ("[local.mailboxes]\nalice = \"/a\"\n\"b c\" = \"/b\"\n", "postling.toml:3: local.mailboxes.b c: invalid user name \"b c\""),
            ("[local.mailboxes]\nalice = \"/a\"\n[[listen]]\naddr = \"[::]:25\"\n[[listen]]\naddr = \"[::]:26\"\nmode = \"lmtp\"\n", "postling.toml:7: listen[1].mode: unknown mode \"lmtp\""),
            ("[[listen]]\naddr = \"[::]:25\"\n[[listen]]\naddr = \"[::]:26\" x\n", "postling.toml:4: listen[1].addr: unexpected key or value, expected newline"),
            ("[[listen]]\naddr = \"[::]:25\"\n[[listen]]\naddr = \"[::]:26\"\n[[ listen ]] x\n", "postling.toml:5: listen[2]: "),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                got.starts_with(want),
                "input {text:?}\n  got:  {got}\n  want: {want}"
            );
        }
        // Keys that differ only in case: reported on one of the two lines.
        let got = err("[local.mailboxes]\nalice = \"/a\"\nALICE = \"/b\"\n");
        assert!(
            got.contains(": local.mailboxes.")
                && got.ends_with("has two mailboxes (names are case-insensitive)"),
            "{got}"
        );
    }

    #[test]
    fn error_display_omits_missing_parts() {
        let e = |file: Option<&str>, line, key: Option<&str>| {
            ConfigError {
                file: file.map(PathBuf::from),
                line,
                key: key.map(String::from),
                message: "m".into(),
            }
            .to_string()
        };
        assert_eq!(e(Some("f.toml"), Some(7), Some("a.b")), "f.toml:7: a.b: m");
        assert_eq!(e(Some("f.toml"), None, Some("a.b")), "f.toml: a.b: m");
        assert_eq!(e(Some("f.toml"), Some(7), None), "f.toml:7: m");
        assert_eq!(e(None, Some(7), Some("k")), "line 7: k: m");
        assert_eq!(e(None, None, None), "m");
        // Without a file name errors still carry line and key.
        let got = parse("[limits]\nmax_recipients = 5\n", None, &Flags::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            got,
            "line 2: limits.max_recipients: must be at least 100 (RFC 5321 4.5.3.1.8)"
        );
    }

    #[test]
    fn missing_config_file() {
        let flags = Flags {
            config: Some("/etc/x-postling-missing.toml".into()),
            ..Flags::default()
        };
        assert_eq!(
            load(&flags).unwrap_err().to_string(),
            "/etc/x-postling-missing.toml: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn aliases_file_errors() {
        let dir = scratch("aliases");
        let cases: &[(&str, &str, &str)] = &[
            // (aliases text, users line, expected error after the aliases path)
            (
                "root: alice\nlog: |/usr/bin/logger\n",
                "",
                ":2: \"|/usr/bin/logger\": pipes to commands are not supported",
            ),
            ("a: b\nb: c\nc: a\n", "", ":1: alias \"a\" loops"),
            // Stock alias files name users without a mailbox: a warning, not
            // an error (mail to such an alias gets 550 at RCPT).
            (
                "root: alice, carol\npostmaster: root\n",
                "users = [\"alice\"]",
                "",
            ),
            (
                "root: alice, bob@example.com\nalice: alice, alice@pi.lan\n",
                "users = [\"alice\"]",
                "",
            ),
        ];
        for (i, (aliases, users, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("aliases{i}"));
            std::fs::write(&path, aliases).unwrap();
            let text = format!(
                "[local]\ndomains = [\"pi.lan\"]\n{users}\naliases = \"{}\"\n",
                path.display()
            );
            match (p(&text), want.is_empty()) {
                (Ok(_), true) => {}
                (Err(e), false) => {
                    let got = e.to_string();
                    assert!(
                        got.starts_with(&format!("{}{want}", path.display())),
                        "case {i}: {got}"
                    );
                }
                (got, _) => panic!("case {i}: {got:?}"),
            }
        }
    }

    #[test]
    fn sizes_and_durations() {
        let sizes: &[(&str, Option<u64>)] = &[
            ("512", Some(512)),
            ("64K", Some(65536)),
            ("64k", Some(65536)),
            ("25M", Some(25 << 20)),
            ("1G", Some(1 << 30)),
            ("", None),
            ("K", None),
            ("1.5M", None),
            (" 1M", None),
            ("1MB", None),
            ("+1", None),
            ("1T", None),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551615K", None),
        ];
        for (s, want) in sizes {
            assert_eq!(parse_size(s), *want, "{s:?}");
        }
        let secs: &[(&str, Option<u64>)] = &[
            ("30", Some(30)),
            ("30s", Some(30)),
            ("5m", Some(300)),
            ("1h", Some(3600)),
            ("2d", Some(172800)),
            ("", None),
            ("m", None),
            ("5 m", None),
            ("5M", None),
            ("1w", None),
            ("-1s", None),
            ("1.5h", None),
        ];
        for (s, want) in secs {
            assert_eq!(parse_duration(s).map(|d| d.as_secs()), *want, "{s:?}");
        }
        // Integers are bytes and seconds.
        let c = p("[limits]\nmax_message_size = 2048\ncommand_timeout = 45\n").unwrap();
        assert_eq!(
            (
                c.limits.max_message_size,
                c.limits.command_timeout.as_secs()
            ),
            (2048, 45)
        );
    }

    #[test]
    fn cidr_contains() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("::1/128", "::1", true),
            ("::1", "::2", false),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            // IPv4-mapped IPv6 peers match IPv4 networks
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
            ("192.168.0.0/16", "::ffff:192.168.3.4", true),
            ("192.168.0.0/16", "::ffff:10.0.0.1", false),
            ("10.0.0.0/8", "::10.0.0.1", false), // IPv4-compatible, not mapped
            ("::ffff:0:0/96", "1.2.3.4", true),
            ("::1/128", "127.0.0.1", false),
        ];
        for (net, ip, want) in cases {
            let cidr: Cidr = net.parse().unwrap();
            assert_eq!(
                cidr.contains(ip.parse().unwrap()),
                *want,
                "{net} contains {ip}"
            );
        }
    }

    #[test]
    fn networks_too_wide_for_allow_from() {
        for (net, wide) in [
            ("0.0.0.0/0", true),
            ("0.0.0.0/1", true),
            ("128.0.0.0/1", true),
            ("8.0.0.0/7", true),
            ("10.0.0.0/8", false),
            ("192.168.0.0/16", false),
            ("::/0", true),
            ("::/1", true),
            ("::/80", true),
            ("::ffff:0.0.0.0/96", true),
            ("::ffff:16.0.0.0/100", true),
            ("::ffff:10.0.0.0/104", false),
            ("::ffff:192.168.1.0/120", false),
            ("2000::/3", true),
            ("2001:db8::/32", false),
            ("2002::/16", true),
            ("2002:c000:200::/40", false),
            ("2001::/32", true),
            ("2001::/16", true),
            ("2001::/31", true),
            ("fd00::/8", false),
            ("fc00::/7", false),
            ("fe80::/10", false),
            ("::1/128", false),
        ] {
            let cidr: Cidr = net.parse().expect("network");
            assert_eq!(cidr.is_too_wide(), wide, "{net}");
        }
    }

    #[test]
    fn cidr_parse_and_display() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            ("10.0.0.1", Ok("10.0.0.1/32")),
            ("::1", Ok("::1/128")),
            ("FD00::/8", Ok("fd00::/8")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            (
                "10.0.0.1/8",
                Err("host bits are set (did you mean \"10.0.0.0/8\"?)"),
            ),
            ("10.0.0.0/33", Err("prefix length must be 0..=32")),
            ("::/129", Err("prefix length must be 0..=128")),
            ("10.0.0.0/", Err("expected an address")),
            ("10.0.0.0/+8", Err("expected an address")),
            ("10.0.0/8", Err("expected an address")),
            ("[::1]/128", Err("expected an address")),
            ("", Err("expected an address")),
        ];
        for (s, want) in cases {
            let got = s
                .parse::<Cidr>()
                .map(|c| c.to_string())
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{s:?}: {got}"),
                (got, _) => panic!("{s:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn relay_keys() {
        let dir = scratch("relay-secret");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "hunter2\n").expect("secret");
        let text = format!(
            "[relay]\nsmarthost = \"smtp.example.net\"\nsmarthost_tls = \"implicit\"\nsmarthost_user = \"me@example.net\"\nsmarthost_password_file = \"{}\"\nrewrite_from = \"me@example.net\"\nretry = [\"30s\", \"2m\"]\nmax_queue_time = \"1d\"\ndelay_warning = \"off\"\ndns_servers = [\"127.0.0.1:5353\", \"::1\"]\nmx_port = 2526\ndouble_bounce_to_postmaster = true\nconnect_timeout = 5\n",
            secret.display()
        );
        let r = p(&text).expect("valid").relay;
        let sh = r.smarthost.expect("smarthost");
        assert_eq!(
            (sh.host.as_str(), sh.port, sh.tls),
            ("smtp.example.net", 465, SmarthostTls::Implicit)
        );
        assert_eq!(sh.auth.expect("auth").0, "me@example.net");
        assert_eq!(r.rewrite_from.as_deref(), Some("me@example.net"));
        assert_eq!(r.retry, [Duration::from_secs(30), Duration::from_secs(120)]);
        assert_eq!(r.max_queue_time, Duration::from_secs(86_400));
        assert_eq!(r.delay_warning, None);
        assert_eq!(
            r.dns_servers,
            [
                "127.0.0.1:5353".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        assert_eq!((r.mx_port, r.double_bounce_to_postmaster), (2526, true));
        assert_eq!(r.connect_timeout, Duration::from_secs(5));
        let d = p("").expect("defaults").relay;
        assert!(d.smarthost.is_none());
        assert_eq!(
            (d.retry.len(), d.delay_warning, d.mx_port),
            (7, Some(Duration::from_secs(14_400)), 25)
        );
        let plain = p("[relay]\nsmarthost = \"[2001:db8::1]\"\nsmarthost_tls = \"none\"\n")
            .expect("valid")
            .relay;
        assert_eq!(
            plain.smarthost.map(|s| (s.host, s.port)),
            Some(("2001:db8::1".into(), 25))
        );
    }

    #[test]
    fn bad_relay_keys() {
        let cases = [
            ("[relay]\nsmarthost = \"a b\"\n", "postling.toml:2: relay.smarthost: invalid smarthost"),
            ("[relay]\nsmarthost = \"h:0\"\n", "postling.toml:2: relay.smarthost: invalid smarthost"),
            ("[relay]\nsmarthost = \"h\"\nsmarthost_tls = \"maybe\"\n", "postling.toml:3: relay.smarthost_tls: invalid value"),
            ("[relay]\nsmarthost_tls = \"none\"\n", "postling.toml:2: relay.smarthost_tls: needs relay.smarthost"),
            ("[relay]\nsmarthost = \"h\"\nsmarthost_user = \"u\"\n", "postling.toml:3: relay.smarthost_user: needs relay.smarthost_password_file"),
            ("[relay]\nsmarthost = \"h\"\nsmarthost_user = \"u\"\nsmarthost_password_file = \"/nonexistent/secret\"\n", "postling.toml:4: relay.smarthost_password_file: cannot read"),
            ("[relay]\nretry = []\n", "postling.toml:2: relay.retry: needs at least one interval"),
            ("[relay]\nretry = [\"1m\", \"soon\"]\n", "postling.toml:2: relay.retry"),
            ("[relay]\ndelay_warning = \"later\"\n", "postling.toml:2: relay.delay_warning: invalid duration"),
            ("[relay]\ndns_servers = [\"dns.google\"]\n", "postling.toml:2: relay.dns_servers[0]: invalid name server"),
            ("[relay]\nmx_port = 0\n", "postling.toml:2: relay.mx_port: must be a port number"),
            ("[relay]\nrewrite_from = \"nobody\"\n", "postling.toml:2: relay.rewrite_from: invalid address"),
            ("[relay]\nca_file = \"/nonexistent/ca.pem\"\n", "postling.toml:2: relay.ca_file: cannot read"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "{text}: {got}");
        }
    }
}
