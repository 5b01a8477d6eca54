//! Recognizes JSON text that is already canonical, so that storing it needs
//! no parse into a tree and no print back.
//!
//! Canonical text is what serde_json prints for the value it parses: no
//! whitespace, object members in byte order of their names, strings with
//! only the escapes it writes, numbers as it formats them. Most values a
//! client sends (a string, an integer, a small object with sorted members)
//! are canonical as sent, and building a `serde_json::Value` for them and
//! printing it again costs more than the rest of a write.
//!
//! The check is conservative: `true` means serde_json would parse the text
//! and print it back unchanged; `false` means only "not shown to be", and
//! the caller takes the full path, which also gives the error for text that
//! is not JSON. So anything rare or subtle (an escape in a string, a
//! fraction or exponent, `-0`, nesting near serde_json's depth limit)
//! answers `false` rather than being reasoned about here.

/// Deepest nesting accepted here; serde_json's own limit is 127 levels.
const MAX_DEPTH: usize = 100;

/// Whether serde_json would parse `text` into a value that it prints as
/// exactly `text`.
pub(super) fn is_canonical(text: &[u8]) -> bool {
    let mut scan = Scan { text, at: 0 };
    scan.value(0) && scan.at == text.len()
}

/// A position in the text being checked.
struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    /// Consumes `byte` if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        self.at += usize::from(next);
        next
    }

    fn value(&mut self, depth: usize) -> bool {
        match self.peek() {
            Some(b'"') => self.string().is_some(),
            Some(b'{') => depth < MAX_DEPTH && self.object(depth + 1),
            Some(b'[') => depth < MAX_DEPTH && self.array(depth + 1),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            _ => false,
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let found = self.text[self.at..].starts_with(word);
        if found {
            self.at += word.len();
        }
        found
    }

    /// A string without escapes, returning its contents (which are then
    /// also its value, byte for byte).
    fn string(&mut self) -> Option<&'a [u8]> {
        let rest = &self.text[self.at + 1..];
        let len = string_end(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        let contents = &rest[..len];
        std::str::from_utf8(contents).ok()?;
        self.at += len + 2;
        Some(contents)
    }

    /// An integer that serde_json keeps as an `i64` or `u64` (and so prints
    /// as written): no fraction or exponent, no `-0`, not past those types.
    fn integer(&mut self) -> bool {
        let negative = self.eat(b'-');
        let digits_at = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let Some(magnitude) = whole_number(&self.text[digits_at..self.at]) else {
            return false;
        };
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return false;
        }
        !negative || (1..=i64::MAX as u64).contains(&magnitude)
    }

    fn array(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b']') {
            return true;
        }
        loop {
            if !self.value(depth) {
                return false;
            }
            if self.eat(b']') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }

    /// An object whose member names are in strictly increasing byte order:
    /// serde_json sorts them and keeps the last of equal names.
    fn object(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b'}') {
            return true;
        }
        let mut previous: Option<&[u8]> = None;
        loop {
            if self.peek() != Some(b'"') {
                return false;
            }
            let Some(name) = self.string() else {
                return false;
            };
            if previous.is_some_and(|p| p >= name) {
                return false;
            }
            previous = Some(name);
            if !self.eat(b':') || !self.value(depth) {
                return false;
            }
            if self.eat(b'}') {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
        }
    }
}

