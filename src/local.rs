//! Who is local and where their mail goes. This module owns the `[local]`
//! policy after validation (local domains, the Maildir root, the optional user
//! list, explicit mailboxes, the aliases table) and the one function that
//! turns a local recipient into delivery targets: `Local::resolve`. It does
//! not parse the config file (`crate::config`) or the aliases file
//! (`crate::aliases`), and it never touches the disk: the Maildir writer and
//! the relay queue act on the `Target`s it returns.
//!
//! Resolution: lowercase the local part; refuse source-routing and
//! percent-hack characters (`%!@"/\:`, leading `.`), which are open-relay
//! tricks; look the name up in the aliases, then without its `+detail`;
//! expand aliases recursively (cycles and runaway expansion are
//! `AliasLoop`); a name with no alias is a mailbox if `mailboxes` names it,
//! if `users` lists it (or `users` is absent and the name is safe as a
//! directory name), or if it is `postmaster`, which RFC 5321 4.5.1 requires
//! every domain to accept.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::aliases::Aliases;
use crate::store::maildir::Sharing;

/// Most targets one recipient may expand to before we call it a loop.
const MAX_TARGETS: usize = 1000;
/// Deepest chain of aliases through aliases we follow.
const MAX_DEPTH: usize = 20;

/// The validated `[local]` section.
#[derive(Debug, Clone)]
pub struct Local {
    /// Domains delivered here, lowercased. Default `["localhost"]`.
    pub domains: Vec<String>,
    /// `<maildir_root>/<user>` is a user's Maildir unless `mailboxes` says
    /// otherwise. Default `<data_dir>/mail`.
    pub maildir_root: PathBuf,
    /// Who has a mailbox (lowercased). `None`: any safe local part.
    pub users: Option<Vec<String>>,
    /// Explicit absolute Maildir per user (keys lowercased).
    pub mailboxes: BTreeMap<String, PathBuf>,
    /// The aliases(5) table; empty when none is configured.
    pub aliases: Aliases,
    /// Unix users (besides root) whose `sendmail -f` sender is honoured;
    /// others always send as `login@<first domain>`. Default none.
    pub trusted_users: Vec<String>,
    /// How long `sendmail` keeps trying a daemon that is not running or
    /// refuses it for now (a restart, a connection cap) before it gives up
    /// with exit 75. Default 1 minute; 0 gives up at once.
    pub sendmail_wait: std::time::Duration,
    /// `mode` and `group`: who else may read the Maildirs postling creates.
    pub sharing: Sharing,
}

/// Where one expanded recipient goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local Maildir: `mailboxes[user]` or `maildir_root/user`.
    Mailbox { user: String, dir: PathBuf },
    /// An address from an alias whose domain is not local, "bob@example.com".
    Remote(String),
}

/// Why a local recipient cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// No alias, mailbox or user by that name (or the domain is not local).
    UnknownUser,
    /// The local part carries routing characters such as `%` or `!`.
    RoutingCharacters,
    /// Alias expansion revisits a name or grows past its bounds.
    AliasLoop,
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolveError::UnknownUser => "no such user here",
            ResolveError::RoutingCharacters => "source routing and %-hacks are not accepted",
            ResolveError::AliasLoop => "alias expansion loops or is too large",
        })
    }
}

impl std::error::Error for ResolveError {}

impl Local {
    /// The first local domain (`localhost` when none is set): where a local
    /// user's own address, `login@<first>`, and the postmaster are.
    pub fn first_domain(&self) -> &str {
        self.domains.first().map_or("localhost", String::as_str)
    }

    /// A local user's own address, `login@<first domain>`: the envelope
    /// sender of an untrusted local submission.
    pub fn own_address(&self, login: &str) -> String {
        format!("{login}@{}", self.first_domain())
    }

