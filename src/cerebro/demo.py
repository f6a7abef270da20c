"""``cerebro demo``: a real model selection on scikit-learn's handwritten digits.

1797 8x8 images, 10 classes. Random search over architecture (MLP or small CNN), learning rate,
batch size, width, dropout and L2, trained with MOP on local worker processes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics
from .backends import LocalBackend
from .data import prepare_data
from .engine import Experiment, Result
from .search import RandomSearch
from .space import choice, loguniform, quniform, randint, uniform
from .spec import ModelSpec

SPACE = {
    "arch": choice(["mlp", "cnn"]),
    "lr": loguniform(1e-4, 1e-1),
    "batch_size": choice([32, 64]),
    "width": randint(16, 128),
    "dropout": uniform(0.0, 0.5),
    "l2": quniform(0.0, 0.01, 0.001),
}


def build(params: dict[str, Any]) -> ModelSpec:
    """An MLP or a small CNN for 8x8 digits, sized by ``width``."""
    width = params["width"]
    if params["arch"] == "cnn":
        channels = max(8, width // 4)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(params["dropout"]),
            nn.Linear(channels * 16, 10),
        )
    else:
        model = nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Dropout(params["dropout"]),
            nn.Linear(width, 10),
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=params["l2"])
    return ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=nn.CrossEntropyLoss(),
        batch_size=params["batch_size"],
        metrics={"accuracy": metrics.accuracy},
    )


def run_demo(
    path: str | None = None,
    workers: int = 2,
    models: int = 8,
    epochs: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> Result:
    """Prepare the digits data under ``path`` and run the model selection there."""
    backend = LocalBackend(workers=workers)
    backend.prestart()  # torch loads for the workers while the data is read and prepared
    from sklearn.datasets import load_digits

    path = path or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # 64 pixels per row, scaled to [0, 1]
    dataset = prepare_data(
        {"pixels": features, "digit": digits.target},
        os.path.join(path, "data"),
        label="digit",
        num_shards=4,
        validation=0.2,
        seed=seed,
    )
    experiment = Experiment(
        build,
        dataset=dataset,
        search=RandomSearch(SPACE, num_models=models, seed=seed),
        epochs=epochs,
        metric="val_accuracy",
        mode="max",
        backend=backend,
        path=path,
        seed=seed,
        progress=progress,
    )
    return experiment.run()
