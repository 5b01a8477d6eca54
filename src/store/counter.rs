//! `update_counter` and `update_element` as pure functions on stored values.
//!
//! The table applies these under the key's shard lock, so each update is
//! atomic; here they only compute the new value or say why they cannot.

use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{StoreError, StoreResult};
use super::value::Value;

/// One `update_counter` call, as in ETS `update_counter/4`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CounterOp {
    /// Added to the counter; negative to decrement. Defaults to 1.
    #[serde(default = "CounterOp::one")]
    #[schema(default = 1)]
    pub incr: i64,
    /// Stored first when the key is absent (ETS `Default`); without it a
    /// missing key is 404. With `field`, the stored default is `{field: default}`.
    #[serde(default)]
    pub default: Option<i64>,
    /// Update this member of an object value instead of the value itself.
    #[serde(default)]
    pub field: Option<String>,
    /// With `set_value`: if `incr` > 0 and the result would exceed it, or
    /// `incr` < 0 and the result would fall below it, store `set_value` instead.
    #[serde(default)]
    pub threshold: Option<i64>,
    /// What the counter becomes when `threshold` is crossed.
    #[serde(default)]
    pub set_value: Option<i64>,
}

impl Default for CounterOp {
    /// A plain increment by one, as an empty request body means.
    fn default() -> Self {
        CounterOp {
            incr: 1,
            default: None,
            field: None,
            threshold: None,
            set_value: None,
        }
    }
}

impl CounterOp {
    fn one() -> i64 {
        1
    }

    /// A plain increment by `incr`.
    pub fn incr(incr: i64) -> Self {
        Self {
            incr,
            ..Self::default()
        }
    }

