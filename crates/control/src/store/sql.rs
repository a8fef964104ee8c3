//! The SQL implementation of [`Store`](super::Store), written once for SQLite and PostgreSQL.
//!
//! Both dialects accept `$N` parameters and the same DML, so the statements are shared; only
//! the DDL (`migrations/<dialect>/`) and how a transaction begins differ. The macro
//! [`impl_sql_store!`] expands the trait implementation for a concrete pool type, which keeps
//! the two backends from drifting apart without fighting sqlx's generic executor bounds.

use chrono::{DateTime, SecondsFormat, Utc};
use fledge_types::{JobState, Platform};

use super::{Error, Result};

/// Job states that never change again, as stored.
pub(super) const FINAL_STATES_SQL: &str = "('completed','failed','terminated')";

/// The current time as stored: RFC 3339 UTC with microseconds (sorts as text).
pub(super) fn now() -> String {
    to_text(Utc::now())
}

/// A timestamp as stored.
pub(super) fn to_text(ts: DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A stored timestamp.
pub(super) fn from_text(text: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|ts| ts.with_timezone(&Utc))
        .map_err(|err| Error::Database(anyhow::anyhow!("bad stored timestamp {text:?}: {err}")))
}

/// An optional stored timestamp.
pub(super) fn from_opt_text(text: Option<String>) -> Result<Option<DateTime<Utc>>> {
    text.as_deref().map(from_text).transpose()
}

/// A stored JSON document.
pub(super) fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|err| Error::Database(anyhow::anyhow!("bad stored {what}: {err}")))
}

/// A JSON document to store.
pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|err| Error::Database(anyhow::Error::new(err)))
}

/// A stored job state.
pub(super) fn job_state(text: &str) -> Result<JobState> {
    text.parse().map_err(|err: String| Error::Database(anyhow::anyhow!(err)))
}

/// A stored task state.
pub(super) fn task_state(text: &str) -> Result<fledge_types::TaskState> {
    text.parse().map_err(|err: String| Error::Database(anyhow::anyhow!(err)))
}

/// A platform as stored.
pub(super) fn platform_text(platform: Platform) -> &'static str {
    match platform {
        Platform::Process => "process",
        Platform::Docker => "docker",
        Platform::K8s => "k8s",
    }
}

/// A stored platform.
pub(super) fn platform(text: &str) -> Result<Platform> {
    match text {
        "process" => Ok(Platform::Process),
        "docker" => Ok(Platform::Docker),
        "k8s" => Ok(Platform::K8s),
        other => Err(Error::Database(anyhow::anyhow!("bad stored platform {other:?}"))),
    }
}

/// A database error with no better classification.
pub(super) fn db(err: sqlx::Error) -> Error {
    Error::Database(anyhow::Error::new(err))
}

/// A failed migration, or a database whose applied migrations this build does not know.
pub(super) fn migrate_error(err: sqlx::migrate::MigrateError) -> Error {
    let message = match &err {
        sqlx::migrate::MigrateError::VersionMissing(version) => {
            format!("database schema version {version} is newer than this build supports")
        }
        _ => "failed to migrate the database".to_owned(),
    };
    Error::Database(anyhow::Error::new(err).context(message))
}

/// Adopts a database of the hand-written migrator that came before `sqlx::migrate!`: the
/// migrations its `fledge_schema_version` table counts are recorded as applied in
/// `_sqlx_migrations` with the embedded checksums (their files are unchanged), and the old table
/// is dropped. A database that claims more migrations than the migrator knows was written by a
/// newer Fledge and is refused. `$conn` is a connection inside the caller's transaction.
macro_rules! adopt_legacy_migrations {
    ($conn:expr, $migrator:expr) => {{
        use sqlx::migrate::Migrate as _;
        let db = super::sql::db;
        let conn = $conn;
        let migrator: &sqlx::migrate::Migrator = $migrator;
        let applied: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM fledge_schema_version")
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
        let known = migrator.iter().count();
        if applied < 0 || applied as usize > known {
            return Err(super::Error::Database(anyhow::anyhow!(
                "database schema version {applied} is newer than this build supports ({known})"
            )));
        }
        conn.ensure_migrations_table().await.map_err(super::sql::migrate_error)?;
        for migration in migrator.iter().filter(|m| m.version <= applied) {
            sqlx::query(
                "INSERT INTO _sqlx_migrations \
                 (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, TRUE, $3, 0) ON CONFLICT (version) DO NOTHING",
            )
            .bind(migration.version)
            .bind(migration.description.to_string())
            .bind(migration.checksum.to_vec())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
        sqlx::query("DROP TABLE fledge_schema_version").execute(&mut *conn).await.map_err(db)?;
    }};
}
pub(super) use adopt_legacy_migrations;

/// Whether a database error is a unique-key violation.
pub(super) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// Whether a database error is a foreign-key violation.
pub(super) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_foreign_key_violation())
}

/// A fresh random id (16 hex digits).
pub(super) fn new_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// `$first, $first+1, ...` placeholders for an `IN (...)` list of `n` values.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(",")
}

/// A revision number from its text (`"3"`), or `NotFound` for anything else.
pub(super) fn revision(kind: &'static str, design: &str, version: &str) -> Result<i64> {
    version
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| Error::NotFound { kind, id: format!("{design} version {version}") })
}

