//! The on-disk queue under `data_dir`. Like Postfix's queue file, an entry
//! is one file: the envelope first, the message after it; a rename from
//! `incoming/` to `queue/` is the commit (as in OpenSMTPD's `queue_fs.c`).
//!
//! - `incoming/<id>` — a message being received: its envelope
//!   ([`super::envelope`], which ends with its `end` line), then the message
//!   (headers + body as received). Never acknowledged, so startup removes
//!   everything in `incoming/`; it is also where new envelope files are
//!   written before they are renamed into `queue/`.
//! - `queue/<id>` — committed: the same file, never written again. A message
//!   exists for the relay exactly when this name does; fsyncing `queue/`
//!   after the rename makes it durable before the `250`.
//! - `queue/<id>.env` — the envelope as delivery changed it (recipients
//!   done, attempts counted), once it has; it supersedes the copy at the
//!   front of `queue/<id>`.
//! - `queue/<id>/` with files `message` and `envelope` — the layout of
//!   earlier versions. Entries of that shape are still read, updated and
//!   removed, so an upgrade with mail in the queue loses nothing; new
//!   entries never take it.
//! - `corrupt/` — entries of `queue/` that did not parse at startup, moved
//!   aside with a warning and never deleted.
//!
//! A queued message so costs one file, one fsync, one rename and a share of
//! one fsync of `queue/` (shared by concurrent sessions, [`super::group`]);
//! the directory layout cost a directory, two files and three fsyncs.
//!
//! This file owns those names and the life of an entry (begin, commit,
//! update, remove); it does not decide what to deliver or when (the relay
//! does), nor look inside the message. Ids come from [`super::new_id`] and
//! are checked with [`super::is_valid_id`] wherever one arrives from outside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::envelope::Envelope;
use super::{
    at, create_dir_durable, create_file, group, is_valid_id, new_id, shares_last_link, sync_dir,
};

/// Suffix of the file holding an entry's updated envelope.
const UPDATED: &str = ".env";
/// The earlier layout's files inside `queue/<id>/`.
const LEGACY_MESSAGE: &str = "message";
const LEGACY_ENVELOPE: &str = "envelope";
const LEGACY_ENVELOPE_NEW: &str = "envelope.new";
/// Envelopes larger than this are treated as corrupt rather than read into
/// memory (a real one is ~100 bytes plus ~1 KiB per recipient at worst).
const MAX_ENVELOPE_BYTES: u64 = 16 << 20;
/// The line that ends an envelope, with the end of the line before it.
const ENVELOPE_END: &[u8] = b"\nend\n";

/// The queue directories under one `data_dir`.
#[derive(Debug)]
pub struct Queue {
    incoming: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
}

/// The shape of a committed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `queue/<id>`: envelope, then message.
    File,
    /// `queue/<id>/{envelope,message}`: the earlier layout.
    Dir,
}

impl Queue {
    /// Creates `data_dir` (one level; it may be a symlink to a directory, as
    /// an admin's choice), `incoming/` and `queue/` durably if missing. Sweeps
    /// `incoming/` (removes every entry: they were never acknowledged), and
    /// returns the ids of every committed entry in `queue/` whose envelope
    /// parses, oldest first. Entries that are unparsable (bad name, missing or
    /// invalid envelope, missing message) are moved to `corrupt/` with a
    /// `log::warn!`. Other I/O errors (permissions, EIO) fail the open.
    pub fn open(data_dir: &Path) -> io::Result<(Queue, Vec<String>)> {
        if !fs::metadata(data_dir).map(|m| m.is_dir()).unwrap_or(false) {
            create_dir_durable(data_dir)?;
        }
        let q = Queue::at(data_dir);
        create_dir_durable(&q.incoming)?;
        create_dir_durable(&q.queue)?;
        q.sweep_incoming()?;
        let ids = q.scan_queue()?;
        Ok((q, ids))
    }

    /// The queue under `data_dir` for reading only (`mailq`, `queue show`):
    /// creates, sweeps and checks nothing, so it works beside a running
    /// daemon and on a data_dir it cannot write.
    pub fn at(data_dir: &Path) -> Queue {
        Queue {
            incoming: data_dir.join("incoming"),
            queue: data_dir.join("queue"),
            corrupt: data_dir.join("corrupt"),
        }
    }

