//! Threads for sessions and deliveries, kept for a while after their job
//! ends so the next one does not pay for a new thread (clone, a stack
//! mapping, a signal stack, and tearing them down again): one SMTP client
//! that opens a connection per message would otherwise cost a thread per
//! message, and so would every relayed message. A thread left without work
//! for [`KEEP`] exits, so an idle server holds no such threads at all (and
//! no stack memory).
//!
//! It owns only the threads; what runs on them (and its limits) is the
//! listener's and the relay's business.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long a thread waits for its next job before it exits.
pub const KEEP: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

pub struct Pool {
    state: Mutex<State>,
    /// Signalled when a job is queued for a waiting thread.
    queued: Condvar,
    name: &'static str,
    stack_size: usize,
}

#[derive(Default)]
struct State {
    /// Jobs handed to waiting threads and not yet taken.
    jobs: VecDeque<Job>,
    /// Threads waiting for a job, minus the jobs queued for them.
    idle: usize,
}

impl Pool {
    /// Threads named `name`, with stacks of `stack_size` bytes.
    pub fn new(name: &'static str, stack_size: usize) -> Pool {
        Pool {
            state: Mutex::default(),
            queued: Condvar::new(),
            name,
            stack_size,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain values: a panicked holder cannot leave them half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `job` on a waiting thread, or on a new one if none is waiting.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        {
            let mut state = self.state();
            if state.idle > 0 {
                state.idle -= 1;
                state.jobs.push_back(job);
                // Woken after the lock is released: woken under it, the
                // thread would at once block again on the lock held here.
                drop(state);
                self.queued.notify_one();
                return Ok(());
            }
        }
        let pool = Arc::clone(self);
        thread::Builder::new()
            .name(self.name.into())
            .stack_size(self.stack_size)
            .spawn(move || pool.work(job))
            .map(drop)
    }

    /// Runs `job`, then whatever `run` hands this thread, until none comes
    /// for [`KEEP`].
    fn work(&self, mut job: Job) {
        loop {
            job();
            let deadline = Instant::now() + KEEP;
            let mut state = self.state();
            state.idle += 1;
            job = loop {
                // A job queued while this thread was running its last one
                // is taken first: it was counted against the idle threads.
                if let Some(next) = state.jobs.pop_front() {
                    break next;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.idle -= 1;
                    return;
                }
                state = self
                    .queued
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            };
        }
    }

    /// Threads waiting for a job now (for tests).
    #[cfg(test)]
    fn waiting_threads(&self) -> usize {
        self.state().idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_finished_thread_runs_the_next_job() {
        let pool = Arc::new(Pool::new("test", 64 * 1024));
        let (tx, rx) = mpsc::channel();
        let first = tx.clone();
        pool.run(move || first.send(thread::current().id()).expect("send"))
            .expect("run");
        let a = rx.recv().expect("first");
        // Wait until the thread is back waiting, then hand it another job.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.waiting_threads() == 0 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(pool.waiting_threads(), 1);
        pool.run(move || tx.send(thread::current().id()).expect("send"))
            .expect("run");
        let b = rx.recv().expect("second");
        assert_eq!(a, b, "the same thread ran both");
    }

    #[test]
    fn busy_threads_do_not_block_new_jobs() {
        let pool = Arc::new(Pool::new("test", 64 * 1024));
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        // (crossbeam's receiver is shared by the four jobs.)
        let (done_tx, done_rx) = mpsc::channel();
        for _ in 0..4 {
            let (release, done) = (release_rx.clone(), done_tx.clone());
            pool.run(move || {
                release.recv().expect("release");
                done.send(()).expect("done");
            })
            .expect("run");
        }
        // All four are blocked at once: each got a thread of its own.
        for _ in 0..4 {
            release_tx.send(()).expect("release");
        }
        for _ in 0..4 {
            done_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("every job ran");
        }
    }
}
