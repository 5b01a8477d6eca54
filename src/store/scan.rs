//! Scans: key-ordered range walks for `ordered_set`, cursor walks for the
//! hashed types.
//!
//! # The cursor guarantee
//! A scan that runs while the table changes returns every entry that lived
//! throughout it exactly once. Both walks visit entries in a fixed total order
//! that does not depend on the map's internal layout, and a cursor is simply
//! the position of the last object returned:
//! - `ordered_set`: bytewise key order (reversed with `reverse`).
//! - hashed types: (shard, key hash, key), where the hash is the table map's
//!   own and the shard follows from the hash. A page reads one shard at a time
//!   under its read lock.
//!
//! Bag objects carry sequence numbers, so a page may end inside a key and the
//! next one resumes after the last object returned.
//!
//! Cursors of hashed tables hold the map's hash, which is seeded per process:
//! they stay valid while the server runs.

use std::cmp::Ordering as CmpOrdering;
use std::ops::Bound;

use super::error::{StoreError, StoreResult};
use super::slot::{ObjectsRef, Slot};
use super::table::Table;
use super::value::{Key, Value, MAX_KEY_BYTES};

/// Largest page a scan may ask for.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// Entries a hashed scan examines in one call before it stops at the end
/// of a shard, with a cursor at the next shard's start: a prefix that
/// matches little would otherwise walk the whole table in one call. Its
/// caller decides whether to go on (after letting other tasks run).
pub const SCAN_STEP: usize = 16_384;
/// Page size when the request names none.
pub const DEFAULT_SCAN_LIMIT: usize = 100;

/// Where a scan resumes: after object `seq` of `key` at position `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Hash position for hashed tables; 0 for `ordered_set`.
    pub hash: u64,
    /// Last object returned under `key` (bag types); 0 for set types.
    pub seq: u64,
    /// Last key returned.
    pub key: String,
}

impl Cursor {
    /// The position before everything: a scan from it starts at the
    /// beginning.
    pub fn start() -> Self {
        Cursor {
            hash: 0,
            seq: 0,
            key: String::new(),
        }
    }

