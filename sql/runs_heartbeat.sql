-- runs: the run's process is alive; record its progress (outputs, checkpoint: NULL keeps them).
-- A run marked failed while its process had lost the server (runs_reap) is running again.
UPDATE pggeolearn.runs
SET heartbeat_at = now(), status = 'running', error = NULL, finished_at = NULL,
    outputs = coalesce(%(outputs)s, outputs), checkpoint = coalesce(%(checkpoint)s, checkpoint)
WHERE run_id = %(run_id)s
RETURNING run_id
