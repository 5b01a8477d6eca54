//! The two places that read dashmap's raw buckets (eviction's candidate
//! search and hashed-table scans) exercised while other threads write,
//! grow, shrink and clear the same shards. Their `unsafe` blocks rely on
//! one invariant: every reference into a shard's buckets is dropped before
//! that shard's read guard. A violation shows up here as a crash or as a
//! scan returning a key that was never written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use larder::clock::SystemClock;
use larder::store::{
    Eviction, Precondition, ScanRequest, Store, TableSpec, TableType, Value, DEFAULT_SCAN_LIMIT,
};

fn value(n: u64) -> Value {
    Value::parse(n.to_string().as_bytes()).unwrap()
}

#[test]
fn eviction_and_scans_read_buckets_safely_while_other_threads_write() {
    let store = Store::new(Arc::new(SystemClock));
    let mut lru = TableSpec::new("lru", TableType::Set, "t");
    lru.settings.max_entries = Some(200);
    lru.settings.eviction = Eviction::Lru;
    let lru = store.create_table(lru).unwrap();
    let set = store
        .create_table(TableSpec::new("set", TableType::Set, "t"))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..3u64 {
        let (lru, set, stop) = (lru.clone(), set.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = format!("k{}", n % 5_000);
                // Every insert past 200 keys makes the lru table look for a
                // victim through the raw buckets.
                lru.insert(&key, value(n), None, &Precondition::None)
                    .unwrap();
                match n % 7 {
                    0 => {
                        set.delete(&key, &Precondition::None).unwrap();
                    }
                    1 if n % 1_000 == 1 => set.clear(),
                    _ => {
                        set.insert(&key, value(n), None, &Precondition::None)
                            .unwrap();
                    }
                }
            }
        }));
    }
    // Scans of the hashed table walk raw buckets shard by shard.
    let mut pages = 0;
    while pages < 3_000 {
        let mut req = ScanRequest {
            prefix: None,
            start: None,
            after: None,
            end: None,
            limit: DEFAULT_SCAN_LIMIT,
            reverse: false,
            cursor: None,
        };
        loop {
            let page = set.scan(&req).unwrap();
            pages += 1;
            for (key, _) in &page.items {
                let n: u64 = key[1..].parse().expect("a key some writer wrote");
                assert!(n < 5_000, "scan returned a key no writer wrote: {key}");
            }
            match page.next_cursor {
                Some(c) => req.cursor = Some(c),
                None => break,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a writer panicked");
    }
    assert!(lru.size() <= 200, "lru table holds {}", lru.size());
}
