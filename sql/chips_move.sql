-- Move a staged batch into the chip store (read-write transaction, our SQL only). A chip
-- already there (a stale one, or a rerun after a kill) is replaced, never duplicated; its
-- split is reset and assigned again at the end of the build, unless keep_split (chips
-- refresh): then it keeps its split, and is excluded if it became unusable (an orphan or more
-- NODATA than max_nodata).
INSERT INTO pggeolearn.chips AS c
    (dataset, tile_id, geom, image, label, split, nodata_frac, class_counts, band_stats,
     recipe_hash, dataset_version, built_at)
SELECT %(dataset)s, s.tile_id, s.geom, s.image, s.label, NULL, s.nodata_frac, s.class_counts,
       s.band_stats, %(recipe_hash)s, %(dataset_version)s, now()
FROM pg_temp.pggeolearn_chip_stage AS s
ON CONFLICT (dataset, tile_id) DO UPDATE SET
    geom = EXCLUDED.geom, image = EXCLUDED.image, label = EXCLUDED.label,
    split = CASE WHEN NOT %(keep_split)s THEN NULL
                 WHEN EXCLUDED.image IS NULL OR EXCLUDED.nodata_frac > %(max_nodata)s THEN 'excluded'
                 ELSE c.split END,
    nodata_frac = EXCLUDED.nodata_frac, class_counts = EXCLUDED.class_counts,
    band_stats = EXCLUDED.band_stats,
    recipe_hash = EXCLUDED.recipe_hash, dataset_version = EXCLUDED.dataset_version,
    built_at = EXCLUDED.built_at
