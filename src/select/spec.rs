//! Match specifications: parsed once from JSON into a form that is cheap to
//! run, with every mistake reported at the part of the document that holds
//! it (`where[1][0]: unknown operator "=>"`).

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value as Json};

/// A match specification ready to run.
#[derive(Debug, Clone)]
pub struct MatchSpec {
    /// The pattern over `{"key": k, "value": v}`.
    pub pattern: Pattern,
    /// The guard, if any.
    pub guard: Option<Guard>,
    /// What a match returns.
    pub ret: Template,
    /// Variable names in slot order (without `$`), for `$$`.
    pub names: Vec<String>,
}

/// A pattern over a JSON value.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// `_`: anything.
    Any,
    /// `$name`: binds slot `n`, or must equal what it bound.
    Var(usize),
    /// A value matched exactly.
    Literal(Json),
    /// An object with at least these members.
    Object(Vec<(String, Pattern)>),
    /// An array of exactly this length.
    Array(Vec<Pattern>),
}

/// A guard expression.
#[derive(Debug, Clone)]
pub enum Guard {
    /// A bound variable.
    Var(usize),
    /// A literal value.
    Const(Json),
    /// An operator applied to arguments.
    Op(Op, Vec<Guard>),
}

/// Guard operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `and`: every argument true (all evaluated).
    And,
    /// `or`: some argument true (all evaluated).
    Or,
    /// `andalso`: stops at the first false.
    AndAlso,
    /// `orelse`: stops at the first true.
    OrElse,
    /// `not`.
    Not,
    /// `==`: equal in the total order (1 equals 1.0).
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `div`: integer division toward zero.
    Div,
    /// `rem`: remainder with the dividend's sign.
    Rem,
    /// `size`: string bytes, array or object length.
    Size,
    /// `get`: object member by name, array element by index.
    Get,
    /// `is_null`.
    IsNull,
    /// `is_boolean`.
    IsBoolean,
    /// `is_number`.
    IsNumber,
    /// `is_integer`: a number without fraction or exponent.
    IsInteger,
    /// `is_string`.
    IsString,
    /// `is_array`.
    IsArray,
    /// `is_object`.
    IsObject,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        use Op::*;
        Some(match name {
            "and" => And,
            "or" => Or,
            "andalso" => AndAlso,
            "orelse" => OrElse,
            "not" => Not,
            "==" => Eq,
            "!=" => Ne,
            "<" => Lt,
            "<=" => Le,
            ">" => Gt,
            ">=" => Ge,
            "+" => Add,
            "-" => Sub,
            "*" => Mul,
            "div" => Div,
            "rem" => Rem,
            "size" => Size,
            "get" => Get,
            "is_null" => IsNull,
            "is_boolean" => IsBoolean,
            "is_number" => IsNumber,
            "is_integer" => IsInteger,
            "is_string" => IsString,
            "is_array" => IsArray,
            "is_object" => IsObject,
            _ => return None,
        })
    }

    /// Allowed argument counts: (least, most).
    fn arity(self) -> (usize, usize) {
        use Op::*;
        match self {
            And | Or | AndAlso | OrElse => (2, usize::MAX),
            Not | Size | IsNull | IsBoolean | IsNumber | IsInteger | IsString | IsArray
            | IsObject => (1, 1),
            _ => (2, 2),
        }
    }
}

/// What a match returns.
#[derive(Debug, Clone)]
pub enum Template {
    /// `$_`: the whole object `{"key": k, "value": v}`.
    Object,
    /// `$$`: the bound variables as an object.
    Bindings,
    /// A bound variable.
    Var(usize),
    /// A literal value.
    Const(Json),
    /// An array of templates.
    Array(Vec<Template>),
    /// An object of templates.
    Map(Vec<(String, Template)>),
}

/// A mistake in a specification, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The path of the offending part, e.g. `where[1][0]`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        path: path.to_owned(),
        message: message.into(),
    })
}

/// What a `$`-string names.
enum Dollar<'a> {
    /// Not a `$`-string: a literal.
    No,
    /// `$_`.
    Whole,
    /// `$$`.
    All,
    /// `$name`, without the `$`.
    Var(&'a str),
}

fn dollar<'a>(s: &'a str, path: &str) -> Result<Dollar<'a>, SpecError> {
    let Some(name) = s.strip_prefix('$') else {
        return Ok(Dollar::No);
    };
    match name {
        "_" => return Ok(Dollar::Whole),
        "$" => return Ok(Dollar::All),
        _ => {}
    }
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return err(
            path,
            format!(
                "\"{s}\" is not a variable (a variable is $ and 1 to 64 of A-Z a-z 0-9 _; \
                 write {{\"$const\": \"{s}\"}} for the string)"
            ),
        );
    }
    Ok(Dollar::Var(name))
}

