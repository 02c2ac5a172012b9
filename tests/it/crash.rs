//! The durability guarantee: a server killed with SIGKILL while clients are
//! sending has, after restart, every message it acknowledged with 250 in a
//! Maildir or in the queue. Duplicates would be acceptable; a loss never is.

use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{Client, Server, TempDir};

/// Every stored message (Maildir files and queued messages) as text.
fn everything_stored(s: &Server) -> String {
    let mut all = String::new();
    for m in s.mail("alice") {
        all.push_str(&String::from_utf8_lossy(&m));
    }
    for (id, _) in s.queue() {
        let m = s.queued_message(&id);
        all.push_str(&String::from_utf8_lossy(&m));
    }
    all
}

#[test]
fn sigkill_while_sending_loses_nothing_acknowledged() {
    let dir = TempDir::new();
    let mut s = Server::start(&dir, "[local]\ndomains = [\"localhost\"]\n");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for t in 0..4 {
        let (addr, acked, count, stop) = (
            s.addr,
            Arc::clone(&acked),
            Arc::clone(&count),
            Arc::clone(&stop),
        );
        senders.push(thread::spawn(move || {
            let mut c = Client::connect(addr);
            if !c.cmd("EHLO crash.test").starts_with("250") {
                return;
            }
            // Bounded: at most 500 messages per sender.
            for n in 0..500 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let token = format!("token-{t}-{n}");
                let to = if n % 2 == 0 {
                    "alice@localhost"
                } else {
                    "x@example.com"
                };
                let script = format!("MAIL FROM:<a@crash.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n");
                if c.stream.write_all(script.as_bytes()).is_err() {
                    return;
                }
                let replies = [c.reply(), c.reply(), c.reply()];
                if !replies[2].starts_with("354") {
                    return;
                }
                let body = format!(
                    "Subject: {token}\r\n\r\n{}\r\n.\r\n",
                    "0123456789".repeat(8) + &"\r\n0123456789".repeat(200)
                );
                if c.stream.write_all(body.as_bytes()).is_err() {
                    return;
                }
                if c.reply().starts_with("250") {
                    acked.lock().expect("lock").push(token);
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    return; // the server died under us
                }
            }
        }));
    }
    // Kill once a fair number were acknowledged, or after 5 s at the most.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::Relaxed) < 40 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    s.kill();
    stop.store(true, Ordering::Relaxed);
    for t in senders {
        t.join().expect("sender thread");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );

    let s2 = Server::start_at(
        dir.path(),
        "[local]\ndomains = [\"localhost\"]\n",
        "127.0.0.1:0",
    );
    let stored = everything_stored(&s2);
    let lost: Vec<&String> = acked
        .iter()
        .filter(|t| !stored.contains(&format!("Subject: {t}\r\n")))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    // Nothing half-written survives the restart: no spool, and every
    // message a mail reader can see (in new/) is whole. Local mail is
    // written straight into tmp/, so a message cut off by the kill may sit
    // there; readers never look at tmp/ and it is swept after 36 hours.
    // (The restarted relay writes updated envelopes through incoming/ as
    // `<id>.env`, briefly: those are not spools.)
    let spools: Vec<String> = fs::read_dir(s2.data.join("incoming"))
        .expect("incoming")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".env"))
        .collect();
    assert!(spools.is_empty(), "spools survived the restart: {spools:?}");
    let whole_body = format!("{}\r\n", "\r\n0123456789".repeat(200));
    for m in s2.mail("alice") {
        let text = String::from_utf8_lossy(&m);
        assert!(
            text.ends_with(&whole_body),
            "a partial message is visible in new/: {} bytes",
            m.len()
        );
    }
}
