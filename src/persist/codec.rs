//! The on-disk encoding of records and table definitions.
//!
//! Every record starts with its format version, so a reader can tell old
//! records from new ones and upgrade as it reads; `migrations/` describes each
//! layout. The current record layout (format 2), all integers big-endian:
//!
//! ```text
//! [0]      2                      record format
//! [1]      0 = one object, 1 = list of objects (bag types)
//! [2..10]  version                entry version (ETag)
//! [10..18] expires_at             Unix ms, 0 = never
//! one:     [18..]                 the object's canonical JSON
//! list:    repeated { seq u64, len u32, JSON bytes }
//! ```
//!
//! Format 1 records are the same without the leading format byte; their first
//! byte is therefore 0 or 1, never 2, and [`decode_slot`] still reads them.

use serde::{Deserialize, Serialize};

use super::PersistError;
use crate::store::{
    Access, Eviction, Object, Objects, Origin, Persistence, Slot, TableSpec, TableType, Value,
};

/// The data directory format this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// First byte of a format-2 record.
pub const RECORD_V2: u8 = 2;

const ONE: u8 = 0;
const MANY: u8 = 1;

/// Encodes a slot as a current-format record.
pub fn encode_slot(slot: &Slot) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(18 + slot.objects.values().map(|v| v.len() + 12).sum::<usize>());
    out.push(RECORD_V2);
    encode_body(slot, &mut out);
    out
}

/// The record body shared by formats 1 and 2 (everything after format 2's
/// leading byte).
pub fn encode_body(slot: &Slot, out: &mut Vec<u8>) {
    match &slot.objects {
        Objects::One(v) => {
            out.push(ONE);
            out.extend_from_slice(&slot.version.to_be_bytes());
            out.extend_from_slice(&slot.expires_at.to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        Objects::Many(objs) => {
            out.push(MANY);
            out.extend_from_slice(&slot.version.to_be_bytes());
            out.extend_from_slice(&slot.expires_at.to_be_bytes());
            for o in objs.iter() {
                out.extend_from_slice(&o.seq.to_be_bytes());
                out.extend_from_slice(&(o.value.len() as u32).to_be_bytes());
                out.extend_from_slice(o.value.as_bytes());
            }
        }
    }
}

/// Decodes a record of format 2 or 1.
///
/// # Errors
/// [`PersistError::Corrupt`] when the bytes are not a record we wrote.
pub fn decode_slot(bytes: &[u8]) -> Result<Slot, PersistError> {
    match bytes.first() {
        Some(&RECORD_V2) => decode_body(&bytes[1..]),
        Some(&ONE) | Some(&MANY) => decode_body(bytes),
        Some(other) => Err(PersistError::Corrupt(format!(
            "record of unknown format {other}"
        ))),
        None => Err(PersistError::Corrupt("empty record".into())),
    }
}

fn decode_body(b: &[u8]) -> Result<Slot, PersistError> {
    let short = || PersistError::Corrupt("truncated record".into());
    if b.len() < 17 {
        return Err(short());
    }
    let version = u64::from_be_bytes(b[1..9].try_into().map_err(|_| short())?);
    let expires_at = u64::from_be_bytes(b[9..17].try_into().map_err(|_| short())?);
    let rest = &b[17..];
    let objects = match b[0] {
        ONE => Objects::One(json_value(rest)?),
        MANY => {
            let mut objs = Vec::new();
            let mut at = 0;
            while at < rest.len() {
                let head = rest.get(at..at + 12).ok_or_else(short)?;
                let seq = u64::from_be_bytes(head[..8].try_into().map_err(|_| short())?);
                let len = u32::from_be_bytes(head[8..].try_into().map_err(|_| short())?) as usize;
                let body = rest.get(at + 12..at + 12 + len).ok_or_else(short)?;
                objs.push(Object {
                    seq,
                    value: json_value(body)?,
                });
                at += 12 + len;
            }
            if objs.is_empty() {
                return Err(PersistError::Corrupt("bag record without objects".into()));
            }
            Objects::Many(Box::new(objs))
        }
        other => {
            return Err(PersistError::Corrupt(format!(
                "record of unknown kind {other}"
            )))
        }
    };
    Ok(Slot::new(objects, version, expires_at, 0))
}

fn json_value(bytes: &[u8]) -> Result<Value, PersistError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| PersistError::Corrupt(format!("stored value is not JSON: {e}")))?;
    Ok(Value::from_canonical(bytes.to_vec()))
}

