//! Bearer tokens: how they are configured, stored, checked and reloaded.
//!
//! A tokens source holds `principal:secret[:option…]` lines; the secret is
//! the token itself or `sha256:<64 hex>`, so a file need not hold the
//! secret. Tokens are stored and looked up by their SHA-256, compared in
//! constant time, and never logged. The set in force ([`TokenStore`]) is
//! reloaded on `SIGHUP`, keeping the old set when the new file is refused.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI8, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use axum::http::HeaderValue;

use super::auth::Principal;
use super::rate::Rate;
use crate::api::error::ApiError;

/// A token's SHA-256: how tokens are stored, looked up and compared.
pub type Digest = [u8; 32];

/// The configured tokens. Empty means authentication is off.
pub struct Tokens {
    /// Every token by its SHA-256, with whom it names and what it may do.
    by_digest: HashMap<Digest, Principal>,
    /// Every configured principal, with the rate its lines give.
    by_name: HashMap<Arc<str>, Option<Rate>>,
    /// Who every caller is when authentication is off; made once, so the
    /// request path only clones it.
    anonymous: Principal,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            by_digest: HashMap::new(),
            by_name: HashMap::new(),
            anonymous: Principal::anonymous(),
        }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: tokens and their digests never reach a log line.
        f.debug_struct("Tokens")
            .field("principals", &self.principals())
            .finish()
    }
}

/// One line of a tokens source, parsed.
struct Line {
    name: String,
    digest: Digest,
    read_only: bool,
    rate: Option<Rate>,
}

/// Whether `name` is a principal name a client certificate or `give_away`
/// may use: 1 to 64 of `A-Z a-z 0-9 _ - .`.
pub fn is_principal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Parses `principal:secret[:option…]`, where the secret is the token
/// itself or `sha256:<64 hex>`, and options are `read` and `rate=N/burst`.
fn parse_line(line: &str) -> Result<Line, String> {
    let Some((name, rest)) = line.split_once(':') else {
        return Err("expected principal:token or principal:sha256:<hex>".into());
    };
    let name = name.trim();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'));
    if !name_ok {
        return Err("principal names are 1 to 64 of A-Z a-z 0-9 _ - . @".into());
    }
    let mut parts = rest.split(':');
    let secret = parts.next().unwrap_or_default().trim();
    let digest = if secret == "sha256" {
        let hex = parts.next().map(str::trim).unwrap_or_default();
        parse_hex_digest(hex).ok_or("sha256: must be followed by 64 hex digits")?
    } else {
        if secret.len() < 8
            || secret
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err("tokens are at least 8 printable characters, without ':'".into());
        }
        sha256(secret.as_bytes())
    };
    let mut read_only = false;
    let mut rate = None;
    for option in parts {
        match option.trim() {
            "read" => read_only = true,
            o if o.starts_with("rate=") => rate = Some(o["rate=".len()..].parse::<Rate>()?),
            _ => return Err("unknown option after the token (known: read, rate=N/burst)".into()),
        }
    }
    Ok(Line {
        name: name.to_owned(),
        digest,
        read_only,
        rate,
    })
}

fn parse_hex_digest(hex: &str) -> Option<Digest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of `bytes`.
fn sha256(bytes: &[u8]) -> Digest {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).into()
}

