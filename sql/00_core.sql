-- pggeolearn core: the schema's version and small helpers shared by the other files.

CREATE OR REPLACE FUNCTION pggeolearn.version()
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '0.1.0'::text $$;
COMMENT ON FUNCTION pggeolearn.version() IS
  'Version of the pggeolearn SQL functions installed in this database (matches the Python package).';