    /// Whether mail for `domain` is delivered here (case-insensitive; one
    /// trailing dot is ignored).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Expands a recipient whose domain is local. Result is deduplicated, in a
    /// stable order (first occurrence in alias order), never empty on Ok.
    /// An alias target that is a local name without a mailbox is skipped
    /// (and logged); an alias none of whose targets leads anywhere gives
    /// `UnknownUser`.
    /// A `domain` that is not local gives `UnknownUser`.
    pub fn resolve(&self, local_part: &str, domain: &str) -> Result<Vec<Target>, ResolveError> {
        if !self.is_local_domain(domain) {
            return Err(ResolveError::UnknownUser);
        }
        let mut result = self.expand(local_part);
        // RFC 5321 4.5.1: postmaster must always be accepted, even when its
        // alias leads nowhere deliverable (Debian's stock `postmaster: root`
        // with a `users` list that lacks root): it then gets its own mailbox.
        if result.is_err() && local_part.eq_ignore_ascii_case("postmaster") {
            result = self.mailbox("postmaster").map(|t| vec![t]);
        }
        log::debug!("resolve rcpt={local_part}@{domain} result={result:?}");
        result
    }

    /// `resolve` without the domain check; logs the targets it skipped.
    fn expand(&self, local_part: &str) -> Result<Vec<Target>, ResolveError> {
        let mut skipped = Vec::new();
        let result = self.expand_noting(local_part, &mut skipped);
        for (alias, target) in skipped {
            log::warn!("alias \"{alias}\": target \"{target}\" has no mailbox here; skipped");
        }
        result
    }

    /// `expand`, giving the skipped targets as (alias, target) instead of
    /// logging them; config uses it to test every alias at load time and
    /// warn once per target.
    pub(crate) fn expand_noting(
        &self,
        local_part: &str,
        skipped: &mut Vec<(String, String)>,
    ) -> Result<Vec<Target>, ResolveError> {
        let mut out = Vec::new();
        let mut stack = Vec::new();
        let mut budget = 0;
        let name = local_part.to_ascii_lowercase();
        let mut walk = Walk {
            stack: &mut stack,
            out: &mut out,
            budget: &mut budget,
            skipped,
        };
        self.expand_name(&name, &mut walk)?;
        if out.is_empty() {
            // Aliases::parse refuses aliases without targets, so this is only
            // reachable through a hand-built table; refuse rather than accept
            // mail that goes nowhere.
            return Err(ResolveError::UnknownUser);
        }
        Ok(out)
    }

    fn expand_name(&self, name: &str, walk: &mut Walk<'_>) -> Result<(), ResolveError> {
        if has_routing_characters(name) {
            return Err(ResolveError::RoutingCharacters);
        }
        let (key, targets) = match self.aliases.get(name) {
            Some(targets) => (name, Some(targets)),
            None => match name.split_once('+') {
                Some((base, _detail)) => (base, self.aliases.get(base)),
                None => (name, None),
            },
        };
        let Some(targets) = targets else {
            return walk.push(self.mailbox(key)?);
        };
        if walk.stack.iter().any(|s| s == key) || walk.stack.len() >= MAX_DEPTH {
            return Err(ResolveError::AliasLoop);
        }
        walk.stack.push(key.to_string());
        for target in targets {
            let lower = target.to_ascii_lowercase();
            let local = match lower.rsplit_once('@') {
                Some((local, domain)) if self.is_local_domain(domain) => local,
                Some((_, domain)) => {
                    // Keep the remote local part as written: only the domain
                    // is case-insensitive (RFC 5321 2.4).
                    let local = &target[..target.len() - domain.len() - 1];
                    walk.push(Target::Remote(format!("{local}@{domain}")))?;
                    continue;
                }
                None => lower.as_str(),
            };
            let expanded = if local == key {
                // `alice: alice, bob@x`: alice's own mailbox too.
                self.mailbox(key).and_then(|t| walk.push(t))
            } else {
                self.expand_name(local, walk)
            };
            match expanded {
                // One stale name in a list does not take the list down: the
                // others still get the mail. (Postfix bounces that one copy
                // to the sender; here it is logged, and warned about at
                // start and by `postling check`.)
                Err(ResolveError::UnknownUser) => {
                    walk.skipped.push((key.to_string(), target.clone()));
                }
                other => other?,
            }
        }
        walk.stack.pop();
        Ok(())
    }

