-- The chips of a dataset as spatial splits see them: grid position (tile_id), whether they may
-- be trained on at all (imagery present, at most %(max_nodata)s NODATA), and pixels per class.
SELECT tile_id,
       (image IS NOT NULL AND nodata_frac <= %(max_nodata)s) AS eligible,
       class_counts
FROM pggeolearn.chips
WHERE dataset = %(dataset)s
ORDER BY tile_id
