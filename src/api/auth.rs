//! Who is calling, and what they may do to a table.
//!
//! ETS guards a table by its owner process; larder guards it by the owning
//! principal, identified by a bearer token. [`Tokens`] holds the configured
//! tokens; the [`authenticate`] middleware puts the caller's [`Principal`]
//! in the request's extensions, and handlers check it with [`authorize`].
//! With no tokens configured every caller is `anonymous`, with full rights.
//!
//! Tokens are compared in constant time against every configured token, and
//! never logged.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use axum::http::HeaderValue;

use crate::api::error::ApiError;
use crate::store::{Access, Table};

/// The principal every caller is when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// The authenticated caller. Cloning is shallow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The principal's name, as in the tokens file.
    pub name: Arc<str>,
    /// Whether this principal may do everything.
    pub admin: bool,
}

impl Principal {
    /// The caller when authentication is off: may do everything.
    pub fn anonymous() -> Self {
        Principal {
            name: ANONYMOUS.into(),
            admin: true,
        }
    }
}

/// The configured tokens. Empty means authentication is off.
pub struct Tokens {
    entries: Vec<(Vec<u8>, Principal)>,
    /// Who every caller is when authentication is off; made once, so the
    /// request path only clones it.
    anonymous: Principal,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            entries: Vec::new(),
            anonymous: Principal::anonymous(),
        }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: tokens never reach a log line.
        let names: Vec<&str> = self.entries.iter().map(|(_, p)| &*p.name).collect();
        f.debug_struct("Tokens")
            .field("principals", &names)
            .finish()
    }
}

impl Tokens {
    /// Reads `principal:token` lines from `file` and `list` (comma-separated
    /// pairs). `#` starts a comment; blank lines are skipped.
    ///
    /// # Errors
    /// A message naming the bad line (never the token).
    pub fn load(file: Option<&Path>, list: Option<&str>, admin: &str) -> Result<Self, String> {
        let mut lines: Vec<(String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                lines.push((format!("{}:{}", path.display(), i + 1), line.to_owned()));
            }
        }
        if let Some(list) = list {
            for (i, item) in list.split(',').enumerate() {
                lines.push((format!("LARDER_TOKENS item {}", i + 1), item.to_owned()));
            }
        }
        let mut entries: Vec<(Vec<u8>, Principal)> = Vec::new();
        for (place, line) in lines {
            let line = strip_comment(&line).map_err(|m| format!("{place}: {m}"))?;
            if line.is_empty() {
                continue;
            }
            let Some((name, token)) = line.split_once(':') else {
                return Err(format!("{place}: expected principal:token"));
            };
            let (name, token) = (name.trim(), token.trim());
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'));
            if !name_ok {
                return Err(format!("{place}: principal names are A-Z a-z 0-9 _ - . @"));
            }
            if token.len() < 8
                || token
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(format!(
                    "{place}: tokens are at least 8 printable characters"
                ));
            }
            if entries.iter().any(|(t, _)| t == token.as_bytes()) {
                return Err(format!(
                    "{place}: this token is already given to a principal"
                ));
            }
            entries.push((
                token.as_bytes().to_vec(),
                Principal {
                    name: name.into(),
                    admin: name == admin,
                },
            ));
        }
        Ok(Tokens {
            entries,
            ..Tokens::default()
        })
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Whether `name` is a configured principal.
    pub fn knows(&self, name: &str) -> bool {
        self.entries.iter().any(|(_, p)| &*p.name == name)
    }

    /// Configured principal names.
    pub fn principals(&self) -> HashSet<String> {
        self.entries
            .iter()
            .map(|(_, p)| p.name.to_string())
            .collect()
    }

    /// The principal an `Authorization` header names.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`] when it is missing, malformed or unknown.
    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Principal, ApiError> {
        if !self.enabled() {
            return Ok(self.anonymous.clone());
        }
        let value = header.ok_or(ApiError::Unauthorized)?.as_bytes();
        let token = match value.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
            _ => return Err(ApiError::Unauthorized),
        };
        // Compare against every token, without stopping at a match, so the
        // time taken does not depend on which token (if any) matched.
        let mut found: Option<&Principal> = None;
        for (candidate, principal) in &self.entries {
            if constant_time_eq(candidate, token) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(ApiError::Unauthorized)
    }
}

