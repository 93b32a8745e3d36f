"""Dataset versions and lineage: a changed recipe is a new version (the old one's chips stay,
streamable as NAME@N), the same recipe is not; chips, models and runs record the version and
recipe hash; ``model show`` prints the lineage; an old version a model was trained on is not
dropped without --force."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from pggeolearn import chips, datasets, errors, lineage, runs
from pggeolearn.cli.main import cli
from pggeolearn.stream import GeoStream
from pggeolearn.training.registry import ModelRecord, save

_spec = importlib.util.spec_from_file_location(
    "stream_fixtures", Path(__file__).resolve().parent / "test_stream.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_chip_dataset = _fixtures.make_chip_dataset

N_CHIPS = 42  # make_chip_dataset: train 37, val 3, test 2


def chip_rows(conn, name: str) -> list[tuple]:
    return conn.execute("SELECT DISTINCT recipe_hash, dataset_version, count(*) OVER ()"
                        " FROM pggeolearn.chips WHERE dataset = %s", [name]).fetchall()


@pytest.fixture
def two_versions(conn):
    """Dataset tiny: version 1 with chips, then version 2 (all_touched) without."""
    v1 = make_chip_dataset(conn, "tiny")
    v2 = datasets.create(conn, dataclasses.replace(v1.recipe, all_touched=True), new_version=True)
    return conn, v1, v2


def test_a_changed_recipe_is_a_new_version_and_the_old_chips_stay(two_versions, db_dsn):
    conn, v1, v2 = two_versions
    assert (v1.name, v1.version) == ("tiny", 1)
    assert (v2.name, v2.version, v2.ref) == ("tiny", 2, "tiny@2") and v2.recipe_hash != v1.recipe_hash
    assert "version 2" in v2.describe().splitlines()[0]
    # version 1 and its chips (and statistics) are kept as tiny@1
    old = datasets.get(conn, "tiny@1")
    assert (old.name, old.version, old.recipe_hash, old.is_current) == ("tiny@1", 1, v1.recipe_hash, False)
    assert old.stats == v1.stats and old.recipe.image_sql == v1.recipe.image_sql
    assert "an old version, its chips stored as tiny@1" in old.describe()
    assert chip_rows(conn, "tiny@1") == [(v1.recipe_hash, None, N_CHIPS)]  # inserted by the fixture
    assert chip_rows(conn, "tiny") == []
    assert datasets.get(conn, "tiny@2").name == "tiny"
    assert [d.name for d in datasets.list_all(conn)] == ["tiny"]
    got = [(v.version, v.state, v.row, v.chips, v.recipe_hash) for v in datasets.versions(conn, "tiny")]
    assert got == [(1, "old", "tiny@1", N_CHIPS, v1.recipe_hash), (2, "current", "tiny", 0, v2.recipe_hash)]

    # the old version streams by its name, the chips of its recipe
    batches = list(GeoStream(db_dsn, "tiny@1", split="train", batch_size=8, shuffle=False))
    seen = sorted(int(t) for b in batches for t in b["tile_id"][:len(b["tile_id"]) - b["pad"]])
    assert seen == list(range(37))

    with pytest.raises(errors.DatasetNotFound, match=r"^dataset tiny has no version 3 \(versions: 1, 2 "
                                                     r"\(current\)\)$"):
        datasets.get(conn, "tiny@3")
    with pytest.raises(errors.ConfigError, match="bad dataset version tiny@x"):
        datasets.get(conn, "tiny@x")
    with pytest.raises(errors.AlreadyExists, match="--new-version"):
        datasets.create(conn, dataclasses.replace(v1.recipe, all_touched=False))


def test_the_same_recipe_is_no_new_version(conn):
    v1 = make_chip_dataset(conn, "tiny")
    again = datasets.create(conn, dataclasses.replace(v1.recipe), new_version=True)
    assert (again.version, again.recipe_hash) == (1, v1.recipe_hash)
    assert any("recipe unchanged: still version 1" in n for n in again.notes)
    assert chip_rows(conn, "tiny") == [(v1.recipe_hash, None, N_CHIPS)]
    assert [v.version for v in datasets.versions(conn, "tiny")] == [1]


def test_chips_build_records_the_version(two_versions, db_dsn):
    conn, _, v2 = two_versions
    chips.build(db_dsn, "tiny@2", progress=False, where="tile_id < 6")  # NAME@N of the current N
    assert chip_rows(conn, "tiny") == [(v2.recipe_hash, 2, 6)]


def _model(conn, name: str, ds: datasets.Dataset) -> None:
    save(conn, ModelRecord(
        name=name, dataset=ds.base, dataset_version=ds.version, recipe_hash=ds.recipe_hash,
        framework="mxnet", architecture={"name": "unet"}, hyperparameters={},
        classes={0: "background", 1: "left", 2: "unused"}, normalization=None, tile_px=16,
        resolution=1.0, srid=3857, bands=3, weights=b"w", metrics={}))


def _run(db_dsn: str, kind: str, **kw) -> int:
    with runs.Run.start(db_dsn, kind, **kw) as run:
        run.finish({})
        return run.run_id


def test_models_and_runs_record_the_version_and_lineage_shows_it(two_versions, db_dsn):
    conn, v1, v2 = two_versions
    _model(conn, "m1", v1)
    ids = {"evaluate old": _run(db_dsn, "evaluate", model="m1", dataset="tiny@1"),
           "predict": _run(db_dsn, "predict", model="m1"),
           "evaluate new": _run(db_dsn, "evaluate", model="m1", dataset="tiny"),
           "evaluate new@": _run(db_dsn, "evaluate", model="m1", dataset="tiny@2")}
    recorded = dict(conn.execute("SELECT run_id, ARRAY[dataset_version::text, recipe_hash]"
                                 " FROM pggeolearn.runs").fetchall())
    assert recorded[ids["evaluate old"]] == ["1", v1.recipe_hash]
    assert recorded[ids["predict"]] == ["1", v1.recipe_hash]  # no dataset: the model's
    assert recorded[ids["evaluate new"]] == recorded[ids["evaluate new@"]] == ["2", v2.recipe_hash]
    assert runs.list_runs(conn, model="m1")[0].dataset_version == 2

    lines = lineage.model_lineage(conn, "m1")
    assert lines[0] == "lineage:"
    assert lines[1] == "  source tables: public.img_tiny, public.poly_tiny"
    assert lines[2].startswith(f"  -> recipe: dataset tiny@1, recipe {v1.recipe_hash}, created ")
    assert lines[2].endswith("(an old version, stored as tiny@1)")
    assert lines[3].startswith(f"  -> chips: {N_CHIPS} under tiny@1 (train 37, val 3, test 2), built ")
    assert lines[4].startswith("  -> model: m1 (mxnet), created ")
    assert lines[4].endswith(f"trained on recipe {v1.recipe_hash}")
    assert lines[5] == (f"  -> runs: evaluate {ids['evaluate old']} done, predict {ids['predict']} done, "
                        f"evaluate {ids['evaluate new']} done on tiny@2, "
                        f"evaluate {ids['evaluate new@']} done on tiny@2")

    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "model", "show", "m1"])
    assert result.exit_code == 0, result.output
    assert "trained on dataset tiny@1 (recipe" in result.output
    assert "\nlineage:\n  source tables: public.img_tiny, public.poly_tiny\n  -> recipe: dataset tiny@1" \
        in result.output


def test_drop_refuses_an_old_version_a_model_was_trained_on(two_versions, db_dsn):
    conn, v1, _ = two_versions
    _model(conn, "m1", v1)
    with pytest.raises(errors.ConfigError, match=r"^dataset tiny version 1 is what model\(s\) m1 were trained "
                                                 r"on: --force drops its chips anyway"):
        datasets.drop(conn, "tiny", version=1)
    with pytest.raises(errors.ConfigError, match="version 2 is the current version of dataset tiny"):
        datasets.drop(conn, "tiny@2")
    runner = CliRunner()
    result = runner.invoke(cli, ["--dsn", db_dsn, "dataset", "drop", "tiny", "--version", "1", "--yes"])
    assert result.exit_code == 1 and "--force" in str(result.exception)  # main() prints it, one line
    result = runner.invoke(cli, ["--dsn", db_dsn, "dataset", "drop", "tiny", "--version", "1", "--yes",
                                 "--force"])
    assert result.exit_code == 0 and "dropped dataset tiny version 1" in result.output, result.output
    assert chip_rows(conn, "tiny@1") == []
    with pytest.raises(errors.DatasetNotFound, match=r"versions: 1 \(dropped\), 2 \(current\)"):
        datasets.get(conn, "tiny@1")
    result = runner.invoke(cli, ["--dsn", db_dsn, "dataset", "versions", "tiny"])
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()
    assert first.startswith(f"tiny@1\trecipe {v1.recipe_hash}\t") and "\tdropped " in first
    assert first.endswith("\t0 chips\tmodels: m1")
    assert "\tcurrent\t0 chips" in second
    # the model keeps its lineage: the recipe's hash and that it is gone
    lines = lineage.model_lineage(conn, "m1")
    assert lines[1] == "  source tables: unknown (the dataset version is dropped)"
    assert "(dropped " in lines[2] and lines[3] == "  -> chips: dropped"
    # a new version never takes a dropped one's number; dropping the dataset keeps the history
    datasets.drop(conn, "tiny")
    assert datasets.list_all(conn) == []
    assert [v.state for v in datasets.versions(conn, "tiny")] == ["dropped", "dropped"]
