//! A cluster key's row and the ETS operations as transitions of it.
//!
//! A write reads the key's row under its row lock, computes here what the
//! operation makes of it, and writes the outcome back in the same
//! transaction. Nothing here talks to PostgreSQL, so the semantics can be
//! read (and tested) on their own; they follow the local tables' exactly.

use crate::store::rules;
use crate::store::{
    merge_patch, CounterOp, Entry, Object, Objects, Precondition, StoreError, StoreResult,
    TableType, Value,
};

/// A key's row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The key's objects.
    pub objects: Objects,
    /// Version of the key's last change (its ETag).
    pub version: u64,
    /// Unix ms deadline; 0 for none.
    pub expires_at: u64,
    /// Unix seconds of the last write (`touched_at`, written by the node
    /// that wrote the row, so the same on every node).
    pub modified: u32,
}

impl Row {
    /// Whether the deadline has passed at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }

    /// The row as a read answers it.
    pub fn entry(&self, now: u64) -> Entry {
        Entry {
            objects: self.objects.clone(),
            version: self.version,
            ttl_ms: (self.expires_at != 0).then(|| self.expires_at.saturating_sub(now)),
            modified: self.modified,
        }
    }

    /// Objects under the key.
    pub fn count(&self) -> usize {
        self.objects.count()
    }
}

/// Canonical JSON text of a key's objects: the value for set types,
/// `[[seq, value], …]` for bag types.
pub fn encode(objects: &Objects) -> String {
    match objects {
        Objects::One(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        Objects::Many(objs) => {
            let mut s = String::from("[");
            for (i, o) in objs.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push('[');
                s.push_str(&o.seq.to_string());
                s.push(',');
                s.push_str(&String::from_utf8_lossy(o.value.as_bytes()));
                s.push(']');
            }
            s.push(']');
            s
        }
    }
}

/// Reads what [`encode`] wrote for a table of type `kind`.
///
/// # Errors
/// A message when the text is not such JSON (a row written by something
/// else).
pub fn decode(kind: TableType, text: &str) -> Result<Objects, String> {
    if kind.is_single() {
        return Value::parse(text.as_bytes())
            .map(Objects::One)
            .map_err(|e| e.to_string());
    }
    let items: Vec<(u64, serde_json::Value)> =
        serde_json::from_str(text).map_err(|e| e.to_string())?;
    if items.is_empty() {
        return Err("a bag row holds no objects".into());
    }
    Ok(Objects::Many(Box::new(
        items
            .into_iter()
            .map(|(seq, v)| Object {
                seq,
                value: Value::from_json(&v),
            })
            .collect(),
    )))
}

/// What an operation does to the key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing: the row stays as it was.
    Keep,
    /// The key now holds these objects until `expires_at`.
    Put {
        /// The new objects.
        objects: Objects,
        /// New deadline; 0 for none.
        expires_at: u64,
    },
    /// The key is removed.
    Remove,
}

impl Change {
    /// What watchers are told of this change to a key whose live row was
    /// `live`: the `larder_changes.event` and the value it carries.
    pub fn event(&self, live: Option<&Row>) -> (i16, Option<Value>) {
        use super::sql::{EVENT_DELETE, EVENT_NONE, EVENT_PUT};
        let Change::Put { objects, .. } = self else {
            return (EVENT_DELETE, None);
        };
        let objects = match objects {
            Objects::One(v) => return (EVENT_PUT, Some(v.clone())),
            Objects::Many(objs) => objs,
        };
        let before: &[Object] = match live.map(|r| &r.objects) {
            Some(Objects::Many(old)) => old,
            _ => &[],
        };
        let held = |o: &Object, among: &[Object]| among.iter().any(|x| x.seq == o.seq);
        if let Some(added) = objects.iter().find(|o| !held(o, before)) {
            return (EVENT_PUT, Some(added.value.clone()));
        }
        match before.iter().find(|o| !held(o, objects)) {
            Some(removed) => (EVENT_DELETE, Some(removed.value.clone())),
            None => (EVENT_NONE, None),
        }
    }
}

/// An operation's outcome: the change, and the statistics it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What happens to the row.
    pub change: Change,
    /// Objects counted in `stats.inserts`.
    pub inserted: u64,
    /// Objects counted in `stats.deletes`.
    pub deleted: u64,
}

impl Step {
    pub(crate) fn keep() -> Self {
        Step {
            change: Change::Keep,
            inserted: 0,
            deleted: 0,
        }
    }

