"""Model builders shared by the tests (module level, so spawned workers can import them)."""

from __future__ import annotations

import torch

import cerebro


def mlp(params: dict) -> cerebro.ModelSpec:
    """An MLP for 8x8 digit images, with dropout and an LR schedule so that RNG and scheduler
    state must hop with the model for results to match."""
    width = params.get("width", 32)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(params.get("dropout", 0.1)),
        torch.nn.Linear(width, 10),
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=params.get("lr", 1e-2), weight_decay=params.get("l2", 0.0)
    )
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params.get("batch_size", 32),
        metrics={"accuracy": cerebro.metrics.accuracy},
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9),
    )


def flaky(params: dict) -> cerebro.ModelSpec:
    """Fails in the way ``params["fail"]`` says: at build, in training, or with a NaN loss."""
    mode = params.get("fail", "none")
    if mode == "build":
        raise RuntimeError("build failed on purpose")
    spec = mlp(params)
    if mode == "nan":
        base = spec.loss
        spec.loss = lambda out, y: base(out, y) * float("nan")
    elif mode == "exit":  # the worker process dies, as if killed for memory
        import os

        model = spec.model

        def dying_forward(x):
            os._exit(3)

        model.forward = dying_forward
    elif mode == "forward":
        model = spec.model

        def broken_forward(x):
            raise RuntimeError("forward failed on purpose")

        model.forward = broken_forward
    return spec


def not_a_spec(params: dict):
    return torch.nn.Linear(64, 10)


class _Slow(torch.nn.Module):
    """Sleeps in forward so that units last long enough to be interrupted (no numeric effect)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return x


def slow_mlp(params: dict) -> cerebro.ModelSpec:
    spec = mlp(params)
    spec.model.insert(0, _Slow(params.get("sleep", 0.01)))
    return spec


def slow_mlp_30ms(params: dict) -> cerebro.ModelSpec:
    """An MLP whose training units last about 0.3 s (12 batches), to act between hops."""
    return slow_mlp({**params, "sleep": 0.03})
