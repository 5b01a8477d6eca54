//! `memory_bytes` must be honest: within 6% of the real resident growth for
//! a million small entries, the bound the README states (measured: `set`
//! and `ordered_set` over-count by about 2%). This file holds
//! one test so that its process's resident size reflects that test alone.

use std::sync::Arc;

use larder::clock::SystemClock;
use larder::store::{Precondition, Store, TableSpec, TableType, Value};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("procfs");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn memory_accounting_is_within_6_percent_of_resident_growth() {
    let store = Store::new(Arc::new(SystemClock));
    let mut results = Vec::new();
    for (kind, name) in [(TableType::Set, "set"), (TableType::OrderedSet, "ordered")] {
        let table = store
            .create_table(TableSpec::new(name, kind, "me"))
            .unwrap();
        let before = resident_bytes();
        for i in 0..1_000_000u64 {
            let key = format!("key-{i:012}");
            // A fresh value per entry, as every PUT parses its own body.
            let value = Value::from_canonical(
                format!("{{\"n\":{},\"s\":\"abcdefgh\"}}", i % 1000).as_bytes(),
            );
            table
                .insert(&key, value, None, &Precondition::None)
                .unwrap();
        }
        let grown = resident_bytes().saturating_sub(before);
        let accounted = table.memory_bytes();
        results.push((name, accounted, grown));
    }
    for (name, accounted, grown) in results {
        let ratio = accounted as f64 / grown as f64;
        eprintln!(
            "{name}: accounted {accounted} bytes, resident growth {grown} bytes, ratio {ratio:.3}"
        );
        assert!(
            (0.94..=1.06).contains(&ratio),
            "{name}: accounted {accounted}, grew {grown}"
        );
    }
}
