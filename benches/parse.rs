//! `cargo bench --bench parse`: the SMTP command parser and the DATA
//! decoder on their own, without sockets or disk. A plain `harness = false`
//! benchmark (no extra dependency): each case runs for about a second after
//! a warm-up and prints time per item and throughput. tests/alloc.rs proves
//! the parser allocates nothing; this file only measures speed.

use std::hint::black_box;
use std::time::{Duration, Instant};

use postling::smtp::command::Command;
use postling::smtp::data::DataDecoder;

/// Runs `f` repeatedly for about `budget` and returns the time per call.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> Duration {
    // Warm-up, and a first estimate of how many calls fit in the budget.
    let start = Instant::now();
    let mut calls: u32 = 0;
    while start.elapsed() < budget / 10 {
        f();
        calls += 1;
    }
    let batch = calls.max(1) * 10;
    let start = Instant::now();
    for _ in 0..batch {
        f();
    }
    start.elapsed() / batch
}

fn commands() {
    let lines: [&[u8]; 6] = [
        b"EHLO client.example.org",
        b"MAIL FROM:<alice@example.com> SIZE=12345 BODY=8BITMIME",
        b"RCPT TO:<bob@example.net>",
        b"RCPT TO:<\"quoted local\"@[192.0.2.1]>",
        b"DATA",
        b"QUIT",
    ];
    let per = time_per_call(Duration::from_secs(1), || {
        for line in lines {
            let _ = black_box(Command::parse(black_box(line)));
        }
    });
    let per_command = per / lines.len() as u32;
    println!(
        "command parser: {:>7.1} ns per command ({:.1} M commands/s)",
        per_command.as_secs_f64() * 1e9,
        1e-6 / per_command.as_secs_f64()
    );
}

/// A message of about `size` bytes as it arrives on the wire: CRLF lines of
/// 76 characters, every 20th one dot-stuffed, and the end marker.
fn wire_message(size: usize) -> Vec<u8> {
    let mut m = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n".to_vec();
    let mut n = 0;
    while m.len() < size {
        if n % 20 == 0 {
            m.extend_from_slice(b"..");
        }
        m.extend_from_slice(&[b'x'; 74]);
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// Decodes `wire` the way a session does: 16 KiB reads, decoded in place,
/// unconsumed bytes carried into the next read.
fn decode_all(wire: &[u8], buf: &mut [u8]) -> u64 {
    let mut decoder = DataDecoder::new(u64::MAX);
    let mut fed = 0;
    let mut kept = 0;
    let mut out = 0u64;
    loop {
        let take = (buf.len() - kept).min(wire.len() - fed);
        buf[kept..kept + take].copy_from_slice(&wire[fed..fed + take]);
        fed += take;
        let len = kept + take;
        let step = decoder.decode(&mut buf[..len]);
        out += step.produced as u64;
        buf.copy_within(step.consumed..len, 0);
        kept = len - step.consumed;
        if step.done || (fed == wire.len() && step.consumed == 0) {
            break;
        }
    }
    assert!(decoder.finish().is_ok());
    out
}

fn data(size: usize) {
    let wire = wire_message(size);
    let mut buf = vec![0u8; 16 * 1024];
    let per = time_per_call(Duration::from_secs(1), || {
        black_box(decode_all(black_box(&wire), &mut buf));
    });
    println!(
        "DATA decoder, {:>6} byte message: {:>9.1} µs per message ({:.0} MB/s)",
        wire.len(),
        per.as_secs_f64() * 1e6,
        wire.len() as f64 / per.as_secs_f64() / 1e6
    );
}

fn main() {
    // `cargo test --benches` runs this with no arguments too: keep it short
    // there, and complete under `cargo bench` (which passes --bench).
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching {
        let wire = wire_message(4096);
        assert!(decode_all(&wire, &mut vec![0u8; 16 * 1024]) > 4000);
        println!("parse benchmark: smoke run only (use cargo bench)");
        return;
    }
    commands();
    for size in [4 * 1024, 100 * 1024, 1024 * 1024] {
        data(size);
    }
}
