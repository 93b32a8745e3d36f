-- predict: the imagery under one row band of prediction windows, as pieces the client pastes
-- onto the band's grid (pggeolearn.window_piece: aligned rasters unchanged, others warped).
-- The imagery SQL sees a one-row relation `tile` whose tile_geom / tile_rast cover the band.
WITH tile AS (
    SELECT -1 AS tile_id,
           ST_MakeEnvelope(%(minx)s::float8, %(miny)s::float8, %(maxx)s::float8, %(maxy)s::float8,
                           %(srid)s::integer) AS tile_geom,
           ST_MakeEmptyRaster(%(width)s::integer, %(height)s::integer, %(minx)s::float8,
                              %(maxy)s::float8, %(res)s::float8, -%(res)s::float8, 0, 0,
                              %(srid)s::integer) AS tile_rast,
           %(srid)s::integer AS tile_srid, %(res)s::float8 AS tile_res)
SELECT ST_AsBinary(p.piece), p.warped
FROM tile, LATERAL ({imagery}
) AS q, LATERAL pggeolearn.window_piece(q.rast, tile.tile_rast) AS p
WHERE q.rast IS NOT NULL AND p.piece IS NOT NULL
