-- What raster_columns says about one table's raster column after AddRasterConstraints
-- (NULL / false where a constraint could not be added).
SELECT srid, scale_x, scale_y, blocksize_x, blocksize_y, same_alignment, num_bands,
       pixel_types, nodata_values, extent IS NOT NULL AS has_extent
FROM raster_columns
WHERE r_table_schema = %(schema)s AND r_table_name = %(table)s AND r_raster_column = 'rast'
