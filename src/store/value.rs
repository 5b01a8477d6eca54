//! Keys, table names and values as the store keeps them.
//!
//! A [`Value`] is the canonical compact JSON text of a client's value: object
//! members sorted by name, no insignificant whitespace, numbers as serde_json
//! prints them. Canonical text makes "identical object" (bag semantics,
//! `delete_object`) a byte comparison, and lets a read answer without
//! re-serializing.

use std::ffi::c_void;
use std::ptr::NonNull;

use triomphe::ThinArc;

use super::error::{StoreError, StoreResult};

/// Longest key in bytes, per the API contract.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest table name, per the API contract.
pub const MAX_NAME_CHARS: usize = 64;

/// A key as stored in a table: keys up to 24 bytes live inline, without a
/// heap allocation of their own (most cache keys are that short). Hashes and
/// compares exactly as `str`, so maps keyed by it are looked up by `&str`.
pub type Key = compact_str::CompactString;

/// Canonical JSON text of one stored object. Cloning is shallow.
///
/// A thin pointer (one word) to a single allocation holding the reference
/// count, the length and the text: stored values are most of a table's
/// memory, and every word of a map bucket costs about two per entry.
#[derive(Clone)]
#[repr(transparent)]
pub struct Value(ThinArc<(), u8>);

// A slot keeps a value as the bare pointer `into_ptr` gives and lends it
// out as `&Value` (see `borrow_ptr`), which needs the two to be one word.
const _: () = assert!(std::mem::size_of::<Value>() == std::mem::size_of::<NonNull<c_void>>());

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Value {
    /// Canonicalizes a parsed JSON value.
    pub fn from_json(v: &serde_json::Value) -> Self {
        // Serializing a serde_json::Value into a Vec cannot fail: every map key
        // is a string and no custom Serialize impl is involved.
        let bytes = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
        Self::from_canonical(&bytes)
    }

    /// Parses and canonicalizes JSON text. An object with a repeated
    /// member name is refused (see [`crate::json`]); canonical text cannot
    /// hold one, its names being in strictly increasing order.
    ///
    /// # Errors
    /// The serde_json error when `text` is not one JSON value, or repeats
    /// a member name.
    pub fn parse(text: &[u8]) -> Result<Self, serde_json::Error> {
        if super::canonical::is_canonical(text) {
            return Ok(Self::from_canonical(text));
        }
        let v = crate::json::parse_value(text)?;
        Ok(Self::from_json(&v))
    }

    /// Wraps text that is already canonical JSON (from our own encoder or disk).
    pub fn from_canonical(bytes: &[u8]) -> Self {
        Value(ThinArc::from_header_and_slice((), bytes))
    }

    /// The canonical JSON text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.slice
    }

    /// Parses the stored text back into a JSON tree.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.as_bytes()).unwrap_or(serde_json::Value::Null)
    }

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the text is empty (never true for a parsed value).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The value as its one pointer, for a slot that keeps a tag beside
    /// it; [`Value::from_ptr`] takes it back.
    pub(crate) fn into_ptr(self) -> NonNull<c_void> {
        let raw = ThinArc::into_raw(self.0);
        // SAFETY: a ThinArc's pointer is never null.
        unsafe { NonNull::new_unchecked(raw.cast_mut()) }
    }

    /// Takes back a value given out by [`Value::into_ptr`].
    ///
    /// # Safety
    /// `raw` came from `into_ptr` and is taken back once.
    pub(crate) unsafe fn from_ptr(raw: NonNull<c_void>) -> Self {
        // SAFETY: as the caller promises.
        Value(unsafe { ThinArc::from_raw(raw.as_ptr()) })
    }

    /// Lends the value whose pointer (from [`Value::into_ptr`]) `raw`
    /// holds, without taking it.
    ///
    /// # Safety
    /// `*raw` came from `into_ptr` and is not taken back while the borrow
    /// lives.
    pub(crate) unsafe fn borrow_ptr(raw: &NonNull<c_void>) -> &Self {
        // SAFETY: Value is a transparent ThinArc, which is a transparent
        // pointer holding exactly what `into_ptr` returned (checked by the
        // test `a_value_pointer_reads_back`); the caller vouches for the rest.
        unsafe { &*std::ptr::from_ref(raw).cast::<Value>() }
    }

    /// [`Value::borrow_ptr`], mutably: assigning through it drops the old
    /// value and leaves the new one's pointer in `*raw`.
    ///
    /// # Safety
    /// As [`Value::borrow_ptr`].
    pub(crate) unsafe fn borrow_ptr_mut(raw: &mut NonNull<c_void>) -> &mut Self {
        // SAFETY: as in `borrow_ptr`.
        unsafe { &mut *std::ptr::from_mut(raw).cast::<Value>() }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Checks a key against the contract: 1–1024 bytes of UTF-8 without NUL.
///
/// # Errors
/// [`StoreError::InvalidArgument`] naming what is wrong.
pub fn validate_key(key: &str) -> StoreResult<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(StoreError::InvalidArgument(
            "key must not contain NUL".into(),
        ));
    }
    Ok(())
}

/// Checks a table name: 1–64 characters of `A-Z a-z 0-9 _ - .`.
///
/// # Errors
/// [`StoreError::InvalidArgument`] naming what is wrong.
pub fn validate_table_name(name: &str) -> StoreResult<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if name.is_empty() || name.len() > MAX_NAME_CHARS || !ok_chars {
        return Err(StoreError::InvalidArgument(format!(
            "table names are 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 _ - ."
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_with_reordered_members_are_identical() {
        let a = Value::parse(br#"{"b":1,"a":[1,2]}"#).unwrap();
        let b = Value::parse(br#" { "a" : [1, 2], "b": 1 } "#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_bytes(), br#"{"a":[1,2],"b":1}"#);
    }

    #[test]
    fn a_value_pointer_reads_back() {
        let v = Value::parse(br#"{"a":1}"#).unwrap();
        let mut raw = v.clone().into_ptr();
        // SAFETY: `raw` came from into_ptr and is taken back once, below.
        unsafe {
            assert_eq!(Value::borrow_ptr(&raw), &v);
            *Value::borrow_ptr_mut(&mut raw) = Value::from_canonical(b"2");
            assert_eq!(Value::from_ptr(raw).as_bytes(), b"2");
        }
        assert_eq!(v.as_bytes(), br#"{"a":1}"#);
    }

    #[test]
    fn keys_are_checked_for_length_and_nul() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a\0b").is_err());
        assert!(validate_key(&"x".repeat(1024)).is_ok());
        assert!(validate_key(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn table_names_follow_the_contract() {
        assert!(validate_table_name("users.v2_a-b").is_ok());
        assert!(validate_table_name("").is_err());
        assert!(validate_table_name("a b").is_err());
        assert!(validate_table_name("é").is_err());
        assert!(validate_table_name(&"a".repeat(65)).is_err());
    }
}
