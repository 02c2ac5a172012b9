//! One question every blocking loop asks: did this I/O error only mean
//! "nothing yet"? A socket read timeout shows up as `WouldBlock` or
//! `TimedOut` depending on the platform, and a signal as `Interrupted`; all
//! three mean "look at the deadline and try again", never "the peer failed".

use std::io;
use std::mem::MaybeUninit;
use std::net::TcpStream;

use socket2::SockRef;

pub fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// How many bytes are waiting on `stream` right now, without blocking and
/// without consuming them: `Ok(0)` at end of file, `WouldBlock` when nothing
/// has arrived. One `recv(MSG_PEEK | MSG_DONTWAIT)`, so the socket stays in
/// blocking mode (no two extra calls to switch it back and forth).
pub fn peek_now(stream: &TcpStream) -> io::Result<usize> {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    SockRef::from(stream).recv_with_flags(&mut probe, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}
