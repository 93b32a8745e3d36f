"""Prediction over any extent against a real PostGIS: stitching without seams, objects merged
across tile borders, NODATA, reprojection, atomic failure, refusals, registry models.

The model is real and deterministic: :class:`BrightnessPredictor` gives each pixel class
probabilities from its brightness (optionally averaged over a 3 x 3 box first, like one
convolution layer), through the same :class:`pggeolearn.predict.Predictor` contract as a
trained network.
"""

from __future__ import annotations

import math

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pggeolearn import errors, predict, wkb

UL = (9519900.0, 3202900.0)  # upper-left of the test imagery (EPSG:3857, near Banepa)
RES = 1.0


class BrightnessPredictor:
    """Class probabilities from pixel brightness (band mean): ``p_k ~ exp(-((b - centre_k) / 40)^2)``
    (the default centres put the class boundary at 120.5, between integer brightnesses: no ties).

    ``box=3`` first averages brightness over 3 x 3 pixels; at a window's edge the missing
    neighbours repeat the edge (as a padded convolution), so it needs 1 pixel of context.
    ``fail_on_call=n`` raises on the n-th call (a model that breaks mid-run).
    """

    framework = "numpy"

    def __init__(self, *, tile_px: int = 64, resolution: float = RES, srid: int = 3857,
                 bands: int = 3, box: int = 1, centres=(40.0, 201.0),
                 names=("background", "building"), fail_on_call: int | None = None,
                 name: str = "brightness"):
        self.name, self.tile_px, self.resolution, self.srid, self.bands = name, tile_px, resolution, srid, bands
        self.classes = dict(enumerate(names))
        self.normalization = {"mean": [0.0] * bands, "std": [1.0] * bands}
        self.centres = np.asarray(centres, np.float32)
        self.box, self.fail_on_call, self.calls = box, fail_on_call, 0

    def brightness(self, images: np.ndarray) -> np.ndarray:
        b = images.astype(np.float32).mean(axis=1)
        if self.box > 1:
            r = self.box // 2
            pad = np.pad(b, ((0, 0), (r, r), (r, r)), mode="edge")
            h, w = b.shape[1:]
            b = sum(pad[:, i:i + h, j:j + w] for i in range(self.box) for j in range(self.box)) / self.box**2
        return b

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError(f"model broke on call {self.calls}")
        b = self.brightness(images_uint8)
        logits = -(((b[:, None] - self.centres[None, :, None, None]) / 40.0) ** 2)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# -- helpers -----------------------------------------------------------------------------------


def load_array(conn: psycopg.Connection, table: str, data: np.ndarray, *, ul=UL, res: float = RES,
               srid: int = 3857, tile: int = 50, nodata=None, skip=()) -> None:
    """``data`` (bands, H, W) as a raster table of ``tile`` px tiles (tiles in ``skip``: absent)."""
    schema, name = table.split(".")
    ident = sql.Identifier(schema, name)
    conn.execute(sql.SQL("CREATE TABLE {} (rid serial PRIMARY KEY, rast raster)").format(ident))
    _, h, w = data.shape
    rows = []
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            if (r // tile, c // tile) in skip:
                continue
            t = wkb.from_array(np.ascontiguousarray(data[:, r:r + tile, c:c + tile]),
                               geotransform=(ul[0] + c * res, res, 0, ul[1] - r * res, 0, -res),
                               srid=srid, nodata=nodata)
            rows.append((wkb.encode(t),))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (rast) VALUES (ST_RastFromWKB(%b))").format(ident), rows)


def read_raster(conn: psycopg.Connection, table: str, grid: predict.Grid, band: int = 0) -> np.ndarray:
    """A raster table pasted into one (H, W) array on ``grid`` (255 where no tile)."""
    out = np.full((grid.height, grid.width), 255, np.uint8)
    schema, name = table.split(".")
    for (buf,) in conn.execute(sql.SQL("SELECT ST_AsBinary(rast) FROM {}").format(sql.Identifier(schema, name))):
        t = wkb.decode(buf)
        col = round((t.geotransform[0] - grid.x0) / grid.res)
        row = round((grid.y0 - t.geotransform[3]) / grid.res)
        out[row:row + t.height, col:col + t.width] = t.data[band]
    return out


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """3-band imagery whose brightness wanders around the class boundary (120): every pixel
    matters, seams would show."""
    rng = np.random.default_rng(seed)
    base = rng.normal(120, 60, (h, w)).clip(0, 255)
    return np.repeat(base[None], 3, axis=0).astype(np.uint8)


def extent_of(x0: float, y0: float, w: int, h: int, res: float = RES) -> tuple[float, float, float, float]:
    return (x0, y0 - h * res, x0 + w * res, y0)


def no_leftovers(conn: psycopg.Connection) -> None:
    rows = conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                        "AND (relname LIKE 'pgl_predict_%%' OR relname LIKE 'out%%' "
                        "OR relname LIKE 'o\\_%%')").fetchall()
    assert rows == []


