-- The grid of a raster table, for building its overviews: how many tiles, whether they share
-- SRID, pixel size, band layout and alignment, any skew, and the extent in the tiles' CRS
-- with one tile's SRID, pixel size, block size (the largest tile), bands, pixel types, NODATA.
WITH t AS (
    SELECT {col} AS r,
           ARRAY(SELECT ST_BandPixelType({col}, b) || ':' || coalesce(ST_BandNoDataValue({col}, b)::text, '')
                 FROM generate_series(1, ST_NumBands({col})) AS b) AS layout
    FROM {table} WHERE {col} IS NOT NULL AND ST_Width({col}) > 0 AND ST_Height({col}) > 0
), one AS (
    SELECT r FROM t LIMIT 1
)
SELECT count(*),
       count(DISTINCT ST_SRID(r)),
       count(DISTINCT (ST_ScaleX(r), ST_ScaleY(r))),
       count(*) FILTER (WHERE ST_SkewX(r) <> 0 OR ST_SkewY(r) <> 0),
       count(DISTINCT layout),
       coalesce(ST_SameAlignment(r), false),
       (SELECT ST_SRID(r) FROM one), (SELECT ST_ScaleX(r) FROM one), (SELECT ST_ScaleY(r) FROM one),
       min(ST_UpperLeftX(r)), max(ST_UpperLeftY(r)),
       max(ST_UpperLeftX(r) + ST_Width(r) * ST_ScaleX(r)),
       min(ST_UpperLeftY(r) + ST_Height(r) * ST_ScaleY(r)),
       max(ST_Width(r)), max(ST_Height(r)),
       (SELECT ST_NumBands(r) FROM one),
       (SELECT ARRAY(SELECT ST_BandPixelType(r, b) FROM generate_series(1, ST_NumBands(r)) AS b) FROM one),
       (SELECT ARRAY(SELECT ST_BandNoDataValue(r, b) FROM generate_series(1, ST_NumBands(r)) AS b) FROM one)
FROM t