/// Implements [`Store`](crate::store::Store) for `$store` (a struct with `pool` and `blobs`
/// fields) whose rows are `$row`; `$begin` starts a write transaction; `$lock`, run in a
/// write transaction with a blob's SHA-256 as `$1`, holds that blob's lock until the transaction
/// ends (PostgreSQL: an advisory lock; SQLite: nothing, its write transactions already exclude
/// each other).
macro_rules! impl_sql_store {
    ($store:ty, $row:ty, $begin:expr, $lock:expr) => {
        use std::collections::{BTreeSet, HashMap};

        use fledge_types::{
            Compute, ComputeId, ComputeSpec, Dataset, DatasetId, DatasetSpec, Design, DesignId,
            DesignSpec, Job, JobId, JobSpec, JobState, MetricRecord, Schema, Task, TaskId,
            TaskState, Token, User, UserId,
        };
        use sqlx::Row as _;

        use crate::store::sql::{
            db, from_json, from_opt_text, from_text, is_foreign_key_violation,
            is_unique_violation, job_state, new_id, now, placeholders, platform, platform_text,
            revision, task_state, to_json, to_text, FINAL_STATES_SQL,
        };
        use crate::store::{BlobStore, CodeMeta, Error, JobFilter, NewTask, Result, Store};

        const JOB_COLUMNS: &str = "id, owner, spec, schema_version, code_version, state, reason, \
             created_at, started_at, updated_at, ended_at";
        const TASK_COLUMNS: &str = "task_id, job_id, role, idx, group_association, dataset_id, \
             compute_id, managed, state, log, updated_at, last_heartbeat, restarts";
        const DATASET_COLUMNS: &str =
            "id, owner, name, description, url, data_format, realm, is_public";

        fn get<'r, T>(row: &'r $row, column: &str) -> Result<T>
        where
            T: sqlx::Decode<'r, <$row as sqlx::Row>::Database>
                + sqlx::Type<<$row as sqlx::Row>::Database>,
        {
            row.try_get(column).map_err(db)
        }

        fn user_from_row(row: &$row) -> Result<User> {
            Ok(User {
                id: UserId::new(get::<String>(row, "id")?),
                is_admin: get(row, "is_admin")?,
            })
        }

        fn dataset_from_row(row: &$row) -> Result<Dataset> {
            Ok(Dataset {
                id: DatasetId::new(get::<String>(row, "id")?),
                owner: UserId::new(get::<String>(row, "owner")?),
                spec: DatasetSpec {
                    name: get(row, "name")?,
                    description: get(row, "description")?,
                    url: get(row, "url")?,
                    data_format: get(row, "data_format")?,
                    realm: get(row, "realm")?,
                    is_public: get(row, "is_public")?,
                },
            })
        }

        fn compute_from_row(row: &$row) -> Result<Compute> {
            Ok(Compute {
                compute_id: ComputeId::new(get::<String>(row, "id")?),
                region: get(row, "region")?,
                platform: platform(&get::<String>(row, "platform")?)?,
                connected: false,
            })
        }

        fn job_from_row(row: &$row) -> Result<Job> {
            Ok(Job {
                id: JobId::new(get::<String>(row, "id")?),
                owner: UserId::new(get::<String>(row, "owner")?),
                spec: from_json("job spec", &get::<String>(row, "spec")?)?,
                schema_version: get(row, "schema_version")?,
                code_version: get(row, "code_version")?,
                state: job_state(&get::<String>(row, "state")?)?,
                reason: get(row, "reason")?,
                created_at: from_text(&get::<String>(row, "created_at")?)?,
                started_at: from_opt_text(get(row, "started_at")?)?,
                updated_at: from_text(&get::<String>(row, "updated_at")?)?,
                ended_at: from_opt_text(get(row, "ended_at")?)?,
            })
        }

        fn task_from_row(row: &$row) -> Result<Task> {
            let index: i64 = get(row, "idx")?;
            Ok(Task {
                job_id: JobId::new(get::<String>(row, "job_id")?),
                task_id: TaskId::new(get::<String>(row, "task_id")?),
                role: get(row, "role")?,
                index: u32::try_from(index).map_err(|_| {
                    Error::Database(anyhow::anyhow!("bad stored task index {index}"))
                })?,
                group_association: from_json(
                    "group association",
                    &get::<String>(row, "group_association")?,
                )?,
                dataset_id: get::<Option<String>>(row, "dataset_id")?.map(DatasetId::new),
                compute_id: ComputeId::new(get::<String>(row, "compute_id")?),
                managed: get(row, "managed")?,
                state: task_state(&get::<String>(row, "state")?)?,
                log: get(row, "log")?,
                updated_at: from_opt_text(get(row, "updated_at")?)?,
                last_heartbeat: from_opt_text(get(row, "last_heartbeat")?)?,
                restarts: u32::try_from(get::<i64>(row, "restarts")?).map_err(|_| {
                    Error::Database(anyhow::anyhow!("bad stored restart count"))
                })?,
            })
        }

        fn not_found(kind: &'static str, id: impl ToString) -> Error {
            Error::NotFound {
                kind,
                id: id.to_string(),
            }
        }

        /// The dataset ids a job spec names, deduplicated.
        fn spec_datasets(spec: &JobSpec) -> BTreeSet<String> {
            spec.data_spec
                .iter()
                .flat_map(|entry| entry.dataset_groups.values().flatten())
                .map(|id| id.as_str().to_owned())
                .collect()
        }

        /// What a job spec looks like stored: the file paths are resolved by the CLI, never kept.
        fn stored_spec(spec: &JobSpec) -> JobSpec {
            let mut spec = spec.clone();
            spec.data_spec_path = None;
            spec.model_spec_path = None;
            spec
        }

        impl $store {
            /// The owner of design `id` as the caller may see it (`None`: any owner).
            async fn design_owner(&self, owner: Option<&UserId>, id: &DesignId) -> Result<String> {
                let row = sqlx::query(
                    "SELECT owner FROM designs WHERE id = $1 AND ($2 IS NULL OR owner = $2) \
                     ORDER BY owner LIMIT 1",
                )
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("design", id))?;
                get(&row, "owner")
            }

            async fn versions(&self, table: &str, owner: &str, id: &str) -> Result<Vec<String>> {
                let rows = sqlx::query(&format!(
                    "SELECT version FROM {table} WHERE owner = $1 AND design_id = $2 \
                     ORDER BY version"
                ))
                .bind(owner)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| get::<i64>(row, "version").map(|v| v.to_string()))
                    .collect()
            }

            async fn design_from_row(&self, row: &$row) -> Result<Design> {
                let owner: String = get(row, "owner")?;
                let id: String = get(row, "id")?;
                Ok(Design {
                    schema_versions: self.versions("schemas", &owner, &id).await?,
                    code_versions: self.versions("codes", &owner, &id).await?,
                    id: DesignId::new(id),
                    owner: UserId::new(owner),
                    name: get(row, "name")?,
                    description: get(row, "description")?,
                    created_at: from_text(&get::<String>(row, "created_at")?)?,
                })
            }

            async fn fetch_job(&self, owner: Option<&UserId>, id: &JobId) -> Result<Job> {
                let row = sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2 IS NULL OR owner = $2)"
                ))
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("job", id))?;
                job_from_row(&row)
            }

            /// A non-final job matching `condition` (with `$1` bound to `id`), as an `InUse`
            /// reason.
            /// `InUse` when a non-final job matches `condition` (bound to `id`), naming the job.
            async fn ensure_unused(&self, kind: &'static str, id: &str, condition: &str) -> Result<()> {
                let row = sqlx::query(&format!(
                    "SELECT j.id AS id, j.state AS state FROM jobs j WHERE {condition} \
                     AND j.state NOT IN {FINAL_STATES_SQL} ORDER BY j.id LIMIT 1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                match row {
                    None => Ok(()),
                    Some(row) => Err(Error::InUse {
                        kind,
                        id: id.to_owned(),
                        reason: format!(
                            "job {} is {}",
                            get::<String>(&row, "id")?,
                            get::<String>(&row, "state")?
                        ),
                    }),
                }
            }
        }

        #[async_trait::async_trait]
        impl Store for $store {
            fn max_code_bytes(&self) -> u64 {
                self.blobs.max_bytes()
            }

            async fn create_user(&self, user: &User) -> Result<()> {
                sqlx::query("INSERT INTO users (id, is_admin, created_at) VALUES ($1, $2, $3)")
                    .bind(user.id.as_str())
                    .bind(user.is_admin)
                    .bind(now())
                    .execute(&self.pool)
                    .await
                    .map_err(|err| {
                        if is_unique_violation(&err) {
                            Error::AlreadyExists {
                                kind: "user",
                                id: user.id.to_string(),
                            }
                        } else {
                            db(err)
                        }
                    })?;
                Ok(())
            }

            async fn get_user(&self, id: &UserId) -> Result<User> {
                let row = sqlx::query("SELECT id, is_admin FROM users WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| not_found("user", id))?;
                user_from_row(&row)
            }

            async fn list_users(&self) -> Result<Vec<User>> {
                let rows = sqlx::query("SELECT id, is_admin FROM users ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(user_from_row).collect()
            }

            async fn add_token(
                &self,
                user: &UserId,
                token_sha256: &str,
                description: &str,
                expires_at: Option<chrono::DateTime<chrono::Utc>>,
            ) -> Result<Token> {
                let created_at = now();
                let id = new_id();
                sqlx::query(
                    "INSERT INTO tokens (sha256, id, user_id, description, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(token_sha256)
                .bind(&id)
                .bind(user.as_str())
                .bind(description)
                .bind(&created_at)
                .bind(expires_at.map(to_text))
                .execute(&self.pool)
                .await
                .map_err(|err| {
                    if is_foreign_key_violation(&err) {
                        not_found("user", user)
                    } else if is_unique_violation(&err) {
                        Error::AlreadyExists {
                            kind: "token",
                            id: "(hash)".to_owned(),
                        }
                    } else {
                        db(err)
                    }
                })?;
                Ok(Token {
                    id,
                    user: user.clone(),
                    description: description.to_owned(),
                    created_at: from_text(&created_at)?,
                    expires_at: expires_at.map(|t| from_text(&to_text(t))).transpose()?,
                })
            }

            async fn user_by_token(&self, token_sha256: &str) -> Result<User> {
                let row = sqlx::query(
                    "SELECT u.id AS id, u.is_admin AS is_admin FROM tokens t \
                     JOIN users u ON u.id = t.user_id WHERE t.sha256 = $1 \
                     AND (t.expires_at IS NULL OR t.expires_at > $2)",
                )
                .bind(token_sha256)
                .bind(now())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("token", "(hash)"))?;
                user_from_row(&row)
            }

            async fn list_tokens(&self, user: Option<&UserId>) -> Result<Vec<Token>> {
                let rows = sqlx::query(
                    "SELECT id, user_id, description, created_at, expires_at FROM tokens \
                     WHERE ($1 IS NULL OR user_id = $1) ORDER BY created_at, id",
                )
                .bind(user.map(UserId::as_str))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        Ok(Token {
                            id: get(row, "id")?,
                            user: UserId::new(get::<String>(row, "user_id")?),
                            description: get(row, "description")?,
                            created_at: from_text(&get::<String>(row, "created_at")?)?,
                            expires_at: from_opt_text(get(row, "expires_at")?)?,
                        })
                    })
                    .collect()
            }

            async fn revoke_token(&self, user: Option<&UserId>, id: &str) -> Result<()> {
                let done =
                    sqlx::query("DELETE FROM tokens WHERE id = $1 AND ($2 IS NULL OR user_id = $2)")
                        .bind(id)
                        .bind(user.map(UserId::as_str))
                        .execute(&self.pool)
                        .await
                        .map_err(db)?;
                if done.rows_affected() == 0 {
                    return Err(not_found("token", id));
                }
                Ok(())
            }

            async fn create_design(&self, owner: &UserId, spec: &DesignSpec) -> Result<Design> {
                let created_at = now();
                let name = if spec.name.is_empty() {
                    spec.id.to_string()
                } else {
                    spec.name.clone()
                };
                sqlx::query(
                    "INSERT INTO designs (owner, id, name, description, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(owner.as_str())
                .bind(spec.id.as_str())
                .bind(&name)
                .bind(&spec.description)
                .bind(&created_at)
                .execute(&self.pool)
                .await
                .map_err(|err| {
                    if is_unique_violation(&err) {
                        Error::AlreadyExists {
                            kind: "design",
                            id: spec.id.to_string(),
                        }
                    } else {
                        db(err)
                    }
                })?;
                Ok(Design {
                    id: spec.id.clone(),
                    owner: owner.clone(),
                    name,
                    description: spec.description.clone(),
                    schema_versions: Vec::new(),
                    code_versions: Vec::new(),
                    created_at: from_text(&created_at)?,
                })
            }

            async fn get_design(&self, owner: Option<&UserId>, id: &DesignId) -> Result<Design> {
                let owner = self.design_owner(owner, id).await?;
                let row = sqlx::query(
                    "SELECT owner, id, name, description, created_at FROM designs \
                     WHERE owner = $1 AND id = $2",
                )
                .bind(&owner)
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("design", id))?;
                self.design_from_row(&row).await
            }

            async fn list_designs(&self, owner: Option<&UserId>) -> Result<Vec<Design>> {
                let rows = sqlx::query(
                    "SELECT owner, id, name, description, created_at FROM designs \
                     WHERE ($1 IS NULL OR owner = $1) ORDER BY owner, id",
                )
                .bind(owner.map(UserId::as_str))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                let mut designs = Vec::with_capacity(rows.len());
                for row in &rows {
                    designs.push(self.design_from_row(row).await?);
                }
                Ok(designs)
            }

            async fn delete_design(&self, owner: Option<&UserId>, id: &DesignId) -> Result<()> {
                let owner = self.design_owner(owner, id).await?;
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let in_use = sqlx::query(&format!(
                    "SELECT id, state FROM jobs WHERE owner = $1 AND design_id = $2 \
                     AND state NOT IN {FINAL_STATES_SQL} ORDER BY id LIMIT 1"
                ))
                .bind(&owner)
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
                if let Some(row) = in_use {
                    return Err(Error::InUse {
                        kind: "design",
                        id: id.to_string(),
                        reason: format!(
                            "job {} is {}",
                            get::<String>(&row, "id")?,
                            get::<String>(&row, "state")?
                        ),
                    });
                }
                let shas: Vec<String> = sqlx::query(
                    "SELECT DISTINCT sha256 FROM codes WHERE owner = $1 AND design_id = $2 \
                     ORDER BY sha256",
                )
                .bind(&owner)
                .bind(id.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?
                .iter()
                .map(|row| get(row, "sha256"))
                .collect::<Result<_>>()?;
                // Blobs are shared by content. Each one's lock is held from here to the commit,
                // so the references counted below are final: an upload of identical code waits
                // for the commit, then finds the blob gone and writes it again.
                for sha in &shas {
                    sqlx::query($lock).bind(sha).execute(&mut *tx).await.map_err(db)?;
                }
                sqlx::query("DELETE FROM designs WHERE owner = $1 AND id = $2")
                    .bind(&owner)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                let mut trashed = Vec::new();
                for sha in shas {
                    let row = sqlx::query("SELECT COUNT(*) AS n FROM codes WHERE sha256 = $1")
                        .bind(&sha)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(db)?;
                    if get::<i64>(&row, "n")? == 0 {
                        match self.blobs.trash(&sha).await {
                            Ok(Some(aside)) => trashed.push(aside),
                            Ok(None) => {}
                            Err(err) => {
                                tracing::warn!(%err, sha256 = %sha, "cannot remove an unused code blob");
                            }
                        }
                    }
                }
                if let Err(err) = tx.commit().await {
                    for aside in trashed {
                        self.blobs.restore(aside).await;
                    }
                    return Err(db(err));
                }
                for aside in trashed {
                    self.blobs.purge(aside).await;
                }
                Ok(())
            }

            async fn put_schema(
                &self,
                owner: Option<&UserId>,
                design: &DesignId,
                schema: &Schema,
            ) -> Result<String> {
                let owner = self.design_owner(owner, design).await?;
                let body = to_json(schema)?;
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let row = sqlx::query(
                    "SELECT COALESCE(MAX(version), 0) AS v FROM schemas \
                     WHERE owner = $1 AND design_id = $2",
                )
                .bind(&owner)
                .bind(design.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                let version = get::<i64>(&row, "v")? + 1;
                sqlx::query(
                    "INSERT INTO schemas (owner, design_id, version, body, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&owner)
                .bind(design.as_str())
                .bind(version)
                .bind(&body)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(|err| {
                    if is_foreign_key_violation(&err) {
                        not_found("design", design)
                    } else {
                        db(err)
                    }
                })?;
                tx.commit().await.map_err(db)?;
                Ok(version.to_string())
            }

            async fn get_schema(
                &self,
                owner: Option<&UserId>,
                design: &DesignId,
                version: Option<&str>,
            ) -> Result<(String, Schema)> {
                let owner = self.design_owner(owner, design).await?;
                let row = match version {
                    Some(version) => sqlx::query(
                        "SELECT version, body FROM schemas \
                         WHERE owner = $1 AND design_id = $2 AND version = $3",
                    )
                    .bind(&owner)
                    .bind(design.as_str())
                    .bind(revision("schema", design.as_str(), version)?),
                    None => sqlx::query(
                        "SELECT version, body FROM schemas WHERE owner = $1 AND design_id = $2 \
                         ORDER BY version DESC LIMIT 1",
                    )
                    .bind(&owner)
                    .bind(design.as_str()),
                }
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| match version {
                    Some(version) => not_found("schema", format!("{design} version {version}")),
                    None => not_found("schema", format!("of design {design}")),
                })?;
                Ok((
                    get::<i64>(&row, "version")?.to_string(),
                    from_json("schema", &get::<String>(&row, "body")?)?,
                ))
            }

            async fn put_code(
                &self,
                owner: Option<&UserId>,
                design: &DesignId,
                zip: &[u8],
            ) -> Result<CodeMeta> {
                let size = zip.len() as u64;
                if size > self.blobs.max_bytes() {
                    return Err(Error::TooLarge {
                        size,
                        limit: self.blobs.max_bytes(),
                    });
                }
                let owner = self.design_owner(owner, design).await?;
                // The blob first (outside the transaction: it may be large), content-addressed,
                // so a failed row insert leaves at most an unreferenced file, never a row
                // without bytes.
                let sha256 = self.blobs.put(zip).await?;
                #[cfg(test)]
                self.blobs.paused().await;
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                // Under the blob's lock, which a design deletion holds from counting references
                // to committing: if one removed the blob since it was written, put it back.
                sqlx::query($lock).bind(&sha256).execute(&mut *tx).await.map_err(db)?;
                self.blobs.put(zip).await?;
                let row = sqlx::query(
                    "SELECT COALESCE(MAX(version), 0) AS v FROM codes \
                     WHERE owner = $1 AND design_id = $2",
                )
                .bind(&owner)
                .bind(design.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                let version = get::<i64>(&row, "v")? + 1;
                sqlx::query(
                    "INSERT INTO codes (owner, design_id, version, size, sha256, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&owner)
                .bind(design.as_str())
                .bind(version)
                .bind(i64::try_from(size).map_err(|_| Error::TooLarge {
                    size,
                    limit: self.blobs.max_bytes(),
                })?)
                .bind(&sha256)
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(|err| {
                    if is_foreign_key_violation(&err) {
                        not_found("design", design)
                    } else {
                        db(err)
                    }
                })?;
                tx.commit().await.map_err(db)?;
                Ok(CodeMeta {
                    version: version.to_string(),
                    size,
                    sha256,
                })
            }

            async fn get_code(
                &self,
                owner: Option<&UserId>,
                design: &DesignId,
                version: Option<&str>,
            ) -> Result<(CodeMeta, Vec<u8>)> {
                let owner = self.design_owner(owner, design).await?;
                let row = match version {
                    Some(version) => sqlx::query(
                        "SELECT version, size, sha256 FROM codes \
                         WHERE owner = $1 AND design_id = $2 AND version = $3",
                    )
                    .bind(&owner)
                    .bind(design.as_str())
                    .bind(revision("code", design.as_str(), version)?),
                    None => sqlx::query(
                        "SELECT version, size, sha256 FROM codes \
                         WHERE owner = $1 AND design_id = $2 ORDER BY version DESC LIMIT 1",
                    )
                    .bind(&owner)
                    .bind(design.as_str()),
                }
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| match version {
                    Some(version) => not_found("code", format!("{design} version {version}")),
                    None => not_found("code", format!("of design {design}")),
                })?;
                let meta = CodeMeta {
                    version: get::<i64>(&row, "version")?.to_string(),
                    size: u64::try_from(get::<i64>(&row, "size")?).unwrap_or(0),
                    sha256: get(&row, "sha256")?,
                };
                let bytes = self.blobs.get(&meta.sha256).await?;
                Ok((meta, bytes))
            }

            async fn create_dataset(&self, owner: &UserId, spec: &DatasetSpec) -> Result<Dataset> {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO datasets (id, owner, name, description, url, data_format, \
                     realm, is_public, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&id)
                .bind(owner.as_str())
                .bind(&spec.name)
                .bind(&spec.description)
                .bind(&spec.url)
                .bind(&spec.data_format)
                .bind(&spec.realm)
                .bind(spec.is_public)
                .bind(now())
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(Dataset {
                    id: DatasetId::new(id),
                    owner: owner.clone(),
                    spec: spec.clone(),
                })
            }

            async fn get_dataset(&self, owner: Option<&UserId>, id: &DatasetId) -> Result<Dataset> {
                let row = sqlx::query(&format!(
                    "SELECT {DATASET_COLUMNS} FROM datasets \
                     WHERE id = $1 AND ($2 IS NULL OR owner = $2 OR is_public)"
                ))
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("dataset", id))?;
                dataset_from_row(&row)
            }

            async fn list_datasets(&self, owner: Option<&UserId>) -> Result<Vec<Dataset>> {
                let rows = sqlx::query(&format!(
                    "SELECT {DATASET_COLUMNS} FROM datasets \
                     WHERE ($1 IS NULL OR owner = $1 OR is_public) ORDER BY created_at, id"
                ))
                .bind(owner.map(UserId::as_str))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(dataset_from_row).collect()
            }

            async fn delete_dataset(&self, owner: Option<&UserId>, id: &DatasetId) -> Result<()> {
                let exists = sqlx::query(
                    "SELECT id FROM datasets WHERE id = $1 AND ($2 IS NULL OR owner = $2)",
                )
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                if exists.is_none() {
                    return Err(not_found("dataset", id));
                }
                self.ensure_unused(
                    "dataset",
                    id.as_str(),
                    "j.id IN (SELECT job_id FROM job_datasets WHERE dataset_id = $1)",
                )
                .await?;
                sqlx::query("DELETE FROM datasets WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn create_compute(&self, spec: &ComputeSpec) -> Result<Compute> {
                sqlx::query(
                    "INSERT INTO computes (id, region, platform, key_sha256, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(spec.compute_id.as_str())
                .bind(&spec.region)
                .bind(platform_text(spec.platform))
                .bind(BlobStore::digest(spec.api_key.as_bytes()))
                .bind(now())
                .execute(&self.pool)
                .await
                .map_err(|err| {
                    if is_unique_violation(&err) {
                        Error::AlreadyExists {
                            kind: "compute",
                            id: spec.compute_id.to_string(),
                        }
                    } else {
                        db(err)
                    }
                })?;
                Ok(Compute {
                    compute_id: spec.compute_id.clone(),
                    region: spec.region.clone(),
                    platform: spec.platform,
                    connected: false,
                })
            }

            async fn get_compute(&self, id: &ComputeId) -> Result<Compute> {
                let row = sqlx::query("SELECT id, region, platform FROM computes WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| not_found("compute", id))?;
                compute_from_row(&row)
            }

            async fn list_computes(&self) -> Result<Vec<Compute>> {
                let rows = sqlx::query("SELECT id, region, platform FROM computes ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(compute_from_row).collect()
            }

            async fn delete_compute(&self, id: &ComputeId) -> Result<()> {
                self.get_compute(id).await?;
                self.ensure_unused(
                    "compute",
                    id.as_str(),
                    "j.id IN (SELECT job_id FROM tasks WHERE compute_id = $1)",
                )
                .await?;
                sqlx::query("DELETE FROM computes WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn set_compute_key(&self, id: &ComputeId, api_key: &str) -> Result<()> {
                let done = sqlx::query("UPDATE computes SET key_sha256 = $1 WHERE id = $2")
                    .bind(BlobStore::digest(api_key.as_bytes()))
                    .bind(id.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                if done.rows_affected() == 0 {
                    return Err(not_found("compute", id));
                }
                Ok(())
            }

            async fn verify_compute_key(&self, id: &ComputeId, key_sha256: &str) -> Result<()> {
                sqlx::query("SELECT id FROM computes WHERE id = $1 AND key_sha256 = $2")
                    .bind(id.as_str())
                    .bind(key_sha256)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| not_found("compute", id))?;
                Ok(())
            }

            async fn create_job(
                &self,
                owner: &UserId,
                spec: &JobSpec,
                schema_version: &str,
                code_version: &str,
            ) -> Result<Job> {
                let id = new_id();
                let created_at = now();
                let spec = stored_spec(spec);
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                sqlx::query(
                    "INSERT INTO jobs (id, owner, design_id, spec, schema_version, code_version, \
                     state, reason, created_at, started_at, updated_at, ended_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'ready', NULL, $7, NULL, $7, NULL)",
                )
                .bind(&id)
                .bind(owner.as_str())
                .bind(spec.design_id.as_str())
                .bind(to_json(&spec)?)
                .bind(schema_version)
                .bind(code_version)
                .bind(&created_at)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                for dataset in spec_datasets(&spec) {
                    sqlx::query("INSERT INTO job_datasets (job_id, dataset_id) VALUES ($1, $2)")
                        .bind(&id)
                        .bind(&dataset)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                let created_at = from_text(&created_at)?;
                Ok(Job {
                    id: JobId::new(id),
                    owner: owner.clone(),
                    spec,
                    schema_version: schema_version.to_owned(),
                    code_version: code_version.to_owned(),
                    state: JobState::Ready,
                    reason: None,
                    created_at,
                    started_at: None,
                    updated_at: created_at,
                    ended_at: None,
                })
            }

            async fn get_job(&self, owner: Option<&UserId>, id: &JobId) -> Result<Job> {
                self.fetch_job(owner, id).await
            }

            async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
                let states = if filter.states.is_empty() {
                    String::new()
                } else {
                    format!(
                        " AND state IN ({})",
                        placeholders(2, filter.states.len())
                    )
                };
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 IS NULL OR owner = $1){states} \
                     ORDER BY created_at, id"
                );
                let mut query = sqlx::query(&sql).bind(filter.owner.as_ref().map(UserId::as_str));
                for state in &filter.states {
                    query = query.bind(state.as_str());
                }
                let rows = query.fetch_all(&self.pool).await.map_err(db)?;
                rows.iter().map(job_from_row).collect()
            }

            async fn update_job_spec(
                &self,
                owner: Option<&UserId>,
                id: &JobId,
                spec: &JobSpec,
                schema_version: &str,
                code_version: &str,
            ) -> Result<Job> {
                let spec = stored_spec(spec);
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let row = sqlx::query(
                    "SELECT state FROM jobs WHERE id = $1 AND ($2 IS NULL OR owner = $2)",
                )
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("job", id))?;
                let state: String = get(&row, "state")?;
                if state != JobState::Ready.as_str() {
                    return Err(Error::Conflict {
                        kind: "job",
                        id: id.to_string(),
                        expected: JobState::Ready.to_string(),
                        actual: state,
                    });
                }
                sqlx::query(
                    "UPDATE jobs SET spec = $1, design_id = $2, schema_version = $3, \
                     code_version = $4, updated_at = $5 WHERE id = $6 AND state = 'ready'",
                )
                .bind(to_json(&spec)?)
                .bind(spec.design_id.as_str())
                .bind(schema_version)
                .bind(code_version)
                .bind(now())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                sqlx::query("DELETE FROM job_datasets WHERE job_id = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                for dataset in spec_datasets(&spec) {
                    sqlx::query("INSERT INTO job_datasets (job_id, dataset_id) VALUES ($1, $2)")
                        .bind(id.as_str())
                        .bind(&dataset)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                self.fetch_job(None, id).await
            }

            async fn delete_job(&self, owner: Option<&UserId>, id: &JobId) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let row = sqlx::query(
                    "SELECT state FROM jobs WHERE id = $1 AND ($2 IS NULL OR owner = $2)",
                )
                .bind(id.as_str())
                .bind(owner.map(UserId::as_str))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("job", id))?;
                let state = job_state(&get::<String>(&row, "state")?)?;
                if !(state.is_final() || state == JobState::Ready) {
                    return Err(Error::Conflict {
                        kind: "job",
                        id: id.to_string(),
                        expected: "ready|completed|failed|terminated".to_owned(),
                        actual: state.to_string(),
                    });
                }
                sqlx::query("DELETE FROM jobs WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn set_job_state(
                &self,
                id: &JobId,
                from: &[JobState],
                to: JobState,
                reason: Option<&str>,
            ) -> Result<Job> {
                let expected = from
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("|");
                if from.is_empty() {
                    let job = self.fetch_job(None, id).await?;
                    return Err(Error::Conflict {
                        kind: "job",
                        id: id.to_string(),
                        expected,
                        actual: job.state.to_string(),
                    });
                }
                let sql = format!(
                    "UPDATE jobs SET state = $1, reason = $2, updated_at = $3, \
                     started_at = CASE WHEN $4 THEN $3 ELSE started_at END, \
                     ended_at = CASE WHEN $5 THEN $3 ELSE ended_at END \
                     WHERE id = $6 AND state IN ({})",
                    placeholders(7, from.len())
                );
                let mut query = sqlx::query(&sql)
                    .bind(to.as_str())
                    .bind(reason)
                    .bind(now())
                    .bind(to == JobState::Starting)
                    .bind(to.is_final())
                    .bind(id.as_str());
                for state in from {
                    query = query.bind(state.as_str());
                }
                let done = query.execute(&self.pool).await.map_err(db)?;
                let job = self.fetch_job(None, id).await?;
                if done.rows_affected() == 0 {
                    return Err(Error::Conflict {
                        kind: "job",
                        id: id.to_string(),
                        expected,
                        actual: job.state.to_string(),
                    });
                }
                Ok(job)
            }

            async fn set_job_reason(&self, id: &JobId, state: JobState, reason: &str) -> Result<()> {
                let done = sqlx::query("UPDATE jobs SET reason = $1 WHERE id = $2 AND state = $3")
                    .bind(reason)
                    .bind(id.as_str())
                    .bind(state.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                if done.rows_affected() == 0 {
                    let job = self.fetch_job(None, id).await?;
                    return Err(Error::Conflict {
                        kind: "job",
                        id: id.to_string(),
                        expected: state.to_string(),
                        actual: job.state.to_string(),
                    });
                }
                Ok(())
            }

            async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                for new in tasks {
                    let task = &new.task;
                    sqlx::query(
                        "INSERT INTO tasks (task_id, job_id, role, idx, group_association, \
                         dataset_id, compute_id, managed, state, log, key_sha256, \
                         participant_key_sha256, updated_at, last_heartbeat) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, $12, NULL) \
                         ON CONFLICT (task_id) DO NOTHING",
                    )
                    .bind(task.task_id.as_str())
                    .bind(task.job_id.as_str())
                    .bind(&task.role)
                    .bind(i64::from(task.index))
                    .bind(to_json(&task.group_association)?)
                    .bind(task.dataset_id.as_ref().map(DatasetId::as_str))
                    .bind(task.compute_id.as_str())
                    .bind(task.managed)
                    .bind(task.state.as_str())
                    .bind(&task.log)
                    .bind(&new.key_sha256)
                    .bind(task.updated_at.map(to_text).unwrap_or_else(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(|err| {
                        if is_foreign_key_violation(&err) {
                            not_found("job", &task.job_id)
                        } else {
                            db(err)
                        }
                    })?;
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn list_tasks(&self, job: &JobId) -> Result<Vec<Task>> {
                self.fetch_job(None, job).await?;
                let rows = sqlx::query(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE job_id = $1 ORDER BY seq"
                ))
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(task_from_row).collect()
            }

            async fn count_tasks(&self, job: &JobId) -> Result<HashMap<TaskState, u64>> {
                self.fetch_job(None, job).await?;
                let rows = sqlx::query(
                    "SELECT state, COUNT(*) AS n FROM tasks WHERE job_id = $1 GROUP BY state",
                )
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        let n: i64 = get(row, "n")?;
                        Ok((task_state(&get::<String>(row, "state")?)?, u64::try_from(n).unwrap_or(0)))
                    })
                    .collect()
            }

            async fn state_counts(&self) -> Result<super::StateCounts> {
                let count = |row: &_| -> Result<u64> {
                    let n: i64 = get(row, "n")?;
                    Ok(u64::try_from(n).unwrap_or(0))
                };
                let jobs = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| Ok((job_state(&get::<String>(row, "state")?)?, count(row)?)))
                    .collect::<Result<_>>()?;
                let tasks = sqlx::query("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| Ok((task_state(&get::<String>(row, "state")?)?, count(row)?)))
                    .collect::<Result<_>>()?;
                Ok(super::StateCounts { jobs, tasks })
            }

            async fn get_task(&self, job: &JobId, task: &TaskId) -> Result<Task> {
                let row = sqlx::query(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE job_id = $1 AND task_id = $2"
                ))
                .bind(job.as_str())
                .bind(task.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("task", task))?;
                task_from_row(&row)
            }

            async fn task_by_key(&self, task: &TaskId, key_sha256: &str) -> Result<Task> {
                let row = sqlx::query(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = $1 \
                     AND CASE WHEN managed THEN key_sha256 = $2 \
                         ELSE participant_key_sha256 IS NOT NULL AND participant_key_sha256 = $2 END \
                     AND job_id IN (SELECT id FROM jobs WHERE state NOT IN {FINAL_STATES_SQL})"
                ))
                .bind(task.as_str())
                .bind(key_sha256)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("task", task))?;
                task_from_row(&row)
            }

            async fn set_task_state(
                &self,
                job: &JobId,
                task: &TaskId,
                state: TaskState,
                log: Option<&str>,
            ) -> Result<Task> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let row = sqlx::query("SELECT state FROM tasks WHERE job_id = $1 AND task_id = $2")
                    .bind(job.as_str())
                    .bind(task.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| not_found("task", task))?;
                let current = task_state(&get::<String>(&row, "state")?)?;
                if !current.can_transition_to(state) {
                    return Err(Error::Conflict {
                        kind: "task",
                        id: task.to_string(),
                        expected: format!("a state that may become {state}"),
                        actual: current.to_string(),
                    });
                }
                sqlx::query(
                    "UPDATE tasks SET state = $1, log = COALESCE($2, log), updated_at = $3 \
                     WHERE task_id = $4 AND state = $5",
                )
                .bind(state.as_str())
                .bind(log)
                .bind(now())
                .bind(task.as_str())
                .bind(current.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                self.get_task(job, task).await
            }

            async fn restart_task(
                &self,
                job: &JobId,
                task: &TaskId,
                restarts: u32,
                log: &str,
            ) -> Result<Task> {
                let done = sqlx::query(
                    "UPDATE tasks SET state = $1, restarts = restarts + 1, log = $2, \
                     updated_at = $3, last_heartbeat = NULL \
                     WHERE job_id = $4 AND task_id = $5 AND state = $6 AND restarts = $7",
                )
                .bind(TaskState::Ready.as_str())
                .bind(log)
                .bind(now())
                .bind(job.as_str())
                .bind(task.as_str())
                .bind(TaskState::Failed.as_str())
                .bind(i64::from(restarts))
                .execute(&self.pool)
                .await
                .map_err(db)?;
                let current = self.get_task(job, task).await?;
                if done.rows_affected() == 0 {
                    return Err(Error::Conflict {
                        kind: "task",
                        id: task.to_string(),
                        expected: format!("failed after {restarts} restarts"),
                        actual: format!("{} after {} restarts", current.state, current.restarts),
                    });
                }
                Ok(current)
            }

            async fn claim_task_key(
                &self,
                job: &JobId,
                task: &TaskId,
                attempt: u32,
            ) -> Result<()> {
                let attempt = i64::from(attempt);
                let done = sqlx::query(&format!(
                    "UPDATE tasks SET key_claimed_attempt = $1 \
                     WHERE job_id = $2 AND task_id = $3 AND managed AND restarts = $1 \
                     AND (key_claimed_attempt IS NULL OR key_claimed_attempt <> $1) \
                     AND job_id IN (SELECT id FROM jobs WHERE id = $2 \
                         AND state NOT IN {FINAL_STATES_SQL})"
                ))
                .bind(attempt)
                .bind(job.as_str())
                .bind(task.as_str())
                .execute(&self.pool)
                .await
                .map_err(db)?;
                if done.rows_affected() == 1 {
                    return Ok(());
                }
                // Refused: say why (the row may change meanwhile; the claim itself was atomic).
                let current = self.get_task(job, task).await?;
                let job_state = self.get_job(None, job).await?.state;
                let conflict = |expected: String, actual: String| Error::Conflict {
                    kind: "task",
                    id: task.to_string(),
                    expected,
                    actual,
                };
                Err(if !current.managed {
                    conflict("platform-run".to_owned(), "participant-run".to_owned())
                } else if job_state.is_final() {
                    Error::Conflict {
                        kind: "job",
                        id: job.to_string(),
                        expected: "a job that has not ended".to_owned(),
                        actual: job_state.to_string(),
                    }
                } else if i64::from(current.restarts) != attempt {
                    conflict(
                        format!("attempt {attempt}"),
                        format!("attempt {} (the task's current one)", current.restarts),
                    )
                } else {
                    conflict(
                        "an attempt whose key was not claimed".to_owned(),
                        format!("attempt {attempt} with its key already claimed"),
                    )
                })
            }

            async fn record_heartbeat(&self, task: &TaskId) -> Result<()> {
                let done = sqlx::query("UPDATE tasks SET last_heartbeat = $1 WHERE task_id = $2")
                    .bind(now())
                    .bind(task.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                if done.rows_affected() == 0 {
                    return Err(not_found("task", task));
                }
                Ok(())
            }

            async fn set_participant_key(
                &self,
                job: &JobId,
                task: &TaskId,
                key_sha256: Option<&str>,
            ) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let row = sqlx::query(
                    "SELECT t.managed AS managed, j.state AS state FROM tasks t \
                     JOIN jobs j ON j.id = t.job_id WHERE t.job_id = $1 AND t.task_id = $2",
                )
                .bind(job.as_str())
                .bind(task.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found("task", task))?;
                if get::<bool>(&row, "managed")? {
                    return Err(Error::Conflict {
                        kind: "task",
                        id: task.to_string(),
                        expected: "participant-run".to_owned(),
                        actual: "platform-run".to_owned(),
                    });
                }
                let state = job_state(&get::<String>(&row, "state")?)?;
                if state.is_final() {
                    return Err(Error::Conflict {
                        kind: "job",
                        id: job.to_string(),
                        expected: "a job that has not ended".to_owned(),
                        actual: state.to_string(),
                    });
                }
                sqlx::query(
                    "UPDATE tasks SET participant_key_sha256 = $1 WHERE job_id = $2 AND task_id = $3",
                )
                .bind(key_sha256)
                .bind(job.as_str())
                .bind(task.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn participant_keys(&self, job: &JobId) -> Result<BTreeSet<TaskId>> {
                let rows = sqlx::query(
                    "SELECT task_id FROM tasks WHERE job_id = $1 AND NOT managed \
                     AND participant_key_sha256 IS NOT NULL",
                )
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(|row| Ok(TaskId::new(get::<String>(row, "task_id")?))).collect()
            }

            async fn add_metrics(
                &self,
                job: &JobId,
                records: &[MetricRecord],
                max_per_task: u64,
            ) -> Result<Vec<usize>> {
                self.fetch_job(None, job).await?;
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                // Each task's count holds until the commit: its lock is taken first.
                let tasks: BTreeSet<&str> = records.iter().map(|r| r.task_id.as_str()).collect();
                let mut counts: HashMap<&str, (u64, u64)> = HashMap::new();
                for task in tasks {
                    sqlx::query($lock)
                        .bind(format!("metrics/{job}/{task}"))
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    let row = sqlx::query(
                        "SELECT COUNT(*) AS n FROM metrics WHERE job_id = $1 AND task_id = $2",
                    )
                    .bind(job.as_str())
                    .bind(task)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db)?;
                    let stored = u64::try_from(get::<i64>(&row, "n")?).unwrap_or_default();
                    counts.insert(task, (stored, 0));
                }
                let received = now();
                let mut stored = Vec::with_capacity(records.len());
                for (index, record) in records.iter().enumerate() {
                    let round = i64::try_from(record.round).unwrap_or(i64::MAX);
                    if let Some(ts) = record.timestamp {
                        // The same record sent again (a restarted task re-sends its last
                        // round's): stored once.
                        let seen = sqlx::query(
                            "SELECT 1 AS one FROM metrics WHERE job_id = $1 AND task_id = $2 \
                             AND round = $3 AND ts = $4",
                        )
                        .bind(job.as_str())
                        .bind(record.task_id.as_str())
                        .bind(round)
                        .bind(to_text(ts))
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db)?;
                        if seen.is_some() {
                            continue;
                        }
                    }
                    sqlx::query(
                        "INSERT INTO metrics (job_id, task_id, role, round, metrics, ts) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(job.as_str())
                    .bind(record.task_id.as_str())
                    .bind(&record.role)
                    .bind(round)
                    .bind(to_json(&record.metrics)?)
                    .bind(record.timestamp.map(to_text).unwrap_or_else(|| received.clone()))
                    .execute(&mut *tx)
                    .await
                    .map_err(|err| {
                        if is_foreign_key_violation(&err) {
                            not_found("job", job)
                        } else {
                            db(err)
                        }
                    })?;
                    stored.push(index);
                    if let Some((_, adding)) = counts.get_mut(record.task_id.as_str()) {
                        *adding += 1;
                    }
                }
                let over = counts
                    .into_iter()
                    .find(|(_, (stored, adding))| stored.saturating_add(*adding) > max_per_task);
                if let Some((task, (stored, adding))) = over {
                    // Dropping the transaction rolls the inserts back.
                    return Err(Error::MetricLimit {
                        task: task.to_owned(),
                        stored,
                        adding,
                        limit: max_per_task,
                    });
                }
                tx.commit().await.map_err(db)?;
                Ok(stored)
            }

            async fn count_metrics(&self, job: &JobId, task: &TaskId) -> Result<u64> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS n FROM metrics WHERE job_id = $1 AND task_id = $2",
                )
                .bind(job.as_str())
                .bind(task.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
                Ok(u64::try_from(get::<i64>(&row, "n")?).unwrap_or(0))
            }

            async fn latest_round(&self, job: &JobId) -> Result<Option<u64>> {
                let row = sqlx::query("SELECT MAX(round) AS r FROM metrics WHERE job_id = $1")
                    .bind(job.as_str())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(get::<Option<i64>>(&row, "r")?.and_then(|r| u64::try_from(r).ok()))
            }

            async fn list_metrics(&self, job: &JobId) -> Result<Vec<MetricRecord>> {
                self.fetch_job(None, job).await?;
                let rows = sqlx::query(
                    "SELECT task_id, role, round, metrics, ts FROM metrics \
                     WHERE job_id = $1 ORDER BY seq",
                )
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        Ok(MetricRecord {
                            task_id: TaskId::new(get::<String>(row, "task_id")?),
                            role: get(row, "role")?,
                            round: u64::try_from(get::<i64>(row, "round")?).unwrap_or(0),
                            metrics: from_json("metrics", &get::<String>(row, "metrics")?)?,
                            timestamp: Some(from_text(&get::<String>(row, "ts")?)?),
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(super) use impl_sql_store;
