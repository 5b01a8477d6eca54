//! Differential test against real ETS: random selects in the subset that
//! maps directly onto Erlang match specifications (patterns on the key and
//! the value, comparisons, arithmetic, type tests and boolean guards, `$_`
//! and `$$` returns) run on larder and, translated, by `ets:select/2` in
//! one `escript` run (Debian's `erlang-base`, which `.ci/run` installs).
//! Values are integers and ASCII strings (binaries in Erlang), whose term
//! order is the contract's order.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use common::{spawn_app, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

/// A seeded xorshift generator: cases are reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One random case: a table and a select on it.
struct Case {
    kind: &'static str,
    objects: Vec<(String, Value)>,
    key_pattern: Value,
    value_pattern: Value,
    guard: Option<Value>,
    ret: &'static str,
}

fn scalar(rng: &mut Rng) -> Value {
    match rng.below(3) {
        0 => json!(*rng.pick(&["a", "b", "ab"])),
        _ => json!(rng.below(9) as i64 - 4),
    }
}

/// A guard operand: a bound variable or a literal.
fn operand(rng: &mut Rng, vars: &[&str]) -> Value {
    if !vars.is_empty() && rng.below(3) > 0 {
        json!(rng.pick(vars))
    } else {
        scalar(rng)
    }
}

fn term(rng: &mut Rng, vars: &[&str], depth: u32) -> Value {
    if depth == 0 || rng.below(3) > 0 {
        return operand(rng, vars);
    }
    let op = *rng.pick(&["+", "-", "*", "div", "rem"]);
    json!([op, term(rng, vars, depth - 1), term(rng, vars, depth - 1)])
}

fn guard(rng: &mut Rng, vars: &[&str], depth: u32) -> Value {
    if depth == 0 || rng.below(2) == 0 {
        return match rng.below(4) {
            0 => json!([*rng.pick(&["is_integer", "is_string"]), operand(rng, vars)]),
            _ => json!([
                *rng.pick(&["==", "!=", "<", "<=", ">", ">="]),
                term(rng, vars, 1),
                term(rng, vars, 1)
            ]),
        };
    }
    match rng.below(5) {
        0 => json!(["not", guard(rng, vars, depth - 1)]),
        n => {
            let op = ["and", "or", "andalso", "orelse"][(n - 1) as usize];
            let mut g = vec![json!(op)];
            for _ in 0..2 + rng.below(2) {
                g.push(guard(rng, vars, depth - 1));
            }
            json!(g)
        }
    }
}

fn case(rng: &mut Rng) -> Case {
    let kind = *rng.pick(&["set", "ordered_set", "bag", "duplicate_bag"]);
    let objects = (0..rng.below(25))
        .map(|_| (format!("k{}", rng.below(8)), scalar(rng)))
        .collect();
    let key_pattern = match rng.below(4) {
        0 => json!("_"),
        1 => json!(format!("k{}", rng.below(8))),
        _ => json!("$k"),
    };
    let value_pattern = match rng.below(5) {
        0 => json!("_"),
        1 => scalar(rng),
        2 if key_pattern == json!("$k") => json!("$k"),
        _ => json!("$v"),
    };
    let vars: Vec<&str> = [&key_pattern, &value_pattern]
        .iter()
        .filter_map(|p| p.as_str().filter(|s| s.starts_with('$')))
        .collect();
    let guard = (rng.below(4) > 0).then(|| guard(rng, &vars, 2));
    let ret = *rng.pick(&["$_", "$$"]);
    Case {
        kind,
        objects,
        key_pattern,
        value_pattern,
        guard,
        ret,
    }
}

/// Variables in the order the Erlang translation numbers them.
fn variables(c: &Case) -> Vec<String> {
    let mut vars: Vec<String> = Vec::new();
    for p in [&c.key_pattern, &c.value_pattern] {
        if let Some(v) = p.as_str().filter(|s| s.starts_with('$')) {
            if !vars.iter().any(|x| x == v) {
                vars.push(v.to_owned());
            }
        }
    }
    vars
}

/// A JSON value of the subset as an Erlang term.
fn erl(v: &Value, vars: &[String]) -> String {
    match v {
        Value::String(s) if s == "_" => "'_'".into(),
        Value::String(s) if s.starts_with('$') => {
            let n = vars.iter().position(|x| x == s).expect("a bound variable") + 1;
            format!("'${n}'")
        }
        Value::String(s) => format!("<<\"{s}\">>"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => {
            // Operators as quoted atoms: `and`, `div` and friends are
            // reserved words.
            let op = match items[0].as_str().expect("an operator") {
                "!=" => "/=",
                "<=" => "=<",
                "is_string" => "is_binary",
                other => other,
            };
            let op = format!("'{op}'");
            let args: Vec<String> = items[1..].iter().map(|a| erl(a, vars)).collect();
            format!("{{{op}, {}}}", args.join(", "))
        }
        other => panic!("outside the subset: {other}"),
    }
}

/// A result as a line both sides can print.
fn line(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("i:{n}"),
        Value::String(s) => format!("s:{s}"),
        other => panic!("outside the subset: {other}"),
    }
}

