//! Running a match specification against one object: the pattern binds
//! variables, the guard decides, the template builds the result. A guard
//! that cannot be evaluated (a type error, a missing member, an overflow)
//! makes the object not match, as in ETS.
//!
//! Over 600 lines, 170 of them tests: the evaluator is one recursive
//! match over the guard language, clearer whole than split by operator.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::cmp::Ordering;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Number, Value as Json};
use smallvec::SmallVec;

use super::members::{named_members, Found};
use super::spec::{Guard, MatchSpec, Op, Pattern, Template};

/// A specification's variables, bound or not, by slot: inline up to
/// eight, so matching an object allocates nothing for them.
type Binds<'a> = SmallVec<[Option<&'a Json>; 8]>;

/// One object, `{"key": k, "value": v}`, as the specification sees it.
/// The value arrives as its stored JSON text and is parsed only when the
/// pattern, guard or template looks into it.
pub struct Object<'a> {
    raw_key: &'a str,
    raw_value: &'a [u8],
    key: OnceCell<Json>,
    value: OnceCell<Json>,
    /// The value's members that an object pattern on it names, by the
    /// pattern's order (`None` when the value is not an object); see
    /// [`Object::value_members`].
    members: OnceCell<Option<Found>>,
    /// The whole object, built only when a pattern or template takes it as
    /// one value.
    whole: OnceCell<Json>,
}

impl<'a> Object<'a> {
    /// The object under `key` whose value is the JSON text `value`.
    pub fn new(key: &'a str, value: &'a [u8]) -> Self {
        Object {
            raw_key: key,
            raw_value: value,
            key: OnceCell::new(),
            value: OnceCell::new(),
            members: OnceCell::new(),
            whole: OnceCell::new(),
        }
    }

    fn key(&self) -> &Json {
        self.key
            .get_or_init(|| Json::String(self.raw_key.to_owned()))
    }

    fn value(&self) -> &Json {
        // Stored values are valid JSON; null stands in should one not be.
        self.value
            .get_or_init(|| serde_json::from_slice(self.raw_value).unwrap_or(Json::Null))
    }

    /// The value as the object pattern `members` sees it: the member
    /// each of its entries names (`None` where the value has none), the
    /// other members skipped unparsed; `None` when the value is not an
    /// object. An object pattern looks up only its own names, so this
    /// decides its match exactly as the whole value would, and for a
    /// 100-byte value it is several times cheaper than building all of it.
    /// Call it with one pattern per object (a specification has one).
    fn value_members(&self, members: &[(String, Pattern)]) -> Option<&[Option<Json>]> {
        self.members
            .get_or_init(|| {
                named_members(self.raw_value, members).unwrap_or_else(|| {
                    let mut de = serde_json::Deserializer::from_slice(self.raw_value);
                    Named(members).deserialize(&mut de).ok()
                })
            })
            .as_deref()
    }

    fn whole(&self) -> &Json {
        self.whole.get_or_init(|| {
            let mut m = Map::new();
            m.insert("key".into(), self.key().clone());
            m.insert("value".into(), self.value().clone());
            Json::Object(m)
        })
    }

    /// Appends `{"key":…,"value":…}` as JSON text, the value copied as
    /// stored.
    fn whole_text(&self, out: &mut Vec<u8>) {
        out.reserve(self.raw_key.len() + self.raw_value.len() + 24);
        out.extend_from_slice(b"{\"key\":");
        crate::store::push_json_str(out, self.raw_key);
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(self.raw_value);
        out.push(b'}');
    }
}

/// What running a specification on one object gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Yielded {
    /// The object does not match; nothing was appended.
    NoMatch,
    /// The object's result was appended.
    Result,
    /// The object matches, but its result would take `out` past the limit;
    /// nothing was appended.
    TooLarge,
}

