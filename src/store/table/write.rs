//! Writes of one key: `insert`, `delete`, `delete_object`, `take`, and
//! `delete_all_objects`.

use super::*;
use crate::store::rules;

impl Table {
    /// `insert` of one object: replaces in set types, adds in bag types
    /// (unless identical, for `bag`). `ttl_ms` overrides the table default.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`], [`StoreError::TableFull`].
    pub fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> StoreResult<Written> {
        self.insert_until(key, value, Expiry::After(ttl_ms), pre)
    }

    /// `insert/2` of one object that lives as `expiry` says.
    ///
    /// # Errors
    /// As [`Table::insert`].
    pub fn insert_until(
        &self,
        key: &str,
        value: Value,
        expiry: Expiry,
        pre: &Precondition,
    ) -> StoreResult<Written> {
        let _step = self.step();
        let written = self.insert_locked(key, value, expiry, pre)?;
        if written.inserted > 0 {
            self.evict_if_needed();
        }
        Ok(written)
    }

    pub(super) fn insert_locked(
        &self,
        key: &str,
        value: Value,
        expiry: Expiry,
        pre: &Precondition,
    ) -> StoreResult<Written> {
        let now = self.now();
        let expires_at = match expiry {
            Expiry::After(ttl_ms) => self.deadline(now, ttl_ms),
            Expiry::At(deadline) => deadline,
        };
        match self.live_entry(key, now) {
            MapEntry::Vacant(v) => {
                pre.check(None)?;
                self.admit(
                    (KEY_OVERHEAD
                        + object_bytes(value.len())
                        + std::mem::size_of::<Object>()
                        + v.key().len()) as i64,
                )?;
                self.grow(1)?;
                let change = self.begin_change();
                let version = change.revision;
                let note = change.keep(&value);
                let slot = Slot::new(
                    self.fresh_objects(value, version),
                    version,
                    expires_at,
                    self.tick(),
                    unix_seconds(now),
                );
                self.insert_vacant(v, slot);
                change.publish(ChangeKind::Put, key, note);
                Ok(Written {
                    created: true,
                    version,
                    inserted: 1,
                })
            }
            MapEntry::Occupied(mut o) => {
                pre.check(Some(o.get()))?;
                let held = match o.get().objects() {
                    ObjectsRef::One(_) => &[][..],
                    ObjectsRef::Many(objs) => objs,
                };
                let effect = rules::insert(self.fixed.kind, held, &value);
                let adds = effect == rules::Insert::Add;
                if effect == rules::Insert::Keep && o.get().expires_at == expires_at {
                    return Ok(Written {
                        created: false,
                        version: o.get().version,
                        inserted: 0,
                    });
                }
                let growth = match o.get().objects() {
                    ObjectsRef::One(old) => value.len() as i64 - old.len() as i64,
                    ObjectsRef::Many(_) if adds => {
                        (object_bytes(value.len()) + std::mem::size_of::<Object>()) as i64
                    }
                    ObjectsRef::Many(_) => 0,
                };
                self.admit(growth)?;
                if adds {
                    self.grow(1)?;
                }
                let change = self.begin_change();
                let version = change.revision;
                // A bag given a value it holds only has its deadline moved:
                // nothing a watcher sees changes.
                let visible = effect != rules::Insert::Keep;
                let note = if visible { change.keep(&value) } else { None };
                self.modify_occupied(&mut o, |slot| {
                    match slot.objects_mut() {
                        ObjectsMut::One(v) => *v = value,
                        ObjectsMut::Many(objs) if adds => objs.push(Object {
                            seq: version,
                            value,
                        }),
                        ObjectsMut::Many(_) => {}
                    }
                    slot.version = version;
                    slot.expires_at = expires_at;
                    if visible {
                        slot.set_modified(unix_seconds(now));
                    }
                });
                if visible {
                    change.publish(ChangeKind::Put, key, note);
                }
                let inserted = u64::from(visible);
                self.stats.inserts.fetch_add(inserted, Ordering::Relaxed);
                Ok(Written {
                    created: false,
                    version,
                    inserted,
                })
            }
        }
    }

    /// `delete/2`: removes the key. Returns whether it was present.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`].
    pub fn delete(&self, key: &str, pre: &Precondition) -> StoreResult<bool> {
        let _step = self.step();
        self.delete_inner(key, pre)
    }