# -- stitching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stitch, box, overlap", [("centre", 3, 8), ("centre", 1, 0), ("blend", 1, 16)])
def test_windows_match_predicting_the_whole_area(conn, db_dsn, stitch, box, overlap):
    """A translation-equivariant model gives, through windows, exactly what it gives on the
    whole area at once (the imagery reaches 10 px beyond the extent, so windows see context)."""
    data = textured(200, 260)
    load_array(conn, "public.img", data)
    model = BrightnessPredictor(box=box)
    margin = 10
    ext = extent_of(UL[0] + margin, UL[1] - margin, 240, 180)
    rep = predict.predict(db_dsn, model, out="public.out", imagery="public.img", extent=ext,
                          overlap=overlap, stitch=stitch, tile_px=32, progress=False,
                          probabilities=True, vectorize=False)
    assert (rep.grid.width, rep.grid.height) == (240, 180) and rep.grid.x0 == ext[0]
    whole = BrightnessPredictor(box=box).predict_proba(data[None])[0]
    expected = whole.argmax(0)[margin:margin + 180, margin:margin + 240]
    got = read_raster(conn, "public.out", rep.grid)
    assert np.array_equal(got, expected)
    prob = read_raster(conn, "public.out_prob", rep.grid, band=1)
    want = np.rint(whole[1, margin:margin + 180, margin:margin + 240] * predict.PROB_SCALE)
    assert np.abs(prob.astype(int) - want).max() <= 1


def test_without_overlap_a_3x3_model_shows_seams(conn, db_dsn):
    """The control: with overlap 0 the window edges (where the box filter lacks context) differ
    from the whole-area prediction - exactly there and nowhere else."""
    data = textured(200, 260, seed=1)
    load_array(conn, "public.img", data)
    ext = extent_of(UL[0] + 10, UL[1] - 10, 240, 180)
    rep = predict.predict(db_dsn, BrightnessPredictor(box=3), out="public.out", imagery="public.img",
                          extent=ext, overlap=0, tile_px=32, progress=False, vectorize=False)
    whole = BrightnessPredictor(box=3).predict_proba(data[None])[0].argmax(0)[10:190, 10:250]
    diff = read_raster(conn, "public.out", rep.grid) != whole
    assert diff.sum() > 20
    rows, cols = np.nonzero(diff)
    on_seam = np.isin(rows % 64, (0, 63)) | np.isin(cols % 64, (0, 63))  # window edges
    assert on_seam.all()


def test_stitcher_memory_does_not_grow_with_the_extent():
    """20,000 rows: the accumulator stays tile_px + window + 1 rows; tile rows come out as
    soon as they are final, in order, each exactly once."""
    st = predict.Stitcher(300, 20_000, window=64, overlap=16, mode="blend", n_classes=2, tile_px=256)
    assert st.acc.shape == (2, 256 + 64 + 1, 300)
    ones = np.ones((2, 64, 64), np.float32)
    valid = np.ones((64, 64), bool)
    emitted, lag = [], 0
    for r in range(st.nrows):
        for c in range(st.ncols):
            st.add(r, c, ones, valid)
        for row0, probs, v in st.finish_row(r):
            emitted.append((row0, probs.shape[1]))
            assert v.all() and np.allclose(probs, 1)
        lag = max(lag, st.final_rows(r) - (emitted[-1][0] + emitted[-1][1] if emitted else 0))
    assert emitted[0] == (0, 256) and emitted[-1] == (19_968, 32)
    assert [a for a, _ in emitted] == list(range(0, 20_000, 256))
    assert lag < 256


