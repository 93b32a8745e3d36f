-- Label tiles: vectors rasterized onto exactly a tile's grid, one 8BUI band, no NODATA value.
--
-- Speed (see README "Label rasterization"): one ST_AsRaster per class present in the tile, with
-- two anchor points just outside opposite corners so GDAL's output has exactly the tile's
-- extent (ST_AsRaster alone copies the reference's alignment, not its extent); classes are
-- merged with bit-string operations, painting in ascending class order so the higher class
-- wins. No per-pixel SQL, no ST_Union of geometries or rasters, no ST_SetValues.

CREATE OR REPLACE FUNCTION pggeolearn.burn(ref raster, geoms geometry[], classes integer[],
                                            all_touched boolean DEFAULT false)
RETURNS raster
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    w integer := ST_Width(ref);
    h integer := ST_Height(ref);
    sx float8 := ST_ScaleX(ref);
    sy float8 := ST_ScaleY(ref);
    x0 float8 := ST_UpperLeftX(ref);
    y0 float8 := ST_UpperLeftY(ref);
    box geometry := ST_Envelope(ref);
    anchors geometry;
    empty raster := ST_AddBand(ref, '8BUI'::text, 0, NULL);
    mask raster;
    m varbit;
    acc varbit;
    i integer;
BEGIN
    IF ST_SkewX(ref) <> 0 OR ST_SkewY(ref) <> 0 OR sy >= 0 THEN
        RAISE EXCEPTION 'reference raster must be north-up without skew'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF array_length(geoms, 1) IS DISTINCT FROM array_length(classes, 1) THEN
        RAISE EXCEPTION 'burn: % geometries but % classes',
            coalesce(array_length(geoms, 1), 0), coalesce(array_length(classes, 1), 0);
    END IF;
    IF coalesce(array_length(geoms, 1), 0) = 0 THEN
        RETURN empty;
    END IF;
    anchors := ST_Collect(ST_MakePoint(x0 - 0.25 * sx, y0 - 0.25 * sy),
                          ST_MakePoint(x0 + (w + 0.2) * sx, y0 + (h + 0.2) * sy));
    FOR i IN 1 .. array_length(geoms, 1) LOOP
        IF classes[i] IS NULL OR classes[i] NOT BETWEEN 1 AND 255 THEN
            RAISE EXCEPTION 'class id % is outside 1..255', classes[i]
                USING ERRCODE = 'numeric_value_out_of_range';
        END IF;
        IF i > 1 AND classes[i] < classes[i - 1] THEN
            RAISE EXCEPTION 'burn: classes must be in ascending order';
        END IF;
        mask := ST_AsRaster(
            ST_ForceCollection(ST_Collect(ST_SetSRID(anchors, ST_SRID(ref)),
                                          ST_ClipByBox2D(geoms[i], box))),
            sx, sy, '8BUI'::text, CASE WHEN array_length(geoms, 1) = 1 THEN classes[i] ELSE 255 END::float8,
            NULL::float8, x0, y0, 0::float8, 0::float8, all_touched);
        IF ST_Width(mask) <> w OR ST_Height(mask) <> h THEN
            RAISE EXCEPTION 'burn: rasterized %x% instead of %x%', ST_Width(mask), ST_Height(mask), w, h;
        END IF;
        IF array_length(geoms, 1) = 1 THEN
            RETURN mask;  -- one class: GDAL's raster is the label (background 0, no NODATA)
        END IF;
        -- band pixels start after the 61-byte raster header, the band's flag byte and its
        -- 1-byte nodata value
        m := ('x' || encode(substring(ST_AsBinary(mask) FROM 64), 'hex'))::varbit;
        IF acc IS NULL THEN
            acc := m & ('x' || repeat(lpad(to_hex(classes[i]), 2, '0'), w * h))::varbit;
        ELSE
            acc := (acc & ~m) | (m & ('x' || repeat(lpad(to_hex(classes[i]), 2, '0'), w * h))::varbit);
        END IF;
    END LOOP;
    RETURN ST_RastFromWKB(substring(ST_AsBinary(empty) FROM 1 FOR 63)
                          || substring(varbit_send(acc) FROM 5));
END
$$;
COMMENT ON FUNCTION pggeolearn.burn(raster, geometry[], integer[], boolean) IS
  'Rasterize geometries (one per class, classes ascending, 1..255) onto exactly the grid and size of ref: 8BUI, background 0, no NODATA; the higher class wins where they overlap.';

CREATE OR REPLACE FUNCTION pggeolearn.label_tile(dataset text, tile_id integer)
RETURNS raster
LANGUAGE plpgsql STABLE STRICT
AS $$
DECLARE
    d pggeolearn.datasets;
    ref raster;
    box geometry;
    scale float8[];
    buffer_expr text;
    q text;
    geoms geometry[];
    classes integer[];
    bad integer;
BEGIN
    SELECT * INTO d FROM pggeolearn.datasets WHERE name = dataset;
    ref := pggeolearn._tile_ref(d, dataset, tile_id);
    box := ST_Envelope(ref);
    scale := pggeolearn.ground_scale(ST_Centroid(box));
    buffer_expr := CASE WHEN coalesce((d.recipe ->> 'label_has_buffer')::boolean, false)
                        THEN 'pggeolearn.checked_buffer(q.buffer_m::float8, $7, $1)'
                        ELSE '0::float8' END;
    -- The recipe's SQL is embedded as a subquery and run through a cursor (EXECUTE ... INTO of
    -- a subquery cannot run several statements); this function is STABLE, so PostgreSQL
    -- rejects any data-modifying statement inside it. Per row: SRID checked (0 is an error,
    -- others are reprojected), clipped near the tile, buffered in ground metres, clipped to it.
    q := format($q$
        WITH tile AS (SELECT $1::integer AS tile_id, $2::geometry AS tile_geom,
                             $3::raster AS tile_rast, $4::integer AS tile_srid,
                             $5::float8 AS tile_res),
        rows AS (
            SELECT q.class_id::integer AS class_id, %s AS b,
                   CASE ST_SRID(q.geom) WHEN $4 THEN ST_Force2D(q.geom)
                        WHEN 0 THEN pggeolearn._srid0_error(q.geom)
                        ELSE ST_Transform(ST_Force2D(q.geom), $4) END AS g
            FROM tile, LATERAL (%s
            ) AS q
            WHERE q.geom IS NOT NULL),
        prepared AS (
            SELECT class_id, ST_ClipByBox2D(CASE WHEN b > 0 THEN pggeolearn.buffer_ground(
                       ST_ClipByBox2D(g, ST_Expand($2, b * greatest($6[1], $6[2]) * 1.5)), b, $6)
                       ELSE g END, $2) AS g
            FROM rows)
        SELECT array_agg(g ORDER BY class_id), array_agg(class_id ORDER BY class_id)
        FROM (SELECT class_id, ST_Collect(g) AS g FROM prepared
              WHERE NOT ST_IsEmpty(g) GROUP BY class_id) s $q$, buffer_expr, d.label_sql);
    EXECUTE q INTO geoms, classes USING tile_id, box, ref, d.srid, d.resolution, scale, dataset;
    -- a class id the recipe does not declare would be burned and then silently ignored
    SELECT c INTO bad FROM unnest(classes) AS c WHERE NOT (d.classes ? c::text) LIMIT 1;
    IF bad IS NOT NULL AND bad BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'class_id % on tile % of dataset % is not declared in its classes (%)',
            bad, tile_id, dataset, d.classes USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pggeolearn.burn(ref, coalesce(geoms, '{}'), coalesce(classes, '{}'), d.all_touched);
END
$$;
COMMENT ON FUNCTION pggeolearn.label_tile(text, integer) IS
  'Label raster of one tile: the dataset''s label SQL rows (geom, class_id [, buffer_m]) reprojected to the grid, buffered in ground metres, burned as 8BUI (background 0, no NODATA, higher class wins).';

CREATE OR REPLACE FUNCTION pggeolearn._srid0_error(geom geometry)
RETURNS geometry
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RAISE EXCEPTION 'label SQL returned a geometry with SRID 0; set its SRID (ST_SetSRID)'
        USING ERRCODE = 'invalid_parameter_value';
END
$$;
COMMENT ON FUNCTION pggeolearn._srid0_error(geometry) IS
  'Internal: raises the error for a label geometry without SRID (never burned at a guessed place).';
