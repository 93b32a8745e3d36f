-- predict: the first raster the imagery (a table's SELECT or a recipe's image SQL) returns over
-- the whole prediction extent: its grid and bands decide how windows are read. No row: no
-- imagery in the extent. The imagery SQL is embedded as a subquery (q).
WITH tile AS (
    SELECT -1 AS tile_id,
           ST_MakeEnvelope(%(minx)s::float8, %(miny)s::float8, %(maxx)s::float8, %(maxy)s::float8,
                           %(srid)s::integer) AS tile_geom,
           ST_MakeEmptyRaster(1, 1, %(minx)s::float8, %(maxy)s::float8,
                              %(maxx)s::float8 - %(minx)s::float8, %(miny)s::float8 - %(maxy)s::float8,
                              0, 0, %(srid)s::integer) AS tile_rast,
           %(srid)s::integer AS tile_srid, %(res)s::float8 AS tile_res)
SELECT ST_SRID(q.rast), ST_ScaleX(q.rast), ST_ScaleY(q.rast), ST_SkewX(q.rast), ST_SkewY(q.rast),
       ST_UpperLeftX(q.rast), ST_UpperLeftY(q.rast), ST_NumBands(q.rast),
       ARRAY(SELECT ST_BandPixelType(q.rast, b) FROM generate_series(1, ST_NumBands(q.rast)) AS b)
FROM tile, LATERAL ({imagery}
) AS q
WHERE q.rast IS NOT NULL
LIMIT 1
