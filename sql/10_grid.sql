-- Tile grids: a dataset's extent cut into tile_px x tile_px cells of its resolution.
-- tile_id = row * ncols + col, rows counted from the top (north). Overlap shifts each tile by
-- (tile_px - overlap_px) pixels. The last row/column may extend past the extent.

CREATE OR REPLACE FUNCTION pggeolearn.tile_grid(
    srid integer, resolution float8, tile_px integer,
    minx float8, miny float8, maxx float8, maxy float8, overlap_px integer DEFAULT 0)
RETURNS TABLE (tile_id integer, geom geometry, ref_rast raster)
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    WITH g AS (
        SELECT (tile_px - overlap_px) * resolution AS stride,
               tile_px * resolution AS size,
               greatest(1, ceil(((maxx - minx) - tile_px * resolution)
                                / ((tile_px - overlap_px) * resolution) - 1e-9)::integer + 1) AS ncols,
               greatest(1, ceil(((maxy - miny) - tile_px * resolution)
                                / ((tile_px - overlap_px) * resolution) - 1e-9)::integer + 1) AS nrows
    )
    SELECT (r * g.ncols + c)::integer,
           ST_MakeEnvelope(minx + c * g.stride, maxy - r * g.stride - g.size,
                           minx + c * g.stride + g.size, maxy - r * g.stride, srid),
           ST_MakeEmptyRaster(tile_px, tile_px, minx + c * g.stride, maxy - r * g.stride,
                              resolution, -resolution, 0, 0, srid)
    FROM g, generate_series(0, g.nrows - 1) AS r, generate_series(0, g.ncols - 1) AS c
$$;
COMMENT ON FUNCTION pggeolearn.tile_grid(integer, float8, integer, float8, float8, float8, float8, integer) IS
  'Tile grid over an extent: (tile_id, envelope, empty reference raster of tile_px x tile_px). tile_id = row * ncols + col from the upper-left.';

CREATE OR REPLACE FUNCTION pggeolearn.tile_grid(dataset text)
RETURNS TABLE (tile_id integer, geom geometry, ref_rast raster)
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT t.* FROM pggeolearn.datasets d,
        LATERAL pggeolearn.tile_grid(d.srid, d.resolution, d.tile_px,
                                     d.minx, d.miny, d.maxx, d.maxy, d.overlap_px) t
    WHERE d.name = dataset
$$;
COMMENT ON FUNCTION pggeolearn.tile_grid(text) IS
  'The tile grid of a dataset recipe (see pggeolearn.datasets): tile_id, envelope, reference raster.';

CREATE OR REPLACE FUNCTION pggeolearn._tile_ref(d pggeolearn.datasets, dataset text, tile_id integer)
RETURNS raster
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    stride float8; ncols integer; nrows integer;
BEGIN
    IF d.name IS NULL THEN
        RAISE EXCEPTION 'unknown dataset %', dataset USING ERRCODE = 'undefined_object';
    END IF;
    stride := (d.tile_px - d.overlap_px) * d.resolution;
    ncols := greatest(1, ceil(((d.maxx - d.minx) - d.tile_px * d.resolution) / stride - 1e-9)::integer + 1);
    nrows := greatest(1, ceil(((d.maxy - d.miny) - d.tile_px * d.resolution) / stride - 1e-9)::integer + 1);
    IF tile_id < 0 OR tile_id >= ncols * nrows THEN
        RAISE EXCEPTION 'tile % is outside dataset % (tiles 0..%)', tile_id, dataset, ncols * nrows - 1
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN ST_MakeEmptyRaster(d.tile_px, d.tile_px, d.minx + (tile_id % ncols) * stride,
                              d.maxy - (tile_id / ncols) * stride,
                              d.resolution, -d.resolution, 0, 0, d.srid);
END
$$;
COMMENT ON FUNCTION pggeolearn._tile_ref(pggeolearn.datasets, text, integer) IS
  'Internal: the reference raster of a tile from a datasets row already read (NULL row: unknown dataset).';

CREATE OR REPLACE FUNCTION pggeolearn.tile_ref(dataset text, tile_id integer)
RETURNS raster
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT pggeolearn._tile_ref((SELECT d FROM pggeolearn.datasets d WHERE d.name = dataset),
                                dataset, tile_id)
$$;
COMMENT ON FUNCTION pggeolearn.tile_ref(text, integer) IS
  'Empty reference raster (grid, size, SRID) of one tile of a dataset; errors for an unknown dataset or tile.';

CREATE OR REPLACE FUNCTION pggeolearn.ground_scale(center geometry)
RETURNS float8[]
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    -- CRS units per ground metre along x and y at a point, measured on the WGS84 ellipsoid.
    SELECT ARRAY[
        1.0 / ST_Distance(ST_Transform(center, 4326)::geography,
                          ST_Transform(ST_Translate(center, 1, 0), 4326)::geography),
        1.0 / ST_Distance(ST_Transform(center, 4326)::geography,
                          ST_Transform(ST_Translate(center, 0, 1), 4326)::geography)]
$$;
COMMENT ON FUNCTION pggeolearn.ground_scale(geometry) IS
  'CRS units per ground metre along x and y at a point (e.g. 1/cos(latitude) in EPSG:3857).';

CREATE OR REPLACE FUNCTION pggeolearn.buffer_ground(geom geometry, metres float8, scale float8[])
RETURNS geometry
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    -- Buffer by ground metres. Conformal projected CRS (equal x/y scale, e.g. 3857, UTM): buffer
    -- in CRS units scaled at the tile centre. Otherwise (lon/lat): buffer in the local UTM zone.
    SELECT CASE
        WHEN metres <= 0 THEN geom
        WHEN abs(scale[1] / scale[2] - 1) < 1e-3 THEN ST_Buffer(geom, metres * (scale[1] + scale[2]) / 2)
        ELSE (SELECT ST_Transform(ST_Buffer(ST_Transform(geom, utm), metres), ST_SRID(geom))
              FROM (SELECT CASE WHEN ST_Y(c) >= 0 THEN 32600 ELSE 32700 END
                           + least(60, floor((ST_X(c) + 180) / 6)::integer + 1) AS utm
                    FROM (SELECT ST_Transform(ST_Centroid(geom), 4326) AS c) p) z)
    END
$$;
COMMENT ON FUNCTION pggeolearn.buffer_ground(geometry, float8, float8[]) IS
  'Buffer a geometry by ground metres, given pggeolearn.ground_scale() at the tile centre.';
