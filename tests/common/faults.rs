//! An engine wrapper that fails on command: every flush fails while a
//! fault is on, as a dying disk (EIO) or a full one (ENOSPC) would make
//! it, so tests can drive a failed write-back round through the real
//! server and watch it recover when the fault is turned off.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use larder::app::EngineWrapper;
use larder::persist::{Change, Engine, MetaVisitor, PersistError, Visitor};

/// The switch, shared by the test and the wrapper.
#[derive(Debug, Default)]
pub struct Faults {
    failing: AtomicBool,
    full: AtomicBool,
    /// Flushes refused so far.
    pub refused: AtomicU64,
}

impl Faults {
    /// Every flush from now on fails: with ENOSPC when `full`, else EIO.
    pub fn fail(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
        self.failing.store(true, Ordering::SeqCst);
    }

    /// Flushes work again.
    pub fn heal(&self) {
        self.failing.store(false, Ordering::SeqCst);
    }

    /// A wrapper for [`larder::app::Parts::wrap_engine`] failing on this
    /// switch.
    pub fn wrapper(self: &Arc<Self>) -> EngineWrapper {
        let faults = self.clone();
        Box::new(move |inner| Arc::new(Failing { inner, faults }) as Arc<dyn Engine>)
    }
}

#[derive(Debug)]
struct Failing {
    inner: Arc<dyn Engine>,
    faults: Arc<Faults>,
}

impl Engine for Failing {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError> {
        self.inner.get_meta(key)
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError> {
        self.inner.put_meta(key, value)
    }
    fn remove_meta(&self, key: &str) -> Result<(), PersistError> {
        self.inner.remove_meta(key)
    }
    fn metas(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.inner.metas(prefix)
    }
    fn for_each_meta(&self, prefix: &str, f: &mut MetaVisitor<'_>) -> Result<(), PersistError> {
        self.inner.for_each_meta(prefix, f)
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
        self.inner.write(table, changes)
    }
    fn for_each(&self, table: &str, f: &mut Visitor<'_>) -> Result<(), PersistError> {
        self.inner.for_each(table, f)
    }
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, PersistError> {
        self.inner.get(table, key)
    }
    fn for_each_prefixed(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut Visitor<'_>,
    ) -> Result<(), PersistError> {
        self.inner.for_each_prefixed(table, prefix, f)
    }
    fn has_room(&self, bytes: usize) -> Result<(), PersistError> {
        self.inner.has_room(bytes)
    }
    fn flush(&self) -> Result<(), PersistError> {
        if self.faults.failing.load(Ordering::SeqCst) {
            self.faults.refused.fetch_add(1, Ordering::SeqCst);
            let code = if self.faults.full.load(Ordering::SeqCst) {
                28 // ENOSPC
            } else {
                5 // EIO
            };
            return Err(PersistError::File {
                what: "flushing",
                path: "the data directory".into(),
                source: std::io::Error::from_raw_os_error(code),
            });
        }
        self.inner.flush()
    }
}
