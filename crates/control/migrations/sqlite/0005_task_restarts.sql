-- A task the controller redeploys after a failure (its role's restart policy) counts its
-- restarts; deployers and the apiserver tell a worker's attempts apart by that count.
ALTER TABLE tasks ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
-- A restarted aggregator re-sends the record of its last persisted round: the insert skips a
-- record already stored (same task, round and timestamp), found through this index.
CREATE INDEX metrics_task_round ON metrics(job_id, task_id, round);
