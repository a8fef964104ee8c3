//! The PostgreSQL store: for clusters where several control-plane processes share state.
//!
//! Same tables and statements as SQLite (see `sql.rs`); migrations run under an advisory lock
//! so that two processes starting together do not both apply them.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::sql::impl_sql_store;

/// Migrations in order; the version table records how many are applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_dataset_names_not_unique.sql"),
    include_str!("../../migrations/postgres/0003_secrets.sql"),
];

/// Arbitrary constant naming Fledge's migration lock.
const MIGRATION_LOCK: i64 = 0x0f1e_d9e0;

/// A [`Store`](super::Store) in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    blobs: BlobStore,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:pass@host/db`), applies pending migrations, and keeps
    /// code bundles in `blobs`.
    pub async fn connect(url: &str, blobs: BlobStore) -> super::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|err| {
                super::Error::Database(
                    anyhow::Error::new(err).context("failed to connect to PostgreSQL"),
                )
            })?;
        migrate(&pool).await?;
        Ok(Self { pool, blobs })
    }

    /// The blob store holding this store's code bundles.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }
}

async fn migrate(pool: &PgPool) -> super::Result<()> {
    use sqlx::Row as _;
    let db = super::sql::db;
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS fledge_schema_version \
         (version BIGINT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let applied: i64 =
        sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM fledge_schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get("v")
            .map_err(db)?;
    super::sqlite::check_known(applied, MIGRATIONS.len())?;
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db)?;
        sqlx::query("INSERT INTO fledge_schema_version (version, applied_at) VALUES ($1, $2)")
            .bind(version as i64 + 1)
            .bind(super::sql::now())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

impl_sql_store!(PostgresStore, sqlx::postgres::PgRow, "BEGIN");

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the behavioural suite when `FLEDGE_POSTGRES_URL` names a database it may wipe.
    #[tokio::test]
    async fn suite() {
        let Ok(url) = std::env::var("FLEDGE_POSTGRES_URL") else {
            eprintln!("skipping the PostgreSQL store suite: FLEDGE_POSTGRES_URL is not set");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        crate::store::suite::run(|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let root = dir.path().join(format!("s{n}"));
            let url = url.clone();
            async move {
                let blobs = BlobStore::new(root.join("blobs"), 1024).unwrap();
                reset(&url).await;
                PostgresStore::connect(&url, blobs).await.unwrap()
            }
        })
        .await;
    }

    /// Drops every Fledge table so each suite case starts from an empty database.
    async fn reset(url: &str) {
        let pool = PgPoolOptions::new().max_connections(1).connect(url).await.unwrap();
        sqlx::raw_sql(
            "DROP TABLE IF EXISTS metrics, tasks, job_datasets, jobs, computes, datasets, codes, \
             schemas, designs, tokens, users, fledge_schema_version CASCADE",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
}
