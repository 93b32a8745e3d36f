-- Per-band statistics over the TRAIN chips of a dataset, NODATA pixels excluded: what the
-- loader normalizes with and what a trained model carries. stddev is the population one.
-- Ordered by tile_id so that the floating-point sums, and the numbers, are reproducible.
SELECT x.band, (x.s).count, (x.s).mean, (x.s).stddev, (x.s).min, (x.s).max
FROM (
    SELECT b AS band, ST_SummaryStatsAgg(c.image, b, true ORDER BY c.tile_id) AS s
    FROM pggeolearn.chips AS c
    CROSS JOIN generate_series(1, %(nbands)s::integer) AS b
    WHERE c.dataset = %(dataset)s AND c.split = 'train' AND c.image IS NOT NULL
    GROUP BY b
) AS x
ORDER BY x.band
