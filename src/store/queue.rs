//! The on-disk queue under `data_dir`, laid out like OpenSMTPD's
//! `queue_fs.c` (incoming, then an atomic rename to commit):
//!
//! - `incoming/<id>/` — a message being received. Never acknowledged, so
//!   startup removes whatever a crash left here.
//! - `queue/<id>/` — committed: files `message` (headers + body as received)
//!   and `envelope` ([`super::envelope`]). A message exists for the relay
//!   exactly when this directory does; the rename from `incoming/` is the
//!   commit point, made durable by fsyncing `queue/` before the `250`.
//! - `corrupt/` — entries of `queue/` that did not parse at startup, moved
//!   aside with a warning and never deleted.
//!
//! This file owns those directories and the life of an entry (begin, commit,
//! update, remove); it does not decide what to deliver or when (the relay
//! does), nor read the message content. Ids come from [`super::new_id`] and are
//! checked with [`super::is_valid_id`] wherever one arrives from outside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::envelope::Envelope;
use super::{at, check_real_dir, create_dir_durable, group, is_valid_id, new_id, sync_dir};

const MESSAGE: &str = "message";
const ENVELOPE: &str = "envelope";
/// Where [`Queue::save`] writes the next envelope before renaming it over the old one.
const ENVELOPE_NEW: &str = "envelope.new";
/// Envelope files larger than this are treated as corrupt rather than read
/// into memory (a real one is ~100 bytes plus ~1 KiB per recipient at worst).
const MAX_ENVELOPE_BYTES: u64 = 16 << 20;