    /// Opaque, URL-safe text for `next_cursor`.
    pub fn encode(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(32 + 2 * self.key.len());
        let bytes = self.hash.to_be_bytes().into_iter();
        for b in bytes.chain(self.seq.to_be_bytes()).chain(self.key.bytes()) {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Reads a cursor produced by [`Cursor::encode`].
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] when the text is not such a cursor.
    pub fn decode(text: &str) -> StoreResult<Self> {
        let bad = || StoreError::InvalidArgument("cursor is not one this server issued".into());
        if text.len() < 32 || !text.len().is_multiple_of(2) || !text.is_ascii() {
            return Err(bad());
        }
        let hash = u64::from_str_radix(&text[..16], 16).map_err(|_| bad())?;
        let seq = u64::from_str_radix(&text[16..32], 16).map_err(|_| bad())?;
        let bytes = (32..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        let key = String::from_utf8(bytes).map_err(|_| bad())?;
        Ok(Cursor { hash, seq, key })
    }
}

/// What a scan asks for. Range bounds apply to `ordered_set` only; `prefix`
/// filters every type.
#[derive(Debug, Clone, Default)]
pub struct ScanRequest {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Lowest key, inclusive.
    pub start: Option<String>,
    /// Lowest key, exclusive.
    pub after: Option<String>,
    /// Highest key, exclusive.
    pub end: Option<String>,
    /// Most objects to return (1..=10000).
    pub limit: usize,
    /// Walk the range from its high end.
    pub reverse: bool,
    /// Resume after this position.
    pub cursor: Option<Cursor>,
}

impl ScanRequest {
    /// Checks that every key bound given could be a key: at most
    /// [`MAX_KEY_BYTES`] bytes, no NUL.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] naming the bound.
    pub fn check_bounds(&self) -> StoreResult<()> {
        for (name, bound) in [
            ("prefix", &self.prefix),
            ("start", &self.start),
            ("after", &self.after),
            ("end", &self.end),
        ] {
            if bound
                .as_deref()
                .is_some_and(|b| b.len() > MAX_KEY_BYTES || b.contains('\0'))
            {
                return Err(StoreError::InvalidArgument(format!(
                    "{name} must be at most {MAX_KEY_BYTES} bytes without NUL"
                )));
            }
        }
        Ok(())
    }

    /// Whether `key` lies within the key bounds (`prefix`, `start`,
    /// `after`, `end`), for callers that filter rather than seek.
    pub fn admits(&self, key: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
            && self.start.as_deref().is_none_or(|s| key >= s)
            && self.after.as_deref().is_none_or(|a| key > a)
            && self.end.as_deref().is_none_or(|e| key < e)
    }

    /// Checks the request for a table that is (`ordered`) or is not an
    /// `ordered_set`.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for range options on a hashed table,
    /// conflicting bounds, or a limit out of range.
    pub fn check(&self, ordered: bool) -> StoreResult<()> {
        if self.limit == 0 || self.limit > MAX_SCAN_LIMIT {
            return Err(StoreError::InvalidArgument(format!(
                "limit must be between 1 and {MAX_SCAN_LIMIT}"
            )));
        }
        if self.start.is_some() && self.after.is_some() {
            return Err(StoreError::InvalidArgument(
                "give at most one of start and after".into(),
            ));
        }
        if !ordered
            && (self.start.is_some() || self.after.is_some() || self.end.is_some() || self.reverse)
        {
            return Err(StoreError::InvalidArgument(
                "start, after, end and reverse need an ordered_set table; other types support prefix and cursor".into(),
            ));
        }
        Ok(())
    }
}

/// One page of a scan.
#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    /// `(key, object)` pairs; bag keys appear once per object.
    pub items: Vec<(Key, Value)>,
    /// Each item's place in the walk, `(hash, seq)` as a [`Cursor`] holds
    /// them, so that a reader can resume right after any item.
    pub positions: Vec<(u64, u64)>,
    /// Each item's expiry deadline, Unix ms (0: none).
    pub deadlines: Vec<u64>,
    /// Where to resume, or `None` when the scan is complete.
    pub next_cursor: Option<Cursor>,
}

impl ScanPage {
    /// The cursor that resumes right after item `i`.
    pub fn cursor_after(&self, i: usize) -> Option<Cursor> {
        let (key, _) = self.items.get(i)?;
        let (hash, seq) = self.positions.get(i).copied()?;
        Some(Cursor {
            hash,
            seq,
            key: key.to_string(),
        })
    }
}

impl Table {
    /// One page of a scan.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for range options on a hashed table,
    /// conflicting bounds, or a limit out of range.
    pub fn scan(&self, req: &ScanRequest) -> StoreResult<ScanPage> {
        req.check(self.index().is_some())?;
        if self.index().is_some() {
            Ok(self.scan_ordered(req))
        } else {
            Ok(self.scan_hashed(req))
        }
    }

