"""What a prepared dataset was made from: a content hash of its source columns and the arguments
of the call, both kept in the manifest, so that :func:`cerebro.prepare_data` run again with the
same source and arguments reopens the dataset instead of refusing or rewriting it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pandas.api.types import infer_dtype


def source_fingerprint(columns: Mapping[str, np.ndarray], names: Sequence[str]) -> str:
    """A hash of the columns ``names`` as read: each one's name, dtype, shape and bytes.

    Only the columns the dataset is made of count, so a source that changed elsewhere still
    matches. One blake2b pass over each column's buffer: a 100 MB source takes a fraction of a
    second, with no per-row Python.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        values = columns[name]
        kind = values.dtype.str
        if values.dtype == object:
            # Python objects have no bytes of their own: hash their text, and the kind of values
            # pandas infers, so that 1 and "1" (same text) still differ.
            kind = f"object:{infer_dtype(values.reshape(-1), skipna=False)}"
            values = values.astype(str)
        raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        header = [name, kind, values.dtype.str, list(values.shape), int(raw.size)]
        digest.update(json.dumps(header).encode())
        digest.update(raw.data)  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
    return digest.hexdigest()


def content_digest(content: bytes) -> str:
    """The digest that names a shard file's content (features computed from a shard are kept
    under it, so a shard that is the same bytes in another dataset version shares them).

    >>> content_digest(b"rows")
    'f2305e3ea413d261c40604673f9fbe7d'
    """
    return hashlib.blake2b(content, digest_size=16).hexdigest()


def differences(
    manifest: Mapping[str, Any], source: str, arguments: Mapping[str, Any]
) -> list[str]:
    """How the dataset of ``manifest`` differs from the one this call would prepare, each as a
    phrase that follows "prepared" ("with num_shards=4, now 8"); empty when it does not."""
    if "source_fingerprint" not in manifest or "arguments" not in manifest:
        return ["by an older version of cerebro, which did not record its source"]
    found = []
    if manifest["source_fingerprint"] != source:
        found.append("from different source data")
    before = manifest["arguments"]
    for key, now in arguments.items():
        if before.get(key) != now:
            found.append(f"with {key}={before.get(key)!r}, now {now!r}")
    return found