impl Tokens {
    /// Reads `principal:secret[:option…]` lines from `file` and `list`
    /// (comma-separated lines). `#` starts a comment; blank lines are
    /// skipped. A principal may have several tokens.
    ///
    /// # Errors
    /// A message naming the bad line (never the token); a `file` that
    /// holds no token is refused, so that a truncated file never turns
    /// authentication off.
    pub fn load(file: Option<&Path>, list: Option<&str>, admin: &str) -> Result<Self, String> {
        let mut lines: Vec<(String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                lines.push((format!("{}:{}", path.display(), i + 1), line.to_owned()));
            }
        }
        let from_file = lines.len();
        if let Some(list) = list {
            for (i, item) in list.split(',').enumerate() {
                lines.push((format!("LARDER_TOKENS item {}", i + 1), item.to_owned()));
            }
        }
        let mut by_digest: HashMap<Digest, Principal> = HashMap::new();
        let mut by_name: HashMap<Arc<str>, Option<Rate>> = HashMap::new();
        let mut in_file = 0;
        for (n, (place, line)) in lines.into_iter().enumerate() {
            let line = strip_comment(&line).map_err(|m| format!("{place}: {m}"))?;
            if line.is_empty() {
                continue;
            }
            let parsed = parse_line(line).map_err(|m| format!("{place}: {m}"))?;
            if by_digest.contains_key(&parsed.digest) {
                return Err(format!(
                    "{place}: this token is already given to a principal"
                ));
            }
            // Every line of one principal must give the same rate.
            if let Some(rate) = by_name.get(parsed.name.as_str()) {
                if *rate != parsed.rate {
                    return Err(format!(
                        "{place}: every line of principal '{}' must give the same rate= (or none)",
                        parsed.name
                    ));
                }
            }
            in_file += usize::from(n < from_file);
            let name: Arc<str> = parsed.name.as_str().into();
            by_name.insert(name.clone(), parsed.rate);
            by_digest.insert(
                parsed.digest,
                Principal {
                    admin: parsed.name == admin,
                    name,
                    read_only: parsed.read_only,
                    token: Some(parsed.digest),
                    rate: parsed.rate,
                },
            );
        }
        if let Some(path) = file {
            if in_file == 0 {
                return Err(format!(
                    "tokens file {} holds no token; refusing to run with authentication off",
                    path.display()
                ));
            }
        }
        Ok(Tokens {
            by_digest,
            by_name,
            ..Tokens::default()
        })
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// Whether `name` is a configured principal.
    pub fn knows(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The rate the lines of principal `name` give, if any.
    pub fn rate_of(&self, name: &str) -> Option<Rate> {
        self.by_name.get(name).copied().flatten()
    }

    /// Whether any token line gives its principal a rate.
    pub fn has_rates(&self) -> bool {
        self.by_digest.values().any(|p| p.rate.is_some())
    }

    /// Whether the token with this digest is still configured.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.by_digest.contains_key(digest)
    }

    /// Configured principal names.
    pub fn principals(&self) -> HashSet<String> {
        self.by_name.keys().map(|n| n.to_string()).collect()
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
        // Looked up by digest, so the time taken says nothing of the
        // secret; the final comparison is constant time all the same.
        let digest = sha256(token);
        match self.by_digest.get(&digest) {
            Some(p) if p.token.is_some_and(|t| constant_time_eq(&t, &digest)) => Ok(p.clone()),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// The tokens in force, reloadable while the server runs (`SIGHUP`): the
/// tokens file is read again, `LARDER_TOKENS` is kept, and a file that fails
/// to parse or holds no token leaves the old set in force.
pub struct TokenStore {
    current: RwLock<Arc<Tokens>>,
    /// Whether any token is configured; read before the lock, so a server
    /// without authentication pays one atomic load per request.
    enabled: AtomicBool,
    file: Option<PathBuf>,
    list: Option<String>,
    admin: String,
    /// Outcome of the last reload: 1 success, 0 failure, -1 none yet.
    last_reload: AtomicI8,
    /// Who every caller is when authentication is off; made once, so the
    /// request path only clones it.
    anonymous: Principal,
    /// Tells this store's entries in a thread's memo from another's.
    id: u64,
    /// Bumped by every reload, after the new set is in force: a memo of
    /// an older generation is stale.
    generation: AtomicU64,
}

/// `Authorization` headers longer than this are checked afresh every time;
/// shorter ones are remembered per thread (see [`TokenStore::with_caller`]).
const MEMO_BYTES: usize = 128;

/// The last caller a worker thread authenticated with a header of at most
/// [`MEMO_BYTES`]: a keep-alive client sends the same header on every
/// request, and answering it from here skips the digest and the shared
/// lock that every thread would otherwise take.
struct Recent {
    store: u64,
    generation: u64,
    len: usize,
    header: [u8; MEMO_BYTES],
    principal: Principal,
}

impl Recent {
    /// Whether `header` is the remembered one, in a time that depends on
    /// neither (a fixed number of bytes compared, no early exit), since
    /// the remembered header may be another client's token.
    fn matches(&self, header: &[u8]) -> bool {
        let mut padded = [0u8; MEMO_BYTES];
        padded[..header.len()].copy_from_slice(header);
        let mut differ = (self.len ^ header.len()) as u64;
        for (a, b) in self.header.chunks_exact(8).zip(padded.chunks_exact(8)) {
            let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]));
            differ |= word(a) ^ word(b);
        }
        std::hint::black_box(differ) == 0
    }
}

