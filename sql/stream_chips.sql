-- GeoStream: chips of one dataset in the order the client chose (the epoch order), for
-- COPY ... TO STDOUT (FORMAT BINARY) or a binary server-side cursor.
--   ids      integer[]  tile ids in delivery order (may repeat: padding)
--   dataset  text
-- The inner ORDER BY sorts only (n, TOAST pointers): ST_AsBinary runs after it, row by row,
-- so no rasters are materialized in a sort. unnest WITH ORDINALITY is known to be ordered by n,
-- so with an index nested loop there is no sort at all. A missing chip comes out as a row
-- with NULL image and label (LEFT JOIN): the client names it instead of silently dropping it.
SELECT s.tile_id, ST_AsBinary(s.image), ST_AsBinary(s.label)
FROM (
    SELECT o.n, o.tile_id, c.image, c.label
    FROM unnest(%(ids)s::integer[]) WITH ORDINALITY AS o(tile_id, n)
    LEFT JOIN pggeolearn.chips c ON c.dataset = %(dataset)s AND c.tile_id = o.tile_id
    ORDER BY o.n
) s
ORDER BY s.n
