"""Recipe parsing and hashing (no database)."""

import pytest

from pggeolearn import errors
from pggeolearn.datasets import Recipe, parse_classes


def _recipe(**kw):
    base = dict(name="r", srid=3857, resolution=1, extent=(0, 0, 112, 96), image_sql="SELECT 1",
                label_sql="SELECT 1", classes={1: "road"})
    return Recipe.from_dict({**base, **kw})


def test_hash_ignores_number_spelling_and_name():
    a = _recipe()
    b = Recipe(name="other", srid=3857, resolution=1.0, extent=(0.0, 0.0, 112.0, 96.0),
               image_sql="SELECT 1", label_sql="SELECT 1", classes={1: "road"})
    assert a.digest() == b.digest()
    assert _recipe(all_touched=True).digest() != a.digest()


def test_classes_forms():
    assert parse_classes("1=road, 2=building") == {1: "road", 2: "building"}
    assert parse_classes({"2": "b", "1": "a"}) == {1: "a", 2: "b"}
    with pytest.raises(errors.ConfigError, match="outside 1..255"):
        parse_classes({0: "background"})
    with pytest.raises(errors.ConfigError, match="not an integer"):
        parse_classes({"x": "a"})


@pytest.mark.parametrize("kw,match", [
    (dict(name="bad name!"), "bad dataset name"),
    (dict(resolution=0), "resolution"),
    (dict(tile_px=4), "tile size"),
    (dict(overlap_px=256, tile_px=256), "overlap"),
    (dict(extent=(0, 0, 0, 1)), "empty extent"),
    (dict(extent_from="public.t"), "exactly one of extent"),
])
def test_validation(kw, match):
    with pytest.raises(errors.ConfigError, match=match):
        _recipe(**kw).validate()


def test_unknown_and_missing_keys():
    with pytest.raises(errors.ConfigError, match="unknown recipe keys: colour"):
        _recipe(colour="red")
    with pytest.raises(errors.ConfigError, match="missing: label_sql"):
        Recipe.from_dict(dict(name="r", srid=1, resolution=1, image_sql="x", classes={1: "a"}))
