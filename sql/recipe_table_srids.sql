-- The geometry and raster columns of the tables a recipe query reads, with their SRIDs
-- (0: the column does not declare one), for the hint when the query finds nothing.
SELECT f_table_schema || '.' || f_table_name, f_geometry_column::text, srid
FROM geometry_columns
WHERE f_table_schema || '.' || f_table_name = ANY(%(tables)s)
UNION ALL
SELECT r_table_schema || '.' || r_table_name, r_raster_column::text, coalesce(srid, 0)
FROM raster_columns
WHERE r_table_schema || '.' || r_table_name = ANY(%(tables)s)
ORDER BY 1, 2
