-- The declared type, SRID and dimension of one geometry column (for --append).
SELECT type, srid, coord_dimension
FROM geometry_columns
WHERE f_table_schema = %(schema)s AND f_table_name = %(table)s
  AND f_geometry_column = %(column)s
