-- The latest finished prediction and evaluation of each output table of one dataset (runs of
-- the dataset, or of its models; %(models)s narrows to some models), whose tables still exist,
-- with the run's extent in the dataset's CRS: what `pggeolearn qgis project` puts in a project.
WITH r AS (
    SELECT r.run_id, r.kind, r.model, r.outputs, r.params, r.extent
    FROM pggeolearn.runs AS r
    WHERE r.status = 'done' AND r.kind IN ('predict', 'evaluate')
      AND (r.dataset = %(dataset)s
           OR r.model IN (SELECT m.name FROM pggeolearn.models AS m WHERE m.dataset = %(dataset)s))
      AND (%(models)s::text[] IS NULL OR r.model = ANY (%(models)s::text[]))
), latest AS (
    SELECT DISTINCT ON (kind, coalesce(outputs ->> 'class_raster', params ->> 'out_layer'))
           run_id, kind, model,
           outputs ->> 'class_raster' AS class_raster,
           outputs ->> 'probabilities' AS probabilities,
           outputs ->> 'polygons' AS polygons,
           params ->> 'out_layer' AS eval_layer,
           params ->> 'imagery' AS imagery,
           extent
    FROM r
    ORDER BY kind, coalesce(outputs ->> 'class_raster', params ->> 'out_layer'), run_id DESC
)
SELECT run_id, kind, model,
       CASE WHEN to_regclass(class_raster) IS NOT NULL THEN class_raster END,
       CASE WHEN to_regclass(probabilities) IS NOT NULL THEN probabilities END,
       CASE WHEN to_regclass(polygons) IS NOT NULL THEN polygons END,
       CASE WHEN to_regclass(eval_layer) IS NOT NULL THEN eval_layer END,
       imagery,
       ST_XMin(b), ST_YMin(b), ST_XMax(b), ST_YMax(b)
FROM latest
LEFT JOIN LATERAL (SELECT ST_Transform(extent, %(srid)s)::box2d AS b WHERE extent IS NOT NULL) AS e ON true
WHERE coalesce(to_regclass(class_raster), to_regclass(eval_layer)) IS NOT NULL
ORDER BY run_id
