//! Property tests: random operation sequences run against the store and a
//! trivially correct model (a BTreeMap of Vecs) give identical results, for
//! each table type.

use std::collections::BTreeMap;
use std::sync::Arc;

use larder::clock::SystemClock;
use larder::store::{
    CounterOp, Objects, Precondition, ScanRequest, Store, StoreError, TableSpec, TableType, Value,
};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    Insert(u8, u8),
    InsertNew(u8, u8),
    Delete(u8),
    DeleteObject(u8, u8),
    Take(u8),
    Counter(u8, i64, Option<i64>),
    Lookup(u8),
    Member(u8),
}

fn key(k: u8) -> String {
    format!("k{k}")
}

/// Few values, some integers (counters) and some not, so that operations
/// collide often.
fn value(v: u8) -> serde_json::Value {
    match v % 6 {
        0 => json!(0),
        1 => json!(7),
        2 => json!(i64::MAX - 1),
        3 => json!("s"),
        4 => json!({"a": [1, 2]}),
        _ => json!(-3),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u8..5;
    let v = 0u8..6;
    prop_oneof![
        (k.clone(), v.clone()).prop_map(|(k, v)| Op::Insert(k, v)),
        (k.clone(), v.clone()).prop_map(|(k, v)| Op::InsertNew(k, v)),
        k.clone().prop_map(Op::Delete),
        (k.clone(), v).prop_map(|(k, v)| Op::DeleteObject(k, v)),
        k.clone().prop_map(Op::Take),
        (k.clone(), -3i64..4, prop::option::of(-2i64..3))
            .prop_map(|(k, i, d)| Op::Counter(k, i, d)),
        k.clone().prop_map(Op::Lookup),
        k.prop_map(Op::Member),
    ]
}

/// What an operation observably did, in a form both sides can produce.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Created(bool),
    Found(Option<Vec<serde_json::Value>>),
    Member(bool),
    Counter(i64),
    Err(&'static str),
}

fn err_code(e: &StoreError) -> &'static str {
    match e {
        StoreError::KeyNotFound => "key_not_found",
        StoreError::PreconditionFailed(_) => "precondition_failed",
        StoreError::NotACounter(_) => "not_a_counter",
        StoreError::WrongTableType(_) => "wrong_table_type",
        StoreError::Overflow => "overflow",
        _ => "other",
    }
}

struct Model {
    kind: TableType,
    map: BTreeMap<String, Vec<serde_json::Value>>,
}

impl Model {
    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Insert(k, v) => self.insert(key(*k), value(*v), false),
            Op::InsertNew(k, v) => self.insert(key(*k), value(*v), true),
            Op::Delete(k) => {
                self.map.remove(&key(*k));
                Outcome::Ok
            }
            Op::DeleteObject(k, v) => {
                let k = key(*k);
                if let Some(vals) = self.map.get_mut(&k) {
                    vals.retain(|x| *x != value(*v));
                    if vals.is_empty() {
                        self.map.remove(&k);
                    }
                }
                Outcome::Ok
            }
            Op::Take(k) => Outcome::Found(self.map.remove(&key(*k))),
            Op::Lookup(k) => Outcome::Found(self.map.get(&key(*k)).cloned()),
            Op::Member(k) => Outcome::Member(self.map.contains_key(&key(*k))),
            Op::Counter(k, incr, default) => {
                if !matches!(self.kind, TableType::Set | TableType::OrderedSet) {
                    return Outcome::Err("wrong_table_type");
                }
                let current = match self.map.get(&key(*k)) {
                    Some(v) => v[0].clone(),
                    None => match default {
                        Some(d) => json!(d),
                        None => return Outcome::Err("key_not_found"),
                    },
                };
                let Some(n) = current.as_i64() else {
                    return Outcome::Err("not_a_counter");
                };
                match n.checked_add(*incr) {
                    Some(next) => {
                        self.map.insert(key(*k), vec![json!(next)]);
                        Outcome::Counter(next)
                    }
                    None => Outcome::Err("overflow"),
                }
            }
        }
    }

    fn insert(&mut self, k: String, v: serde_json::Value, only_new: bool) -> Outcome {
        let exists = self.map.contains_key(&k);
        if only_new && exists {
            return Outcome::Err("precondition_failed");
        }
        let vals = self.map.entry(k).or_default();
        match self.kind {
            TableType::Set | TableType::OrderedSet => *vals = vec![v],
            TableType::Bag => {
                if !vals.contains(&v) {
                    vals.push(v)
                }
            }
            TableType::DuplicateBag => vals.push(v),
        }
        Outcome::Created(!exists)
    }
}

