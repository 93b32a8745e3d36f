"""Every colour pggeolearn draws with, in one place: the QGIS styles (QML in layer_styles and in
the stored QGIS project) and every PNG the CLI writes (chips, batches, worst tiles, curves)
use these, so a building is the same colour everywhere.

Only the standard library is imported: PNG writers and QML builders both depend on this.
"""

from __future__ import annotations

from collections.abc import Iterable

RGB = tuple[int, int, int]

# Class 1, 2, ...: red, blue, yellow first (they stand out on vegetation and on each other);
# repeats after ten classes. Class 0 (background) is not drawn (transparent in QGIS).
CLASS_RGB: tuple[RGB, ...] = (
    (230, 25, 75), (0, 130, 200), (255, 225, 25), (60, 180, 75), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip
BACKGROUND_RGB: RGB = (0, 0, 0)  # in styles (with alpha 0)
BACKGROUND_PNG: RGB = (60, 60, 60)  # where a PNG must show background pixels (worst tiles)
IGNORE_RGB: RGB = (255, 255, 255)  # pixels left out of the metrics (NODATA in the truth)

# chip footprints by split: train green, val blue, test orange, excluded dark grey, unassigned
SPLIT_RGB: dict[str | None, RGB] = {"train": (46, 160, 67), "val": (31, 120, 180), "test": (255, 127, 0),
                                    "excluded": (70, 70, 70), None: (190, 190, 190)}

# review objects: what the model found that the map lacks, what the map has that the model
# did not find, and objects whose outlines disagree
REVIEW_RGB: dict[str, RGB] = {"new": (0, 200, 83), "missing": (213, 0, 249), "changed": (255, 145, 0)}
REVIEW_STATUS = ("todo", "accepted", "rejected")

# per-tile IoU (evaluation layer): red (bad) to green (good)
IOU_RANGES: tuple[tuple[float, float, str, RGB], ...] = (
    (0.0, 0.25, "0 - 0.25", (215, 25, 28)), (0.25, 0.5, "0.25 - 0.5", (253, 174, 97)),
    (0.5, 0.75, "0.5 - 0.75", (166, 217, 106)), (0.75, 1.0, "0.75 - 1", (26, 150, 65)),
)  # fmt: skip

# line charts (training curves): loss train/val first, then one line per class IoU
LINE_RGB: tuple[RGB, ...] = ((31, 119, 180), (255, 127, 14))


def class_colour(class_id: int) -> RGB:
    """The colour of class ``class_id`` (>= 1); background (0) gives BACKGROUND_RGB."""
    cid = int(class_id)
    return BACKGROUND_RGB if cid == 0 else CLASS_RGB[(cid - 1) % len(CLASS_RGB)]


def palette(classes: Iterable[int]) -> dict[int, RGB]:
    """``{class id: colour}`` for the given ids (a dict of classes works: its keys are used)."""
    return {int(c): class_colour(c) for c in sorted(int(c) for c in classes)}


def hex_colour(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
