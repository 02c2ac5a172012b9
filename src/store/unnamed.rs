//! Files written before they have a name: `open(dir, O_TMPFILE)` makes an
//! inode with no directory entry, and `linkat` through `/proc/self/fd/N`
//! gives it its one name once it is complete and fsynced (open(2), "O_TMPFILE",
//! which documents this pair). Against a named temporary file and a rename,
//! a message so costs one directory entry instead of two: nothing is added
//! to and removed from the temporary directory, and on ext4 without a
//! journal the file's fsync no longer writes that directory as well.
//! Measured here (BENCHMARKS.md, "Unnamed files"): a sixth to a quarter
//! less CPU per durable file, and a sixth to a third more files per second.
//!
//! A crash before the link leaves no name behind, so there is nothing to
//! sweep; the inode is freed by the journal's orphan list or by `e2fsck`.
//!
//! Not every kernel or filesystem can do this (vfat, some network and FUSE
//! filesystems), and naming the file needs `/proc`; there [`Temp`] falls
//! back to a named temporary file and a rename. This file does not choose
//! names or directories, and does not fsync anything.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::{AtFlags, AT_FDCWD};

use super::at;

/// A file being written in a temporary directory, before it is put in place.
#[derive(Debug)]
pub(crate) enum Temp {
    /// An unnamed file in this directory.
    Unnamed(PathBuf),
    /// A named file, where the filesystem has no unnamed ones.
    Named(PathBuf),
}

impl Temp {
    /// Creates a read-write file (mode 0600) in `dir`: an unnamed one where
    /// possible, else `dir/name` (create_new, O_NOFOLLOW), which fails with
    /// `AlreadyExists` if the name is taken.
    pub(crate) fn create(dir: &Path, name: &str) -> io::Result<(Temp, File)> {
        if let Some(file) = create(dir)? {
            return Ok((Temp::Unnamed(dir.to_path_buf()), file));
        }
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(super::FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(at(&path))?;
        Ok((Temp::Named(path), file))
    }

    /// The path to name in an error: the file, or the directory holding
    /// an unnamed one.
    pub(crate) fn shown(&self) -> &Path {
        match self {
            Temp::Unnamed(path) | Temp::Named(path) => path,
        }
    }

    /// Gives `file` (this one, fsynced by the caller) the name `dest` in the
    /// same filesystem: a link for an unnamed file, a rename for a named
    /// one. Never replaces an existing `dest` (`AlreadyExists`). The caller
    /// fsyncs `dest`'s directory after.
    pub(crate) fn put(&self, file: &File, dest: &Path) -> io::Result<()> {
        match self {
            Temp::Unnamed(_) => link(file, dest),
            Temp::Named(path) => {
                // rename(2) would silently replace `dest`; names are unique,
                // so this only guards against a stray file.
                if fs::symlink_metadata(dest).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{}: already exists", dest.display()),
                    ));
                }
                fs::rename(path, dest).map_err(at(dest))
            }
        }
    }

    /// Removes a named file that was not put in place; an unnamed one goes
    /// by itself when closed.
    pub(crate) fn remove(&self) -> io::Result<()> {
        match self {
            Temp::Unnamed(_) => Ok(()),
            Temp::Named(path) => fs::remove_file(path).map_err(at(path)),
        }
    }
}

/// Where this process's open files can be named by path.
const PROC_FD: &str = "/proc/self/fd";

/// Opens an unnamed read-write file (mode 0600) in directory `dir`, which
/// must not be a symlink. `Ok(None)` where the kernel, the filesystem or a
/// missing `/proc` cannot make one and name it later; other failures (no
/// such directory, no space, no permission) are errors.
fn create(dir: &Path) -> io::Result<Option<File>> {
    if !proc_mounted() || fallback_forced() {
        return Ok(None);
    }
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(super::FILE_MODE)
        .custom_flags(libc::O_TMPFILE | libc::O_NOFOLLOW)
        .open(dir);
    match opened {
        Ok(file) => Ok(Some(file)),
        // EOPNOTSUPP: this filesystem has no unnamed files; EISDIR and
        // EINVAL: a kernel older than O_TMPFILE (3.11) or a flag it refuses.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(at(dir)(e)),
    }
}

