//! Table endpoints over real HTTP: create, list, info, patch, drop, clear, sync.

mod common;

use common::spawn_app;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn create_returns_full_info_with_defaults() {
    let app = spawn_app().await;
    let r = app.create_table(json!({"name": "users"})).await;
    assert_eq!(r.status, 201);
    let b = &r.body;
    assert_eq!(b["name"], "users");
    assert_eq!(b["type"], "set");
    assert_eq!(b["access"], "protected");
    assert_eq!(b["persistence"], "none");
    assert_eq!(b["eviction"], "none");
    assert_eq!(b["owner"], "anonymous");
    assert_eq!(b["size"], 0);
    assert_eq!(b["memory_bytes"], 0);
    for k in ["auto_save_ms", "default_ttl_ms", "max_entries", "origin"] {
        assert!(b[k].is_null(), "{k}");
    }
    assert!(b["created_at"].as_str().unwrap().ends_with('Z'));
    for k in [
        "hits",
        "misses",
        "inserts",
        "deletes",
        "expired",
        "evicted",
        "origin_fetches",
    ] {
        assert_eq!(b["stats"][k], 0, "{k}");
    }
    assert!(
        b.get("dirty").is_none(),
        "memory tables report no dirty count"
    );
}

#[tokio::test]
async fn every_type_and_access_can_be_created() {
    let app = spawn_app().await;
    for (i, kind) in ["set", "ordered_set", "bag", "duplicate_bag"]
        .iter()
        .enumerate()
    {
        for access in ["public", "protected", "private"] {
            let name = format!("t{i}-{access}");
            let r = app
                .create_table(json!({"name": name, "type": kind, "access": access, "default_ttl_ms": 1000, "max_entries": 10, "eviction": "none"}))
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            assert_eq!(r.body["type"], *kind);
            assert_eq!(r.body["access"], access);
            assert_eq!(r.body["default_ttl_ms"], 1000);
            assert_eq!(r.body["max_entries"], 10);
        }
    }
    let list = app.send(Method::GET, "/v1/tables", None, &[]).await;
    assert_eq!(list.status, 200);
    let names: Vec<&str> = list.body["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 12);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "listed by name");
}

#[tokio::test]
async fn a_second_create_with_the_same_name_is_409() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    app.create_table(json!({"name": "t", "type": "bag"}))
        .await
        .assert_error(409, "table_exists");
    assert_eq!(app.get_table("t").await.body["type"], "set");
}

#[tokio::test]
async fn bad_create_bodies_are_400() {
    let app = spawn_app().await;
    for (body, code) in [
        (json!({"name": ""}), "invalid_name"),
        (json!({"name": "a b"}), "invalid_name"),
        (json!({"name": "x".repeat(65)}), "invalid_name"),
        (json!({"name": "ok/no"}), "invalid_name"),
        (json!({}), "invalid_argument"),
        (json!({"name": 5}), "invalid_argument"),
        (json!({"name": "t", "type": "tree"}), "invalid_argument"),
        (json!({"name": "t", "access": "secret"}), "invalid_argument"),
        (json!({"name": "t", "eviction": "fifo"}), "invalid_argument"),
        (json!({"name": "t", "typo": 1}), "invalid_argument"),
        (
            json!({"name": "t", "default_ttl_ms": 0}),
            "invalid_argument",
        ),
        (
            json!({"name": "t", "default_ttl_ms": -1}),
            "invalid_argument",
        ),
        (
            json!({"name": "t", "default_ttl_ms": 1e300}),
            "invalid_argument",
        ),
        (json!({"name": "t", "max_entries": 0}), "invalid_argument"),
        (
            json!({"name": "t", "auto_save_ms": 100}),
            "invalid_argument",
        ),
        (json!([1, 2]), "invalid_argument"),
    ] {
        let r = app.create_table(body.clone()).await;
        r.assert_error(400, code);
    }
    let r = app
        .send(
            Method::POST,
            "/v1/tables",
            Some(b"{\"name\":".to_vec()),
            &[],
        )
        .await;
    r.assert_error(400, "invalid_json");
    assert_eq!(
        app.send(Method::GET, "/v1/tables", None, &[]).await.body["tables"],
        json!([])
    );
}

#[tokio::test]
async fn names_use_the_whole_allowed_alphabet() {
    let app = spawn_app().await;
    let name = "Az09_-.x";
    assert_eq!(app.create_table(json!({"name": name})).await.status, 201);
    assert_eq!(app.get_table(name).await.body["name"], name);
    let max = "n".repeat(64);
    assert_eq!(app.create_table(json!({"name": max})).await.status, 201);
}

