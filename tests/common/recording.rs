//! An engine wrapper that records every write and flush the durable tier
//! makes, in one order shared with the test's own observations, so a test
//! can prove that an acknowledgement came after the fsync of what it
//! acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use larder::app::EngineWrapper;
use larder::persist::{decode_slot, Change, Engine, PersistError, Visitor};
use larder::store::ObjectsRef;

/// What reached the engine.
#[derive(Debug, Clone)]
pub enum Event {
    /// A key written (or removed, `value: None`) in a table's data space;
    /// `at` is when the engine call that wrote it began.
    Write {
        seq: u64,
        table: String,
        key: String,
        value: Option<serde_json::Value>,
        at: Instant,
        /// The engine call that wrote it (its sequence number at entry).
        batch: u64,
    },
    /// A flush returned successfully; `began` is its sequence number at entry.
    Flushed { began: u64, seq: u64, at: Instant },
    /// A value put into the metadata space (clear marks, the revision
    /// lease, records of table creates and drops).
    Meta { seq: u64, key: String },
    /// An idempotency record written into a table's data space, in the
    /// engine call (`batch`, the sequence number at its entry) that wrote
    /// it with its change.
    Record { seq: u64, table: String, batch: u64 },
}

/// The shared log. Every event and every [`Recorder::mark`] takes the next
/// number of one counter, so their order is the order they happened in.
#[derive(Debug, Default)]
pub struct Recorder {
    seq: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// A number ordered after everything the engine has done so far.
    pub fn mark(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A copy of the log.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// How many flushes completed.
    pub fn flushes(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Flushed { .. }))
            .count()
    }

    /// A server whose engine records here, with `table` (a table
    /// definition) created on it.
    pub async fn app_with_table(table: serde_json::Value) -> (Arc<Self>, super::TestApp) {
        let rec = Arc::new(Recorder::default());
        let app = super::spawn_with_engine(rec.wrapper()).await;
        let r = app.create_table(table).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        (rec, app)
    }

    /// A wrapper for [`larder::app::Parts::wrap_engine`] recording here.
    pub fn wrapper(self: &Arc<Self>) -> EngineWrapper {
        let rec = self.clone();
        Box::new(move |inner| Arc::new(Recording { inner, rec }) as Arc<dyn Engine>)
    }
}

/// The value a set-type record holds (bag records give their last object).
fn record_value(bytes: &[u8]) -> serde_json::Value {
    let slot = decode_slot(bytes).expect("a record the server wrote decodes");
    match slot.objects() {
        ObjectsRef::One(v) => v.to_json(),
        ObjectsRef::Many(objs) => objs.last().expect("never empty").value.to_json(),
    }
}

#[derive(Debug)]
struct Recording {
    inner: Arc<dyn Engine>,
    rec: Arc<Recorder>,
}

