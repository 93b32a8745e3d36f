-- Prediction: imagery onto a prediction window's grid. The client asks for one row band of
-- windows at a time (a reference raster covering the band) and pastes what comes back; this
-- function decides, per source raster, how little the server has to do for that.

CREATE OR REPLACE FUNCTION pggeolearn.window_piece(src raster, ref raster)
RETURNS TABLE (piece raster, warped boolean)
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    box geometry;
    res float8;
    clipped raster;
    b integer;
BEGIN
    IF ST_SRID(src) = 0 THEN
        RAISE EXCEPTION 'imagery raster has SRID 0: set its SRID (ST_SetSRID) first'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    box := ST_Envelope(ref);
    res := abs(ST_ScaleX(ref));
    IF ST_SRID(src) = ST_SRID(ref) THEN
        IF ST_SameAlignment(src, ref) THEN
            -- on the grid already: the client pastes it as it is (no pixel is touched here)
            IF ST_Width(src)::float8 * ST_Height(src) <= 4.0 * ST_Width(ref) * ST_Height(ref) THEN
                RETURN QUERY SELECT src, false;
                RETURN;
            END IF;
            -- a raster much larger than the band: crop it to the band (aligned, so no pixel is
            -- cut); ST_Clip may add a NODATA value where the source had none: put back the source's
            clipped := ST_Clip(src, box, true);
            IF clipped IS NULL OR ST_IsEmpty(clipped) THEN
                RETURN;
            END IF;
            FOR b IN 1 .. ST_NumBands(src) LOOP
                clipped := ST_SetBandNoDataValue(clipped, b, ST_BandNoDataValue(src, b));
            END LOOP;
            RETURN QUERY SELECT clipped, false;
            RETURN;
        END IF;
    END IF;
    -- another CRS or grid: warp (nearest neighbour, as pggeolearn.image_tile does) onto the
    -- reference's grid. A last band (1 = imagery, 0 = none) records the source's footprint,
    -- because a source without NODATA fills the area outside it with zeros.
    clipped := ST_AddBand(src, '8BUI'::text, 1, 0);
    IF ST_SRID(src) <> ST_SRID(ref) THEN
        clipped := ST_Clip(clipped, ST_Transform(ST_Expand(box, 2 * res), ST_SRID(src)), true);
        IF clipped IS NULL OR ST_IsEmpty(clipped) THEN
            RETURN;
        END IF;
        RETURN QUERY SELECT ST_Transform(clipped, ref, 'NearestNeighbour'), true;
    ELSE
        clipped := ST_Clip(clipped, ST_Expand(box, 2 * greatest(res, abs(ST_ScaleX(src)))), true);
        IF clipped IS NULL OR ST_IsEmpty(clipped) THEN
            RETURN;
        END IF;
        RETURN QUERY SELECT ST_Resample(clipped, ref, true, 'NearestNeighbour'), true;
    END IF;
END
$$;
COMMENT ON FUNCTION pggeolearn.window_piece(raster, raster) IS
  'Prediction input: a source raster as the client pastes it onto the reference raster''s grid. Aligned sources come back unchanged (cropped when much larger), others warped (nearest neighbour) with an extra last band marking the source footprint (warped = true).';
