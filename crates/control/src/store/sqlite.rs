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

/// The migrations in `migrations/sqlite/`, embedded and checksummed; applied ones are recorded
/// in `_sqlx_migrations`, and a changed migration file is refused at open.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

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
    let db = super::sql::db;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
    let legacy: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'fledge_schema_version'",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    if legacy.is_some() {
        super::sql::adopt_legacy_migrations!(&mut *tx, &MIGRATOR);
    }
    tx.commit().await.map_err(db)?;
    MIGRATOR.run(pool).await.map_err(super::sql::migrate_error)
}

impl_sql_store!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE", "SELECT $1");

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

    /// A database written by the hand-written migrator that came before `sqlx::migrate!`
    /// (version table `fledge_schema_version`, migration 0001 applied) opens, keeps its data and
    /// is upgraded; a database claiming more migrations than this build knows is refused.
    /// Two stores over one file and one blob directory, as two processes would open them.
    #[tokio::test]
    async fn design_deletion_races_an_upload() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
            (SqliteStore::open(dir.path().join("fledge.db"), blobs.clone()).await.unwrap(), blobs)
        };
        let (uploader, uploader_blobs) = open().await;
        let (deleter, _) = open().await;
        crate::store::suite::design_deletion_races_an_upload(&uploader, &uploader_blobs, &deleter)
            .await;
    }

    /// Two stores over one file, as two processes would open them.
    #[tokio::test]
    async fn concurrent_metrics_stay_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
            SqliteStore::open(dir.path().join("fledge.db"), blobs).await.unwrap()
        };
        let (first, second) = (open().await, open().await);
        crate::store::suite::concurrent_metrics_stay_within_the_bound(&first, &second).await;
    }

    #[tokio::test]
    async fn a_database_of_the_old_migrator_opens_and_upgrades() {
        use crate::store::Store as _;
        let dir = tempfile::tempdir().unwrap();
        let old = |path: std::path::PathBuf, applied: i64| async move {
            let options = SqliteConnectOptions::from_str("sqlite:")
                .unwrap()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new().connect_with(options).await.unwrap();
            sqlx::raw_sql(include_str!("../../migrations/sqlite/0001_init.sql"))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::raw_sql(
                "CREATE TABLE fledge_schema_version \
                 (version INTEGER NOT NULL, applied_at TEXT NOT NULL); \
                 INSERT INTO users (id, is_admin, created_at) VALUES ('ann', 0, 'then'); \
                 INSERT INTO datasets (id, owner, name, description, url, data_format, realm, \
                 is_public, created_at) VALUES ('d1', 'ann', 'MNIST dataset', '', \
                 'file:///d1', 'npy', 'default/eu', 0, 'then')",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO fledge_schema_version VALUES ($1, 'then')")
                .bind(applied)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        };
        let path = dir.path().join("old.db");
        old(path.clone(), 1).await;
        let blobs = BlobStore::new(dir.path().join("blobs"), 1024).unwrap();
        let store = SqliteStore::open(&path, blobs.clone()).await.expect("old database opens");
        let ann = fledge_types::UserId::new("ann");
        let kept = store.get_dataset(None, &"d1".into()).await.unwrap();
        assert_eq!(kept.spec.name, "MNIST dataset");
        // Migration 0002 ran: a second dataset of the same name is accepted.
        let spec = fledge_types::DatasetSpec {
            name: "MNIST dataset".into(),
            url: "file:///d2".into(),
            realm: "default/us".into(),
            ..Default::default()
        };
        store.create_dataset(&ann, &spec).await.expect("names need not be unique");
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(applied, MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>());
        drop(store);
        // Reopening is a no-op.
        let store = SqliteStore::open(&path, blobs.clone()).await.expect("reopens");
        assert_eq!(store.list_datasets(None).await.unwrap().len(), 2);
        drop(store);

        let newer = dir.path().join("newer.db");
        old(newer.clone(), 99).await;
        let err = SqliteStore::open(&newer, blobs).await.expect_err("a newer database is refused");
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert!(chain.contains("newer than this build supports"), "{chain}");
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
