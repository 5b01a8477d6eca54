//! Property test: random transactions mixed with single operations, run
//! against the store and against the reference model applied in sequence,
//! give the same answers and leave the same table, for each table type. A
//! transaction whose operation fails changes nothing and names the
//! operation.

#[path = "common/model.rs"]
mod reference;

use std::sync::Arc;

use larder::clock::SystemClock;
use larder::store::{
    Comparison, CounterOp, Entry, Objects, Precondition, ScanRequest, Store, StoreError, Table,
    TableSpec, TableType, Test, Txn, TxnOp, TxnResult, Value,
};
use proptest::prelude::*;
use reference::{key, op, value, Model, Op, Outcome};

/// A comparison on a key: it exists (or not), or holds a value.
#[derive(Debug, Clone)]
enum Cmp {
    Exists(u8, bool),
    Value(u8, u8),
}

#[derive(Debug, Clone)]
enum Step {
    Single(Op),
    Txn(Vec<Cmp>, Vec<Op>, Vec<Op>),
}

fn cmp() -> impl Strategy<Value = Cmp> {
    prop_oneof![
        (0u8..5, any::<bool>()).prop_map(|(k, b)| Cmp::Exists(k, b)),
        (0u8..5, 0u8..6).prop_map(|(k, v)| Cmp::Value(k, v)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        op().prop_map(Step::Single),
        (
            prop::collection::vec(cmp(), 0..3),
            prop::collection::vec(op(), 0..6),
            prop::collection::vec(op(), 0..4)
        )
            .prop_map(|(c, t, e)| Step::Txn(c, t, e)),
    ]
}

/// What one transaction operation answered, in a form both sides give.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Res {
    Found(Option<Vec<serde_json::Value>>),
    Deleted(bool),
    Counter(i64),
}

fn code(e: &StoreError) -> &'static str {
    match e {
        StoreError::KeyNotFound => "key_not_found",
        StoreError::PreconditionFailed(_) => "precondition_failed",
        StoreError::NotACounter(_) => "not_a_counter",
        StoreError::WrongTableType(_) => "wrong_table_type",
        StoreError::Overflow => "overflow",
        _ => "other",
    }
}

fn values(e: &Option<Entry>) -> Option<Vec<serde_json::Value>> {
    e.as_ref().map(|e| match &e.objects {
        Objects::One(v) => vec![v.to_json()],
        Objects::Many(objs) => objs.iter().map(|o| o.value.to_json()).collect(),
    })
}

fn txn_op(op: &Op) -> TxnOp {
    let v = |v: &u8| Value::from_json(&value(*v));
    match op {
        Op::Insert(k, x) => TxnOp::Put {
            key: key(*k),
            value: v(x),
            ttl_ms: None,
        },
        Op::InsertNew(k, x) => TxnOp::InsertNew {
            key: key(*k),
            value: v(x),
            ttl_ms: None,
        },
        Op::Delete(k) => TxnOp::Delete { key: key(*k) },
        Op::DeleteObject(k, x) => TxnOp::DeleteObject {
            key: key(*k),
            value: v(x),
        },
        Op::Take(k) => TxnOp::Take { key: key(*k) },
        Op::Counter(k, incr, default) => TxnOp::Counter {
            key: key(*k),
            op: CounterOp {
                incr: *incr,
                default: *default,
                ..CounterOp::default()
            },
        },
        Op::Lookup(k) | Op::Member(k) => TxnOp::Get { key: key(*k) },
    }
}

/// What the model says one operation of a transaction answers.
fn model_op(model: &mut Model, op: &Op) -> Result<Res, &'static str> {
    let count = |m: &Model, k: &u8| m.map.get(&key(*k)).map_or(0, Vec::len);
    match op {
        Op::Insert(k, _) | Op::InsertNew(k, _) => match model.apply(op) {
            Outcome::Err(e) => Err(e),
            _ => Ok(Res::Found(model.map.get(&key(*k)).cloned())),
        },
        Op::Delete(k) => {
            let had = count(model, k) > 0;
            model.apply(op);
            Ok(Res::Deleted(had))
        }
        Op::DeleteObject(k, _) => {
            let had = count(model, k);
            model.apply(op);
            Ok(Res::Deleted(count(model, k) < had))
        }
        Op::Take(k) => {
            let was = model.map.remove(&key(*k));
            Ok(Res::Found(was))
        }
        Op::Counter(..) => match model.apply(op) {
            Outcome::Counter(n) => Ok(Res::Counter(n)),
            Outcome::Err(e) => Err(e),
            other => panic!("a counter answered {other:?}"),
        },
        Op::Lookup(k) | Op::Member(k) => Ok(Res::Found(model.map.get(&key(*k)).cloned())),
    }
}

fn model_holds(model: &Model, c: &Cmp) -> bool {
    match c {
        Cmp::Exists(k, b) => model.map.contains_key(&key(*k)) == *b,
        Cmp::Value(k, v) => model.map.get(&key(*k)).is_some_and(|vals| {
            matches!(model.kind, TableType::Set | TableType::OrderedSet) && vals[0] == value(*v)
        }),
    }
}

