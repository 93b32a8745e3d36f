-- public.layer_styles exactly as QGIS creates it (QgsPostgresUtils::createStylesTable, QGIS 3.x:
-- styleName/styleQML/... are unquoted, so PostgreSQL folds them to lower case). QGIS reads the
-- default style of a layer from here when the layer is added, and saves styles here itself.
CREATE TABLE IF NOT EXISTS public.layer_styles(
    id SERIAL PRIMARY KEY,
    f_table_catalog varchar,
    f_table_schema varchar,
    f_table_name varchar,
    f_geometry_column varchar,
    styleName text,
    styleQML xml,
    styleSLD xml,
    useAsDefault boolean,
    description text,
    owner varchar(63) DEFAULT CURRENT_USER,
    ui xml,
    update_time timestamp DEFAULT CURRENT_TIMESTAMP,
    type varchar,
    r_raster_column varchar
)
