"""Cerebro: model selection for PyTorch with model hopper parallelism (MOP).

Example:
    >>> import cerebro, torch
    >>> ds = cerebro.prepare_data(df, "data/demo", label="y", num_shards=4)    # doctest: +SKIP
    >>> def build(params):
    ...     model = torch.nn.Sequential(torch.nn.Linear(64, params["width"]), torch.nn.ReLU(),
    ...                                 torch.nn.Linear(params["width"], 10))
    ...     return cerebro.ModelSpec(model=model,
    ...                              optimizer=torch.optim.Adam(model.parameters(),
    ...                                                         lr=params["lr"]),
    ...                              loss=torch.nn.CrossEntropyLoss(), batch_size=32,
    ...                              metrics={"accuracy": cerebro.metrics.accuracy})
    >>> space = {"lr": cerebro.loguniform(1e-4, 1e-1), "width": cerebro.choice([32, 64])}
    >>> exp = cerebro.Experiment(build, dataset=ds, search=cerebro.RandomSearch(space, 8),
    ...                          epochs=5, metric="val_accuracy", mode="max",
    ...                          path="runs/demo")                             # doctest: +SKIP
    >>> result = exp.run()                                                     # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

_EXPORTS = {
    "metrics": ".metrics",
    **dict.fromkeys(["Backend", "LocalBackend", "RayBackend"], ".backends"),
    **dict.fromkeys(["Dataset", "DatasetVersion", "GroupInfo", "prepare_data"], ".data"),
    **dict.fromkeys(
        ["Controller", "ControlRejected", "Experiment", "ModelRecord", "Result", "control", "load"],
        ".engine",
    ),
    **dict.fromkeys(
        ["AllModelsFailed", "CerebroError", "ConfigError", "ModelFailed", "WorkerError"], ".errors"
    ),
    **dict.fromkeys(
        [
            "ASHA",
            "PBT",
            "EarlyStopping",
            "GridSearch",
            "Hyperband",
            "MedianStopping",
            "RandomSearch",
            "Scheduler",
            "Search",
            "TPESearch",
        ],
        ".search",
    ),
    **dict.fromkeys(["choice", "loguniform", "quniform", "randint", "uniform"], ".space"),
    "ModelSpec": ".spec",
    "Fusion": ".engine.grouping",
    "Materialize": ".engine.materializing",
    "cut": ".techniques.prefix",
    "MLflowTracker": ".trackers.mlflow",
    "dashboard": ".dashboard",
}
# Names load on first use, so `import cerebro` is cheap and imports nothing optional.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from . import metrics
    from .backends import Backend, LocalBackend, RayBackend
    from .data import Dataset, DatasetVersion, GroupInfo, prepare_data
    from .engine import Controller, ControlRejected, Experiment, ModelRecord, Result, load
    from .engine.control import control  # the function: `.engine`'s `control` is also a module
    from .engine.grouping import Fusion
    from .engine.materializing import Materialize
    from .errors import AllModelsFailed, CerebroError, ConfigError, ModelFailed, WorkerError
    from .search import (
        ASHA,
        PBT,
        EarlyStopping,
        GridSearch,
        Hyperband,
        MedianStopping,
        RandomSearch,
        Scheduler,
        Search,
        TPESearch,
    )
    from .space import choice, loguniform, quniform, randint, uniform
    from .spec import ModelSpec
    from .techniques.prefix import cut
    from .trackers.mlflow import MLflowTracker

__version__ = "0.1.0"

__all__ = [
    "ASHA",
    "PBT",
    "AllModelsFailed",
    "Backend",
    "CerebroError",
    "ConfigError",
    "ControlRejected",
    "Controller",
    "Dataset",
    "DatasetVersion",
    "GroupInfo",
    "EarlyStopping",
    "Experiment",
    "Fusion",
    "GridSearch",
    "Hyperband",
    "LocalBackend",
    "MLflowTracker",
    "Materialize",
    "MedianStopping",
    "ModelFailed",
    "ModelRecord",
    "ModelSpec",
    "RandomSearch",
    "RayBackend",
    "Result",
    "Scheduler",
    "Search",
    "TPESearch",
    "WorkerError",
    "choice",
    "control",
    "cut",
    "load",
    "loguniform",
    "metrics",
    "prepare_data",
    "quniform",
    "randint",
    "uniform",
]
