-- Raster and vector tables a QGIS project may show, with what QGIS needs to open them typed:
-- kind, schema, table, column, SRID, geometry type (the actual one when the column is generic)
-- the primary key (NULL: none, QGIS then uses ctid) and the table's comment (review tables
-- name their run there). Overviews are left out.
SELECT 'raster' AS kind, r.r_table_schema::text, r.r_table_name::text, r.r_raster_column::text,
       r.srid, NULL::text, NULL::text, r.num_bands, NULL::text
FROM raster_columns AS r
WHERE NOT EXISTS (SELECT 1 FROM raster_overviews AS o
                  WHERE o.o_table_schema = r.r_table_schema AND o.o_table_name = r.r_table_name)
  AND r.r_table_schema NOT IN ('pggeolearn')
UNION ALL
SELECT 'vector', g.f_table_schema::text, g.f_table_name::text, g.f_geometry_column::text, g.srid, g.type,
       (SELECT a.attname::text
        FROM pg_index AS i
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = format('%%I.%%I', g.f_table_schema, g.f_table_name)::regclass
          AND i.indisprimary AND i.indnatts = 1),
       NULL,
       obj_description(format('%%I.%%I', g.f_table_schema, g.f_table_name)::regclass, 'pg_class')
FROM geometry_columns AS g
