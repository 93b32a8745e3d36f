-- `pggeolearn review`: compare the predicted objects of one run with the features of a map
-- table (e.g. osm2pgsql's planet_osm_polygon) inside the run's extent, in the prediction's CRS.
-- Two shapes "overlap" when their interiors share area (touching is not overlapping).
-- new: a predicted object overlapping no map feature; changed: one whose IoU with the union
-- of the map features it overlaps is below %(iou)s; missing: a map feature under the predicted
-- class raster's tiles (where the model saw imagery) that no predicted object overlaps. Matched
-- objects (IoU >= threshold) are not listed.
WITH area AS (
    SELECT ST_Transform(extent, %(map_srid)s) AS g FROM pggeolearn.runs WHERE run_id = %(run_id)s
), m AS (
    SELECT {map_key}::text AS map_id,
           ST_Multi(ST_CollectionExtract(ST_MakeValid(ST_Transform(ST_Force2D(t.{map_geom}), %(srid)s)), 3)) AS geom
    FROM {map} AS t, area
    WHERE t.{map_geom} && area.g AND ST_Dimension(t.{map_geom}) = 2
), p AS (
    SELECT id AS pred_id, class_name, area_m2, geom FROM {pred} WHERE class_id = ANY (%(class_ids)s)
), pm AS (
    SELECT p.pred_id, p.class_name, p.area_m2, p.geom,
           array_agg(m.map_id ORDER BY m.map_id) FILTER (WHERE m.map_id IS NOT NULL) AS map_ids,
           ST_Union(m.geom) AS mgeom
    FROM p LEFT JOIN m ON p.geom && m.geom AND ST_Relate(p.geom, m.geom, '2********')
    GROUP BY p.pred_id, p.class_name, p.area_m2, p.geom
), scored AS (
    SELECT *, ST_Area(ST_Intersection(geom, mgeom)) / nullif(ST_Area(ST_Union(geom, mgeom)), 0) AS iou
    FROM pm
)
INSERT INTO {table} (kind, iou, class_name, area_m2, pred_id, map_ids, run_id, geom)
SELECT CASE WHEN mgeom IS NULL THEN 'new' ELSE 'changed' END, iou, class_name, area_m2, pred_id, map_ids,
       %(run_id)s, geom
FROM scored
WHERE mgeom IS NULL OR iou < %(iou)s
UNION ALL
SELECT 'missing', NULL, NULL, ST_Area(ST_Transform(m.geom, 4326)::geography), NULL, ARRAY[m.map_id],
       %(run_id)s, m.geom
FROM m
WHERE NOT ST_IsEmpty(m.geom)
  AND EXISTS (SELECT 1 FROM {cls} AS c
              WHERE ST_ConvexHull(c.rast) && m.geom AND ST_Intersects(ST_ConvexHull(c.rast), m.geom))
  AND NOT EXISTS (SELECT 1 FROM p WHERE p.geom && m.geom AND ST_Relate(p.geom, m.geom, '2********'))
