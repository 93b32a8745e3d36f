-- Living datasets: change tracking on the source tables a recipe reads.
--
-- `pggeolearn dataset watch NAME` puts three statement-level triggers on every source table
-- (insert, update, delete; one transition table each) and one for TRUNCATE. They record the
-- footprint of every changed row - before and after an update - in pggeolearn.changes:
-- the geometry itself for vector columns, ST_ConvexHull for raster columns, NULL (everything)
-- for a TRUNCATE. `pggeolearn chips refresh NAME` rebuilds exactly the tiles those footprints
-- touch. Statement-level triggers with transition tables cost one INSERT ... SELECT per
-- statement, not one call per row.
--
-- SECURITY DEFINER: a mapper editing buildings in QGIS needs no privilege on schema
-- pggeolearn; the function only ever appends to pggeolearn.changes. The shared advisory lock
-- held until the writer's commit lets `chips refresh` wait for writers in flight before it
-- reads the high-water mark (a change id taken earlier but committed later is never skipped).

CREATE OR REPLACE FUNCTION pggeolearn.record_change()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
DECLARE
    src text := quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME);
    arg text;
    expr text;
    rel text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('pggeolearn changes', 0));
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO pggeolearn.changes (source, geom) VALUES (src, NULL);
        RETURN NULL;
    END IF;
    FOREACH arg IN ARRAY TG_ARGV LOOP
        expr := CASE left(arg, 2)
                    WHEN 'r:' THEN format('ST_ConvexHull(%I)', substr(arg, 3))
                    ELSE format('%I::geometry', substr(arg, 3)) END;
        rel := CASE TG_OP WHEN 'DELETE' THEN 'pggeolearn_old' ELSE 'pggeolearn_new' END;
        EXECUTE format('INSERT INTO pggeolearn.changes (source, geom) '
                       'SELECT $1, %s FROM %I WHERE %I IS NOT NULL', expr, rel, substr(arg, 3))
            USING src;
        IF TG_OP = 'UPDATE' THEN
            EXECUTE format('INSERT INTO pggeolearn.changes (source, geom) '
                           'SELECT $1, %s FROM pggeolearn_old WHERE %I IS NOT NULL',
                           expr, substr(arg, 3))
                USING src;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
-- only roles that may put it on a table (maintainers, via dataset watch) may name it in CREATE
-- TRIGGER; a trigger fires it whoever edits the table, and no one can call it directly
REVOKE EXECUTE ON FUNCTION pggeolearn.record_change() FROM PUBLIC;
COMMENT ON FUNCTION pggeolearn.record_change() IS
  'Trigger function installed by `pggeolearn dataset watch`: appends the footprints of changed rows '
  '(arguments: g:<geometry column> or r:<raster column>) to pggeolearn.changes.';

CREATE OR REPLACE FUNCTION pggeolearn.recipe_plan(query text)
RETURNS json
LANGUAGE plpgsql VOLATILE STRICT
AS $$
DECLARE
    plan json;
BEGIN
    -- EXPLAIN is refused inside STABLE functions (recipe_rows), hence this twin: it only
    -- plans, as role pggeolearn_recipe (db init makes it SECURITY DEFINER, owned by that
    -- role), since planning may already evaluate functions the recipe calls
    EXECUTE 'EXPLAIN (VERBOSE, FORMAT JSON) ' || query INTO plan;
    RETURN plan;
END
$$;
COMMENT ON FUNCTION pggeolearn.recipe_plan(text) IS
  'Internal: the EXPLAIN (VERBOSE, FORMAT JSON) plan of one query composed by pggeolearn around user '
  'SQL, planned as role pggeolearn_recipe (which tables a recipe reads: dataset watch).';

CREATE OR REPLACE FUNCTION pggeolearn.changed_tiles(dataset text, since bigint, upto bigint,
                                                     margin float8 DEFAULT 0)
RETURNS TABLE (tile_id integer)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    -- Chips of `dataset` whose tile envelope lies within `margin` grid units of a footprint
    -- recorded for one of its watched sources with since < change_id <= upto (the chip store's
    -- GiST index on the envelopes finds them); a NULL footprint (TRUNCATE) means every chip.
    -- With margin 0, an area (a building, a raster's footprint) that only touches a tile's
    -- edge does not count: it covers no pixel of that tile.
    WITH d AS (SELECT srid FROM pggeolearn.datasets WHERE name = dataset),
    footprints AS (
        SELECT CASE WHEN c.geom IS NULL OR ST_SRID(c.geom) = d.srid THEN c.geom
                    ELSE ST_Transform(c.geom, d.srid) END AS g
        FROM pggeolearn.changes c
        JOIN pggeolearn.watches w ON w.source = c.source AND w.dataset = changed_tiles.dataset
        CROSS JOIN d
        WHERE c.change_id > since AND c.change_id <= upto
          AND (c.geom IS NULL OR ST_SRID(c.geom) <> 0)
    )
    SELECT ch.tile_id FROM footprints f
    JOIN pggeolearn.chips ch ON ch.dataset = changed_tiles.dataset
                            AND (f.g IS NULL OR (ST_DWithin(ch.geom, f.g, margin)
                                 -- an area that only shares an edge with the tile has no pixel in it
                                 AND (margin > 0 OR ST_Dimension(f.g) < 2
                                      OR NOT ST_Touches(ch.geom, f.g))))
    GROUP BY ch.tile_id
    ORDER BY 1
$$;
COMMENT ON FUNCTION pggeolearn.changed_tiles(text, bigint, bigint, float8) IS
  'Tile ids of a dataset''s chips touched (within margin grid units) by the changes recorded for '
  'its watched source tables in the change-id range (since, upto].';
