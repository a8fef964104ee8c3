-- Secrets at rest and their lifetime (keep in step with ../sqlite/0002_secrets.sql).
-- Tokens get a public id (to list and revoke them), a description and an optional expiry;
-- existing tokens take the first 16 hex digits of their hash as id and never expire.
ALTER TABLE tokens ADD COLUMN id TEXT;
UPDATE tokens SET id = substr(sha256, 1, 16);
ALTER TABLE tokens ALTER COLUMN id SET NOT NULL;
CREATE UNIQUE INDEX tokens_id ON tokens(id);
CREATE INDEX tokens_user ON tokens(user_id, created_at);
ALTER TABLE tokens ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN expires_at TEXT;
-- Task keys are kept only as hashes: a platform-run task's key is derived by the controller from
-- a secret outside the database whenever it deploys the task, so the plain column goes.
ALTER TABLE tasks DROP COLUMN task_key;
-- A participant-run task's key is minted by its job's owner (`fledgectl job join`), never
-- pinned on first use; keys pinned before this migration stay valid until revoked.
ALTER TABLE tasks RENAME COLUMN pinned_key_sha256 TO participant_key_sha256;
