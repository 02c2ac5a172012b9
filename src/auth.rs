//! Inbound AUTH credentials: the users file, password checks and `postling passwd`.
//!
//! Owns the `[auth] users_file` format (`user:HASH`, one a line) and the
//! question "is this the password of this user?". HASH is SHA-512-crypt
//! (`$6$`, as `openssl passwd -6` makes it) or Argon2id (`$argon2id$`, as
//! `postling passwd` makes it); Argon2id is verified by the RustCrypto
//! crate, SHA-512-crypt by [`sha512_crypt`] on ring's SHA-512, both with
//! constant-time comparisons. Weaker or unknown schemes (plain
//! text, `$1$`, `$5$`, bcrypt, yescrypt) are refused when the file is loaded,
//! so a bad line is a startup error naming the file and line, never a
//! silent "535" at AUTH time.
//!
//! It does not speak SMTP or SASL (that is `smtp::sasl` and the session), it
//! does not delay or count failed attempts (the session does), and it never
//! logs a password or a hash. It does bound how many checks run at once:
//! an Argon2id check takes 19 MiB while it runs, and AUTH attempts need no
//! valid user, so a burst of them must not take a small box's memory.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

mod sha512_crypt;

/// The longest password `run_passwd` reads, in bytes. Far above any real
/// password; it only bounds what a stray `postling passwd u < bigfile` reads.
const MAX_PASSWORD_LEN: usize = 1024;

/// Password checks that may run at once, in the whole process. With the
/// default Argon2id parameters (m=19456 KiB) that is at most 38 MiB; other
/// sessions wait for a turn.
const MAX_CHECKS: usize = 2;

/// Checks running now, and the signal that one ended.
static RUNNING: Mutex<usize> = Mutex::new(0);
static ENDED: Condvar = Condvar::new();

/// A turn to run one password check; the next waiter's when dropped.
struct Turn;

impl Turn {
    fn wait() -> Turn {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        while *running >= MAX_CHECKS {
            running = ENDED.wait(running).unwrap_or_else(PoisonError::into_inner);
        }
        *running += 1;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        *running -= 1;
        drop(running);
        ENDED.notify_one();
    }
}

/// The users who may AUTH, each with a password hash checked at load.
pub struct Users {
    users: HashMap<String, Hash>,
    /// Checked instead when the user does not exist, so that an unknown
    /// user costs the same time as a known one (see `verify`).
    dummy: Hash,
}

/// A validated hash string and the scheme that verifies it.
#[derive(Clone)]
enum Hash {
    /// `$6$[rounds=N$]salt$hash`.
    Sha512(String),
    /// `$argon2id$v=19$m=..,t=..,p=..$salt$hash`.
    Argon2id(String),
}

impl Hash {
    fn verify(&self, password: &str) -> bool {
        match self {
            // Parsed when the file was loaded, so this cannot fail.
            Hash::Sha512(s) => sha512_crypt::parse(s)
                .is_ok_and(|hash| sha512_crypt::matches(&hash, password.as_bytes())),
            Hash::Argon2id(s) => Argon2::default()
                .verify_password(password.as_bytes(), s.as_str())
                .is_ok(),
        }
    }

    /// The same scheme, parameters and salt with an all-zero digest: it
    /// costs exactly what this hash costs to check, and no password matches it.
    fn dummy(&self) -> Hash {
        let (s, zero) = match self {
            Hash::Sha512(s) => (s, '.'),   // crypt base64: '.' is 0
            Hash::Argon2id(s) => (s, 'A'), // standard base64: 'A' is 0
        };
        // Validated at load: every hash has a '$' before its digest field.
        let cut = s.rfind('$').map_or(0, |i| i + 1);
        let digest_len = s.len() - cut;
        let zeroed = format!("{}{}", &s[..cut], zero.to_string().repeat(digest_len));
        match self {
            Hash::Sha512(_) => Hash::Sha512(zeroed),
            Hash::Argon2id(_) => Hash::Argon2id(zeroed),
        }
    }

