//! Reading the members an object pattern names straight from a stored
//! value's text.
//!
//! Stored values are canonical JSON: compact, and member names seldom need
//! escapes. An object pattern names a few members; the others only have to
//! be stepped over. serde_json steps over a string one byte at a time,
//! while [`string_end`] looks at eight, so on a 100-byte value whose bulk
//! is one string this reader does a fraction of serde_json's work. Text it
//! is not sure of (escaped names, whitespace) is left to serde_json, which
//! reads every JSON text.

use serde_json::Value as Json;
use smallvec::SmallVec;

use super::spec::Pattern;
use crate::store::{string_end, whole_number};

/// The members an object pattern names, by its order; inline up to four.
pub(super) type Found = SmallVec<[Option<Json>; 4]>;

/// The members of the object `text` that `names` names, by the order of
/// `names` (`None` where the object has no such member), the others
/// skipped unparsed. `Some(None)` when `text` is not an object; `None`
/// when this reader is not sure of the text and serde_json must read it.
/// `text` must be JSON, as stored values are: members that are skipped
/// are not checked, only stepped over.
pub(super) fn named_members(text: &[u8], names: &[(String, Pattern)]) -> Option<Option<Found>> {
    match text.first()? {
        b'{' => {}
        b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => return Some(None),
        _ => return None,
    }
    let mut found: Found = smallvec::smallvec![None; names.len()];
    let mut at = 1;
    if text.get(at) == Some(&b'}') {
        return (at + 1 == text.len()).then_some(Some(found));
    }
    loop {
        if text.get(at) != Some(&b'"') {
            return None;
        }
        let name_len = string_end(&text[at + 1..])?;
        let name = &text[at + 1..at + 1 + name_len];
        at += name_len + 1;
        // A name with an escape in it: serde_json decodes it.
        if text.get(at) != Some(&b'"') || text.get(at + 1) != Some(&b':') {
            return None;
        }
        let start = at + 2;
        at = skip_value(text, start)?;
        if let Some(i) = names.iter().position(|(n, _)| n.as_bytes() == name) {
            let value = &text[start..at];
            // A repeated name keeps its last value, as a parse would.
            found[i] = Some(match whole_number(value) {
                Some(n) => Json::from(n),
                None => serde_json::from_slice(value).ok()?,
            });
        }
        match text.get(at) {
            Some(b',') => at += 1,
            Some(b'}') => return (at + 1 == text.len()).then_some(Some(found)),
            _ => return None,
        }
    }
}

/// Where the value that starts at `at` ends; `None` when it is not one
/// this reader is sure of.
fn skip_value(text: &[u8], at: usize) -> Option<usize> {
    match text.get(at)? {
        b'"' => skip_string(text, at),
        b'{' | b'[' => {
            // Brackets are counted outside strings only; the value is
            // checked when it is parsed, if it is wanted at all.
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match text.get(i)? {
                    b'"' => {
                        i = skip_string(text, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, `true`, `false` or `null`.
        _ => {
            let len = text[at..]
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')))
                .unwrap_or(text.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// Where the string that starts (with its quote) at `at` ends, one past
/// its closing quote.
fn skip_string(text: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i += string_end(text.get(i..)?)?;
        match text[i] {
            b'"' => return Some(i + 1),
            // An escape: what follows the backslash is never a stop that
            // matters (`\"` and `\\` are stepped over whole).
            b'\\' => i += 2,
            // A raw control byte: not JSON.
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::de::DeserializeSeed;

    use super::*;
    use crate::store::Value;

    fn names(list: &[&str]) -> Vec<(String, Pattern)> {
        list.iter()
            .map(|n| ((*n).to_owned(), Pattern::Any))
            .collect()
    }

    /// What serde_json reads for the same names.
    fn slow(text: &[u8], names: &[(String, Pattern)]) -> Option<Found> {
        let mut de = serde_json::Deserializer::from_slice(text);
        super::super::eval::Named(names).deserialize(&mut de).ok()
    }

    #[test]
    fn reads_named_members_and_skips_the_rest() {
        let text = br#"{"a":[1,{"b":"]}"}],"n":12,"s":"x\"y\\","v":"vvv","z":null}"#;
        let got = named_members(text, &names(&["n", "s", "missing", "z"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            got.as_slice(),
            &[
                Some(Json::from(12)),
                Some(Json::from("x\"y\\")),
                None,
                Some(Json::Null)
            ]
        );
        assert_eq!(
            named_members(b"{}", &names(&["a"])),
            Some(Some(smallvec::smallvec![None]))
        );
        assert_eq!(named_members(b"[1]", &names(&["a"])), Some(None));
        assert_eq!(named_members(b"7", &names(&["a"])), Some(None));
    }

    #[test]
    fn whole_numbers_parse_as_serde_json_parses_them() {
        for text in ["0", "7", "10", "18446744073709551615"] {
            let n = whole_number(text.as_bytes()).map(Json::from);
            assert_eq!(n, serde_json::from_str(text).ok(), "{text}");
        }
        for text in ["", "01", "-1", "1.5", "1e3", "18446744073709551616", "12a"] {
            assert_eq!(whole_number(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn leaves_what_it_is_not_sure_of_to_serde_json() {
        for text in [
            &br#" {"a":1}"#[..],
            br#"{ "a":1}"#,
            br#"{"a" :1}"#,
            br#"{"a": {"b":1}}"#,
            br#"{"\u0061":1}"#,
            br#"{"a":1} "#,
            br#"{"a":1"#,
            br#"{"a":"1}"#,
            b"",
        ] {
            assert_eq!(
                named_members(text, &names(&["a"])),
                None,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    fn json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Json::from),
            "[a-c\"\\\\/\n\u{1}é ]{0,12}".prop_map(Json::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::from),
                prop::collection::btree_map("[a-c\"\\\\é]{0,3}", inner, 0..5)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// On stored (canonical) text the reader is always sure, and reads
        /// what serde_json reads; on any text, when it is sure, it agrees.
        #[test]
        fn agrees_with_serde_json(
            v in json(),
            wanted in prop::collection::vec("[a-c\"\\\\é]{0,3}", 0..4),
            pad in any::<bool>(),
        ) {
            let names: Vec<(String, Pattern)> =
                wanted.into_iter().map(|n| (n, Pattern::Any)).collect();
            let stored = Value::from_json(&v);
            let text = stored.as_bytes();
            let fast = named_members(text, &names);
            let escaped_names = text.windows(2).any(|w| w == b"\\\"" || w == b"\\\\");
            if !escaped_names {
                prop_assert!(fast.is_some(), "unsure of {}", String::from_utf8_lossy(text));
            }
            if let Some(fast) = fast {
                prop_assert_eq!(fast, slow(text, &names));
            }
            let pretty = if pad {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            };
            if let Some(fast) = named_members(&pretty, &names) {
                prop_assert_eq!(fast, slow(&pretty, &names));
            }
        }
    }
}
