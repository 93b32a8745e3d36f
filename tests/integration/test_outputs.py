"""Outputs never destroy inputs or the catalog (issue 11, item 4): each observed defect first.

Observed on main: ``predict --out pggeolearn.models --overwrite`` and ``import vector --table
pggeolearn.models --overwrite`` dropped the model registry; ``--out`` equal to ``--imagery``
replaced the input imagery. Now: never the catalog, never an input, only pggeolearn's own
tables unless ``--force``, every name checked before any work.
"""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
from test_predict import UL, BrightnessPredictor, extent_of, load_array

from pggeolearn import errors, evaluate, outputs, predict
from pggeolearn.db.tables import TableName
from pggeolearn.importers import import_vector

EXT = extent_of(*UL, 64, 64)


def square_geojson(tmp_path, name="sq.geojson"):
    d = 1e-4
    ring = [[85.52, 27.63], [85.52 + d, 27.63], [85.52 + d, 27.63 + d], [85.52, 27.63 + d], [85.52, 27.63]]
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"k": 1}}]}))
    return path


def registry_intact(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT to_regclass('pggeolearn.models') IS NOT NULL").fetchone()[0]
    assert conn.execute("SELECT to_regclass('pggeolearn.runs') IS NOT NULL").fetchone()[0]


def n_runs(conn) -> int:
    return conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0]


# ------------------------------------------------------------------------------ TableName


def test_table_name_parses_quotes_and_counts_bytes():
    assert TableName.parse("roads") == TableName("public", "roads")
    assert TableName.parse("gis.Roads").parts == ("gis", "Roads")
    t = TableName.parse('"my schema"."a.b"')
    assert t.parts == ("my schema", "a.b") and str(t) == '"my schema"."a.b"'
    assert TableName.parse('"say ""hi"""').name == 'say "hi"'
    for bad in ("", "a.b.c", "1abc", "a;drop table x", "a b"):
        with pytest.raises(errors.ConfigError, match="not a table name"):
            TableName.parse(bad)
    TableName.parse("x" * 63)
    with pytest.raises(errors.ConfigError, match="at most 63 bytes"):
        TableName.parse("x" * 64)
    with pytest.raises(errors.ConfigError, match="at most 63 bytes"):
        TableName.parse('"' + "é" * 32 + '"')  # 64 bytes in 32 characters
    # a raster output leaves room for its overviews' o_16_ prefix
    TableName.parse("x" * 58, reserve="o_16_")
    with pytest.raises(errors.ConfigError, match=r"o_16_x+ would be 64 bytes.*at most 58"):
        TableName.parse("x" * 59, reserve="o_16_")


# ------------------------------------------------------------------------------ the catalog


def test_predict_never_writes_into_the_catalog(conn, db_dsn):
    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    for force in (False, True):
        with pytest.raises(errors.ConfigError, match="schema pggeolearn holds pggeolearn's catalog"):
            predict.predict(db_dsn, BrightnessPredictor(), out="pggeolearn.models", imagery="public.img",
                            extent=EXT, overwrite=True, force=force, progress=False)
    with pytest.raises(errors.ConfigError, match="pggeolearn's catalog"):  # a derived name too
        predict.predict(db_dsn, BrightnessPredictor(), out="public.x", polygons="pggeolearn.runs",
                        imagery="public.img", extent=EXT, overwrite=True, progress=False)
    registry_intact(conn)
    assert n_runs(conn) == 0


def test_import_vector_never_replaces_the_catalog(conn, tmp_path):
    path = square_geojson(tmp_path)
    for force in (False, True):
        with pytest.raises(errors.ConfigError, match="pggeolearn's catalog"):
            import_vector(conn, path, "pggeolearn.models", overwrite=True, force=force, progress=False)
    registry_intact(conn)


def test_extension_tables_are_never_replaced(conn, tmp_path):
    with pytest.raises(errors.ConfigError, match="belongs to an extension"):
        import_vector(conn, square_geojson(tmp_path), "public.spatial_ref_sys", overwrite=True,
                      force=True, progress=False)
    assert conn.execute("SELECT count(*) > 1000 FROM spatial_ref_sys").fetchone()[0]


# ------------------------------------------------------------------------------ inputs


def test_out_equal_to_imagery_is_refused(conn, db_dsn):
    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    before = conn.execute("SELECT count(*) FROM public.img").fetchone()[0]
    for out in ("public.img", "img"):
        with pytest.raises(errors.ConfigError, match="public.img is also an input of this command"):
            predict.predict(db_dsn, BrightnessPredictor(), out=out, imagery="public.img", extent=EXT,
                            overwrite=True, force=True, progress=False)
    # the same through imagery SQL, found in the query plan (not by matching text)
    with pytest.raises(errors.ConfigError, match="public.img is also an input"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.img",
                        imagery="SELECT rast FROM img AS i WHERE ST_Intersects(i.rast, tile_geom)",
                        extent=EXT, overwrite=True, force=True, progress=False)
    # a derived output (the polygons) that is the imagery
    with pytest.raises(errors.ConfigError, match="also an input"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.pred", polygons="public.img",
                        imagery="public.img", extent=EXT, overwrite=True, force=True, progress=False)
    assert conn.execute("SELECT count(*) FROM public.img").fetchone()[0] == before
    assert n_runs(conn) == 0


