//! The on-disk encoding of records and table definitions.
//!
//! Every record starts with its format version, so a reader can tell old
//! records from new ones and upgrade as it reads; `migrations/` describes each
//! layout. The current record layout (record format 3), all integers
//! big-endian:
//!
//! ```text
//! [0]      3                      record format
//! [1]      0 = one object, 1 = list of objects (bag types)
//! [2..10]  version                entry version (ETag)
//! [10..18] expires_at             Unix ms, 0 = never
//! [18..22] modified               Unix seconds of the last write
//! one:     [22..]                 the object's canonical JSON
//! list:    repeated { seq u64, len u32, JSON bytes }
//! ```
//!
//! Record format 2 is the same without `modified` (read as 0: not known).
//! Format 1 records are format 2's without the leading format byte; their
//! first byte is therefore 0 or 1, never 2 or 3, and [`decode_slot`] still
//! reads them.

use serde::{Deserialize, Serialize};

use super::PersistError;
use crate::store::{Object, Objects, ObjectsRef, Slot, TableSettings, TableSpec, Value};

/// The data directory format this build writes.
pub const FORMAT_VERSION: u32 = 5;
/// First byte of a format-2 record.
pub const RECORD_V2: u8 = 2;
/// First byte of a format-3 record, the one this build writes.
pub const RECORD_V3: u8 = 3;

const ONE: u8 = 0;
const MANY: u8 = 1;

/// Encodes a slot as a current-format record.
pub fn encode_slot(slot: &Slot) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(22 + slot.objects().values().map(|v| v.len() + 12).sum::<usize>());
    out.push(RECORD_V3);
    encode(slot, &mut out, true);
    out
}

/// The record body shared by formats 1 and 2 (everything after format 2's
/// leading byte): what older builds wrote, kept for tests of upgrades.
pub fn encode_body(slot: &Slot, out: &mut Vec<u8>) {
    encode(slot, out, false);
}

fn encode(slot: &Slot, out: &mut Vec<u8>, modified: bool) {
    out.push(match slot.objects() {
        ObjectsRef::One(_) => ONE,
        ObjectsRef::Many(_) => MANY,
    });
    out.extend_from_slice(&slot.version.to_be_bytes());
    out.extend_from_slice(&slot.expires_at.to_be_bytes());
    if modified {
        out.extend_from_slice(&slot.modified().to_be_bytes());
    }
    match slot.objects() {
        ObjectsRef::One(v) => out.extend_from_slice(v.as_bytes()),
        ObjectsRef::Many(objs) => {
            for o in objs.iter() {
                out.extend_from_slice(&o.seq.to_be_bytes());
                out.extend_from_slice(&(o.value.len() as u32).to_be_bytes());
                out.extend_from_slice(o.value.as_bytes());
            }
        }
    }
}

/// Decodes a record of format 3, 2 or 1.
///
/// # Errors
/// [`PersistError::Corrupt`] when the bytes are not a record we wrote.
pub fn decode_slot(bytes: &[u8]) -> Result<Slot, PersistError> {
    match bytes.first() {
        Some(&RECORD_V3) => decode_body(&bytes[1..], true),
        Some(&RECORD_V2) => decode_body(&bytes[1..], false),
        Some(&ONE) | Some(&MANY) => decode_body(bytes, false),
        Some(other) => Err(PersistError::Corrupt(format!(
            "record of unknown format {other}"
        ))),
        None => Err(PersistError::Corrupt("empty record".into())),
    }
}

fn decode_body(b: &[u8], with_modified: bool) -> Result<Slot, PersistError> {
    let short = || PersistError::Corrupt("truncated record".into());
    let head = if with_modified { 21 } else { 17 };
    if b.len() < head {
        return Err(short());
    }
    let version = u64::from_be_bytes(b[1..9].try_into().map_err(|_| short())?);
    let expires_at = u64::from_be_bytes(b[9..17].try_into().map_err(|_| short())?);
    let modified = if with_modified {
        u32::from_be_bytes(b[17..21].try_into().map_err(|_| short())?)
    } else {
        0
    };
    let rest = &b[head..];
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
    Ok(Slot::new(objects, version, expires_at, 0, modified))
}

fn json_value(bytes: &[u8]) -> Result<Value, PersistError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| PersistError::Corrupt(format!("stored value is not JSON: {e}")))?;
    Ok(Value::from_canonical(bytes))
}

