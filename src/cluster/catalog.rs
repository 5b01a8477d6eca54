//! The cluster's catalog: creating, dropping and redefining cluster
//! tables in PostgreSQL, and this node's registry of them, reloaded from
//! the database when the change log says a definition changed.

use super::*;

impl Cluster {
    /// Creates a cluster table.
    ///
    /// # Errors
    /// [`OpError::TableExists`], [`OpError::InvalidArgument`],
    /// [`OpError::Unavailable`].
    pub async fn create_table(&self, spec: TableSpec) -> Result<Arc<ClusterTable>, OpError> {
        let spec = spec.validated()?;
        let settings = settings_json(&spec.settings)?;
        let now = self.core.now_ms();
        let mut client = self.core.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let row = tx
            .query_one(
                "INSERT INTO larder_tables (name, settings, owner, created_at, revision) \
                 VALUES ($1, $2, $3, $4, larder_next_version()) RETURNING id, revision",
                &[
                    &spec.name,
                    &settings,
                    &spec.owner,
                    &(spec.created_at as i64),
                ],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                    OpError::TableExists(spec.name.clone())
                }
                _ => db_error(&e),
            })?;
        let (id, revision): (i64, i64) = (row.get(0), row.get(1));
        tx.execute(
            "INSERT INTO larder_counts (table_id, shard) SELECT $1, g FROM generate_series(0, 63) g",
            &[&id],
        )
        .await
        .map_err(|e| db_error(&e))?;
        log_table_change(&tx, id, revision, follow::KIND_DEFINE, now).await?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        self.core.timed(started);
        self.register(Definition { id, spec })
    }

    /// Drops a cluster table on every node.
    ///
    /// # Errors
    /// [`OpError::TableNotFound`] when it was dropped meanwhile,
    /// [`OpError::Unavailable`].
    pub async fn drop_table(&self, table: &ClusterTable) -> Result<(), OpError> {
        let now = self.core.now_ms();
        let mut client = self.core.client().await?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let gone = tx
            .execute("DELETE FROM larder_tables WHERE id = $1", &[&table.id()])
            .await
            .map_err(|e| db_error(&e))?;
        if gone == 0 {
            self.forget(table.id());
            return Err(OpError::TableNotFound(table.name().to_owned()));
        }
        let version: i64 = tx
            .query_one("SELECT larder_next_version()", &[])
            .await
            .map_err(|e| db_error(&e))?
            .get(0);
        log_table_change(&tx, table.id(), version, follow::KIND_DROP, now).await?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        self.forget(table.id());
        Ok(())
    }

    /// Changes `table`'s settings or owner with `apply` and stores them
    /// for every node; if they cannot be stored, this node's copy is put
    /// back as it was, so a failed request changes nothing.
    ///
    /// # Errors
    /// [`OpError::TableNotFound`] when it was dropped meanwhile,
    /// [`OpError::Unavailable`].
    pub async fn redefine_table(
        &self,
        table: &ClusterTable,
        apply: impl FnOnce(&crate::store::Table),
    ) -> Result<(), OpError> {
        let before = table.meta_spec();
        apply(table.meta_table());
        let saved = self.save_definition(table).await;
        if saved.is_err() {
            table.apply_definition(&before);
        }
        saved
    }

    pub(super) async fn save_definition(&self, table: &ClusterTable) -> Result<(), OpError> {
        let spec = table.meta_spec();
        let settings = settings_json(&spec.settings)?;
        let now = self.core.now_ms();
        let mut client = self.core.client().await?;
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let row = tx
            .query_opt(
                "UPDATE larder_tables SET settings = $2, owner = $3, \
                 revision = larder_next_version() WHERE id = $1 RETURNING revision",
                &[&table.id(), &settings, &spec.owner],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let Some(row) = row else {
            self.forget(table.id());
            return Err(OpError::TableNotFound(table.name().to_owned()));
        };
        log_table_change(&tx, table.id(), row.get(0), follow::KIND_DEFINE, now).await?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        Ok(())
    }

    /// Makes `def` known to this node, updating a table of the same id in
    /// place (so requests holding it see the new settings).
    pub(super) fn register(&self, def: Definition) -> Result<Arc<ClusterTable>, OpError> {
        let name: Box<str> = def.spec.name.as_str().into();
        if let Some(existing) = self.tables.get(&name) {
            if existing.id() == def.id {
                existing.apply_definition(&def.spec);
                return Ok(existing.clone());
            }
        }
        let meta = self.store.detached_table(def.spec).map_err(|e| {
            OpError::Internal(format!("the cluster holds settings this node refuses: {e}"))
        })?;
        let table = Arc::new(ClusterTable::new(def.id, meta, self.core.clone()));
        self.by_id.insert(def.id, table.clone());
        if let Some(old) = self.tables.insert(name, table.clone()) {
            self.by_id.remove(&old.id());
            old.forget_rows(&self.core.budget);
        }
        Ok(table)
    }

    /// Forgets the table of id `id` (dropped).
    pub(super) fn forget(&self, id: i64) {
        self.by_id.remove(&id);
        let mut gone = Vec::new();
        self.tables.retain(|_, t| {
            if t.id() == id {
                gone.push(t.clone());
                false
            } else {
                true
            }
        });
        for t in gone {
            t.forget_rows(&self.core.budget);
        }
    }

    /// Reads every definition and makes this node's registry match.
    pub(super) async fn reload_catalog(&self) -> Result<(), OpError> {
        let client = self.core.client().await?;
        let rows = client
            .query(
                "SELECT id, name, settings, owner, created_at FROM larder_tables",
                &[],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let defs: Vec<Definition> = rows.iter().filter_map(definition).collect();
        let ids: std::collections::HashSet<i64> = defs.iter().map(|d| d.id).collect();
        let stale: Vec<i64> = self
            .tables
            .iter()
            .filter(|t| !ids.contains(&t.id()))
            .map(|t| t.id())
            .collect();
        for id in stale {
            self.forget(id);
        }
        for def in defs {
            if let Err(e) = self.register(def) {
                tracing::warn!(error = %e, "cluster table skipped");
            }
        }
        Ok(())
    }

    pub(super) async fn load_definition_by_name(
        &self,
        name: &str,
    ) -> Result<Option<Definition>, OpError> {
        self.load_definition("name", &name).await
    }

    pub(super) async fn load_definition_by_id(
        &self,
        id: i64,
    ) -> Result<Option<Definition>, OpError> {
        self.load_definition("id", &id).await
    }

    /// The definition whose `column` (`id` or `name`) is `value`.
    pub(super) async fn load_definition(
        &self,
        column: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<Definition>, OpError> {
        let client = self.core.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT id, name, settings, owner, created_at FROM larder_tables WHERE {column} = $1"
                ),
                &[value],
            )
            .await
            .map_err(|e| db_error(&e))?;
        Ok(row.as_ref().and_then(definition))
    }
}

pub(super) fn settings_json(settings: &TableSettings) -> Result<String, OpError> {
    serde_json::to_string(settings)
        .map_err(|e| OpError::Internal(format!("cannot encode table settings: {e}")))
}

pub(super) fn definition(row: &tokio_postgres::Row) -> Option<Definition> {
    let id: i64 = row.get(0);
    let name: String = row.get(1);
    let settings: String = row.get(2);
    let settings: TableSettings = match serde_json::from_str(&settings) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(table = %name, error = %e, "unreadable cluster table definition skipped");
            return None;
        }
    };
    Some(Definition {
        id,
        spec: TableSpec {
            name,
            settings,
            owner: row.get(3),
            created_at: row.get::<_, i64>(4).max(0) as u64,
        },
    })
}

pub(super) async fn log_table_change(
    tx: &deadpool_postgres::Transaction<'_>,
    id: i64,
    version: i64,
    kind: i16,
    now: u64,
) -> Result<(), OpError> {
    tx.execute(
        "INSERT INTO larder_changes (table_id, key, version, kind, at) VALUES ($1, NULL, $2, $3, $4)",
        &[&id, &version, &kind, &(now as i64)],
    )
    .await
    .map_err(|e| db_error(&e))?;
    Ok(())
}
