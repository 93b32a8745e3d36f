-- Per-chip band statistics ([count, mean, stddev, min, max] per band, NODATA excluded; written
-- by chips build) of the TRAIN chips, in tile order: chips.combine_band_stats() turns them into
-- what the loader normalizes with and a trained model carries.
SELECT c.band_stats
FROM pggeolearn.chips AS c
WHERE c.dataset = %(dataset)s AND c.split = 'train' AND c.band_stats IS NOT NULL
ORDER BY c.tile_id
