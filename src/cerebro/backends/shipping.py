"""How the user's ``build`` function travels to workers.

Workers never import the user's main script: everything defined there (``build``, metrics,
classes, constants it uses) is sent by value with cloudpickle. What lives in an importable module
is sent by reference, and workers import it from the driver's ``sys.path``. Two cases are handled
before any worker starts:

* a module that runs its experiment while it is being imported (``run()`` at module level of an
  imported file): workers importing it would run the experiment again, so its contents are sent
  by value instead;
* something workers could not receive (an open file, a lock, a function from a module that is
  not on ``sys.path``): a :class:`~cerebro.ConfigError` names it and says what to do.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from ..errors import ConfigError, WorkerError

_FIX = "define it, and what it uses, at module level of your script or of an importable module"


def pickle_build(build: Callable[..., Any]) -> bytes:
    """``build`` as bytes that every worker can load, or a ConfigError saying why not.

    Example:
        >>> import cerebro.metrics
        >>> payload = pickle_build(cerebro.metrics.accuracy)
        >>> load_build(payload) is cerebro.metrics.accuracy
        True
    """
    importing = [m for m in _modules_being_imported() if not m.__name__.startswith("cerebro.")]
    for module in importing:
        cloudpickle.register_pickle_by_value(module)
    try:
        payload = cloudpickle.dumps(build)
    except Exception as e:
        raise _unpicklable(build, e) from e
    finally:
        for module in importing:
            cloudpickle.unregister_pickle_by_value(module)
    _check_importable(build, payload)
    return payload


def load_build(payload: bytes) -> Callable[..., Any]:
    """The worker's side: ``build`` back from bytes, with the module name and the path searched
    if a module it refers to cannot be imported here."""
    try:
        return cloudpickle.loads(payload)
    except ModuleNotFoundError as e:
        raise WorkerError(
            f"this worker cannot import module {e.name!r}, which `build` refers to; it searched "
            f"sys.path = {sys.path}. Install the module on every worker, put its folder on "
            "sys.path (PYTHONPATH), or define what build uses in your main script"
        ) from e


def _modules_being_imported() -> Iterator[types.ModuleType]:
    """Modules whose top-level code is on the current call stack (being imported right now)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if frame.f_code.co_name == "<module>" and name not in (None, "__main__"):
            module = sys.modules.get(name)
            if module is not None and vars(module) is frame.f_globals:
                yield module
        frame = frame.f_back


def _unpicklable(build: Callable[..., Any], error: Exception) -> ConfigError:
    """Name the object ``build`` refers to that cannot be pickled (the first one found)."""
    for name, value in _referenced(build, depth=3):
        try:
            cloudpickle.dumps(value)
        except Exception as inner:
            return ConfigError(
                "build",
                build,
                "a function that workers can receive",
                hint=f"it refers to {name} = {type(value).__name__} object, which cannot be "
                f"pickled ({inner}); {_FIX}, or create it inside build",
            )
    return ConfigError(
        "build", build, "a function that workers can receive", hint=f"{error}; {_FIX}"
    )


def _referenced(function: Any, depth: int, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Globals and closure variables a function uses, and recursively those of functions."""
    code = getattr(function, "__code__", None)
    if code is None or depth == 0:
        return
    found: list[tuple[str, Any]] = []
    globals_ = getattr(function, "__globals__", {})
    found += [(n, globals_[n]) for n in code.co_names if n in globals_]
    cells = getattr(function, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars, cells):
        try:
            found.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    for name, value in found:
        if isinstance(value, types.ModuleType):
            continue
        if isinstance(value, types.FunctionType):
            yield from _referenced(value, depth - 1, f"{prefix}{name}.")
        yield f"{prefix}{name}", value


def _check_importable(build: Callable[..., Any], payload: bytes) -> None:
    """Every module the payload refers to by name must be importable from ``sys.path``."""
    for module, name in _globals_in(payload):
        if not _importable(module):
            raise ConfigError(
                "build",
                build,
                "a function that workers can receive",
                hint=f"it refers to {module}.{name}, and workers cannot import module "
                f"{module!r}: it is not found on sys.path = {sys.path}; {_FIX} "
                "(a folder on sys.path or PYTHONPATH)",
            )


def _globals_in(payload: bytes) -> list[tuple[str, str]]:
    """The (module, name) pairs a pickle loads by reference, as the driver resolves them."""
    seen: list[tuple[str, str]] = []

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.append((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(payload)).load()
    return seen


def _importable(module: str) -> bool:
    top = module.partition(".")[0]
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return True
    loaded = sys.modules.get(top)
    spec = getattr(loaded, "__spec__", None)
    if spec is not None and spec.origin in ("built-in", "frozen"):
        return True
    # Ask the finders afresh (a module in sys.modules may have been loaded from a file path):
    # sys.path's, and those of editable installs.
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and find_spec(top, None) is not None:
            return True
    return False