# -- objects across tile borders -----------------------------------------------------------------


def test_building_across_tile_borders_is_one_polygon(conn, db_dsn):
    """A building spanning four output tiles is one row; two buildings touching only at a
    corner across a border stay two (4-connectivity, as inside a tile)."""
    data = np.full((3, 128, 128), 30, np.uint8)
    data[:, 20:50, 20:45] = 230  # crosses the tile corner at (32, 32)
    data[:, 70:96, 70:96] = 230  # ends at the tile corner (96, 96) ...
    data[:, 96:110, 96:120] = 230  # ... where this one starts: corner contact only
    data[:, 40:44, 100:126] = 230  # inside one tile
    load_array(conn, "public.img", data, tile=64)
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                          extent=extent_of(*UL, 128, 128), overlap=8, tile_px=32, progress=False)
    assert rep.pieces > rep.polygons == 4
    rows = conn.execute("SELECT id, class_id, class_name, pixels, area_m2, mean_prob, model, run_id,"
                        " ST_IsValid(geom), ST_NumGeometries(geom), ST_Area(geom), ST_XMin(geom), ST_YMax(geom)"
                        " FROM public.out_polygons ORDER BY pixels DESC").fetchall()
    big = rows[0]
    assert big[1:4] == (1, "building", 30 * 25)
    assert big[8] is True and big[9] == 1 and big[10] == pytest.approx(750, rel=1e-9)
    assert (big[11], big[12]) == (UL[0] + 20, UL[1] - 20)
    # ground area: EPSG:3857 metres shrink by cos(latitude) on the ground (about 27.6 deg N)
    lat = math.degrees(2 * math.atan(math.exp(UL[1] / 6378137)) - math.pi / 2)
    assert big[4] == pytest.approx(750 * math.cos(math.radians(lat)) ** 2, rel=0.01)
    assert sorted(r[3] for r in rows) == [26 * 4, 14 * 24, 26 * 26, 750]
    assert all(0.5 < r[5] <= 1 and r[6] == "brightness" and r[7] == rep.run_id for r in rows)
    gtype = conn.execute("SELECT type, srid FROM geometry_columns WHERE f_table_name = 'out_polygons'").fetchone()
    assert gtype == ("MULTIPOLYGON", 3857)


def test_min_pixels_drops_specks_and_fills_pinholes(conn, db_dsn):
    """Noise stays out of the polygon layer (the raster keeps it): a 1 px speck inside a tile,
    a 3 px object split by a tile border (3 < 4 only once its pieces are joined), a 1 px hole;
    a 3 x 3 hole stays."""
    data = np.full((3, 128, 128), 30, np.uint8)
    data[:, 10, 10] = 230  # speck
    data[:, 50, 31:34] = 230  # 3 px across the border at column 32
    data[:, 60:80, 60:80] = 230  # building ...
    data[:, 70, 70] = 30  # ... with a pinhole
    data[:, 64:67, 64:67] = 30  # ... and a 3 x 3 courtyard
    load_array(conn, "public.img", data, tile=64)
    kw = dict(imagery="public.img", extent=extent_of(*UL, 128, 128), overlap=8, tile_px=32, progress=False)
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", **kw)
    assert (rep.polygons, rep.dropped, rep.min_pixels) == (1, 1, 4)
    row = conn.execute("SELECT pixels, ST_NumInteriorRings(ST_GeometryN(geom, 1)), ST_Area(geom) "
                       "FROM public.out_polygons").fetchone()
    assert row == (400 - 1 - 9, 1, 400 - 9)
    assert (read_raster(conn, "public.out", rep.grid) == 1).sum() == 1 + 3 + 390  # the raster keeps all
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", overwrite=True, min_pixels=1, **kw)
    assert rep.polygons == 3
    assert conn.execute("SELECT sum(ST_NumInteriorRings(ST_GeometryN(geom, 1))) FROM public.out_polygons"
                        ).fetchone()[0] == 2