    /// Checks that `threshold` and `set_value` come together.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] when only one of them is given.
    pub fn validate(&self) -> StoreResult<()> {
        if self.threshold.is_some() != self.set_value.is_some() {
            return Err(StoreError::InvalidArgument(
                "threshold and set_value must be given together".into(),
            ));
        }
        if matches!(&self.field, Some(f) if f.is_empty()) {
            return Err(StoreError::InvalidArgument(
                "field must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// The value stored for a missing key before incrementing, if any.
    pub fn default_value(&self) -> Option<Value> {
        let d = self.default?;
        Some(match &self.field {
            None => Value::from_json(&serde_json::Value::from(d)),
            Some(f) => {
                let mut m = serde_json::Map::new();
                m.insert(f.clone(), serde_json::Value::from(d));
                Value::from_json(&serde_json::Value::Object(m))
            }
        })
    }

    /// The counter's next value from its current one.
    ///
    /// # Errors
    /// [`StoreError::Overflow`] when the result leaves the i64 range and no
    /// threshold catches it.
    pub fn step(&self, current: i64) -> StoreResult<i64> {
        let raw = current as i128 + self.incr as i128;
        let next = match (self.threshold, self.set_value) {
            (Some(t), Some(s)) if self.incr > 0 && raw > t as i128 => s as i128,
            (Some(t), Some(s)) if self.incr < 0 && raw < t as i128 => s as i128,
            _ => raw,
        };
        i64::try_from(next).map_err(|_| StoreError::Overflow)
    }

    /// Applies the update to a stored value, returning the new stored value
    /// and the counter's new number.
    ///
    /// # Errors
    /// [`StoreError::NotACounter`] when the target is not a 64-bit integer,
    /// and the errors of [`CounterOp::step`].
    pub fn apply(&self, stored: &Value) -> StoreResult<(Value, i64)> {
        match &self.field {
            None => {
                let current: i64 = serde_json::from_slice(stored.as_bytes()).map_err(|_| {
                    StoreError::NotACounter("the stored value is not a 64-bit integer".into())
                })?;
                let next = self.step(current)?;
                Ok((Value::from_canonical(next.to_string().as_bytes()), next))
            }
            Some(field) => {
                let mut tree = stored.to_json();
                let obj = tree.as_object_mut().ok_or_else(|| {
                    StoreError::NotACounter("the stored value is not an object".into())
                })?;
                let current = obj.get(field).and_then(|v| v.as_i64()).ok_or_else(|| {
                    StoreError::NotACounter(format!(
                        "member '{field}' is missing or not a 64-bit integer"
                    ))
                })?;
                let next = self.step(current)?;
                obj.insert(field.clone(), serde_json::Value::from(next));
                Ok((Value::from_json(&tree), next))
            }
        }
    }
}

/// Applies a JSON Merge Patch (RFC 7396) to an object value. With
/// `raw_values` (a `"values": "any"` table), a raw value is bytes, not an
/// object, and is refused as one.
///
/// # Errors
/// [`StoreError::NotAnObject`] when the stored value is not an object, and
/// [`StoreError::InvalidArgument`] when the patch is not an object.
pub fn merge_patch(
    stored: &Value,
    patch: &serde_json::Value,
    raw_values: bool,
) -> StoreResult<Value> {
    if !patch.is_object() {
        return Err(StoreError::InvalidArgument(
            "a merge patch must be a JSON object".into(),
        ));
    }
    if raw_values && stored.raw().is_some() {
        return Err(StoreError::NotAnObject);
    }
    let mut target = stored.to_json();
    if !target.is_object() {
        return Err(StoreError::NotAnObject);
    }
    apply_merge(&mut target, patch);
    Ok(Value::from_json(&target))
}

fn apply_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(obj) = target {
        for (name, value) in members {
            if value.is_null() {
                obj.remove(name);
            } else {
                apply_merge(
                    obj.entry(name.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(j: serde_json::Value) -> Value {
        Value::from_json(&j)
    }

    #[test]
    fn increments_plain_integers() {
        let (new, n) = CounterOp::incr(5).apply(&v(json!(10))).unwrap();
        assert_eq!(n, 15);
        assert_eq!(new.as_bytes(), b"15");
    }

    #[test]
    fn threshold_resets_like_ets() {
        let op = CounterOp {
            incr: 1,
            threshold: Some(3),
            set_value: Some(0),
            ..Default::default()
        };
        assert_eq!(op.step(2).unwrap(), 3);
        assert_eq!(op.step(3).unwrap(), 0);
        let down = CounterOp {
            incr: -1,
            threshold: Some(0),
            set_value: Some(10),
            ..Default::default()
        };
        assert_eq!(down.step(1).unwrap(), 0);
        assert_eq!(down.step(0).unwrap(), 10);
    }

    #[test]
    fn overflow_is_an_error_unless_a_threshold_catches_it() {
        assert_eq!(CounterOp::incr(1).step(i64::MAX), Err(StoreError::Overflow));
        assert_eq!(
            CounterOp::incr(-1).step(i64::MIN),
            Err(StoreError::Overflow)
        );
        let op = CounterOp {
            incr: 1,
            threshold: Some(100),
            set_value: Some(0),
            ..Default::default()
        };
        assert_eq!(op.step(i64::MAX).unwrap(), 0);
    }

    #[test]
    fn non_integers_are_not_counters() {
        for bad in [
            json!(1.5),
            json!("1"),
            json!(u64::MAX),
            json!(null),
            json!([1]),
        ] {
            assert!(matches!(
                CounterOp::incr(1).apply(&v(bad)),
                Err(StoreError::NotACounter(_))
            ));
        }
    }

    #[test]
    fn field_counters_update_one_member() {
        let op = CounterOp {
            incr: 2,
            field: Some("n".into()),
            ..Default::default()
        };
        let (new, n) = op.apply(&v(json!({"n": 1, "x": "y"}))).unwrap();
        assert_eq!(n, 3);
        assert_eq!(new, v(json!({"n": 3, "x": "y"})));
        assert!(op.apply(&v(json!({"x": 1}))).is_err());
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let out = merge_patch(
            &v(json!({"a": "b", "c": {"d": "e", "f": "g"}})),
            &json!({"a": "z", "c": {"f": null}}),
            false,
        )
        .unwrap();
        assert_eq!(out, v(json!({"a": "z", "c": {"d": "e"}})));
        assert_eq!(
            merge_patch(&v(json!(1)), &json!({}), false),
            Err(StoreError::NotAnObject)
        );
        assert!(merge_patch(&v(json!({})), &json!([1]), false).is_err());
        // Raw bytes are an object only on a table that keeps JSON alone.
        let raw = Value::from_raw(b"\0", "x/y");
        assert!(merge_patch(&raw, &json!({"a": 1}), false).is_ok());
        assert_eq!(
            merge_patch(&raw, &json!({"a": 1}), true),
            Err(StoreError::NotAnObject)
        );
    }
}
