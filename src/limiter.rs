//! Counting events per client address in a sliding window: failed AUTH
//! attempts (per hour) and accepted messages (per minute).
//!
//! Owns only the counting; what is counted and what happens over the limit
//! is the caller's. Memory is bounded: at most `MAX_ADDRESSES` addresses
//! and, per address, no more timestamps than the limit asked about.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered at most; past it, expired entries go, and if that
/// is not enough the address whose last event is oldest (forgetting is the
/// safe direction for a home server: it never blocks anyone wrongly; and a
/// flood of fresh addresses cannot wipe out the count of one that is busy
/// now).
const MAX_ADDRESSES: usize = 4096;

#[derive(Debug)]
pub struct PerIp {
    window: Duration,
    events: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl PerIp {
    pub fn new(window: Duration) -> PerIp {
        PerIp {
            window,
            events: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<IpAddr, VecDeque<Instant>>) -> T) -> T {
        // Plain data: a panicking holder leaves it usable.
        let mut map = self.events.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    fn prune(&self, times: &mut VecDeque<Instant>, now: Instant) {
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
    }

    /// Events from `ip` within the window.
    pub fn count(&self, ip: IpAddr) -> usize {
        let now = Instant::now();
        self.with(|map| match map.get_mut(&ip) {
            Some(times) => {
                self.prune(times, now);
                times.len()
            }
            None => 0,
        })
    }

    /// True when `ip` has `max` or more events in the window.
    pub fn blocked(&self, ip: IpAddr, max: u32) -> bool {
        self.count(ip) >= max as usize
    }

    /// Records one event for `ip`, keeping at most `keep` timestamps.
    pub fn record(&self, ip: IpAddr) {
        self.record_bounded(ip, usize::MAX);
    }

    fn record_bounded(&self, ip: IpAddr, keep: usize) {
        let now = Instant::now();
        self.with(|map| {
            if map.len() >= MAX_ADDRESSES && !map.contains_key(&ip) {
                map.retain(|_, times| {
                    times
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < self.window)
                });
                if map.len() >= MAX_ADDRESSES {
                    let stalest = map
                        .iter()
                        .min_by_key(|(_, times)| times.back().copied())
                        .map(|(ip, _)| *ip);
                    if let Some(ip) = stalest {
                        map.remove(&ip);
                    }
                }
            }
            let times = map.entry(ip).or_default();
            self.prune(times, now);
            times.push_back(now);
            while times.len() > keep.max(1) {
                times.pop_front();
            }
        });
    }

    /// Rate limiting: records and allows the event unless `ip` already had
    /// `max` in the window. `max` 0 means no limit.
    pub fn allow(&self, ip: IpAddr, max: u32) -> bool {
        if max == 0 {
            return true;
        }
        if self.blocked(ip, max) {
            return false;
        }
        self.record_bounded(ip, max as usize);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_within_the_window() {
        let l = PerIp::new(Duration::from_secs(3600));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            l.record(a);
        }
        assert!(l.blocked(a, 3));
        assert!(!l.blocked(a, 4));
        assert!(!l.blocked(b, 1));
    }

    #[test]
    fn expired_events_do_not_count() {
        let l = PerIp::new(Duration::ZERO);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        l.record(a);
        assert_eq!(l.count(a), 0);
    }

    #[test]
    fn rate_limit_allows_up_to_max() {
        let l = PerIp::new(Duration::from_secs(60));
        let a: IpAddr = "::1".parse().expect("ip");
        assert!((0..5).all(|_| l.allow(a, 5)));
        assert!(!l.allow(a, 5));
        assert!((0..100).all(|_| l.allow(a, 0)), "0 means no limit");
    }

    #[test]
    fn memory_is_bounded() {
        let l = PerIp::new(Duration::from_secs(60));
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            l.record(IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.with(|m| m.len()) <= MAX_ADDRESSES);
    }

    #[test]
    fn a_flood_of_new_addresses_does_not_wipe_a_busy_ones_count() {
        let l = PerIp::new(Duration::from_secs(3600));
        let busy: IpAddr = "192.0.2.1".parse().expect("literal");
        l.record(IpAddr::from(0u32.to_be_bytes()));
        for _ in 0..5 {
            l.record(busy);
        }
        for i in 1..(MAX_ADDRESSES as u32 + 100) {
            l.record(IpAddr::from(i.to_be_bytes()));
            if i % 512 == 0 {
                l.record(busy);
            }
        }
        assert!(l.count(busy) >= 5, "{}", l.count(busy));
        assert!(l.with(|m| m.len()) <= MAX_ADDRESSES);
    }
}
