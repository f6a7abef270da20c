"""The experiment that tests/fixtures/old_records holds, for tests that open and resume it.

Frozen: the fixture's records hold the fingerprint of :func:`build` (its code and what it builds)
and the arguments of :func:`experiment`; a change to either makes a resume of the fixture refuse
(``resume="auto"`` compares them). To change them, make the fixture again with the code of the
commit that README.md in the fixture names, not with newer code.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import cerebro

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "old_records")
RUN = "run"  # the experiment path: cerebro.db, checkpoints/, build.pkl
DATA = "data"  # the prepared dataset
LEARNING_RATES = [0.01, 0.03, 0.1]
EPOCHS = 3


def build(params: dict) -> cerebro.ModelSpec:
    """A tiny classifier of 8 features."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9)
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=16,
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def make_dataset(path: str) -> cerebro.Dataset:
    """300 synthetic rows, 2 shards, 20% validation."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return cerebro.prepare_data({"x": x, "y": y}, path, label="y", num_shards=2, validation=0.2)


def experiment(path: str, dataset: cerebro.Dataset | str, **overrides) -> cerebro.Experiment:
    """The fixture's experiment at ``path`` (``overrides`` replace arguments that are not part
    of what makes it the same experiment, e.g. the backend)."""
    arguments = dict(
        build=build,
        dataset=dataset,
        search=cerebro.GridSearch({"lr": cerebro.choice(LEARNING_RATES)}),
        epochs=EPOCHS,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        seed=7,
        progress=False,
        tensorboard=False,
    )
    arguments.update(overrides)
    return cerebro.Experiment(**arguments)