/// The queue directories under one `data_dir`.
#[derive(Debug)]
pub struct Queue {
    incoming: PathBuf,
    queue: PathBuf,
    corrupt: PathBuf,
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
        let q = Queue {
            incoming: data_dir.join("incoming"),
            queue: data_dir.join("queue"),
            corrupt: data_dir.join("corrupt"),
        };
        create_dir_durable(&q.incoming)?;
        create_dir_durable(&q.queue)?;
        q.sweep_incoming()?;
        let ids = q.scan_queue()?;
        Ok((q, ids))
    }

    /// Removes every entry of `incoming/`.
    fn sweep_incoming(&self) -> io::Result<()> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.incoming).map_err(at(&self.incoming))? {
            let entry = entry.map_err(at(&self.incoming))?;
            let path = entry.path();
            if fs::symlink_metadata(self.queue.join(entry.file_name())).is_ok() {
                // Only after a rename that was not fully durable: the committed
                // copy wins, and removing this name could remove its contents.
                log::warn!(
                    "queue: incoming entry also committed, left alone path={}",
                    path.display()
                );
                continue;
            }
            let is_dir = entry.file_type().map_err(at(&path))?.is_dir();
            let result = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(at(&path))?;
            log::info!(
                "queue: swept unacknowledged id={}",
                entry.file_name().to_string_lossy()
            );
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.incoming)?;
        }
        Ok(())
    }

    /// Checks every entry of `queue/`; returns the good ids sorted, moves the rest aside.
    fn scan_queue(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.queue).map_err(at(&self.queue))? {
            let entry = entry.map_err(at(&self.queue))?;
            let name = entry.file_name();
            let problem = match name.to_str() {
                Some(id) if is_valid_id(id) => self.check_entry(id)?,
                _ => Some("name is not a queue id".to_owned()),
            };
            match problem {
                None => ids.push(name.to_string_lossy().into_owned()),
                Some(why) => self.move_to_corrupt(&entry.path(), &why)?,
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// `Ok(None)` if queue/<id> is a good entry, `Ok(Some(why))` if it is
    /// corrupt, `Err` for an I/O error that says nothing about the entry.
    fn check_entry(&self, id: &str) -> io::Result<Option<String>> {
        let dir = self.queue.join(id);
        if let Err(e) = check_real_dir(&dir) {
            return Ok(Some(e.to_string()));
        }
        match fs::symlink_metadata(dir.join(MESSAGE)) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Ok(Some("message is not a regular file".to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Some("message file missing".to_owned()))
            }
            Err(e) => return Err(at(&dir.join(MESSAGE))(e)),
        }
        match self.load(id) {
            Ok(env) if env.id == id => Ok(None),
            Ok(env) => Ok(Some(format!("envelope names id {:?}", env.id))),
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

    /// Starts a new message: creates `incoming/<id>/` and the file
    /// `incoming/<id>/message` (create_new, 0600), returns it.
    pub fn begin(&self) -> io::Result<Spool> {
        let mut attempt = 0;
        let (id, dir) = loop {
            attempt += 1;
            let id = new_id();
            let dir = self.incoming.join(&id);
            // An id already committed would make the commit rename fail; ids
            // are unique, so this and AlreadyExists only follow a clock jump.
            let clash = fs::symlink_metadata(self.queue.join(&id)).is_ok();
            match fs::DirBuilder::new().mode(super::DIR_MODE).create(&dir) {
                Ok(()) if !clash => break (id, dir),
                Ok(()) => {
                    let _ = fs::remove_dir(&dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 4 => {}
                Err(e) => return Err(at(&dir)(e)),
            }
            if attempt >= 4 {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: no free queue id", self.incoming.display()),
                ));
            }
        };
        let path = dir.join(MESSAGE);
        let file = match create_file(&path, true) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        log::debug!("queue: begin id={id}");
        Ok(Spool {
            id,
            dir,
            queue: self.queue.clone(),
            incoming: self.incoming.clone(),
            file,
            done: false,
        })
    }

    /// `data_dir/queue`.
    pub fn queue_dir(&self) -> &Path {
        &self.queue
    }

    /// Reads and parses `queue/<id>/envelope`. A parse failure is `InvalidData`.
    pub fn load(&self, id: &str) -> io::Result<Envelope> {
        let path = self.entry(id)?.join(ENVELOPE);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(at(&path))?;
        let mut bytes = Vec::new();
        file.take(MAX_ENVELOPE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(at(&path))?;
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

    /// `queue/<id>/message`; `InvalidInput` unless `id` is a valid id.
    pub fn message_path(&self, id: &str) -> io::Result<PathBuf> {
        Ok(self.entry(id)?.join(MESSAGE))
    }

    /// Durably replaces `queue/<id>/envelope` (id = `envelope.id`) with
    /// `envelope`, e.g. after some recipients were delivered: writes
    /// `envelope.new`, fsyncs it, renames it over `envelope`, fsyncs the entry.
    pub fn save(&self, envelope: &Envelope) -> io::Result<()> {
        let dir = self.entry(&envelope.id)?;
        check_real_dir(&dir)?;
        let tmp = dir.join(ENVELOPE_NEW);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&tmp)(e)),
        }
        write_durable_file(&tmp, &envelope.to_bytes())?;
        let dest = dir.join(ENVELOPE);
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(at(&dest)(e));
        }
        sync_dir(&dir)
    }

    /// Removes `queue/<id>` once every recipient is done (or on `queue
    /// delete`). It is first renamed into `incoming/`, so a crash halfway
    /// leaves either the whole entry in `queue/` or a leftover that startup
    /// sweeps, never a half-removed entry.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        self.remove_unsynced(id)?;
        group::sync_dir(&self.queue)
    }

    /// [`Queue::remove`] without the fsync of `queue/`: for the relay,
    /// which removes many delivered entries and then makes all of those
    /// removals durable with one [`Queue::sync_removals`]. Until then a
    /// crash can only bring an entry back (a duplicate delivery), never
    /// lose one.
    pub fn remove_unsynced(&self, id: &str) -> io::Result<()> {
        let dir = self.entry(id)?;
        check_real_dir(&dir)?;
        let trash = self.incoming.join(id);
        fs::rename(&dir, &trash).map_err(at(&dir))?;
        fs::remove_dir_all(&trash).map_err(at(&trash))?;
        log::debug!("queue: removed id={id}");
        Ok(())
    }

    /// Makes every removal so far durable (one shared fsync of `queue/`).
    pub fn sync_removals(&self) -> io::Result<()> {
        group::sync_dir(&self.queue)
    }

    /// `queue/<id>` after checking the id.
    fn entry(&self, id: &str) -> io::Result<PathBuf> {
        if !is_valid_id(id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid queue id {id:?} (expected letters A-Z and digits)"),
            ));
        }
        Ok(self.queue.join(id))
    }
}

