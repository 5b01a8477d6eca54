//! The table's side of change feeds: every change takes its revision and
//! publishes its event in one step, under the key's shard lock.

use super::*;

/// A change under way, made under its key's shard lock: its revision, and
/// (when the table is watched) the hub held until the change is published,
/// so watchers get changes in revision order.
pub(crate) struct Pending<'a> {
    /// The change's revision, from the store's one version counter.
    pub revision: u64,
    recording: Option<Recording<'a>>,
    /// Inside a transaction: where its events wait for its commit.
    held: Option<&'a Mutex<Vec<Change>>>,
}

impl Pending<'_> {
    /// Whether anyone watches, so the event is worth building.
    pub fn watched(&self) -> bool {
        self.recording.is_some() || self.held.is_some()
    }

    /// A copy of `value` for the event, when someone watches.
    pub fn keep(&self, value: &Value) -> Option<Value> {
        self.watched().then(|| value.clone())
    }

    /// Publishes the change of `key`.
    pub fn publish(self, kind: ChangeKind, key: &str, value: Option<Value>) {
        if let Some(held) = self.held {
            let change = Change::new(self.revision, kind, Some(Key::from(key)), value);
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(change);
            return;
        }
        if let Some(mut rec) = self.recording {
            rec.push(Change::new(
                self.revision,
                kind,
                Some(Key::from(key)),
                value,
            ));
        }
    }

    /// Publishes a change of the whole table (`clear`).
    pub fn publish_table(self, kind: ChangeKind) {
        if let Some(mut rec) = self.recording {
            rec.push(Change::new(self.revision, kind, None, None));
        }
    }
}

impl Removal {
    /// The event a removal sends.
    fn event(self) -> ChangeKind {
        match self {
            Removal::Deleted | Removal::Undo => ChangeKind::Delete,
            Removal::Expired => ChangeKind::Expire,
            Removal::Evicted => ChangeKind::Evict,
        }
    }
}

impl Table {
    /// Takes the revision of a change about to be made; call under the
    /// key's shard lock and publish (or drop) the result before releasing it.
    pub(super) fn begin_change(&self) -> Pending<'_> {
        let hub = self.hub.get().filter(|hub| hub.records());
        if self.in_txn.load(Ordering::Relaxed) {
            // The transaction holds the step gate exclusively: its events
            // wait for its outcome, and no other change can come between.
            return Pending {
                revision: self.next_version(),
                recording: None,
                held: hub.map(|_| &self.txn_events),
            };
        }
        Pending {
            recording: hub.map(|hub| hub.begin()),
            revision: self.next_version(),
            held: None,
        }
    }

    /// Like [`Self::begin_change`] for a removal, which needs a revision
    /// only when someone records it (the durable tier or a watcher).
    pub(super) fn begin_removal(&self) -> Option<Pending<'_>> {
        (self.dirty.is_some() || self.hub.get().is_some_and(|h| h.records()))
            .then(|| self.begin_change())
    }

    /// Publishes the event of a removal made under `pending`.
    pub(super) fn removed(
        pending: Option<Pending<'_>>,
        key: &str,
        why: Removal,
        value: Option<Value>,
    ) {
        if let Some(p) = pending {
            p.publish(why.event(), key, value);
        }
    }

    /// Every shard of the map write-locked, in order: no change of the
    /// table is under way while the guards live.
    pub(super) fn lock_all_shards(&self) -> Vec<impl std::ops::DerefMut + '_> {
        self.map.write_all()
    }

    /// Starts a watch of the table's changes after `since` (see
    /// [`Hub::watch`]). The first watch makes the table's hub, whose history
    /// begins at the revision `origin` gives.
    ///
    /// # Errors
    /// [`StoreError::TableNotFound`] when the table was dropped.
    pub fn watch(&self, since: Option<u64>, origin: impl FnOnce() -> u64) -> StoreResult<Start> {
        // Not while a transaction runs: a watcher joining between two of
        // its changes would see only the later ones.
        let _step = self.step();
        let dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        if *dropped {
            return Err(StoreError::TableNotFound(self.name.to_string()));
        }
        let hub = match self.hub.get() {
            Some(hub) if hub.join_busy() => hub.clone(),
            Some(hub) => {
                // The first watcher since the others left: with every shard
                // locked, so no writer is between deciding not to record
                // and its change.
                let shards = self.lock_all_shards();
                hub.join_quiet(origin());
                drop(shards);
                hub.clone()
            }
            None => {
                // With every shard locked no change is half made: each one
                // either finished before the hub existed or will see it.
                let shards = self.lock_all_shards();
                let limits = *self
                    .shared
                    .watch_limits
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let hub = Arc::new(Hub::counted(origin(), limits, self.shared.memory.clone()));
                hub.join_quiet(0);
                let _ = self.hub.set(hub.clone());
                drop(shards);
                self.shared.hubs().push(Arc::downgrade(&hub));
                hub
            }
        };
        drop(dropped);
        Ok(hub.watch(since))
    }

    /// The table's change feed, if it was ever watched.
    pub fn hub(&self) -> Option<&Arc<Hub>> {
        self.hub.get()
    }

    /// Marks the table dropped: its watchers get `drop` and their streams end.
    pub(crate) fn close_watch(&self) {
        let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        *dropped = true;
        if let Some(hub) = self.hub.get() {
            hub.drop_table(|| self.next_version());
        }
    }
}