impl MatchSpec {
    /// Appends what `object` yields, as JSON text, to `out`, unless that
    /// would make `out` longer than `limit` bytes. The result is written as
    /// it is built and abandoned as soon as it crosses the limit, so a
    /// template that repeats a large binding costs at most `limit` bytes.
    pub fn run(&self, object: &Object<'_>, out: &mut Vec<u8>, limit: usize) -> Yielded {
        let Some(binds) = self.accept(object) else {
            return Yielded::NoMatch;
        };
        let mark = out.len();
        if self.write(&self.ret, &binds, object, out, limit) && out.len() <= limit {
            Yielded::Result
        } else {
            out.truncate(mark);
            Yielded::TooLarge
        }
    }

    /// Whether `object` matches (for counting and deleting).
    pub fn matches(&self, object: &Object<'_>) -> bool {
        self.accept(object).is_some()
    }

    /// The bindings when the pattern matches and the guard is true.
    fn accept<'o>(&self, object: &'o Object<'_>) -> Option<Binds<'o>> {
        let mut binds: Binds<'o> = smallvec::smallvec![None; self.names.len()];
        let matched = match &self.pattern {
            Pattern::Any => true,
            Pattern::Object(members) => members.iter().all(|(name, p)| match (name.as_str(), p) {
                ("key", _) => bind(p, object.key(), &mut binds),
                ("value", Pattern::Object(wanted)) => {
                    object.value_members(wanted).is_some_and(|found| {
                        bind_members(wanted, found.iter().map(Option::as_ref), &mut binds)
                    })
                }
                ("value", _) => bind(p, object.value(), &mut binds),
                _ => false,
            }),
            // The object is never an array.
            Pattern::Array(_) => false,
            p => bind(p, object.whole(), &mut binds),
        };
        if !matched {
            return None;
        }
        let guard_holds = self
            .guard
            .as_ref()
            .is_none_or(|g| matches!(eval(g, &binds), Ok(v) if *v == Json::Bool(true)));
        guard_holds.then_some(binds)
    }

    /// Writes template `t` as JSON text: the text serde_json would print
    /// for the tree the template stands for (member names come sorted, as
    /// from the map they were parsed from). False as soon as `out` is past
    /// `limit`, leaving the rest unwritten.
    fn write(
        &self,
        t: &Template,
        binds: &[Option<&Json>],
        object: &Object<'_>,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> bool {
        // Writing JSON into a Vec cannot fail.
        let json = |out: &mut Vec<u8>, v: &Json| {
            let _ = serde_json::to_writer(&mut *out, v);
        };
        match t {
            Template::Object => object.whole_text(out),
            Template::Bindings => {
                let mut m = Map::new();
                for (name, v) in self.names.iter().zip(binds) {
                    m.insert(name.clone(), v.cloned().unwrap_or(Json::Null));
                }
                json(out, &Json::Object(m));
            }
            Template::Var(n) => json(out, binds[*n].unwrap_or(&Json::Null)),
            Template::Const(c) => json(out, c),
            Template::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    if !self.write(item, binds, object, out, limit) {
                        return false;
                    }
                }
                out.push(b']');
            }
            Template::Map(members) => {
                out.push(b'{');
                for (i, (name, item)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    crate::store::push_json_str(out, name);
                    out.push(b':');
                    if !self.write(item, binds, object, out, limit) {
                        return false;
                    }
                }
                out.push(b'}');
            }
        }
        out.len() <= limit
    }
}

/// Reads a JSON object into the members of it that `.0` names, by the
/// order of `.0`, skipping every other member without building it. Any
/// other value is an error (from `deserialize_map`).
pub(super) struct Named<'p>(pub(super) &'p [(String, Pattern)]);

impl<'de> DeserializeSeed<'de> for Named<'_> {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Named<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Found = smallvec::smallvec![None; self.0.len()];
        while let Some(at) = map.next_key_seed(Wanted(self.0))? {
            match at {
                // A repeated name keeps its last value, as a parse would.
                Some(at) => found[at] = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// Reads a member name: where the pattern names it, or `None` (with no
/// allocation either way).
struct Wanted<'p>(&'p [(String, Pattern)]);

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Wanted<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|(wanted, _)| wanted == name))
    }
}

