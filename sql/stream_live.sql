-- GeoStream live mode: tiles computed on the fly from the dataset recipe (no chip store),
-- in the order the client chose. Runs in a READ ONLY transaction under statement_timeout.
--   ids      integer[]  tile ids of the grid, in delivery order
--   dataset  text
SELECT o.tile_id,
       ST_AsBinary(pggeolearn.image_tile(%(dataset)s, o.tile_id)),
       ST_AsBinary(pggeolearn.label_tile(%(dataset)s, o.tile_id))
FROM unnest(%(ids)s::integer[]) WITH ORDINALITY AS o(tile_id, n)
ORDER BY o.n
