-- Remove a layer's style of one name (before saving it again, as QGIS's saveStyle replaces it).
DELETE FROM public.layer_styles
WHERE f_table_catalog = current_database() AND f_table_schema = %(schema)s::varchar
  AND f_table_name = %(table)s::varchar
  AND f_geometry_column IS NOT DISTINCT FROM %(geometry_column)s::varchar
  AND r_raster_column IS NOT DISTINCT FROM %(raster_column)s::varchar
  AND stylename = %(name)s::text
