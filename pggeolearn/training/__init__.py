"""Training: U-Nets in MXNet Gluon (default) or PyTorch, trained straight from the chip store,
validated on the spatially held-out split, stored in the model registry (``pggeolearn.models``).

``train(dsn, dataset, model_name, **options) -> TrainReport`` (see :mod:`.launch` and :mod:`.loop`);
``registry.load(conn, name) -> LoadedModel`` with ``predict_proba(images)`` (see :mod:`.registry`).
Nothing here imports mxnet or torch until a model of that framework is built.
"""

from pggeolearn.training import metrics, registry
from pggeolearn.training.launch import train
from pggeolearn.training.loop import TrainOptions, TrainReport
from pggeolearn.training.registry import LoadedModel

__all__ = ["LoadedModel", "TrainOptions", "TrainReport", "metrics", "registry", "train"]
