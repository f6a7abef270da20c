"""What an experiment trains, as comparable fingerprints.

Beyond its arguments (dataset, search, epochs, seed...), an experiment is what ``build`` makes of
each configuration. Two fingerprints say it, so that a rerun on the same path can tell whether it
would continue the same models:

* :func:`code_fingerprint`: a digest of ``build``'s code (bytecode, constants and names, with
  nested functions, and the functions, classes and plain constants of its own module that it
  refers to). Line numbers, file names and docstrings do not count, and a function defined anew
  from the same source (a notebook cell run again) has the same fingerprint.
* :func:`spec_fingerprint`: the built spec as readable fields: the module tree (class and
  ``extra_repr`` of each module), parameter and buffer shapes and dtypes, the optimizer's class
  and hyper-parameters, the learning-rate scheduler's settings, the loss, batch size and metric
  names. :func:`first_difference` names the first field that differs.

Example:
    >>> import torch, cerebro
    >>> def build(params):
    ...     model = torch.nn.Linear(4, params["width"])
    ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     return cerebro.ModelSpec(model, optimizer, torch.nn.MSELoss(), batch_size=8)
    >>> narrow = spec_fingerprint(build({"width": 2}))
    >>> print(first_difference(narrow, spec_fingerprint(build({"width": 3}))))
    parameter weight shape (2, 4) recorded, now (3, 4) (and 2 other fields)
    >>> code_fingerprint(build) == code_fingerprint(build)
    True
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import training
from ..errors import first_line
from ..spec import ModelSpec
from ..techniques.prefix import chain

# Fields of the architecture (shared by many configurations, so kept once per distinct one).
_ARCHITECTURE = ("parameter ", "buffer ", "module ")
_DEPTH = 8  # how deep references are followed from build
_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))
# Settings torch adds or drops between versions: a field that one side lacks is not a difference.
_OPTIONAL = ("optimizer group ", "lr_scheduler ")
# Scheduler bookkeeping that is no setting (and whose keys change between torch versions).
_SCHEDULER_INTERNALS = {"_get_lr_called_within_step", "_is_initial", "_step_count", "_last_lr"}


# Code --------------------------------------------------------------------------------------------


def code_fingerprint(build: Callable[..., Any]) -> str | None:
    """``"<python cache tag>:<sha256>"`` of ``build``'s code, or None if it has none to read.

    Bytecode differs between Python versions, hence the tag: fingerprints of two versions are
    not compared (see :func:`same_code`).
    """
    hasher = _CodeHasher(build)
    try:
        hasher.callable(build, _DEPTH)
    except Exception:  # something unusual to introspect: this build cannot be compared
        return None
    if not hasher.found:
        return None
    return f"{sys.implementation.cache_tag}:{hasher.digest.hexdigest()}"


def same_code(recorded: str | None, now: str | None) -> bool | None:
    """Whether two code fingerprints are equal; None if they cannot be compared (one is
    missing, or they were taken under different Python versions)."""
    if not recorded or not now or recorded.split(":")[0] != now.split(":")[0]:
        return None
    return recorded == now


class _CodeHasher:
    def __init__(self, root: Any) -> None:
        self.digest = hashlib.sha256()
        self.module = getattr(root, "__module__", None)
        self.seen: set[int] = set()
        self.found = False  # some code object was hashed

    def add(self, *parts: Any) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            self.digest.update(len(data).to_bytes(8, "little") + data)

    def callable(self, fn: Any, depth: int) -> None:
        if id(fn) in self.seen or depth <= 0:
            return
        self.seen.add(id(fn))
        if isinstance(fn, functools.partial):
            self.add("partial", _plain(fn.args), _plain(fn.keywords))
            self.callable(fn.func, depth - 1)
        elif isinstance(fn, types.MethodType):
            self.callable(fn.__func__, depth)
        elif isinstance(fn, types.FunctionType):
            self.function(fn, depth)
        elif isinstance(fn, type):
            self.cls(fn, depth)
        else:  # a callable object: its class's code
            self.add("object", type(fn).__qualname__)
            self.cls(type(fn), depth - 1)

    def function(self, fn: types.FunctionType, depth: int) -> None:
        self.add("function", _plain(fn.__defaults__), _plain(fn.__kwdefaults__))
        consts = fn.__code__.co_consts
        if fn.__doc__ is not None and consts and consts[0] == fn.__doc__:
            consts = consts[1:]  # the docstring
        self.code(fn.__code__, consts)
        cells = fn.__closure__ or ()
        for name, cell in zip(fn.__code__.co_freevars, cells):
            try:
                self.value(name, cell.cell_contents, depth)
            except ValueError:  # an empty cell
                self.add(name, "<empty>")
        for name in sorted(set(_names(fn.__code__))):
            if name in fn.__globals__:
                self.value(name, fn.__globals__[name], depth)

    def code(self, code: types.CodeType, consts: tuple[Any, ...]) -> None:
        self.found = True
        self.add("code", code.co_code, getattr(code, "co_exceptiontable", b""))
        self.add(code.co_names, code.co_freevars, code.co_cellvars)
        self.add(code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount)
        for const in consts:
            if isinstance(const, types.CodeType):
                self.code(const, const.co_consts)
            else:
                self.add(_plain(const))

    def cls(self, cls: type, depth: int) -> None:
        """A class of build's own module: its bases' names, methods and plain attributes."""
        if cls.__module__ != self.module or id(cls) in self.seen or depth <= 0:
            self.add("class", cls.__module__, cls.__qualname__)
            return
        self.seen.add(id(cls))
        self.add("class", cls.__qualname__, [b.__qualname__ for b in cls.__bases__])
        for name, member in sorted(vars(cls).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                for accessor in (member.fget, member.fset, member.fdel):
                    if accessor is not None:
                        self.callable(accessor, depth - 1)
            elif isinstance(member, types.FunctionType):
                self.add(name)
                self.callable(member, depth - 1)
            elif name not in ("__doc__", "__module__", "__qualname__") and _is_plain(member):
                self.add(name, _plain(member))

    def value(self, name: str, value: Any, depth: int) -> None:
        """Something build refers to: followed if it belongs to build's own module."""
        if _is_plain(value):
            self.add(name, _plain(value))
        elif isinstance(value, types.FunctionType) and value.__module__ == self.module:
            self.add(name)
            self.callable(value, depth - 1)
        elif isinstance(value, type) and value.__module__ == self.module:
            self.add(name)
            self.cls(value, depth - 1)
        elif isinstance(value, functools.partial):
            self.add(name)
            self.callable(value, depth - 1)


