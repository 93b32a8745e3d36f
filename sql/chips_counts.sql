-- What the chip store holds for one dataset: chips per split and the reasons chips are unusable.
SELECT count(*) AS chips,
       count(*) FILTER (WHERE split = 'train') AS train,
       count(*) FILTER (WHERE split = 'val') AS val,
       count(*) FILTER (WHERE split = 'test') AS test,
       count(*) FILTER (WHERE split = 'excluded') AS excluded,
       count(*) FILTER (WHERE split IS NULL) AS unassigned,
       count(*) FILTER (WHERE image IS NULL) AS orphans,
       count(*) FILTER (WHERE image IS NOT NULL AND nodata_frac >= 1) AS empties,
       count(*) FILTER (WHERE image IS NOT NULL AND nodata_frac > %(max_nodata)s) AS mostly_nodata,
       count(*) FILTER (WHERE class_counts IS NOT NULL AND coalesce(
           (SELECT sum(n) FROM unnest(class_counts[2:]) AS n), 0) = 0) AS background_only,
       count(*) FILTER (WHERE recipe_hash <> %(recipe_hash)s) AS stale,
       max(ST_NumBands(image)) AS nbands,
       max(built_at) AS built_at
FROM pggeolearn.chips
WHERE dataset = %(dataset)s