fn single(table: &Table, op: &Op) -> Outcome {
    let found = |e: Option<Entry>| Outcome::Found(values(&e));
    let written = |r: Result<larder::store::Written, StoreError>| match r {
        Ok(w) => Outcome::Created(w.created),
        Err(e) => Outcome::Err(code(&e)),
    };
    let v = |x: &u8| Value::from_json(&value(*x));
    match op {
        Op::Insert(k, x) => written(table.insert(&key(*k), v(x), None, &Precondition::None)),
        Op::InsertNew(k, x) => written(table.insert(&key(*k), v(x), None, &Precondition::Absent)),
        Op::Delete(k) => match table.delete(&key(*k), &Precondition::None) {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Err(code(&e)),
        },
        Op::DeleteObject(k, x) => {
            table.delete_object(&key(*k), &v(x));
            Outcome::Ok
        }
        Op::Take(k) => found(table.take(&key(*k))),
        Op::Lookup(k) => found(table.lookup(&key(*k))),
        Op::Member(k) => Outcome::Member(table.member(&key(*k))),
        Op::Counter(k, incr, default) => {
            let op = CounterOp {
                incr: *incr,
                default: *default,
                ..CounterOp::default()
            };
            match table.update_counter(&key(*k), &op) {
                Ok(n) => Outcome::Counter(n),
                Err(e) => Outcome::Err(code(&e)),
            }
        }
    }
}

fn check(kind: TableType, steps: &[Step]) -> Result<(), TestCaseError> {
    let store = Store::new(Arc::new(SystemClock));
    let table = store
        .create_table(TableSpec::new("t", kind, "tester"))
        .expect("create");
    let mut model = Model::new(kind);
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Single(op) => {
                let want = model.apply(op);
                prop_assert_eq!(single(&table, op), want, "step {} {:?}", i, op);
            }
            Step::Txn(cmps, then, otherwise) => {
                // Value comparisons are refused on bag tables before the
                // store sees them.
                let cmps: Vec<&Cmp> = cmps
                    .iter()
                    .filter(|c| kind.is_single() || matches!(c, Cmp::Exists(..)))
                    .collect();
                let holds = cmps.iter().all(|c| model_holds(&model, c));
                let branch = if holds { then } else { otherwise };
                let mut trial = Model {
                    kind,
                    map: model.map.clone(),
                };
                let mut want = Ok(Vec::new());
                for (at, op) in branch.iter().enumerate() {
                    match model_op(&mut trial, op) {
                        Ok(r) => {
                            if let Ok(rs) = &mut want {
                                rs.push(r);
                            }
                        }
                        Err(e) => {
                            want = Err((at, e));
                            break;
                        }
                    }
                }
                if want.is_ok() {
                    model = trial;
                }
                let txn = Txn {
                    compare: cmps
                        .iter()
                        .map(|c| match c {
                            Cmp::Exists(k, b) => Comparison {
                                key: key(*k),
                                test: Test::Exists(*b),
                            },
                            Cmp::Value(k, v) => Comparison {
                                key: key(*k),
                                test: Test::Value(Value::from_json(&value(*v))),
                            },
                        })
                        .collect(),
                    then: then.iter().map(txn_op).collect(),
                    otherwise: otherwise.iter().map(txn_op).collect(),
                    max_result_bytes: 0,
                };
                let got = match table.transact(&txn) {
                    Ok((outcome, _)) => {
                        prop_assert_eq!(outcome.succeeded, holds, "step {}", i);
                        Ok(outcome
                            .results
                            .iter()
                            .map(|r| match r {
                                TxnResult::Written(e) | TxnResult::Found(e) => {
                                    Res::Found(values(e))
                                }
                                TxnResult::Deleted(d) => Res::Deleted(*d),
                                TxnResult::Counter { value, .. } => Res::Counter(*value),
                            })
                            .collect::<Vec<_>>())
                    }
                    Err(StoreError::TxnAborted { op, cause }) => Err((op, code(&cause))),
                    Err(e) => panic!("step {i}: {e}"),
                };
                prop_assert_eq!(got, want, "step {} {:?}", i, s);
            }
        }
        prop_assert_eq!(table.size() as usize, model.size(), "size after step {}", i);
    }
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
    if model.size() == 0 {
        prop_assert_eq!(table.tracked_bytes(), 0, "accounting returns to zero");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn set_transactions_match_the_model(steps in prop::collection::vec(step(), 1..30)) {
        check(TableType::Set, &steps)?;
    }

    #[test]
    fn ordered_set_transactions_match_the_model(steps in prop::collection::vec(step(), 1..30)) {
        check(TableType::OrderedSet, &steps)?;
    }

    #[test]
    fn bag_transactions_match_the_model(steps in prop::collection::vec(step(), 1..30)) {
        check(TableType::Bag, &steps)?;
    }

    #[test]
    fn duplicate_bag_transactions_match_the_model(steps in prop::collection::vec(step(), 1..30)) {
        check(TableType::DuplicateBag, &steps)?;
    }
}
