//! Storage: everything postling writes to disk, and the one durable-write
//! pattern they all share.
//!
//! The pattern (STYLE habit 7): create the file with `create_new` in a
//! temporary place, write it, `sync_all` it, rename it into place, then fsync
//! the destination directory so the new name itself survives a power cut. Only
//! after that may the SMTP layer answer `250`. Whatever a crash leaves
//! half-done sits in a temporary place that startup sweeps (`incoming/` for the
//! queue; for a Maildir, `tmp/` files older than the spec's 36 hours). References: the Maildir spec
//! (<https://cr.yp.to/proto/maildir.html>, "How a message is delivered"),
//! OpenSMTPD `usr.sbin/smtpd/queue_fs.c`, and fsync(2) on why a directory must
//! be synced after a rename.
//!
//! This module owns the small helpers ([`sync_dir`], [`create_dir_durable`],
//! [`new_id`]); [`maildir`] owns local delivery, [`queue`] the on-disk queue,
//! [`envelope`] the envelope file format, and [`group`] the directory fsyncs
//! that concurrent sessions share. It does not own policy (who is
//! local, what is relayed) nor any protocol code.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod group;
pub mod maildir;
pub mod queue;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mode of every directory the store creates (owner only).
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates (owner only).
pub(crate) const FILE_MODE: u32 = 0o600;

/// Process-wide counter shared by [`new_id`] and Maildir names, so two threads
/// asking in the same microsecond still get distinct names.
static COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn next_counter() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// This process's id, asked of the kernel once (every message name and id
/// holds it; the C library does not cache it).
pub(crate) fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Returns a closure that prefixes an I/O error with `path`, keeping its kind,
/// so a log line or config error says which file failed.
pub(crate) fn at(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Whether `leftover`, a name a crash left in a temporary place, is also
/// the name of a committed file that the disk counts only once. A rename's
/// new name is fsynced, its removal of the old one is not, so on a
/// filesystem without a journal (a common SD-card tuning) a crash can
/// leave both names with a link count of 1. Removing the old name would
/// then free the committed file's inode under it. `committed` says whether
/// an inode number also has a committed name. Only e2fsck can mend such a
/// count, so these names are left for it. `nlink` and `ino` are the
/// leftover's link count and inode number.
pub(crate) fn shares_last_link(
    nlink: impl Into<u64>,
    ino: impl Into<u64>,
    committed: impl FnOnce(u64) -> bool,
) -> bool {
    nlink.into() < 2 && committed(ino.into())
}

/// Makes the entries of directory `path` durable: opens it read-only and
/// fsyncs it. Call after creating, renaming or removing a name in it.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(at(path))
}

/// Creates `path` with create_new, O_NOFOLLOW, mode 0600; readable too if `read`.
pub(crate) fn create_file(path: &Path, read: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(read)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(at(path))
}

/// Creates directory `path` (one level, mode 0700) and fsyncs its parent.
///
/// Succeeds if `path` already is a real directory (the parent is fsynced again,
/// so a retry after a crash also makes an earlier creation durable). Fails with
/// `PermissionDenied` if `path` is a symlink, and with `AlreadyExists` if it is
/// something else that is not a directory.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    create_dir_then(path, DIR_MODE, |_| Ok(()))
}

/// [`create_dir_durable`] with `mode` (under the umask), and `made` run on
/// the directory when this call created it, before the parent is fsynced.
/// If `made` fails (its error is returned as it is), the directory is
/// removed again, so a later call makes it anew rather than take it for
/// one that was there before.
pub(crate) fn create_dir_then(
    path: &Path,
    mode: u32,
    made: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {
            if let Err(e) = made(path) {
                let _ = fs::remove_dir(path);
                return Err(e);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_real_dir(path)?,
        Err(e) => return Err(at(path)(e)),
    }
    sync_dir(parent_of(path))
}

/// Ok if `path` is a directory and not a symlink.
pub(crate) fn check_real_dir(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(at(path))?;
    if meta.file_type().is_symlink() {
        return Err(symlink_refused(path));
    }
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a directory", path.display()),
        ));
    }
    Ok(())
}

pub(crate) fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: is a symlink; refusing to follow it", path.display()),
    )
}

/// The directory holding `path`; `.` for a bare relative name.
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

const BASE36: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Digits of each part of an id: 36^11 µs is ~4000 years, 36^5 > the
/// largest Linux pid (2^22), 36^4 ids per process per microsecond.
const ID_TIME_DIGITS: u32 = 11;
const ID_PID_DIGITS: u32 = 5;
const ID_COUNTER_DIGITS: u32 = 4;