thread_local! {
    static RECENT: RefCell<Option<Box<Recent>>> = const { RefCell::new(None) };
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("file", &self.file)
            .field("tokens", &*self.snapshot())
            .finish()
    }
}

impl Default for TokenStore {
    fn default() -> Self {
        TokenStore::new(Tokens::default(), None, None, "admin")
    }
}

impl TokenStore {
    /// `tokens`, as loaded from `file` and `list` for `admin`.
    pub fn new(tokens: Tokens, file: Option<&Path>, list: Option<&str>, admin: &str) -> Self {
        TokenStore {
            enabled: AtomicBool::new(tokens.enabled()),
            current: RwLock::new(Arc::new(tokens)),
            file: file.map(Path::to_owned),
            list: list.map(str::to_owned),
            admin: admin.to_owned(),
            last_reload: AtomicI8::new(-1),
            anonymous: Principal::anonymous(),
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            generation: AtomicU64::new(0),
        }
    }

    /// Loads the tokens from `file` and `list`.
    ///
    /// # Errors
    /// As [`Tokens::load`].
    pub fn load(file: Option<&Path>, list: Option<&str>, admin: &str) -> Result<Self, String> {
        Ok(TokenStore::new(
            Tokens::load(file, list, admin)?,
            file,
            list,
            admin,
        ))
    }

    /// Whether any token line in force gives its principal a rate.
    pub fn has_rates(&self) -> bool {
        self.snapshot().has_rates()
    }

