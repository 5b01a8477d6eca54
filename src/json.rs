//! JSON text as larder accepts it from clients: serde_json's grammar, with
//! the member names of every object distinct.
//!
//! serde_json keeps the last of repeated members, so
//! `{"access":"private","access":"public"}` would read as `public`, a
//! value would lose members silently, and two texts that mean different
//! things to other parsers (some keep the first) would be taken as one.
//! Refusing them is what RFC 8259 recommends for interoperability (names
//! "SHOULD be unique") and what I-JSON (RFC 7493) requires.
//!
//! Two entry points: [`parse_value`] builds a tree in one pass and refuses
//! a repeated name where it finds it; [`check_unique_members`] only checks
//! text that was already read into some other type, without building
//! anything for names that need no unescaping.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Object sizes up to which names are compared in a list rather than a
/// hash set: most objects a client sends have a handful of members.
const LINEAR_NAMES: usize = 16;

/// Parses `text` as exactly one JSON value, refusing any object with a
/// repeated member name.
///
/// # Errors
/// serde_json's error: a syntax error, or (a data error) the repeated name.
pub fn parse_value(text: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = Tree.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Checks that `text` is one JSON value whose objects all have distinct
/// member names.
///
/// # Errors
/// serde_json's error: a syntax error, or (a data error) the repeated name.
pub fn check_unique_members(text: &[u8]) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    Check.deserialize(&mut de)?;
    de.end()
}

fn repeated<E: de::Error>(name: &str) -> E {
    E::custom(format_args!(
        "the member {name:?} appears twice in one object"
    ))
}

/// The names of one object seen so far.
#[derive(Default)]
struct Names<'a> {
    few: Vec<Cow<'a, str>>,
    many: Option<std::collections::HashSet<Cow<'a, str>>>,
}

impl<'a> Names<'a> {
    /// Adds `name`; false when it was there already.
    fn insert(&mut self, name: Cow<'a, str>) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(name);
        }
        if self.few.contains(&name) {
            return false;
        }
        self.few.push(name);
        if self.few.len() > LINEAR_NAMES {
            self.many = Some(self.few.drain(..).collect());
        }
        true
    }
}

/// A member name, borrowed from the text when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads any value, keeping nothing but the names of the object being read.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names = Names::default();
        while let Some(Name(name)) = map.next_key()? {
            if !names.insert(name.clone()) {
                return Err(repeated(&name));
            }
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// Builds the tree serde_json's own `Value` would, refusing repeated names.
struct Tree;

impl<'de> DeserializeSeed<'de> for Tree {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tree {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(Tree)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(Tree)?;
            if members.contains_key(&name) {
                return Err(repeated(&name));
            }
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_members_are_refused_at_any_depth() {
        for text in [
            &br#"{"a":1,"a":2}"#[..],
            br#"{"name":"t","access":"private","access":"public"}"#,
            br#"[1,{"x":{"y":1,"y":1}}]"#,
            br#"{"a\u0062":1,"ab":2}"#,
        ] {
            let shown = String::from_utf8_lossy(text);
            let e = parse_value(text).expect_err(&shown);
            assert!(e.to_string().contains("appears twice"), "{shown}: {e}");
            let e = check_unique_members(text).expect_err(&shown);
            assert!(e.to_string().contains("appears twice"), "{shown}: {e}");
        }
    }

    #[test]
    fn everything_else_reads_as_serde_json_reads_it() {
        let many: String = (0..40).map(|i| format!("\"k{i}\":{i},")).collect();
        let many = format!("{{{}\"end\":true}}", many);
        for text in [
            "1",
            "-0",
            "1.5e3",
            "18446744073709551615",
            "-9223372036854775808",
            "\"a\\nb\"",
            "[]",
            "{}",
            r#"{"b":[1,{"a":null}],"a":"x","ab":{"a":{}}}"#,
            " { \"x\" : [ true , false ] } ",
            &many,
        ] {
            let ours = parse_value(text.as_bytes()).expect(text);
            let theirs: Value = serde_json::from_str(text).expect(text);
            assert_eq!(ours, theirs, "{text}");
            check_unique_members(text.as_bytes()).expect(text);
        }
    }

    #[test]
    fn malformed_text_is_refused_by_both() {
        for text in ["", "{", "[1,]", "{\"a\":1} x", "nul", "{\"a\" 1}"] {
            assert!(parse_value(text.as_bytes()).is_err(), "{text}");
            assert!(check_unique_members(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn many_members_are_checked_by_hash() {
        let mut text: String = (0..40).map(|i| format!("\"k{i}\":{i},")).collect();
        text.push_str("\"k3\":0");
        let text = format!("{{{text}}}");
        assert!(check_unique_members(text.as_bytes()).is_err());
        assert!(parse_value(text.as_bytes()).is_err());
    }
}
