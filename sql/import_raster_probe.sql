-- One tile of an existing raster table (for --append): its grid, SRID and band layout, so that
-- new tiles can be checked against it and placed on the same grid. No row: an empty table.
SELECT ST_UpperLeftX(rast) AS ulx, ST_UpperLeftY(rast) AS uly,
       ST_ScaleX(rast) AS scalex, ST_ScaleY(rast) AS scaley,
       ST_SkewX(rast) AS skewx, ST_SkewY(rast) AS skewy, ST_SRID(rast) AS srid,
       ARRAY(SELECT ST_BandPixelType(rast, b) FROM generate_series(1, ST_NumBands(rast)) AS b)
         AS pixel_types
FROM {table}
WHERE rast IS NOT NULL
LIMIT 1