    /// Removes every entry of `incoming/`.
    fn sweep_incoming(&self) -> io::Result<()> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.incoming).map_err(at(&self.incoming))? {
            let entry = entry.map_err(at(&self.incoming))?;
            let path = entry.path();
            let result = if entry.file_type().map_err(at(&path))?.is_dir() {
                if fs::symlink_metadata(self.queue.join(entry.file_name())).is_ok() {
                    // An entry of the earlier layout, after a rename that was
                    // not fully durable: the committed copy wins, and removing
                    // this name could remove its contents.
                    log::warn!(
                        "queue: incoming entry also committed, left alone path={}",
                        path.display()
                    );
                    continue;
                }
                fs::remove_dir_all(&path)
            } else {
                // A rename into queue/ may have left both names. Removing
                // one never removes the other, unless the disk counts one
                // link for the two.
                let meta = fs::symlink_metadata(&path).map_err(at(&path))?;
                let committed = |ino| {
                    fs::symlink_metadata(self.queue.join(entry.file_name()))
                        .is_ok_and(|c| c.ino() == ino)
                };
                if shares_last_link(meta.nlink(), meta.ino(), committed) {
                    log::warn!(
                        "queue: incoming name of a committed entry, but the filesystem \
                         counts one link for both (a crash without a journal); left \
                         alone: run e2fsck -f path={}",
                        path.display()
                    );
                    continue;
                }
                fs::remove_file(&path)
            };
            result.map_err(at(&path))?;
            log::info!(
                "queue: swept unacknowledged name={}",
                entry.file_name().to_string_lossy()
            );
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.incoming)?;
        }
        Ok(())
    }

    /// Checks every entry of `queue/`; returns the good ids sorted, moves the
    /// rest aside, and removes updated envelopes whose entry is gone.
    fn scan_queue(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut updates = Vec::new();
        let mut unread = Vec::new();
        for entry in fs::read_dir(&self.queue).map_err(at(&self.queue))? {
            let entry = entry.map_err(at(&self.queue))?;
            let name = entry.file_name();
            let problem = match name.to_str() {
                Some(id) if is_valid_id(id) => match self.check_entry(id) {
                    Ok(problem) => problem,
                    Err(e) => {
                        // One unreadable file must not keep the server
                        // (and every other message) down.
                        log::error!(
                            "queue: cannot read entry id={id}: {e}; left in place, \
                             and tried when postling next starts"
                        );
                        unread.push(id.to_owned());
                        continue;
                    }
                },
                Some(n) if n.strip_suffix(UPDATED).is_some_and(is_valid_id) => {
                    updates.push(n.to_owned());
                    continue;
                }
                _ => Some("name is not a queue id".to_owned()),
            };
            match problem {
                None => ids.push(name.to_string_lossy().into_owned()),
                Some(why) => self.move_to_corrupt(&entry.path(), &why)?,
            }
        }
        ids.sort();
        let mut orphans = 0;
        for name in updates {
            let path = self.queue.join(&name);
            let id = name.strip_suffix(UPDATED).unwrap_or_default();
            if ids.binary_search_by(|good| good.as_str().cmp(id)).is_ok()
                || unread.iter().any(|u| u == id)
            {
                continue;
            }
            if self.corrupt.join(id).exists() {
                // Its entry was just moved aside: the state goes with it.
                self.move_to_corrupt(&path, "its entry is corrupt")?;
            } else {
                // Left by a removal that a crash cut short.
                fs::remove_file(&path).map_err(at(&path))?;
                log::info!(
                    "queue: removed envelope of a removed entry path={}",
                    path.display()
                );
                orphans += 1;
            }
        }
        if orphans > 0 {
            sync_dir(&self.queue)?;
        }
        Ok(ids)
    }

    /// `Ok(None)` if queue/<id> is a good entry, `Ok(Some(why))` if it is
    /// corrupt, `Err` for an I/O error that says nothing about the entry
    /// (EACCES, EIO: the entry is left where it is, unread).
    fn check_entry(&self, id: &str) -> io::Result<Option<String>> {
        match self.open_message(id).and_then(|_| self.load(id)) {
            Ok(_) => Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::NotFound
                ) || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                Ok(Some(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Renames `path` into `corrupt/` (never over an existing name) and logs why.
    fn move_to_corrupt(&self, path: &Path, why: &str) -> io::Result<()> {
        create_dir_durable(&self.corrupt)?;
        // The entry came from read_dir, so it has a file name.
        let name = path.file_name().unwrap_or_default();
        let mut dest = self.corrupt.join(name);
        if fs::symlink_metadata(&dest).is_ok() {
            let mut renamed = name.to_os_string();
            renamed.push(format!(".{}", new_id()));
            dest = self.corrupt.join(renamed);
        }
        fs::rename(path, &dest).map_err(at(path))?;
        sync_dir(&self.corrupt)?;
        sync_dir(&self.queue)?;
        log::warn!(
            "queue: moved corrupt entry path={} to={} reason={why}",
            path.display(),
            dest.display()
        );
        Ok(())
    }

    /// Starts a new message: creates `incoming/<id>` (create_new, 0600) with
    /// a fresh id and writes `envelope(id)` at its front. The caller then
    /// writes the message through [`Spool::file`].
    pub fn begin(&self, envelope: impl FnOnce(&str) -> Envelope) -> io::Result<Spool> {
        let mut attempt = 0;
        let (id, path, mut file) = loop {
            attempt += 1;
            let id = new_id();
            let path = self.incoming.join(&id);
            // An id already committed would make the commit rename replace
            // it; ids are unique, so this and AlreadyExists only follow a
            // clock jump.
            let clash = fs::symlink_metadata(self.queue.join(&id)).is_ok();
            match create_file(&path, true) {
                Ok(file) if !clash => break (id, path, file),
                Ok(_) => {
                    let _ = fs::remove_file(&path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 4 => {}
                Err(e) => return Err(e),
            }
            if attempt >= 4 {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: no free queue id", self.incoming.display()),
                ));
            }
        };
        let envelope = envelope(&id);
        let front = envelope.to_bytes();
        let written = if envelope.id == id {
            file.write_all(&front).map_err(at(&path))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("envelope id {:?} is not spool id {id}", envelope.id),
            ))
        };
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        log::debug!("queue: begin id={id}");
        Ok(Spool {
            id,
            path,
            queue: self.queue.clone(),
            file,
            start: front.len() as u64,
            done: false,
        })
    }

    /// `data_dir/queue`.
    pub fn queue_dir(&self) -> &Path {
        &self.queue
    }

    /// Whether `id` is a committed entry (of either layout).
    pub fn contains(&self, id: &str) -> bool {
        self.locate(id).is_ok()
    }

    /// The current envelope of `id`: its updated envelope if delivery made
    /// one, else the one at the front of the entry. A parse failure, or an
    /// envelope naming another id, is `InvalidData`.
    pub fn load(&self, id: &str) -> io::Result<Envelope> {
        let (path, layout) = self.locate(id)?;
        let env = match layout {
            Layout::Dir => read_envelope_file(&path.join(LEGACY_ENVELOPE))?,
            Layout::File => match read_envelope_file(&self.updated(id)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    read_front(&mut open_nofollow(&path)?, &path)?.0
                }
                other => other?,
            },
        };
        if env.id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: envelope names id {:?}", path.display(), env.id),
            ));
        }
        Ok(env)
    }

    /// The message of `id` (headers and body, without the envelope), ready
    /// to read from its first byte.
    pub fn open_message(&self, id: &str) -> io::Result<Content> {
        let (path, layout) = self.locate(id)?;
        let path = match layout {
            Layout::Dir => path.join(LEGACY_MESSAGE),
            Layout::File => path,
        };
        let mut file = open_nofollow(&path)?;
        let meta = file.metadata().map_err(at(&path))?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: message is not a regular file", path.display()),
            ));
        }
        let start = match layout {
            Layout::Dir => 0,
            Layout::File => read_front(&mut file, &path)?.1,
        };
        file.seek(SeekFrom::Start(start)).map_err(at(&path))?;
        Ok(Content {
            file,
            start,
            len: meta.len().saturating_sub(start),
        })
    }

    /// Durably records `envelope` as the current state of its entry (id =
    /// `envelope.id`), e.g. after some recipients were delivered: writes it
    /// to `incoming/<id>.env`, fsyncs it, renames it to `queue/<id>.env`
    /// and fsyncs `queue/` (a sync shared with concurrent commits).
    pub fn save(&self, envelope: &Envelope) -> io::Result<()> {
        let id = &envelope.id;
        let (path, layout) = self.locate(id)?;
        let (tmp, dest, dir) = match layout {
            Layout::Dir => (
                path.join(LEGACY_ENVELOPE_NEW),
                path.join(LEGACY_ENVELOPE),
                path,
            ),
            Layout::File => (
                self.incoming.join(format!("{id}{UPDATED}")),
                self.updated(id),
                self.queue.clone(),
            ),
        };
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&tmp)(e)),
        }
        write_durable_file(&tmp, &envelope.to_bytes())?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(at(&dest)(e));
        }
        match layout {
            Layout::Dir => sync_dir(&dir),
            Layout::File => group::sync_dir(&dir),
        }
    }

    /// Removes `queue/<id>` once every recipient is done (or on `queue
    /// delete`), and makes that durable.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        self.remove_unsynced(id)?;
        group::sync_dir(&self.queue)
    }

    /// [`Queue::remove`] without the fsync of `queue/`: for the relay,
    /// which removes many delivered entries and then makes all of those
    /// removals durable with one [`Queue::sync_removals`]. Until then a
    /// crash can only bring an entry back (a duplicate delivery), never
    /// lose one.
    ///
    /// The entry goes first, then its updated envelope: a crash in between
    /// leaves only an envelope without an entry, which startup removes.
    /// An entry of the earlier layout is first renamed into `incoming/`, so
    /// a crash halfway leaves either the whole entry or a leftover that
    /// startup sweeps.
    pub fn remove_unsynced(&self, id: &str) -> io::Result<()> {
        let (path, layout) = self.locate(id)?;
        match layout {
            Layout::File => {
                fs::remove_file(&path).map_err(at(&path))?;
                let updated = self.updated(id);
                match fs::remove_file(&updated) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(at(&updated)(e));
                    }
                    _ => {}
                }
            }
            Layout::Dir => {
                let trash = self.incoming.join(id);
                fs::rename(&path, &trash).map_err(at(&path))?;
                fs::remove_dir_all(&trash).map_err(at(&trash))?;
            }
        }
        log::debug!("queue: removed id={id}");
        Ok(())
    }

    /// Makes every removal so far durable (one shared fsync of `queue/`).
    pub fn sync_removals(&self) -> io::Result<()> {
        group::sync_dir(&self.queue)
    }

    /// `queue/<id>` and its layout, after checking the id. `InvalidInput`
    /// for a bad id, `NotFound` if there is no such entry, `InvalidData` if
    /// the name is something else (a symlink, a device).
    fn locate(&self, id: &str) -> io::Result<(PathBuf, Layout)> {
        if !is_valid_id(id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid queue id {id:?} (expected letters A-Z and digits)"),
            ));
        }
        let path = self.queue.join(id);
        let kind = fs::symlink_metadata(&path).map_err(at(&path))?.file_type();
        let layout = if kind.is_file() {
            Layout::File
        } else if kind.is_dir() {
            Layout::Dir
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a file or directory", path.display()),
            ));
        };
        Ok((path, layout))
    }

    /// `queue/<id>.env`.
    fn updated(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}{UPDATED}"))
    }
}

