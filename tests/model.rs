//! Property tests: random operation sequences run against the store and a
//! trivially correct model (a BTreeMap of Vecs) give identical results, for
//! each table type.

#[path = "common/model.rs"]
mod reference;

use std::sync::Arc;

use larder::clock::SystemClock;
use larder::store::{
    CounterOp, Objects, Precondition, ScanRequest, Store, StoreError, TableSpec, TableType, Value,
};
use proptest::prelude::*;
use reference::{key, op, value, Model, Op, Outcome};

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
    let mut model = Model::new(kind);
    for (i, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = run(&table, op);
        prop_assert_eq!(got, want, "step {} {:?}", i, op);
    }
    // The whole table agrees too: size and a full scan.
    let objects = model.size();
    prop_assert_eq!(table.size() as usize, objects);
    let page = table
        .scan(&ScanRequest {
            limit: 10_000,
            ..Default::default()
        })
        .expect("scan");
    model.check_scan(
        page.items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect(),
    )?;
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