    /// Objects the key holds after the step, given `before` (the stored
    /// row, expired or not).
    pub fn count_after(&self, before: Option<&Row>) -> usize {
        match &self.change {
            Change::Keep => before.map_or(0, Row::count),
            Change::Put { objects, .. } => objects.count(),
            Change::Remove => 0,
        }
    }
}

/// Deadline rules of a table, as the write computes them.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Unix ms now.
    pub now: u64,
    /// The table's `default_ttl_ms`.
    pub default_ttl_ms: Option<u64>,
}

impl Clock {
    /// Deadline of a write that names `ttl_ms` (or none).
    pub fn deadline(&self, ttl_ms: Option<u64>) -> u64 {
        rules::deadline(self.now, ttl_ms, self.default_ttl_ms.unwrap_or(0))
    }

    /// Deadline after a read-modify-write that names no TTL: the default
    /// restarts it, else it stays.
    pub fn refreshed(&self, current: u64) -> u64 {
        rules::refreshed_deadline(self.now, current, self.default_ttl_ms.unwrap_or(0))
    }
}

fn next_seq(objs: &[Object]) -> u64 {
    objs.iter().map(|o| o.seq).max().unwrap_or(0) + 1
}

/// `insert` of one object; `live` is the row unless absent or expired.
///
/// # Errors
/// [`StoreError::PreconditionFailed`].
pub fn insert(
    kind: TableType,
    live: Option<&Row>,
    value: Value,
    expires_at: u64,
    pre: &Precondition,
) -> StoreResult<Step> {
    pre.check_version(live.map(|r| r.version))?;
    let Some(row) = live else {
        let objects = if kind.is_single() {
            Objects::One(value)
        } else {
            Objects::Many(Box::new(vec![Object { seq: 1, value }]))
        };
        return Ok(Step {
            change: Change::Put {
                objects,
                expires_at,
            },
            inserted: 1,
            deleted: 0,
        });
    };
    match &row.objects {
        Objects::One(_) => Ok(Step {
            change: Change::Put {
                objects: Objects::One(value),
                expires_at,
            },
            inserted: 1,
            deleted: 0,
        }),
        Objects::Many(objs) => {
            let adds = rules::insert(kind, objs, &value) == rules::Insert::Add;
            if !adds && row.expires_at == expires_at {
                return Ok(Step::keep());
            }
            let mut objs = objs.clone();
            if adds {
                let seq = next_seq(&objs);
                objs.push(Object { seq, value });
            }
            Ok(Step {
                change: Change::Put {
                    objects: Objects::Many(objs),
                    expires_at,
                },
                inserted: u64::from(adds),
                deleted: 0,
            })
        }
    }
}

/// `delete/2`.
///
/// # Errors
/// [`StoreError::PreconditionFailed`].
pub fn delete(live: Option<&Row>, pre: &Precondition) -> StoreResult<Step> {
    pre.check_version(live.map(|r| r.version))?;
    Ok(match live {
        None => Step::keep(),
        Some(row) => Step {
            change: Change::Remove,
            inserted: 0,
            deleted: row.count() as u64,
        },
    })
}

/// `delete_object/2`: removes every object identical to `value`.
pub fn delete_object(live: Option<&Row>, value: &Value) -> Step {
    let Some(row) = live else {
        return Step::keep();
    };
    match &row.objects {
        Objects::One(v) if v == value => Step {
            change: Change::Remove,
            inserted: 0,
            deleted: 1,
        },
        Objects::One(_) => Step::keep(),
        Objects::Many(objs) => {
            let left: Vec<Object> = objs.iter().filter(|o| &o.value != value).cloned().collect();
            let removed = (objs.len() - left.len()) as u64;
            if removed == 0 {
                Step::keep()
            } else if left.is_empty() {
                Step {
                    change: Change::Remove,
                    inserted: 0,
                    deleted: removed,
                }
            } else {
                Step {
                    change: Change::Put {
                        objects: Objects::Many(Box::new(left)),
                        expires_at: row.expires_at,
                    },
                    inserted: 0,
                    deleted: removed,
                }
            }
        }
    }
}