def speckled(noise: bool) -> tuple[np.ndarray, int]:
    """128 x 128 px for 32 px output tiles: a building across a tile corner, one inside a tile,
    a 6 px object split 3 + 3 by a tile border and a 2 px one split 1 + 1; with ``noise`` also
    a lattice of 1, 2 and 3 px specks inside tiles (none touching anything). Returns (imagery,
    number of specks)."""
    data = np.full((3, 128, 128), 30, np.uint8)
    data[:, 20:50, 20:45] = 230  # 750 px across the tile corner at (32, 32)
    data[:, 70:90, 100:120] = 230  # 400 px inside one tile
    data[:, 95:97, 40:43] = 230  # 6 px: 3 above and 3 below the tile border at row 96
    data[:, 10, 63:65] = 230  # 2 px: 1 left and 1 right of the tile border at column 64
    specks = 0
    if noise:
        for k, (r, c) in enumerate((r, c) for r in range(4, 128, 6) for c in range(4, 128, 6)):
            if not (1 <= r % 32 <= 28 and 1 <= c % 32 <= 28) or (data[:, r - 2:r + 4, c - 2:c + 4] == 230).any():
                continue
            data[:, r, c] = 230
            if k % 3 >= 1:
                data[:, r, c + 1] = 230
            if k % 3 == 2:
                data[:, r + 1, c] = 230
            specks += 1
    return data, specks


def test_min_pixels_leaves_noise_out_before_vectorizing(conn, db_dsn):
    """Speckle noise yields no polygon under min_pixels; the objects that stay have exactly the
    geometry they have without the noise; objects split by tile borders are judged by their
    whole size (6 px = 3 + 3 stays, 2 px = 1 + 1 goes); the raster keeps every pixel."""
    kw = dict(imagery="public.img", extent=extent_of(*UL, 128, 128), overlap=8, tile_px=32, progress=False)
    clean, _ = speckled(noise=False)
    load_array(conn, "public.img", clean, tile=64)
    predict.predict(db_dsn, BrightnessPredictor(), out="public.clean", **kw)
    noisy, specks = speckled(noise=True)
    assert specks > 200
    conn.execute("DROP TABLE public.img")
    load_array(conn, "public.img", noisy, tile=64)
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", **kw)
    assert (rep.polygons, rep.dropped, rep.min_pixels) == (3, specks, 4)
    shapes = "SELECT pixels, ST_AsBinary(geom) FROM public.{} ORDER BY pixels"
    got = conn.execute(shapes.format("out_polygons")).fetchall()
    assert [r[0] for r in got] == [6, 400, 750]
    assert got == conn.execute(shapes.format("clean_polygons")).fetchall()
    assert (read_raster(conn, "public.out", rep.grid) == 1).sum() == (noisy[0] == 230).sum()

    # 0 keeps every object: one per 4-connected component of the whole raster (GDAL counts them)
    from rasterio import features

    rep0 = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", overwrite=True, min_pixels=0, **kw)
    cls = read_raster(conn, "public.out", rep0.grid)
    n = sum(1 for _ in features.shapes(cls, mask=cls == 1, connectivity=4))
    assert rep0.polygons == n == 3 + 1 + specks and rep0.dropped == 0
    assert "every object kept" in str(rep0) and f"objects under 4 px left out ({specks} inside tiles" in str(rep)
    sizes = conn.execute("SELECT pixels, count(*) FROM public.out_polygons GROUP BY 1 ORDER BY 1").fetchall()
    assert [s for s, _ in sizes] == [1, 2, 3, 6, 400, 750]
    assert conn.execute("SELECT bool_and(ST_IsValid(geom)) FROM public.out_polygons").fetchone()[0]


