//! Local delivery into a Maildir: one message copy written to `tmp/`, fsynced,
//! renamed into `new/`, and `new/` fsynced, as the Maildir spec prescribes
//! (<https://cr.yp.to/proto/maildir.html>, "How a message is delivered"; the
//! `,S=<size>` suffix is the Courier/Dovecot extension that lets readers skip a
//! stat). Names are `<secs>.M<usecs>P<pid>Q<counter>.<host>,S=<size>`.
//!
//! It also guards the path: below the configured Maildir root no directory may
//! be a symlink, nor may `tmp/`, `new/`, `cur/` or the message file, so a local
//! user cannot point delivery at someone else's files. The checks are made
//! with `symlink_metadata` before use; they defeat symlinks placed in advance,
//! not a concurrent swap by someone who can already write to the Maildir.
//!
//! A message for local recipients only is written straight into `tmp/` as it
//! arrives ([`Draft`]); other copies are made from a file the caller passes.
//! The fsync of `new/` after the rename is shared with other sessions
//! delivering into the same Maildir at the same moment ([`super::group`]).
//!
//! This file does not decide who is local or where a user's Maildir is (the
//! caller passes the directory), does not build the header it is given, and
//! never seeks a body it is given: the caller positions it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use super::{
    at, create_dir_then, group, next_counter, now_micros, pid, shares_last_link, symlink_refused,
};

/// Who besides postling's own user may read the Maildirs it creates
/// (`[local] mode` and `group`), for a mail reader or IMAP server running
/// as another user. Applied to what postling creates only: a directory that
/// already exists keeps its owner, group and mode.
///
/// Modes are given to `mkdir(2)` and `open(2)`, never set by `chmod`: the
/// server sets its umask to match ([`Sharing::umask`]), so a setgid bit a
/// new directory inherits (Debian's `/var/mail` is 2775) is kept, and the
/// systemd unit's `RestrictSUIDSGID=` has nothing to refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharing {
    /// Mode of message files; directories get the same bits with x wherever
    /// r is set (0640 -> 0750). Default 0600 (owner only).
    pub file_mode: u32,
    /// Group of every file and directory created (`fchown`): postling's
    /// user must be in it.
    pub gid: Option<u32>,
}

impl Default for Sharing {
    fn default() -> Sharing {
        Sharing {
            file_mode: super::FILE_MODE,
            gid: None,
        }
    }
}

impl Sharing {
    pub fn dir_mode(self) -> u32 {
        self.file_mode | ((self.file_mode & 0o444) >> 2)
    }

    /// The process umask that lets [`Sharing::dir_mode`] and `file_mode`
    /// through whole; `None` for the default, which needs no change (every
    /// file and directory postling creates is owner-only anyway).
    pub fn umask(self) -> Option<u32> {
        (self != Sharing::default()).then(|| 0o777 & !self.dir_mode())
    }

    /// Gives a file or directory postling just created its group.
    fn apply(self, created: &File, path: &Path) -> io::Result<()> {
        match self.gid {
            Some(gid) => std::os::unix::fs::fchown(created, None, Some(gid)).map_err(at(path)),
            None => Ok(()),
        }
    }
}

/// Attempts at a fresh tmp name before giving up (a clash means a clock jump
/// and a pid reused in the same microsecond, or a stray file).
const NAME_ATTEMPTS: u32 = 4;

/// Delivers one copy: writes `header` then all of `body` (read from its current
/// position to EOF) into `dir/tmp/<unique>`, fsyncs it, renames it into
/// `dir/new/`, fsyncs `dir/new`. Creates `dir` and its `tmp/ new/ cur/`
/// (mode 0700) when missing, fsyncing parents. Returns the final path.
///
/// With `root` = `Some`, `dir` must lie inside `root` (no `..`), and every
/// directory from below `root` down to `dir` is created if missing and refused
/// if it is a symlink (`root` itself is the admin's choice and may be one);
/// a missing `root` is created (one level). With `None` (an explicitly
/// configured mailbox), `dir` itself may be a symlink but is created only if
/// its parent exists. In both cases `tmp/`, `new/`, `cur/` and the message file
/// must not be symlinks. Refusals are `PermissionDenied`.
///
/// On `Err` nothing is left in `tmp/` or `new/`. The server itself calls
/// [`prepare`] for every mailbox first and then [`Draft`] or
/// [`deliver_prepared`]; this one-step form is what the tests exercise.
#[cfg(test)]
pub fn deliver(
    dir: &Path,
    root: Option<&Path>,
    hostname: &str,
    header: &[u8],
    body: &mut File,
) -> io::Result<PathBuf> {
    let sharing = Sharing::default();
    prepare(dir, root, sharing)?;
    deliver_prepared(dir, hostname, header, body, sharing)
}

