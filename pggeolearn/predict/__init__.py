"""Prediction: a model over any extent, written back into PostGIS as QGIS layers.

``predict(dsn, model, extent=... | dataset=..., imagery=..., out="schema.name")`` writes

* ``out``: the **class raster** (8BUI, one band, tiles of ``tile_px`` (256) pixels, the
  model's SRID and pixel size, **NODATA 255 where there was no imagery**), with a GiST index,
  raster constraints, overviews (factors 2 and 4) and a paletted default style for QGIS;
* ``out_prob`` (``probabilities=True``): the **probability raster**, one 8BUI band per class
  (background first), ``value = round(p * 254)``, so ``p = value / 254``; NODATA 255;
* ``out_polygons`` (``vectorize=True``, name configurable): **one polygon per connected object**
  (4-connected pixels of one class) merged across tile borders, simplified by half a pixel,
  valid, with ``class_id``, ``class_name``, ``area_m2``, ``pixels``, ``mean_prob``, ``model``,
  ``run_id``; objects under ``min_pixels`` (4) pixels left out before vectorizing (judged
  whole across tile borders; 0 keeps all), smaller holes filled; the class raster keeps them;

and one row in ``pggeolearn.runs`` (kind ``predict``, status running -> done | failed). All in
one transaction: an existing output is :class:`~pggeolearn.errors.AlreadyExists` unless
``overwrite`` (replace, atomically) or ``append``. Memory holds one row band of imagery and
``tile_px + window`` rows of probabilities by the extent's width, never the extent.

Modules: :mod:`.model` (the model contract), :mod:`.grid`, :mod:`.stitch`, :mod:`.components`,
:mod:`.polygons`,
:mod:`.source` (imagery), :mod:`.plan`, :mod:`.sink` (writing), :mod:`.options`, :mod:`.run`
(:func:`predict`).
"""

from pggeolearn.predict.grid import NODATA, PROB_SCALE, Grid, snap_grid
from pggeolearn.predict.model import (
    Predictor,
    call_model,
    check_pixel_types,
    check_predictor,
    input_pixel_types,
    load_model,
    model_class_ids,
)
from pggeolearn.predict.options import PredictOptions
from pggeolearn.predict.plan import relkind
from pggeolearn.predict.run import PredictReport, predict
from pggeolearn.predict.stitch import STITCH_MODES, Stitcher, window_weights

__all__ = [
    "NODATA", "PROB_SCALE", "STITCH_MODES", "Grid", "PredictOptions", "PredictReport", "Predictor",
    "Stitcher", "call_model", "check_pixel_types", "check_predictor", "input_pixel_types", "load_model",
    "model_class_ids", "predict", "relkind", "snap_grid", "window_weights",
]
