//! Group commit for directory fsyncs: when several sessions have each
//! renamed a file into the same directory (a Maildir's `new/`, the queue's
//! `queue/`), one fsync of the directory makes all of their names durable.
//!
//! A caller that has finished its rename asks for a sync that *starts after*
//! that moment, because only such a sync is certain to include its entry. If
//! none is running, it runs one itself; if one is running, it waits for it to
//! end and then for the next one, which one of the waiters runs for all of
//! them. So no caller returns before its own entry is on disk (nobody answers
//! `250` early), and N concurrent callers cost about two fsyncs instead of N.
//! This is the group commit of databases' write-ahead logs, applied per
//! directory; Postfix and OpenSMTPD fsync once per message instead.
//!
//! A caller may also announce a rename before it makes it ([`intend`], just
//! before fsyncing its file): a sync about to start then waits, for at most
//! [`LINGER`], until every announced rename has been made, so one sync
//! covers them all instead of each starting the next. A single session
//! never waits: its own announcement ends before it asks for the sync.
//!
//! It owns only the bookkeeping; the fsync itself is [`super::sync_dir`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The longest a sync waits for announced renames: about one file fsync on
/// a slow SD card; on a fast disk the renames come much sooner.
pub const LINGER: Duration = Duration::from_millis(10);

/// The syncs of one directory.
#[derive(Default)]
struct Group {
    state: Mutex<State>,
    /// `ended[n % 2]`: callers waiting for sync number `n` to end. A waiter
    /// needs either the running sync or the one after it, so two
    /// generations are waited for at most, one on each condvar, and the end
    /// of a sync wakes only the callers it covers.
    ended: [Condvar; 2],
    /// The caller about to start a sync waits here for announced renames.
    renamed: Condvar,
}

#[derive(Default)]
struct State {
    /// Number of syncs started so far (the generation of the latest).
    started: u64,
    /// Generation of the latest sync that has ended.
    done: u64,
    /// Whether a sync is running or about to start.
    phase: Phase,
    /// Generation and error of the latest sync that failed.
    failed: Option<(u64, io::ErrorKind, String)>,
    /// Renames announced with [`intend`] and not yet made.
    pending: usize,
    /// Callers blocked on `ended[n % 2]`: with none, nobody is woken (a
    /// notification is a system call even when nobody waits).
    waiting: [usize; 2],
}

/// What the directory's syncing is doing now.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No sync runs, and nobody is about to start one.
    #[default]
    Idle,
    /// A caller will start the next sync once the announced renames are
    /// made (it lingers for them); callers arriving now are covered by it.
    Lingering,
    /// A sync is running (its generation is `started`).
    Running,
}

/// Directories with a sync in progress or callers waiting; an entry is
/// removed when its last caller leaves, so the map stays as small as the
/// number of directories being written at this moment.
fn groups() -> MutexGuard<'static, HashMap<PathBuf, Arc<Group>>> {
    static GROUPS: OnceLock<Mutex<HashMap<PathBuf, Arc<Group>>>> = OnceLock::new();
    GROUPS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Makes every entry created, renamed or removed in `dir` before this call
/// durable, sharing the fsync with concurrent callers for the same path.
/// Fails if the sync that covered this call failed.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    intend(dir).sync()
}

/// Announces a rename into `dir` that this thread is about to make; call
/// [`Intent::sync`] once it is made. Dropping the intent withdraws it.
pub fn intend(dir: &Path) -> Intent {
    let group = Arc::clone(groups().entry(dir.to_path_buf()).or_default());
    lock(&group.state).pending += 1;
    Intent {
        group,
        dir: dir.to_path_buf(),
        pending: true,
    }
}

/// A rename announced to the directory's group; see [`intend`].
pub struct Intent {
    group: Arc<Group>,
    dir: PathBuf,
    /// Still counted in the group's `pending`.
    pending: bool,
}

impl Intent {
    /// The rename is made: makes it durable, like [`sync_dir`].
    pub fn sync(self) -> io::Result<()> {
        self.sync_with(super::sync_dir, LINGER)
    }