fn run(store_table: &larder::store::Table, op: &Op) -> Outcome {
    let found = |e: Option<larder::store::Entry>| {
        Outcome::Found(e.map(|e| match e.objects {
            Objects::One(v) => vec![v.to_json()],
            Objects::Many(objs) => objs.iter().map(|o| o.value.to_json()).collect(),
        }))
    };
    let written = |r: Result<larder::store::Written, StoreError>| match r {
        Ok(w) => Outcome::Created(w.created),
        Err(e) => Outcome::Err(err_code(&e)),
    };
    match op {
        Op::Insert(k, v) => written(store_table.insert(
            &key(*k),
            Value::from_json(&value(*v)),
            None,
            &Precondition::None,
        )),
        Op::InsertNew(k, v) => written(store_table.insert(
            &key(*k),
            Value::from_json(&value(*v)),
            None,
            &Precondition::Absent,
        )),
        Op::Delete(k) => match store_table.delete(&key(*k), &Precondition::None) {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Err(err_code(&e)),
        },
        Op::DeleteObject(k, v) => {
            store_table.delete_object(&key(*k), &Value::from_json(&value(*v)));
            Outcome::Ok
        }
        Op::Take(k) => found(store_table.take(&key(*k))),
        Op::Lookup(k) => found(store_table.lookup(&key(*k))),
        Op::Member(k) => Outcome::Member(store_table.member(&key(*k))),
        Op::Counter(k, incr, default) => {
            let op = CounterOp {
                incr: *incr,
                default: *default,
                ..CounterOp::default()
            };
            match store_table.update_counter(&key(*k), &op) {
                Ok(n) => Outcome::Counter(n),
                Err(e) => Outcome::Err(err_code(&e)),
            }
        }
    }
}

fn check(kind: TableType, ops: &[Op]) -> Result<(), TestCaseError> {
    let store = Store::new(Arc::new(SystemClock));
    let table = store
        .create_table(TableSpec::new("t", kind, "tester"))
        .expect("create");
    let mut model = Model {
        kind,
        map: BTreeMap::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = run(&table, op);
        prop_assert_eq!(got, want, "step {} {:?}", i, op);
    }
    // The whole table agrees too: size and a full scan.
    let objects: usize = model.map.values().map(Vec::len).sum();
    prop_assert_eq!(table.size() as usize, objects);
    let page = table
        .scan(&ScanRequest {
            limit: 10_000,
            ..Default::default()
        })
        .expect("scan");
    let mut scanned: Vec<(String, serde_json::Value)> = page
        .items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_json()))
        .collect();
    let mut expected: Vec<(String, serde_json::Value)> = model
        .map
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
        .collect();
    if kind != TableType::OrderedSet {
        // Hashed tables promise no key order; objects of a key keep theirs.
        scanned.sort_by(|a, b| a.0.cmp(&b.0));
        expected.sort_by(|a, b| a.0.cmp(&b.0));
    }
    prop_assert_eq!(scanned, expected);
    if objects == 0 {
        prop_assert_eq!(table.tracked_bytes(), 0, "accounting returns to zero");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn set_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check(TableType::Set, &ops)?;
    }

    #[test]
    fn ordered_set_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check(TableType::OrderedSet, &ops)?;
    }

    #[test]
    fn bag_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check(TableType::Bag, &ops)?;
    }

    #[test]
    fn duplicate_bag_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check(TableType::DuplicateBag, &ops)?;
    }
}
