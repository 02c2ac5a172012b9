//! systemd readiness and watchdog notifications (sd_notify(3) protocol,
//! without libsystemd): datagrams to the socket named by `$NOTIFY_SOCKET`.
//!
//! Owns only the wire protocol. `READY=1` is sent once every listener is
//! bound and the relay thread runs; with `WatchdogSec=` set, the acceptor's
//! poll loop itself sends `WATCHDOG=1` at half the interval, so a stuck
//! acceptor gets the service restarted (a stuck relay thread does not).
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) it does
//! nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use log::{debug, warn};

/// Sends one notification (e.g. "READY=1"); Ok(false) when not under systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        // An abstract socket name (Linux).
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    debug!("sd_notify: {state}");
    Ok(true)
}

/// The watchdog interval asked for by systemd (`$WATCHDOG_USEC`, for this
/// process per `$WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Logs instead of failing: notifications are best effort.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        warn!("sd_notify {state}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_watchdog_interval_only_for_us() {
        // Environment variables are process-wide: this is the only test
        // that touches these two.
        std::env::set_var("WATCHDOG_USEC", "4000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(4)));
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        assert_eq!(watchdog_interval(), None);
    }
}