/// A line without its comment, trimmed. `#` starts a comment at the start
/// of a line or after whitespace; one glued to a principal or token would
/// silently shorten the secret in force, so it is refused.
fn strip_comment(line: &str) -> Result<&str, String> {
    let Some(at) = line.find('#') else {
        return Ok(line.trim());
    };
    let before = &line[..at];
    if before.trim().is_empty() || before.ends_with(char::is_whitespace) {
        Ok(before.trim())
    } else {
        Err(
            "'#' cannot be part of a principal or token (it starts a comment); \
             put whitespace before a comment"
                .into(),
        )
    }
}

/// Equality whose time depends only on the lengths, not on where bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// What a request does to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Lookups, scans, table info.
    Read,
    /// Changes to entries, clear, sync.
    Write,
    /// Changes to the table itself: settings, drop, give-away. Owner or admin.
    Manage,
}

/// Checks that `who` may perform `op` on `table`.
///
/// # Errors
/// [`ApiError::Forbidden`].
pub fn authorize(table: &Table, who: &Principal, op: Op) -> Result<(), ApiError> {
    if who.admin {
        return Ok(());
    }
    let owner = table.owner();
    let is_owner = *owner == *who.name;
    let allowed = match (table.access(), op) {
        (_, Op::Manage) => is_owner,
        (Access::Public, _) => true,
        (Access::Protected, Op::Read) => true,
        (Access::Protected, Op::Write) => is_owner,
        (Access::Private, _) => is_owner,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "principal '{}' may not {} table '{}' ({:?} access, owned by '{}')",
            who.name,
            match op {
                Op::Read => "read",
                Op::Write => "write to",
                Op::Manage => "manage",
            },
            table.name(),
            table.access(),
            owner
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_comments_and_reject_bad_lines() {
        let t = Tokens::load(
            None,
            Some("alice:alicetoken1, bob:bobtoken22 # b,admin:admintoken3"),
            "admin",
        )
        .unwrap();
        assert_eq!(t.principals().len(), 3);
        let bearer = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        assert_eq!(
            &*t.authenticate(Some(&bearer("alicetoken1"))).unwrap().name,
            "alice"
        );
        assert!(t.authenticate(Some(&bearer("admintoken3"))).unwrap().admin);
        assert!(!t.authenticate(Some(&bearer("bobtoken22"))).unwrap().admin);
        assert!(t.authenticate(Some(&bearer("alicetoken"))).is_err());
        assert!(t
            .authenticate(Some(&HeaderValue::from_static("Basic alicetoken1")))
            .is_err());
        assert!(t.authenticate(None).is_err());
        for bad in [
            "nocolon",
            ":tokentoken",
            "a b:tokentoken",
            "a:short",
            "a:aaaaaaaa,b:aaaaaaaa",
        ] {
            assert!(Tokens::load(None, Some(bad), "admin").is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hash_inside_a_token_is_refused_never_cut() {
        // The measured failure: `abcdefgh` authenticated as alice.
        for list in [
            "alice:abcdefgh#ijklmnop",
            "alice#x:abcdefghijkl",
            "bob:bobtoken22,alice:abcdefgh#ijklmnop",
        ] {
            let err = Tokens::load(None, Some(list), "admin").unwrap_err();
            assert!(err.contains("'#' cannot be part of"), "{list}: {err}");
            assert!(!err.contains("abcdefgh"), "the token leaked: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# all fine\nalice:abcdefgh#ijklmnop\n").unwrap();
        let err = Tokens::load(Some(&file), None, "admin").unwrap_err();
        assert!(err.contains(":2: '#'"), "{err}");
        // Comments after whitespace still work, in both sources.
        let t = Tokens::load(None, Some("alice:abcdefghijkl\t# note"), "admin").unwrap();
        assert!(t.knows("alice"));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
