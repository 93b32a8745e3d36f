-- The tiles of a raster table under one overview tile (the envelope is already shrunk by half
-- a pixel, so tiles that only touch it are left out); uses the GiST index on ST_ConvexHull.
SELECT ST_AsBinary({col})
FROM {table}
WHERE ST_ConvexHull({col}) && ST_MakeEnvelope(%(minx)s, %(miny)s, %(maxx)s, %(maxy)s, %(srid)s)
  AND ST_Width({col}) > 0 AND ST_Height({col}) > 0
