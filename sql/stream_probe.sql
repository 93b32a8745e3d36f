-- GeoStream: band count, pixel type and size of the first non-NULL chip of some splits.
SELECT tile_id, ST_NumBands(image), ST_BandPixelType(image, 1), ST_Width(image), ST_Height(image)
FROM pggeolearn.chips
WHERE dataset = %(dataset)s AND split = ANY(%(splits)s::text[]) AND image IS NOT NULL
ORDER BY tile_id
LIMIT 1
