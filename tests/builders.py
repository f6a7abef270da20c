"""Model builders shared by the tests (module level, so spawned workers can import them)."""

from __future__ import annotations

import dataclasses
import errno
import fractions
import os

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


# The same experiment's build, edited: each differs from ``mlp`` in one thing (test_identity).


def mlp_wide(params: dict) -> cerebro.ModelSpec:
    """``mlp`` with a wider hidden layer (64)."""
    return mlp({**params, "width": 64})


def mlp_l2(params: dict) -> cerebro.ModelSpec:
    """``mlp`` with weight decay in its optimizer (compatible with ``mlp``'s states)."""
    return mlp({**params, "l2": 0.01})


def mlp_batch_64(params: dict) -> cerebro.ModelSpec:
    """``mlp`` with 64 rows per batch."""
    return mlp({**params, "batch_size": 64})


def mlp_same_models(params: dict) -> cerebro.ModelSpec:
    """Builds exactly ``mlp``'s models, with other code."""
    spec = mlp(dict(params))
    return spec


def exits_in_workers(params: dict) -> cerebro.ModelSpec:
    """Like ``flaky``: its worker process dies where ``params["fail"] == "exit"``, as if killed
    for memory; but only in a worker, so that the driver's trial step (preflight) goes on."""
    spec = flaky({**params, "fail": "none"})
    if params.get("fail") == "exit":
        from cerebro.backends.worker import in_worker

        model = spec.model
        forward = model.forward

        def dying_forward(x):
            if in_worker():
                os._exit(3)
            return forward(x)

        model.forward = dying_forward
    return spec


class _UnsaveableWhileFlagged:
    """A value in an optimizer's state that a worker cannot write while the file ``flag``
    exists (its pickling raises, as writing a handover file in a full or broken /dev/shm
    would); where the file says "once", the first worker that fails removes it. Otherwise it
    is written as an empty set (what state files hold)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        from cerebro.backends.worker import in_worker

        if in_worker() and os.path.exists(self.flag):
            with open(self.flag) as f:
                once = f.read() == "once"
            if not once or _removed(self.flag):
                raise OSError(errno.EIO, "I/O error writing a handover file (on purpose)")
        return (set, ())


def _removed(path: str) -> bool:
    try:
        os.remove(path)
    except FileNotFoundError:
        return False  # another worker removed it first
    return True


def handover_fails(params: dict) -> cerebro.ModelSpec:
    """``mlp``, whose new states a worker cannot hand over while ``params["flag"]`` (a file's
    path) exists (see :class:`_UnsaveableWhileFlagged`)."""
    spec = mlp(params)
    note = _UnsaveableWhileFlagged(params["flag"])
    spec.optimizer.register_state_dict_post_hook(lambda _, state: state.update(note=note))
    return spec


# Builds that ModelSpec accepts (or that fail in it) but that cannot train one step: preflight
# refuses each before any worker starts (tests/test_preflight.py).


def optimizer_state_holds_an_object(params: dict) -> cerebro.ModelSpec:
    spec = mlp(params)
    spec.optimizer.param_groups[0]["schedule"] = fractions.Fraction(1, 3)
    return spec


@dataclasses.dataclass
class Vocabulary:
    words: tuple[str, ...]


class _WithVocabulary(torch.nn.Sequential):
    """A model that keeps an object in its state (``get_extra_state``)."""

    vocabulary = Vocabulary(("zero", "one"))

    def get_extra_state(self):
        return self.vocabulary

    def set_extra_state(self, state):
        self.vocabulary = state


def model_state_holds_an_object(params: dict) -> cerebro.ModelSpec:
    spec = mlp(params)
    model = _WithVocabulary(*spec.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.get("lr", 1e-2))
    return dataclasses.replace(spec, model=model, optimizer=optimizer, lr_scheduler=None)


def batch_size_zero(params: dict) -> cerebro.ModelSpec:
    return mlp({**params, "batch_size": 0})


def optimizer_of_another_model(params: dict) -> cerebro.ModelSpec:
    other = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    return dataclasses.replace(mlp(params), optimizer=optimizer, lr_scheduler=None)


def optimizer_replaced_after_build(params: dict) -> cerebro.ModelSpec:
    """ModelSpec() checked its optimizer; build then replaced it with another model's."""
    spec = mlp(params)
    spec.optimizer = torch.optim.SGD(torch.nn.Linear(64, 10).parameters(), lr=0.1)
    spec.lr_scheduler = None
    return spec


