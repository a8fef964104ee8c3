-- Dataset names need not be unique (Cisco Flame's examples register many datasets called
-- "MNIST dataset"): a dataset is identified by its id. SQLite cannot drop a constraint, so the
-- table is rebuilt; nothing references it by foreign key.
CREATE TABLE datasets_new (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    url TEXT NOT NULL,
    data_format TEXT NOT NULL,
    realm TEXT NOT NULL,
    is_public BOOLEAN NOT NULL,
    created_at TEXT NOT NULL
);
INSERT INTO datasets_new (id, owner, name, description, url, data_format, realm, is_public, created_at)
    SELECT id, owner, name, description, url, data_format, realm, is_public, created_at FROM datasets;
DROP TABLE datasets;
ALTER TABLE datasets_new RENAME TO datasets;
CREATE INDEX datasets_owner_name ON datasets(owner, name);