/// Matches an object pattern's `members` against `found`, the value of
/// each named member by the same order (`None` where there is none): every
/// member must be there and match. An object pattern looks only at the
/// members it names.
fn bind_members<'a>(
    members: &[(String, Pattern)],
    found: impl Iterator<Item = Option<&'a Json>>,
    binds: &mut [Option<&'a Json>],
) -> bool {
    members
        .iter()
        .zip(found)
        .all(|((_, sub), v)| v.is_some_and(|v| bind(sub, v, binds)))
}

/// Matches `p` against `v`, binding variables; exact (`=:=`) equality.
fn bind<'a>(p: &Pattern, v: &'a Json, binds: &mut [Option<&'a Json>]) -> bool {
    match p {
        Pattern::Any => true,
        Pattern::Var(n) => match binds[*n] {
            Some(bound) => bound == v,
            None => {
                binds[*n] = Some(v);
                true
            }
        },
        Pattern::Literal(l) => l == v,
        Pattern::Object(members) => {
            let Json::Object(m) = v else {
                return false;
            };
            bind_members(members, members.iter().map(|(name, _)| m.get(name)), binds)
        }
        Pattern::Array(items) => {
            let Json::Array(a) = v else {
                return false;
            };
            a.len() == items.len()
                && items
                    .iter()
                    .zip(a)
                    .all(|(sub, inner)| bind(sub, inner, binds))
        }
    }
}

/// Why a guard could not be evaluated; the object then does not match.
#[derive(Debug)]
struct Fails;

type Eval<'a> = Result<Cow<'a, Json>, Fails>;

fn eval<'a>(g: &'a Guard, binds: &[Option<&'a Json>]) -> Eval<'a> {
    match g {
        Guard::Var(n) => binds[*n].map(Cow::Borrowed).ok_or(Fails),
        Guard::Const(c) => Ok(Cow::Borrowed(c)),
        Guard::Op(op, args) => apply(*op, args, binds),
    }
}

fn boolean(v: &Json) -> Result<bool, Fails> {
    v.as_bool().ok_or(Fails)
}

fn yes(b: bool) -> Eval<'static> {
    Ok(Cow::Owned(Json::Bool(b)))
}

fn apply<'a>(op: Op, args: &'a [Guard], binds: &[Option<&'a Json>]) -> Eval<'a> {
    use Op::*;
    let arg = |i: usize| eval(&args[i], binds);
    match op {
        And | Or => {
            let mut all = true;
            let mut any = false;
            for a in args {
                let b = boolean(&*eval(a, binds)?)?;
                all &= b;
                any |= b;
            }
            yes(if op == And { all } else { any })
        }
        AndAlso | OrElse => {
            let stop_at = op == OrElse;
            for a in args {
                if boolean(&*eval(a, binds)?)? == stop_at {
                    return yes(stop_at);
                }
            }
            yes(!stop_at)
        }
        Not => yes(!boolean(&*arg(0)?)?),
        Eq => yes(compare(&*arg(0)?, &*arg(1)?) == Ordering::Equal),
        Ne => yes(compare(&*arg(0)?, &*arg(1)?) != Ordering::Equal),
        Lt => yes(compare(&*arg(0)?, &*arg(1)?) == Ordering::Less),
        Le => yes(compare(&*arg(0)?, &*arg(1)?) != Ordering::Greater),
        Gt => yes(compare(&*arg(0)?, &*arg(1)?) == Ordering::Greater),
        Ge => yes(compare(&*arg(0)?, &*arg(1)?) != Ordering::Less),
        Add | Sub | Mul | Div | Rem => arith(op, &*arg(0)?, &*arg(1)?).map(Cow::Owned),
        Size => {
            let n = match &*arg(0)? {
                Json::String(s) => s.len(),
                Json::Array(a) => a.len(),
                Json::Object(m) => m.len(),
                _ => return Err(Fails),
            };
            Ok(Cow::Owned(Json::from(n as u64)))
        }
        Get => {
            let container = arg(0)?;
            let at = arg(1)?;
            let found = match (&*container, &*at) {
                (Json::Object(m), Json::String(name)) => m.get(name),
                (Json::Array(a), Json::Number(i)) => i
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| a.get(i)),
                _ => None,
            };
            let found = found.ok_or(Fails)?.clone();
            Ok(Cow::Owned(found))
        }
        IsNull => yes(arg(0)?.is_null()),
        IsBoolean => yes(arg(0)?.is_boolean()),
        IsNumber => yes(arg(0)?.is_number()),
        IsInteger => yes(matches!(&*arg(0)?, Json::Number(n) if !n.is_f64())),
        IsString => yes(arg(0)?.is_string()),
        IsArray => yes(arg(0)?.is_array()),
        IsObject => yes(arg(0)?.is_object()),
    }
}

