//! The SQLite store: the embedded default (`fledge standalone`), one file plus a blob directory.
//!
//! Opened in WAL mode with foreign keys on and a busy timeout; write transactions begin
//! `IMMEDIATE` so that two writers queue on the lock instead of failing on an upgrade.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::impl_sql_store;

/// Migrations in order; the version table records how many are applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_dataset_names_not_unique.sql"),
    include_str!("../../migrations/sqlite/0003_secrets.sql"),
];

/// A [`Store`](super::Store) in a SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    blobs: BlobStore,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending migrations, and keeps
    /// code bundles in `blobs`.
    pub async fn open(path: impl AsRef<Path>, blobs: BlobStore) -> super::Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(super::Error::Blob)?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(super::sql::db)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool =
            SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(
                |err| {
                    super::Error::Database(
                        anyhow::Error::new(err)
                            .context(format!("failed to open SQLite database {}", path.display())),
                    )
                },
            )?;
        migrate(&pool).await?;
        Ok(Self { pool, blobs })
    }

    /// The blob store holding this store's code bundles.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }
}

async fn migrate(pool: &SqlitePool) -> super::Result<()> {
    use sqlx::Row as _;
    let db = super::sql::db;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS fledge_schema_version \
         (version INTEGER NOT NULL, applied_at TEXT NOT NULL)",
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
    check_known(applied, MIGRATIONS.len())?;
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

/// Refuses a database written by a newer Fledge (more migrations than this build knows).
pub(super) fn check_known(applied: i64, known: usize) -> super::Result<()> {
    if applied < 0 || applied as usize > known {
        return Err(super::Error::Database(anyhow::anyhow!(
            "database schema version {applied} is newer than this build supports ({known})"
        )));
    }
    Ok(())
}

impl_sql_store!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE");

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn suite() {
        let dir = tempfile::tempdir().unwrap();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        crate::store::suite::run(|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let root = dir.path().join(format!("s{n}"));
            async move {
                let blobs = BlobStore::new(root.join("blobs"), 1024).unwrap();
                SqliteStore::open(root.join("fledge.db"), blobs).await.unwrap()
            }
        })
        .await;
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_migrations_are_idempotent() {
        use crate::store::Store as _;
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
        let store = SqliteStore::open(dir.path().join("f.db"), blobs.clone()).await.unwrap();
        let user = fledge_types::User { id: "ann".into(), is_admin: false };
        store.create_user(&user).await.unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path().join("f.db"), blobs).await.unwrap();
        assert_eq!(store.get_user(&"ann".into()).await.unwrap(), user);
    }
}