def test_bad_min_pixels_is_one_line():
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(errors.ConfigError) as e:
            predict.predict(None, BrightnessPredictor(), out="public.out", imagery="public.img",
                            extent=(0, 0, 1, 1), min_pixels=bad)
        assert str(e.value) == (f"min pixels must be a whole number of pixels >= 0 (0 keeps every object), "
                                f"not {bad!r}")


# -- imagery: gaps, other grids ---------------------------------------------------------------------


def test_nodata_where_there_is_no_imagery(conn, db_dsn):
    data = np.full((3, 150, 150), 230, np.uint8)
    load_array(conn, "public.img", data, tile=50, skip={(1, 1), (0, 2)})
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                          extent=extent_of(*UL, 150, 150), overlap=8, tile_px=50, progress=False,
                          vectorize=False)
    assert (rep.tiles, rep.tiles_empty) == (7, 2)
    got = read_raster(conn, "public.out", rep.grid)
    assert (got[50:100, 50:100] == 255).all() and (got[0:50, 100:150] == 255).all()
    assert (got[100:150] == 1).all() and (got[0:50, 0:100] == 1).all()
    nodata = conn.execute("SELECT nodata_values FROM raster_columns WHERE r_table_name = 'out'").fetchone()[0]
    assert nodata == [255.0]
    assert "NODATA 255" in str(rep)


def test_imagery_in_another_crs_and_resolution_is_warped(conn, db_dsn):
    """Imagery stored in lon/lat (EPSG:4326) and imagery at 2 m: windows stay on the model's
    1 m EPSG:3857 grid, the report says what was reprojected/resampled, the object keeps its size."""
    data = np.full((3, 100, 100), 30, np.uint8)
    data[:, 30:70, 20:80] = 230  # 40 x 60 m
    load_array(conn, "public.img", data, tile=100)
    conn.execute("CREATE TABLE public.img4326 AS SELECT rid, ST_Transform(rast, 4326) AS rast FROM public.img")
    conn.execute("CREATE TABLE public.img2m AS SELECT rid, ST_Rescale(rast, 2.0, -2.0) AS rast FROM public.img")
    for table, word in (("public.img4326", "reprojected"), ("public.img2m", "resampled")):
        rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery=table,
                              extent=extent_of(*UL, 100, 100), overlap=8, tile_px=50, progress=False,
                              overwrite=True)
        assert any(word in n for n in rep.notes), rep.notes
        assert rep.grid.res == 1.0 and rep.grid.srid == 3857
        (px,) = conn.execute("SELECT sum(pixels) FROM public.out_polygons").fetchone()
        assert abs(px - 2400) < 0.06 * 2400


def test_imagery_sql_like_a_recipe(conn, db_dsn):
    """Imagery as SQL that uses the tile relation, exactly as a dataset's image SQL does."""
    data = np.full((3, 64, 64), 230, np.uint8)
    load_array(conn, "public.img", data, tile=32)
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="results.out",
                          imagery="SELECT rast FROM public.img\n WHERE ST_Intersects(rast, tile_geom)\n"
                                  "   AND tile_srid = 3857 AND tile_res > 0 -- a comment at the end;\n",
                          extent=extent_of(*UL, 64, 64), overlap=8, tile_px=32, progress=False)
    assert rep.tiles == 4 and rep.polygons == 1 and "created schema results" in rep.notes
    assert conn.execute("SELECT count(*) FROM results.out_polygons").fetchone()[0] == 1


# -- failures leave nothing behind ---------------------------------------------------------------


def _run_row(conn, run_id):
    return conn.execute("SELECT kind, status, error, finished_at IS NOT NULL FROM pggeolearn.runs "
                        "WHERE run_id = %s", [run_id]).fetchone()