    fn is_sha512(&self) -> bool {
        matches!(self, Hash::Sha512(_))
    }
}

/// Why the users file cannot be used: the file, the line (when one line is
/// at fault) and what is wrong with it. Never contains a hash or password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersError {
    pub path: PathBuf,
    /// 1-based; `None` for whole-file problems (cannot read, mode).
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for UsersError {}

impl Users {
    /// Reads and parses the users file. `user:HASH` lines; `#` comments and
    /// blank lines are ignored; HASH is `$6$...` or `$argon2id$...`. The file
    /// must not be readable (or writable) by group or others: it holds
    /// hashes an attacker could brute-force offline.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let whole = |message: String| UsersError {
            path: path.to_path_buf(),
            line: None,
            message,
        };
        let mut file = File::open(path).map_err(|e| whole(format!("cannot open: {e}")))?;
        // The mode of the file we opened, not of whatever the path names now.
        let mode = file
            .metadata()
            .map_err(|e| whole(format!("cannot stat: {e}")))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(whole(format!(
                "is mode {:04o}; must not be readable by others (chmod 600)",
                mode & 0o7777
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| whole(format!("cannot read: {e}")))?;
        Users::parse(&text, path)
    }

    /// Parses users-file text; `path` is only used in error messages. Does
    /// not check the file mode (`load` does).
    pub fn parse(text: &str, path: &Path) -> Result<Users, UsersError> {
        let mut users = HashMap::new();
        let mut order = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let at = |message: String| UsersError {
                path: path.to_path_buf(),
                line: Some(i + 1),
                message,
            };
            let line = raw.trim_end();
            if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(at("expected user:HASH, found no ':'".into()));
            };
            if hash.contains(':') {
                return Err(at(
                    "expected user:HASH, found more than one ':' (a user name cannot contain ':')"
                        .into(),
                ));
            }
            check_user_name(user).map_err(|m| at(m.into()))?;
            let hash = parse_hash(hash).map_err(&at)?;
            if users.insert(user.to_string(), hash.clone()).is_some() {
                return Err(at(format!("duplicate user \"{user}\"")));
            }
            order.push(hash);
        }
        // The dummy is of the kind most users have, with the parameters of
        // the first such user; with no users at all, today's default.
        let sha = order.iter().filter(|h| h.is_sha512()).count();
        let want_sha = sha * 2 > order.len();
        let dummy = match order.iter().find(|h| h.is_sha512() == want_sha) {
            Some(h) => h.dummy(),
            None => default_dummy(),
        };
        Ok(Users { users, dummy })
    }

    /// True when `password` is `user`'s password. An unknown user is checked
    /// against a dummy hash of the same scheme and cost as the file's users,
    /// so the time taken does not tell who exists. Waits for a turn when
    /// [`MAX_CHECKS`] checks are running.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        // SHA-512-crypt's work grows with the square of the password's
        // length (9 KB fit in an AUTH line): no real password is this long,
        // and refusing it costs nothing, whoever the user.
        if password.len() > MAX_PASSWORD_LEN {
            return false;
        }
        let _turn = Turn::wait();
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                // The result is always false; the work is the point.
                let _ = std::hint::black_box(self.dummy.verify(password));
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl fmt::Debug for Users {
    /// Names only; hashes are not for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Users").field("users", &names).finish()
    }
}

/// A dummy Argon2id hash with the default parameters `passwd_line` uses.
fn default_dummy() -> Hash {
    Hash::Argon2id(
        "$argon2id$v=19$m=19456,t=2,p=1$cG9zdGxpbmdkdW1teXNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .to_string(),
    )
}

/// A user name must be non-empty, without ':' (the separator), whitespace or
/// control characters, and must not start with '#' (a comment line).
fn check_user_name(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        Err("empty user name")
    } else if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("user name contains whitespace or a control character")
    } else if user.contains(':') {
        Err("user name contains ':'")
    } else if user.starts_with('#') {
        Err("user name starts with '#'")
    } else {
        Ok(())
    }
}

