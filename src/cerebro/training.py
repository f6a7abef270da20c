"""One model's training state and the two kinds of unit it runs: a training hop and an
evaluation pass over one shard.

The same functions run inside workers and in the single-process reference used by tests and
benchmarks, which is what makes "trained by hops" and "trained in one process" comparable bit for
bit (MOP invariant 4).
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from . import files, statefile, turns
from .data import Shard
from .errors import ConfigError, ModelFailed
from .files import is_url, replace_atomically
from .seeding import derive_seed
from .spec import ModelSpec
from .state import Counters
from .techniques.prefix import run_frozen

BuildFn = Callable[[dict[str, Any]], ModelSpec]


@dataclass
class HopStats:
    """Row-weighted sums of loss and metrics over one unit's rows."""

    rows: int
    sums: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: v / self.rows for k, v in self.sums.items()} if self.rows else {}


def build_spec(build: BuildFn, params: dict[str, Any], init_seed: int | None) -> ModelSpec:
    """Call the user's ``build`` (seeding torch first, so initial weights are reproducible)."""
    if init_seed is not None:
        torch.manual_seed(init_seed)
    spec = build(dict(params))
    check_is_spec(spec, build)
    return spec


def check_is_spec(spec: Any, build: BuildFn) -> None:
    if not isinstance(spec, ModelSpec):
        raise ConfigError(
            "build",
            getattr(build, "__name__", build),
            "a function returning cerebro.ModelSpec",
            hint=f"it returned {type(spec).__name__}",
        )


def init_seed(seed: int, model_id: int) -> int:
    """Seed of a model's weight initialization and of its RNG stream."""
    return derive_seed(seed, "init", model_id)


def shuffle_seed(seed: int, model_id: int, epoch: int, shard: int) -> int:
    """Seed of the row order of one hop: a function of (experiment, model, epoch, shard)."""
    return derive_seed(seed, "shuffle", model_id, epoch, shard)


def shard_order(seed: int, model_id: int, epoch: int, shards: list[int]) -> list[int]:
    """The order in which a deterministic experiment's model visits its training shards in an
    epoch (a seeded permutation of ``shards``); one process replaying it gets the same weights.

    >>> shard_order(0, 1, 0, [0, 1, 2, 3]) == shard_order(0, 1, 0, [0, 1, 2, 3])
    True
    """
    ordered = sorted(shards)
    rng = np.random.default_rng(derive_seed(seed, "shard-order", model_id, epoch))
    return [ordered[i] for i in rng.permutation(len(ordered))]


def hop_rng_seed(seed: int, model_id: int, epoch: int, shard: int) -> int:
    """What a deterministic experiment seeds torch with before a training hop (dropout and any
    other randomness then depend on the hop alone, not on the worker that runs it)."""
    return derive_seed(seed, "hop-rng", model_id, epoch, shard)


