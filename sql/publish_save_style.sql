-- Store one style for a layer the way QGIS's saveStyle does; a default style unsets the default
-- flag of the layer's other styles (run publish_delete_style first: one row per style name).
-- Vector layers: f_geometry_column = the geometry column, r_raster_column NULL, type e.g.
-- 'Polygon'. Raster layers: f_geometry_column NULL, r_raster_column = the raster column.
WITH unset AS (
    UPDATE public.layer_styles SET useasdefault = false
    WHERE f_table_catalog = current_database() AND f_table_schema = %(schema)s::varchar
      AND f_table_name = %(table)s::varchar
      AND f_geometry_column IS NOT DISTINCT FROM %(geometry_column)s::varchar
      AND r_raster_column IS NOT DISTINCT FROM %(raster_column)s::varchar
      AND %(default)s::boolean
    RETURNING id
)
INSERT INTO public.layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column,
                                 stylename, styleqml, stylesld, useasdefault, description, owner,
                                 type, r_raster_column)
SELECT current_database(), %(schema)s::varchar, %(table)s::varchar, %(geometry_column)s::varchar, %(name)s::text,
       XMLPARSE(DOCUMENT %(qml)s::text), NULL, %(default)s::boolean, %(description)s::text, CURRENT_USER,
       %(type)s::varchar, %(raster_column)s::varchar
FROM (SELECT count(*) FROM unset) AS u
RETURNING id