fn escript() -> Option<String> {
    let found = Command::new("escript")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stderr.is_empty() || !o.stdout.is_empty());
    if found {
        return Some("escript".into());
    }
    assert!(
        std::env::var_os("LARDER_TEST_REQUIRE_ERLANG").is_none(),
        "LARDER_TEST_REQUIRE_ERLANG is set but escript was not found"
    );
    eprintln!("SKIPPED: no escript (install Debian's erlang-base)");
    None
}

const SCRIPT: &str = r#"#!/usr/bin/env escript
-mode(compile).
main([File]) ->
    {ok, Cases} = file:consult(File),
    lists:foreach(fun run/1, Cases).

run({N, Type, Objects, Spec}) ->
    T = ets:new(t, [Type]),
    true = ets:insert(T, Objects),
    lists:foreach(fun(R) -> io:format("~b\t~s~n", [N, fmt(R)]) end, ets:select(T, Spec)),
    ets:delete(T).

fmt({K, V}) -> [fmt(K), "\t", fmt(V)];
fmt(L) when is_list(L) -> lists:join("\t", [fmt(X) || X <- L]);
fmt(I) when is_integer(I) -> ["i:", integer_to_list(I)];
fmt(B) when is_binary(B) -> ["s:", binary_to_list(B)].
"#;

async fn larder_lines(app: &TestApp, n: usize, c: &Case) -> Vec<String> {
    let table = format!("e{n}");
    app.table(&table, c.kind).await;
    app.bulk(&table, &c.objects).await;
    let mut spec = json!({
        "match": {"key": c.key_pattern, "value": c.value_pattern},
        "return": c.ret,
        "limit": 10000
    });
    if let Some(g) = &c.guard {
        spec["where"] = g.clone();
    }
    let r = app
        .send(
            Method::POST,
            &format!("/v1/tables/{table}/select"),
            Some(spec.to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{spec}: {}", r.text);
    let vars = variables(c);
    r.body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|res| match c.ret {
            "$_" => format!("{}\t{}", line(&res["key"]), line(&res["value"])),
            _ => vars
                .iter()
                .map(|v| line(&res[&v[1..]]))
                .collect::<Vec<_>>()
                .join("\t"),
        })
        .collect()
}

#[tokio::test]
async fn selects_agree_with_ets() {
    let Some(escript) = escript() else {
        return;
    };
    let seed = std::env::var("ETS_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0005_eed0_fe75_u64);
    eprintln!("seed {seed} (ETS_DIFF_SEED={seed} replays it)");
    let mut rng = Rng(seed | 1);
    let cases: Vec<Case> = (0..400).map(|_| case(&mut rng)).collect();
    let app = spawn_app().await;

    let mut terms = String::new();
    let mut ours: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (n, c) in cases.iter().enumerate() {
        ours.insert(n, larder_lines(&app, n, c).await);
        let vars = variables(c);
        let objects: Vec<String> = c
            .objects
            .iter()
            .map(|(k, v)| format!("{{<<\"{k}\">>, {}}}", erl(v, &vars)))
            .collect();
        let guards = c.guard.as_ref().map(|g| erl(g, &vars)).unwrap_or_default();
        let head = format!(
            "{{{}, {}}}",
            erl(&c.key_pattern, &vars),
            erl(&c.value_pattern, &vars)
        );
        let ret = if c.ret == "$_" { "'$_'" } else { "'$$'" };
        writeln!(
            terms,
            "{{{n}, {}, [{}], [{{{head}, [{guards}], [{ret}]}}]}}.",
            c.kind,
            objects.join(", ")
        )
        .expect("write");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("select.escript");
    let input = dir.path().join("cases.terms");
    std::fs::write(&script, SCRIPT).expect("script");
    std::fs::write(&input, &terms).expect("cases");
    let out = Command::new(escript)
        .arg(&script)
        .arg(&input)
        .output()
        .expect("escript runs");
    assert!(
        out.status.success(),
        "escript failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut theirs: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let (n, rest) = l.split_once('\t').expect("numbered line");
        theirs
            .entry(n.parse().expect("case number"))
            .or_default()
            .push(rest.to_owned());
    }
    let mut matched_some = 0;
    for (n, c) in cases.iter().enumerate() {
        let mut mine = ours.remove(&n).unwrap_or_default();
        let mut ets = theirs.remove(&n).unwrap_or_default();
        if c.kind != "ordered_set" {
            // Hashed tables promise no order, on either side.
            mine.sort();
            ets.sort();
        }
        assert_eq!(
            mine, ets,
            "case {n} on a {}: match {{{}, {}}} where {:?} return {}",
            c.kind, c.key_pattern, c.value_pattern, c.guard, c.ret
        );
        if !mine.is_empty() && mine.len() < c.objects.len() {
            matched_some += 1;
        }
    }
    assert!(
        matched_some >= 40,
        "only {matched_some} of 400 cases selected part of their table"
    );
}
