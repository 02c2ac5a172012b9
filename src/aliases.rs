//! The classic aliases(5) file: `name: target, target2`, `#` comments, blank
//! lines ignored, continuation lines beginning with a space or tab. This module
//! owns parsing that file into a case-insensitive name -> targets table and
//! nothing else: what a target means (local mailbox, another alias, a remote
//! address) is decided by `crate::local`, and where the file is named is
//! `crate::config`. Pipes (`|cmd`), files (`/path`) and `:include:` are
//! refused with an error naming the file and line: postling only delivers to
//! Maildirs and relays.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::ConfigError;

/// Parsed aliases, keyed by lowercased name. `Default` is the empty table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    targets: Vec<String>,
    /// 1-based line where the alias starts, for load-time checks.
    line: usize,
}

/// Reads and parses an aliases file.
pub fn load(path: &Path) -> Result<Aliases, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parses aliases text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Aliases, ConfigError> {
    let err = |line: usize, message: String| ConfigError {
        file: Some(path.to_path_buf()),
        line: Some(line),
        key: None,
        message,
    };
    // A byte-order mark from a Windows editor would become part of the
    // first alias's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut aliases = Aliases::default();
    // The alias being built: its name, first line and targets with their lines.
    let mut current: Option<(String, usize, Vec<String>)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let rest = if raw.starts_with([' ', '\t']) {
            match current.as_mut() {
                Some(_) => trimmed,
                None => {
                    return Err(err(
                        line,
                        "continuation line without an alias before it".into(),
                    ))
                }
            }
        } else {
            if let Some(done) = current.take() {
                let first = done.1;
                aliases.insert(done).map_err(|m| err(first, m))?;
            }
            let Some((name, rest)) = trimmed.split_once(':') else {
                return Err(err(line, "expected \"name: target, ...\"".into()));
            };
            let name = name.trim().to_ascii_lowercase();
            if !crate::smtp::command::is_dot_string(&name)
                || name.contains(crate::smtp::command::hides_text)
            {
                return Err(err(line, format!("invalid alias name \"{name}\"")));
            }
            if let Some(first) = aliases.entries.get(&name) {
                return Err(err(
                    line,
                    format!(
                        "duplicate alias \"{name}\" (first defined on line {})",
                        first.line
                    ),
                ));
            }
            current = Some((name, line, Vec::new()));
            rest
        };
        // Checked just above: a continuation needs `current`, a new entry sets it.
        let (_, _, targets) = current.as_mut().expect("current alias is set");
        for target in rest.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            check_target(target).map_err(|m| err(line, m))?;
            // One trailing dot on a domain is the root: kept, it would go
            // out in RCPT TO, where it is refused.
            let target = match target.strip_suffix('.') {
                Some(t) if t.contains('@') => t,
                _ => target,
            };
            targets.push(target.to_string());
        }
    }
    if let Some(done) = current.take() {
        let line = done.1;
        aliases.insert(done).map_err(|m| err(line, m))?;
    }
    Ok(aliases)
}

fn check_target(target: &str) -> Result<(), String> {
    if target.starts_with('|') {
        return Err(format!("\"{target}\": pipes to commands are not supported"));
    }
    if target.starts_with('/') {
        return Err(format!("\"{target}\": delivery to files is not supported"));
    }
    if target.to_ascii_lowercase().starts_with(":include:") {
        return Err(format!("\"{target}\": :include: files are not supported"));
    }
    if target.starts_with(['"', '\\']) {
        return Err(format!(
            "\"{target}\": quoted or escaped targets are not supported"
        ));
    }
    if target.contains(|c: char| {
        c.is_whitespace()
            || c.is_control()
            || c == '<'
            || c == '>'
            || crate::smtp::command::hides_text(c)
    }) {
        return Err(format!("invalid target \"{target}\""));
    }
    // A remote address is checked as MAIL and RCPT would check it, so a
    // typo (`bob@example..com`, `a@b@c`) is found at start, not as a bounce.
    // One trailing dot on the domain is the root (`alice@pi.lan.`).
    let address = target.strip_suffix('.').unwrap_or(target);
    if target.contains('@') && !crate::smtp::command::is_address(address) {
        return Err(format!("invalid address \"{target}\""));
    }
    if !target.contains('@') && !crate::smtp::command::is_dot_string(target) {
        return Err(format!("invalid target \"{target}\""));
    }
    Ok(())
}