    /// The mailbox of `name` (already lowercased, no alias), if it has one.
    fn mailbox(&self, name: &str) -> Result<Target, ResolveError> {
        if let Some(dir) = self.mailboxes.get(name) {
            return Ok(Target::Mailbox {
                user: name.to_string(),
                dir: dir.clone(),
            });
        }
        let known = match &self.users {
            None => is_safe_name(name),
            Some(users) => users.iter().any(|u| u == name),
        };
        if (known && is_safe_name(name)) || name == "postmaster" {
            let dir = self.maildir_root.join(name);
            return Ok(Target::Mailbox {
                user: name.to_string(),
                dir,
            });
        }
        Err(ResolveError::UnknownUser)
    }
}

/// The state of one alias expansion.
struct Walk<'a> {
    /// The aliases being expanded, outermost first (loop detection).
    stack: &'a mut Vec<String>,
    out: &'a mut Vec<Target>,
    /// Targets produced so far, duplicates included (the fan-out bound).
    budget: &'a mut usize,
    /// (alias, target) pairs skipped for having no mailbox.
    skipped: &'a mut Vec<(String, String)>,
}

impl Walk<'_> {
    fn push(&mut self, target: Target) -> Result<(), ResolveError> {
        push(self.out, self.budget, target)
    }
}

fn push(out: &mut Vec<Target>, budget: &mut usize, target: Target) -> Result<(), ResolveError> {
    *budget += 1;
    if *budget > MAX_TARGETS {
        return Err(ResolveError::AliasLoop);
    }
    if !out.contains(&target) {
        out.push(target);
    }
    Ok(())
}

/// `%`, `!`, `@`, `"`, `/`, `\`, `:` anywhere, or a leading `.`.
fn has_routing_characters(local_part: &str) -> bool {
    local_part.starts_with('.') || local_part.contains(['%', '!', '@', '"', '/', '\\', ':'])
}

/// The login name of Unix user `uid`, as the passwd database has it, or
/// `uid<N>` without an entry: who a local submission is from.
pub fn login_of(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid{uid}"),
    }
}

