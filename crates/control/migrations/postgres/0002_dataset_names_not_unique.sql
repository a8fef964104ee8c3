-- Dataset names need not be unique (Cisco Flame's examples register many datasets called
-- "MNIST dataset"): a dataset is identified by its id.
ALTER TABLE datasets DROP CONSTRAINT IF EXISTS datasets_owner_name_key;
CREATE INDEX IF NOT EXISTS datasets_owner_name ON datasets(owner, name);
