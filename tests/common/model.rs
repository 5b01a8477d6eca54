//! The reference model of ETS tables that the property tests check the
//! server against: random operations on few keys and values, and what a
//! trivially correct table (a BTreeMap of Vecs) does with them.

use std::collections::BTreeMap;

use larder::store::TableType;
use proptest::prelude::*;
use serde_json::json;

/// One operation on a key (an index into few keys) and a value (an index
/// into few values); `Counter` carries the increment and the default.
#[derive(Debug, Clone)]
pub enum Op {
    Insert(u8, u8),
    InsertNew(u8, u8),
    Delete(u8),
    DeleteObject(u8, u8),
    Take(u8),
    Counter(u8, i64, Option<i64>),
    Lookup(u8),
    Member(u8),
}

/// The key an index names.
pub fn key(k: u8) -> String {
    format!("k{k}")
}

/// Few values, some integers (counters) and some not, so that operations
/// collide often.
pub fn value(v: u8) -> serde_json::Value {
    match v % 6 {
        0 => json!(0),
        1 => json!(7),
        2 => json!(i64::MAX - 1),
        3 => json!("s"),
        4 => json!({"a": [1, 2]}),
        _ => json!(-3),
    }
}

/// A random operation, over few keys so that they collide.
pub fn op() -> impl Strategy<Value = Op> {
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
pub enum Outcome {
    Ok,
    Created(bool),
    Found(Option<Vec<serde_json::Value>>),
    Member(bool),
    Counter(i64),
    Err(&'static str),
}

/// The reference table: each key's objects in insertion order.
pub struct Model {
    pub kind: TableType,
    pub map: BTreeMap<String, Vec<serde_json::Value>>,
}

impl Model {
    /// An empty table of `kind`.
    pub fn new(kind: TableType) -> Model {
        Model {
            kind,
            map: BTreeMap::new(),
        }
    }

    /// How many objects the table holds.
    pub fn size(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }

    /// Checks that `scanned`, a full scan of the table under test, holds
    /// the model's objects: in key order for ordered_set; for hashed tables
    /// in any key order, with each key's objects in theirs.
    pub fn check_scan(
        &self,
        mut scanned: Vec<(String, serde_json::Value)>,
    ) -> Result<(), TestCaseError> {
        let mut expected: Vec<(String, serde_json::Value)> = self
            .map
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
            .collect();
        if self.kind != TableType::OrderedSet {
            scanned.sort_by(|a, b| a.0.cmp(&b.0));
            expected.sort_by(|a, b| a.0.cmp(&b.0));
        }
        prop_assert_eq!(scanned, expected);
        Ok(())
    }

    /// Applies `op` and says what a correct table answers.
    pub fn apply(&mut self, op: &Op) -> Outcome {
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