    fn scan_ordered(&self, req: &ScanRequest) -> ScanPage {
        let Some(index) = self.index() else {
            return ScanPage::default();
        };
        let now = self.now();
        let mut lower: Bound<Vec<u8>> = Bound::Unbounded;
        let mut upper: Bound<Vec<u8>> = Bound::Unbounded;
        let raise = |b: &mut Bound<Vec<u8>>, new: Bound<Vec<u8>>| {
            if lower_cmp(&new, b) == CmpOrdering::Greater {
                *b = new;
            }
        };
        let cut = |b: &mut Bound<Vec<u8>>, new: Bound<Vec<u8>>| {
            if upper_cmp(&new, b) == CmpOrdering::Less {
                *b = new;
            }
        };
        if let Some(s) = &req.start {
            raise(&mut lower, Bound::Included(s.as_bytes().to_vec()));
        }
        if let Some(a) = &req.after {
            raise(&mut lower, Bound::Excluded(a.as_bytes().to_vec()));
        }
        if let Some(e) = &req.end {
            cut(&mut upper, Bound::Excluded(e.as_bytes().to_vec()));
        }
        if let Some(p) = &req.prefix {
            raise(&mut lower, Bound::Included(p.as_bytes().to_vec()));
            if let Some(succ) = prefix_successor(p.as_bytes()) {
                cut(&mut upper, Bound::Excluded(succ));
            }
        }
        if let Some(c) = &req.cursor {
            let at = Bound::Excluded(c.key.as_bytes().to_vec());
            if req.reverse {
                cut(&mut upper, at);
            } else {
                raise(&mut lower, at);
            }
        }
        if range_is_empty(&lower, &upper) {
            return ScanPage::default();
        }
        let range = index.range::<[u8], _>((as_ref(&lower), as_ref(&upper)));
        let keys: Box<dyn Iterator<Item = _>> = if req.reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut page = ScanPage::default();
        let mut skipped = 0usize;
        for entry in keys {
            let Ok(key) = std::str::from_utf8(entry.value()) else {
                continue;
            };
            let Some((value, deadline)) =
                self.map().get(key).and_then(|slot| match slot.objects() {
                    ObjectsRef::One(v) if !slot.is_expired(now) => {
                        Some((v.clone(), slot.expires_at))
                    }
                    _ => None,
                })
            else {
                // Expired, or left in the index by a clear and not yet
                // reclaimed: such keys can be many, so after a while stop
                // past this one and let the caller decide to go on.
                skipped += 1;
                if skipped >= SCAN_STEP {
                    page.next_cursor = Some(Cursor {
                        hash: 0,
                        seq: 0,
                        key: key.to_owned(),
                    });
                    break;
                }
                continue;
            };
            if page.items.len() == req.limit {
                page.next_cursor = page.items.last().map(|(k, _)| Cursor {
                    hash: 0,
                    seq: 0,
                    key: k.to_string(),
                });
                break;
            }
            page.items.push((Key::from(key), value));
            page.positions.push((0, 0));
            page.deadlines.push(deadline);
        }
        page
    }