/// Gives `file`, made by [`create`], the name `dest` (in the same
/// filesystem). Never replaces: an existing `dest` is `AlreadyExists`.
/// The caller fsyncs the file before and `dest`'s directory after.
fn link(file: &File, dest: &Path) -> io::Result<()> {
    let source = format!("{PROC_FD}/{}", file.as_raw_fd());
    nix::unistd::linkat(
        AT_FDCWD,
        source.as_str(),
        AT_FDCWD,
        dest,
        AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(|errno| at(dest)(io::Error::from(errno)))
}

/// Whether `/proc/self/fd` is there (asked once: a chroot or sandbox that
/// lacks it lacks it for the life of the process).
fn proc_mounted() -> bool {
    static MOUNTED: OnceLock<bool> = OnceLock::new();
    *MOUNTED.get_or_init(|| Path::new(PROC_FD).is_dir())
}

#[cfg(not(test))]
fn fallback_forced() -> bool {
    false
}

#[cfg(test)]
thread_local! {
    static NAMED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn fallback_forced() -> bool {
    NAMED_ONLY.get()
}

/// While the returned guard lives, [`Temp::create`] on this thread makes
/// named files, as on a filesystem without unnamed ones: for the tests of
/// that path.
#[cfg(test)]
pub(crate) fn named_only() -> impl Drop {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            NAMED_ONLY.set(false);
        }
    }
    NAMED_ONLY.set(true);
    Guard
}

#[cfg(test)]
mod tests {
    use super::super::testdir::{names, TestDir};
    use super::*;
    use std::fs;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// The filesystem the tests run on: every Linux one they run on
    /// (ext4, tmpfs, btrfs, xfs, and qemu's user mode passing them
    /// through) can make unnamed files.
    fn unnamed(dir: &Path) -> File {
        create(dir)
            .expect("create")
            .expect("unnamed files on the test filesystem")
    }

    #[test]
    fn has_no_name_until_linked_then_one() {
        let t = TestDir::new("unnamed-link");
        let tmp = t.path().join("tmp");
        let new = t.path().join("new");
        fs::create_dir(&tmp).expect("tmp");
        fs::create_dir(&new).expect("new");
        let mut file = unnamed(&tmp);
        file.write_all(b"hello\r\n").expect("write");
        assert!(names(&tmp).is_empty());
        assert!(names(&new).is_empty());

        link(&file, &new.join("m1")).expect("link");
        assert!(names(&tmp).is_empty());
        assert_eq!(names(&new), ["m1"]);
        assert_eq!(fs::read(new.join("m1")).expect("read"), b"hello\r\n");
        // The handle stays usable and is the linked file.
        file.seek(SeekFrom::Start(0)).expect("seek");
        let mut back = String::new();
        file.read_to_string(&mut back).expect("read back");
        assert_eq!(back, "hello\r\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(new.join("m1"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn never_replaces_an_existing_name() {
        let t = TestDir::new("unnamed-exists");
        fs::write(t.path().join("taken"), b"first").expect("write");
        let mut file = unnamed(t.path());
        file.write_all(b"second").expect("write");
        let err = link(&file, &t.path().join("taken")).expect_err("taken");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("taken"), "{err}");
        assert_eq!(fs::read(t.path().join("taken")).expect("read"), b"first");
    }

    #[test]
    fn dropped_unlinked_leaves_nothing() {
        let t = TestDir::new("unnamed-drop");
        let mut file = unnamed(t.path());
        file.write_all(b"gone").expect("write");
        drop(file);
        assert!(names(t.path()).is_empty());
    }

    #[test]
    fn refuses_a_symlinked_or_missing_directory() {
        let t = TestDir::new("unnamed-symlink");
        let real = t.path().join("real");
        fs::create_dir(&real).expect("real");
        let link_dir = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link_dir).expect("symlink");
        let err = create(&link_dir).expect_err("symlink refused");
        assert!(err.to_string().contains("link"), "{err}");
        assert!(names(&real).is_empty());
        let err = create(&t.path().join("none")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
