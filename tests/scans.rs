//! Scans over real HTTP: ordered ranges and the cursor guarantee.

mod common;

use std::collections::BTreeMap;

use serde_json::json;

fn keys(r: &common::Reply) -> Vec<String> {
    r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect()
}

crate::conformance! {
    async fn ordered_set_ranges_match_ets_first_next_prev_last(app) {
        app.table("o", "ordered_set").await;
        for k in ["b", "a", "d", "c", "ab", "e", "é", "Z"] {
            app.put("o", k, json!(k)).await;
        }
        // Bytewise order: uppercase before lowercase, multi-byte UTF-8 last.
        let all = app.scan("o", "").await;
        assert_eq!(keys(&all), ["Z", "a", "ab", "b", "c", "d", "e", "é"]);
        assert!(all.body["next_cursor"].is_null());
        assert_eq!(keys(&app.scan("o", "?limit=1").await), ["Z"]); // first
        assert_eq!(keys(&app.scan("o", "?reverse=true&limit=1").await), ["é"]); // last
        assert_eq!(keys(&app.scan("o", "?after=ab&limit=1").await), ["b"]); // next
        assert_eq!(
            keys(&app.scan("o", "?end=b&reverse=true&limit=1").await),
            ["ab"]
        ); // prev
        assert_eq!(keys(&app.scan("o", "?start=b&end=d").await), ["b", "c"]);
        assert_eq!(
            keys(&app.scan("o", "?start=b&end=d&reverse=true").await),
            ["c", "b"]
        );
        assert_eq!(keys(&app.scan("o", "?prefix=a").await), ["a", "ab"]);
        assert_eq!(
            keys(&app.scan("o", "?prefix=a&reverse=true").await),
            ["ab", "a"]
        );
        assert_eq!(keys(&app.scan("o", "?after=e").await), ["é"]);
        assert!(keys(&app.scan("o", "?start=d&end=b").await).is_empty());
        assert!(keys(&app.scan("o", "?after=%C3%A9").await).is_empty());
    }

    async fn ordered_pages_chain_with_cursors_both_ways(app) {
        app.table("o", "ordered_set").await;
        for i in 0..25 {
            app.put("o", &format!("k{i:02}"), json!(i)).await;
        }
        let fwd = app.scan_all("o", "?limit=7").await;
        let fwd_keys: Vec<_> = fwd.iter().map(|(k, _)| k.clone()).collect();
        let expected: Vec<_> = (0..25).map(|i| format!("k{i:02}")).collect();
        assert_eq!(fwd_keys, expected);
        let back = app
            .scan_all("o", "?limit=4&reverse=true&start=k05&end=k20")
            .await;
        let back_keys: Vec<_> = back.iter().map(|(k, _)| k.clone()).collect();
        let expected: Vec<_> = (5..20).rev().map(|i| format!("k{i:02}")).collect();
        assert_eq!(back_keys, expected);
        // A page that ends exactly at the end of the range says so.
        let exact = app.scan("o", "?start=k20&limit=5").await;
        assert_eq!(keys(&exact).len(), 5);
        assert!(exact.body["next_cursor"].is_null());
    }

    async fn hashed_tables_page_through_everything_once(app) {
        for kind in ["set", "bag", "duplicate_bag"] {
            app.table(kind, kind).await;
            let mut expected = BTreeMap::new();
            for i in 0..300 {
                let k = format!("key{i}");
                app.put(kind, &k, json!(i)).await;
                expected
                    .entry(k.clone())
                    .or_insert_with(Vec::new)
                    .push(json!(i));
                if kind != "set" && i % 3 == 0 {
                    app.put(kind, &k, json!("extra")).await;
                    expected.get_mut(&k).unwrap().push(json!("extra"));
                }
            }
            for limit in [1, 7, 100, 10000] {
                let mut got = BTreeMap::new();
                for (k, v) in app.scan_all(kind, &format!("?limit={limit}")).await {
                    got.entry(k).or_insert_with(Vec::new).push(v);
                }
                assert_eq!(got, expected, "{kind} limit {limit}");
            }
            let pre = app.scan_all(kind, "?prefix=key1").await;
            assert!(pre.iter().all(|(k, _)| k.starts_with("key1")));
            assert_eq!(
                pre.iter()
                    .map(|(k, _)| k.clone())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                111
            );
        }
    }

    async fn a_scan_during_writes_returns_every_surviving_entry_exactly_once(app) {
        for kind in ["set", "ordered_set", "bag"] {
            app.table(kind, kind).await;
            for i in 0..400 {
                app.put(kind, &format!("stable{i}"), json!(i)).await;
            }
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            let mut round = 0;
            loop {
                let q = match &cursor {
                    Some(c) => format!("?limit=13&cursor={c}"),
                    None => "?limit=13".into(),
                };
                let r = app.scan(kind, &q).await;
                for k in keys(&r) {
                    seen.push(k);
                }
                // Churn between pages: new keys and deleted keys, enough to make
                // the maps grow and move entries around.
                for j in 0..20 {
                    app.put(kind, &format!("churn{round}-{j}"), json!(j)).await;
                }
                app.delete(kind, &format!("churn{}-0", round.max(1) - 1))
                    .await;
                round += 1;
                match r.body["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            for i in 0..400 {
                let k = format!("stable{i}");
                assert_eq!(seen.iter().filter(|s| **s == k).count(), 1, "{kind}: {k}");
            }
            let mut dedup = seen.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), seen.len(), "{kind}: no entry twice");
        }
    }

    async fn bad_scan_parameters_are_400(app) {
        app.table("s", "set").await;
        app.table("o", "ordered_set").await;
        for (t, q) in [
            ("s", "?start=a"),
            ("s", "?reverse=true"),
            ("s", "?end=a"),
            ("o", "?limit=0"),
            ("o", "?limit=10001"),
            ("o", "?limit=-1"),
            ("o", "?limit=ten"),
            ("o", "?reverse=maybe"),
            ("o", "?cursor=nonsense"),
            ("o", "?start=a&after=b"),
            ("o", "?limit=1&limit=2"),
            ("o", "?bogus=1"),
        ] {
            app.scan(t, q).await.assert_error(400, "invalid_argument");
        }
        let long = "x".repeat(1025);
        app.scan("o", &format!("?prefix={long}"))
            .await
            .assert_error(400, "invalid_argument");
        app.scan("missing", "")
            .await
            .assert_error(404, "table_not_found");
        assert_eq!(app.scan("o", "?limit=10000").await.status, 200);
    }
}
