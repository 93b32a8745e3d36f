-- runs: a new run, alive (heartbeat now). A training run reserves its model name: the partial
-- unique index runs_one_training_per_model refuses a second running training of one model.
-- Lineage: the run records the version and recipe hash of the dataset it reads (a catalog row
-- "NAME" or "NAME@N"; "NAME@N" also names the current version N), else those the model was
-- trained on.
INSERT INTO pggeolearn.runs (kind, model, dataset, params, extent, status, heartbeat_at,
                             dataset_version, recipe_hash)
SELECT %(kind)s, %(model)s, %(dataset)s, %(params)s,
       CASE WHEN %(srid)s::integer IS NOT NULL
            THEN ST_MakeEnvelope(%(minx)s::float8, %(miny)s::float8, %(maxx)s::float8,
                                 %(maxy)s::float8, %(srid)s::integer) END,
       'running', now(),
       CASE WHEN %(dataset)s::text IS NULL THEN m.dataset_version ELSE d.version END,
       CASE WHEN %(dataset)s::text IS NULL THEN m.recipe_hash ELSE d.recipe_hash END
FROM (SELECT 1) AS one
LEFT JOIN pggeolearn.datasets AS d
       ON d.name = %(dataset)s::text
       OR (d.name = split_part(%(dataset)s::text, '@', 1) AND %(dataset)s::text = d.name || '@' || d.version)
LEFT JOIN pggeolearn.models AS m ON m.name = %(model)s::text
RETURNING run_id
