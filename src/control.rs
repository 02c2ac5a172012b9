//! The control socket: how `postling queue flush|delete` reach a running
//! daemon without touching the queue behind the relay thread's back.
//!
//! `<data_dir>/control.sock` is a Unix stream socket, mode 0600, so only the
//! user postling runs as (and root) can use it. One connection carries one
//! request line and gets one reply line:
//!
//! ```text
//! FLUSH\n          -> OK\n               try every queued message now
//! FLUSH <id>\n     -> OK\n               try that message now
//! DELETE <id>\n    -> OK\n | ERR <reason>\n
//! anything else    -> ERR unknown command\n
//! ```
//!
//! The daemon side ([`serve`]) only translates a line into a
//! [`relay::Request`]: the relay thread owns the queue at run time, so a
//! delete cannot race a delivery in progress. The request line is bounded
//! ([`MAX_REQUEST`]) and must arrive within [`READ_TIMEOUT`].
//!
//! This file does not accept connections (the acceptor does, and runs
//! [`serve`] on a thread of its own) and does not read the queue (the queue
//! tools in [`crate::queue_cli`] do). The client side is [`request`].

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{info, warn};

use crate::relay::Request;
use crate::server::Context;
use crate::store::is_valid_id;

/// The socket's file name under `data_dir`.
const SOCKET_NAME: &str = "control.sock";
/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 256;
/// The longest reply line the client reads, newline included.
const MAX_REPLY: usize = 1024;
/// How long the daemon waits for the request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon waits for the relay thread to answer a delete.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for a reply (longer than [`DELETE_TIMEOUT`]).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// `<data_dir>/control.sock`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds `<data_dir>/control.sock` with mode 0600. Call it while holding the
/// data_dir lock: a socket file already there is then stale (left by a
/// killed daemon) and is removed first. Anything else at that name (a
/// regular file, a symlink) is refused. The socket is bound under a
/// temporary name, chmodded and renamed into place, so it never exists at
/// its real name with a looser mode.
pub fn bind(data_dir: &Path) -> io::Result<UnixListener> {
    bind_socket(data_dir, SOCKET_NAME, 0o600)
}

/// Binds `data_dir/name` with `mode`, the way [`bind`] does (stale socket
/// removed, never visible with a looser mode). Also used for the sendmail
/// submission socket.
pub fn bind_socket(data_dir: &Path, name: &str, mode: u32) -> io::Result<UnixListener> {
    let path = data_dir.join(name);
    remove_stale(&path)?;
    let tmp = data_dir.join(format!("{name}.{}.tmp", std::process::id()));
    remove_stale(&tmp)?;
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    };
    let listener = UnixListener::bind(&tmp).map_err(at(&tmp))?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(at(&path)(e));
    }
    Ok(listener)
}