    pub(super) fn delete_inner(&self, key: &str, pre: &Precondition) -> StoreResult<bool> {
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(_) => {
                pre.check(None)?;
                // A deleted key never comes back stale.
                self.forget_stale(key);
                Ok(false)
            }
            MapEntry::Occupied(o) => {
                pre.check(Some(o.get()))?;
                self.remove_occupied(o, Removal::Deleted);
                Ok(true)
            }
        }
    }

    /// `delete_object`: removes every object under `key` identical to `value`.
    /// Returns how many were removed.
    pub fn delete_object(&self, key: &str, value: &Value) -> usize {
        let _step = self.step();
        self.delete_object_inner(key, value)
    }

    pub(super) fn delete_object_inner(&self, key: &str, value: &Value) -> usize {
        let now = self.now();
        let MapEntry::Occupied(mut o) = self.live_entry(key, now) else {
            return 0;
        };
        let (removed, left) = match o.get().objects() {
            ObjectsRef::One(v) => (usize::from(v == value), 0),
            ObjectsRef::Many(objs) => {
                let hits = objs.iter().filter(|x| &x.value == value).count();
                (hits, objs.len() - hits)
            }
        };
        if removed == 0 {
            return 0;
        }
        if left == 0 {
            self.remove_noting(o, Removal::Deleted, Some(value.clone()));
            return removed;
        }
        let change = self.begin_change();
        let version = change.revision;
        self.modify_occupied(&mut o, |slot| {
            if let ObjectsMut::Many(objs) = slot.objects_mut() {
                objs.retain(|x| &x.value != value);
            }
            slot.version = version;
            slot.set_modified(unix_seconds(now));
        });
        let note = change.keep(value);
        change.publish(ChangeKind::Delete, key, note);
        self.shrink(removed);
        self.stats
            .deletes
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// `take`: removes the key and returns what it held.
    pub fn take(&self, key: &str) -> Option<Entry> {
        let _step = self.step();
        self.take_inner(key)
    }

    pub(super) fn take_inner(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(_) => {
                self.forget_stale(key);
                None
            }
            MapEntry::Occupied(o) => {
                let (_, slot) = self.remove_occupied(o, Removal::Deleted);
                Some(Entry::of(&slot, now))
            }
        }
    }

    /// `delete_all_objects`: empties the table in one step, as ETS does:
    /// with every shard locked, so no reader sees it half empty and no
    /// write lands between the first shard and the last.
    ///
    /// The step costs the same whatever the table holds: each shard's
    /// contents are swapped for an empty map and handed to the store's
    /// reclaimer, which frees them in the background, with the ordered-index
    /// and deadline entries they leave behind (scans and the sweeper skip
    /// such entries until then). Their bytes stay counted in the server's
    /// memory until they are freed. One revision, one `clear` event, and
    /// for a durable table one "cleared" mark that the durable tier saves
    /// instead of a removal per key.
    pub fn clear(self: &Arc<Self>) {
        let step = self.step();
        let mut shards: Vec<_> = self.map.write_all();
        let emptied = shards.iter().any(|s| !s.is_empty());
        // After the shard locks, as every writer takes them. A clear that
        // removes nothing changes nothing (its bucket arrays still go).
        let change = emptied.then(|| self.begin_change());
        let contents: Vec<_> = shards.iter_mut().map(|s| s.take()).collect();
        let objects = self.size.swap(0, Ordering::Relaxed).max(0) as u64;
        let bytes = self.memory.swap(0, Ordering::Relaxed);
        self.stats.deletes.fetch_add(objects, Ordering::Relaxed);
        self.forget_all_stale();
        if let Some(change) = change {
            if let Some(dirty) = &self.dirty {
                dirty.cleared(change.revision, self.now());
            }
            change.publish_table(ChangeKind::Clear);
        }
        drop(shards);
        drop(step);
        let table = self.clone();
        self.shared.reclaim(Box::new(move || {
            for shard in contents {
                for (key, slot) in shard {
                    table.forget_cleared(&key, &slot);
                }
            }
            table.shared.memory.add(MemoryKind::Tables, -bytes);
        }));
    }

    /// After a clear: drops the index and deadline entries of `key`, which
    /// the cleared `slot` held, unless the key has been stored again and
    /// uses them itself. Under the key's shard lock, as the index rules ask.
    pub(crate) fn forget_cleared(&self, key: &Key, slot: &Slot) {
        if self.index.is_none() && slot.expires_at == 0 {
            return;
        }
        // The shard's lock rather than an entry, which would own a copy
        // of the key.
        let hash = self.map.hash(key);
        let shard = self.map.write(self.map.shard_of(hash));
        let stored = shard.get(hash, key).map(|s| s.expires_at);
        match stored {
            None => {
                if let Some(index) = &self.index {
                    index.remove(key.as_bytes());
                }
                if slot.expires_at != 0 {
                    self.deadlines.remove(&(slot.expires_at, key.clone()));
                }
            }
            Some(deadline) => {
                if slot.expires_at != 0 && deadline != slot.expires_at {
                    self.deadlines.remove(&(slot.expires_at, key.clone()));
                }
            }
        }
        drop(shard);
    }
}
