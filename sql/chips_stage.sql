-- One batch of chips into this session's staging table. Runs inside a READ ONLY transaction:
-- the recipe's image and label SQL (run by image_tile/label_tile) cannot write anything.
--   orphan        no imagery at all: image_tile returned NULL, or the all-NODATA raster it makes
--                 where no imagery reaches the tile (every band flagged "is nodata"; a real
--                 raster that happens to be all NODATA is not flagged: an empty, not an orphan).
--                 Orphans are stored with NULL image, label and class_counts.
--   nodata_frac   1 for an orphan; else the largest fraction of NODATA pixels over the bands
--                 that declare a NODATA value (0 when none does)
--   class_counts  pixels per label value 0..max(%(max_class)s, largest value in the tile) where
--                 the image has data (pggeolearn.valid_label: NODATA pixels are no class):
--                 class_counts[k + 1] (SQL arrays start at 1) counts class k
--   band_stats    per band [count, mean, stddev (population), min, max] of the image's pixels,
--                 NODATA excluded: the dataset's statistics combine these rows (chips.py)
--                 instead of re-reading every image
-- OFFSET 0 keeps each subquery from being pulled up, so every tile function runs once.
INSERT INTO pg_temp.pggeolearn_chip_stage (tile_id, geom, image, label, nodata_frac, class_counts,
                                           band_stats)
SELECT s.tile_id, s.geom, s.image, s.label,
       CASE WHEN s.image IS NULL THEN 1.0
            ELSE coalesce((SELECT max(1.0 - ST_Count(s.image, b, true)::float8
                                            / (ST_Width(s.image)::float8 * ST_Height(s.image)))
                           FROM generate_series(1, ST_NumBands(s.image)) AS b
                           WHERE ST_BandNoDataValue(s.image, b) IS NOT NULL), 0.0)
       END::real,
       CASE WHEN s.label IS NOT NULL THEN ARRAY(
            SELECT coalesce(v.cnts[array_position(v.vals, k)], 0)
            FROM generate_series(0, greatest(%(max_class)s::integer,
                                             (SELECT max(x) FROM unnest(v.vals) AS x))) AS k
            ORDER BY k)
       END,
       (SELECT array_agg(ARRAY[st.count, st.mean, st.stddev, st.min, st.max]::float8[] ORDER BY b)
        FROM generate_series(1, ST_NumBands(s.image)) AS b,
             LATERAL ST_SummaryStats(s.image, b, true) AS st)
FROM (
    SELECT t.tile_id, ST_Envelope(pggeolearn.tile_ref(%(dataset)s, t.tile_id)) AS geom,
           CASE WHEN NOT o.orphan THEN i.image END AS image,
           CASE WHEN NOT o.orphan THEN pggeolearn.label_tile(%(dataset)s, t.tile_id) END AS label
    FROM unnest(%(tile_ids)s::integer[]) AS t(tile_id)
    CROSS JOIN LATERAL (SELECT pggeolearn.image_tile(%(dataset)s, t.tile_id) AS image OFFSET 0) AS i
    CROSS JOIN LATERAL (
        SELECT i.image IS NULL OR NOT EXISTS (
            SELECT 1 FROM generate_series(1, ST_NumBands(i.image)) AS b
            WHERE NOT ST_BandIsNoData(i.image, b, false)) AS orphan
    ) AS o
    OFFSET 0
) AS s
CROSS JOIN LATERAL (
    SELECT array_agg(vc.value::integer) AS vals, array_agg(vc.count::bigint) AS cnts
    FROM ST_ValueCount(pggeolearn.valid_label(s.image, s.label), 1, false) AS vc
    WHERE vc.value < 255
) AS v