def test_two_outputs_may_not_be_one_table(conn, db_dsn):
    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    with pytest.raises(errors.ConfigError, match="same table public.pred"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.pred", polygons="public.pred",
                        imagery="public.img", extent=EXT, progress=False)


# ------------------------------------------------------------------------------ foreign tables


def test_overwrite_replaces_only_pggeolearns_tables_unless_force(conn, db_dsn, tmp_path):
    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    conn.execute("CREATE TABLE public.precious (id int)")
    conn.execute("INSERT INTO public.precious VALUES (1)")
    kw = dict(imagery="public.img", extent=EXT, tile_px=32, progress=False)
    with pytest.raises(errors.AlreadyExists, match="public.precious was not created by pggeolearn.*--force"):
        predict.predict(db_dsn, BrightnessPredictor(), out="public.precious", overwrite=True, **kw)
    with pytest.raises(errors.AlreadyExists, match="was not created by pggeolearn"):
        import_vector(conn, square_geojson(tmp_path), "public.precious", overwrite=True, progress=False)
    assert conn.execute("SELECT count(*) FROM public.precious").fetchone()[0] == 1
    assert n_runs(conn) == 0

    # pggeolearn's own outputs are replaced with --overwrite alone
    predict.predict(db_dsn, BrightnessPredictor(), out="public.pred", **kw)
    assert outputs.is_ours(conn, TableName("public", "pred"))
    assert outputs.is_ours(conn, TableName("public", "pred_polygons"))
    predict.predict(db_dsn, BrightnessPredictor(), out="public.pred", overwrite=True, **kw)
    import_vector(conn, square_geojson(tmp_path), "public.sq", progress=False)
    assert outputs.is_ours(conn, TableName("public", "sq"))
    import_vector(conn, square_geojson(tmp_path), "public.sq", overwrite=True, progress=False)

    # --force replaces a foreign table, and the result is then pggeolearn's
    import_vector(conn, square_geojson(tmp_path), "public.precious", overwrite=True, force=True,
                  progress=False)
    assert outputs.is_ours(conn, TableName("public", "precious"))


def test_evaluate_layer_is_guarded_before_any_work(conn, db_dsn):
    conn.execute("CREATE TABLE public.mine (id int)")
    # refused before the model or the dataset is even looked up
    with pytest.raises(errors.ConfigError, match="pggeolearn's catalog"):
        evaluate.evaluate(db_dsn, "no-such-model", dataset="nope", out_layer="pggeolearn.chips",
                          overwrite=True, progress=False)
    with pytest.raises(errors.AlreadyExists, match="public.mine already exists: pass --overwrite to "
                                                   "replace it$"):
        evaluate.evaluate(db_dsn, "no-such-model", dataset="nope", out_layer="public.mine", progress=False)
    with pytest.raises(errors.AlreadyExists, match="not created by pggeolearn"):
        evaluate.evaluate(db_dsn, "no-such-model", dataset="nope", out_layer="public.mine",
                          overwrite=True, progress=False)
    with pytest.raises(errors.ConfigError, match="at most 63 bytes"):
        evaluate.evaluate(db_dsn, "no-such-model", dataset="nope", out_layer="e" * 64, progress=False)


def test_long_names_are_refused_before_any_work(conn, db_dsn):
    # predict's class raster gets overviews o_2_/o_4_; _prob and _polygons are derived
    with pytest.raises(errors.ConfigError, match="too long"):
        predict.predict(db_dsn, "no-such-model", out="p" * 60, imagery="public.img", extent=EXT,
                        progress=False)
    with pytest.raises(errors.ConfigError, match="at most 63 bytes"):
        predict.predict(db_dsn, "no-such-model", out="p" * 55, imagery="public.img", extent=EXT,
                        progress=False)  # p*55 + _polygons = 64 bytes
    with pytest.raises(errors.ConfigError, match=r"o_\d_p+_prob would be 64 bytes"):
        predict.predict(db_dsn, "no-such-model", out="p" * 55, imagery="public.img", extent=EXT,
                        probabilities=True, vectorize=False, progress=False)
    assert n_runs(conn) == 0


def test_cli_refusals_are_one_line(conn, db_dsn, tmp_path):
    from click.testing import CliRunner

    from pggeolearn.cli.main import cli

    load_array(conn, "public.img", np.full((3, 64, 64), 230, np.uint8), tile=32)
    runner = CliRunner()
    cases = [
        (["import", "vector", str(square_geojson(tmp_path)), "--table", "pggeolearn.models", "--overwrite",
          "--force", "--no-progress"], "pggeolearn's catalog"),
        (["predict", "brightness", "--extent", *map(str, EXT), "--imagery", "public.img",
          "--out", "pggeolearn.models", "--overwrite", "--no-progress"], "pggeolearn's catalog"),
        (["predict", "brightness", "--extent", *map(str, EXT), "--imagery", "public.img",
          "--out", "public.img", "--overwrite", "--force", "--no-progress"], "also an input"),
    ]
    for args, expected in cases:
        result = runner.invoke(cli, ["--dsn", db_dsn, *args])
        exc = result.exception  # main() prints it as "error: <one line>"
        assert isinstance(exc, errors.PggeolearnError), result.output
        assert expected in str(exc) and "\n" not in str(exc)
    registry_intact(conn)
    assert conn.execute("SELECT count(*) FROM public.img").fetchone()[0] == 4