impl Aliases {
    fn insert(
        &mut self,
        (name, line, targets): (String, usize, Vec<String>),
    ) -> Result<(), String> {
        if targets.is_empty() {
            return Err(format!("alias \"{name}\" has no targets"));
        }
        self.entries.insert(name, Entry { targets, line });
        Ok(())
    }

    /// The targets of `name` (compared case-insensitively), as written.
    pub fn get(&self, name: &str) -> Option<&[String]> {
        self.entries
            .get(&name.to_ascii_lowercase())
            .map(|e| e.targets.as_slice())
    }

    /// The 1-based line where `name` is defined.
    pub fn line(&self, name: &str) -> Option<usize> {
        self.entries.get(&name.to_ascii_lowercase()).map(|e| e.line)
    }

    /// Alias names (lowercased), in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Aliases, String> {
        parse(text, Path::new("aliases")).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_entries_comments_and_continuations() {
        let a = p("# comment\n\nRoot: alice, bob@example.com\npostmaster: root\nteam: alice,\n  bob,\n\tcarol@x.org\n  # comment inside\n   dave\n").unwrap();
        assert_eq!(
            a.names().collect::<Vec<_>>(),
            ["postmaster", "root", "team"]
        );
        assert_eq!(a.get("root").unwrap(), ["alice", "bob@example.com"]);
        assert_eq!(a.get("ROOT").unwrap(), ["alice", "bob@example.com"]);
        assert_eq!(
            a.get("team").unwrap(),
            ["alice", "bob", "carol@x.org", "dave"]
        );
        assert_eq!(a.line("team"), Some(5));
        assert_eq!(a.get("nobody"), None);
        assert_eq!(p("").unwrap(), Aliases::default());
    }

    #[test]
    fn self_reference_is_legal() {
        let a = p("alice: alice, bob@x.org\n").unwrap();
        assert_eq!(a.get("alice").unwrap(), ["alice", "bob@x.org"]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "a: b\nc: |/usr/bin/procmail\n",
                "aliases:2: \"|/usr/bin/procmail\": pipes to commands are not supported",
            ),
            (
                "a: b\n\nc: d,\n  /var/log/mail\n",
                "aliases:4: \"/var/log/mail\": delivery to files is not supported",
            ),
            (
                "staff: :include:/etc/staff\n",
                "aliases:1: \":include:/etc/staff\": :include: files are not supported",
            ),
            (
                "a: \"|cmd\"\n",
                "aliases:1: \"\"|cmd\"\": quoted or escaped targets are not supported",
            ),
            (
                "a: b\nA: c\n",
                "aliases:2: duplicate alias \"a\" (first defined on line 1)",
            ),
            (
                "  b, c\n",
                "aliases:1: continuation line without an alias before it",
            ),
            (
                "# x\nno colon here\n",
                "aliases:2: expected \"name: target, ...\"",
            ),
            ("a b: c\n", "aliases:1: invalid alias name \"a b\""),
            ("a:\nb: c\n", "aliases:1: alias \"a\" has no targets"),
            ("a: c\nb: ,\n", "aliases:2: alias \"b\" has no targets"),
            ("a: @x.org\n", "aliases:1: invalid address \"@x.org\""),
            ("a: b@\n", "aliases:1: invalid address \"b@\""),
            (
                "a: bob@example..com\n",
                "aliases:1: invalid address \"bob@example..com\"",
            ),
            (
                "a: alice@pi.lan@evil.example\n",
                "aliases:1: invalid address \"alice@pi.lan@evil.example\"",
            ),
            (
                "a: bob@exa_mple.com\n",
                "aliases:1: invalid address \"bob@exa_mple.com\"",
            ),
            ("a: b..c\n", "aliases:1: invalid target \"b..c\""),
            ("a(b): c\n", "aliases:1: invalid alias name \"a(b)\""),
            (
                "a\u{200b}: c\n",
                "aliases:1: invalid alias name \"a\u{200b}\"",
            ),
            (
                "a: b\u{202e}@x.org\n",
                "aliases:1: invalid target \"b\u{202e}@x.org\"",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(p(text).unwrap_err(), *want, "input {text:?}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_name() {
        let a = p("\u{feff}root: bob@example.com, bob@[IPv6:2001:db8::1], alice@pi.lan.\n")
            .expect("parses");
        assert_eq!(
            a.get("root").unwrap(),
            ["bob@example.com", "bob@[IPv6:2001:db8::1]", "alice@pi.lan"]
        );
    }

    #[test]
    fn load_missing_file() {
        let e = load(Path::new("/nonexistent/aliases"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/aliases: cannot read: "), "{e}");
    }
}
