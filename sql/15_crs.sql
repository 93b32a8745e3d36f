-- CRS helpers for recipe SQL: the tile in the CRS of the table a recipe filters, so a lon/lat
-- table and a UTM grid meet without a hand-written ST_Transform.

CREATE OR REPLACE FUNCTION pggeolearn.tile_geom_in(tile_geom geometry, srid integer)
RETURNS geometry
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    -- edges densified (64 segments a side) so that the footprint bends when reprojected
    SELECT CASE WHEN ST_SRID(tile_geom) = srid THEN tile_geom
                ELSE ST_Transform(ST_Segmentize(tile_geom, greatest(ST_XMax(tile_geom) - ST_XMin(tile_geom),
                                                                    ST_YMax(tile_geom) - ST_YMin(tile_geom)) / 64),
                                  srid) END
$$;
COMMENT ON FUNCTION pggeolearn.tile_geom_in(geometry, integer) IS
  'The tile (or any geometry) in another SRID, edges densified: WHERE geom && pggeolearn.tile_geom_in(tile_geom, 4326).';

CREATE OR REPLACE FUNCTION pggeolearn.tile_geom_in(tile_geom geometry, tbl text)
RETURNS geometry
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    srids integer[];
BEGIN
    -- the SRID declared by the table's geometry or raster column(s) (raster2pgsql -C,
    -- typed geometry columns); tbl is 'schema.table' or 'table' (on the search_path)
    SELECT array_agg(DISTINCT s) INTO srids FROM (
        SELECT g.srid AS s FROM geometry_columns g
        WHERE g.srid <> 0 AND format('%I.%I', g.f_table_schema, g.f_table_name)::regclass = tbl::regclass
        UNION ALL
        SELECT r.srid FROM raster_columns r
        WHERE r.srid IS NOT NULL AND r.srid <> 0
          AND format('%I.%I', r.r_table_schema, r.r_table_name)::regclass = tbl::regclass) AS t;
    IF srids IS NULL OR array_length(srids, 1) <> 1 THEN
        RAISE EXCEPTION 'table % declares % SRID(s) on its geometry/raster columns: give the SRID, e.g. pggeolearn.tile_geom_in(tile_geom, 4326)',
            tbl, coalesce(array_length(srids, 1), 0) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pggeolearn.tile_geom_in(tile_geom, srids[1]);
END
$$;
COMMENT ON FUNCTION pggeolearn.tile_geom_in(geometry, text) IS
  'The tile in the SRID that table tbl declares: WHERE ST_Intersects(rast, pggeolearn.tile_geom_in(tile_geom, ''public.imagery_lonlat'')).';
