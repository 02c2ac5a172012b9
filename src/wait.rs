//! One question every blocking loop asks: did this I/O error only mean
//! "nothing yet"? A socket read timeout shows up as `WouldBlock` or
//! `TimedOut` depending on the platform, and a signal as `Interrupted`; all
//! three mean "look at the deadline and try again", never "the peer failed".

use std::io;

pub fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