    /// [`Intent::sync`] with the fsync and the longest linger given (tests
    /// count and fail the fsync, and linger long enough not to be hurried
    /// by a slow machine).
    fn sync_with(
        mut self,
        fsync: impl Fn(&Path) -> io::Result<()>,
        linger: Duration,
    ) -> io::Result<()> {
        let group = Arc::clone(&self.group);
        let mut state = lock(&group.state);
        let wake = self.withdraw_locked(&mut state);
        // The first sync to start from now on covers this caller's rename.
        // Computed under the same lock as the withdrawal, so a sync that
        // lingered for this rename is the one this caller waits for.
        let needed = state.started + 1;
        if wake {
            drop(state);
            group.renamed.notify_one();
            state = lock(&group.state);
        }
        wait_for_sync(&group, state, needed, &self.dir, fsync, linger)
    }

    /// Withdraws the announcement; true if the lingering caller is to be
    /// woken (after the lock is released, so it does not at once block on
    /// it).
    fn withdraw_locked(&mut self, state: &mut State) -> bool {
        if !self.pending {
            return false;
        }
        self.pending = false;
        state.pending -= 1;
        // Only the last one matters to a lingering sync: waking it at each
        // withdrawal would only make it look again.
        state.pending == 0 && state.phase == Phase::Lingering
    }
}

impl Drop for Intent {
    fn drop(&mut self) {
        if self.pending {
            let group = Arc::clone(&self.group);
            if self.withdraw_locked(&mut lock(&group.state)) {
                group.renamed.notify_one();
            }
        }
        let mut map = groups();
        // Two references: the map's and ours; nobody else can take one
        // without the map's lock, which is held.
        if Arc::strong_count(&self.group) == 2 {
            map.remove(&self.dir);
        }
    }
}

/// [`sync_dir`] with the fsync given, lingering [`LINGER`].
#[cfg(test)]
fn sync_with(dir: &Path, fsync: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
    intend(dir).sync_with(fsync, LINGER)
}

