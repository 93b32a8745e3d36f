-- GeoStream: band count, pixel type and size of the first non-NULL chip of some splits.
-- The LIMIT sits in a subquery so that, whatever plan is chosen (a sort of the whole split when
-- the index is not used), the raster functions run on one chip only.
SELECT tile_id, ST_NumBands(image), ST_BandPixelType(image, 1), ST_Width(image), ST_Height(image)
FROM (SELECT tile_id, image
      FROM pggeolearn.chips
      WHERE dataset = %(dataset)s AND split = ANY(%(splits)s::text[]) AND image IS NOT NULL
      ORDER BY tile_id
      LIMIT 1) first_chip