    /// The tokens in force now.
    pub fn snapshot(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// As [`Tokens::authenticate`], against the tokens in force.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`].
    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Principal, ApiError> {
        if !self.enabled() {
            return Ok(self.anonymous.clone());
        }
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .authenticate(header)
    }

    /// Runs `f` with the caller an `Authorization` header names, as
    /// [`TokenStore::authenticate`] finds it, lent rather than cloned. A
    /// header this thread authenticated last, against the same set of
    /// tokens, is answered from the thread's memo.
    pub fn with_caller<R>(
        &self,
        header: Option<&HeaderValue>,
        f: impl FnOnce(Result<&Principal, ApiError>) -> R,
    ) -> R {
        if !self.enabled() {
            return f(Ok(&self.anonymous));
        }
        let bytes = header.map_or(&[][..], HeaderValue::as_bytes);
        if header.is_none() || bytes.len() > MEMO_BYTES {
            return f(self.authenticate(header).as_ref().map_err(Clone::clone));
        }
        // Read before the tokens: a reload in between leaves a memo that
        // the next request finds stale.
        let generation = self.generation.load(Ordering::Acquire);
        RECENT.with(|recent| {
            let Ok(mut recent) = recent.try_borrow_mut() else {
                return f(self.authenticate(header).as_ref().map_err(Clone::clone));
            };
            let fresh = recent.as_ref().is_some_and(|r| {
                r.store == self.id && r.generation == generation && r.matches(bytes)
            });
            if !fresh {
                let principal = match self.authenticate(header) {
                    Ok(p) => p,
                    Err(e) => return f(Err(e)),
                };
                let mut remembered = [0u8; MEMO_BYTES];
                remembered[..bytes.len()].copy_from_slice(bytes);
                *recent = Some(Box::new(Recent {
                    store: self.id,
                    generation,
                    len: bytes.len(),
                    header: remembered,
                    principal,
                }));
            }
            match recent.as_deref() {
                Some(r) => f(Ok(&r.principal)),
                None => f(Err(ApiError::Unauthorized)),
            }
        })
    }

    /// The caller of a request on a mutual-TLS connection whose client
    /// certificate names `client`: a bearer token, when one is sent, wins
    /// (an invalid one, or any when no token is configured, is 401);
    /// otherwise the certificate's common name, which must be a valid
    /// principal name.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`].
    pub fn authenticate_client(
        &self,
        header: Option<&HeaderValue>,
        client: &crate::net::tls::ClientName,
    ) -> Result<Principal, ApiError> {
        if header.is_some() {
            if !self.enabled() {
                return Err(ApiError::Unauthorized);
            }
            return self.authenticate(header);
        }
        let name = client
            .0
            .as_ref()
            .filter(|n| is_principal_name(n))
            .ok_or(ApiError::Unauthorized)?;
        Ok(Principal {
            name: name.clone(),
            admin: **name == *self.admin,
            read_only: false,
            token: None,
            rate: self.snapshot().rate_of(name),
        })
    }

    /// Whether `who` still holds a token in force (always, when it came
    /// in without one).
    pub fn still_valid(&self, who: &Principal) -> bool {
        match &who.token {
            None => true,
            Some(digest) => self.snapshot().holds(digest),
        }
    }

    /// Whether there is a tokens file to reload.
    pub fn reloads(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the tokens file again. Only a server started with a tokens
    /// file reloads; on failure the old set stays in force.
    ///
    /// # Errors
    /// Why the new file was refused (never a token).
    pub fn reload(&self) -> Result<usize, String> {
        let Some(file) = &self.file else {
            return Err("no --tokens-file to reload".into());
        };
        match Tokens::load(Some(file), self.list.as_deref(), &self.admin) {
            Ok(tokens) => {
                let n = tokens.by_digest.len();
                self.enabled.store(tokens.enabled(), Ordering::Release);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.last_reload.store(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.last_reload.store(0, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Outcome of the last reload: `Some(true)` success, `Some(false)`
    /// failure, `None` when none was asked for yet.
    pub fn last_reload(&self) -> Option<bool> {
        match self.last_reload.load(Ordering::Relaxed) {
            1 => Some(true),
            0 => Some(false),
            _ => None,
        }
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
    fn digests_read_only_tokens_and_several_tokens_per_principal() {
        let bearer = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        let digest: String = sha256(b"secret-of-carol")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let list = format!(
            "alice:alice-token-1,alice:alice-token-2:read,carol:sha256:{}:read,dave:sha256:{digest}",
            digest.to_uppercase()
        );
        // carol and dave name the same digest: one token, two principals.
        let err = Tokens::load(None, Some(&list), "admin").unwrap_err();
        assert!(err.contains("already given"), "{err}");
        let list = format!(
            "alice:alice-token-1,alice:alice-token-2:read,carol:sha256:{}:read",
            digest.to_uppercase()
        );
        let t = Tokens::load(None, Some(&list), "admin").unwrap();
        let one = t.authenticate(Some(&bearer("alice-token-1"))).unwrap();
        let two = t.authenticate(Some(&bearer("alice-token-2"))).unwrap();
        assert_eq!((&*one.name, one.read_only), ("alice", false));
        assert_eq!((&*two.name, two.read_only), ("alice", true));
        let carol = t.authenticate(Some(&bearer("secret-of-carol"))).unwrap();
        assert_eq!((&*carol.name, carol.read_only), ("carol", true));
        assert!(t.authenticate(Some(&bearer(&digest))).is_err());
        let rated = Tokens::load(None, Some("erin:erin-token-1:rate=5/10:read"), "admin").unwrap();
        let erin = rated.authenticate(Some(&bearer("erin-token-1"))).unwrap();
        assert_eq!(erin.rate.map(|r| r.to_string()).as_deref(), Some("5/10"));
        assert!(erin.read_only && rated.has_rates() && !t.has_rates());
        assert!(t.holds(&carol.token.unwrap()));
        for bad in [
            "a:sha256:abcd",
            &format!("a:sha256:{}", "g".repeat(64)),
            "a:aaaaaaaa:write",
            "a:aaaaaaaa:rate=0",
            "a:aaaaaaaa:rate=5/10,a:bbbbbbbb:rate=5/11",
            &format!("{}:aaaaaaaa", "n".repeat(65)),
        ] {
            assert!(Tokens::load(None, Some(bad), "admin").is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tokens_file_with_no_token_is_refused_and_a_reload_keeps_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# nobody

",
        )
        .unwrap();
        let err = TokenStore::load(Some(&file), None, "admin").unwrap_err();
        assert!(err.contains("holds no token"), "{err}");
        std::fs::write(
            &file,
            "alice:alice-token-1
",
        )
        .unwrap();
        let store = TokenStore::load(Some(&file), Some("bob:bob-token-01"), "admin").unwrap();
        let bearer = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        let alice = store.authenticate(Some(&bearer("alice-token-1"))).unwrap();
        std::fs::write(
            &file,
            "carol:carol-token-1
",
        )
        .unwrap();
        assert_eq!(store.reload(), Ok(2));
        assert_eq!(store.last_reload(), Some(true));
        assert!(!store.still_valid(&alice));
        assert!(store.authenticate(Some(&bearer("alice-token-1"))).is_err());
        // LARDER_TOKENS survives the reload.
        assert!(store.authenticate(Some(&bearer("bob-token-01"))).is_ok());
        std::fs::write(
            &file, "broken
",
        )
        .unwrap();
        assert!(store.reload().is_err());
        assert_eq!(store.last_reload(), Some(false));
        assert!(store.authenticate(Some(&bearer("carol-token-1"))).is_ok());
    }

    #[test]
    fn a_remembered_caller_is_forgotten_by_a_reload_and_by_another_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "alice:alice-token-1\n").unwrap();
        let store = TokenStore::load(Some(&file), None, "admin").unwrap();
        let other = TokenStore::load(None, Some("alice:other-token-1"), "admin").unwrap();
        let bearer = |s: &str| HeaderValue::from_str(&format!("Bearer {s}")).unwrap();
        let name = |store: &TokenStore, s: &str| {
            store.with_caller(Some(&bearer(s)), |who| who.map(|p| p.name.to_string()))
        };
        // Twice on this thread: the second answer comes from the memo.
        assert_eq!(name(&store, "alice-token-1").unwrap(), "alice");
        assert_eq!(name(&store, "alice-token-1").unwrap(), "alice");
        // Another store does not take this store's memo for its own.
        assert!(name(&other, "alice-token-1").is_err());
        assert_eq!(name(&store, "alice-token-1").unwrap(), "alice");
        // A near miss of the remembered header is not it.
        assert!(name(&store, "alice-token-2").is_err());
        assert!(name(&store, "alice-token-").is_err());
        assert_eq!(name(&store, "alice-token-1").unwrap(), "alice");
        // A reload that removes the token makes the memo stale.
        std::fs::write(&file, "carol:carol-token-1\n").unwrap();
        assert_eq!(store.reload(), Ok(1));
        assert!(name(&store, "alice-token-1").is_err());
        assert_eq!(name(&store, "carol-token-1").unwrap(), "carol");
        // Too long to remember: still checked, every time.
        let long = "x".repeat(MEMO_BYTES);
        assert!(name(&store, &long).is_err());
        assert!(store.with_caller(None, |who| who.is_err()));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