/// A queued message's content: headers and body, without the envelope in
/// front of it. Reads and seeks count from the message's first byte.
#[derive(Debug)]
pub struct Content {
    file: File,
    /// Where the message starts in the file.
    start: u64,
    len: u64,
}

impl Content {
    /// The message's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for Content {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for Content {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let pos = match pos {
            SeekFrom::Start(n) => SeekFrom::Start(self.start.saturating_add(n)),
            other => other,
        };
        let at = self.file.seek(pos)?;
        match at.checked_sub(self.start) {
            Some(n) => Ok(n),
            None => {
                self.file.seek(SeekFrom::Start(self.start))?;
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "seek before the start of the message",
                ))
            }
        }
    }
}

/// Reads the envelope at the front of an entry: returns it and the offset
/// where the message begins. Reads in small steps and stops at the
/// envelope's `end` line, so a large message is not read.
fn read_front(file: &mut File, path: &Path) -> io::Result<(Envelope, u64)> {
    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let mut front = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let searched = front.len().saturating_sub(ENVELOPE_END.len() - 1);
        let n = file.read(&mut chunk).map_err(at(path))?;
        if n == 0 {
            return Err(invalid("no envelope at the front (truncated file)".into()));
        }
        front.extend_from_slice(&chunk[..n]);
        if !front.starts_with(&b"postling-envelope "[..front.len().min(18)]) {
            return Err(invalid("no envelope at the front".into()));
        }
        if let Some(p) = front[searched..]
            .windows(ENVELOPE_END.len())
            .position(|w| w == ENVELOPE_END)
        {
            let end = searched + p + ENVELOPE_END.len();
            let env = Envelope::parse(&front[..end]).map_err(|e| invalid(e.to_string()))?;
            return Ok((env, end as u64));
        }
        if front.len() as u64 > MAX_ENVELOPE_BYTES {
            return Err(invalid(format!(
                "envelope larger than {MAX_ENVELOPE_BYTES} bytes"
            )));
        }
    }
}