/// Checks the shape and parameters of a hash, so that a line that loads is
/// a line that can verify.
fn parse_hash(hash: &str) -> Result<Hash, String> {
    const USE: &str = "use `openssl passwd -6` or `postling passwd`";
    if hash.starts_with("$6$") {
        sha512_crypt::parse(hash).map_err(|m| format!("bad SHA-512-crypt hash: {m}"))?;
        return Ok(Hash::Sha512(hash.to_string()));
    }
    if hash.starts_with("$argon2id$") {
        check_argon2id(hash).map_err(|m| format!("bad Argon2id hash: {m}"))?;
        return Ok(Hash::Argon2id(hash.to_string()));
    }
    let scheme = match hash.split('$').nth(1) {
        _ if hash.is_empty() => return Err(format!("empty password hash; {USE}")),
        _ if !hash.starts_with('$') => {
            return Err(format!("password is not a hash (plain text?); {USE}"));
        }
        Some("1") => "MD5-crypt ($1$)",
        Some("5") => "SHA-256-crypt ($5$)",
        Some("2" | "2a" | "2b" | "2x" | "2y") => "bcrypt",
        Some("y") => "yescrypt ($y$)",
        Some("argon2i" | "argon2d") => "Argon2i/Argon2d (only Argon2id is)",
        _ => "this hash scheme",
    };
    Err(format!(
        "{scheme} is not accepted; HASH must be $6$ (SHA-512-crypt) or $argon2id$; {USE}"
    ))
}

fn check_argon2id(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| e.to_string())?;
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return Err("not argon2id".into());
    }
    if let Some(v) = parsed.version {
        argon2::Version::try_from(v).map_err(|_| format!("unknown version v={v}"))?;
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("parameters: {e}"))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("missing salt or digest".into());
    }
    Ok(())
}

/// A new `user:$argon2id$...` line for the users file: Argon2id with the
/// crate's default (OWASP) parameters and a random salt from the OS.
pub fn passwd_line(user: &str, password: &str) -> Result<String, String> {
    check_user_name(user).map_err(|m| format!("{m}: {user:?}"))?;
    if password.is_empty() {
        return Err("empty password".into());
    }
    let hash = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| format!("cannot hash the password: {e}"))?;
    Ok(format!("{user}:{hash}"))
}

