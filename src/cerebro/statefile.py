"""Cerebro's state file format: a training state's structure, then its tensors' raw bytes.

``torch.save``/``torch.load`` cost about 1 and 2 ms for even a tiny state (a zip archive and a
pickle of every tensor), more than a small model's hop computes. A state here is written as a
header (a magic line, then a pickle of the state with each tensor replaced by a reference to
its bytes) and the tensors' bytes, each 64-byte aligned. Reading copies the file's bytes once,
into private memory, and makes each tensor a view of them (loading the views into a model's
tensors or binding them costs no second copy).

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
from typing import IO, Any, BinaryIO, TypeVar

import torch

from . import turns

MAGIC = b"CEREBRO-STATE-1\n"
_Leaf = TypeVar("_Leaf")
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


def is_statefile(head: bytes | bytearray) -> bool:
    """Whether a file that begins with ``head`` is in this format (else: ``torch.save``'s)."""
    return head.startswith(MAGIC)


def tensors_in(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``state`` (dicts, lists and tuples of them and plain values)."""
    return _leaves(state, torch.Tensor)


def _leaves(tree: Any, kind: type[_Leaf]) -> Iterator[_Leaf]:
    """Every ``kind`` in ``tree`` (dicts, lists and tuples of them and other values), in order."""
    if isinstance(tree, kind):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value, kind)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _leaves(value, kind)


def writable(state: Any) -> bool:
    """Whether every tensor in ``state`` is a dense CPU tensor (what this format holds)."""
    return all(t.layout is torch.strided and t.device.type == "cpu" for t in tensors_in(state))


@dataclass(frozen=True)
class _Layout:
    """Where a state's parts go in a file: its header (the pickle of its skeleton) and each
    tensor's bytes, in order."""

    header: bytes
    tensors: tuple[torch.Tensor, ...]
    refs: tuple[_TensorRef, ...]


def _layout(state: Any) -> _Layout:
    tensors: list[torch.Tensor] = []
    refs: list[_TensorRef] = []
    offset = 0

    def swap(value: Any) -> Any:
        nonlocal offset
        if type(value) in _PLAIN:  # most of a state's leaves (its counters and hop records)
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
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
    return _Layout(header, tuple(tensors), tuple(refs))


@dataclass(frozen=True)
class Encoded:
    """A state laid out for a file, whose size is known before a byte of it is written (what
    writing over a file of that size in place needs, see :mod:`cerebro.turns`).

    Example:
        >>> encoded = encode({"w": torch.zeros(3), "step": 1})
        >>> data = io.BytesIO()
        >>> encoded.write_to(data)
        >>> encoded.size == len(data.getvalue())
        True
    """

    layout: _Layout
    header_room: int = 0

    @property
    def size(self) -> int:
        data = _aligned(_header_end(self.layout, self.header_room))
        return data + sum(_aligned(t.nbytes) for t in self.layout.tensors)

    def write_to(self, f: IO[bytes]) -> None:
        """Write the state to ``f``, from its position."""
        layout, start = self.layout, f.tell()
        f.write(MAGIC)
        f.write(_LENGTH.pack(len(layout.header) + self.header_room))
        f.write(layout.header)
        at = f.tell() - start
        f.write(b"\0" * (_aligned(at + self.header_room) - at))
        for tensor in layout.tensors:
            if tensor.nbytes:
                f.write(memoryview(_bytes_of(tensor.contiguous())))
            f.write(b"\0" * (_aligned(tensor.nbytes) - tensor.nbytes))


def encode(state: Any, header_room: int = 0, header_block: int = 1) -> Encoded:
    """``state`` (dicts, lists and tuples of tensors and plain values) laid out for a file;
    raises :class:`Unsupported` for what :func:`read` would refuse. ``header_room``: bytes
    left free after the header, so that :func:`rewrite` can later put a longer header (more
    hops recorded, say) in the same file without moving its tensors. ``header_block``: more
    room, up to a multiple of this many bytes, so that a model's next versions (each header
    a hop longer) keep the file's size (what writing one over another in place needs).

    >>> small = {"w": torch.zeros(3), "hops": [1]}
    >>> large = {"w": torch.ones(3), "hops": list(range(100))}
    >>> encode(small).size == encode(large).size
    False
    >>> encode(small, header_block=4096).size == encode(large, header_block=4096).size
    True
    """
    layout = _layout(state)
    return Encoded(layout, header_room + (-_header_end(layout, header_room)) % header_block)


def _header_end(layout: _Layout, header_room: int) -> int:
    """Where a file of ``layout`` with ``header_room`` ends its header (its tensors start at
    the next aligned offset)."""
    return len(MAGIC) + _LENGTH.size + len(layout.header) + header_room


def write_to(state: Any, f: BinaryIO, header_room: int = 0) -> None:
    """Write ``state`` to ``f`` (see :func:`encode`)."""
    encode(state, header_room).write_to(f)


def rewrite(buffer: Any, state: Any, refs: tuple[Any, ...] | None = None) -> bool:
    """Write ``state`` over the state file mapped writable in ``buffer``, in place, if it has
    the same tensors (types and shapes, in the same order) and its header fits the room the
    file has; tensors that already are views of ``buffer`` at their place are not copied.
    Returns False, writing nothing, where it does not fit (write a new file then). ``refs``:
    the file's tensors as :func:`read_with_refs` gave them, if known (else read from its
    header).

    Example:
        >>> data = io.BytesIO()
        >>> write_to({"w": torch.zeros(3), "step": 1}, data, header_room=64)
        >>> mapped = bytearray(data.getvalue())
        >>> state = read_from(mapped)
        >>> _ = state["w"].add_(2.0)  # a view of the file's bytes: trained in place
        >>> rewrite(mapped, {"w": state["w"], "step": 2})
        True
        >>> read_from(mapped)["w"].tolist(), read_from(mapped)["step"]
        ([2.0, 2.0, 2.0], 2)
        >>> rewrite(mapped, {"w": torch.zeros(4), "step": 3})  # another shape: a new file
        False
    """
    view = memoryview(buffer)
    room, data = _header_span(view)
    layout = _layout(state)
    if len(layout.header) > room or layout.refs != (refs or _refs_of(view)):
        return False
    base = torch.frombuffer(view, dtype=torch.uint8, count=1).data_ptr() + data
    for tensor, ref in zip(layout.tensors, layout.refs, strict=True):
        if ref.nbytes and (tensor.data_ptr() != base + ref.offset or not tensor.is_contiguous()):
            _view_of(view, data, ref).copy_(tensor)  # not trained in place there
    start = len(MAGIC) + _LENGTH.size
    view[start : start + len(layout.header)] = layout.header
    view[start + len(layout.header) : start + room] = bytes(room - len(layout.header))
    return True


def write(state: Any, path: str) -> None:
    """Write ``state`` to the file ``path`` (not atomically: see ``training.save_state``)."""
    with open(path, "wb") as f:
        write_to(state, f)


def read(path: str) -> Any:
    """A state written by :func:`write`, its tensors views of a private copy of the file's bytes
    (a state file may be written over in place later: see :mod:`cerebro.turns`)."""
    return read_from(read_bytes(path))


def read_mapped(path: str) -> Any | None:
    """A state written by :func:`write`, its tensors views of the file mapped copy-on-write
    (its pages read when used), or None where the file is not in this format: for files that
    are never written over in turns (a handover slot, whose users track its writes; see
    :mod:`cerebro.backends.slots`)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    if not is_statefile(buffer[: len(MAGIC)]):
        return None
    return read_from(buffer)


def read_bytes(path: str) -> bytearray:
    """The bytes of the file ``path`` (a state file of either format), read as
    :func:`cerebro.turns.open_current` makes sure they are whole."""
    with turns.open_current(path) as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        if f.readinto(memoryview(buffer)) != size:
            raise EOFError(f"state file {path} changed while it was read")
    return buffer


def read_header(path: str) -> Any | None:
    """The state in the file ``path`` without its tensors' bytes (each tensor a reference to
    them), or None where the file is not in this format: what a caller that wants the counters
    alone reads of it. A file too short for its tensors raises EOFError, as :func:`read` does."""
    with turns.open_current(path) as f:
        start = len(MAGIC) + _LENGTH.size
        head = f.read(start)
        if not is_statefile(head):
            return None
        if len(head) < start:
            raise EOFError(f"state file {path} is truncated")
        (length,) = _LENGTH.unpack(head[len(MAGIC) :])
        skeleton = _Unpickler(io.BytesIO(f.read(length))).load()
        size = os.fstat(f.fileno()).st_size
    data = _aligned(start + length)
    if any(data + ref.offset + ref.nbytes > size for ref in _leaves(skeleton, _TensorRef)):
        raise EOFError(f"state file {path} is truncated")
    return skeleton


def read_from(buffer: Any) -> Any:
    """A state from the bytes of a state file (``bytes`` or a writable mapping)."""
    return read_with_refs(buffer)[0]


def read_with_refs(buffer: Any) -> tuple[Any, tuple[Any, ...]]:
    """:func:`read_from`'s state, and where its tensors are (for :func:`rewrite`)."""
    view = memoryview(buffer)
    if view.readonly:
        view = memoryview(bytearray(view))
    refs: list[_TensorRef] = []
    state = _fill(_skeleton(view), view, refs)
    return state, tuple(refs)


def header_of(buffer: Any) -> bytes:
    """The header of the state file in ``buffer`` (with its room): every state written over a
    file in place (:func:`rewrite`) changes it, since it records the state's hops."""
    _, data = _header_span(memoryview(buffer))
    return bytes(buffer[:data])


def _header_span(view: memoryview) -> tuple[int, int]:
    """The header's room (bytes) and where the tensors' bytes begin."""
    if not is_statefile(bytes(view[: len(MAGIC)])):
        raise pickle.UnpicklingError("not a cerebro state file (no magic line)")
    start = len(MAGIC) + _LENGTH.size
    if len(view) < start:
        raise EOFError("state file is truncated")
    (length,) = _LENGTH.unpack(view[len(MAGIC) : start])
    return length, _aligned(start + length)


def _skeleton(view: memoryview) -> Any:
    length, _ = _header_span(view)
    start = len(MAGIC) + _LENGTH.size
    # The pickle ends at its STOP opcode: the room after it is ignored.
    return _Unpickler(io.BytesIO(view[start : start + length])).load()


def _refs_of(view: memoryview) -> tuple[_TensorRef, ...]:
    return tuple(_leaves(_skeleton(view), _TensorRef))


def _view_of(view: memoryview, data: int, ref: _TensorRef) -> torch.Tensor:
    begin = data + ref.offset
    if begin + ref.nbytes > len(view):
        raise EOFError("state file is truncated")
    dtype = _dtype(ref.dtype)
    if not ref.nbytes:
        return torch.empty(ref.shape, dtype=dtype)
    raw = torch.frombuffer(view, dtype=torch.uint8, count=ref.nbytes, offset=begin)
    return raw.view(dtype).view(ref.shape)


def _fill(skeleton: Any, view: memoryview, refs: list[_TensorRef]) -> Any:
    _, data = _header_span(view)

    def fill(value: Any) -> Any:
        if isinstance(value, _TensorRef):
            refs.append(value)
            return _view_of(view, data, value)
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


_PLAIN = frozenset({int, float, str, bool, type(None)})

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