/// Reads and parses a file holding only an envelope.
fn read_envelope_file(path: &Path) -> io::Result<Envelope> {
    let mut bytes = Vec::new();
    open_nofollow(path)?
        .take(MAX_ENVELOPE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(at(path))?;
    if bytes.len() as u64 > MAX_ENVELOPE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: larger than {MAX_ENVELOPE_BYTES} bytes", path.display()),
        ));
    }
    Envelope::parse(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(at(path))
}

/// create_new + write + sync_all (the caller renames and syncs the directory).
fn write_durable_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = create_file(path, false)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(at(path))
}

/// A message being received into `incoming/<id>`. Dropping it without
/// [`Spool::commit`] or [`Spool::discard`] removes the file (best effort).
#[derive(Debug)]
pub struct Spool {
    id: String,
    /// incoming/<id>
    path: PathBuf,
    queue: PathBuf,
    file: File,
    /// Where the message starts, after the envelope.
    start: u64,
    /// Set once commit or discard took responsibility for `path`.
    done: bool,
}

impl Spool {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The spool file, opened read-write and positioned after the
    /// envelope: the caller appends the message (headers + body) through it.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The file positioned at the message's first byte, for copying the
    /// message elsewhere (it runs to the end of the file).
    pub fn rewound(&mut self) -> io::Result<&mut File> {
        self.file
            .seek(SeekFrom::Start(self.start))
            .map_err(at(&self.path))?;
        Ok(&mut self.file)
    }

