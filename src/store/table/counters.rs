//! Read-modify-write of one key: `update_counter` and merge patch.

use super::*;
use crate::store::rules;

impl Table {
    /// `update_counter/4`: atomically adds to an integer value (or member).
    ///
    /// # Errors
    /// [`StoreError::WrongTableType`] on bag types, [`StoreError::KeyNotFound`]
    /// without a default, [`StoreError::NotACounter`], [`StoreError::Overflow`],
    /// [`StoreError::TableFull`] when a default would add a key to a full table.
    pub fn update_counter(&self, key: &str, op: &CounterOp) -> StoreResult<i64> {
        let _step = self.step();
        let (n, created) = self.update_counter_locked(key, op)?;
        if created {
            self.evict_if_needed();
        }
        Ok(n)
    }

    pub(super) fn update_counter_locked(
        &self,
        key: &str,
        op: &CounterOp,
    ) -> StoreResult<(i64, bool)> {
        rules::single_valued(self.fixed.kind, rules::SingleOp::Counter)?;
        op.validate()?;
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(v) => {
                let start = op.default_value().ok_or(StoreError::KeyNotFound)?;
                let (value, n) = op.apply(&start)?;
                self.admit((KEY_OVERHEAD + object_bytes(value.len()) + v.key().len()) as i64)?;
                self.grow(1)?;
                let change = self.begin_change();
                let note = change.keep(&value);
                let slot = Slot::new(
                    Objects::One(value),
                    change.revision,
                    self.deadline(now, None),
                    self.tick(),
                    unix_seconds(now),
                );
                self.insert_vacant(v, slot);
                change.publish(ChangeKind::Put, key, note);
                Ok((n, true))
            }
            MapEntry::Occupied(mut o) => {
                let ObjectsRef::One(current) = o.get().objects() else {
                    return Err(StoreError::WrongTableType("counters need a set table"));
                };
                let (value, n) = op.apply(current)?;
                self.replace_single(&mut o, value, now)?;
                Ok((n, false))
            }
        }
    }

    /// `update_element` as a JSON Merge Patch on an object value.
    ///
    /// # Errors
    /// [`StoreError::WrongTableType`] on bag types, [`StoreError::KeyNotFound`],
    /// [`StoreError::NotAnObject`], [`StoreError::PreconditionFailed`].
    pub fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> StoreResult<Entry> {
        let _step = self.step();
        self.merge_inner(key, patch, pre)
    }

    pub(super) fn merge_inner(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> StoreResult<Entry> {
        rules::single_valued(self.fixed.kind, rules::SingleOp::Merge)?;
        let now = self.now();
        let MapEntry::Occupied(mut o) = self.live_entry(key, now) else {
            pre.check(None)?;
            return Err(StoreError::KeyNotFound);
        };
        pre.check(Some(o.get()))?;
        let ObjectsRef::One(current) = o.get().objects() else {
            return Err(StoreError::WrongTableType("merge patch needs a set table"));
        };
        let value = merge_patch(current, patch, self.raw_values())?;
        self.replace_single(&mut o, value, now)?;
        Ok(Entry::of(o.get(), now))
    }

    /// Replaces a set key's value after a read-modify-write, with a fresh
    /// version; the table's default TTL, if any, restarts the key's expiry.
    ///
    /// # Errors
    /// [`StoreError::MemoryLimit`].
    fn replace_single(&self, o: &mut OccupiedEntry<'_>, value: Value, now: u64) -> StoreResult<()> {
        let old = o.get().objects().values().next().map_or(0, Value::len);
        self.admit(value.len() as i64 - old as i64)?;
        let change = self.begin_change();
        let version = change.revision;
        let note = change.keep(&value);
        let expires_at = self.refreshed_deadline(now, o.get().expires_at);
        self.modify_occupied(o, |slot| {
            slot.set_objects(Objects::One(value));
            slot.version = version;
            slot.expires_at = expires_at;
            slot.set_modified(unix_seconds(now));
        });
        change.publish(ChangeKind::Put, o.key(), note);
        Ok(())
    }
}