/// A new unique id, 20 characters of `[0-9A-Z]`: the current time in
/// microseconds, the pid and a process-wide counter, each in fixed-width
/// base 36. Ids sort by creation time (as far as the clock goes forward), are
/// unique across threads (the counter) and across restarts (time and pid), and
/// are safe as file names. Used as queue id and session id.
pub fn new_id() -> String {
    let mut id = String::with_capacity(20);
    push_base36(&mut id, now_micros(), ID_TIME_DIGITS);
    push_base36(&mut id, u64::from(pid()), ID_PID_DIGITS);
    push_base36(&mut id, next_counter(), ID_COUNTER_DIGITS);
    id
}

/// Appends the low `digits` base-36 digits of `value`, zero-padded.
fn push_base36(out: &mut String, value: u64, digits: u32) {
    let mut rest = value % 36u64.pow(digits);
    let start = out.len();
    for _ in 0..digits {
        // `rest % 36` is below 36, so the index is in range.
        out.insert(start, char::from(BASE36[(rest % 36) as usize]));
        rest /= 36;
    }
}

/// True if `id` could have come from [`new_id`]: 1 to 64 characters of
/// `[0-9A-Z]`. Ids arrive from the command line, so every path built from one
/// is checked with this first.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// Test helpers: a unique scratch directory under the system temp dir,
/// removed when dropped.
#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};

    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(name: &str) -> TestDir {
            let path =
                std::env::temp_dir().join(format!("postling-test-{name}-{}", super::new_id()));
            // The name is unique (new_id), so a failure here is an environment problem.
            std::fs::create_dir(&path).expect("create test dir");
            TestDir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Sorted names in a directory.
    pub fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::TestDir;
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn new_id_unique_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..2_500).map(|_| new_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().expect("thread panicked") {
                assert_eq!(id.len(), 20);
                assert!(is_valid_id(&id), "{id}");
                assert!(all.insert(id));
            }
        }
        assert_eq!(all.len(), 10_000);
    }

    #[test]
    fn only_a_lone_link_of_a_committed_file_is_kept() {
        use std::os::unix::fs::MetadataExt;
        let t = TestDir::new("last-link");
        let lone = t.path().join("lone");
        fs::write(&lone, b"x").expect("write");
        let meta = fs::symlink_metadata(&lone).expect("meta");
        let ino = meta.ino();
        // One link, and the inode also named among the committed: keep it.
        assert!(shares_last_link(meta.nlink(), ino, |i| i == ino));
        // One link, named nowhere else: an ordinary leftover.
        assert!(!shares_last_link(meta.nlink(), ino, |i| i != ino));
        // Two links counted: removing one name leaves the other whole.
        fs::hard_link(&lone, t.path().join("other")).expect("link");
        let meta = fs::symlink_metadata(&lone).expect("meta");
        assert!(!shares_last_link(meta.nlink(), ino, |i| i == ino));
    }

    #[test]
    fn new_id_sorts_by_time() {
        // Within one microsecond the counter orders them, across microseconds the time.
        let ids: Vec<String> = (0..1_000).map(|_| new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn base36_fixed_width() {
        let mut s = String::new();
        push_base36(&mut s, 0, 3);
        push_base36(&mut s, 35, 2);
        push_base36(&mut s, 36 * 36 + 1, 2); // wraps to the low digits
        assert_eq!(s, "0000Z01");
    }

    #[test]
    fn valid_ids() {
        assert!(is_valid_id("0ABC9"));
        for bad in ["", "abc", "A/B", "..", "A B", "A\0", "É", &"A".repeat(65)] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn create_dir_durable_cases() {
        let t = TestDir::new("mkdir");
        let d = t.path().join("d");
        create_dir_durable(&d).expect("create");
        create_dir_durable(&d).expect("exists is ok");
        let mode = fs::metadata(&d).expect("meta").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        let e = create_dir_durable(&link).expect_err("symlink refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);

        let file = t.path().join("file");
        fs::write(&file, b"x").expect("write");
        let e = create_dir_durable(&file).expect_err("file refused");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("not a directory"));

        let e = create_dir_durable(&t.path().join("no/such")).expect_err("one level only");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn sync_dir_refuses_files() {
        let t = TestDir::new("syncdir");
        sync_dir(t.path()).expect("dir syncs");
        let file = t.path().join("f");
        fs::write(&file, b"x").expect("write");
        assert!(sync_dir(&file).is_err());
    }
}