def _names(code: types.CodeType) -> Iterator[str]:
    """Global (and attribute) names a code object and its nested ones use."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _is_plain(value: Any, size: int = 1000) -> bool:
    """A constant worth hashing: a primitive, or a small container of them."""
    if isinstance(value, _PRIMITIVES):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return len(value) <= size and all(_is_plain(v, size) for v in value)
    if isinstance(value, dict):
        return len(value) <= size and all(
            _is_plain(k, size) and _is_plain(v, size) for k, v in value.items()
        )
    return False


def _plain(value: Any) -> str:
    """A repr that is the same in every process (sets sorted; other objects by type)."""
    if isinstance(value, _PRIMITIVES):
        return repr(value)
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_plain(v) for v in value)) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_plain(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, types.CodeType):
        return f"<code {value.co_name}>"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


# Specs -------------------------------------------------------------------------------------------


def spec_fingerprint(spec: ModelSpec) -> dict[str, str]:
    """What a built spec trains, field by field (in the order differences are reported)."""
    model = spec.model
    fields: dict[str, str] = {}
    for kind, tensors in (
        ("parameter", model.named_parameters()),
        ("buffer", model.named_buffers()),
    ):
        for name, tensor in tensors:
            fields[f"{kind} {name} shape"] = str(tuple(tensor.shape))
            fields[f"{kind} {name} dtype"] = str(tensor.dtype).removeprefix("torch.")
            if kind == "parameter":
                fields[f"{kind} {name} requires_grad"] = str(tensor.requires_grad)
    for name, module in model.named_modules():
        fields[f"module {name or '(root)'}"] = f"{type(module).__name__}({module.extra_repr()})"
    if spec.frozen is not None:  # its structure and weights, as the features it computes
        fields["frozen"] = chain(spec.frozen)[-1]
    fields.update(_training_fields(spec))
    return fields


def _training_fields(spec: ModelSpec) -> dict[str, str]:
    fields = {"optimizer": _qualname(type(spec.optimizer))}
    names = {id(p): name for name, p in spec.model.named_parameters()}
    for i, group in enumerate(spec.optimizer.param_groups):
        params = [names.get(id(p), "?") for p in group["params"]]
        digest = hashlib.sha256("\n".join(params).encode()).hexdigest()[:12]
        fields[f"optimizer group {i} params"] = f"{len(params)} tensors ({digest})"
        for key in sorted(k for k in group if k != "params"):
            fields[f"optimizer group {i} {key}"] = _setting(group[key])
    scheduler = spec.lr_scheduler
    if scheduler is not None:
        fields["lr_scheduler"] = _qualname(type(scheduler))
        state = scheduler.state_dict()
        for key in sorted(state):
            if key not in _SCHEDULER_INTERNALS and not isinstance(state[key], torch.Tensor):
                fields[f"lr_scheduler {key}"] = _setting(state[key])
        fields["lr_scheduler_interval"] = spec.lr_scheduler_interval
    fields["loss"] = _loss(spec.loss)
    fields["batch_size"] = str(spec.batch_size)
    fields["metrics"] = str(spec.metric_names())
    return fields


def _setting(value: Any) -> str:
    """A hyper-parameter as text (tensors as their values, objects by type)."""
    if isinstance(value, torch.Tensor):
        return repr(value.tolist())
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_setting(v) for v in value if not isinstance(v, torch.Tensor))
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{k!r}: {_setting(v)}"
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if not isinstance(v, torch.Tensor)
        )
        return "{" + inner + "}"
    return _plain(value)


def _loss(loss: Any) -> str:
    if isinstance(loss, torch.nn.Module):
        settings = [
            f"{k}={_setting(v)}"
            for k, v in sorted(vars(loss).items())
            if not k.startswith("_") and k != "training"
        ]
        settings += [f"{k}: shape {tuple(b.shape)}" for k, b in loss.named_buffers()]
        return f"{type(loss).__name__}({', '.join(settings)})"
    if isinstance(loss, functools.partial):
        return f"partial({_loss(loss.func)}, {_plain(loss.args)}, {_plain(loss.keywords)})"
    if inspect.isfunction(loss) or inspect.isbuiltin(loss):
        return f"{loss.__module__}.{loss.__qualname__}"
    return _qualname(type(loss))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def first_difference(recorded: dict[str, str], now: dict[str, str]) -> str | None:
    """The first field that differs, as ``"<field> <recorded> recorded, now <now>"``.

    An optimizer or scheduler setting that only one side has (torch adds new ones with their
    defaults) is not a difference; a parameter, buffer or module that only one side has is.
    """
    keys = list(recorded) + [k for k in now if k not in recorded]
    differing = [
        k
        for k in keys
        if recorded.get(k) != now.get(k)
        and (k in recorded and k in now or not k.startswith(_OPTIONAL) or k.endswith(" params"))
    ]
    if not differing:
        return None
    key = differing[0]
    text = f"{key} {recorded.get(key, 'absent')} recorded, now {now.get(key, 'absent')}"
    if len(differing) > 1:
        others = len(differing) - 1
        text += f" (and {others} other field{'s' if others > 1 else ''})"
    return text


# Records -----------------------------------------------------------------------------------------


class Fingerprints:
    """Spec fingerprints of built models, as an experiment's config keeps them: each model's
    params and training fields, and its architecture (parameters, buffers, modules) once per
    distinct architecture, so that a grid over hyper-parameters stores one module tree.
    """

    def __init__(self, packed: dict[str, Any] | None = None) -> None:
        packed = packed or {}
        self.architectures: dict[str, dict[str, str]] = dict(packed.get("architectures", {}))
        self.models: dict[str, dict[str, Any]] = dict(packed.get("models", {}))

    def add(self, model_id: int, params: dict[str, Any], spec: ModelSpec) -> None:
        """Keep the fingerprint of one model (none if its spec cannot be read, e.g. a module
        whose ``extra_repr`` raises: such a model is not compared, and trains as usual)."""
        try:
            fields = spec_fingerprint(spec)
        except Exception:
            return
        architecture = {k: v for k, v in fields.items() if k.startswith(_ARCHITECTURE)}
        key = hashlib.sha256(repr(sorted(architecture.items())).encode()).hexdigest()[:16]
        self.architectures[key] = architecture
        self.models[str(model_id)] = {
            "params": dict(params),
            "architecture": key,
            "training": {k: v for k, v in fields.items() if k not in architecture},
        }

    def fields(self, model_id: str) -> dict[str, str]:
        entry = self.models[model_id]
        return {**self.architectures.get(entry["architecture"], {}), **entry["training"]}

    def packed(self) -> dict[str, Any]:
        used = {entry["architecture"] for entry in self.models.values()}
        return {
            "architectures": {k: v for k, v in self.architectures.items() if k in used},
            "models": self.models,
        }


def compare(
    config: dict[str, Any], build: Callable[..., Any], seed: int
) -> tuple[str | None, dict[str, Any]]:
    """How ``build`` differs from what an experiment's ``config`` recorded, or None if it does
    not (or cannot be told: records written before fingerprints existed); and the entries the
    config would hold for ``build``.

    Each configuration recorded is built again (seeded as the driver seeds it) and compared
    field by field; the first difference is named with the model's id and params. The code of
    ``build`` is compared last: a spec difference says more.
    """
    recorded = Fingerprints(config.get("model_fingerprints"))
    now = Fingerprints()
    difference = None
    for model_id in sorted(recorded.models, key=int):
        params = recorded.models[model_id]["params"]
        where = f"model {model_id}" + (f" ({_shown(params)})" if params else "")
        try:
            spec = training.build_spec(build, params, training.init_seed(seed, int(model_id)))
        except Exception as e:
            if difference is None:
                difference = f"{where}: build now raises {type(e).__name__}: {first_line(e)}"
            continue
        now.add(int(model_id), params, spec)
        if difference is None and model_id in now.models:
            found = first_difference(recorded.fields(model_id), now.fields(model_id))
            difference = f"{where}: {found}" if found else None
    code = code_fingerprint(build)
    if difference is None and same_code(config.get("build_code"), code) is False:
        difference = "the code of build changed"
    return difference, {"build_code": code, "model_fingerprints": now.packed()}


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())
