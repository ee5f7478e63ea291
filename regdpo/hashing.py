"""Stable hashes of small values: the short key of a JSON-able value, and seeds derived from parts.

Stable: the same in every process, on every machine and Python version (never `hash()`, which
salts strings per process), so a key or a seed written today names the same thing tomorrow.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def short_hash(value: Any) -> str:
    """16 hex digits of sha256 over `value` as JSON (keys sorted; what JSON cannot encode, such
    as a Path, as its str): the key of a unit, of a config section, of a stage's inputs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derive_seed(*parts: object, bits: int = 63) -> int:
    """A `bits`-bit seed from parts (ints, names, ids), stable across processes and machines.

    The parts are joined with ':' as text (so parts are ids and labels without ':' of their
    own, which is what every caller passes) and the first bytes of their sha256, big-endian,
    keep the low `bits` bits. A label first (`derive_seed(seed, "pair", step, i)`) keeps the
    draws of different purposes apart. 31 bits for seeds handed to samplers that take a
    32-bit int, 63 for torch generators.
    """
    if not 1 <= bits <= 256:
        raise ValueError(f"bits must be in [1, 256], got {bits}")
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:(bits + 7) // 8], "big") & ((1 << bits) - 1)