    fn scan_hashed(&self, req: &ScanRequest) -> ScanPage {
        let map = self.map();
        let now = self.now();
        let prefix = req.prefix.as_deref().unwrap_or("");
        let first_shard = req.cursor.as_ref().map_or(0, |c| map.shard_of(c.hash));
        let mut page = ScanPage::default();
        let mut examined = 0usize;
        for shard in first_shard..map.shard_count() {
            if examined >= SCAN_STEP && page.items.len() < req.limit {
                if let Some(start) = self.shard_start(shard) {
                    page.next_cursor = Some(start);
                    return page;
                }
            }
            let guard = map.read(shard);
            examined += guard.len();
            // Positions after the cursor, smallest first, as
            // (hash, key, slot, first object seq to return).
            let mut found: Vec<(u64, &Key, &Slot, u64)> = Vec::new();
            for (key, slot) in guard.iter() {
                if slot.is_expired(now) || !key.starts_with(prefix) {
                    continue;
                }
                let hash = map.hash(key);
                // The cursor orders positions within its own shard only;
                // later shards are read from their start.
                let from_seq = match req.cursor.as_ref().filter(|_| shard == first_shard) {
                    Some(c) => match (hash, key.as_ref()).cmp(&(c.hash, c.key.as_str())) {
                        CmpOrdering::Less => continue,
                        CmpOrdering::Equal if self.kind().is_single() => continue,
                        CmpOrdering::Equal => c.seq + 1,
                        CmpOrdering::Greater => 0,
                    },
                    None => 0,
                };
                let has_objects = match slot.objects() {
                    ObjectsRef::One(_) => true,
                    ObjectsRef::Many(objs) => objs.iter().any(|o| o.seq >= from_seq),
                };
                if !has_objects {
                    continue;
                }
                found.push((hash, key, slot, from_seq));
            }
            let need = req.limit - page.items.len();
            let by_pos = |a: &(u64, &Key, &Slot, u64), b: &(u64, &Key, &Slot, u64)| {
                (a.0, a.1).cmp(&(b.0, b.1))
            };
            if found.len() > need + 1 {
                found.select_nth_unstable_by(need, by_pos);
                found.truncate(need + 1);
            }
            found.sort_unstable_by(by_pos);
            for (hash, key, slot, from_seq) in &found {
                let objects: Vec<(u64, &Value)> = match slot.objects() {
                    ObjectsRef::One(v) => vec![(0, v)],
                    ObjectsRef::Many(objs) => objs
                        .iter()
                        .filter(|o| o.seq >= *from_seq)
                        .map(|o| (o.seq, &o.value))
                        .collect(),
                };
                for (seq, value) in objects {
                    if page.items.len() == req.limit {
                        // next_cursor already names the last object returned.
                        return page;
                    }
                    page.items.push(((*key).clone(), value.clone()));
                    page.positions.push((*hash, seq));
                    page.deadlines.push(slot.expires_at);
                    page.next_cursor = Some(Cursor {
                        hash: *hash,
                        seq,
                        key: key.to_string(),
                    });
                }
            }
        }
        page.next_cursor = None;
        page
    }
}

impl Table {
    /// A cursor that resumes at the start of shard `shard`: the smallest
    /// hash that falls in it, and no key (every key is longer). `None`
    /// past the last shard.
    fn shard_start(&self, shard: usize) -> Option<Cursor> {
        let map = self.map();
        (shard < map.shard_count()).then(|| Cursor {
            hash: map.shard_start(shard),
            seq: 0,
            key: String::new(),
        })
    }
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Orders lower bounds by how much they exclude.
fn lower_cmp(a: &Bound<Vec<u8>>, b: &Bound<Vec<u8>>) -> CmpOrdering {
    use Bound::*;
    match (a, b) {
        (Unbounded, Unbounded) => CmpOrdering::Equal,
        (Unbounded, _) => CmpOrdering::Less,
        (_, Unbounded) => CmpOrdering::Greater,
        (Included(x), Included(y)) | (Excluded(x), Excluded(y)) => x.cmp(y),
        (Included(x), Excluded(y)) => x.cmp(y).then(CmpOrdering::Less),
        (Excluded(x), Included(y)) => x.cmp(y).then(CmpOrdering::Greater),
    }
}

/// Orders upper bounds by how much they admit.
fn upper_cmp(a: &Bound<Vec<u8>>, b: &Bound<Vec<u8>>) -> CmpOrdering {
    use Bound::*;
    match (a, b) {
        (Unbounded, Unbounded) => CmpOrdering::Equal,
        (Unbounded, _) => CmpOrdering::Greater,
        (_, Unbounded) => CmpOrdering::Less,
        (Included(x), Included(y)) | (Excluded(x), Excluded(y)) => x.cmp(y),
        (Included(x), Excluded(y)) => x.cmp(y).then(CmpOrdering::Greater),
        (Excluded(x), Included(y)) => x.cmp(y).then(CmpOrdering::Less),
    }
}

fn range_is_empty(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    use Bound::*;
    match (lower, upper) {
        (Unbounded, _) | (_, Unbounded) => false,
        (Included(l), Included(u)) => l > u,
        (Included(l), Excluded(u)) | (Excluded(l), Included(u)) | (Excluded(l), Excluded(u)) => {
            l >= u
        }
    }
}

/// The smallest byte string greater than every string that starts with
/// `prefix`, or `None` when there is none (empty prefix).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut succ = prefix.to_vec();
    while let Some(last) = succ.pop() {
        if last < u8::MAX {
            succ.push(last + 1);
            return Some(succ);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = Cursor {
            hash: 0xdead_beef,
            seq: 7,
            key: "ключ/1".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        // The text clients already hold: two 16-digit hex numbers, then
        // the key's bytes in hex.
        assert_eq!(
            c.encode(),
            "00000000deadbeef0000000000000007d0bad0bbd18ed1872f31"
        );
        assert!(Cursor::decode("zz").is_err());
        assert!(Cursor::decode(&"g".repeat(40)).is_err());
    }

    #[test]
    fn bounds_admit_keys() {
        let r = ScanRequest {
            prefix: Some("user:".into()),
            after: Some("user:1".into()),
            end: Some("user:5".into()),
            ..ScanRequest::default()
        };
        assert!(!r.admits("user:1"));
        assert!(r.admits("user:2"));
        assert!(!r.admits("user:5"));
        assert!(!r.admits("other"));
        assert!(ScanRequest::default().admits(""));
    }

    #[test]
    fn prefix_successor_skips_saturated_bytes() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b""), None);
    }
}
