//! The SASL exchanges behind `AUTH PLAIN` (RFC 4616) and `AUTH LOGIN`
//! (draft-murchison-sasl-login), sans-IO.
//!
//! Owns the base64 challenges and responses of RFC 4954 section 4: the
//! optional initial response on the AUTH line (`=` meaning an empty one),
//! `334` challenges, the client's `*` to cancel, and taking PLAIN's
//! `authzid NUL authcid NUL passwd` apart. It returns what the session
//! should do next as a `Step`; it does not check passwords (`auth::Users`),
//! send replies, limit line length (the line reader: 500 5.5.6) or decide
//! whether AUTH is allowed at all (the session: TLS, 503). `Step`'s Debug
//! masks the password, so a `{:?}` in a log line cannot leak it.

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// RFC 4648 section 4 base64. Padding is optional on input: some clients
/// drop it, and it carries no information.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// base64("Username:") and base64("Password:"), the LOGIN challenges.
const USERNAME: &str = "VXNlcm5hbWU6";
const PASSWORD: &str = "UGFzc3dvcmQ6";

/// A SASL mechanism we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// Every mechanism, in the order EHLO advertises them.
    pub const ALL: [Mechanism; 2] = [Mechanism::Plain, Mechanism::Login];

    /// The mechanism named on an AUTH line; names are case-insensitive
    /// (RFC 4954 section 4).
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    /// The name as EHLO advertises it.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What the session does next.
#[derive(Clone, PartialEq, Eq)]
pub enum Step {
    /// Send `334 <base64 challenge>` (an empty challenge for PLAIN without
    /// initial response: "334 ") and wait for the client's next line.
    Challenge(&'static str),
    /// The exchange is over: verify these credentials. `authzid` is empty
    /// or equal to `user` (no proxy authorization).
    Done {
        authzid: String,
        user: String,
        password: String,
    },
    /// 501 5.5.2: bad base64 or bad PLAIN structure; the text says which
    /// and is safe to send and log.
    Malformed(&'static str),
    /// The client sent "*": 501 5.0.0 AUTH aborted (RFC 4954 section 4).
    Cancelled,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Challenge(c) => f.debug_tuple("Challenge").field(c).finish(),
            Step::Done { authzid, user, .. } => f
                .debug_struct("Done")
                .field("authzid", authzid)
                .field("user", user)
                .field("password", &format_args!("<masked>"))
                .finish(),
            Step::Malformed(why) => f.debug_tuple("Malformed").field(why).finish(),
            Step::Cancelled => f.write_str("Cancelled"),
        }
    }
}

/// Where an exchange stands. Holds no password: LOGIN's password arrives
/// in the last response and goes straight into `Step::Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// PLAIN sent "334 ": the next line is the whole message.
    Plain,
    /// LOGIN sent "334 Username:".
    LoginUser,
    /// LOGIN sent "334 Password:" for this user.
    LoginPassword { user: String },
    /// Done, malformed or cancelled: nothing more is expected.
    Over,
}

/// One AUTH exchange, from the AUTH line to its `Done`, `Malformed` or
/// `Cancelled`.
///
/// ```
/// # use postling::smtp::sasl::{Exchange, Mechanism, Step};
/// let (mut ex, step) = Exchange::start(Mechanism::Login, None);
/// assert_eq!(step, Step::Challenge("VXNlcm5hbWU6")); // "Username:"
/// assert_eq!(ex.respond("YWxpY2U="), Step::Challenge("UGFzc3dvcmQ6")); // "alice", "Password:"
/// let Step::Done { user, password, .. } = ex.respond("c2VjcmV0") else { panic!() };
/// assert_eq!((user.as_str(), password.as_str()), ("alice", "secret"));
/// ```
#[derive(Debug)]
pub struct Exchange {
    state: State,
}

impl Exchange {
    /// Starts with the optional initial response: the text after the
    /// mechanism on the AUTH line. "=" is an empty initial response (RFC
    /// 4954 section 4); since neither mechanism can use an empty one, it is
    /// treated like no initial response and the first challenge is sent.
    pub fn start(mech: Mechanism, initial: Option<&str>) -> (Exchange, Step) {
        let initial = initial.filter(|i| *i != "=");
        let mut ex = Exchange {
            state: match mech {
                Mechanism::Plain => State::Plain,
                Mechanism::Login => State::LoginUser,
            },
        };
        let step = match (initial, mech) {
            (Some(line), _) => ex.respond(line),
            (None, Mechanism::Plain) => Step::Challenge(""),
            (None, Mechanism::Login) => Step::Challenge(USERNAME),
        };
        (ex, step)
    }

    /// Feeds the client's response line (without CRLF).
    pub fn respond(&mut self, line: &str) -> Step {
        let state = std::mem::replace(&mut self.state, State::Over);
        if line == "*" {
            return Step::Cancelled;
        }
        let step = match state {
            State::Plain => decode(line).and_then(|m| plain(&m)),
            State::LoginUser => decode(line)
                .and_then(|m| text(m, "empty user name"))
                .and_then(user_name)
                .map(|user| {
                    self.state = State::LoginPassword { user };
                    Step::Challenge(PASSWORD)
                }),
            State::LoginPassword { user } => decode(line)
                .and_then(|m| text(m, "empty password"))
                .map(|password| Step::Done {
                    authzid: String::new(),
                    user,
                    password,
                }),
            State::Over => Err("no AUTH exchange in progress"),
        };
        step.unwrap_or_else(Step::Malformed)
    }
}