#[tokio::test]
async fn patch_changes_only_settable_fields_and_validates_first() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    let r = app
        .send(
            Method::PATCH,
            "/v1/tables/t",
            Some(
                json!({"default_ttl_ms": 5000, "max_entries": 100, "eviction": "lru"})
                    .to_string()
                    .into_bytes(),
            ),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["default_ttl_ms"], 5000);
    assert_eq!(r.body["max_entries"], 100);
    assert_eq!(r.body["eviction"], "lru");

    // A bad field anywhere: nothing changes.
    for bad in [
        json!({"default_ttl_ms": 1, "max_entries": 0}),
        json!({"default_ttl_ms": 1, "type": "bag"}),
        json!({"default_ttl_ms": 1, "auto_save_ms": 10}),
        json!({"default_ttl_ms": "soon"}),
        json!({"eviction": "random"}),
    ] {
        app.send(
            Method::PATCH,
            "/v1/tables/t",
            Some(bad.to_string().into_bytes()),
            &[],
        )
        .await
        .assert_error(400, "invalid_argument");
    }
    let info = app.get_table("t").await.body;
    assert_eq!(info["default_ttl_ms"], 5000);
    assert_eq!(info["max_entries"], 100);

    // null clears.
    let r = app
        .send(
            Method::PATCH,
            "/v1/tables/t",
            Some(br#"{"default_ttl_ms":null,"max_entries":null}"#.to_vec()),
            &[],
        )
        .await;
    assert!(r.body["default_ttl_ms"].is_null());
    assert!(r.body["max_entries"].is_null());
    app.send(Method::PATCH, "/v1/tables/zz", Some(b"{}".to_vec()), &[])
        .await
        .assert_error(404, "table_not_found");
}

#[tokio::test]
async fn a_default_ttl_applies_to_writes_without_one() {
    let app = spawn_app().await;
    app.create_table(json!({"name": "t", "default_ttl_ms": 60000}))
        .await;
    app.put("t", "k", json!(1)).await;
    let ttl = app.get("t", "k").await.body["ttl_ms"].as_u64().unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000);
    app.put_with("t", "j", json!(1), "?ttl_ms=1000000", &[])
        .await;
    assert!(app.get("t", "j").await.body["ttl_ms"].as_u64().unwrap() > 60_000);
}

#[tokio::test]
async fn delete_drops_the_table_and_its_data() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    app.put("t", "k", json!(1)).await;
    let r = app.send(Method::DELETE, "/v1/tables/t", None, &[]).await;
    assert_eq!(r.status, 204);
    app.get_table("t")
        .await
        .assert_error(404, "table_not_found");
    app.send(Method::DELETE, "/v1/tables/t", None, &[])
        .await
        .assert_error(404, "table_not_found");
    // Re-created with the same name, it starts empty, and old ETags never match.
    app.table("t", "set").await;
    app.get("t", "k").await.assert_error(404, "key_not_found");
}

#[tokio::test]
async fn clear_empties_every_type() {
    let app = spawn_app().await;
    for kind in ["set", "ordered_set", "bag", "duplicate_bag"] {
        app.table(kind, kind).await;
        for i in 0..50 {
            app.put(kind, &format!("k{i}"), json!(i)).await;
        }
        let r = app
            .send(
                Method::DELETE,
                &format!("/v1/tables/{kind}/entries"),
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 204);
        let info = app.get_table(kind).await.body;
        assert_eq!(info["size"], 0, "{kind}");
        assert_eq!(info["memory_bytes"], 0, "{kind}");
        assert_eq!(info["stats"]["deletes"], 50, "{kind}");
        assert!(app.scan_all(kind, "").await.is_empty());
        // Still usable afterwards, scans included.
        app.put(kind, "again", json!(1)).await;
        assert_eq!(app.scan_all(kind, "").await.len(), 1);
    }
}

#[tokio::test]
async fn sync_of_a_memory_table_answers_at_once() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    let r = app.send(Method::POST, "/v1/tables/t/sync", None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["name"], "t");
    app.send(Method::POST, "/v1/tables/none/sync", None, &[])
        .await
        .assert_error(404, "table_not_found");
}

#[tokio::test]
async fn memory_accounting_grows_and_shrinks() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    for i in 0..100 {
        app.put("t", &format!("key-{i}"), json!("x".repeat(100)))
            .await;
    }
    let mem = app.get_table("t").await.body["memory_bytes"]
        .as_u64()
        .unwrap();
    assert!(mem > 100 * 110, "at least the raw bytes: {mem}");
    for i in 0..100 {
        app.delete("t", &format!("key-{i}")).await;
    }
    // The map keeps its bucket arrays after deletes (as a hash table does);
    // the entries' own bytes are gone.
    let after = app.get_table("t").await.body["memory_bytes"]
        .as_u64()
        .unwrap();
    assert!(after < mem, "{after} < {mem}");
    app.send(Method::DELETE, "/v1/tables/t/entries", None, &[])
        .await;
    assert_eq!(
        app.get_table("t").await.body["memory_bytes"],
        0,
        "clear frees everything"
    );
}

#[tokio::test]
async fn a_typo_in_a_create_body_is_named_and_the_settings_are_listed() {
    let app = spawn_app().await;
    let r = app
        .create_table(json!({"name": "t", "persistance": "sync"}))
        .await;
    r.assert_error(400, "invalid_argument");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`persistance`"), "{msg}");
    assert!(msg.contains("`persistence`"), "{msg}");
    assert_eq!(app.get_table("t").await.status, 404, "nothing was created");
}