/// `text` as a number when it is a non-negative integer written as
/// serde_json writes one (digits only, no leading zero) that fits a `u64`.
pub(crate) fn whole_number(text: &[u8]) -> Option<u64> {
    let digits = !text.is_empty() && text.iter().all(u8::is_ascii_digit);
    let leading_zero = text.len() > 1 && text[0] == b'0';
    if !digits || leading_zero {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Appends `s` as a JSON string. Most keys need no escapes, and then the
/// text is copied as it is, checked eight bytes at a time, where
/// serde_json's writer looks up every byte in its escape table.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if string_end(s.as_bytes()).is_none() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Where the first `"`, `\\` or control byte of `bytes` is: eight bytes
/// at a time while none of them is one, since values are mostly strings.
pub(crate) fn string_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero when some byte of `word` is below `n` (for n <= 0x80).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let stops = |b: u8| b == b'"' || b == b'\\' || b < 0x20;
    let mut clear = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        let found = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if found != 0 {
            break;
        }
        clear += 8;
    }
    bytes[clear..]
        .iter()
        .position(|&b| stops(b))
        .map(|at| clear + at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What the full path stores for `text`: serde_json's print of its parse.
    fn printed(text: &[u8]) -> Option<Vec<u8>> {
        let v: serde_json::Value = serde_json::from_slice(text).ok()?;
        serde_json::to_vec(&v).ok()
    }

    fn agrees(text: &[u8]) {
        if is_canonical(text) {
            assert_eq!(
                printed(text).as_deref(),
                Some(text),
                "{:?} taken as canonical",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn common_values_are_recognized() {
        for text in [
            r#""vvvv""#,
            "12",
            "-7",
            "0",
            "true",
            "null",
            "[]",
            "{}",
            r#"{"a":1,"b":[true,false,null],"c":{"d":"é"}}"#,
            "18446744073709551615",
            "-9223372036854775807",
        ] {
            assert!(is_canonical(text.as_bytes()), "{text}");
            agrees(text.as_bytes());
        }
    }

    #[test]
    fn anything_serde_json_would_change_or_refuse_is_not() {
        for text in [
            "",
            " 1",
            "1 ",
            r#"{"b":1,"a":2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a": 1}"#,
            "[1, 2]",
            r#""a\/b""#,
            r#""\u0041""#,
            "1.0",
            "1e3",
            "-0",
            "01",
            "-",
            "18446744073709551616",
            "-9223372036854775809",
            "[1,]",
            "{\"a\":1,}",
            "[1]x",
            "tru",
            "\"\x01\"",
            "\"\u{7f}\"",
        ] {
            agrees(text.as_bytes());
        }
        for text in ["[1]x", r#"{"b":1,"a":2}"#, "-0", "1.0", "01", "[1,]", "tru"] {
            assert!(!is_canonical(text.as_bytes()), "{text}");
        }
        assert!(!is_canonical(b"\"\xff\""));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(!is_canonical(deep.as_bytes()));
        let limit = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(is_canonical(limit.as_bytes()));
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            "[a-c\"\\\\/é\u{1}\u{7f} ]{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::vec(("[a-c\\\\é]{0,3}", inner), 0..4).prop_map(|members| {
                    serde_json::Value::Object(members.into_iter().collect())
                }),
            ]
        })
    }

    /// Reorders members and adds spaces, as a client's own printer might.
    fn reprint(v: &serde_json::Value, reverse: bool, spaced: bool) -> String {
        let sep = if spaced { ", " } else { "," };
        match v {
            serde_json::Value::Array(items) => {
                let items: Vec<String> =
                    items.iter().map(|i| reprint(i, reverse, spaced)).collect();
                format!("[{}]", items.join(sep))
            }
            serde_json::Value::Object(members) => {
                let mut members: Vec<String> = members
                    .iter()
                    .map(|(k, m)| {
                        format!(
                            "{}:{}",
                            serde_json::Value::from(k.clone()),
                            reprint(m, reverse, spaced)
                        )
                    })
                    .collect();
                if reverse {
                    members.reverse();
                }
                format!("{{{}}}", members.join(sep))
            }
            other => other.to_string(),
        }
    }

    /// Whether `v` has nothing the check leaves to the full path: no float,
    /// no string that prints with an escape, no `i64::MIN`.
    fn plain(v: &serde_json::Value) -> bool {
        let plain_str = |s: &str| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
        match v {
            serde_json::Value::Number(n) => !n.is_f64() && n.as_i64() != Some(i64::MIN),
            serde_json::Value::String(s) => plain_str(s),
            serde_json::Value::Array(items) => items.iter().all(plain),
            serde_json::Value::Object(members) => {
                members.iter().all(|(k, m)| plain_str(k) && plain(m))
            }
            serde_json::Value::Null | serde_json::Value::Bool(_) => true,
        }
    }

    proptest! {
        #[test]
        fn json_strings_are_written_as_serde_json_writes_them(s in "[a-z\"\\\\\n\u{1}\u{7f}é😀 ]{0,40}") {
            let mut out = Vec::new();
            push_json_str(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }

        #[test]
        fn string_end_finds_the_first_stop(bytes in prop::collection::vec(prop_oneof![1 => Just(b'"'), 1 => Just(b'\\'), 1 => 0u8..0x20, 40 => 0x20u8..=0xff], 0..40)) {
            let expected = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            prop_assert_eq!(string_end(&bytes), expected);
        }

        #[test]
        fn canonical_means_printed_unchanged(v in json(), reverse: bool, spaced: bool) {
            let canonical = serde_json::to_vec(&v).expect("a value prints");
            agrees(&canonical);
            prop_assert_eq!(is_canonical(&canonical), plain(&v));
            agrees(reprint(&v, reverse, spaced).as_bytes());
            agrees(serde_json::to_string_pretty(&v).expect("a value prints").as_bytes());
        }

        #[test]
        fn arbitrary_bytes_are_never_taken_for_canonical_wrongly(text in prop::collection::vec(any::<u8>(), 0..24)) {
            agrees(&text);
        }

        #[test]
        fn json_like_text_is_never_taken_for_canonical_wrongly(text in "[\\[\\]{}\",:0-9a-c\\-.e ]{0,24}") {
            agrees(text.as_bytes());
        }
    }
}