def test_a_failing_model_leaves_no_table(conn, db_dsn):
    load_array(conn, "public.img", textured(200, 200))
    with pytest.raises(RuntimeError, match="model broke"):
        predict.predict(db_dsn, BrightnessPredictor(fail_on_call=4), out="results.out",
                        imagery="public.img", extent=extent_of(*UL, 200, 200), overlap=8, batch_size=2,
                        tile_px=32, probabilities=True, progress=False)
    no_leftovers(conn)
    assert conn.execute("SELECT to_regnamespace('results')").fetchone()[0] is None  # not even the schema
    (run_id,) = conn.execute("SELECT max(run_id) FROM pggeolearn.runs").fetchone()
    assert _run_row(conn, run_id) == ("predict", "failed", "model broke on call 4", True)
    assert conn.execute("SELECT to_regclass('public.layer_styles')").fetchone()[0] is None


def test_a_corrupt_imagery_tile_fails_the_run_cleanly(conn, db_dsn):
    load_array(conn, "public.img", textured(200, 200))
    # an existing output stays as it was when an --overwrite run fails
    predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                    extent=extent_of(*UL, 100, 100), overlap=8, tile_px=32, progress=False)
    before = conn.execute("SELECT count(*) FROM public.out").fetchone()[0]
    # one raster far down the extent has a single band: found only when its row band is read
    one_band = wkb.from_array(np.zeros((1, 50, 50), np.uint8),
                              geotransform=(UL[0], RES, 0, UL[1] - 150, 0, -RES), srid=3857)
    conn.execute("UPDATE public.img SET rast = ST_RastFromWKB(%b) WHERE ST_UpperLeftY(rast) = %s "
                 "AND ST_UpperLeftX(rast) = %s", [wkb.encode(one_band), UL[1] - 150, UL[0]])
    with pytest.raises(errors.ConfigError, match="has 1 band"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                        extent=extent_of(*UL, 200, 200), overlap=8, tile_px=32, progress=False,
                        overwrite=True)
    assert conn.execute("SELECT count(*) FROM public.out").fetchone()[0] == before
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'pgl_predict_%%'").fetchone()[0] == 0
    status = conn.execute("SELECT status, error FROM pggeolearn.runs ORDER BY run_id").fetchall()
    assert status[0] == ("done", None) and status[1][0] == "failed" and "1 band" in status[1][1]
    # SRID 0 somewhere: the server-side check names it
    conn.execute("UPDATE public.img SET rast = ST_SetSRID(ST_RastFromWKB(%b), 0) WHERE "
                 "ST_UpperLeftY(rast) = %s AND ST_UpperLeftX(rast) = %s",
                 [wkb.encode(one_band), UL[1] - 150, UL[0]])
    with pytest.raises(errors.RecipeError, match="SRID 0"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out2",
                        imagery="SELECT rast FROM public.img WHERE ST_Intersects(ST_Envelope(rast), "
                                "ST_SetSRID(tile_geom, ST_SRID(rast)))",
                        extent=extent_of(*UL, 200, 200), overlap=8, tile_px=32, progress=False)
    assert conn.execute("SELECT to_regclass('public.out2')").fetchone()[0] is None


# -- refusals and modes ----------------------------------------------------------------------------


def test_refusals_are_one_line_and_write_nothing(conn, db_dsn):
    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    ext = extent_of(*UL, 64, 64)
    with pytest.raises(errors.NotFound) as e:
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                        extent=(0, 0, 100, 100), progress=False)
    assert "no imagery" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(errors.ModelNotFound, match="unknown model 'nope'"):
        predict.predict(db_dsn, "nope", out="public.out", imagery="public.img", extent=ext, progress=False)
    with pytest.raises(errors.NotFound, match="does not exist"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.nothing",
                        extent=ext, progress=False)
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 0
    no_leftovers(conn)

    predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img", extent=ext,
                    tile_px=32, progress=False)
    with pytest.raises(errors.AlreadyExists) as e:
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                        extent=ext, progress=False)
    assert str(e.value) == ("table public.out already exists: pass --overwrite to replace it or "
                            "--append to add to it")
    with pytest.raises(errors.ConfigError, match="exclude each other"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                        extent=ext, overwrite=True, append=True, progress=False)
    with pytest.raises(errors.ConfigError, match="overlap"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.x", imagery="public.img",
                        extent=ext, overlap=64, progress=False)