/// `deliver` into a Maildir that `prepare` has just checked: for a caller
/// that prepares every mailbox first, so the checks are not done twice.
#[cfg(test)]
pub fn deliver_prepared(
    dir: &Path,
    hostname: &str,
    header: &[u8],
    body: &mut File,
    sharing: Sharing,
) -> io::Result<PathBuf> {
    copy_prepared(dir, hostname, header, body, sharing)?.publish()
}

/// A copy of `body` (after `header`) written into `dir/tmp/` and fsynced,
/// not yet in `new/`: for a message with several copies, which are all
/// made durable before any is published, so a mailbox that cannot take its
/// copy (a full disk, a quota) leaves no copy visible anywhere, and the
/// client's retry duplicates nothing. `dir` must have been checked by
/// [`prepare`].
pub fn copy_prepared(
    dir: &Path,
    hostname: &str,
    header: &[u8],
    body: &mut File,
    sharing: Sharing,
) -> io::Result<Synced> {
    let mut draft = Draft::create(dir, hostname, header, sharing)?;
    io::copy(body, draft.file()).map_err(at(&draft.name.tmp))?;
    draft.sync()
}

/// A message being written straight into a Maildir's `tmp/`, for mail whose
/// recipients are all local: the session writes the body into it as it
/// arrives, so the message is written once, with no spool file to create,
/// copy and remove. [`Draft::publish`] makes it durable and moves it into
/// `new/`; dropped unpublished, the file is removed.
#[derive(Debug)]
pub struct Draft {
    name: TmpName,
    file: File,
    header_len: u64,
}

/// A file's place in `tmp/` and the name it gets in `new/`; dropped before
/// it was published, the file in `tmp/` is removed.
#[derive(Debug)]
struct TmpName {
    dir: PathBuf,
    tmp: PathBuf,
    unique: String,
    published: bool,
}

impl Draft {
    /// Creates `dir/tmp/<unique>` and writes `header` into it. `dir` must
    /// have been checked by [`prepare`].
    pub fn create(
        dir: &Path,
        hostname: &str,
        header: &[u8],
        sharing: Sharing,
    ) -> io::Result<Draft> {
        let (tmp, file, unique) = create_tmp(dir, hostname, sharing.file_mode)?;
        let name = TmpName {
            dir: dir.to_path_buf(),
            tmp,
            unique,
            published: false,
        };
        sharing.apply(&file, &name.tmp)?;
        let mut draft = Draft {
            name,
            file,
            header_len: header.len() as u64,
        };
        draft.file.write_all(header).map_err(at(&draft.name.tmp))?;
        Ok(draft)
    }

    /// The file, positioned at the end of what was written so far.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The file positioned just after the header given to `create`: what
    /// follows is the message as received, for copying into other
    /// mailboxes (each with its own header).
    pub fn body(&mut self) -> io::Result<&mut File> {
        self.file
            .seek(SeekFrom::Start(self.header_len))
            .map_err(at(&self.name.tmp))?;
        Ok(&mut self.file)
    }

    /// fsyncs the file, renames it into `new/` (with `,S=<size>`) and makes
    /// the new name durable; returns the final path. On `Err` the message
    /// is in neither `tmp/` nor `new/`.
    pub fn publish(self) -> io::Result<PathBuf> {
        // Announced before the slow file fsync, so a directory sync that
        // other sessions are about to start waits for this rename too.
        let rename = group::intend(&self.name.dir.join("new"));
        self.sync()?.publish_announced(rename)
    }

    /// fsyncs the file and closes it, for [`Synced::publish`] later. On
    /// `Err` the file is removed.
    pub fn sync(self) -> io::Result<Synced> {
        let size = self
            .file
            .sync_all()
            .and_then(|()| self.file.metadata())
            .map_err(at(&self.name.tmp))?
            .len();
        Ok(Synced {
            name: self.name,
            size,
        })
    }
}

