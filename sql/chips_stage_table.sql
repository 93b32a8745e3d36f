-- A worker connection's staging table for `chips build`. Created once per session, before any
-- READ ONLY transaction: PostgreSQL lets a read-only transaction write into temporary tables
-- only, so the recipe's SQL (inside image_tile/label_tile) runs read-only while its results
-- land here; a separate read-write transaction then moves them into pggeolearn.chips.
-- Rasters are kept uncompressed (pglz costs ~12x on write), as in pggeolearn.chips.
CREATE TEMP TABLE IF NOT EXISTS pggeolearn_chip_stage (
    tile_id integer NOT NULL,
    geom geometry NOT NULL,
    image raster,
    label raster,
    nodata_frac real NOT NULL,
    class_counts bigint[],
    band_stats float8[]
);
ALTER TABLE pg_temp.pggeolearn_chip_stage ALTER COLUMN image SET STORAGE EXTERNAL;
ALTER TABLE pg_temp.pggeolearn_chip_stage ALTER COLUMN label SET STORAGE EXTERNAL;
TRUNCATE pg_temp.pggeolearn_chip_stage;
-- Load PostGIS (raster: GDAL's drivers, ~0.1 s) now, while the other workers connect too.
SELECT NULL::raster IS NULL, NULL::geometry IS NULL;