/// A table definition as stored: the creation settings, versioned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredTable {
    /// Definition format; 1 so far.
    pub v: u32,
    /// Table name.
    pub name: String,
    /// Table type.
    #[serde(rename = "type")]
    pub kind: TableType,
    /// Access level.
    pub access: Access,
    /// Durability mode.
    pub persistence: Persistence,
    /// Write-back bound for periodic tables.
    pub auto_save_ms: Option<u64>,
    /// Default TTL.
    pub default_ttl_ms: Option<u64>,
    /// Object limit.
    pub max_entries: Option<u64>,
    /// Eviction policy.
    pub eviction: Eviction,
    /// Read-through origin.
    pub origin: Option<Origin>,
    /// Owning principal.
    pub owner: String,
    /// Creation time, Unix ms.
    pub created_at: u64,
}

impl StoredTable {
    /// The stored form of a table's current settings.
    pub fn of(spec: &TableSpec) -> Self {
        StoredTable {
            v: 1,
            name: spec.name.clone(),
            kind: spec.kind,
            access: spec.access,
            persistence: spec.persistence,
            auto_save_ms: spec.auto_save_ms,
            default_ttl_ms: spec.default_ttl_ms,
            max_entries: spec.max_entries,
            eviction: spec.eviction,
            origin: spec.origin.clone(),
            owner: spec.owner.clone(),
            created_at: spec.created_at,
        }
    }

    /// Back to creation settings.
    pub fn into_spec(self) -> TableSpec {
        TableSpec {
            name: self.name,
            kind: self.kind,
            access: self.access,
            persistence: self.persistence,
            auto_save_ms: self.auto_save_ms,
            default_ttl_ms: self.default_ttl_ms,
            max_entries: self.max_entries,
            eviction: self.eviction,
            origin: self.origin,
            owner: self.owner,
            created_at: self.created_at,
        }
    }

    /// Encodes as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a stored definition.
    ///
    /// # Errors
    /// [`PersistError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Self, PersistError> {
        let def: StoredTable = serde_json::from_slice(bytes)
            .map_err(|e| PersistError::Corrupt(format!("table definition: {e}")))?;
        if def.v != 1 {
            return Err(PersistError::Corrupt(format!(
                "table definition of unknown format {}",
                def.v
            )));
        }
        Ok(def)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        Value::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn records_round_trip() {
        let one = Slot::new(Objects::One(v(r#"{"a":1}"#)), 42, 1_700_000_000_000, 0);
        let back = decode_slot(&encode_slot(&one)).unwrap();
        assert_eq!(back.objects, one.objects);
        assert_eq!((back.version, back.expires_at), (42, 1_700_000_000_000));
        let many = Slot::new(
            Objects::Many(Box::new(vec![
                Object {
                    seq: 3,
                    value: v("\"x\""),
                },
                Object {
                    seq: 9,
                    value: v("[1,2]"),
                },
            ])),
            9,
            0,
            0,
        );
        assert_eq!(
            decode_slot(&encode_slot(&many)).unwrap().objects,
            many.objects
        );
    }

    #[test]
    fn format_1_records_are_still_read() {
        let one = Slot::new(Objects::One(v("7")), 5, 0, 0);
        let mut old = Vec::new();
        encode_body(&one, &mut old);
        assert_eq!(decode_slot(&old).unwrap().objects, one.objects);
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x07",
            b"\x02\x00",
            b"\x02\x01\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\x09x",
        ] {
            assert!(decode_slot(bad).is_err());
        }
        let mut not_json = vec![RECORD_V2, ONE];
        not_json.extend_from_slice(&[0; 16]);
        not_json.extend_from_slice(b"{nope");
        assert!(decode_slot(&not_json).is_err());
    }
}