/// A Maildir file written and fsynced in `tmp/` ([`Draft::sync`],
/// [`copy_prepared`]), waiting to be renamed into `new/`. Dropped
/// unpublished, the file is removed.
#[derive(Debug)]
pub struct Synced {
    name: TmpName,
    size: u64,
}

impl Synced {
    /// Renames the file into `new/` (with `,S=<size>`) and makes the new
    /// name durable; returns the final path. On `Err` the message is in
    /// neither `tmp/` nor `new/`.
    pub fn publish(self) -> io::Result<PathBuf> {
        let rename = group::intend(&self.name.dir.join("new"));
        self.publish_announced(rename)
    }

    fn publish_announced(mut self, rename: group::Intent) -> io::Result<PathBuf> {
        let name = &mut self.name;
        let final_path = name
            .dir
            .join("new")
            .join(format!("{},S={}", name.unique, self.size));
        // rename(2) would silently replace an existing message; names are
        // unique, so this only guards against a stray file.
        if fs::symlink_metadata(&final_path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: already exists", final_path.display()),
            ));
        }
        fs::rename(&name.tmp, &final_path).map_err(at(&final_path))?;
        name.published = true;
        // Shared with other sessions delivering into this Maildir now.
        if let Err(e) = rename.sync() {
            // Not durable, so report failure; take the copy back so `Err`
            // always means "not delivered" (a retry cannot duplicate it).
            let _ = fs::remove_file(&final_path);
            return Err(e);
        }
        Ok(final_path)
    }
}

impl Drop for TmpName {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: the file may already be gone, and a leftover in
            // tmp/ is swept after 36 hours.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Checks and creates the directories down to `dir/{tmp,new,cur}`, with the
/// same rules as `deliver` (which calls it too); lets a caller with several
/// copies to write find a broken mailbox before writing any.
pub fn prepare(dir: &Path, root: Option<&Path>, sharing: Sharing) -> io::Result<()> {
    match root {
        Some(root) => {
            let rel = dir.strip_prefix(root).map_err(|_| outside(dir, root))?;
            if fs::metadata(root).is_err() {
                create_dir(root, sharing)?;
            }
            let mut cur = root.to_path_buf();
            for comp in rel.components() {
                match comp {
                    Component::Normal(name) => cur.push(name),
                    Component::CurDir => continue,
                    _ => return Err(outside(dir, root)),
                }
                ensure_dir(&cur, sharing)?;
            }
        }
        None => {
            if fs::metadata(dir).is_err() {
                create_dir(dir, sharing)?;
            }
        }
    }
    for sub in ["tmp", "new", "cur"] {
        ensure_dir(&dir.join(sub), sharing)?;
    }
    Ok(())
}

/// Whether this process may write into `dir/tmp/` and `dir/new/` now
/// (`access(2)`: mode bits, ACLs, a read-only mount, an immutable flag).
/// For a message with several copies, checked for every mailbox before any
/// is written: otherwise one broken mailbox would make the client retry,
/// and every retry would add a copy to the healthy ones.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    use nix::unistd::{access, AccessFlags};
    for sub in ["tmp", "new"] {
        let path = dir.join(sub);
        access(&path, AccessFlags::W_OK | AccessFlags::X_OK)
            .map_err(|e| at(&path)(io::Error::from(e)))?;
    }
    Ok(())
}

fn outside(dir: &Path, root: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{}: not inside the Maildir root {}",
            dir.display(),
            root.display()
        ),
    )
}

/// Ok if `path` is a real directory; creates it durably if missing; refuses a
/// symlink or anything else.
fn ensure_dir(path: &Path, sharing: Sharing) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(path)),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a directory", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(path, sharing),
        Err(e) => Err(at(path)(e)),
    }
}

/// [`super::create_dir_durable`] for a Maildir directory: with `sharing`'s
/// mode, and its group when postling creates it (an existing one is only
/// checked).
fn create_dir(path: &Path, sharing: Sharing) -> io::Result<()> {
    create_dir_then(path, sharing.dir_mode(), |path| match sharing.gid {
        Some(_) => OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(at(path))
            .and_then(|dir| sharing.apply(&dir, path)),
        None => Ok(()),
    })
}