def capture_state(
    spec: ModelSpec, counters: dict[str, int], device: torch.device
) -> dict[str, Any]:
    """Everything that hops with a model: weights, optimizer, LR schedule, RNG and counters.

    Tensors are referenced, not copied, on CPU; on a GPU they are copied to host memory so the
    snapshot can be written while the device goes on with other work.
    """
    state = {
        "model": spec.model.state_dict(),
        "optimizer": spec.optimizer.state_dict(),
        "lr_scheduler": spec.lr_scheduler.state_dict() if spec.lr_scheduler is not None else None,
        "rng": torch.get_rng_state(),
        "counters": dict(counters),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
        state = _to_cpu(state)
    return state


def restore_state(spec: ModelSpec, state: dict[str, Any], device: torch.device) -> None:
    """Load a captured state into ``spec``'s objects (already on ``device``), copying every
    tensor: the state's own may be views of a file or of shared memory."""
    spec.model.load_state_dict(state["model"])
    # A model that trained on this worker before has optimizer tensors of the right shapes:
    # copying into them costs no allocation (page faults cost more than the copy itself).
    before = {id(p): dict(v) for p, v in spec.optimizer.state.items()}
    spec.optimizer.load_state_dict(state["optimizer"])
    for param, values in spec.optimizer.state.items():  # it keeps tensors it need not convert
        kept = before.get(id(param), {})
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = _copied(value, kept.get(key))
    if spec.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        spec.lr_scheduler.load_state_dict(state["lr_scheduler"])


def can_bind(spec: ModelSpec, state: dict[str, Any]) -> bool:
    """Whether :func:`bind_state` can make ``spec`` use ``state``'s tensors as its own: the
    state holds exactly the model's parameters and buffers, of their shapes and types, on the
    model's device."""
    tensors = _bindable_tensors(spec)
    saved = state["model"]
    return saved.keys() == tensors.keys() and all(
        isinstance(value, torch.Tensor)
        and value.shape == tensors[key].shape
        and value.dtype == tensors[key].dtype
        and value.device == tensors[key].device
        for key, value in saved.items()
    )


def bind_state(spec: ModelSpec, state: dict[str, Any]) -> None:
    """Make ``spec``'s objects hold ``state``'s tensors themselves, not copies (see
    :func:`can_bind`): training then updates them in place. Its weights and buffers become
    views of the state's, and so does the optimizer's state (``load_state_dict`` keeps tensors
    already of the parameter's type and device).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> spec = ModelSpec(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                  loss=torch.nn.MSELoss(), batch_size=4)
        >>> state = capture_state(spec, {"version": 0}, _CPU)
        >>> state["model"] = {k: v.clone() for k, v in state["model"].items()}
        >>> can_bind(spec, state)
        True
        >>> bind_state(spec, state)
        >>> _ = state["model"]["bias"].fill_(5.0)  # the model's own bias now
        >>> model.bias.item()
        5.0
    """
    tensors = _bindable_tensors(spec)
    for key, value in state["model"].items():
        tensors[key].data = value
    spec.optimizer.load_state_dict(state["optimizer"])
    if spec.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        spec.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _bindable_tensors(spec: ModelSpec) -> dict[str, torch.Tensor]:
    model = spec.model
    found: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    found.update(
        (name, buffer)
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if name.rpartition(".")[2] not in _non_persistent(model, name)
    )
    return found


def _non_persistent(model: torch.nn.Module, name: str) -> set[str]:
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return set(owner._non_persistent_buffers_set)


def _copied(value: torch.Tensor, into: Any) -> torch.Tensor:
    """``value`` copied into the tensor ``into`` when it fits, else into a new one."""
    if (
        isinstance(into, torch.Tensor)
        and into.shape == value.shape
        and into.dtype == value.dtype
        and into.device == value.device
        and into.data_ptr() != value.data_ptr()
    ):
        return into.copy_(value)
    return value.clone()


def warm_start_state(
    build: BuildFn, params: dict[str, Any], source: dict[str, Any], counters: dict[str, Any]
) -> dict[str, Any]:
    """A training state that continues ``source`` (weights, optimizer state such as Adam's
    moments and step counts, LR-scheduler position, RNG) under new hyper-parameters.

    The optimizer's hyper-parameters (lr, weight_decay, momentum, betas, ...) are those that
    ``build(params)`` gives its optimizer: loading an optimizer state would otherwise bring the
    source's back. An LR scheduler keeps the source's position but takes the new base rates.
    Parameters that change the model's shape cannot be warm-started (loading the weights fails).
    """
    spec = build_spec(build, params, init_seed=None)
    fresh_groups = [
        {k: v for k, v in group.items() if k != "params"} for group in spec.optimizer.param_groups
    ]
    fresh_base_lrs = getattr(spec.lr_scheduler, "base_lrs", None)
    restore_state(spec, source, _CPU)
    for group, fresh in zip(spec.optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    if fresh_base_lrs is not None:
        spec.lr_scheduler.base_lrs = list(fresh_base_lrs)
    state = capture_state(spec, counters, _CPU)
    state["rng"] = source["rng"].clone()
    return state


_CPU = torch.device("cpu")


def set_rng(state: dict[str, Any], device: torch.device) -> None:
    """Make torch's generators continue the model's own random stream."""
    torch.set_rng_state(state["rng"])
    if device.type == "cuda":
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        else:  # first hop on a GPU: seeded as torch.manual_seed(init_seed) would have
            torch.cuda.manual_seed(state["counters"]["init_seed"])


# A state file's header takes a multiple of this: its next versions (each recording one more
# hop, about 300 bytes) keep its size, so each is written over the version before the last.
_HEADER_BLOCK = 16384


def save_state(state: dict[str, Any], path: str, newer_only: bool = False) -> bool:
    """Write atomically: a crash mid-write leaves the previous state intact. Returns whether
    it was written.

    ``newer_only``: leave a state file that holds a newer version of the model than ``state``
    as it is (False returned). Ray's workers save a model's versions in the background, each
    the one it trained: the save of version n may end after that of n+1, and would otherwise
    put the file a version back, behind what its records say is durable. The file's version
    is read in the writer's turn (:mod:`cerebro.turns`), so no other writer comes between
    (local files in cerebro's format: others are written whatever they hold).

    A state file on a local filesystem is written in turns with the version before the last
    (:mod:`cerebro.turns`): over its bytes, then renamed over ``path``, which costs the kernel
    about a fifth of a new file. The zip CRC32 that ``torch.save`` computes by default costs
    about 6x the write itself on CPU (measured: 0.21-0.35 s vs 0.04 s for 113 MB), CPU time a
    worker's background save takes from training: what needs torch's format is written
    without it.
    """
    encoded = None
    if statefile.writable(state):
        with contextlib.suppress(statefile.Unsupported):  # torch's format holds what it holds
            encoded = statefile.encode(state, header_block=_HEADER_BLOCK)
    if encoded is not None and not is_url(path):
        version = Counters.from_dict(state["counters"]).version if newer_only else 0
        newer = False

        def holds_newer() -> bool:
            nonlocal newer
            newer = file_version(path) > version
            return newer

        turns.write_in_turns(
            path, encoded.size, encoded.write_to, unless=holds_newer if newer_only else None
        )
        return not newer

    def write(tmp: str) -> None:
        if encoded is not None:
            with open(tmp, "wb") as f:
                encoded.write_to(f)
            return
        with _without_zip_crc():
            torch.save(state, tmp)

    replace_atomically(path, write)
    return True


def file_version(path: str) -> int:
    """The version of the state in the local file ``path``, from its header: -1 where it
    holds none in cerebro's format (missing, torn, or in torch's format, which is not read
    whole for this)."""
    try:
        header = statefile.read_header(path)
        return -1 if header is None else Counters.from_dict(header["counters"]).version
    except Exception:  # whatever a torn or foreign file makes a reader raise (IndexError too)
        return -1


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    serialization = torch.serialization
    if not hasattr(serialization, "set_crc32_options"):  # torch < 2.6 always computes it
        yield
        return
    before = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(before)


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a state (what writing it moves)."""
    return sum(t.nbytes for t in statefile.tensors_in(state))


def load_state(path: str) -> dict[str, Any]:
    """Read a state file, or one at an fsspec URL; in cerebro's format (:mod:`cerebro.statefile`)
    or ``torch.save``'s. Its bytes are copied once, into memory of the caller's own: a local
    state file may be written over in place later (see :mod:`cerebro.turns`)."""
    if files.is_url(path):
        with files.open_for_reading(path) as f:
            payload = bytearray(f.read())
    else:
        payload = statefile.read_bytes(path)
    if statefile.is_statefile(payload[: len(statefile.MAGIC)]):
        return cast(dict[str, Any], statefile.read_from(payload))
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def unreadable_part(state: dict[str, Any]) -> tuple[str, ...] | None:
    """Where ``state`` holds a value that :func:`save_state` writes but :func:`load_state`
    cannot read back: an object of a class that ``torch.load(weights_only=True)`` refuses (it
    runs no code from a file). The keys and indices that lead to the first such value, the
    last one its type's name; None where all of it reads back.

    Example:
        >>> import fractions
        >>> unreadable_part({"model": {"w": torch.zeros(2)}, "counters": {"version": 0}}) is None
        True
        >>> unreadable_part({"optimizer": {"param_groups": [{"note": fractions.Fraction(1)}]}})
        ('optimizer', 'param_groups', 0, 'note', 'fractions.Fraction')
    """
    if statefile.writable(state):
        with contextlib.suppress(statefile.Unsupported):
            statefile.encode(state)  # the header alone: the tensors are not copied
            return None  # in cerebro's format: read back whatever it holds
    for where, value in _objects(state, ()):
        if not _torch_reads(value):
            kind = type(value)
            return (*where, f"{kind.__module__}.{kind.__qualname__}")
    return None


def _objects(tree: Any, where: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """The values in ``tree`` that are neither tensors, plain values nor dicts, lists and
    tuples of them, with the keys and indices that lead to each."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _objects(value, (*where, key))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _objects(value, (*where, i))
    elif not isinstance(tree, torch.Tensor | int | float | str | bool | type(None)):
        yield where, tree


def _torch_reads(value: Any) -> bool:
    data = io.BytesIO()
    try:
        torch.save(value, data)
        data.seek(0)
        torch.load(data, weights_only=True)
    except (pickle.PicklingError, pickle.UnpicklingError, AttributeError, TypeError):
        return False  # refused on reading, or not even written (a lambda, say)
    return True


def load_counters(path: str) -> dict[str, Any]:
    """The ``counters`` of the state in a state file: its header alone where the file is in
    cerebro's format (a state of gigabytes is not read for them)."""
    header = None if files.is_url(path) else statefile.read_header(path)
    state = header if header is not None else load_state(path)
    return cast(dict[str, Any], state["counters"])


def run_train_hop(
    spec: ModelSpec,
    shard: Shard,
    seed: int,
    device: torch.device,
    end_of_epoch: bool,
    apply_frozen: bool = True,
) -> HopStats:
    """Plain SGD over one shard, rows shuffled by ``seed``; returns row-weighted loss and metrics.

    A spec's frozen prefix runs on each batch first (``apply_frozen``), unless the shard's
    inputs are already its output (materialized features).

    Raises:
        ModelFailed: if the loss or a metric is not finite.
    """
    model, optimizer = spec.model, spec.optimizer
    model.train()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(shard.rows, generator=generator).to(shard.x.device)
    sums = _zero_sums(spec, shard.x.device)
    for start in range(0, shard.rows, spec.batch_size):
        index = order[start : start + spec.batch_size]
        inputs, targets = shard.x.index_select(0, index), shard.y.index_select(0, index)
        if apply_frozen and spec.frozen is not None:
            inputs = run_frozen(spec.frozen, inputs)
        outputs = model(inputs)
        loss = spec.loss(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if spec.lr_scheduler is not None and spec.lr_scheduler_interval == "batch":
            spec.lr_scheduler.step()
        _accumulate(spec, sums, loss.detach(), outputs.detach(), targets, len(index))
    if end_of_epoch and spec.lr_scheduler is not None and spec.lr_scheduler_interval == "epoch":
        spec.lr_scheduler.step()
    return _finish(sums, shard.rows, "training")


@torch.no_grad()
def run_eval_hop(
    spec: ModelSpec, shard: Shard, device: torch.device, apply_frozen: bool = True
) -> HopStats:
    """Loss and metrics of the model (in eval mode) over every row of one shard (see
    :func:`run_train_hop` for ``apply_frozen``)."""
    model = spec.model
    was_training = model.training
    model.eval()
    sums = _zero_sums(spec, shard.x.device)
    try:
        for start in range(0, shard.rows, spec.batch_size):
            inputs = shard.x[start : start + spec.batch_size]
            targets = shard.y[start : start + spec.batch_size]
            if apply_frozen and spec.frozen is not None:
                inputs = run_frozen(spec.frozen, inputs)
            outputs = model(inputs)
            loss = spec.loss(outputs, targets)
            _accumulate(spec, sums, loss, outputs, targets, len(targets))
    finally:
        model.train(was_training)
    return _finish(sums, shard.rows, "validation")


def _zero_sums(spec: ModelSpec, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros((), dtype=torch.float64, device=device) for name in spec.metric_names()
    }


@torch.no_grad()
def _accumulate(
    spec: ModelSpec,
    sums: dict[str, torch.Tensor],
    loss: torch.Tensor,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    rows: int,
) -> None:
    # Sums stay on the device: one host synchronisation per unit, not per batch.
    sums["loss"] += loss.double() * rows
    for name, fn in spec.metrics.items():
        sums[name] += torch.as_tensor(fn(outputs, targets)).double() * rows


def _finish(sums: dict[str, torch.Tensor], rows: int, what: str) -> HopStats:
    values = {k: float(v) for k, v in sums.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ModelFailed(f"{what} produced non-finite values: {bad}")
    return HopStats(rows=rows, sums=values)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def train_in_process(
    build: BuildFn,
    params: dict[str, Any],
    shards: list[Shard],
    shard_order: list[list[int]],
    seed: int,
    model_id: int,
    device: torch.device | str = "cpu",
) -> ModelSpec:
    """The reference: train one model in this process, epoch by epoch over ``shard_order``.

    ``shard_order[e]`` lists the shards of epoch ``e`` in the order to visit them. Row order and
    initialization are seeded exactly as in a MOP run with the same ``seed`` and ``model_id``.
    """
    device = torch.device(device)
    spec = build_spec(build, params, init_seed(seed, model_id)).to(device)
    for epoch, order in enumerate(shard_order):
        for i, shard in enumerate(order):
            run_train_hop(
                spec,
                shards[shard],
                shuffle_seed(seed, model_id, epoch, shard),
                device,
                end_of_epoch=i == len(order) - 1,
            )
    return spec