def test_options_are_one_value_or_keywords():
    """``predict(dsn, model, PredictOptions(...), **kw)``: keywords replace the options' fields;
    bad or unknown options are one-line ConfigErrors before anything is read."""
    opts = predict.PredictOptions(out="public.out", imagery="public.img", extent=(0, 0, 1, 1), stitch="nope")
    with pytest.raises(errors.ConfigError, match="stitch must be one of centre, blend"):
        predict.predict(None, BrightnessPredictor(), opts)
    with pytest.raises(errors.ConfigError, match="batch size must be 1..4096"):
        predict.predict(None, BrightnessPredictor(), opts, stitch="blend", batch_size=0)
    with pytest.raises(errors.ConfigError, match="bad predict option.*'nope'"):
        predict.predict(None, BrightnessPredictor(), out="public.out", nope=1)


def test_overwrite_and_append(conn, db_dsn):
    data = np.full((3, 64, 128), 30, np.uint8)
    data[:, 10:20, 10:20] = 230
    data[:, 10:20, 74:84] = 230
    load_array(conn, "public.img", data, tile=32)
    left, right = extent_of(*UL, 64, 64), extent_of(UL[0] + 64, UL[1], 64, 64)
    r1 = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                         extent=left, tile_px=32, overlap=8, progress=False)
    r2 = predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img",
                         extent=right, tile_px=32, overlap=8, progress=False, append=True)
    assert conn.execute("SELECT count(*), count(DISTINCT rid), count(DISTINCT run_id) FROM public.out"
                        ).fetchone() == (8, 8, 2)
    assert conn.execute("SELECT count(*) FROM public.out_polygons").fetchone()[0] == 2
    ext = conn.execute("SELECT ST_XMin(extent), ST_XMax(extent) FROM raster_columns "
                       "WHERE r_table_name = 'out'").fetchone()
    assert ext == (UL[0], UL[0] + 128)
    assert conn.execute("SELECT count(*) FROM raster_overviews WHERE r_table_name = 'out'").fetchone()[0] == 2
    predict.predict(db_dsn, BrightnessPredictor(), out="public.out", imagery="public.img", extent=left,
                    tile_px=32, overlap=8, progress=False, overwrite=True)
    assert conn.execute("SELECT count(*), min(run_id) FROM public.out").fetchone() == (4, r2.run_id + 1)
    assert conn.execute("SELECT count(*) FROM public.layer_styles WHERE f_table_name = 'out'").fetchone()[0] == 1
    runs = conn.execute("SELECT run_id, status, outputs->>'tiles', ST_SRID(extent) FROM pggeolearn.runs "
                        "ORDER BY run_id").fetchall()
    assert [r[1:] for r in runs] == [("done", "4", 3857)] * 3 and runs[0][0] == r1.run_id