/// Creates `dir/tmp/<unique>` (create_new, O_NOFOLLOW, `mode`).
fn create_tmp(dir: &Path, hostname: &str, mode: u32) -> io::Result<(PathBuf, File, String)> {
    let host = escape_host(hostname);
    let mut last = None;
    for _ in 0..NAME_ATTEMPTS {
        let micros = now_micros();
        let unique = format!(
            "{}.M{}P{}Q{}.{host}",
            micros / 1_000_000,
            micros % 1_000_000,
            pid(),
            next_counter()
        );
        let path = dir.join("tmp").join(&unique);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => return Ok((path, file, unique)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(at(&path)(e)),
            Err(e) => return Err(at(&path)(e)),
        }
    }
    // The loop runs at least once and only falls through after setting `last`.
    Err(last.unwrap_or_else(|| io::Error::other("no Maildir name attempted")))
}

/// The host part of a Maildir name: `/` and `:` would break the name, so they
/// become `\057` and `\072` as the spec says.
fn escape_host(hostname: &str) -> String {
    let host = if hostname.is_empty() {
        "localhost"
    } else {
        hostname
    };
    host.replace('/', "\\057").replace(':', "\\072")
}

/// Removes files in `<maildir>/tmp/` older than `age` (the Maildir spec's
/// 36 hours): what a crash left between create and rename. Never follows
/// a symlink, and never removes a name that is the last link the disk
/// counts of a message in `new/` or `cur/` ([`super::shares_last_link`]),
/// and sweeps nothing in a directory without `new/` and `cur/` (not a
/// Maildir); returns how many were removed. Errors are skipped: a sweep
/// must never stop the server from starting.
pub fn sweep_tmp(maildir: &Path, age: std::time::Duration) -> usize {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{fstatat, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    // Only a Maildir's tmp/: a directory under maildir_root that has no
    // new/ and cur/ beside it is someone's folder, and its tmp/ theirs.
    let is_dir = |sub: &str| fs::symlink_metadata(maildir.join(sub)).is_ok_and(|m| m.is_dir());
    if !is_dir("new") || !is_dir("cur") {
        return 0;
    }
    // tmp/ is opened without following a symlink, and every name in it is
    // looked at and removed through that handle: a tmp/ swapped for a
    // symlink (by anyone who may write to the Maildir) cannot point the
    // sweep at other files, such as the queue's.
    let tmp = maildir.join("tmp");
    let Ok(handle) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&tmp)
    else {
        return 0;
    };
    let Some(mut entries) = handle
        .try_clone()
        .ok()
        .and_then(|dup| nix::dir::Dir::from_fd(dup.into()).ok())
    else {
        return 0;
    };
    let stale: Vec<(std::ffi::CString, libc::nlink_t, libc::ino_t)> = entries
        .iter()
        .flatten()
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .filter_map(|e| {
            let name = e.file_name().to_owned();
            let st = fstatat(&handle, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
            let regular = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
            let mtime = std::time::Duration::new(
                u64::try_from(st.st_mtime).unwrap_or(0),
                u32::try_from(st.st_mtime_nsec).unwrap_or(0),
            );
            let old = (std::time::UNIX_EPOCH + mtime)
                .elapsed()
                .is_ok_and(|e| e > age);
            (regular && old).then_some((name, st.st_nlink, st.st_ino))
        })
        .collect();
    if stale.is_empty() {
        return 0;
    }
    let delivered = delivered_inodes(maildir);
    let mut removed = 0;
    for (name, nlink, ino) in stale {
        if shares_last_link(nlink, ino, |ino| delivered.contains(&ino)) {
            log::warn!(
                "maildir: a tmp/ name of a delivered message, but the filesystem counts \
                 one link for both (a crash without a journal); left alone: run e2fsck -f \
                 path={}",
                tmp.join(std::ffi::OsStr::from_bytes(name.to_bytes()))
                    .display()
            );
        } else if unlinkat(&handle, name.as_c_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The inode numbers named in `<maildir>/new/` and `cur/` (from the
/// directory entries: no stat per message).
fn delivered_inodes(maildir: &Path) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::DirEntryExt;
    ["new", "cur"]
        .iter()
        .filter_map(|sub| fs::read_dir(maildir.join(sub)).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.ino()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testdir::{names, TestDir};
    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A body file holding `content`, rewound.
    fn body(t: &TestDir, content: &[u8]) -> File {
        let p = t.path().join(format!("body-{}", super::super::new_id()));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .expect("body file");
        f.write_all(content).expect("write body");
        f.seek(SeekFrom::Start(0)).expect("rewind");
        f
    }

    #[test]
    fn delivers_byte_identical_copy() {
        let t = TestDir::new("md-deliver");
        let root = t.path().join("mail");
        let dir = root.join("alice");
        let mut b = body(&t, b"Subject: hi\r\n\r\nbody\r\n");
        let header = b"Return-Path: <bob@example.com>\r\n";
        let path = deliver(&dir, Some(&root), "pi.lan", header, &mut b).expect("deliver");

        assert_eq!(path.parent(), Some(dir.join("new").as_path()));
        let got = fs::read(&path).expect("read delivered");
        assert_eq!(
            got,
            b"Return-Path: <bob@example.com>\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(
            name.ends_with(&format!(".pi.lan,S={}", got.len())),
            "{name}"
        );
        assert!(
            name.contains(&format!("P{}Q", std::process::id())),
            "{name}"
        );
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        for sub in ["tmp", "new", "cur"] {
            let m = fs::metadata(dir.join(sub))
                .expect("subdir")
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o700, "{sub}");
        }
        assert!(names(&dir.join("tmp")).is_empty());
        assert!(names(&dir.join("cur")).is_empty());
    }

    #[test]
    fn two_deliveries_two_files() {
        let t = TestDir::new("md-two");
        let dir = t.path().join("box");
        let mut b1 = body(&t, b"one\r\n");
        let mut b2 = body(&t, b"two\r\n");
        let p1 = deliver(&dir, None, "h", b"", &mut b1).expect("first");
        let p2 = deliver(&dir, None, "h", b"", &mut b2).expect("second");
        assert_ne!(p1, p2);
        assert_eq!(names(&dir.join("new")).len(), 2);
        assert_eq!(fs::read(&p1).expect("p1"), b"one\r\n");
        assert_eq!(fs::read(&p2).expect("p2"), b"two\r\n");
        assert!(names(&dir.join("tmp")).is_empty());
    }

    #[test]
    fn reads_body_from_current_position() {
        let t = TestDir::new("md-pos");
        let dir = t.path().join("box");
        let mut b = body(&t, b"skipped|kept");
        b.seek(SeekFrom::Start(8)).expect("seek");
        let p = deliver(&dir, None, "h", b"H\r\n", &mut b).expect("deliver");
        assert_eq!(fs::read(&p).expect("read"), b"H\r\nkept");
    }

    #[test]
    fn host_is_escaped() {
        assert_eq!(escape_host("a/b:c"), "a\\057b\\072c");
        assert_eq!(escape_host(""), "localhost");
        let t = TestDir::new("md-host");
        let dir = t.path().join("box");
        let mut b = body(&t, b"x");
        let p = deliver(&dir, None, "evil/../host:1", b"", &mut b).expect("deliver");
        assert_eq!(p.parent(), Some(dir.join("new").as_path()));
        assert!(p
            .to_string_lossy()
            .contains("evil\\057..\\057host\\0721,S=1"));
    }

    #[test]
    fn refuses_symlinked_user_dir_under_root() {
        let t = TestDir::new("md-link");
        let root = t.path().join("mail");
        fs::create_dir(&root).expect("root");
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("elsewhere");
        symlink(&elsewhere, root.join("alice")).expect("symlink");

        let mut b = body(&t, b"x");
        let e = deliver(&root.join("alice"), Some(&root), "h", b"", &mut b).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("symlink"), "{e}");
        // Also when the symlink is an intermediate component.
        let e = deliver(&root.join("alice/Maildir"), Some(&root), "h", b"", &mut b)
            .expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(names(&elsewhere).is_empty(), "nothing written outside");
    }

    #[test]
    fn refuses_dir_outside_root() {
        let t = TestDir::new("md-outside");
        let root = t.path().join("mail");
        let mut b = body(&t, b"x");
        for dir in [
            t.path().join("other"),
            root.join("../other"),
            root.join("a/../../other"),
        ] {
            let e = deliver(&dir, Some(&root), "h", b"", &mut b).expect_err("refused");
            assert_eq!(
                e.kind(),
                io::ErrorKind::PermissionDenied,
                "{}",
                dir.display()
            );
        }
        assert!(fs::symlink_metadata(t.path().join("other")).is_err());
    }

    #[test]
    fn refuses_symlinked_new_even_without_root() {
        let t = TestDir::new("md-newlink");
        let dir = t.path().join("box");
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir_all(dir.join("tmp")).expect("tmp");
        fs::create_dir(dir.join("cur")).expect("cur");
        fs::create_dir(&elsewhere).expect("elsewhere");
        symlink(&elsewhere, dir.join("new")).expect("symlink");

        let mut b = body(&t, b"x");
        let e = deliver(&dir, None, "h", b"", &mut b).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(names(&elsewhere).is_empty());
        assert!(names(&dir.join("tmp")).is_empty());
    }

    #[test]
    fn new_not_a_directory_leaves_nothing() {
        let t = TestDir::new("md-newfile");
        let dir = t.path().join("box");
        fs::create_dir_all(dir.join("tmp")).expect("tmp");
        fs::write(dir.join("new"), b"").expect("new as a file");
        let mut b = body(&t, b"x");
        assert!(deliver(&dir, None, "h", b"", &mut b).is_err());
        assert!(names(&dir.join("tmp")).is_empty());
        assert_eq!(fs::read(dir.join("new")).expect("still a file"), b"");
    }

    #[test]
    fn sweep_removes_only_old_tmp_files() {
        let t = TestDir::new("sweep");
        let dir = t.path().join("alice");
        prepare(&dir, None, Sharing::default()).expect("maildir");
        fs::write(dir.join("tmp").join("fresh"), b"x").expect("write");
        assert_eq!(sweep_tmp(&dir, std::time::Duration::from_secs(3600)), 0);
        assert_eq!(sweep_tmp(&dir, std::time::Duration::ZERO), 1);
        assert!(fs::read_dir(dir.join("tmp")).expect("tmp").next().is_none());
        assert_eq!(
            sweep_tmp(&t.path().join("none"), std::time::Duration::ZERO),
            0
        );
        // A folder with a tmp/ but no new/ and cur/ is not a Maildir: its
        // files are someone's, and stay.
        let home = t.path().join("bob");
        fs::create_dir_all(home.join("tmp")).expect("mkdir");
        fs::write(home.join("tmp").join("notes.txt"), b"mine").expect("write");
        fs::create_dir(home.join("new")).expect("mkdir");
        assert_eq!(sweep_tmp(&home, std::time::Duration::ZERO), 0);
        assert_eq!(
            fs::read(home.join("tmp").join("notes.txt")).expect("kept"),
            b"mine"
        );
        // A tmp/ that is a symlink is not followed: what it points at (the
        // queue, say) is not the Maildir's to sweep.
        let carol = t.path().join("carol");
        prepare(&carol, None, Sharing::default()).expect("maildir");
        let elsewhere = t.path().join("queue");
        fs::create_dir(&elsewhere).expect("mkdir");
        fs::write(elsewhere.join("entry"), b"queued").expect("write");
        fs::remove_dir(carol.join("tmp")).expect("rmdir");
        std::os::unix::fs::symlink(&elsewhere, carol.join("tmp")).expect("symlink");
        assert_eq!(sweep_tmp(&carol, std::time::Duration::ZERO), 0);
        assert_eq!(fs::read(elsewhere.join("entry")).expect("kept"), b"queued");
    }

    #[test]
    fn shared_maildirs_get_the_group_and_mode_asked_for() {
        use std::os::unix::fs::MetadataExt;
        let t = TestDir::new("md-share");
        let root = t.path().join("mail");
        let dir = root.join("alice");
        let gid = nix::unistd::getegid().as_raw();
        let sharing = Sharing {
            file_mode: 0o640,
            gid: Some(gid),
        };
        assert_eq!((sharing.dir_mode(), sharing.umask()), (0o750, Some(0o027)));
        // As the server does at start (in this test process: harmless, every
        // other file here is made with an owner-only mode of its own).
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
        prepare(&dir, Some(&root), sharing).expect("prepare");
        let mut body = body(&t, b"\r\nhi\r\n");
        let path = deliver_prepared(&dir, "h", b"H: 1\r\n", &mut body, sharing).expect("deliver");
        for d in [
            &root,
            &dir,
            &dir.join("tmp"),
            &dir.join("new"),
            &dir.join("cur"),
        ] {
            let m = fs::metadata(d).expect("dir");
            assert_eq!(
                (m.mode() & 0o7777, m.gid()),
                (0o750, gid),
                "{}",
                d.display()
            );
        }
        let m = fs::metadata(&path).expect("file");
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o640, gid));
        // A directory that already exists is left as it is.
        let other = root.join("bob");
        fs::create_dir(&other).expect("mkdir");
        fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        prepare(&other, Some(&root), sharing).expect("prepare");
        assert_eq!(fs::metadata(&other).expect("dir").mode() & 0o7777, 0o700);
        // A setgid bit a new directory inherits is kept (Debian's /var/mail
        // is 2775), with the group it brings.
        let setgid_root = t.path().join("var-mail");
        fs::create_dir(&setgid_root).expect("mkdir");
        fs::set_permissions(
            &setgid_root,
            std::os::unix::fs::PermissionsExt::from_mode(0o2775),
        )
        .expect("chmod");
        let only_mode = Sharing {
            file_mode: 0o640,
            gid: None,
        };
        prepare(&setgid_root.join("dave"), Some(&setgid_root), only_mode).expect("prepare");
        let m = fs::metadata(setgid_root.join("dave/new")).expect("dir");
        assert_eq!(m.mode() & 0o7777, 0o2750);
        // The default stays owner-only.
        let private_root = t.path().join("private");
        let private = private_root.join("carol");
        prepare(&private, Some(&private_root), Sharing::default()).expect("prepare");
        assert_eq!(
            fs::metadata(private.join("new")).expect("dir").mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn a_draft_is_in_new_only_once_published() {
        let t = TestDir::new("md-draft");
        let dir = t.path().join("box");
        prepare(&dir, None, Sharing::default()).expect("prepare");
        let mut draft = Draft::create(&dir, "h", b"H: 1\r\n", Sharing::default()).expect("create");
        draft.file().write_all(b"\r\nbody\r\n").expect("write");
        assert_eq!(names(&dir.join("tmp")).len(), 1);
        assert!(names(&dir.join("new")).is_empty());
        let path = draft.publish().expect("publish");
        assert_eq!(fs::read(&path).expect("read"), b"H: 1\r\n\r\nbody\r\n");
        assert!(names(&dir.join("tmp")).is_empty());

        let mut dropped =
            Draft::create(&dir, "h", b"H: 2\r\n", Sharing::default()).expect("create");
        dropped.file().write_all(b"partial").expect("write");
        drop(dropped);
        assert!(names(&dir.join("tmp")).is_empty());
        assert_eq!(names(&dir.join("new")).len(), 1);
    }

    #[test]
    fn sweep_removes_a_tmp_name_left_beside_a_delivered_message() {
        use std::os::unix::fs::MetadataExt;
        // A rename into new/ whose removal from tmp/ did not reach the disk:
        // two names, counted as two. The tmp/ name goes, the message stays.
        let t = TestDir::new("sweep-twice");
        let dir = t.path().join("alice");
        let mut b = body(&t, b"delivered\r\n");
        let delivered = deliver(&dir, None, "h", b"", &mut b).expect("deliver");
        let unique = delivered.file_name().expect("name").to_string_lossy();
        let unique = unique.split(",S=").next().expect("unique").to_owned();
        fs::hard_link(&delivered, dir.join("tmp").join(&unique)).expect("link");
        fs::write(dir.join("tmp").join("crashed"), b"half").expect("leftover");

        assert_eq!(sweep_tmp(&dir, std::time::Duration::ZERO), 2);
        assert!(names(&dir.join("tmp")).is_empty());
        assert_eq!(fs::read(&delivered).expect("still there"), b"delivered\r\n");
        let inodes = delivered_inodes(&dir);
        let ino = fs::metadata(&delivered).expect("meta").ino();
        assert_eq!(inodes.into_iter().collect::<Vec<_>>(), vec![ino]);
    }

    #[test]
    fn failed_copy_removes_tmp_file() {
        let t = TestDir::new("md-fail");
        let dir = t.path().join("box");
        // A write-only handle: reading the body fails after the tmp file exists.
        let p = t.path().join("wo");
        fs::write(&p, b"body").expect("write");
        let mut wo = OpenOptions::new().write(true).open(&p).expect("open wo");
        assert!(deliver(&dir, None, "h", b"header", &mut wo).is_err());
        assert!(names(&dir.join("tmp")).is_empty());
        assert!(names(&dir.join("new")).is_empty());
    }
}
