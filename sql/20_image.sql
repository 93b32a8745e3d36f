-- Image tiles: the dataset's imagery clipped, reprojected, resampled and mosaicked onto exactly
-- one tile's grid. Pixels without imagery are NODATA (the source's nodata value, else 0).

CREATE OR REPLACE FUNCTION pggeolearn.image_tile(dataset text, tile_id integer)
RETURNS raster
LANGUAGE plpgsql STABLE STRICT
AS $$
DECLARE
    d pggeolearn.datasets;
    ref raster;
    box geometry;
    core geometry;
    q text;
    pieces raster[];
    piece raster;
    src raster;
    canvas raster;
    b integer;
    nodata float8;
    ox integer; oy integer; c0 integer; c1 integer; r0 integer; r1 integer;
    vals float8[];
BEGIN
    SELECT * INTO d FROM pggeolearn.datasets WHERE name = dataset;
    ref := pggeolearn._tile_ref(d, dataset, tile_id);
    box := ST_Envelope(ref);
    -- the tile shrunk by a quarter pixel: rasters that only touch the tile are skipped, and a
    -- clip by it keeps exactly the tile's pixels (GDAL snaps the clip outwards to the grid)
    core := ST_Buffer(box, -0.25 * ST_ScaleX(ref), 'join=mitre');
    -- The recipe's SQL runs as a subquery through a cursor: one statement, read-only (STABLE).
    q := format($q$
        WITH tile AS (SELECT $1::integer AS tile_id, $2::geometry AS tile_geom,
                             $3::raster AS tile_rast, $4::integer AS tile_srid,
                             $5::float8 AS tile_res)
        SELECT q.rast FROM tile, LATERAL (%s
        ) AS q WHERE q.rast IS NOT NULL $q$, d.image_sql);
    FOR src IN EXECUTE q USING tile_id, box, ref, d.srid, d.resolution LOOP
        IF ST_SRID(src) = 0 THEN
            RAISE EXCEPTION 'image SQL returned a raster with SRID 0 (tile %)', tile_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        CONTINUE WHEN NOT ST_Intersects(ST_Envelope(src),
                                        CASE WHEN ST_SRID(src) = d.srid THEN core
                                             ELSE ST_Transform(core, ST_SRID(src)) END);
        -- exact fit: the source tile is the dataset tile (grid equal to the imagery's)
        IF ST_SRID(src) = d.srid AND ST_SameAlignment(src, ref)
           AND ST_Width(src) = d.tile_px AND ST_Height(src) = d.tile_px
           AND abs(ST_UpperLeftX(src) - ST_UpperLeftX(ref)) < d.resolution * 1e-6
           AND abs(ST_UpperLeftY(src) - ST_UpperLeftY(ref)) < d.resolution * 1e-6 THEN
            pieces := array_append(pieces, src);
            CONTINUE;
        END IF;
        -- anything else is warped onto the tile's own grid (same CRS: resampled, which also
        -- absorbs tiny scale differences that would make ST_Union refuse the pieces)
        IF ST_SRID(src) <> d.srid THEN
            piece := ST_Clip(src, ST_Transform(ST_Expand(box, 2 * d.resolution), ST_SRID(src)), true);
            CONTINUE WHEN piece IS NULL OR ST_IsEmpty(piece);
            piece := ST_Transform(piece, ref, 'NearestNeighbour');
        ELSE
            piece := ST_Clip(src, ST_Expand(box, 2 * greatest(d.resolution, abs(ST_ScaleX(src)))), true);
            CONTINUE WHEN piece IS NULL OR ST_IsEmpty(piece);
            piece := ST_Resample(piece, ref, true, 'NearestNeighbour');
        END IF;
        CONTINUE WHEN NOT ST_Intersects(ST_Envelope(piece), core);
        piece := ST_Clip(piece, core, true);
        CONTINUE WHEN piece IS NULL OR ST_IsEmpty(piece);
        pieces := array_append(pieces, piece);
    END LOOP;
    IF pieces IS NULL THEN
        -- no imagery here: an all-NODATA tile with the bands recorded when the recipe was made
        canvas := ref;
        FOR b IN 0 .. jsonb_array_length(d.recipe -> 'image_bands') - 1 LOOP
            nodata := coalesce((d.recipe -> 'image_bands' -> b ->> 'nodata')::float8, 0);
            canvas := ST_AddBand(canvas, d.recipe -> 'image_bands' -> b ->> 'pixeltype', nodata, nodata);
        END LOOP;
        RETURN canvas;
    END IF;
    IF array_length(pieces, 1) = 1 AND ST_Width(pieces[1]) = d.tile_px
       AND ST_Height(pieces[1]) = d.tile_px AND ST_SameAlignment(pieces[1], ref)
       AND abs(ST_UpperLeftX(pieces[1]) - ST_UpperLeftX(ref)) < d.resolution * 1e-6
       AND abs(ST_UpperLeftY(pieces[1]) - ST_UpperLeftY(ref)) < d.resolution * 1e-6 THEN
        RETURN pieces[1];
    END IF;
    -- mosaic: an all-NODATA canvas of the exact tile, then each piece's pixels pasted at its
    -- offset (pieces are on the tile's grid but may overhang it by a pixel: ST_Clip does not
    -- crop exactly, and ST_Union would keep the overhang); later pieces win, NODATA never
    -- overwrites
    canvas := ref;
    FOR b IN 1 .. ST_NumBands(pieces[1]) LOOP
        nodata := coalesce(ST_BandNoDataValue(pieces[1], b), 0);
        canvas := ST_AddBand(canvas, ST_BandPixelType(pieces[1], b), nodata, nodata);
    END LOOP;
    FOREACH piece IN ARRAY pieces LOOP
        ox := round((ST_UpperLeftX(piece) - ST_UpperLeftX(ref)) / d.resolution)::integer;
        oy := round((ST_UpperLeftY(ref) - ST_UpperLeftY(piece)) / d.resolution)::integer;
        c0 := greatest(0, -ox); r0 := greatest(0, -oy);
        c1 := least(ST_Width(piece), d.tile_px - ox); r1 := least(ST_Height(piece), d.tile_px - oy);
        CONTINUE WHEN c1 <= c0 OR r1 <= r0;
        FOR b IN 1 .. ST_NumBands(canvas) LOOP
            vals := (ST_DumpValues(piece, b, false))[r0 + 1:r1][c0 + 1:c1];
            canvas := ST_SetValues(canvas, b, ox + c0 + 1, oy + r0 + 1, vals,
                                   coalesce(ST_BandNoDataValue(piece, b), 'NaN'::float8), false);
        END LOOP;
    END LOOP;
    IF ST_Width(canvas) <> d.tile_px OR ST_Height(canvas) <> d.tile_px
       OR abs(ST_UpperLeftX(canvas) - ST_UpperLeftX(ref)) > d.resolution * 1e-6
       OR abs(ST_UpperLeftY(canvas) - ST_UpperLeftY(ref)) > d.resolution * 1e-6 THEN
        RAISE EXCEPTION 'image tile % came out %x% at (%, %), not on the grid', tile_id,
            ST_Width(canvas), ST_Height(canvas), ST_UpperLeftX(canvas), ST_UpperLeftY(canvas);
    END IF;
    RETURN canvas;
END
$$;
COMMENT ON FUNCTION pggeolearn.image_tile(text, integer) IS
  'Image raster of one tile: the dataset''s image SQL rasters clipped, reprojected/resampled (nearest) and mosaicked onto exactly tile_px x tile_px of the grid; NODATA (the source''s value, else 0) where there is no imagery.';
