-- runs: mark failed every run still 'running' whose process is gone. A live run's process holds
-- the session advisory lock (lock_class, run_id) on its own connection for as long as it runs;
-- the lock is free when that session ended (the process died, was killed, or lost the server).
-- The xact lock taken here to test it is released when this statement's transaction ends.
UPDATE pggeolearn.runs
SET status = 'failed', finished_at = now(),
    error = 'lost: the process running it ended without finishing (noticed by ' || %(by)s || ')'
WHERE status = 'running'
  AND pg_try_advisory_xact_lock(%(lock_class)s::integer, mod(run_id, 2147483648)::integer)
RETURNING run_id
