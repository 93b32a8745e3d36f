"""Living datasets: `dataset watch` + `chips refresh` rebuild exactly the chips whose tiles the
changed source rows touch (before and after the edit), keep splits, update statistics.

Data: test_chips' 8 x 6 grid of 32 px tiles (1 m, EPSG:3857): a class-1 strip over rows 2-3,
class-2 squares in tiles 9, 30 and 46, tiles 0 and 1 without imagery (orphans)."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from test_chips import NCOLS, PX, make_data, make_dataset, tile_ul

from pggeolearn import chips, errors, refresh, wkb


def built_at(conn, dataset="small") -> dict[int, object]:
    return dict(conn.execute("SELECT tile_id, built_at FROM pggeolearn.chips WHERE dataset = %s",
                             [dataset]).fetchall())


def splits(conn, dataset="small") -> dict[int, str]:
    return dict(conn.execute("SELECT tile_id, split FROM pggeolearn.chips WHERE dataset = %s",
                             [dataset]).fetchall())


def label_of(conn, tile: int, dataset="small") -> np.ndarray:
    raw = conn.execute("SELECT ST_AsBinary(label) FROM pggeolearn.chips WHERE dataset = %s "
                       "AND tile_id = %s", [dataset, tile]).fetchone()[0]
    return wkb.decode(raw).band(0)


@pytest.fixture
def watched(conn, db_dsn):
    make_data(conn)
    make_dataset(conn)
    chips.build(conn, "small", progress=False)
    found, margin = refresh.watch(conn, "small")
    assert {s.name for s in found} == {"public.img", "public.shapes"}
    assert {s.name: s.columns for s in found} == {"public.img": ["r:rast"],
                                                  "public.shapes": ["g:geom"]}
    assert margin == 0.0  # no buffer_m in this recipe
    return db_dsn


def test_nothing_changed_rebuilds_nothing(conn, watched):
    before = built_at(conn)
    report = refresh.refresh(watched, "small", progress=False)
    assert report.changes == 0 and report.tiles == [] and report.build is None
    assert built_at(conn) == before
    assert "no source changes" in str(report)


def test_moving_one_building_rebuilds_exactly_the_tiles_it_touches(conn, watched):
    before, split_before = built_at(conn), splits(conn)
    assert label_of(conn, 9).max() == 2
    # the square of tile 9 moves into tile 12 (row 1, col 4), as a QGIS edit would
    x0, y0 = tile_ul(12)
    x9, y9 = tile_ul(9)
    conn.execute("UPDATE public.shapes SET geom = ST_MakeEnvelope(%s, %s, %s, %s, 3857) "
                 "WHERE class_id = 2 AND geom && ST_MakeEnvelope(%s, %s, %s, %s, 3857)",
                 [x0 + 4, y0 - 12, x0 + 14, y0 - 4, x9, y9 - PX, x9 + PX, y9])
    report = refresh.refresh(watched, "small", progress=False)
    assert report.tiles == [9, 12]
    assert report.changes == 2 and report.by_source == {"public.shapes": 2}
    assert report.changed == 2
    after = built_at(conn)
    assert {t for t in after if after[t] != before[t]} == {9, 12}
    assert splits(conn) == split_before  # a tile never changes split
    assert label_of(conn, 9).max() == 0 and label_of(conn, 12).max() == 2
    # statistics follow the store: class pixels are recounted
    stats = conn.execute("SELECT stats FROM pggeolearn.datasets WHERE name = 'small'").fetchone()[0]
    assert sum(stats["splits"].values()) == 48
    # the watermark moved: a second refresh has nothing to do
    assert refresh.refresh(watched, "small", progress=False).tiles == []


def test_deleting_a_strip_rebuilds_the_rows_it_crossed(conn, watched):
    conn.execute("DELETE FROM public.shapes WHERE class_id = 1")
    report = refresh.refresh(watched, "small", progress=False)
    # the strip runs y in [UL-100, UL-70]: tile rows 2 and 3 (and it touches nothing else)
    rows = {t // NCOLS for t in report.tiles}
    assert rows == {2, 3} and len(report.tiles) == 2 * NCOLS
    assert all(label_of(conn, t).max() in (0, 2) for t in report.tiles)


def test_margin_widens_footprints_for_buffered_labels(conn, watched):
    # a point in the middle of tile 20 with a 40 m margin reaches its 8 neighbours
    x0, y0 = tile_ul(20)
    conn.execute("INSERT INTO public.shapes (class_id, geom) VALUES (2, ST_MakeEnvelope("
                 "%s, %s, %s, %s, 3857))", [x0 + 15, y0 - 17, x0 + 17, y0 - 15])
    report = refresh.refresh(watched, "small", margin_m=20.0, progress=False)
    r, c = divmod(20, NCOLS)
    expect = sorted(rr * NCOLS + cc for rr in (r - 1, r, r + 1) for cc in (c - 1, c, c + 1))
    assert report.tiles == expect  # ground metres: 20 m at 27.5 deg N is ~22.6 EPSG:3857 units
    assert report.changed == 1  # only tile 20's label differs


def test_appended_imagery_turns_an_orphan_usable(conn, watched):
    assert splits(conn)[0] == "excluded"
    x0, y0 = tile_ul(0)
    data = np.full((3, PX, PX), 77, dtype=np.uint8)
    tile = wkb.from_array(data, geotransform=(x0, 1.0, 0.0, y0, 0.0, -1.0), srid=3857, nodata=0)
    conn.execute("INSERT INTO public.img (rast) VALUES (ST_RastFromWKB(%b))", [wkb.encode(tile)])
    report = refresh.refresh(watched, "small", progress=False)
    assert report.tiles == [0]
    row = conn.execute("SELECT image IS NOT NULL, nodata_frac, split FROM pggeolearn.chips "
                       "WHERE dataset = 'small' AND tile_id = 0").fetchone()
    assert row == (True, 0.0, "excluded")  # it keeps its split until a re-split
    assert report.split_changes == {"excluded->usable": 1}
    assert "chips split small" in str(report)


def test_a_chip_that_loses_its_imagery_is_excluded(conn, watched):
    tile, old = next((t, s) for t, s in sorted(splits(conn).items()) if s != "excluded")
    x0, y0 = tile_ul(tile)
    conn.execute("DELETE FROM public.img WHERE ST_UpperLeftX(rast) = %s AND "
                 "ST_UpperLeftY(rast) = %s", [x0, y0])
    report = refresh.refresh(watched, "small", progress=False)
    assert tile in report.tiles
    assert splits(conn)[tile] == "excluded"
    assert report.split_changes.get(f"{old}->excluded") == 1


def test_truncate_rebuilds_everything(conn, watched):
    conn.execute("TRUNCATE public.shapes")
    report = refresh.refresh(watched, "small", progress=False)
    assert len(report.tiles) == 48
    assert all(label_of(conn, t).max() == 0 for t in (9, 30, 46))


def test_editor_needs_no_privilege_on_pggeolearn(conn, admin_conn, watched):
    """A mapper who may edit public.shapes, and nothing in schema pggeolearn, records changes."""
    admin_conn.execute("CREATE ROLE pgl_mapper LOGIN PASSWORD 'm'")
    try:
        conn.execute("GRANT SELECT, UPDATE ON public.shapes TO pgl_mapper")
        info = conn.info
        with psycopg.connect(host=info.host, port=info.port, dbname=info.dbname,
                             user="pgl_mapper", password="m", autocommit=True) as mapper:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                mapper.execute("SELECT count(*) FROM pggeolearn.changes")
            mapper.execute("UPDATE public.shapes SET class_id = 2 WHERE class_id = 1")
        assert len(refresh.refresh(watched, "small", progress=False).tiles) == 2 * NCOLS
    finally:
        admin_conn.execute("DROP OWNED BY pgl_mapper")
        admin_conn.execute("DROP ROLE pgl_mapper")


def test_unwatched_dataset_is_a_clear_error(conn, db_dsn):
    make_data(conn)
    make_dataset(conn)
    with pytest.raises(errors.ConfigError, match="dataset watch small"):
        refresh.refresh(db_dsn, "small", progress=False)


def test_unwatch_removes_triggers_and_changes(conn, watched):
    conn.execute("UPDATE public.shapes SET class_id = class_id")
    assert sorted(refresh.unwatch(conn, "small")) == ["public.img", "public.shapes"]
    n = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pggeolearn_watch_%'"
                     ).fetchone()[0]
    assert n == 0
    assert conn.execute("SELECT count(*) FROM pggeolearn.changes").fetchone()[0] == 0


def test_sources_resolve_views_to_their_tables(conn):
    make_data(conn)
    conn.execute("CREATE VIEW public.buildings AS SELECT geom, class_id FROM public.shapes "
                 "WHERE class_id = 2")
    make_dataset(conn, label_sql="SELECT geom, class_id FROM public.buildings "
                                 "WHERE geom && tile_geom")
    assert [s.name for s in refresh.sources(conn, "small")] == ["public.img", "public.shapes"]


def test_cli_watch_edit_refresh(conn, db_dsn):
    from click.testing import CliRunner

    from pggeolearn.cli.main import cli

    make_data(conn)
    make_dataset(conn)
    run = CliRunner().invoke
    assert run(cli, ["--dsn", db_dsn, "chips", "build", "small", "--no-progress"]).exit_code == 0
    out = run(cli, ["--dsn", db_dsn, "dataset", "watch", "small"])
    assert out.exit_code == 0, out.output
    assert "watching public.shapes (geom)" in out.output and "margin 0 m" in out.output
    conn.execute("DELETE FROM public.shapes WHERE class_id = 2")
    out = run(cli, ["--dsn", db_dsn, "chips", "refresh", "small", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "3 changed footprints (3 in public.shapes); rebuilt 3 chips" in out.output
    out = run(cli, ["--dsn", db_dsn, "chips", "refresh", "nope", "--no-progress"])
    assert out.exit_code != 0 and "unknown dataset 'nope'" in str(out.exception or out.output)
    out = run(cli, ["--dsn", db_dsn, "dataset", "watch", "small", "--off"])
    assert out.exit_code == 0 and "no longer watching" in out.output
