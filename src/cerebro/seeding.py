"""Derived seeds: one independent 63-bit seed for every (experiment seed, purpose, ids...) tuple.

Seeds are derived with NumPy's SeedSequence so that streams for different models, epochs and
shards are statistically independent and do not depend on the order in which they are asked for.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, *ids: int) -> int:
    """Return a seed in [0, 2**63) determined only by the arguments.

    >>> derive_seed(0, "shuffle", 3, 1, 2) == derive_seed(0, "shuffle", 3, 1, 2)
    True
    """
    tag = zlib.crc32(purpose.encode())
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, tag, *(int(i) for i in ids)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF
