-- Constraints of a raster table loaded by `pggeolearn import raster`, exactly those that
-- `raster2pgsql -C` asks for, so the table shows up in raster_columns (and in QGIS) the same way.
-- Each flag is tried on its own: one that does not hold (say, same alignment for files on
-- different grids) is skipped with a NOTICE and the function returns false.
SELECT AddRasterConstraints(
    %(schema)s::name, %(table)s::name, 'rast'::name,
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
