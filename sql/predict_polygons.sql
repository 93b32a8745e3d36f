-- predict: one polygon per connected object. The pieces (one per 4-connected component of a
-- class inside one output tile, vectorized on the client) were grouped on the client: pieces
-- sharing an edge across a tile border have the same group. Here each group of at least
-- min_pixels pixels is dissolved (ST_Union only where a group has several pieces), simplified
-- by half a pixel, made valid and measured in ground metres (on the geography). The CTEs are
-- MATERIALIZED: inlined, each expensive call (union, simplify, validity) ran once per reference.
WITH names AS (
    SELECT * FROM unnest(%(class_ids)s::integer[], %(class_names)s::text[]) AS n(class_id, class_name)
), joined AS MATERIALIZED (
    SELECT g.group_id, s.class_id, s.px, s.prob_sum, s.wkb
    FROM pg_temp.pggeolearn_pieces AS s
    JOIN pg_temp.pggeolearn_piece_groups AS g USING (piece_id)
), sizes AS (
    SELECT group_id, count(*) AS n FROM joined
    GROUP BY group_id HAVING sum(px) >= %(min_pixels)s::bigint
), merged AS MATERIALIZED (
    SELECT j.class_id, j.px, j.prob_sum, ST_GeomFromWKB(j.wkb, %(srid)s::integer) AS geom
    FROM joined AS j JOIN sizes AS z USING (group_id) WHERE z.n = 1
    UNION ALL
    SELECT min(j.class_id), sum(j.px), sum(j.prob_sum), ST_Union(ST_GeomFromWKB(j.wkb, %(srid)s::integer))
    FROM joined AS j JOIN sizes AS z USING (group_id) WHERE z.n > 1
    GROUP BY j.group_id
), simple AS MATERIALIZED (
    SELECT m.class_id, m.px, m.prob_sum, ST_SimplifyPreserveTopology(m.geom, %(tolerance)s::float8) AS geom
    FROM merged AS m
), clean AS MATERIALIZED (
    SELECT s.class_id, s.px, s.prob_sum,
           ST_Multi(CASE WHEN ST_IsValid(s.geom) THEN s.geom
                         ELSE ST_CollectionExtract(ST_MakeValid(s.geom), 3) END) AS geom
    FROM simple AS s
)
INSERT INTO {table} (class_id, class_name, area_m2, pixels, mean_prob, model, run_id, geom)
SELECT c.class_id, n.class_name, ST_Area(ST_Transform(c.geom, 4326)::geography), c.px,
       c.prob_sum / c.px, %(model)s::text, %(run_id)s::bigint, c.geom
FROM clean AS c LEFT JOIN names AS n USING (class_id)
WHERE NOT ST_IsEmpty(c.geom)
ORDER BY ST_YMax(c.geom) DESC, ST_XMin(c.geom), c.class_id