/// `postling passwd USER`: reads the password as one line from `input`
/// (standard input; the trailing newline is dropped) and prints the users-file
/// line to `out`. Either type the password (it is echoed: postling does not
/// switch terminal echo off) or redirect it, e.g.
/// `postling passwd alice < pw.txt >> /etc/postling/users`.
pub fn run_passwd(user: &str, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<(), String> {
    check_user_name(user).map_err(|m| format!("{m}: {user:?}"))?;
    let mut line = String::new();
    let limit = MAX_PASSWORD_LEN as u64 + 2; // room for "\r\n"
    input
        .take(limit)
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let ended = line.ends_with('\n');
    let password = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line);
    if password.len() > MAX_PASSWORD_LEN || (!ended && line.len() as u64 == limit) {
        return Err(format!(
            "password longer than {MAX_PASSWORD_LEN} bytes on standard input"
        ));
    }
    if password.is_empty() {
        return Err("empty password (reads one line from standard input)".into());
    }
    let entry = passwd_line(user, password)?;
    writeln!(out, "{entry}").map_err(|e| format!("cannot write: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl passwd -6 -salt saltsalt secret`
    const SHA_SECRET: &str = "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";
    /// `openssl passwd -6 -salt 'rounds=5000$saltsalt' secret`
    const SHA_ROUNDS: &str = "$6$rounds=5000$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";
    /// `openssl passwd -6 -salt 'rounds=1000$pepper' 'pässwörd ☃'`
    const SHA_UTF8: &str = "$6$rounds=1000$pepper$jF/B8G3Gv/BVx2MW0..bQVzIz4e1gYwQqCz1gbYK/.KYoizo9IywuPyEbwWKOeHb0LHhrUu3hwM2s01zuBeut/";

    fn parse(text: &str) -> Result<Users, UsersError> {
        Users::parse(text, Path::new("/etc/postling/users"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("parsed: {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sha512_crypt_vectors() {
        let users = parse(&format!(
            "# comment\n\nalice:{SHA_SECRET}\nbob:{SHA_ROUNDS}\r\ncarol:{SHA_UTF8}\n"
        ))
        .unwrap();
        assert_eq!(users.len(), 3);
        assert!(users.verify("alice", "secret"));
        assert!(!users.verify("alice", "Secret"));
        assert!(!users.verify("alice", ""));
        assert!(users.verify("bob", "secret"));
        assert!(!users.verify("bob", "secret "));
        assert!(users.verify("carol", "pässwörd ☃"));
        assert!(!users.verify("carol", "passwort ☃"));
        assert!(!users.verify("dave", "secret"));
        assert!(!users.verify("Alice", "secret"));
        // Longer than any real password: refused without hashing it.
        let long = "x".repeat(MAX_PASSWORD_LEN + 1);
        let long_users = parse(&format!("{}\n", passwd_line("eve", &long).unwrap())).unwrap();
        assert!(!long_users.verify("eve", &long));
    }

    #[test]
    fn argon2id_round_trip() {
        let line = passwd_line("alice", "correct horse ☃").unwrap();
        assert!(
            line.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
            "{line}"
        );
        let users = parse(&format!("{line}\nbob:{SHA_SECRET}\n")).unwrap();
        assert!(users.verify("alice", "correct horse ☃"));
        assert!(!users.verify("alice", "correct horse"));
        assert!(!users.verify("mallory", "correct horse ☃"));
        // Two lines for the same password differ: the salt is random.
        assert_ne!(line, passwd_line("alice", "correct horse ☃").unwrap());
    }

    #[test]
    fn dummy_matches_the_files_kind_and_never_verifies() {
        let sha = parse(&format!("a:{SHA_ROUNDS}\nb:{SHA_SECRET}\n")).unwrap();
        match &sha.dummy {
            Hash::Sha512(s) => {
                assert!(s.starts_with("$6$rounds=5000$saltsalt$"));
                assert!(sha512_crypt::parse(s).is_ok(), "{s}");
            }
            Hash::Argon2id(_) => panic!("expected a SHA-512-crypt dummy"),
        }
        assert!(!sha.dummy.verify("secret"));
        let empty = parse("# nobody yet\n").unwrap();
        assert!(empty.is_empty());
        match &empty.dummy {
            Hash::Argon2id(s) => assert!(check_argon2id(s).is_ok()),
            Hash::Sha512(_) => panic!("expected an Argon2id dummy"),
        }
        assert!(!empty.verify("anyone", "secret"));
        let line = passwd_line("x", "pw").unwrap();
        let argon = parse(&format!("{line}\n")).unwrap();
        match &argon.dummy {
            Hash::Argon2id(s) => assert!(check_argon2id(s).is_ok(), "{s}"),
            Hash::Sha512(_) => panic!("expected an Argon2id dummy"),
        }
        assert!(!argon.dummy.verify("pw"));
    }

    #[test]
    fn file_errors_name_the_line() {
        const F: &str = "/etc/postling/users";
        let cases: &[(&str, &str)] = &[
            ("alice:secret\n", ":1: password is not a hash"),
            (
                "# c\nalice:$1$salt$abc\n",
                ":2: MD5-crypt ($1$) is not accepted",
            ),
            (
                "\n\nalice:$5$salt$abc\n",
                ":3: SHA-256-crypt ($5$) is not accepted",
            ),
            (
                "alice:$2b$12$abcdefghijklmnopqrstuu\n",
                ":1: bcrypt is not accepted",
            ),
            (
                "alice:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAA\n",
                ":1: Argon2i/Argon2d",
            ),
            ("alice:$7$foo\n", ":1: this hash scheme is not accepted"),
            ("alice:\n", ":1: empty password hash"),
            ("alice\n", ":1: expected user:HASH, found no ':'"),
            (
                "a:b:$6$x$y\n",
                ":1: expected user:HASH, found more than one ':'",
            ),
            ("al ice:$6$x$y\n", ":1: user name contains whitespace"),
            (" alice:$6$x$y\n", ":1: user name contains whitespace"),
            (":$6$x$y\n", ":1: empty user name"),
            (
                "alice:$6$saltsalt$short\n",
                ":1: bad SHA-512-crypt hash: digest is 5 characters",
            ),
            (
                "alice:$6$rounds=10$s$x\n",
                ":1: bad SHA-512-crypt hash: rounds must be",
            ),
            ("alice:$6$a$b$c$d\n", ":1: bad SHA-512-crypt hash: expected"),
            (
                "alice:$argon2id$v=19$m=oops$c2FsdA$AAAA\n",
                ":1: bad Argon2id hash",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(F), "{text:?}: {got}");
            assert!(got.contains(want), "{text:?}: {got} (want {want})");
            assert!(!got.contains("secret"), "{got}");
        }
        let dup = err(&format!("alice:{SHA_SECRET}\n\nalice:{SHA_ROUNDS}\n"));
        assert_eq!(dup, format!("{F}:3: duplicate user \"alice\""));
    }

    #[test]
    fn load_refuses_group_or_other_access() {
        let scratch = crate::store::testdir::TestDir::new("auth");
        let dir = scratch.path();
        let path = dir.join("users");
        std::fs::write(&path, format!("alice:{SHA_SECRET}\n")).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Users::load(&path).unwrap_err();
            assert_eq!(e.line, None);
            assert!(
                e.to_string()
                    .ends_with("must not be readable by others (chmod 600)"),
                "{e}"
            );
            assert!(
                e.to_string().starts_with(&path.display().to_string()),
                "{e}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let users = Users::load(&path).unwrap();
        assert!(users.verify("alice", "secret"));
        std::fs::write(&path, "alice:plain\n").unwrap();
        assert_eq!(Users::load(&path).unwrap_err().line, Some(1));
        let missing = Users::load(&dir.join("nope")).unwrap_err();
        assert!(missing.to_string().contains("cannot open"), "{missing}");
    }

    #[test]
    fn debug_shows_names_not_hashes() {
        let users = parse(&format!("alice:{SHA_SECRET}\n")).unwrap();
        let s = format!("{users:?}");
        assert!(s.contains("alice") && !s.contains("$6$"), "{s}");
    }

    #[test]
    fn run_passwd_reads_one_line() {
        let mut out = Vec::new();
        run_passwd(
            "alice",
            &mut &b"s3cret \xe2\x98\x83\r\nignored\n"[..],
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.strip_suffix('\n').unwrap();
        assert!(!line.contains('\n'));
        let users = parse(&text).unwrap();
        assert!(users.verify("alice", "s3cret ☃"));
        // No trailing newline at EOF is fine too.
        let mut out = Vec::new();
        run_passwd("bob", &mut &b"pw"[..], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("bob:$argon2id$") && text.ends_with('\n'),
            "{text}"
        );
        assert_eq!(parse(&text).unwrap().len(), 1);

        let fails: &[(&str, &[u8], &str)] = &[
            ("alice", b"\n", "empty password"),
            ("alice", b"", "empty password"),
            ("al:ice", b"pw\n", "contains ':'"),
            ("#alice", b"pw\n", "starts with '#'"),
            ("", b"pw\n", "empty user name"),
            ("alice", b"\xff\xfe\n", "cannot read"),
        ];
        for (user, input, want) in fails {
            let mut out = Vec::new();
            let e = run_passwd(user, &mut &input[..], &mut out).unwrap_err();
            assert!(e.contains(want), "{user:?} {input:?}: {e}");
            assert!(out.is_empty());
        }
        let long = vec![b'x'; MAX_PASSWORD_LEN + 1];
        let e = run_passwd("alice", &mut &long[..], &mut Vec::new()).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        let exact = vec![b'x'; MAX_PASSWORD_LEN];
        run_passwd("alice", &mut &exact[..], &mut Vec::new()).unwrap();
    }
}
