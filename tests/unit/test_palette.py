"""One palette: QGIS styles and every PNG writer take their colours from pggeolearn.palette."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pggeolearn import chips, evaluate, palette, pictures, publish
from pggeolearn.training import plot


def test_every_writer_uses_the_one_palette():
    classes = {0: "background", 1: "road", 2: "building", 11: "eleventh"}
    assert publish.palette(classes) == palette.palette(classes) == {
        0: (0, 0, 0), 1: (230, 25, 75), 2: (0, 130, 200), 11: (230, 25, 75)}
    assert [pictures.class_colour(k) for k in (1, 2, 3)] == list(palette.CLASS_RGB[:3])
    assert chips.SPLIT_RGB is palette.SPLIT_RGB
    assert evaluate.MIOU_RANGES == list(palette.IOU_RANGES)
    assert tuple(plot.COLOURS) == palette.LINE_RGB
    qml = publish.class_raster_qml({0: "background", 1: "road", 2: "building"})
    entries = ET.fromstring(qml.split("\n", 1)[1]).iter("paletteEntry")
    assert [(e.get("value"), e.get("color")) for e in entries] == [
        ("0", "#000000"), ("1", "#e6194b"), ("2", "#0082c8")]


def test_training_curves_draw_class_iou_in_class_colours(tmp_path):
    from PIL import Image

    history = [{"train_loss": 1.0 - e / 10, "val": {"loss": 1.1 - e / 10, "miou": e / 10,
                                                     "iou": [0.9, e / 10, e / 20]}} for e in range(1, 6)]
    path = plot.plot_history(history, tmp_path / "c.png", classes={0: "background", 1: "road", 2: "building"},
                             baselines={"all background": {"miou": 0.3}}, title="m on d", best_epoch=4)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == plot.SIZE == (1120, 428)
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert len(colours) > 50  # lines, text and anti-aliasing, not a blank canvas
    assert palette.class_colour(1) in colours and palette.class_colour(2) in colours
    assert palette.LINE_RGB[0] in colours and palette.LINE_RGB[1] in colours  # train, val loss


def test_training_curves_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    import sys

    import pytest

    from pggeolearn import errors

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    history = [{"train_loss": 1.0, "val": {"loss": 1.0, "miou": 0.5, "iou": [0.5, 0.5]}}]
    with pytest.raises(errors.MissingDependency, match=r"pip install 'pggeolearn\[plot\]'"):
        plot.plot_history(history, tmp_path / "c.png", classes={0: "background", 1: "road"})
    assert not (tmp_path / "c.png").exists()