/// A table definition as stored: its identity and settings, versioned.
///
/// The settings are [`TableSettings`] itself, flattened, so every setting is
/// stored without this type naming it; the JSON layout is the same as when
/// the fields were listed one by one (format 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredTable {
    /// Definition format; 1 so far.
    pub v: u32,
    /// Table name.
    pub name: String,
    /// Every setting.
    #[serde(flatten)]
    pub settings: TableSettings,
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
            settings: spec.settings.clone(),
            owner: spec.owner.clone(),
            created_at: spec.created_at,
        }
    }

    /// Back to creation settings.
    pub fn into_spec(self) -> TableSpec {
        TableSpec {
            name: self.name,
            settings: self.settings,
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
    use crate::store::{Access, Eviction, Origin, Persistence, TableType};

    fn v(s: &str) -> Value {
        Value::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn records_round_trip() {
        let one = Slot::new(
            Objects::One(v(r#"{"a":1}"#)),
            42,
            1_700_000_000_000,
            0,
            1_699_999_000,
        );
        let back = decode_slot(&encode_slot(&one)).unwrap();
        assert_eq!(back.objects(), one.objects());
        assert_eq!(
            (back.version, back.expires_at, back.modified()),
            (42, 1_700_000_000_000, 1_699_999_000)
        );
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
            7,
        );
        assert_eq!(
            decode_slot(&encode_slot(&many)).unwrap().objects(),
            many.objects()
        );
    }

    #[test]
    fn format_1_records_are_still_read() {
        let one = Slot::new(Objects::One(v("7")), 5, 0, 0, 123);
        let mut old = Vec::new();
        encode_body(&one, &mut old);
        let back = decode_slot(&old).unwrap();
        assert_eq!(back.objects(), one.objects());
        // Older records never knew the write time.
        assert_eq!(back.modified(), 0);
        let mut v2 = vec![RECORD_V2];
        encode_body(&one, &mut v2);
        assert_eq!(decode_slot(&v2).unwrap().modified(), 0);
    }

    #[test]
    fn a_definition_keeps_every_setting() {
        let spec = TableSpec {
            name: "t".into(),
            settings: TableSettings {
                kind: TableType::DuplicateBag,
                access: Access::Private,
                persistence: Persistence::Periodic,
                auto_save_ms: Some(1234),
                default_ttl_ms: Some(5678),
                max_entries: Some(9),
                eviction: Eviction::Lru,
                origin: Some(Origin {
                    url: "http://127.0.0.1:1/{key}".into(),
                    ttl_ms: 1,
                    negative_ttl_ms: 2,
                    timeout_ms: 3,
                    headers: [("X-Api-Key".to_owned(), "${LARDER_ORIGIN_K}".to_owned())]
                        .into_iter()
                        .collect(),
                    refresh_ahead_ms: Some(4),
                    stale_if_error_ms: Some(5),
                }),
                cache: crate::store::CacheScope::Public,
                values: crate::store::ValueKind::Any,
            },
            owner: "alice".into(),
            created_at: 1_700_000_000_000,
        };
        let back = StoredTable::decode(&StoredTable::of(&spec).encode())
            .unwrap()
            .into_spec();
        assert_eq!(back, spec);
        // Every member the settings serialize to is in the stored record.
        let record: serde_json::Value =
            serde_json::from_slice(&StoredTable::of(&spec).encode()).unwrap();
        let settings = serde_json::to_value(&spec.settings).unwrap();
        for (name, value) in settings.as_object().unwrap() {
            assert_eq!(&record[name], value, "{name} is not stored");
        }
    }

    #[test]
    fn a_format_1_definition_written_field_by_field_is_still_read() {
        let old = br#"{"v":1,"name":"old","type":"bag","access":"protected","persistence":"periodic","auto_save_ms":1000,"default_ttl_ms":null,"max_entries":null,"eviction":"none","origin":null,"owner":"anonymous","created_at":1700000000000}"#;
        let spec = StoredTable::decode(old).unwrap().into_spec();
        assert_eq!(spec.settings.kind, TableType::Bag);
        assert_eq!(spec.settings.auto_save_ms, Some(1000));
        assert_eq!(spec.owner, "anonymous");
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
