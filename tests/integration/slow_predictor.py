"""A model that takes its time, for killing a ``pggeolearn predict`` subprocess in the middle
(test_runs); loaded by the CLI as ``slow_predictor:model``."""

from __future__ import annotations

import time

from test_predict import BrightnessPredictor


class SlowPredictor(BrightnessPredictor):
    def __init__(self):
        super().__init__(tile_px=32)

    def predict_proba(self, images_uint8):
        time.sleep(0.5)
        return super().predict_proba(images_uint8)


model = SlowPredictor()