def test_dataset_split_is_predicted_where_its_chips_are(conn, db_dsn):
    """--dataset D --split test: the area of that split's chips (on the dataset's grid), with
    the dataset's own image SQL; other tiles are not written."""
    from pggeolearn import chips, datasets

    data = textured(128, 192, seed=3)
    load_array(conn, "public.img", data, tile=32)
    conn.execute("CREATE TABLE public.shapes (geom geometry(Polygon, 3857))")
    conn.execute("INSERT INTO public.shapes VALUES (ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [UL[0] + 5, UL[1] - 60, UL[0] + 150, UL[1] - 40])
    datasets.create(conn, datasets.Recipe(
        name="small", srid=3857, resolution=RES, tile_px=32, extent=extent_of(*UL, 192, 128),
        image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, 1 AS class_id FROM public.shapes WHERE geom && tile_geom",
        classes={1: "building"}))
    chips.build(conn, "small", progress=False)
    chips.assign_splits(conn, "small", block_m=64, ratios=(0.5, 0.25, 0.25), seed=1)
    test_tiles = conn.execute("SELECT ST_XMin(geom), ST_YMax(geom) FROM pggeolearn.chips WHERE "
                              "dataset = 'small' AND split = 'test' ORDER BY 2 DESC, 1").fetchall()
    assert 0 < len(test_tiles) < 24
    rep = predict.predict(db_dsn, BrightnessPredictor(tile_px=32), out="public.out", dataset="small",
                          split="test", overlap=8, tile_px=32, progress=False)
    got = conn.execute("SELECT ST_UpperLeftX(rast), ST_UpperLeftY(rast) FROM public.out "
                       "ORDER BY 2 DESC, 1").fetchall()
    assert got == test_tiles and rep.tiles == len(test_tiles)
    assert conn.execute("SELECT dataset FROM pggeolearn.runs").fetchone()[0] == "small"


def test_a_registry_model_predicts_through_the_protocol(conn, db_dsn):
    """An (untrained, seeded) U-Net saved in pggeolearn.models and loaded by name: with overlap
    0 on the imagery's own grid each output tile is exactly the model's argmax on that tile."""
    torch = pytest.importorskip("torch")
    from pggeolearn.training import models_torch, registry

    arch = registry.Architecture(in_channels=3, num_classes=2, width=4, depth=2, stem_stride=1)
    torch.manual_seed(0)
    net = models_torch.build(arch)
    registry.save(conn, registry.ModelRecord(
        name="tiny", dataset="none", recipe_hash="-", framework="torch", architecture=arch.to_json(),
        hyperparameters={}, classes={0: "background", 1: "building"},
        normalization={"mean": [120.0] * 3, "std": [60.0] * 3}, tile_px=32, resolution=RES,
        srid=3857, bands=3, weights=models_torch.weights_to_bytes(net), metrics={}))
    data = textured(64, 96, seed=5)
    load_array(conn, "public.img", data, tile=32)
    rep = predict.predict(db_dsn, "tiny", out="public.out", imagery="public.img",
                          extent=extent_of(*UL, 96, 64), overlap=0, tile_px=32, progress=False,
                          device="cpu")
    model = registry.load(conn, "tiny", device="cpu")
    tiles = np.stack([data[:, r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32, 64)])
    p = model.predict_proba(tiles)
    want = np.block([[p[0], p[1], p[2]], [p[3], p[4], p[5]]])  # (2, 64, 96)
    got = read_raster(conn, "public.out", rep.grid)
    clear = np.abs(want[1] - want[0]) > 1e-4  # float order may differ between batch sizes
    assert clear.mean() > 0.9 and np.array_equal(got[clear], want.argmax(0)[clear])
    assert conn.execute("SELECT model FROM pggeolearn.runs").fetchone()[0] == "tiny"


@pytest.mark.banepa
def test_banepa_predict_block(conn, db_dsn, banepa):
    """The unlabelled Banepa block, imported and predicted on its own grid (EPSG:3857, z19)."""
    from pggeolearn.importers import import_raster

    import_raster(conn, [banepa / "imagery" / "banepa_predict_mosaic_epsg3857.tif"], "public.banepa_predict",
                  progress=False)
    (res,) = conn.execute("SELECT scale_x FROM raster_columns WHERE r_table_name = 'banepa_predict'").fetchone()
    ext = conn.execute("SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM "
                       "(SELECT ST_Extent(ST_Envelope(rast)) e FROM public.banepa_predict) s").fetchone()
    model = BrightnessPredictor(tile_px=256, resolution=res, centres=(90.0, 215.0),
                                names=("background", "bright roof"))
    rep = predict.predict(db_dsn, model, out="public.banepa_bright", imagery="public.banepa_predict",
                          extent=ext, overlap=32, progress=False, probabilities=True)
    assert (rep.grid.width, rep.grid.height) == (2048, 2048) and rep.tiles == 64
    assert rep.grid.bounds == pytest.approx(ext, abs=1e-6)
    assert rep.notes == [] and rep.polygons > 10