/// A name that is safe as a Maildir directory name: ASCII letters, digits,
/// `.`, `_`, `-`, not starting with `.` or `-`, 1..=64 bytes.
pub fn is_safe_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A syntactically valid domain name: dot-separated labels of ASCII letters,
/// digits and `-` (not at either end of a label), 1..=63 bytes each, 253 in
/// all (RFC 1035 2.3.1, RFC 5321 4.1.2). A single label ("localhost") is fine.
pub fn is_domain(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use ResolveError::*;

    fn local(users: Option<&[&str]>, aliases: &str) -> Local {
        Local {
            domains: vec!["localhost".into(), "pi.lan".into()],
            maildir_root: PathBuf::from("/var/mail"),
            users: users.map(|u| u.iter().map(|s| s.to_string()).collect()),
            mailboxes: BTreeMap::from([(
                "carol".to_string(),
                PathBuf::from("/home/carol/Maildir"),
            )]),
            aliases: crate::aliases::parse(aliases, Path::new("aliases"))
                .expect("test aliases parse"),
            trusted_users: Vec::new(),
            sendmail_wait: std::time::Duration::ZERO,
            sharing: Sharing::default(),
        }
    }

    /// Renders targets compactly: "mbox:user=/dir" or "remote:addr".
    fn r(l: &Local, rcpt: &str) -> Result<Vec<String>, ResolveError> {
        let (lp, domain) = rcpt.rsplit_once('@').expect("test rcpt has @");
        let targets = l.resolve(lp, domain)?;
        assert!(!targets.is_empty());
        Ok(targets
            .into_iter()
            .map(|t| match t {
                Target::Mailbox { user, dir } => format!("{user}={}", dir.display()),
                Target::Remote(a) => format!("remote:{a}"),
            })
            .collect())
    }

    const ALIASES: &str = "\
root: alice, bob@example.com
Team: alice, carol, root, dave@PI.LAN, Eve@Example.COM
self: self, friend@x.org
alice2: alice2@localhost
loop1: loop2
loop2: loop3
loop3: loop1
selfloop: selfloop2
selfloop2: selfloop
ghost: nosuchuser
detail: alice+news
plussed+x: bob@example.com
";

    #[test]
    fn resolve_table() {
        let open = local(None, ALIASES);
        let closed = local(Some(&["alice", "bob"]), ALIASES);
        let ok = |v: &[&str]| Ok(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        type Case<'a> = (&'a Local, &'a str, Result<Vec<String>, ResolveError>);
        let cases: &[Case] = &[
            // plain users, case-insensitivity of local part and domain
            (&open, "alice@localhost", ok(&["alice=/var/mail/alice"])),
            (&open, "Alice@LocalHost", ok(&["alice=/var/mail/alice"])),
            (&open, "alice@pi.lan.", ok(&["alice=/var/mail/alice"])),
            (
                &open,
                "j.doe_1-x@pi.lan",
                ok(&["j.doe_1-x=/var/mail/j.doe_1-x"]),
            ),
            (&open, "-x@pi.lan", Err(UnknownUser)),
            (&open, "@pi.lan", Err(UnknownUser)),
            (&open, "alice@example.com", Err(UnknownUser)),
            (
                &open,
                &format!("{}@pi.lan", "a".repeat(65)),
                Err(UnknownUser),
            ),
            // users restriction; mailboxes always count
            (&closed, "bob@pi.lan", ok(&["bob=/var/mail/bob"])),
            (&closed, "zed@pi.lan", Err(UnknownUser)),
            (&closed, "carol@pi.lan", ok(&["carol=/home/carol/Maildir"])),
            (&open, "CAROL@pi.lan", ok(&["carol=/home/carol/Maildir"])),
            // +detail
            (&open, "alice+news@pi.lan", ok(&["alice=/var/mail/alice"])),
            (&closed, "bob+a+b@pi.lan", ok(&["bob=/var/mail/bob"])),
            (&closed, "zed+x@pi.lan", Err(UnknownUser)),
            (
                &open,
                "root+cron@pi.lan",
                ok(&["alice=/var/mail/alice", "remote:bob@example.com"]),
            ),
            (&open, "plussed+x@pi.lan", ok(&["remote:bob@example.com"])),
            (&open, "detail@pi.lan", ok(&["alice=/var/mail/alice"])),
            (&open, "+x@pi.lan", Err(UnknownUser)),
            // aliases to remote, nested, local-domain addresses, dedup
            (
                &open,
                "ROOT@localhost",
                ok(&["alice=/var/mail/alice", "remote:bob@example.com"]),
            ),
            (
                &open,
                "team@pi.lan",
                ok(&[
                    "alice=/var/mail/alice",
                    "carol=/home/carol/Maildir",
                    "remote:bob@example.com",
                    "dave=/var/mail/dave",
                    "remote:Eve@example.com",
                ]),
            ),
            // dave is not a user: skipped, the others still get it
            (
                &closed,
                "team@pi.lan",
                ok(&[
                    "alice=/var/mail/alice",
                    "carol=/home/carol/Maildir",
                    "remote:bob@example.com",
                    "remote:Eve@example.com",
                ]),
            ),
            (
                &open,
                "ghost@pi.lan",
                ok(&["nosuchuser=/var/mail/nosuchuser"]),
            ),
            (&closed, "ghost@pi.lan", Err(UnknownUser)),
            // self-reference, also through a local-domain address
            (
                &open,
                "self@pi.lan",
                ok(&["self=/var/mail/self", "remote:friend@x.org"]),
            ),
            (&open, "alice2@pi.lan", ok(&["alice2=/var/mail/alice2"])),
            // cycles
            (&open, "loop1@pi.lan", Err(AliasLoop)),
            (&open, "loop3@pi.lan", Err(AliasLoop)),
            (&open, "selfloop@pi.lan", Err(AliasLoop)),
            // postmaster: always, even when users restrict
            (
                &closed,
                "postmaster@pi.lan",
                ok(&["postmaster=/var/mail/postmaster"]),
            ),
            (
                &closed,
                "PostMaster@localhost",
                ok(&["postmaster=/var/mail/postmaster"]),
            ),
            // routing characters
            (&open, "to%dom@pi.lan", Err(RoutingCharacters)),
            (&open, "host!user@pi.lan", Err(RoutingCharacters)),
            (&open, "a@b@pi.lan", Err(RoutingCharacters)),
            (&open, "\"a b\"@pi.lan", Err(RoutingCharacters)),
            (&open, "a/b@pi.lan", Err(RoutingCharacters)),
            (&open, "a\\b@pi.lan", Err(RoutingCharacters)),
            (&open, "a:b@pi.lan", Err(RoutingCharacters)),
            (&open, ".alice@pi.lan", Err(RoutingCharacters)),
            (&open, "../etc@pi.lan", Err(RoutingCharacters)),
        ];
        for (l, rcpt, want) in cases {
            assert_eq!(&r(l, rcpt), want, "rcpt {rcpt}");
        }
    }

    #[test]
    fn postmaster_alias_wins() {
        let l = local(Some(&["alice"]), "postmaster: alice\n");
        assert_eq!(
            r(&l, "postmaster@pi.lan"),
            Ok(vec!["alice=/var/mail/alice".to_string()])
        );
        // Debian's `postmaster: root` with root going to a user list that
        // names someone without a mailbox: alice still gets it, rather
        // than a postmaster Maildir nobody reads.
        let l = local(Some(&["alice"]), "postmaster: root\nroot: alice, carl\n");
        assert_eq!(
            r(&l, "postmaster@pi.lan"),
            Ok(vec!["alice=/var/mail/alice".to_string()])
        );
    }

    #[test]
    fn expansion_is_bounded() {
        // A chain deeper than MAX_DEPTH is refused even without a cycle.
        let chain: String = (0..30).map(|i| format!("a{i}: a{}\n", i + 1)).collect();
        let l = local(None, &chain);
        assert_eq!(
            r(&l, "a25@pi.lan"),
            Ok(vec!["a30=/var/mail/a30".to_string()])
        );
        assert_eq!(r(&l, "a0@pi.lan"), Err(AliasLoop));
        // Fan-out past MAX_TARGETS is refused: 40 x 40 distinct remote addresses.
        let mut text = String::from("all: ");
        text += &(0..40)
            .map(|i| format!("g{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        text.push('\n');
        for i in 0..40 {
            let targets: Vec<String> = (0..40).map(|j| format!("u{i}x{j}@example.com")).collect();
            text += &format!("g{i}: {}\n", targets.join(", "));
        }
        let l = local(None, &text);
        assert_eq!(r(&l, "g3@pi.lan").map(|v| v.len()), Ok(40));
        assert_eq!(r(&l, "all@pi.lan"), Err(AliasLoop));
    }

    #[test]
    fn names_and_domains() {
        for (name, safe) in [
            ("alice", true),
            ("a.b_c-d", true),
            ("A1", true),
            ("", false),
            (".x", false),
            ("-x", false),
            ("a b", false),
            ("a+b", false),
            ("ü", false),
        ] {
            assert_eq!(is_safe_name(name), safe, "{name:?}");
        }
        assert!(is_safe_name(&"a".repeat(64)) && !is_safe_name(&"a".repeat(65)));
        for (d, ok) in [
            ("localhost", true),
            ("pi.lan", true),
            ("a-b.example.com", true),
            ("", false),
            ("a..b", false),
            ("-a.b", false),
            ("a-.b", false),
            ("a_b.c", false),
            ("x.", false),
            ("[127.0.0.1]", false),
        ] {
            assert_eq!(is_domain(d), ok, "{d:?}");
        }
        assert!(!is_domain(&"a".repeat(64)));
    }

    #[test]
    fn postmaster_is_accepted_even_when_its_alias_leads_nowhere() {
        let aliases = crate::aliases::parse("postmaster: root\n", std::path::Path::new("aliases"))
            .expect("valid aliases");
        let local = Local {
            domains: vec!["pi.lan".into()],
            maildir_root: PathBuf::from("/m"),
            users: Some(vec!["alice".into()]),
            mailboxes: BTreeMap::new(),
            aliases,
            trusted_users: Vec::new(),
            sendmail_wait: std::time::Duration::ZERO,
            sharing: Sharing::default(),
        };
        assert_eq!(
            local.resolve("root", "pi.lan"),
            Err(ResolveError::UnknownUser)
        );
        assert_eq!(
            local.resolve("PostMaster", "pi.lan"),
            Ok(vec![Target::Mailbox {
                user: "postmaster".into(),
                dir: PathBuf::from("/m/postmaster")
            }])
        );
    }
}