/// A number as guards compute with it.
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

fn num(v: &Json) -> Result<Num, Fails> {
    let Json::Number(n) = v else {
        return Err(Fails);
    };
    if let Some(i) = n.as_i64() {
        Ok(Num::Int(i))
    } else {
        n.as_f64().map(Num::Float).ok_or(Fails)
    }
}

fn float(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f) => f,
    }
}

fn arith(op: Op, a: &Json, b: &Json) -> Result<Json, Fails> {
    let (a, b) = (num(a)?, num(b)?);
    if let (Num::Int(x), Num::Int(y)) = (a, b) {
        let r = match op {
            Op::Add => x.checked_add(y),
            Op::Sub => x.checked_sub(y),
            Op::Mul => x.checked_mul(y),
            // Truncating toward zero, as Erlang's div and rem.
            Op::Div => x.checked_div(y),
            _ => x.checked_rem(y),
        };
        return r.map(Json::from).ok_or(Fails);
    }
    let (x, y) = (float(a), float(b));
    let r = match op {
        Op::Add => x + y,
        Op::Sub => x - y,
        Op::Mul => x * y,
        // div and rem are for integers only.
        _ => return Err(Fails),
    };
    Number::from_f64(r).map(Json::Number).ok_or(Fails)
}

fn rank(v: &Json) -> u8 {
    match v {
        Json::Null => 0,
        Json::Bool(false) => 1,
        Json::Bool(true) => 2,
        Json::Number(_) => 3,
        Json::String(_) => 4,
        Json::Array(_) => 5,
        Json::Object(_) => 6,
    }
}

fn compare_numbers(a: &Number, b: &Number) -> Ordering {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x.cmp(&y),
        (_, _, Some(x), Some(y)) => x.cmp(&y),
        // One is a u64 above i64::MAX and the other a negative i64.
        (Some(_), None, _, Some(_)) => Ordering::Less,
        (None, Some(_), Some(_), _) => Ordering::Greater,
        _ => {
            let (x, y) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
    }
}

