-- evaluate: the chips of one split with imagery, in tile order (the model's input and truth).
SELECT tile_id, ST_AsBinary(image), ST_AsBinary(label), ST_AsBinary(geom)
FROM pggeolearn.chips
WHERE dataset = %(dataset)s AND split = %(split)s AND image IS NOT NULL
ORDER BY tile_id
