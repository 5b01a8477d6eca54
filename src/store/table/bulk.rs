//! `insert/2` with a list: all or nothing, undone with fresh versions.

use super::*;

impl Table {
    /// `insert/2` with a list: every item or none. Items are applied in
    /// order; if one fails (table full), the ones before it are undone and
    /// the error returned.
    ///
    /// # Errors
    /// [`StoreError::TableFull`].
    pub fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> StoreResult<usize> {
        let _step = self.step();
        let count = items.len();
        let mut undo: Vec<(String, Option<Slot>, Written)> = Vec::with_capacity(count);
        for (key, value, expiry) in items {
            let before = self.live_slot(&key);
            match self.insert_locked(&key, value, expiry, &Precondition::None) {
                Ok(w) if before.as_ref().map(|b| b.version) == Some(w.version) => {}
                Ok(w) => undo.push((key, before, w)),
                Err(e) => {
                    crate::failpoint!("bulk-before-undo");
                    for (key, before, written) in undo.into_iter().rev() {
                        self.restore(&key, before, written);
                    }
                    return Err(e);
                }
            }
        }
        if !undo.is_empty() {
            self.evict_if_needed();
        }
        Ok(count)
    }

    /// Puts back what a key held before `written`, unless someone has
    /// written the key since.
    ///
    /// The restored content gets a fresh version, never the old one:
    /// versions only go forward, so a write-back round that wrote the
    /// undone value cannot mistake the restored key for one it already
    /// saved and clear its dirty mark.
    pub(super) fn restore(&self, key: &str, before: Option<Slot>, written: Written) {
        let MapEntry::Occupied(mut o) = self.map.entry(Key::from(key)) else {
            return;
        };
        if o.get().version != written.version {
            return;
        }
        let inserted = o.get().objects().count();
        match before {
            None => {
                self.remove_occupied(o, Removal::Undo);
            }
            Some(mut prev) => {
                let restored = prev.objects().count();
                self.size
                    .fetch_add(restored as i64 - inserted as i64, Ordering::Relaxed);
                let change = self.begin_change();
                prev.version = change.revision;
                // Content a reader may have seen is replaced: a new write
                // time, so `If-Modified-Since` sees the change.
                prev.set_modified(unix_seconds(self.now()));
                // What a watcher saw was the write being undone: a set key
                // gets its old value back; a bag loses the value it gained.
                let event = match (prev.objects(), o.get().objects()) {
                    (ObjectsRef::One(old), _) => Some((ChangeKind::Put, change.keep(old))),
                    (ObjectsRef::Many(_), ObjectsRef::Many(now)) => now
                        .iter()
                        .find(|x| x.seq == written.version)
                        .map(|x| (ChangeKind::Delete, change.keep(&x.value))),
                    (ObjectsRef::Many(_), ObjectsRef::One(_)) => None,
                };
                self.modify_occupied(&mut o, |slot| *slot = prev);
                if let Some((kind, note)) = event {
                    change.publish(kind, key, note);
                }
            }
        }
        self.stats
            .inserts
            .fetch_sub(written.inserted, Ordering::Relaxed);
    }
}