    /// fsyncs the file (call before delivering copies or committing).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all().map_err(at(&self.path))
    }

    /// fsyncs the file (free if [`Spool::sync`] ran), renames
    /// `incoming/<id>` to `queue/<id>` and fsyncs `queue/`. After `Ok`, the
    /// message is committed.
    ///
    /// `incoming/` is not fsynced: if a crash brings the old name back
    /// beside the committed one, startup removes that name, which leaves
    /// the committed file alone.
    ///
    /// On `Err` before the rename the file is removed; on `Err` after it (a
    /// failed directory fsync) the entry stays queued and is picked up at the
    /// next start, so a message answered with a temporary failure may be
    /// delivered twice, but never lost.
    pub fn commit(mut self) -> io::Result<()> {
        // Announced before the slow fsync, so the directory syncs other
        // sessions are about to start wait for this rename too.
        let into_queue = group::intend(&self.queue);
        self.sync()?;
        let dest = self.queue.join(&self.id);
        fs::rename(&self.path, &dest).map_err(at(&dest))?;
        self.done = true;
        into_queue.sync()?;
        log::debug!("queue: committed id={}", self.id);
        Ok(())
    }

    /// Removes the incoming file (used when every recipient was local and
    /// has been delivered, or on error).
    pub fn discard(mut self) -> io::Result<()> {
        self.done = true;
        fs::remove_file(&self.path).map_err(at(&self.path))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("queue: could not remove id={}: {e}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::RcptState;
    use super::super::testdir::{names, TestDir};
    use super::*;

    fn envelope(id: &str) -> Envelope {
        Envelope::new(
            id,
            1_714_000_000,
            "bob@example.com",
            "[127.0.0.1] helo=test".into(),
            &["a@example.net"],
        )
    }

    /// Writes a message through a new spool and commits it; returns the id.
    fn commit_one(q: &Queue, body: &[u8]) -> String {
        let mut s = q.begin(envelope).expect("begin");
        s.file().write_all(body).expect("write");
        s.sync().expect("sync");
        let id = s.id().to_owned();
        s.commit().expect("commit");
        id
    }

    fn message(q: &Queue, id: &str) -> Vec<u8> {
        let mut content = q.open_message(id).expect("open message");
        let mut bytes = Vec::new();
        content.read_to_end(&mut bytes).expect("read");
        assert_eq!(content.len(), bytes.len() as u64);
        bytes
    }

    /// An entry in the layout of earlier versions: queue/<id>/{envelope,message}.
    fn legacy_entry(q: &Queue, id: &str, body: &[u8]) {
        let dir = q.queue_dir().join(id);
        fs::create_dir(&dir).expect("legacy dir");
        fs::write(dir.join(LEGACY_ENVELOPE), envelope(id).to_bytes()).expect("envelope");
        fs::write(dir.join(LEGACY_MESSAGE), body).expect("message");
    }

    #[test]
    fn commit_then_open_finds_it() {
        let t = TestDir::new("q-commit");
        let data = t.path().join("data");
        let (q, ids) = Queue::open(&data).expect("open");
        assert!(ids.is_empty());
        let id1 = commit_one(&q, b"Subject: 1\r\n\r\none\r\n");
        let id2 = commit_one(&q, b"Subject: 2\r\n\r\ntwo\r\n");
        assert!(names(&data.join("incoming")).is_empty());
        // One file per entry, nothing else.
        let mut want = vec![id1.clone(), id2.clone()];
        want.sort();
        assert_eq!(names(&data.join("queue")), want);

        let (q, ids) = Queue::open(&data).expect("reopen");
        assert_eq!(ids, vec![id1.clone(), id2.clone()], "oldest first");
        assert_eq!(q.load(&id1).expect("load"), envelope(&id1));
        assert_eq!(message(&q, &id2), b"Subject: 2\r\n\r\ntwo\r\n");
        assert!(q.contains(&id1));
        assert!(!q.contains("NOSUCHID"));
        assert_eq!(q.queue_dir(), data.join("queue"));
    }

    #[test]
    fn content_reads_and_seeks_from_the_message_start() {
        let t = TestDir::new("q-content");
        let (q, _) = Queue::open(t.path()).expect("open");
        // A message longer than one read of the front, with a line that
        // looks like an envelope's end.
        let mut body = b"Subject: x\r\n\r\nend\n".to_vec();
        body.extend(std::iter::repeat_n(b'y', 10_000));
        let id = commit_one(&q, &body);
        assert_eq!(message(&q, &id), body);

        let mut c = q.open_message(&id).expect("open");
        assert_eq!(c.seek(SeekFrom::Start(9)).expect("seek"), 9);
        let mut two = [0u8; 2];
        c.read_exact(&mut two).expect("read");
        assert_eq!(&two, b"x\r");
        assert_eq!(
            c.seek(SeekFrom::End(-1)).expect("end"),
            body.len() as u64 - 1
        );
        c.seek(SeekFrom::Start(3)).expect("seek");
        let e = c
            .seek(SeekFrom::Current(-5))
            .expect_err("into the envelope");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // A refused seek leaves the reader at the message's start.
        c.read_exact(&mut two).expect("read");
        assert_eq!(&two, b"Su");
    }

    #[test]
    fn an_envelope_longer_than_one_read_is_found_whole() {
        let t = TestDir::new("q-long");
        let (q, _) = Queue::open(t.path()).expect("open");
        let rcpts: Vec<String> = (0..300).map(|i| format!("user{i}@example.net")).collect();
        let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        let mut s = q
            .begin(|id| Envelope::new(id, 1, "a@b", "c".into(), &rcpts))
            .expect("begin");
        s.file()
            .write_all(b"Subject: many\r\n\r\nbody\r\n")
            .expect("write");
        let id = s.id().to_owned();
        s.commit().expect("commit");
        // The message is a few bytes: nearly all of the entry is envelope.
        let entry_len = fs::metadata(q.queue_dir().join(&id)).expect("entry").len();
        assert!(
            entry_len > 2 * 4096,
            "the envelope spans several reads: {entry_len}"
        );
        assert_eq!(q.load(&id).expect("load").recipients.len(), 300);
        assert_eq!(message(&q, &id), b"Subject: many\r\n\r\nbody\r\n");
    }

    #[test]
    fn spool_file_can_be_reread() {
        let t = TestDir::new("q-reread");
        let (q, _) = Queue::open(t.path()).expect("open");
        let mut s = q.begin(envelope).expect("begin");
        s.file().write_all(b"hello").expect("write");
        let mut back = String::new();
        s.rewound()
            .expect("rewind")
            .read_to_string(&mut back)
            .expect("read");
        assert_eq!(back, "hello");
    }

    #[test]
    fn open_sweeps_incoming() {
        let t = TestDir::new("q-sweep");
        let (q, _) = Queue::open(t.path()).expect("open");
        let mut s = q.begin(envelope).expect("begin");
        s.file().write_all(b"half a mess").expect("write");
        let id = s.id().to_owned();
        std::mem::forget(s); // as if the process died mid-DATA
        fs::write(t.path().join("incoming/stray"), b"x").expect("stray file");
        fs::create_dir(t.path().join("incoming/0000OLDSTYLE")).expect("old-style spool");
        fs::write(t.path().join("incoming/0000OLDSTYLE/message"), b"x").expect("old message");
        assert_eq!(names(&t.path().join("incoming")).len(), 3);

        let (_q, ids) = Queue::open(t.path()).expect("reopen");
        assert!(ids.is_empty());
        assert!(names(&t.path().join("incoming")).is_empty(), "{id} swept");
    }

    #[test]
    fn a_name_left_in_incoming_by_a_crash_does_not_touch_the_entry() {
        // A rename into queue/ whose removal from incoming/ did not reach
        // the disk: both names, one file.
        let t = TestDir::new("q-twice");
        let (q, _) = Queue::open(t.path()).expect("open");
        let id = commit_one(&q, b"committed");
        fs::hard_link(q.queue_dir().join(&id), t.path().join("incoming").join(&id)).expect("link");

        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![id.clone()]);
        assert!(names(&t.path().join("incoming")).is_empty());
        assert_eq!(message(&q, &id), b"committed");
    }

    #[test]
    fn corrupt_entries_moved_aside() {
        let t = TestDir::new("q-corrupt");
        let (q, _) = Queue::open(t.path()).expect("open");
        let good = commit_one(&q, b"good");
        // Cut inside the envelope at its front.
        let truncated = commit_one(&q, b"bad");
        let path = q.queue_dir().join(&truncated);
        let bytes = fs::read(&path).expect("entry");
        fs::write(&path, &bytes[..20]).expect("truncate");
        // Not an envelope at all.
        let garbage = commit_one(&q, b"x");
        fs::write(q.queue_dir().join(&garbage), b"Subject: no envelope\r\n").expect("garbage");
        // A bad updated envelope takes its entry and itself aside.
        let bad_update = commit_one(&q, b"y");
        fs::write(q.updated(&bad_update), b"postling-envelope 1\nid X\n").expect("bad update");
        // An envelope naming another id.
        let other = commit_one(&q, b"z");
        let mut e = q.load(&other).expect("load");
        e.id = good.clone();
        fs::write(q.updated(&other), e.to_bytes()).expect("other id");
        fs::create_dir(q.queue_dir().join("not-an-id")).expect("odd dir");
        std::os::unix::fs::symlink(q.queue_dir().join(&good), q.queue_dir().join("0LINK"))
            .expect("symlink");

        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![good.clone()]);
        let corrupt = names(&t.path().join("corrupt"));
        let mut want = vec![
            truncated.clone(),
            garbage,
            bad_update.clone(),
            format!("{bad_update}.env"),
            other.clone(),
            format!("{other}.env"),
            "not-an-id".to_owned(),
            "0LINK".to_owned(),
        ];
        want.sort();
        assert_eq!(corrupt, want);
        assert_eq!(names(q.queue_dir()), vec![good.clone()]);
        // The moved entry keeps its content.
        let moved = t.path().join("corrupt").join(&truncated);
        assert_eq!(fs::read(moved).expect("kept"), &bytes[..20]);

        // A second corrupt entry with a name already in corrupt/ does not overwrite it.
        fs::create_dir(q.queue_dir().join("not-an-id")).expect("odd dir again");
        let (_q, ids) = Queue::open(t.path()).expect("reopen again");
        assert_eq!(ids, vec![good]);
        assert_eq!(names(&t.path().join("corrupt")).len(), want.len() + 1);
    }

    #[test]
    fn an_entry_that_cannot_be_read_is_left_alone_and_the_rest_open() {
        let t = TestDir::new("q-unread");
        let (q, _) = Queue::open(t.path()).expect("open");
        let good = commit_one(&q, b"good");
        // Reading its updated envelope fails with EISDIR, as a bad sector
        // (EIO) or a file root left behind (EACCES) would.
        let unread = commit_one(&q, b"kept");
        fs::create_dir(q.updated(&unread)).expect("a directory for its .env");
        let (q, ids) = Queue::open(t.path()).expect("one bad entry does not stop the queue");
        assert_eq!(ids, vec![good.clone()]);
        // Nothing of it is moved or removed: it is not corrupt, only unread.
        assert_eq!(
            names(q.queue_dir()),
            vec![good, unread.clone(), format!("{unread}.env")]
        );
        assert!(!t.path().join("corrupt").exists());
    }

    #[test]
    fn discard_and_drop_remove_incoming() {
        let t = TestDir::new("q-discard");
        let (q, _) = Queue::open(t.path()).expect("open");
        let s = q.begin(envelope).expect("begin");
        assert_eq!(names(&t.path().join("incoming")), vec![s.id().to_owned()]);
        s.discard().expect("discard");
        assert!(names(&t.path().join("incoming")).is_empty());

        {
            let mut s = q.begin(envelope).expect("begin");
            s.file().write_all(b"partial").expect("write");
        }
        assert!(names(&t.path().join("incoming")).is_empty());
        assert!(names(q.queue_dir()).is_empty());
    }

    #[test]
    fn begin_rejects_mismatched_envelope() {
        let t = TestDir::new("q-mismatch");
        let (q, _) = Queue::open(t.path()).expect("open");
        let e = q.begin(|_| envelope("OTHER")).expect_err("mismatch");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(names(&t.path().join("incoming")).is_empty());
        assert!(names(q.queue_dir()).is_empty());
    }

    #[test]
    fn bad_ids_rejected() {
        let t = TestDir::new("q-ids");
        let (q, _) = Queue::open(t.path()).expect("open");
        for bad in ["", "../queue", "abc", "A/B", ".", "A B", "A\0"] {
            assert_eq!(
                q.load(bad).expect_err(bad).kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                q.open_message(bad).expect_err(bad).kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                q.remove(bad).expect_err(bad).kind(),
                io::ErrorKind::InvalidInput
            );
            let mut e = envelope("X");
            e.id = bad.to_owned();
            assert_eq!(
                q.save(&e).expect_err(bad).kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert_eq!(
            q.load("NOSUCHID").expect_err("missing").kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn save_and_remove() {
        let t = TestDir::new("q-save");
        let (q, _) = Queue::open(t.path()).expect("open");
        let id = commit_one(&q, b"m");
        let mut e = q.load(&id).expect("load");
        e.recipients[0].state = RcptState::Failed {
            reason: "550 5.1.1 nope".into(),
        };
        q.save(&e).expect("save");
        assert_eq!(q.load(&id).expect("reload"), e);
        e.attempts = 2;
        q.save(&e).expect("save again");
        assert_eq!(q.load(&id).expect("reload"), e);
        assert_eq!(names(q.queue_dir()), vec![id.clone(), format!("{id}.env")]);
        assert!(names(&t.path().join("incoming")).is_empty());
        assert_eq!(message(&q, &id), b"m", "the message is untouched");
        // The update survives a restart.
        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![id.clone()]);
        assert_eq!(q.load(&id).expect("reload"), e);

        q.remove(&id).expect("remove");
        assert!(names(q.queue_dir()).is_empty());
        assert!(names(&t.path().join("incoming")).is_empty());
        assert_eq!(
            q.load(&id).expect_err("gone").kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn an_envelope_left_by_a_cut_removal_is_removed_at_start() {
        let t = TestDir::new("q-orphan");
        let (q, _) = Queue::open(t.path()).expect("open");
        let id = commit_one(&q, b"m");
        let kept = commit_one(&q, b"k");
        for i in [&id, &kept] {
            let mut e = q.load(i).expect("load");
            e.attempts = 1;
            q.save(&e).expect("save");
        }
        // The crash came between the two unlinks of a removal.
        fs::remove_file(q.queue_dir().join(&id)).expect("unlink entry");

        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![kept.clone()]);
        assert_eq!(
            names(q.queue_dir()),
            vec![kept.clone(), format!("{kept}.env")]
        );
        assert!(fs::metadata(t.path().join("corrupt")).is_err());
    }

    #[test]
    fn entries_of_the_earlier_layout_are_read_updated_and_removed() {
        let t = TestDir::new("q-legacy");
        let (q, _) = Queue::open(t.path()).expect("open");
        let old = "00OLDLAYOUT";
        legacy_entry(&q, old, b"Subject: old\r\n\r\nbody\r\n");
        let new = commit_one(&q, b"new");

        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![old.to_owned(), new]);
        assert_eq!(q.load(old).expect("load"), envelope(old));
        assert_eq!(message(&q, old), b"Subject: old\r\n\r\nbody\r\n");
        let mut e = q.load(old).expect("load");
        e.attempts = 3;
        q.save(&e).expect("save");
        assert_eq!(q.load(old).expect("reload"), e);
        assert_eq!(
            names(&q.queue_dir().join(old)),
            vec![LEGACY_ENVELOPE, LEGACY_MESSAGE]
        );
        q.remove(old).expect("remove");
        assert!(!q.contains(old));
        assert!(names(&t.path().join("incoming")).is_empty());

        // A legacy entry without its message is corrupt.
        legacy_entry(&q, "0BROKEN", b"x");
        fs::remove_file(q.queue_dir().join("0BROKEN").join(LEGACY_MESSAGE)).expect("rm");
        let (_q, _) = Queue::open(t.path()).expect("reopen");
        assert_eq!(names(&t.path().join("corrupt")), vec!["0BROKEN"]);
    }

    #[test]
    fn removals_synced_together_leave_nothing_behind() {
        let t = TestDir::new("q-batch");
        let (q, _) = Queue::open(t.path()).expect("open");
        let ids: Vec<String> = (0..3).map(|_| commit_one(&q, b"m")).collect();
        for id in &ids {
            q.remove_unsynced(id).expect("remove");
        }
        q.sync_removals().expect("sync");
        assert!(names(q.queue_dir()).is_empty());
        assert!(names(&t.path().join("incoming")).is_empty());
        // A removed entry is not found again, and a bad id is refused.
        assert!(q.remove_unsynced(&ids[0]).is_err());
        assert_eq!(
            q.remove_unsynced("../x").expect_err("bad id").kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn open_refuses_symlinked_queue_dir() {
        let t = TestDir::new("q-link");
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("elsewhere");
        let data = t.path().join("data");
        fs::create_dir(&data).expect("data");
        std::os::unix::fs::symlink(&elsewhere, data.join("queue")).expect("symlink");
        let e = Queue::open(&data).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
