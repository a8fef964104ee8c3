-- The apiserver bounds the metric records each task may store: counting them per task needs
-- an index on (job, task).
CREATE INDEX metrics_task ON metrics(job_id, task_id);