/// `{"$const": x}` alone: the literal `x`.
fn as_const(m: &Map<String, Json>) -> Option<&Json> {
    if m.len() == 1 {
        m.get("$const")
    } else {
        None
    }
}

fn member_path(path: &str, name: &str) -> String {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        format!("{path}.{name}")
    } else {
        format!("{path}[{}]", Json::String(name.to_owned()))
    }
}

/// Variable slots, in order of first binding.
#[derive(Default)]
struct Vars {
    slots: HashMap<String, usize>,
    names: Vec<String>,
}

impl Vars {
    fn bind(&mut self, name: &str) -> usize {
        if let Some(&n) = self.slots.get(name) {
            return n;
        }
        let n = self.names.len();
        self.slots.insert(name.to_owned(), n);
        self.names.push(name.to_owned());
        n
    }

    fn bound(&self, name: &str, path: &str) -> Result<usize, SpecError> {
        match self.slots.get(name) {
            Some(&n) => Ok(n),
            None => err(path, format!("${name} is not bound by match")),
        }
    }
}

impl MatchSpec {
    /// Parses the `match`, `where` and `return` members of a request.
    ///
    /// # Errors
    /// A [`SpecError`] naming the offending part.
    pub fn parse(
        pattern: Option<&Json>,
        guard: Option<&Json>,
        ret: Option<&Json>,
    ) -> Result<MatchSpec, SpecError> {
        let mut vars = Vars::default();
        let pattern = match pattern {
            Some(p) => parse_pattern(p, "match", &mut vars)?,
            None => Pattern::Any,
        };
        let guard = match guard {
            Some(g) => Some(parse_guard(g, "where", &vars)?),
            None => None,
        };
        let ret = match ret {
            Some(r) => parse_template(r, "return", &vars)?,
            None => Template::Object,
        };
        Ok(MatchSpec {
            pattern,
            guard,
            ret,
            names: vars.names,
        })
    }

    /// The key when the pattern allows only one (`{"key": "literal", …}`).
    pub fn literal_key(&self) -> Option<&str> {
        let Pattern::Object(members) = &self.pattern else {
            return None;
        };
        members
            .iter()
            .find_map(|(name, p)| match (name.as_str(), p) {
                ("key", Pattern::Literal(Json::String(k))) => Some(k.as_str()),
                _ => None,
            })
    }
}

fn parse_pattern(p: &Json, path: &str, vars: &mut Vars) -> Result<Pattern, SpecError> {
    Ok(match p {
        Json::String(s) if s == "_" => Pattern::Any,
        Json::String(s) => match dollar(s, path)? {
            Dollar::No => Pattern::Literal(p.clone()),
            Dollar::Var(name) => Pattern::Var(vars.bind(name)),
            Dollar::Whole | Dollar::All => {
                return err(path, format!("\"{s}\" is allowed only in return"))
            }
        },
        Json::Object(m) => match as_const(m) {
            Some(c) => Pattern::Literal(c.clone()),
            None => {
                let mut members = Vec::with_capacity(m.len());
                for (name, sub) in m {
                    let sub = parse_pattern(sub, &member_path(path, name), vars)?;
                    members.push((name.clone(), sub));
                }
                Pattern::Object(members)
            }
        },
        Json::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, sub) in items.iter().enumerate() {
                out.push(parse_pattern(sub, &format!("{path}[{i}]"), vars)?);
            }
            Pattern::Array(out)
        }
        other => Pattern::Literal(other.clone()),
    })
}

