//! Connection caps and deadlines: a hostile client gets a clear 421 and the
//! other sessions keep working.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{Client, Server, TempDir};

#[test]
fn per_ip_cap_answers_421_and_frees_slots() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\nmax_connections_per_ip = 2\n");
    let mut a = s.client();
    let b = s.client();
    let mut third = Client::connect(s.addr);
    assert_eq!(
        third.greeting,
        "421 4.3.2 Too many connections from your address, try again later"
    );
    assert!(third.is_closed());
    // The held sessions still work, and a slot frees when one ends.
    assert!(a.cmd("NOOP").starts_with("250"));
    drop(b);
    let ok = crate::util::wait_for(Duration::from_secs(5), || {
        Client::connect(s.addr).greeting.starts_with("220")
    });
    assert!(ok);
}

#[test]
fn total_cap_answers_421() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\nmax_connections = 3\n");
    let held: Vec<Client> = (0..3).map(|_| s.client()).collect();
    let mut over = Client::connect(s.addr);
    assert_eq!(
        over.greeting,
        "421 4.3.2 Too many connections, try again later"
    );
    assert!(over.is_closed());
    drop(held);
}

#[test]
fn idle_client_is_closed_with_421_after_command_timeout() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\ncommand_timeout = \"2s\"\n");
    let mut idle = s.client();
    let mut busy = s.client();
    let started = Instant::now();
    // The other session keeps working meanwhile.
    for _ in 0..5 {
        assert!(busy.cmd("NOOP").starts_with("250"));
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        idle.reply(),
        "421 4.4.2 Timeout exceeded, closing connection"
    );
    assert!(idle.is_closed());
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn trickling_client_hits_the_per_command_deadline() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\ncommand_timeout = \"2s\"\n");
    let mut c = s.client();
    let mut w: TcpStream = c.stream.try_clone().expect("clone");
    let started = Instant::now();
    // One byte every 300 ms never completes a line inside the deadline, though
    // the connection is never idle for long (slowloris).
    let trickle = thread::spawn(move || {
        for b in b"NOOP and a very long trickle".iter().take(20) {
            if w.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    assert_eq!(c.reply(), "421 4.4.2 Timeout exceeded, closing connection");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "deadline not enforced: {took:?}"
    );
    trickle.join().expect("trickle thread");
}

#[test]
fn stalled_data_hits_the_data_deadline_and_nothing_is_delivered() {
    let dir = TempDir::new();
    let s = Server::start(&dir, "[limits]\ndata_timeout = \"2s\"\n");
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@localhost>");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: never finished\r\n\r\npartial");
    assert_eq!(c.reply(), "421 4.4.2 Timeout exceeded, closing connection");
    assert!(s.mail("alice").is_empty());
    assert!(s.nothing_unfinished(), "abandoned message left behind");
}

/// A message past max_message_size earns no more DATA time: a client that
/// keeps sending 2 KB a second, each second within data_timeout, is cut
/// off once the allowance for the largest message (4 KiB: 4 s) and the
/// timeout are used up, instead of never.
#[test]
fn an_oversized_trickle_does_not_stretch_the_data_deadline() {
    let dir = TempDir::new();
    let s = Server::start(
        &dir,
        "[limits]\ndata_timeout = \"3s\"\nmax_message_size = \"4K\"\n",
    );
    let mut c = s.client();
    c.cmd("EHLO client.test");
    c.cmd("MAIL FROM:<a@b.test>");
    c.cmd("RCPT TO:<alice@localhost>");
    assert!(c.cmd("DATA").starts_with("354"));
    let mut w: TcpStream = c.stream.try_clone().expect("clone");
    // At most 60 s of it: the cut-off comes at about 7 s.
    let trickle = thread::spawn(move || {
        let line = format!("{}\r\n", "x".repeat(998));
        for _ in 0..120 {
            if w.write_all(line.as_bytes()).is_err() {
                return false;
            }
            thread::sleep(Duration::from_millis(500));
        }
        true
    });
    // Too big whatever else happens: refused for good, not "try later".
    assert!(c.reply().starts_with("552 5.3.4"));
    drop(c);
    assert!(!trickle.join().expect("trickle thread"), "never cut off");
    assert!(s.mail("alice").is_empty());
}
