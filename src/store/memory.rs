//! One accounting of the memory the server holds on behalf of its clients,
//! by kind, against one limit (`--max-memory-bytes`), as Redis's
//! `maxmemory` counts client buffers with the data.
//!
//! Tables count their objects and indexes; watch hubs their histories; the
//! idempotency records their answers; the HTTP layer the response bodies it
//! has built and not yet sent. Each adds and subtracts its own bytes where
//! they grow and shrink; writes that would grow a table past the limit are
//! refused (or evict, in `lru` tables) whatever kind filled it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What the memory is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Stored objects, their keys and indexes.
    Tables,
    /// Changes kept for watchers to resume from.
    Watch,
    /// Remembered answers of writes sent with `Idempotency-Key`.
    Idempotency,
    /// Response bodies built and not yet sent whole.
    Responses,
    /// Expired entries kept for `stale_if_error_ms`, out of sight of reads.
    Stale,
}

impl MemoryKind {
    /// Every kind, in the order of their labels.
    pub const ALL: [MemoryKind; 5] = [
        MemoryKind::Tables,
        MemoryKind::Watch,
        MemoryKind::Idempotency,
        MemoryKind::Responses,
        MemoryKind::Stale,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MemoryKind::Tables => "tables",
            MemoryKind::Watch => "watch",
            MemoryKind::Idempotency => "idempotency",
            MemoryKind::Responses => "responses",
            MemoryKind::Stale => "stale",
        }
    }
}

/// Bytes held, by kind, and the limit on their sum. Shared by the store
/// and the HTTP layer.
#[derive(Debug, Default)]
pub struct MemoryUse {
    kinds: [AtomicI64; 5],
    /// 0 for none.
    limit: AtomicU64,
}

impl MemoryUse {
    /// Adds `delta` bytes (negative to give them back) to `kind`.
    pub fn add(&self, kind: MemoryKind, delta: i64) {
        self.kinds[kind as usize].fetch_add(delta, Ordering::Relaxed);
    }

    /// Bytes held for `kind`.
    pub fn of(&self, kind: MemoryKind) -> u64 {
        self.kinds[kind as usize].load(Ordering::Relaxed).max(0) as u64
    }

    /// Bytes held in all.
    pub fn total(&self) -> u64 {
        MemoryKind::ALL.iter().map(|k| self.of(*k)).sum()
    }

    /// The limit, 0 for none.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the limit (0 for none).
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Whether adding `more` bytes keeps the total within the limit.
    pub fn fits(&self, more: u64) -> bool {
        let limit = self.limit();
        limit == 0 || self.total().saturating_add(more) <= limit
    }

    /// Whether the total is past the limit.
    pub fn over(&self) -> bool {
        !self.fits(0)
    }
}

/// Bytes of one kind held until the guard is dropped.
#[derive(Debug)]
pub struct Held {
    memory: std::sync::Arc<MemoryUse>,
    kind: MemoryKind,
    bytes: i64,
}

impl Held {
    /// Counts `bytes` of `kind` until the returned guard is dropped.
    pub fn new(memory: std::sync::Arc<MemoryUse>, kind: MemoryKind, bytes: usize) -> Self {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        memory.add(kind, bytes);
        Held {
            memory,
            kind,
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.memory.add(self.kind, -self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_add_up_against_one_limit() {
        let m = std::sync::Arc::new(MemoryUse::default());
        m.set_limit(100);
        m.add(MemoryKind::Tables, 60);
        m.add(MemoryKind::Watch, 30);
        assert!(m.fits(10));
        assert!(!m.fits(11));
        let held = Held::new(m.clone(), MemoryKind::Responses, 20);
        assert!(m.over());
        assert_eq!(m.of(MemoryKind::Responses), 20);
        drop(held);
        assert_eq!(m.total(), 90);
        m.set_limit(0);
        assert!(m.fits(u64::MAX));
    }
}