/// Removes a socket file at `path`; Ok if there is none; refuses anything else.
fn remove_stale(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Handles one control connection: reads one request, answers it, returns.
/// Blocking; run it on its own thread. Errors are logged, never returned.
pub fn serve(stream: UnixStream, ctx: &Context) {
    serve_with(stream, &ctx.relay, ctx.queue.queue_dir());
}

/// [`serve`] with its two needs spelled out, so tests can stand in for the
/// relay thread: `relay` takes the requests, `queue_dir` tells an unknown
/// id apart from a failed delete.
fn serve_with(mut stream: UnixStream, relay: &Sender<Request>, queue_dir: &Path) {
    let reply = match read_request(&stream) {
        Ok(Some(line)) => answer(&line, relay, queue_dir),
        Ok(None) => "ERR request line too long or not terminated".to_owned(),
        Err(e) => {
            warn!("control: cannot read request: {e}");
            return;
        }
    };
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    if let Err(e) = stream.write_all(format!("{reply}\n").as_bytes()) {
        warn!("control: cannot send reply: {e}");
    }
}

/// The request line without its line ending; `None` when it is longer than
/// [`MAX_REQUEST`] or the peer closed before the newline.
fn read_request(stream: &UnixStream) -> io::Result<Option<String>> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut line = Vec::with_capacity(64);
    BufReader::new(stream.take(MAX_REQUEST as u64)).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    // Not UTF-8 cannot be a command; it falls through to "unknown command".
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The reply line (without newline) to one request line.
fn answer(line: &str, relay: &Sender<Request>, queue_dir: &Path) -> String {
    let mut words = line.split(' ');
    let verb = words.next().unwrap_or("");
    let arg = words.next();
    if words.next().is_some() {
        return "ERR unknown command".to_owned();
    }
    match (verb, arg) {
        ("FLUSH", None) => {
            info!("control: flush all");
            send(relay, Request::Flush(None))
        }
        ("FLUSH", Some(id)) if is_valid_id(id) => {
            info!("control: flush id={id}");
            send(relay, Request::Flush(Some(id.to_owned())))
        }
        ("DELETE", Some(id)) if is_valid_id(id) => delete(id, relay, queue_dir),
        ("FLUSH" | "DELETE", Some(_)) => "ERR invalid queue id".to_owned(),
        _ => "ERR unknown command".to_owned(),
    }
}

fn send(relay: &Sender<Request>, req: Request) -> String {
    match relay.send(req) {
        Ok(()) => "OK".to_owned(),
        Err(_) => "ERR the relay thread is not running".to_owned(),
    }
}

/// Asks the relay thread to delete `id` and waits for its answer.
fn delete(id: &str, relay: &Sender<Request>, queue_dir: &Path) -> String {
    info!("control: delete id={id}");
    let (tx, rx) = crossbeam_channel::bounded(1);
    if relay.send(Request::Delete(id.to_owned(), tx)).is_err() {
        return "ERR the relay thread is not running".to_owned();
    }
    match rx.recv_timeout(DELETE_TIMEOUT) {
        Ok(Ok(())) => "OK".to_owned(),
        Ok(Err(_)) if fs::symlink_metadata(queue_dir.join(id)).is_err() => {
            "ERR unknown id".to_owned()
        }
        Ok(Err(e)) => {
            warn!("control: delete id={id} failed: {e}");
            format!("ERR {}", one_line(&e))
        }
        Err(_) => {
            // The request stays in the relay's channel and is carried out
            // when the thread gets to it: say so, rather than "try again"
            // (which would then find no such message).
            warn!("control: delete id={id}: the relay thread is busy; the delete is queued");
            "QUEUED".to_owned()
        }
    }
}

/// `s` with control characters replaced, so a reply stays one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The client side: connects to `<data_dir>/control.sock`, sends `line`
/// (a newline is added) and returns the reply line without its newline.
/// A daemon that is not running shows as `NotFound` (no socket) or
/// `ConnectionRefused` (a stale one).
pub fn request(data_dir: &Path, line: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket_path(data_dir))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(format!("{}\n", line.trim_end_matches('\n')).as_bytes())?;
    let mut reply = Vec::new();
    BufReader::new(stream.take(MAX_REPLY as u64)).read_until(b'\n', &mut reply)?;
    if reply.pop() != Some(b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the control connection without a full reply",
        ));
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testdir::TestDir;
    use crossbeam_channel::Receiver;
    use std::thread;

    /// Runs `serve_with` on one end of a socket pair, sends `request` on the
    /// other, and returns the reply.
    fn exchange(request: &[u8], relay: &Sender<Request>, queue_dir: &Path) -> String {
        let (mut client, server) = UnixStream::pair().expect("socket pair");
        let relay = relay.clone();
        let queue_dir = queue_dir.to_path_buf();
        let t = thread::spawn(move || serve_with(server, &relay, &queue_dir));
        client.write_all(request).expect("write request");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        // A server that stops reading early closes with our bytes unread,
        // which Linux reports as a reset after the reply: keep what came.
        let mut reply = Vec::new();
        if let Err(e) = client.read_to_end(&mut reply) {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        }
        t.join().expect("serve thread");
        String::from_utf8(reply).expect("utf-8 reply")
    }

    /// A stand-in for the relay thread: answers deletes with `result`.
    fn fake_relay(result: Result<(), String>) -> (Sender<Request>, Receiver<Request>) {
        let (tx, rx) = crossbeam_channel::unbounded::<Request>();
        let (fwd_tx, fwd_rx) = crossbeam_channel::unbounded();
        thread::spawn(move || {
            for req in rx {
                if let Request::Delete(_, reply) = &req {
                    let _ = reply.send(result.clone());
                }
                let _ = fwd_tx.send(req);
            }
        });
        (tx, fwd_rx)
    }

    #[test]
    fn requests_and_replies() {
        let dir = TestDir::new("control");
        std::fs::create_dir(dir.path().join("ABC1")).expect("entry");
        let (relay, seen) = fake_relay(Ok(()));
        let cases: &[(&[u8], &str)] = &[
            (b"FLUSH\n", "OK\n"),
            (b"FLUSH ABC1\n", "OK\n"),
            (b"FLUSH ABC1\r\n", "OK\n"),
            (b"DELETE ABC1\n", "OK\n"),
            (b"DELETE abc\n", "ERR invalid queue id\n"),
            (b"FLUSH ../x\n", "ERR invalid queue id\n"),
            (b"DELETE\n", "ERR unknown command\n"),
            (b"DELETE A B\n", "ERR unknown command\n"),
            (b"flush\n", "ERR unknown command\n"),
            (b"\xff\n", "ERR unknown command\n"),
            (b"FLUSH", "ERR request line too long or not terminated\n"),
        ];
        for (req, want) in cases {
            let got = exchange(req, &relay, dir.path());
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(req));
        }
        let seen: Vec<String> = (0..4)
            .map(|_| {
                format!(
                    "{:?}",
                    seen.recv_timeout(Duration::from_secs(5)).expect("request")
                )
            })
            .collect();
        assert_eq!(seen[0], "Flush(None)");
        assert_eq!(seen[1], "Flush(Some(\"ABC1\"))");
        assert_eq!(seen[2], "Flush(Some(\"ABC1\"))");
        assert!(seen[3].starts_with("Delete(\"ABC1\""), "{seen:?}");
    }

    #[test]
    fn long_request_is_refused() {
        let dir = TestDir::new("control-long");
        let (relay, seen) = fake_relay(Ok(()));
        let mut long = b"FLUSH ".to_vec();
        long.extend(std::iter::repeat_n(b'A', MAX_REQUEST));
        long.push(b'\n');
        let got = exchange(&long, &relay, dir.path());
        assert_eq!(got, "ERR request line too long or not terminated\n");
        assert!(seen.try_recv().is_err());
    }

    #[test]
    fn failed_delete_says_why() {
        let dir = TestDir::new("control-del");
        std::fs::create_dir(dir.path().join("ABC1")).expect("entry");
        let (relay, _seen) = fake_relay(Err("disk on fire\nline two".into()));
        assert_eq!(
            exchange(b"DELETE ABC1\n", &relay, dir.path()),
            "ERR disk on fire line two\n"
        );
        assert_eq!(
            exchange(b"DELETE NOSUCH\n", &relay, dir.path()),
            "ERR unknown id\n"
        );
    }

    #[test]
    fn relay_gone() {
        let dir = TestDir::new("control-gone");
        let (relay, rx) = crossbeam_channel::unbounded::<Request>();
        drop(rx);
        assert_eq!(
            exchange(b"FLUSH\n", &relay, dir.path()),
            "ERR the relay thread is not running\n"
        );
    }

    #[test]
    fn bind_and_request_round_trip() {
        let dir = TestDir::new("control-bind");
        // A stale socket from a killed daemon is replaced.
        drop(UnixListener::bind(socket_path(dir.path())).expect("stale socket"));
        let listener = bind(dir.path()).expect("bind");
        let mode = fs::metadata(socket_path(dir.path()))
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (relay, seen) = fake_relay(Ok(()));
        let queue_dir = dir.path().to_path_buf();
        let t = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            serve_with(stream, &relay, &queue_dir);
        });
        assert_eq!(request(dir.path(), "FLUSH X1").expect("request"), "OK");
        t.join().expect("server thread");
        assert_eq!(
            format!("{:?}", seen.recv().expect("flush seen")),
            "Flush(Some(\"X1\"))"
        );
        // Nothing listens any more: the client sees ConnectionRefused.
        let e = request(dir.path(), "FLUSH").expect_err("no daemon");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        fs::remove_file(socket_path(dir.path())).expect("remove");
        let e = request(dir.path(), "FLUSH").expect_err("no socket");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn bind_refuses_a_regular_file() {
        let dir = TestDir::new("control-file");
        fs::write(socket_path(dir.path()), b"x").expect("write");
        assert_eq!(
            bind(dir.path()).expect_err("refused").kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
