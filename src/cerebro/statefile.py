"""Cerebro's state file format: a training state's structure, then its tensors' raw bytes.

``torch.save``/``torch.load`` cost about 1 and 2 ms for even a tiny state (a zip archive and a
pickle of every tensor), more than a small model's hop computes. A state here is written as a
header (a magic line, then a pickle of the state with each tensor replaced by a reference to
its bytes) and the tensors' bytes, each 64-byte aligned. Reading maps the file and makes each
tensor a view of the mapped bytes (copy-on-write): nothing is copied until the caller loads
the views into its own tensors, and a file can be deleted while its views are in use.

The header's pickle is read by an unpickler that accepts nothing but containers, numbers,
strings and tensor references, so a state file cannot run code, like ``torch.load`` with
``weights_only=True``.

Example:
    >>> import tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "state.pt")
    >>> write({"model": {"w": torch.arange(6.0).view(2, 3)}, "counters": {"version": 2}}, path)
    >>> state = read(path)
    >>> state["model"]["w"].tolist(), state["counters"]
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], {'version': 2})
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

MAGIC = b"CEREBRO-STATE-1\n"
_ALIGN = 64
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class _TensorRef:
    """Where one tensor's bytes are in the file (from the start of the data section)."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class Unsupported(ValueError):
    """The state holds something this format does not (an object of a class, say)."""


def is_statefile(head: bytes) -> bool:
    """Whether a file that begins with ``head`` is in this format (else: ``torch.save``'s)."""
    return head.startswith(MAGIC)


def tensors_in(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``state`` (dicts, lists and tuples of them and plain values)."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from tensors_in(value)


def writable(state: Any) -> bool:
    """Whether every tensor in ``state`` is a dense CPU tensor (what this format holds)."""
    return all(t.layout is torch.strided and t.device.type == "cpu" for t in tensors_in(state))


def write_to(state: Any, f: BinaryIO) -> None:
    """Write ``state`` (dicts, lists and tuples of tensors and plain values) to ``f``."""
    tensors: list[torch.Tensor] = []
    refs: list[_TensorRef] = []
    offset = 0

    def swap(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, torch.Tensor):
            tensor = value.detach().contiguous()
            refs.append(_TensorRef(offset, tensor.nbytes, str(tensor.dtype), tuple(tensor.shape)))
            tensors.append(tensor)
            offset += _aligned(tensor.nbytes)
            return refs[-1]
        if isinstance(value, dict):
            return type(value)((k, swap(v)) for k, v in value.items())
        if isinstance(value, list | tuple):
            return type(value)(swap(v) for v in value)
        return value

    header = pickle.dumps(swap(state), protocol=pickle.HIGHEST_PROTOCOL)
    try:  # what read() would refuse is refused now, so the caller can write it otherwise
        _Unpickler(io.BytesIO(header)).load()
    except pickle.UnpicklingError as e:
        raise Unsupported(str(e)) from e
    f.write(MAGIC)
    f.write(_LENGTH.pack(len(header)))
    f.write(header)
    f.write(b"\0" * (_aligned(f.tell()) - f.tell()))
    for tensor in tensors:
        if tensor.nbytes:
            f.write(memoryview(_bytes_of(tensor)))
        f.write(b"\0" * (_aligned(tensor.nbytes) - tensor.nbytes))


def write(state: Any, path: str) -> None:
    """Write ``state`` to the file ``path`` (not atomically: see ``training.save_state``)."""
    with open(path, "wb") as f:
        write_to(state, f)


def read(path: str) -> Any:
    """A state written by :func:`write`, its tensors views of the file mapped in memory."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    return read_from(buffer)


def read_from(buffer: Any) -> Any:
    """A state from the bytes of a state file (``bytes`` or a writable mapping)."""
    view = memoryview(buffer)
    if not is_statefile(bytes(view[: len(MAGIC)])):
        raise pickle.UnpicklingError("not a cerebro state file (no magic line)")
    start = len(MAGIC) + _LENGTH.size
    if len(view) < start:
        raise EOFError("state file is truncated")
    (length,) = _LENGTH.unpack(view[len(MAGIC) : start])
    skeleton = _Unpickler(io.BytesIO(view[start : start + length])).load()
    data = _aligned(start + length)
    writable_view = view if not view.readonly else memoryview(bytearray(view))

    def fill(value: Any) -> Any:
        if isinstance(value, _TensorRef):
            begin = data + value.offset
            if begin + value.nbytes > len(writable_view):
                raise EOFError("state file is truncated")
            dtype = _dtype(value.dtype)
            if not value.nbytes:
                return torch.empty(value.shape, dtype=dtype)
            raw = torch.frombuffer(writable_view, dtype=torch.uint8, count=value.nbytes,
                                   offset=begin)  # fmt: skip
            return raw.view(dtype).view(value.shape)
        if isinstance(value, dict):
            return type(value)((k, fill(v)) for k, v in value.items())
        if isinstance(value, list | tuple):
            return type(value)(fill(v) for v in value)
        return value

    return fill(skeleton)


def _bytes_of(tensor: torch.Tensor) -> Any:
    flat = tensor.reshape(-1)
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)  # also types numpy lacks (bfloat16)
    return flat.numpy()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"unknown tensor type {name!r} in state file")
    return dtype


_ALLOWED = {
    (__name__, "_TensorRef"): _TensorRef,
    ("collections", "OrderedDict"): OrderedDict,  # what state_dict() returns
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
    """Containers, numbers and strings only, and tensor references: nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"state files hold no {module}.{name}")
        return found
