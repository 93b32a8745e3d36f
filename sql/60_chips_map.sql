-- `chips map`: a view of one dataset's chip footprints for QGIS, made by the schema's owner
-- (SECURITY DEFINER, set by pggeolearn db init) so a maintainer needs no CREATE on schema
-- pggeolearn (which would let them plant functions others' sessions resolve). Everything in
-- the view's text comes from the catalog, quoted by format(%I/%L). Columns: tile_id, split,
-- nodata_frac, orphan, current, frac_<class name> per class (frac_<id> when the name repeats or
-- is too long; background = class 0), built_at, geom typed geometry(Polygon, srid).

CREATE OR REPLACE FUNCTION pggeolearn.chips_map_create(dataset text, view_name text)
RETURNS text[]
LANGUAGE plpgsql VOLATILE STRICT
AS $$
DECLARE
    d pggeolearn.datasets;
    fractions text := '';
    cols text[] := ARRAY['tile_id', 'split', 'nodata_frac', 'orphan', 'current'];
    col text;
    k text;
    v text;
BEGIN
    SELECT * INTO d FROM pggeolearn.datasets WHERE name = dataset;
    IF d.name IS NULL THEN
        RAISE EXCEPTION 'unknown dataset %', dataset USING ERRCODE = 'undefined_object';
    END IF;
    IF view_name !~ '^chips_map_' THEN
        RAISE EXCEPTION 'map views are named chips_map_*, not %', view_name;
    END IF;
    FOR k, v IN SELECT '0', 'background' UNION ALL
                SELECT e.key, e.value FROM jsonb_each_text(d.classes) AS e ORDER BY 1 LOOP
        col := 'frac_' || v;
        IF col = ANY(cols) OR octet_length(col) > 63 THEN
            col := 'frac_' || k;
        END IF;
        cols := cols || col;
        fractions := fractions || format(
            '(c.class_counts[%s])::float8 / nullif((SELECT sum(n) FROM unnest(c.class_counts) AS n), 0) AS %I, ',
            k::integer + 1, col);
    END LOOP;
    EXECUTE format('DROP VIEW IF EXISTS pggeolearn.%I', view_name);
    EXECUTE format($v$CREATE VIEW pggeolearn.%I AS
        SELECT c.tile_id, c.split, c.nodata_frac, c.image IS NULL AS orphan,
               c.recipe_hash = %L AS current, %s c.built_at,
               c.geom::geometry(Polygon, %s) AS geom
        FROM pggeolearn.chips AS c WHERE c.dataset = %L$v$,
        view_name, d.recipe_hash, fractions, d.srid, dataset);
    EXECUTE format('COMMENT ON VIEW pggeolearn.%I IS %L', view_name,
                   format('Chip footprints of pggeolearn dataset %s (pggeolearn chips map)', dataset));
    EXECUTE format('GRANT SELECT ON pggeolearn.%I TO PUBLIC', view_name);
    RETURN cols || ARRAY['built_at', 'geom'];
END
$$;
COMMENT ON FUNCTION pggeolearn.chips_map_create(text, text) IS
  'Internal (pggeolearn chips map): create or replace view pggeolearn.chips_map_<dataset> of the chip footprints; runs as the schema owner.';
