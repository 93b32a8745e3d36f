-- A deterministic sample of chips for `chips show`: ordered by a hash of (seed, tile_id).
SELECT tile_id, split, ST_AsBinary(image) AS image, ST_AsBinary(label) AS label, nodata_frac
FROM pggeolearn.chips
WHERE dataset = %(dataset)s
  AND (%(split)s::text IS NULL OR split = %(split)s::text)
ORDER BY md5(%(seed)s::text || ':' || tile_id::text), tile_id
LIMIT %(n)s