/// The one total order of JSON values: null < false < true < numbers <
/// strings < arrays < objects. Numbers compare by value (so 1 and 1.0 are
/// equal here), strings bytewise, arrays element by element with a proper
/// prefix first, objects by size, then by their sorted member names, then
/// by the values in name order (as Erlang compares maps).
pub fn compare(a: &Json, b: &Json) -> Ordering {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => compare_numbers(x, y),
        (Json::String(x), Json::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Json::Array(x), Json::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let c = compare(p, q);
                if c != Ordering::Equal {
                    return c;
                }
            }
            x.len().cmp(&y.len())
        }
        (Json::Object(x), Json::Object(y)) => {
            let by_size = x.len().cmp(&y.len());
            if by_size != Ordering::Equal {
                return by_size;
            }
            let mut xs: Vec<(&String, &Json)> = x.iter().collect();
            let mut ys: Vec<(&String, &Json)> = y.iter().collect();
            xs.sort_by(|p, q| p.0.as_bytes().cmp(q.0.as_bytes()));
            ys.sort_by(|p, q| p.0.as_bytes().cmp(q.0.as_bytes()));
            for (p, q) in xs.iter().zip(&ys) {
                let c = p.0.as_bytes().cmp(q.0.as_bytes());
                if c != Ordering::Equal {
                    return c;
                }
            }
            for (p, q) in xs.iter().zip(&ys) {
                let c = compare(p.1, q.1);
                if c != Ordering::Equal {
                    return c;
                }
            }
            Ordering::Equal
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(m: Json, w: Option<Json>, r: Option<Json>) -> MatchSpec {
        MatchSpec::parse(Some(&m), w.as_ref(), r.as_ref()).expect("valid spec")
    }

    fn run(s: &MatchSpec, key: &str, value: Json) -> Option<Json> {
        let text = serde_json::to_vec(&value).unwrap();
        let mut out = Vec::new();
        let got = s.run(&Object::new(key, &text), &mut out, usize::MAX) == Yielded::Result;
        assert_eq!(got, s.matches(&Object::new(key, &text)));
        assert_eq!(got, !out.is_empty());
        got.then(|| serde_json::from_slice(&out).expect("results are JSON"))
    }

    #[test]
    fn a_result_past_the_limit_is_abandoned_as_it_grows() {
        let s = spec(
            json!({"value": "$v"}),
            None,
            Some(json!({"a": ["$_", "$_", "$_", "$v"], "b": 1})),
        );
        let value = json!({"x": "y".repeat(1000)});
        let text = serde_json::to_vec(&value).unwrap();
        let object = Object::new("k", &text);
        let mut out = b"[prefix]".to_vec();
        assert_eq!(s.run(&object, &mut out, 2000), Yielded::TooLarge);
        assert_eq!(out, b"[prefix]", "nothing appended");
        assert_eq!(s.run(&object, &mut out, 10_000), Yielded::Result);
        let written: Json = serde_json::from_slice(&out[8..]).unwrap();
        let whole = json!({"key": "k", "value": value});
        assert_eq!(
            written,
            json!({"a": [whole, whole, whole, value], "b": 1}),
            "the same text a tree would print"
        );
        let mut out = Vec::new();
        assert_eq!(
            s.run(&Object::new("k", b"1"), &mut out, 10),
            Yielded::TooLarge
        );
    }

    #[test]
    fn patterns_bind_and_compare_exactly() {
        let s = spec(
            json!({"key": "$k", "value": {"status": "active", "age": "$a"}}),
            Some(json!(["and", [">=", "$a", 18], ["is_integer", "$a"]])),
            Some(json!({"user": "$k", "age": "$a"})),
        );
        assert_eq!(
            run(&s, "u1", json!({"status": "active", "age": 20, "x": 1})),
            Some(json!({"user": "u1", "age": 20}))
        );
        assert_eq!(run(&s, "u2", json!({"status": "active", "age": 17})), None);
        assert_eq!(
            run(&s, "u3", json!({"status": "active", "age": 20.0})),
            None
        );
        assert_eq!(run(&s, "u4", json!({"status": "gone", "age": 30})), None);
        assert_eq!(run(&s, "u5", json!({"status": "active"})), None);
        let twice = spec(json!({"value": ["$x", "$x"]}), None, None);
        assert!(run(&twice, "a", json!([1, 1])).is_some());
        assert!(
            run(&twice, "a", json!([1, 1.0])).is_none(),
            "=:= in patterns"
        );
        assert!(run(&twice, "a", json!([1, 1, 1])).is_none());
        let lit = spec(json!({"value": {"$const": "$x"}}), None, None);
        assert!(run(&lit, "a", json!("$x")).is_some());
        let whole = spec(json!("$o"), None, Some(json!("$$")));
        assert_eq!(
            run(&whole, "a", json!(1)),
            Some(json!({"o": {"key": "a", "value": 1}}))
        );
        assert_eq!(
            run(&spec(json!("_"), None, None), "a", json!(1)),
            Some(json!({"key": "a", "value": 1}))
        );
        assert!(run(&spec(json!({"other": 1}), None, None), "a", json!(1)).is_none());
    }

    #[test]
    fn object_patterns_on_values_read_only_what_they_name() {
        let s = spec(
            json!({"value": {"a": "$a", "b\"q": {"c": "$c"}}}),
            None,
            Some(json!(["$a", "$c", "$_"])),
        );
        let value = json!({"z": [1, {"a": 9}], "a": {"deep": [true]}, "b\"q": {"c": null, "d": 2}});
        assert_eq!(
            run(&s, "k", value.clone()),
            Some(json!([{"deep": [true]}, null, {"key": "k", "value": value}]))
        );
        // Not objects, or without a named member: no match.
        for other in [json!([1]), json!("a"), json!(1), json!(null), json!(true)] {
            assert!(run(&s, "k", other).is_none());
        }
        assert!(run(&s, "k", json!({"a": 1, "b\"q": {"d": 1}})).is_none());
        assert!(run(&s, "k", json!({"a": 1, "b\"q": [1]})).is_none());
        // An empty object pattern takes any object.
        let any = spec(json!({"value": {}}), None, None);
        assert!(run(&any, "k", json!({"x": 1})).is_some());
        assert!(run(&any, "k", json!([])).is_none());
    }

    #[test]
    fn guards_that_fail_to_evaluate_do_not_match() {
        let with = |g: Json| spec(json!({"value": "$v"}), Some(g), None);
        let v = json!({"n": 7, "s": "héllo", "a": [1, 2, 3]});
        let yes = |g: Json| run(&with(g), "k", v.clone()).is_some();
        assert!(yes(json!(["==", ["get", "$v", "n"], 7.0])), "== by value");
        assert!(!yes(json!(["==", ["get", "$v", "missing"], 7])));
        assert!(yes(json!(["==", ["size", ["get", "$v", "s"]], 6])), "bytes");
        assert!(yes(json!(["==", ["get", ["get", "$v", "a"], 2], 3])));
        assert!(!yes(json!([">", ["div", ["get", "$v", "n"], 0], 0])));
        assert!(yes(json!(["==", ["div", -7, 2], -3])), "toward zero");
        assert!(yes(json!(["==", ["rem", -7, 2], -1])));
        assert!(!yes(json!(["==", ["div", 7.0, 2], 3])));
        assert!(!yes(json!(["==", ["+", 9223372036854775807i64, 1], 0])));
        assert!(yes(json!(["==", ["+", 1, 0.5], 1.5])));
        // Strict and/or fail on a failing argument; andalso/orelse stop.
        assert!(!yes(json!(["or", true, ["get", "$v", "missing"]])));
        assert!(yes(json!(["orelse", true, ["get", "$v", "missing"]])));
        assert!(!yes(json!(["andalso", false, ["get", "$v", "missing"]])));
        assert!(!yes(json!(["and", true, 1])));
        assert!(!yes(json!(["get", "$v", "n"])), "a guard must be true");
        assert!(yes(json!(["is_integer", 2])));
        assert!(!yes(json!(["is_integer", 2.0])));
        assert!(yes(json!(["not", ["is_null", "$v"]])));
    }

    #[test]
    fn the_total_order() {
        let ordered = [
            json!(null),
            json!(false),
            json!(true),
            json!(-1),
            json!(0.5),
            json!(1),
            json!(18446744073709551615u64),
            json!(""),
            json!("a"),
            json!("b"),
            json!([]),
            json!([1]),
            json!([1, 2]),
            json!([2]),
            json!({}),
            json!({"b": 0}),
            json!({"a": 1, "b": 0}),
            json!({"a": 2, "b": 0}),
            json!({"a": 0, "c": 0}),
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
        assert_eq!(compare(&json!(1), &json!(1.0)), Ordering::Equal);
        assert_eq!(compare(&json!([1]), &json!([1.0])), Ordering::Equal);
    }
}
