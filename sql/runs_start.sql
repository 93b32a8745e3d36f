-- runs: a new run, alive (heartbeat now). A training run reserves its model name: the partial
-- unique index runs_one_training_per_model refuses a second running training of one model.
INSERT INTO pggeolearn.runs (kind, model, dataset, params, extent, status, heartbeat_at)
VALUES (%(kind)s, %(model)s, %(dataset)s, %(params)s,
        CASE WHEN %(srid)s::integer IS NOT NULL
             THEN ST_MakeEnvelope(%(minx)s::float8, %(miny)s::float8, %(maxx)s::float8,
                                  %(maxy)s::float8, %(srid)s::integer) END,
        'running', now())
RETURNING run_id