/// Waits until sync number `needed` has ended, running it (or a later one)
/// if nobody else does; `state` is the group's locked state.
///
/// Each caller sleeps once, on the condvar of the generation it needs, and
/// is woken by the end of that sync; when a sync ends with callers waiting
/// for the next one, one of them is woken to run it.
fn wait_for_sync<'a>(
    group: &'a Group,
    mut state: MutexGuard<'a, State>,
    needed: u64,
    dir: &Path,
    fsync: impl Fn(&Path) -> io::Result<()>,
    linger: Duration,
) -> io::Result<()> {
    let parity = (needed % 2) as usize;
    while state.done < needed {
        if state.phase != Phase::Idle {
            // The running sync, or the one a lingering caller will start,
            // or the next after the running one: woken when it has ended
            // (or, for the next one, to run it).
            state.waiting[parity] += 1;
            state = group.ended[parity]
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting[parity] -= 1;
            continue;
        }
        // Nobody runs or is about to: this caller does, first waiting (at
        // most `linger`) for the renames other sessions have announced.
        state.phase = Phase::Lingering;
        let until = Instant::now() + linger;
        while state.pending > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = group
                .renamed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.phase = Phase::Running;
        state.started += 1;
        let generation = state.started;
        drop(state);
        let result = fsync(dir);
        let mut state = lock(&group.state);
        state.phase = Phase::Idle;
        state.done = generation;
        if let Err(e) = &result {
            state.failed = Some((generation, e.kind(), e.to_string()));
        }
        let this = (generation % 2) as usize;
        let covered = state.waiting[this] > 0;
        let next = state.waiting[1 - this] > 0;
        // Woken after the lock is released, so the waiters do not at once
        // block again on it. This sync started after the caller's rename
        // (`generation` >= `needed`), so its result is the caller's.
        drop(state);
        if covered {
            group.ended[this].notify_all();
        }
        if next {
            // Whoever wakes first runs the next sync; the rest of them
            // sleep on until it has ended.
            group.ended[1 - this].notify_one();
        }
        return result;
    }
    match &state.failed {
        // A failed sync at or after the one needed may have been the one
        // that should have covered this entry: report it (the client
        // retries; a duplicate is possible, a loss is not).
        Some((generation, kind, text)) if *generation >= needed => {
            Err(io::Error::new(*kind, text.clone()))
        }
        _ => Ok(()),
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn one_caller_runs_one_sync() {
        let calls = AtomicUsize::new(0);
        let dir = Path::new("/group-test/one");
        sync_with(dir, |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .expect("sync");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!groups().contains_key(dir), "entry removed after use");
    }

    #[test]
    fn concurrent_callers_share_syncs_and_each_waits_for_one_started_after_it() {
        // Each caller records the number of syncs *started* when it arrived;
        // when it returns, a sync that started later must have finished.
        let started = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let callers = 16;
        let barrier = Barrier::new(callers);
        let dir = Path::new("/group-test/many");
        std::thread::scope(|s| {
            for _ in 0..callers {
                s.spawn(|| {
                    barrier.wait();
                    let seen = started.load(Ordering::SeqCst);
                    sync_with(dir, |_| {
                        started.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        finished.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .expect("sync");
                    assert!(
                        finished.load(Ordering::SeqCst) > seen,
                        "returned before a sync that started after it ended"
                    );
                });
            }
        });
        let syncs = started.load(Ordering::SeqCst);
        assert!(syncs >= 1);
        assert!(
            syncs < callers,
            "{syncs} syncs for {callers} callers: not shared"
        );
        assert!(!groups().contains_key(dir));
    }

    #[test]
    fn rounds_of_announced_renames_never_return_before_their_sync() {
        // Many rounds with announcements, renames and syncs overlapping in
        // every order: each caller still returns only after a sync that
        // started after its rename, and nobody is left waiting (the test
        // would hang) when a sync ends with callers waiting for the next.
        let started = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let dir = Path::new("/group-test/rounds");
        let fsync = |_: &Path| {
            let n = started.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_micros(100 * (n as u64 % 7)));
            finished.fetch_max(n, Ordering::SeqCst);
            Ok(())
        };
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (started, finished, fsync) = (&started, &finished, &fsync);
                s.spawn(move || {
                    for round in 0..150u64 {
                        let intent = intend(dir);
                        std::thread::sleep(Duration::from_micros((t * 37 + round * 11) % 300));
                        let seen = started.load(Ordering::SeqCst);
                        intent.sync_with(fsync, LINGER).expect("sync");
                        assert!(
                            finished.load(Ordering::SeqCst) > seen,
                            "returned before a sync that started after its rename"
                        );
                    }
                });
            }
        });
        assert!(started.load(Ordering::SeqCst) < 8 * 150, "never shared");
        assert!(!groups().contains_key(dir));
    }

    #[test]
    fn a_sync_waits_for_an_announced_rename_and_covers_it() {
        let calls = AtomicUsize::new(0);
        let count = |_: &Path| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let dir = Path::new("/group-test/linger");
        // Long enough that no scheduling delay ends the wait early.
        let linger = Duration::from_secs(60);
        let announced = intend(dir);
        std::thread::scope(|s| {
            let other = s.spawn(|| intend(dir).sync_with(count, linger));
            // The other caller lingers for the announced rename ...
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(calls.load(Ordering::SeqCst), 0, "did not wait");
            // ... which, once made, shares the one sync.
            announced.sync_with(count, linger).expect("announced");
            other.join().expect("thread").expect("other");
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!groups().contains_key(dir));
    }

    #[test]
    fn a_sync_lingers_at_most_linger_and_a_withdrawn_intent_frees_it() {
        let dir = Path::new("/group-test/withdrawn");
        let stuck = intend(dir);
        let started = Instant::now();
        let linger = Duration::from_millis(100);
        intend(dir).sync_with(|_| Ok(()), linger).expect("sync");
        assert!(started.elapsed() >= linger);
        drop(stuck);
        assert!(!groups().contains_key(dir));
    }

    #[test]
    fn a_failed_sync_fails_its_callers_and_the_next_one_succeeds() {
        let dir = Path::new("/group-test/fail");
        let e = sync_with(dir, |_| Err(io::Error::other("disk on fire"))).expect_err("fails");
        assert!(e.to_string().contains("disk on fire"), "{e}");
        // A new caller needs a new sync, which succeeds.
        sync_with(dir, |_| Ok(())).expect("next sync");
    }

    #[test]
    fn different_directories_do_not_share() {
        let calls = AtomicUsize::new(0);
        for dir in ["/group-test/a", "/group-test/b"] {
            sync_with(Path::new(dir), |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .expect("sync");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn syncs_a_real_directory() {
        let t = super::super::testdir::TestDir::new("group");
        sync_dir(t.path()).expect("real dir");
        assert!(sync_dir(&t.path().join("missing")).is_err());
    }
}