def loss_per_row(params: dict) -> cerebro.ModelSpec:
    return dataclasses.replace(mlp(params), loss=torch.nn.CrossEntropyLoss(reduction="none"))


def loss_for_other_targets(params: dict) -> cerebro.ModelSpec:
    """A multi-label loss on class targets: (rows, 10) outputs against (rows,) integers."""
    return dataclasses.replace(mlp(params), loss=torch.nn.BCEWithLogitsLoss())


def _raising_metric(outputs, targets):
    raise ValueError("metric failed on purpose")


def _per_row_accuracy(outputs, targets):
    return (outputs.argmax(dim=1) == targets).float()  # no .mean()


def metric_that_raises(params: dict) -> cerebro.ModelSpec:
    spec = mlp(params)
    return dataclasses.replace(spec, metrics={**spec.metrics, "broken": _raising_metric})


def metric_per_row(params: dict) -> cerebro.ModelSpec:
    spec = mlp(params)
    return dataclasses.replace(spec, metrics={**spec.metrics, "per_row": _per_row_accuracy})


def wrong_input_size(params: dict) -> cerebro.ModelSpec:
    """A first layer for 32 features; the digits have 8x8 = 64."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 10))
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params.get("batch_size", 32),
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


def mlp_or_loss_per_row(params: dict) -> cerebro.ModelSpec:
    """``loss_per_row`` where ``params["bad"]``, else ``mlp``."""
    return loss_per_row(params) if params.get("bad") else mlp(params)


class Residual(torch.nn.Module):
    """A block with its own forward: a model holding it cannot be fused."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.linear(x))


def mlp_or_custom(params: dict) -> cerebro.ModelSpec:
    """``mlp`` for width 32; width 48 adds a :class:`Residual` block (not fusable)."""
    spec = mlp(params)
    if params.get("width") == 48:
        spec.model.insert(3, Residual(48))
    return spec


def sgd_mlp(params: dict) -> cerebro.ModelSpec:
    """An MLP trained by SGD with momentum (a huge ``lr`` makes its loss overflow)."""
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9)
    return cerebro.ModelSpec(
        model=model,
        optimizer=optimizer,
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=32,
        metrics={"accuracy": cerebro.metrics.accuracy},
    )


# Transfer learning: a small CNN backbone pre-trained by the tests (tests/test_transfer.py),
# cut at a depth; what is above the cut trains, with a new head.
def backbone() -> torch.nn.Sequential:
    """The pre-trained network's layers (8x8 digit images in, 64 features out)."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8)),  # [n, 8, 8] -> [n, 1, 8, 8]
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 64),
        torch.nn.ReLU(),
    )


def transfer(params: dict) -> cerebro.ModelSpec:
    """The backbone loaded from ``params["weights"]`` and cut at ``params["freeze"]``, with a
    head of ``params["head"]`` units (``head_in`` overrides the head's input width, to make a
    head that does not fit)."""
    net = backbone()
    net.load_state_dict(torch.load(params["weights"], weights_only=True))
    frozen, rest = cerebro.cut(net, params["freeze"])
    head = torch.nn.Sequential(
        torch.nn.Linear(params.get("head_in", 64), params.get("head", 32)),
        torch.nn.ReLU(),
        torch.nn.Linear(params.get("head", 32), 10),
    )
    model = torch.nn.Sequential(rest, head)
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=params.get("lr", 1e-2)),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=params.get("batch_size", 32),
        metrics={"accuracy": cerebro.metrics.accuracy},
        frozen=frozen,
    )


def transfer_unseeded(params: dict) -> cerebro.ModelSpec:
    """``transfer`` whose backbone is freshly initialized on every call: its frozen weights
    differ between the driver's build and each worker's (torch's generator is not seeded
    there), the mistake the feature store must catch."""
    frozen, rest = cerebro.cut(backbone(), params["freeze"])
    model = torch.nn.Sequential(rest, torch.nn.Linear(64, 10))
    return cerebro.ModelSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        loss=torch.nn.CrossEntropyLoss(),
        batch_size=32,
        metrics={"accuracy": cerebro.metrics.accuracy},
        frozen=frozen,
    )
