-- The raster constraints raster2pgsql -C adds, for tables pggeolearn writes (imports and
-- prediction outputs), so they show in raster_columns (QGIS, GDAL's PostGISRaster driver) with
-- SRID, pixel size, block size, bands, pixel types, NODATA and extent. A flag that does not hold
-- (same alignment for files on different grids, block size when edge tiles are smaller) is
-- skipped with a NOTICE.
SELECT AddRasterConstraints(
    %(schema)s::name, %(table)s::name, %(column)s::name,
    true,   -- srid
    true,   -- scale_x
    true,   -- scale_y
    true,   -- blocksize_x
    true,   -- blocksize_y
    true,   -- same_alignment
    false,  -- regular_blocking (raster2pgsql leaves it off)
    true,   -- num_bands
    true,   -- pixel_types
    true,   -- nodata_values
    true,   -- out_db
    true    -- extent
)
