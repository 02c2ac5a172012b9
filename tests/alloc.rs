//! Proves the SMTP command parser allocates nothing (STYLE habit 2).
//!
//! A separate test binary because it installs a counting global allocator;
//! the count is per thread, so the test harness's own threads don't disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use postling::smtp::command::Command;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the only
// addition is a thread-local counter that itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn parsing_commands_allocates_nothing() {
    let long_local = format!("RCPT TO:<{}@example.com>", "a".repeat(64));
    let lines: Vec<Vec<u8>> = [
        "EHLO client.example",
        "HELO client",
        "MAIL FROM:<alice@example.com> SIZE=12345 BODY=8BITMIME SMTPUTF8",
        "MAIL FROM:<>",
        "MAIL FROM:<@a.example,@b.example:bob@c.example>",
        "mail from: <\"quoted local\"@example.com>",
        "RCPT TO:<bob@[192.0.2.1]>",
        "RCPT TO:<bob@[IPv6:2001:db8::1]>",
        "RCPT TO:<Postmaster>",
        "RCPT TO:<jürgen@bücher.example>",
        long_local.as_str(),
        "RCPT TO:<;sleep 1;>",
        "RCPT TO:<a@b@c>",
        "MAIL FROM:<a@b> X-UNKNOWN=1",
        "DATA",
        "RSET",
        "NOOP",
        "QUIT",
        "VRFY root",
        "HELP",
        "EXPN staff",
        "BOGUS",
    ]
    .iter()
    .map(|l| l.as_bytes().to_vec())
    .collect();
    let before = allocations();
    let mut ok = 0;
    for line in &lines {
        if Command::parse(line).is_ok() {
            ok += 1;
        }
    }
    let after = allocations();
    assert_eq!(after - before, 0, "the parser allocated");
    assert_eq!(ok, 17, "the sample is mostly valid commands");
}