/// Creates `path` with create_new, O_NOFOLLOW, mode 0600; readable too if `read`.
fn create_file(path: &Path, read: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(read)
        .write(true)
        .create_new(true)
        .mode(super::FILE_MODE)
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

/// A message being received into `incoming/<id>/`. Dropping it without
/// [`Spool::commit`] or [`Spool::discard`] removes the entry (best effort).
#[derive(Debug)]
pub struct Spool {
    id: String,
    /// incoming/<id>
    dir: PathBuf,
    incoming: PathBuf,
    queue: PathBuf,
    file: File,
    /// Set once commit or discard took responsibility for `dir`.
    done: bool,
}

impl Spool {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The message file, opened read-write: the caller writes the message
    /// (headers + body) through it, and may seek back and read it for local
    /// delivery.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The message file rewound to its start, for copying it elsewhere.
    pub fn rewound(&mut self) -> io::Result<&mut File> {
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(at(&self.dir.join(MESSAGE)))?;
        Ok(&mut self.file)
    }

    /// fsyncs the message file (call before delivering copies or committing).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all().map_err(at(&self.dir.join(MESSAGE)))
    }

    /// Writes the envelope to `incoming/<id>/envelope` durably (create_new,
    /// write, sync_all; the message file is fsynced again too, which is free if
    /// [`Spool::sync`] ran), fsyncs `incoming/<id>/`, then renames
    /// `incoming/<id>` to `queue/<id>` and fsyncs `queue/` (and `incoming/`).
    /// After `Ok`, the message is committed. `envelope.id` must be this
    /// spool's id (`InvalidInput` otherwise).
    ///
    /// On `Err` before the rename the entry is removed; on `Err` after it (a
    /// failed directory fsync) the entry stays queued and is picked up at the
    /// next start, so a message answered with a temporary failure may be
    /// delivered twice, but never lost.
    pub fn commit(mut self, envelope: &Envelope) -> io::Result<()> {
        if envelope.id != self.id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("envelope id {:?} is not spool id {}", envelope.id, self.id),
            ));
        }
        // Announced before the slow fsyncs, so the directory syncs other
        // sessions are about to start wait for this rename too.
        let into_queue = group::intend(&self.queue);
        let out_of_incoming = group::intend(&self.incoming);
        self.sync()?;
        write_durable_file(&self.dir.join(ENVELOPE), &envelope.to_bytes())?;
        sync_dir(&self.dir)?;
        let dest = self.queue.join(&self.id);
        fs::rename(&self.dir, &dest).map_err(at(&dest))?;
        self.done = true;
        // Both directory syncs are shared with concurrent sessions.
        into_queue.sync()?;
        // Makes the removal from incoming/ durable too, so the entry cannot
        // reappear there after a crash.
        out_of_incoming.sync()?;
        log::debug!("queue: committed id={}", self.id);
        Ok(())
    }

    /// Removes the incoming entry (used when every recipient was local and has
    /// been delivered, or on error).
    pub fn discard(mut self) -> io::Result<()> {
        self.done = true;
        fs::remove_dir_all(&self.dir).map_err(at(&self.dir))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
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
    use std::io::{Seek, SeekFrom};

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
        let mut s = q.begin().expect("begin");
        s.file().write_all(body).expect("write");
        s.sync().expect("sync");
        let id = s.id().to_owned();
        s.commit(&envelope(&id)).expect("commit");
        id
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

        let (q, ids) = Queue::open(&data).expect("reopen");
        assert_eq!(ids, vec![id1.clone(), id2.clone()], "oldest first");
        assert_eq!(q.load(&id1).expect("load"), envelope(&id1));
        let msg = q.message_path(&id2).expect("path");
        assert_eq!(
            fs::read(msg).expect("message"),
            b"Subject: 2\r\n\r\ntwo\r\n"
        );
        assert_eq!(q.queue_dir(), data.join("queue"));
    }

    #[test]
    fn spool_file_can_be_reread() {
        let t = TestDir::new("q-reread");
        let (q, _) = Queue::open(t.path()).expect("open");
        let mut s = q.begin().expect("begin");
        s.file().write_all(b"hello").expect("write");
        s.file().seek(SeekFrom::Start(0)).expect("rewind");
        let mut back = String::new();
        s.file().read_to_string(&mut back).expect("read");
        assert_eq!(back, "hello");
    }

    #[test]
    fn open_sweeps_incoming() {
        let t = TestDir::new("q-sweep");
        let (q, _) = Queue::open(t.path()).expect("open");
        let mut s = q.begin().expect("begin");
        s.file().write_all(b"half a mess").expect("write");
        let id = s.id().to_owned();
        std::mem::forget(s); // as if the process died mid-DATA
        fs::write(t.path().join("incoming/stray"), b"x").expect("stray file");
        assert_eq!(names(&t.path().join("incoming")).len(), 2);

        let (_q, ids) = Queue::open(t.path()).expect("reopen");
        assert!(ids.is_empty());
        assert!(names(&t.path().join("incoming")).is_empty(), "{id} swept");
    }

    #[test]
    fn corrupt_entries_moved_aside() {
        let t = TestDir::new("q-corrupt");
        let (q, _) = Queue::open(t.path()).expect("open");
        let good = commit_one(&q, b"good");
        let truncated = commit_one(&q, b"bad");
        let env_path = q.queue_dir().join(&truncated).join(ENVELOPE);
        let bytes = fs::read(&env_path).expect("envelope");
        fs::write(&env_path, &bytes[..bytes.len() - 4]).expect("truncate");
        let no_message = commit_one(&q, b"gone");
        fs::remove_file(q.message_path(&no_message).expect("path")).expect("rm message");
        fs::create_dir(q.queue_dir().join("not-an-id")).expect("odd dir");

        let (q, ids) = Queue::open(t.path()).expect("reopen");
        assert_eq!(ids, vec![good.clone()]);
        let corrupt = names(&t.path().join("corrupt"));
        let mut want = vec![truncated.clone(), no_message, "not-an-id".to_owned()];
        want.sort();
        assert_eq!(corrupt, want);
        assert!(q.load(&truncated).is_err());
        // The moved entry keeps its content.
        let moved = t.path().join("corrupt").join(&truncated).join(ENVELOPE);
        assert_eq!(fs::read(moved).expect("kept"), &bytes[..bytes.len() - 4]);

        // A second corrupt entry with a name already in corrupt/ does not overwrite it.
        fs::create_dir(q.queue_dir().join("not-an-id")).expect("odd dir again");
        let (_q, ids) = Queue::open(t.path()).expect("reopen again");
        assert_eq!(ids, vec![good]);
        assert_eq!(names(&t.path().join("corrupt")).len(), 4);
    }

    #[test]
    fn discard_and_drop_remove_incoming() {
        let t = TestDir::new("q-discard");
        let (q, _) = Queue::open(t.path()).expect("open");
        let s = q.begin().expect("begin");
        assert_eq!(names(&t.path().join("incoming")), vec![s.id().to_owned()]);
        s.discard().expect("discard");
        assert!(names(&t.path().join("incoming")).is_empty());

        {
            let mut s = q.begin().expect("begin");
            s.file().write_all(b"partial").expect("write");
        }
        assert!(names(&t.path().join("incoming")).is_empty());
        assert!(names(q.queue_dir()).is_empty());
    }

    #[test]
    fn commit_rejects_mismatched_envelope() {
        let t = TestDir::new("q-mismatch");
        let (q, _) = Queue::open(t.path()).expect("open");
        let s = q.begin().expect("begin");
        let e = s.commit(&envelope("OTHER")).expect_err("mismatch");
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
                q.message_path(bad).expect_err(bad).kind(),
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
        assert_eq!(names(&q.queue_dir().join(&id)), vec![ENVELOPE, MESSAGE]);

        q.remove(&id).expect("remove");
        assert!(names(q.queue_dir()).is_empty());
        assert!(names(&t.path().join("incoming")).is_empty());
        assert_eq!(
            q.load(&id).expect_err("gone").kind(),
            io::ErrorKind::NotFound
        );
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