fn decode(line: &str) -> Result<Vec<u8>, &'static str> {
    BASE64.decode(line).map_err(|_| "invalid base64")
}

/// One LOGIN field: non-empty UTF-8 without NUL.
fn text(bytes: Vec<u8>, empty: &'static str) -> Result<String, &'static str> {
    if bytes.is_empty() {
        return Err(empty);
    }
    if bytes.contains(&0) {
        return Err("NUL in response");
    }
    String::from_utf8(bytes).map_err(|_| "response is not UTF-8")
}

/// A user name is logged, and no users-file line can hold a control
/// character or white space: one (a line feed, an escape, a space before
/// a fake `user=`, a bidi override) is refused, so it can never forge or
/// disguise a log line.
fn user_name(user: String) -> Result<String, &'static str> {
    let bad = |c: char| c.is_control() || c.is_whitespace() || crate::smtp::command::hides_text(c);
    if user.chars().any(bad) {
        return Err("control character or space in user name");
    }
    Ok(user)
}

/// RFC 4616 section 2: `[authzid] NUL authcid NUL passwd`, each UTF-8,
/// authcid and passwd non-empty.
fn plain(message: &[u8]) -> Result<Step, &'static str> {
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("PLAIN needs authzid NUL user NUL password");
    };
    let utf8 = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| "PLAIN field is not UTF-8")
    };
    let (authzid, user, password) = (utf8(authzid)?, utf8(user)?, utf8(password)?);
    if user.is_empty() {
        return Err("empty user name");
    }
    let user = user_name(user)?;
    if password.is_empty() {
        return Err("empty password");
    }
    if !authzid.is_empty() && authzid != user {
        return Err("authorization identity differs from user (proxy AUTH not supported)");
    }
    Ok(Step::Done {
        authzid,
        user,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    fn done(authzid: &str, user: &str, password: &str) -> Step {
        Step::Done {
            authzid: authzid.into(),
            user: user.into(),
            password: password.into(),
        }
    }

    /// Runs an exchange: the AUTH line's mechanism and initial response,
    /// then each client line; returns every step.
    fn run(mech: &str, initial: Option<&str>, lines: &[&str]) -> Vec<Step> {
        let mech = Mechanism::parse(mech).expect("known mechanism");
        let (mut ex, first) = Exchange::start(mech, initial);
        let mut steps = vec![first];
        steps.extend(lines.iter().map(|l| ex.respond(l)));
        steps
    }

    #[test]
    fn mechanism_names() {
        assert_eq!(Mechanism::parse("plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse("PLAIN"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse("LoGiN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse("CRAM-MD5"), None);
        assert_eq!(Mechanism::parse(""), None);
        assert_eq!(Mechanism::ALL.map(Mechanism::name), ["PLAIN", "LOGIN"]);
        assert_eq!(STANDARD.decode(USERNAME).unwrap(), b"Username:");
        assert_eq!(STANDARD.decode(PASSWORD).unwrap(), b"Password:");
    }

    #[test]
    fn plain_table() {
        let alice = b64(b"\0alice\0secret");
        let same = b64(b"alice\0alice\0secret");
        let other = b64(b"bob\0alice\0secret");
        let utf8 = b64("\0jürgen\0pässwörd ☃".as_bytes());
        let unpadded = alice.trim_end_matches('=').to_string();
        let no_nul = b64(b"alicesecret");
        let one_nul = b64(b"alice\0secret");
        let three_nul = b64(b"\0alice\0secret\0");
        let no_user = b64(b"\0\0secret");
        let no_password = b64(b"\0alice\0");
        let bad_utf8 = b64(b"\0alice\0\xff\xfe");
        let forged = b64(b"\0bob\nauth user=alice\0secret");
        let escape = b64(b"\0bob\x1b[2J\0secret");
        let control_in_password = b64(b"\0alice\0sec\tret");
        let spaced = b64(b"\0x auth user=alice\0secret");
        let bidi = b64("\0bob\u{202e}ecila\0secret".as_bytes());
        #[rustfmt::skip]
        let cases: &[(Option<&str>, &[&str], &[Step])] = &[
            // With an initial response: one step.
            (Some(&alice), &[], &[done("", "alice", "secret")]),
            (Some(&unpadded), &[], &[done("", "alice", "secret")]),
            (Some(&same), &[], &[done("alice", "alice", "secret")]),
            (Some(&utf8), &[], &[done("", "jürgen", "pässwörd ☃")]),
            // Without, or with "=" (empty): "334 " first.
            (None, &[&alice], &[Step::Challenge(""), done("", "alice", "secret")]),
            (Some("="), &[&alice], &[Step::Challenge(""), done("", "alice", "secret")]),
            (None, &["*"], &[Step::Challenge(""), Step::Cancelled]),
            (Some("*"), &[], &[Step::Cancelled]),
            // Malformed.
            (Some(&other), &[], &[Step::Malformed("authorization identity differs from user (proxy AUTH not supported)")]),
            (Some("not base64!"), &[], &[Step::Malformed("invalid base64")]),
            (Some("YWxpY2U=x"), &[], &[Step::Malformed("invalid base64")]),
            (Some(" AGFsaWNlAHNlY3JldA=="), &[], &[Step::Malformed("invalid base64")]),
            (None, &[""], &[Step::Challenge(""), Step::Malformed("PLAIN needs authzid NUL user NUL password")]),
            (Some(&no_nul), &[], &[Step::Malformed("PLAIN needs authzid NUL user NUL password")]),
            (Some(&one_nul), &[], &[Step::Malformed("PLAIN needs authzid NUL user NUL password")]),
            (Some(&three_nul), &[], &[Step::Malformed("PLAIN needs authzid NUL user NUL password")]),
            (Some(&no_user), &[], &[Step::Malformed("empty user name")]),
            (Some(&no_password), &[], &[Step::Malformed("empty password")]),
            (Some(&bad_utf8), &[], &[Step::Malformed("PLAIN field is not UTF-8")]),
            // A user name is logged: no line feed or escape may forge a line.
            (Some(&forged), &[], &[Step::Malformed("control character or space in user name")]),
            (Some(&escape), &[], &[Step::Malformed("control character or space in user name")]),
            (Some(&control_in_password), &[], &[done("", "alice", "sec\tret")]),
            (Some(&spaced), &[], &[Step::Malformed("control character or space in user name")]),
            (Some(&bidi), &[], &[Step::Malformed("control character or space in user name")]),
            // Anything after the end is not an exchange.
            (Some(&alice), &[&alice], &[done("", "alice", "secret"), Step::Malformed("no AUTH exchange in progress")]),
        ];
        for (initial, lines, want) in cases {
            assert_eq!(
                run("PLAIN", *initial, lines),
                *want,
                "{initial:?} {lines:?}"
            );
        }
    }

    #[test]
    fn login_table() {
        let alice = b64(b"alice");
        let secret = b64(b"secret");
        let snow = b64("pässwörd ☃".as_bytes());
        let u = Step::Challenge(USERNAME);
        let p = Step::Challenge(PASSWORD);
        #[rustfmt::skip]
        let cases: &[(Option<&str>, &[&str], &[Step])] = &[
            (None, &[&alice, &secret], &[u.clone(), p.clone(), done("", "alice", "secret")]),
            (Some(&alice), &[&secret], &[p.clone(), done("", "alice", "secret")]),
            (Some("="), &[&alice, &secret], &[u.clone(), p.clone(), done("", "alice", "secret")]),
            (None, &[&alice, &snow], &[u.clone(), p.clone(), done("", "alice", "pässwörd ☃")]),
            (None, &["*"], &[u.clone(), Step::Cancelled]),
            (None, &[&alice, "*"], &[u.clone(), p.clone(), Step::Cancelled]),
            (None, &["%%%"], &[u.clone(), Step::Malformed("invalid base64")]),
            (Some(&alice), &["%%%"], &[p.clone(), Step::Malformed("invalid base64")]),
            (None, &[""], &[u.clone(), Step::Malformed("empty user name")]),
            (None, &[&alice, ""], &[u.clone(), p.clone(), Step::Malformed("empty password")]),
            (None, &["/w=="], &[u.clone(), Step::Malformed("response is not UTF-8")]),
            (None, &[&alice, "/w=="], &[u.clone(), p.clone(), Step::Malformed("response is not UTF-8")]),
            (None, &["YQBi"], &[u.clone(), Step::Malformed("NUL in response")]),
            (None, &[&b64(b"bob\r\nx")], &[u.clone(), Step::Malformed("control character or space in user name")]),
            (None, &[&alice, &secret, &secret], &[u.clone(), p.clone(), done("", "alice", "secret"), Step::Malformed("no AUTH exchange in progress")]),
        ];
        for (initial, lines, want) in cases {
            assert_eq!(
                run("LOGIN", *initial, lines),
                *want,
                "{initial:?} {lines:?}"
            );
        }
    }

    #[test]
    fn debug_masks_the_password() {
        let steps = [
            run("PLAIN", Some(&b64(b"alice\0alice\0hunter2")), &[]),
            run("LOGIN", None, &[&b64(b"alice"), &b64(b"hunter2")]),
        ];
        for steps in steps {
            let last = steps.last().unwrap();
            assert!(matches!(last, Step::Done { password, .. } if password == "hunter2"));
            let shown = format!("{steps:?} {last:#?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                shown.contains("alice") && shown.contains("<masked>"),
                "{shown}"
            );
        }
        // Mid-exchange the state holds the user only.
        let (mut ex, _) = Exchange::start(Mechanism::Login, None);
        ex.respond(&b64(b"alice"));
        assert!(!format!("{ex:?}").contains("hunter2"));
    }
}
