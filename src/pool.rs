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

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// How long a thread waits for its next session before it exits.
pub const KEEP: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

pub struct Pool {
    jobs: Sender<Job>,
    waiting: Receiver<Job>,
    /// Threads waiting for a job, minus jobs sent to them and not yet taken.
    idle: Mutex<usize>,
    name: &'static str,
    stack_size: usize,
}

impl Pool {
    /// Threads named `name`, with stacks of `stack_size` bytes.
    pub fn new(name: &'static str, stack_size: usize) -> Pool {
        let (jobs, waiting) = crossbeam_channel::unbounded();
        Pool {
            jobs,
            waiting,
            idle: Mutex::new(0),
            name,
            stack_size,
        }
    }

    fn idle(&self) -> MutexGuard<'_, usize> {
        // A plain counter: a panicked holder cannot leave it half-updated.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `job` on a waiting thread, or on a new one if none is waiting.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        {
            let mut idle = self.idle();
            if *idle > 0 {
                *idle -= 1;
                // The pool holds the receiver, so sending cannot fail.
                let _ = self.jobs.send(job);
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
            *self.idle() += 1;
            job = match self.waiting.recv_timeout(KEEP) {
                Ok(next) => next,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let mut idle = self.idle();
                    // A job sent while this thread was giving up was counted
                    // against the idle threads: take it rather than leave it.
                    match self.waiting.try_recv() {
                        Ok(next) => next,
                        Err(_) => {
                            *idle -= 1;
                            return;
                        }
                    }
                }
            };
        }
    }

    /// Threads waiting for a job now (for tests).
    #[cfg(test)]
    fn waiting_threads(&self) -> usize {
        *self.idle()
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
