//! The ETS rules of the four table types, in one place.
//!
//! Both tiers decide with these: the local store under a key's shard lock
//! (`table/write.rs`, `table/counters.rs`) and the cluster tier on a row
//! read under its row lock (`cluster::rows`). Each tier applies the
//! decision its own way (in place, or as a new row), but what a write
//! means is written once, here.

use super::{Object, StoreError, StoreResult, TableType, Value};

/// What `insert/2` of `value` does to a key that already holds objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// `set`, `ordered_set`: the value replaces the one held.
    Replace,
    /// `bag` given a value it does not hold, `duplicate_bag` always: the
    /// value is added beside the others.
    Add,
    /// `bag` given a value it holds: no object changes (only the key's
    /// deadline may move).
    Keep,
}

/// What inserting `value` into a key of a `kind` table does, given the
/// objects the key holds (`held`; empty for set types).
pub fn insert(kind: TableType, held: &[Object], value: &Value) -> Insert {
    match kind {
        TableType::Set | TableType::OrderedSet => Insert::Replace,
        TableType::DuplicateBag => Insert::Add,
        TableType::Bag if held.iter().any(|o| &o.value == value) => Insert::Keep,
        TableType::Bag => Insert::Add,
    }
}

/// `update_counter` and `update_element` work on one value per key: the
/// set types only. `what` names the operation for the error.
///
/// # Errors
/// [`StoreError::WrongTableType`] on `bag` and `duplicate_bag`.
pub fn single_valued(kind: TableType, what: SingleOp) -> StoreResult<()> {
    if kind.is_single() {
        Ok(())
    } else {
        Err(StoreError::WrongTableType(match what {
            SingleOp::Counter => "counters need a set or ordered_set table",
            SingleOp::Merge => "merge patch needs a set or ordered_set table",
        }))
    }
}

/// The operations that need one value per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleOp {
    /// `update_counter/4`.
    Counter,
    /// `update_element/3`, as a JSON Merge Patch.
    Merge,
}

/// Deadline (Unix ms; 0 for none) of a write at `now` that names `ttl_ms`
/// or none, on a table whose `default_ttl_ms` is `default` (0 for none).
pub fn deadline(now: u64, ttl_ms: Option<u64>, default: u64) -> u64 {
    match ttl_ms.or((default != 0).then_some(default)) {
        Some(ms) => now.saturating_add(ms),
        None => 0,
    }
}

/// Deadline after a read-modify-write that names no TTL and keeps the key
/// (a counter, a merge patch): the table default restarts it, else the
/// key keeps `current`.
pub fn refreshed_deadline(now: u64, current: u64, default: u64) -> u64 {
    match default {
        0 => current,
        d => now.saturating_add(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Value {
        Value::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn each_type_inserts_as_ets_does() {
        let held = [Object {
            seq: 1,
            value: v("1"),
        }];
        assert_eq!(insert(TableType::Set, &[], &v("1")), Insert::Replace);
        assert_eq!(insert(TableType::OrderedSet, &[], &v("2")), Insert::Replace);
        assert_eq!(insert(TableType::Bag, &held, &v("1")), Insert::Keep);
        assert_eq!(insert(TableType::Bag, &held, &v("2")), Insert::Add);
        assert_eq!(insert(TableType::DuplicateBag, &held, &v("1")), Insert::Add);
    }

    #[test]
    fn deadlines_follow_the_write_then_the_default() {
        assert_eq!(deadline(100, Some(5), 50), 105);
        assert_eq!(deadline(100, None, 50), 150);
        assert_eq!(deadline(100, None, 0), 0);
        assert_eq!(deadline(u64::MAX, Some(5), 0), u64::MAX);
        assert_eq!(refreshed_deadline(100, 7, 0), 7);
        assert_eq!(refreshed_deadline(100, 7, 50), 150);
    }

    #[test]
    fn only_set_types_take_counters_and_patches() {
        assert!(single_valued(TableType::Set, SingleOp::Counter).is_ok());
        assert!(single_valued(TableType::OrderedSet, SingleOp::Merge).is_ok());
        assert!(single_valued(TableType::Bag, SingleOp::Counter).is_err());
        assert!(single_valued(TableType::DuplicateBag, SingleOp::Merge).is_err());
    }
}
