-- Fledge control-plane schema, PostgreSQL dialect (keep in step with ../sqlite/0001_init.sql).
-- Timestamps are RFC 3339 UTC text with microseconds, so they sort as text.
-- JSON documents (schemas, job specs, group associations, metrics) are text.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    is_admin BOOLEAN NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE tokens (
    sha256 TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
CREATE TABLE designs (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE TABLE schemas (
    owner TEXT NOT NULL,
    design_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (owner, design_id, version),
    FOREIGN KEY (owner, design_id) REFERENCES designs(owner, id) ON DELETE CASCADE
);
CREATE TABLE codes (
    owner TEXT NOT NULL,
    design_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (owner, design_id, version),
    FOREIGN KEY (owner, design_id) REFERENCES designs(owner, id) ON DELETE CASCADE
);
CREATE INDEX codes_sha256 ON codes(sha256);
CREATE TABLE datasets (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    url TEXT NOT NULL,
    data_format TEXT NOT NULL,
    realm TEXT NOT NULL,
    is_public BOOLEAN NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE computes (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    platform TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    design_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    code_version TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    updated_at TEXT NOT NULL,
    ended_at TEXT
);
CREATE INDEX jobs_owner ON jobs(owner, created_at);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE job_datasets (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    dataset_id TEXT NOT NULL,
    PRIMARY KEY (job_id, dataset_id)
);
CREATE INDEX job_datasets_dataset ON job_datasets(dataset_id);
CREATE TABLE tasks (
    seq BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    idx BIGINT NOT NULL,
    group_association TEXT NOT NULL,
    dataset_id TEXT,
    compute_id TEXT NOT NULL,
    managed BOOLEAN NOT NULL,
    state TEXT NOT NULL,
    log TEXT NOT NULL,
    task_key TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    pinned_key_sha256 TEXT,
    updated_at TEXT,
    last_heartbeat TEXT
);
CREATE INDEX tasks_job ON tasks(job_id, seq);
CREATE INDEX tasks_compute ON tasks(compute_id);
CREATE TABLE metrics (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    task_id TEXT NOT NULL,
    role TEXT NOT NULL,
    round BIGINT NOT NULL,
    metrics TEXT NOT NULL,
    ts TEXT NOT NULL
);
CREATE INDEX metrics_job ON metrics(job_id, seq);