fn parse_guard(g: &Json, path: &str, vars: &Vars) -> Result<Guard, SpecError> {
    Ok(match g {
        Json::Array(items) => {
            let Some(first) = items.first() else {
                return err(
                    path,
                    "an empty array is not a guard (write {\"$const\": []})",
                );
            };
            let op_path = format!("{path}[0]");
            let Json::String(name) = first else {
                return err(
                    &op_path,
                    "a guard starts with its operator name (write {\"$const\": [...]} for an array)",
                );
            };
            let Some(op) = Op::parse(name) else {
                return err(&op_path, format!("unknown operator \"{name}\""));
            };
            let args = &items[1..];
            let (least, most) = op.arity();
            if args.len() < least || args.len() > most {
                let wanted = match (least, most) {
                    (l, usize::MAX) => format!("at least {l} arguments"),
                    (1, 1) => "1 argument".to_owned(),
                    (l, _) => format!("{l} arguments"),
                };
                return err(
                    path,
                    format!("\"{name}\" takes {wanted}, not {}", args.len()),
                );
            }
            let mut parsed = Vec::with_capacity(args.len());
            for (i, a) in args.iter().enumerate() {
                parsed.push(parse_guard(a, &format!("{path}[{}]", i + 1), vars)?);
            }
            Guard::Op(op, parsed)
        }
        Json::String(s) => match dollar(s, path)? {
            Dollar::No => Guard::Const(g.clone()),
            Dollar::Var(name) => Guard::Var(vars.bound(name, path)?),
            Dollar::Whole | Dollar::All => {
                return err(path, format!("\"{s}\" is allowed only in return"))
            }
        },
        Json::Object(m) => match as_const(m) {
            Some(c) => Guard::Const(c.clone()),
            None => return err(path, "an object in a guard must be {\"$const\": value}"),
        },
        other => Guard::Const(other.clone()),
    })
}

fn parse_template(t: &Json, path: &str, vars: &Vars) -> Result<Template, SpecError> {
    Ok(match t {
        Json::String(s) => match dollar(s, path)? {
            Dollar::No => Template::Const(t.clone()),
            Dollar::Whole => Template::Object,
            Dollar::All => Template::Bindings,
            Dollar::Var(name) => Template::Var(vars.bound(name, path)?),
        },
        Json::Object(m) => match as_const(m) {
            Some(c) => Template::Const(c.clone()),
            None => {
                let mut members = Vec::with_capacity(m.len());
                for (name, sub) in m {
                    let sub = parse_template(sub, &member_path(path, name), vars)?;
                    members.push((name.clone(), sub));
                }
                Template::Map(members)
            }
        },
        Json::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, sub) in items.iter().enumerate() {
                out.push(parse_template(sub, &format!("{path}[{i}]"), vars)?);
            }
            Template::Array(out)
        }
        other => Template::Const(other.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(m: Json, w: Option<Json>, r: Option<Json>) -> Result<MatchSpec, SpecError> {
        MatchSpec::parse(Some(&m), w.as_ref(), r.as_ref())
    }

    #[test]
    fn mistakes_name_their_place() {
        let e = parse(
            json!({"key": "$k"}),
            Some(json!(["and", ["==", "$k", 1], ["=>", "$k", 2]])),
            None,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "where[2][0]: unknown operator \"=>\"");
        let e = parse(json!({"value": {"a b": "$bad-name"}}), None, None).unwrap_err();
        assert_eq!(e.path, "match.value[\"a b\"]");
        let e = parse(json!("_"), Some(json!(["==", "$x", 1])), None).unwrap_err();
        assert_eq!(e.to_string(), "where[1]: $x is not bound by match");
        let e = parse(json!("_"), None, Some(json!({"a": ["$y"]}))).unwrap_err();
        assert_eq!(e.path, "return.a[0]");
        let e = parse(json!("$_"), None, None).unwrap_err();
        assert_eq!(e.path, "match");
        let e = parse(json!("_"), Some(json!(["not", true, false])), None).unwrap_err();
        assert_eq!(e.to_string(), "where: \"not\" takes 1 argument, not 2");
        let e = parse(json!("_"), Some(json!(["and", true])), None).unwrap_err();
        assert!(e.message.contains("at least 2"), "{e}");
        let e = parse(json!("_"), Some(json!({"a": 1})), None).unwrap_err();
        assert_eq!(e.path, "where");
        let e = parse(json!("_"), Some(json!([])), None).unwrap_err();
        assert_eq!(e.path, "where");
        let e = parse(json!("_"), Some(json!([1, 2])), None).unwrap_err();
        assert_eq!(e.path, "where[0]");
        let long = format!("${}", "a".repeat(65));
        assert!(parse(json!(long), None, None).is_err());
    }

    #[test]
    fn variables_get_slots_in_order_of_first_binding() {
        let s = parse(
            json!({"key": "$k", "value": ["$a", "$k", {"$const": "$lit"}, "_"]}),
            Some(json!(["is_integer", "$a"])),
            Some(json!(["$$", "$_", "$a"])),
        )
        .unwrap();
        assert_eq!(s.names, vec!["k", "a"]);
        assert!(matches!(s.ret, Template::Array(_)));
        assert_eq!(s.literal_key(), None);
        let s = parse(json!({"key": "user:1"}), None, None).unwrap();
        assert_eq!(s.literal_key(), Some("user:1"));
    }
}