/// `update_counter/4`; returns the step and the counter's new value.
///
/// # Errors
/// As [`crate::store::Table::update_counter`].
pub fn counter(
    kind: TableType,
    live: Option<&Row>,
    op: &CounterOp,
    clock: Clock,
) -> StoreResult<(Step, i64)> {
    rules::single_valued(kind, rules::SingleOp::Counter)?;
    op.validate()?;
    let (current, expires_at, created) = match live {
        Some(row) => match &row.objects {
            Objects::One(v) => (v.clone(), clock.refreshed(row.expires_at), false),
            Objects::Many(_) => {
                return Err(StoreError::WrongTableType("counters need a set table"))
            }
        },
        None => (
            op.default_value().ok_or(StoreError::KeyNotFound)?,
            clock.deadline(None),
            true,
        ),
    };
    let (value, n) = op.apply(&current)?;
    Ok((
        Step {
            change: Change::Put {
                objects: Objects::One(value),
                expires_at,
            },
            inserted: u64::from(created),
            deleted: 0,
        },
        n,
    ))
}

/// `update_element` as a JSON Merge Patch.
///
/// # Errors
/// As [`crate::store::Table::merge`].
pub fn merge(
    kind: TableType,
    raw_values: bool,
    live: Option<&Row>,
    patch: &serde_json::Value,
    pre: &Precondition,
    clock: Clock,
) -> StoreResult<Step> {
    rules::single_valued(kind, rules::SingleOp::Merge)?;
    let Some(row) = live else {
        pre.check_version(None)?;
        return Err(StoreError::KeyNotFound);
    };
    pre.check_version(Some(row.version))?;
    let Objects::One(current) = &row.objects else {
        return Err(StoreError::WrongTableType("merge patch needs a set table"));
    };
    Ok(Step {
        change: Change::Put {
            objects: Objects::One(merge_patch(current, patch, raw_values)?),
            expires_at: clock.refreshed(row.expires_at),
        },
        inserted: 0,
        deleted: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Value {
        Value::parse(text.as_bytes()).unwrap()
    }

    fn bag(values: &[(u64, &str)]) -> Row {
        Row {
            objects: Objects::Many(Box::new(
                values
                    .iter()
                    .map(|(seq, t)| Object {
                        seq: *seq,
                        value: v(t),
                    })
                    .collect(),
            )),
            version: 7,
            expires_at: 0,
            modified: 0,
        }
    }

    #[test]
    fn bag_objects_round_trip_through_their_text() {
        let row = bag(&[(1, r#"{"b":1,"a":[1,2]}"#), (3, "\"x\"")]);
        let text = encode(&row.objects);
        assert_eq!(text, r#"[[1,{"a":[1,2],"b":1}],[3,"x"]]"#);
        assert_eq!(decode(TableType::Bag, &text).unwrap(), row.objects);
        assert!(decode(TableType::Bag, "[]").is_err());
        assert!(decode(TableType::Set, "{").is_err());
    }

    #[test]
    fn bag_adds_only_new_values_and_duplicate_bag_always_adds() {
        let row = bag(&[(1, "1")]);
        let same = insert(TableType::Bag, Some(&row), v("1"), 0, &Precondition::None).unwrap();
        assert_eq!(same.change, Change::Keep);
        let dup = insert(
            TableType::DuplicateBag,
            Some(&row),
            v("1"),
            0,
            &Precondition::None,
        )
        .unwrap();
        assert_eq!(dup.inserted, 1);
        let Change::Put { objects, .. } = dup.change else {
            panic!("expected a put");
        };
        assert_eq!(objects.count(), 2);
    }

    #[test]
    fn delete_object_removes_every_identical_copy() {
        let row = bag(&[(1, "1"), (2, "2"), (3, "1")]);
        let step = delete_object(Some(&row), &v("1"));
        assert_eq!(step.deleted, 2);
        assert_eq!(step.count_after(Some(&row)), 1);
        let gone = delete_object(Some(&bag(&[(1, "1")])), &v("1"));
        assert_eq!(gone.change, Change::Remove);
    }

    #[test]
    fn preconditions_and_counters_follow_ets() {
        let row = Row {
            objects: Objects::One(v("5")),
            version: 9,
            expires_at: 0,
            modified: 0,
        };
        let clock = Clock {
            now: 1000,
            default_ttl_ms: None,
        };
        assert!(insert(TableType::Set, Some(&row), v("1"), 0, &Precondition::Absent).is_err());
        assert!(insert(
            TableType::Set,
            Some(&row),
            v("1"),
            0,
            &Precondition::Version(vec![9])
        )
        .is_ok());
        let (_, n) = counter(TableType::Set, Some(&row), &CounterOp::incr(2), clock).unwrap();
        assert_eq!(n, 7);
        assert_eq!(
            counter(TableType::Set, None, &CounterOp::incr(1), clock).unwrap_err(),
            StoreError::KeyNotFound
        );
        assert!(counter(TableType::Bag, None, &CounterOp::incr(1), clock).is_err());
    }
}