impl Engine for Recording {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError> {
        self.inner.get_meta(key)
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError> {
        self.inner.put_meta(key, value)?;
        let mut events = self.rec.events.lock().unwrap();
        events.push(Event::Meta {
            seq: self.rec.mark(),
            key: key.to_owned(),
        });
        Ok(())
    }
    fn remove_meta(&self, key: &str) -> Result<(), PersistError> {
        self.inner.remove_meta(key)
    }
    fn metas(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.inner.metas(prefix)
    }
    fn table_defs(&self) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.inner.table_defs()
    }
    fn put_table_def(&self, name: &str, def: &[u8]) -> Result<(), PersistError> {
        self.inner.put_table_def(name, def)
    }
    fn remove_table(&self, name: &str) -> Result<(), PersistError> {
        self.inner.remove_table(name)
    }
    fn data_spaces(&self) -> Result<Vec<String>, PersistError> {
        self.inner.data_spaces()
    }
    fn write(&self, table: &str, changes: Vec<Change>) -> Result<(), PersistError> {
        // Idempotency records (keys after a NUL byte) are not entries.
        let described: Vec<Option<(String, Option<serde_json::Value>)>> = changes
            .iter()
            .map(|(k, r)| {
                (k.first() != Some(&0)).then(|| {
                    (
                        String::from_utf8(k.clone()).unwrap(),
                        r.as_deref().map(record_value),
                    )
                })
            })
            .collect();
        let at = Instant::now();
        let batch = self.rec.mark();
        self.inner.write(table, changes)?;
        let mut events = self.rec.events.lock().unwrap();
        for described in described {
            let seq = self.rec.mark();
            events.push(match described {
                Some((key, value)) => Event::Write {
                    seq,
                    table: table.to_owned(),
                    key,
                    value,
                    at,
                    batch,
                },
                None => Event::Record {
                    seq,
                    table: table.to_owned(),
                    batch,
                },
            });
        }
        Ok(())
    }
    fn for_each(&self, table: &str, f: &mut Visitor<'_>) -> Result<(), PersistError> {
        self.inner.for_each(table, f)
    }
    fn has_room(&self, bytes: usize) -> Result<(), PersistError> {
        self.inner.has_room(bytes)
    }
    fn flush(&self) -> Result<(), PersistError> {
        let began = self.rec.mark();
        self.inner.flush()?;
        let mut events = self.rec.events.lock().unwrap();
        events.push(Event::Flushed {
            began,
            seq: self.rec.mark(),
            at: Instant::now(),
        });
        Ok(())
    }
}

/// The first flush that began after `table`/`key` was written with `value`
/// (at or before `before`) and completed before `before`: proof that the
/// value was on disk by then. `None` if there is none.
pub fn flushed_before(
    events: &[Event],
    table: &str,
    key: &str,
    value: &serde_json::Value,
    before: u64,
) -> Option<(u64, Instant)> {
    change_flushed_before(events, table, key, Some(value), before)
}

/// Like [`flushed_before`] for any change: `value: None` is the key's
/// removal.
pub fn change_flushed_before(
    events: &[Event],
    table: &str,
    key: &str,
    value: Option<&serde_json::Value>,
    before: u64,
) -> Option<(u64, Instant)> {
    let written = events.iter().rev().find_map(|e| match e {
        Event::Write {
            seq,
            table: t,
            key: k,
            value: v,
            ..
        } if *seq < before && t == table && k == key && v.as_ref() == value => Some(*seq),
        _ => None,
    })?;
    flush_between(events, written, before)
}

/// The first metadata value put under a key starting with `prefix` (at or
/// before `before`) and a flush that began after it and completed before
/// `before`.
pub fn meta_flushed_before(events: &[Event], prefix: &str, before: u64) -> Option<(u64, Instant)> {
    let written = events.iter().rev().find_map(|e| match e {
        Event::Meta { seq, key } if *seq < before && key.starts_with(prefix) => Some(*seq),
        _ => None,
    })?;
    flush_between(events, written, before)
}

/// A flush that began after `written` and completed before `before`.
fn flush_between(events: &[Event], written: u64, before: u64) -> Option<(u64, Instant)> {
    events.iter().find_map(|e| match e {
        Event::Flushed { began, seq, at } if *began > written && *seq < before => Some((*seq, *at)),
        _ => None,
    })
}

/// The last idempotency record written into `table` before `before`, in
/// the same engine call as a write of `key`, and a flush that began after
/// that call and completed before `before`: the change and its record
/// reached disk together.
pub fn record_with_change_flushed_before(
    events: &[Event],
    table: &str,
    key: &str,
    before: u64,
) -> Option<(u64, Instant)> {
    let (seq, batch) = events.iter().rev().find_map(|e| match e {
        Event::Record {
            seq,
            table: t,
            batch,
        } if *seq < before && t == table => Some((*seq, *batch)),
        _ => None,
    })?;
    let with_change = events.iter().any(|e| {
        matches!(e, Event::Write { table: t, key: k, batch: b, .. }
            if t == table && k == key && *b == batch)
    });
    if !with_change {
        return None;
    }
    flush_between(events, seq, before)
}
