-- Image tiles: the dataset's imagery clipped, reprojected, resampled and mosaicked onto exactly
-- one tile's grid. Pixels without imagery are NODATA (the source's nodata value, else 0; a
-- tile that sources without a NODATA value cover entirely gets none).

CREATE OR REPLACE FUNCTION pggeolearn.gdal_resampling(method text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE lower(method) WHEN 'nearest' THEN 'NearestNeighbor' WHEN 'bilinear' THEN 'Bilinear'
                              WHEN 'cubic' THEN 'Cubic' END
$$;
COMMENT ON FUNCTION pggeolearn.gdal_resampling(text) IS
  'GDAL algorithm name of a recipe''s resampling method (nearest, bilinear, cubic); NULL for any other.';

CREATE OR REPLACE FUNCTION pggeolearn._paste(canvas raster, pieces raster[])
RETURNS raster
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    piece raster;
    b integer;
    ox integer; oy integer; c0 integer; c1 integer; r0 integer; r1 integer;
    w integer := ST_Width(canvas);
    h integer := ST_Height(canvas);
BEGIN
    -- pieces are on the canvas's grid but may overhang it: each piece's pixels are pasted at
    -- its offset, cropped to the canvas; later pieces win, NODATA never overwrites
    FOREACH piece IN ARRAY pieces LOOP
        ox := round((ST_UpperLeftX(piece) - ST_UpperLeftX(canvas)) / ST_ScaleX(canvas))::integer;
        oy := round((ST_UpperLeftY(piece) - ST_UpperLeftY(canvas)) / ST_ScaleY(canvas))::integer;
        c0 := greatest(0, -ox); r0 := greatest(0, -oy);
        c1 := least(ST_Width(piece), w - ox); r1 := least(ST_Height(piece), h - oy);
        CONTINUE WHEN c1 <= c0 OR r1 <= r0;
        FOR b IN 1 .. ST_NumBands(canvas) LOOP
            canvas := ST_SetValues(canvas, b, ox + c0 + 1, oy + r0 + 1,
                                   (ST_DumpValues(piece, b, false))[r0 + 1:r1][c0 + 1:c1],
                                   coalesce(ST_BandNoDataValue(piece, b), 'NaN'::float8), false);
        END LOOP;
    END LOOP;
    RETURN canvas;
END
$$;
COMMENT ON FUNCTION pggeolearn._paste(raster, raster[]) IS
  'Internal: the pixels of rasters on the canvas''s grid pasted into it at their offsets (cropped; later win; NODATA never overwrites).';

CREATE OR REPLACE FUNCTION pggeolearn._blank(ref raster, pixeltypes text[], nodata float8[])
RETURNS raster
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    canvas raster := ref;
BEGIN
    FOR b IN 1 .. array_length(pixeltypes, 1) LOOP
        canvas := ST_AddBand(canvas, pixeltypes[b], coalesce(nodata[b], 0), coalesce(nodata[b], 0));
    END LOOP;
    RETURN canvas;
END
$$;
COMMENT ON FUNCTION pggeolearn._blank(raster, text[], float8[]) IS
  'Internal: ref with all-NODATA bands of these pixel types (NODATA NULL: 0).';

CREATE OR REPLACE FUNCTION pggeolearn._blank_like(ref raster, model raster)
RETURNS raster
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT pggeolearn._blank(ref,
        ARRAY(SELECT ST_BandPixelType(model, n) FROM generate_series(1, ST_NumBands(model)) n),
        ARRAY(SELECT ST_BandNoDataValue(model, n) FROM generate_series(1, ST_NumBands(model)) n))
$$;
COMMENT ON FUNCTION pggeolearn._blank_like(raster, raster) IS
  'Internal: ref with all-NODATA bands of model''s pixel types and NODATA values (none: 0).';

CREATE OR REPLACE FUNCTION pggeolearn._mosaic(pieces raster[])
RETURNS raster
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    first raster := pieces[1];
    sx float8 := ST_ScaleX(pieces[1]);
    sy float8 := ST_ScaleY(pieces[1]);
    minc integer; minr integer; maxc integer; maxr integer;
BEGIN
    -- pieces sharing one grid (ST_SameAlignment) into one raster covering them all: what
    -- ST_Union does, at a fraction of its cost
    SELECT min(c), min(r), max(c + ST_Width(p)), max(r + ST_Height(p))
      INTO minc, minr, maxc, maxr
      FROM unnest(pieces) AS p,
           LATERAL (SELECT round((ST_UpperLeftX(p) - ST_UpperLeftX(first)) / sx)::integer AS c,
                           round((ST_UpperLeftY(p) - ST_UpperLeftY(first)) / sy)::integer AS r) o;
    RETURN pggeolearn._paste(pggeolearn._blank_like(
        ST_MakeEmptyRaster(maxc - minc, maxr - minr, ST_UpperLeftX(first) + minc * sx,
                           ST_UpperLeftY(first) + minr * sy, sx, sy, 0, 0, ST_SRID(first)), first),
        pieces);
END
$$;
COMMENT ON FUNCTION pggeolearn._mosaic(raster[]) IS
  'Internal: rasters on one grid mosaicked into one raster covering them all (later win; NODATA never overwrites).';

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
    method text;
    raw raster[];
    grp raster[];
    rest raster[];
    pieces raster[];
    piece raster;
    src raster;
    canvas raster;
    declares boolean := false;  -- a source band declares a NODATA value
    cover geometry;             -- the sources' footprint in the grid's CRS
    n integer;
BEGIN
    SELECT * INTO d FROM pggeolearn.datasets WHERE name = dataset;
    ref := pggeolearn._tile_ref(d, dataset, tile_id);
    method := pggeolearn.gdal_resampling(coalesce(d.recipe ->> 'resampling', 'nearest'));
    IF method IS NULL THEN
        RAISE EXCEPTION 'dataset % has an unknown resampling method %', dataset, d.recipe ->> 'resampling'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
        declares := declares OR EXISTS (SELECT 1 FROM generate_series(1, ST_NumBands(src)) AS k
                                        WHERE ST_BandNoDataValue(src, k) IS NOT NULL);
        -- the footprint: edges densified so that they bend when reprojected
        cover := ST_Union(coalesce(cover, ST_SetSRID('POLYGON EMPTY'::geometry, d.srid)),
            CASE WHEN ST_SRID(src) = d.srid THEN ST_Envelope(src)
                 ELSE ST_Transform(ST_Segmentize(ST_Envelope(src),
                          greatest(ST_Width(src), ST_Height(src)) * abs(ST_ScaleX(src)) / 16), d.srid) END);
        -- exact fit: the source tile is the dataset tile (grid equal to the imagery's)
        IF ST_SRID(src) = d.srid AND ST_SameAlignment(src, ref)
           AND ST_Width(src) = d.tile_px AND ST_Height(src) = d.tile_px
           AND abs(ST_UpperLeftX(src) - ST_UpperLeftX(ref)) < d.resolution * 1e-6
           AND abs(ST_UpperLeftY(src) - ST_UpperLeftY(ref)) < d.resolution * 1e-6 THEN
            pieces := array_append(pieces, src);
            CONTINUE;
        END IF;
        -- anything else: the part of the source that the tile's pixels can sample (the tile
        -- in the source's CRS, plus a margin of 2 tile pixels and 3 source pixels for the
        -- resampling kernel), in the source's own grid
        piece := ST_Clip(src, ST_Expand(
            CASE WHEN ST_SRID(src) = d.srid THEN ST_Expand(box, 2 * d.resolution)
                 ELSE ST_Transform(ST_Expand(box, 2 * d.resolution), ST_SRID(src)) END,
            3 * greatest(abs(ST_ScaleX(src)), abs(ST_ScaleY(src)))), true);
        CONTINUE WHEN piece IS NULL OR ST_IsEmpty(piece);
        IF ST_SRID(src) = d.srid AND ST_SameAlignment(piece, ref) THEN
            pieces := array_append(pieces, piece);  -- already on the tile's grid: pasted as is
        ELSE
            raw := array_append(raw, piece);
        END IF;
    END LOOP;
    -- Source pieces that share a grid (one import's tiles) are mosaicked in their own CRS
    -- first and warped once: each tile pixel then samples the whole source, so a chip is a
    -- warp of the whole source onto the tile (warping each source tile apart leaves NODATA
    -- seams where they meet). Sources on other grids make groups of their own.
    WHILE raw IS NOT NULL AND array_length(raw, 1) > 0 LOOP
        grp := ARRAY[raw[1]];
        rest := NULL;
        FOR i IN 2 .. array_length(raw, 1) LOOP
            IF ST_SRID(raw[i]) = ST_SRID(raw[1]) AND ST_NumBands(raw[i]) = ST_NumBands(raw[1])
               AND ST_SameAlignment(raw[i], raw[1]) THEN
                grp := array_append(grp, raw[i]);
            ELSE
                rest := array_append(rest, raw[i]);
            END IF;
        END LOOP;
        raw := rest;
        IF array_length(grp, 1) = 1 THEN
            piece := grp[1];
        ELSE
            piece := pggeolearn._mosaic(grp);
        END IF;
        -- warped onto the tile's own grid (same CRS: resampled, which also absorbs tiny scale
        -- differences that would make a mosaic of the pieces refuse them)
        IF ST_SRID(piece) <> d.srid THEN
            piece := ST_Transform(piece, ref, method);
        ELSE
            piece := ST_Resample(piece, ref, true, method);
        END IF;
        CONTINUE WHEN piece IS NULL OR NOT ST_Intersects(ST_Envelope(piece), core);
        piece := ST_Clip(piece, core, true);
        CONTINUE WHEN piece IS NULL OR ST_IsEmpty(piece);
        pieces := array_append(pieces, piece);
    END LOOP;
    IF pieces IS NULL THEN
        -- no imagery here: an all-NODATA tile with the bands recorded when the recipe was made
        RETURN pggeolearn._blank(ref,
            ARRAY(SELECT e ->> 'pixeltype' FROM jsonb_array_elements(d.recipe -> 'image_bands')
                  WITH ORDINALITY AS t(e, i) ORDER BY i),
            ARRAY(SELECT (e ->> 'nodata')::float8 FROM jsonb_array_elements(d.recipe -> 'image_bands')
                  WITH ORDINALITY AS t(e, i) ORDER BY i));
    END IF;
    IF array_length(pieces, 1) = 1 AND ST_Width(pieces[1]) = d.tile_px
       AND ST_Height(pieces[1]) = d.tile_px AND ST_SameAlignment(pieces[1], ref)
       AND abs(ST_UpperLeftX(pieces[1]) - ST_UpperLeftX(ref)) < d.resolution * 1e-6
       AND abs(ST_UpperLeftY(pieces[1]) - ST_UpperLeftY(ref)) < d.resolution * 1e-6 THEN
        RETURN pieces[1];
    END IF;
    -- mosaic: an all-NODATA canvas of the exact tile, then each piece pasted into it (ST_Clip
    -- does not crop exactly, and ST_Union would keep a piece's overhang)
    canvas := pggeolearn._paste(pggeolearn._blank_like(ref, pieces[1]), pieces);
    -- Sources without a NODATA value: the canvas's NODATA (0) marks pixels no source reaches.
    -- When the sources cover the whole tile there are none, and no NODATA value is invented:
    -- black stays a colour.
    IF NOT declares AND ST_Covers(cover, box) THEN
        FOR n IN 1 .. ST_NumBands(canvas) LOOP
            canvas := ST_SetBandNoDataValue(canvas, n, NULL);
        END LOOP;
    END IF;
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
  'Image raster of one tile: the dataset''s image SQL rasters clipped, mosaicked per source grid, warped once onto exactly tile_px x tile_px of the grid (the recipe''s resampling, default nearest); NODATA (the source''s value, else 0) where there is no imagery; no NODATA value when the sources declare none and cover the tile.';

CREATE OR REPLACE FUNCTION pggeolearn.valid_label(image raster, label raster)
RETURNS raster
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    n integer;
    mask raster;
    b integer;
BEGIN
    -- label with 255 where the image pixel is NODATA: every band declares a NODATA value and
    -- holds it (pggeolearn.wkb.valid_mask's rule); label as it is when no pixel is
    IF image IS NULL OR label IS NULL THEN
        RETURN label;
    END IF;
    n := ST_NumBands(image);
    FOR b IN 1 .. n LOOP
        IF ST_BandNoDataValue(image, b) IS NULL
           OR ST_Count(image, b, true) = ST_Width(image)::bigint * ST_Height(image) THEN
            RETURN label;  -- a band without NODATA (or without a NODATA pixel): all valid
        END IF;
    END LOOP;
    -- 1 where a band has data, NODATA where it has not; OR-ed over the bands
    mask := ST_MapAlgebra(image, 1, '8BUI'::text, '1'::text, 0::float8);
    FOR b IN 2 .. n LOOP
        mask := ST_MapAlgebra(mask, 1, ST_MapAlgebra(image, b, '8BUI'::text, '1'::text, 0::float8), 1,
                              '1'::text, '8BUI'::text, 'FIRST'::text, '1'::text, '1'::text, NULL::float8);
    END LOOP;
    RETURN ST_MapAlgebra(label, 1, mask, 1, '[rast1]'::text, '8BUI'::text, 'FIRST'::text,
                         NULL::text, '255'::text, NULL::float8);
END
$$;
COMMENT ON FUNCTION pggeolearn.valid_label(raster, raster) IS
  'The label raster with 255 on pixels where the image is NODATA (every band at its NODATA value); what class counts leave out.';
