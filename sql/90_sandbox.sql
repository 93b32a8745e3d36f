-- The recipe sandbox (see README "Security of recipe SQL"). SQL written by users runs only
-- inside SECURITY DEFINER functions owned by the NOLOGIN role pggeolearn_recipe: this one for
-- queries the client composes (dataset checks, --where, prediction imagery), image_tile and
-- label_tile for stored recipes. `pggeolearn db init` makes them SECURITY DEFINER, gives them
-- to pggeolearn_recipe and pins the search_path of every function in this schema; inside a
-- security-definer context nothing the user's SQL calls may change role or session
-- authorization. STABLE: PL/pgSQL runs the query read-only (no INSERT/UPDATE/DELETE, no DDL).

CREATE OR REPLACE FUNCTION pggeolearn.recipe_rows(query text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE STRICT
AS $$
BEGIN
    RETURN QUERY EXECUTE query;
END
$$;
COMMENT ON FUNCTION pggeolearn.recipe_rows(text) IS
  'Internal: run one query composed by pggeolearn around user SQL as role pggeolearn_recipe (SECURITY DEFINER, set up by pggeolearn db init); call with a column definition list.';

CREATE OR REPLACE FUNCTION pggeolearn.pinned_search_path()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    -- pg_catalog first, then where PostGIS lives, then this schema; never "$user" or a schema
    -- other roles may write (unless PostGIS itself was installed in one: pggeolearn db check)
    SELECT pg_catalog.concat_ws(', ', 'pg_catalog',
        (SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(n.nspname), ', ')
         FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname IN ('postgis', 'postgis_raster')),
        'pggeolearn', 'pg_temp')
$$;
COMMENT ON FUNCTION pggeolearn.pinned_search_path() IS
  'The search_path pggeolearn pins on its functions and sessions: pg_catalog, the PostGIS schema, pggeolearn, pg_temp.';

CREATE OR REPLACE FUNCTION pggeolearn.checked_buffer(metres float8, dataset text, tile_id integer)
RETURNS float8
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    -- ST_Buffer(geom, 'NaN') crashes PostGIS 3.3 (and every session of the server with it):
    -- numbers from user SQL are checked before any PostGIS call sees them
    IF metres IS NULL THEN
        RETURN 0;
    END IF;
    IF metres = 'NaN'::float8 OR metres IN ('Infinity'::float8, '-Infinity'::float8)
       OR metres < 0 OR metres > 100000 THEN
        RAISE EXCEPTION 'buffer_m = % on tile % of dataset %: it must be a finite number of metres in 0..100000',
            metres, tile_id, dataset USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN metres;
END
$$;
COMMENT ON FUNCTION pggeolearn.checked_buffer(float8, text, integer) IS
  'A label buffer in metres, refused unless finite and in 0..100000 (NULL is 0).';
