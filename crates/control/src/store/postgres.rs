//! The PostgreSQL store: for clusters where several control-plane processes share state.
//!
//! Same tables and statements as SQLite (see `sql.rs`); migrations run under an advisory lock
//! so that two processes starting together do not both apply them.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::sql::impl_sql_store;

/// The migrations in `migrations/postgres/`, embedded and checksummed; applied ones are
/// recorded in `_sqlx_migrations` (under sqlx's advisory lock), and a changed migration file is
/// refused at connect.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Arbitrary constant naming the lock under which a database of the old migrator is adopted.
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
    let db = super::sql::db;
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let legacy: bool =
        sqlx::query_scalar("SELECT to_regclass('fledge_schema_version') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    if legacy {
        super::sql::adopt_legacy_migrations!(&mut *tx, &MIGRATOR);
    }
    tx.commit().await.map_err(db)?;
    MIGRATOR.run(pool).await.map_err(super::sql::migrate_error)
}

impl_sql_store!(
    PostgresStore,
    sqlx::postgres::PgRow,
    "BEGIN",
    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))::text"
);

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
        design_deletion_races_an_upload(&url).await;
        concurrent_metrics_stay_within_the_bound(&url).await;
        a_database_of_the_old_migrator_connects_and_upgrades(&url).await;
    }

    /// Two stores over one database, as two apiservers would open them.
    async fn concurrent_metrics_stay_within_the_bound(url: &str) {
        reset(url).await;
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
            PostgresStore::connect(url, blobs).await.unwrap()
        };
        let (first, second) = (open().await, open().await);
        crate::store::suite::concurrent_metrics_stay_within_the_bound(&first, &second).await;
    }

    /// Two stores over one database and one blob directory, as two apiservers would open them.
    async fn design_deletion_races_an_upload(url: &str) {
        reset(url).await;
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
            (PostgresStore::connect(url, blobs.clone()).await.unwrap(), blobs)
        };
        let (uploader, uploader_blobs) = open().await;
        let (deleter, _) = open().await;
        crate::store::suite::design_deletion_races_an_upload(&uploader, &uploader_blobs, &deleter)
            .await;
    }

    /// A database of the old migrator (`fledge_schema_version`, 0001 applied) connects, keeps
    /// its data and is upgraded (0002 drops the unique dataset names). Run by `suite` after the
    /// behavioural suite: both reset the one database, and nextest runs tests in parallel
    /// processes.
    async fn a_database_of_the_old_migrator_connects_and_upgrades(url: &str) {
        use crate::store::Store as _;
        let url = url.to_owned();
        reset(&url).await;
        let pool = PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        sqlx::raw_sql(include_str!("../../migrations/postgres/0001_init.sql"))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE fledge_schema_version \
             (version BIGINT NOT NULL, applied_at TEXT NOT NULL); \
             INSERT INTO fledge_schema_version VALUES (1, 'then'); \
             INSERT INTO users (id, is_admin, created_at) VALUES ('ann', FALSE, 'then'); \
             INSERT INTO datasets (id, owner, name, description, url, data_format, realm, \
             is_public, created_at) VALUES ('d1', 'ann', 'MNIST dataset', '', 'file:///d1', \
             'npy', 'default/eu', FALSE, 'then')",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
        let store =
            PostgresStore::connect(&url, blobs.clone()).await.expect("old database connects");
        let spec = fledge_types::DatasetSpec {
            name: "MNIST dataset".into(),
            url: "file:///d2".into(),
            realm: "default/us".into(),
            ..Default::default()
        };
        store.create_dataset(&"ann".into(), &spec).await.expect("names need not be unique");
        assert_eq!(store.list_datasets(None).await.unwrap().len(), 2);
        let store = PostgresStore::connect(&url, blobs).await.expect("reconnects");
        assert_eq!(store.list_datasets(None).await.unwrap().len(), 2);
    }

    /// Drops every Fledge table so each suite case starts from an empty database.
    async fn reset(url: &str) {
        let pool = PgPoolOptions::new().max_connections(1).connect(url).await.unwrap();
        sqlx::raw_sql(
            "DROP TABLE IF EXISTS metrics, tasks, job_datasets, jobs, computes, datasets, codes, \
             schemas, designs, tokens, users, fledge_schema_version, _sqlx_migrations CASCADE",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
}
