//! When to try a queued message again, and when to give up.
//!
//! Pure functions of the stored envelope (attempt count, last try, arrival)
//! and `now`, so tests need no clock and no sleeping (STYLE habit 4). They
//! are built to survive a clock that jumps, as on a Pi without an RTC that
//! boots in 1970 and then syncs NTP:
//! - a jump forward makes a message due at once, but cannot expire it or send
//!   the delay notice early: both also need the number of attempts the retry
//!   schedule makes in that time;
//! - a jump backward (last try "in the future") counts the wait from `now`,
//!   so the queue never stalls.

use std::time::Duration;

use crate::store::envelope::Envelope;

#[derive(Debug, Clone)]
pub struct Schedule {
    /// Waits after attempt 1, 2, ...; the last one repeats.
    pub retry: Vec<Duration>,
    pub max_queue_time: Duration,
    pub delay_warning: Option<Duration>,
}

impl Schedule {
    /// The wait after `attempts` attempts (1-based; 0 means "never tried").
    pub fn interval(&self, attempts: u32) -> u64 {
        let i = (attempts.max(1) - 1) as usize;
        self.retry
            .get(i)
            .or(self.retry.last())
            .map_or(60, Duration::as_secs)
    }

    /// Unix second at which the next attempt is due (0: at once). Also due
    /// when the delay notice or expiry falls due before the next retry, so
    /// neither waits for the next (possibly hours away) attempt.
    pub fn next_due(&self, env: &Envelope, now: u64) -> u64 {
        if env.attempts == 0 {
            return 0;
        }
        let last = env.tried.min(now);
        let mut due = last.saturating_add(self.interval(env.attempts));
        let mut consider = |span: Duration| {
            let at = env.arrived.saturating_add(span.as_secs());
            if env.attempts >= self.attempts_within(span) && at > last {
                due = due.min(at);
            }
        };
        consider(self.max_queue_time);
        if let (Some(after), false) = (self.delay_warning, env.warned) {
            consider(after);
        }
        due
    }

    /// How many attempts the schedule makes in `span` from arrival (the
    /// first at once, then one after each interval).
    fn attempts_within(&self, span: Duration) -> u32 {
        let span = span.as_secs();
        let (mut t, mut n) = (0u64, 1u32);
        while n < 10_000 {
            t = t.saturating_add(self.interval(n));
            if t > span {
                break;
            }
            n += 1;
        }
        n
    }

    fn aged(&self, env: &Envelope, now: u64, span: Duration) -> bool {
        now.saturating_sub(env.arrived) >= span.as_secs()
            && env.attempts >= self.attempts_within(span)
    }

    /// Time to give up on the recipients still not delivered.
    pub fn expired(&self, env: &Envelope, now: u64) -> bool {
        self.aged(env, now, self.max_queue_time)
    }

    /// Time to send the one "delivery delayed" notice.
    pub fn should_warn(&self, env: &Envelope, now: u64) -> bool {
        match self.delay_warning {
            Some(after) => !env.warned && self.aged(env, now, after),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        let m = |n: u64| Duration::from_secs(60 * n);
        Schedule {
            retry: vec![m(1), m(5), m(15), m(30), m(60), m(120), m(240)],
            max_queue_time: m(5 * 24 * 60),
            delay_warning: Some(m(240)),
        }
    }

    fn env(arrived: u64, attempts: u32, tried: u64) -> Envelope {
        let mut e = Envelope::new("ID", arrived, "a@b", String::new(), &["c@d"]);
        e.attempts = attempts;
        e.tried = tried;
        e
    }

    #[test]
    fn intervals_then_the_last_repeats() {
        let s = schedule();
        let got: Vec<u64> = (1..=9).map(|n| s.interval(n) / 60).collect();
        assert_eq!(got, [1, 5, 15, 30, 60, 120, 240, 240, 240]);
    }

    #[test]
    fn next_due_follows_the_schedule() {
        let s = schedule();
        assert_eq!(s.next_due(&env(1000, 0, 0), 1000), 0);
        assert_eq!(s.next_due(&env(1000, 1, 1000), 1001), 1060);
        assert_eq!(s.next_due(&env(1000, 3, 5000), 5001), 5000 + 900);
    }

    #[test]
    fn delay_notice_and_expiry_fall_due_on_time() {
        let s = schedule();
        // Seven attempts by 3h51m; the next retry would be at 7h51m, but the
        // 4h notice is due at 4h.
        let e = env(0, 7, 3 * 3600 + 51 * 60);
        assert_eq!(s.next_due(&e, e.tried), 4 * 3600);
        let mut warned = e.clone();
        warned.warned = true;
        assert_eq!(s.next_due(&warned, e.tried), e.tried + 4 * 3600);
        // Likewise expiry at 5 days.
        let needed = s.attempts_within(s.max_queue_time);
        let last = 5 * 86_400 - 3600;
        let mut e = env(0, needed, last);
        e.warned = true;
        assert_eq!(s.next_due(&e, last), 5 * 86_400);
    }

    #[test]
    fn clock_jumping_back_does_not_stall() {
        let s = schedule();
        // Last try stamped at 2026 time; now the clock says 1970 + a bit.
        let e = env(1_795_000_000, 2, 1_795_000_100);
        assert_eq!(s.next_due(&e, 5_000), 5_000 + 300);
    }

    #[test]
    fn clock_jumping_forward_does_not_expire_or_warn_early() {
        let s = schedule();
        // Queued at "1970" (clock not set yet), tried twice, now NTP says 2026.
        let e = env(100, 2, 200);
        let now = 1_795_000_000;
        assert!(!s.expired(&e, now));
        assert!(!s.should_warn(&e, now));
        assert!(s.next_due(&e, now) <= now, "due at once");
    }

    #[test]
    fn expires_after_max_queue_time_and_enough_attempts() {
        let s = schedule();
        let five_days = 5 * 86_400;
        let needed = s.attempts_within(s.max_queue_time);
        assert!((30..=40).contains(&needed), "{needed}");
        assert!(!s.expired(&env(0, needed, five_days), five_days - 1));
        assert!(!s.expired(&env(0, needed - 1, five_days), five_days));
        assert!(s.expired(&env(0, needed, five_days), five_days));
    }

    #[test]
    fn warns_once_after_four_hours() {
        let s = schedule();
        let four_h = 4 * 3600;
        let needed = s.attempts_within(Duration::from_secs(four_h));
        assert_eq!(needed, 7, "at 0, 1m, 6m, 21m, 51m, 1h51m, 3h51m");
        assert!(s.should_warn(&env(0, needed, four_h), four_h));
        assert!(!s.should_warn(&env(0, needed, four_h), four_h - 1));
        let mut warned = env(0, needed, four_h);
        warned.warned = true;
        assert!(!s.should_warn(&warned, four_h));
        let off = Schedule {
            delay_warning: None,
            ..schedule()
        };
        assert!(!off.should_warn(&env(0, needed, four_h), four_h));
    }
}
