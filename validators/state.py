"""JSON-able, exact encoding of the numpy arrays inside mergeable metric states.

Per-shard metric states are written to disk and merged later, possibly on another machine,
so arrays travel as base64 of their little-endian bytes: exact and compact.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    """Encode ``array`` as ``dtype`` in little-endian base64 bytes."""
    arr = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`; returns a writable array in native byte order."""
    raw = base64.b64decode(payload["b64"])
    arr = np.frombuffer(raw, dtype=np.dtype(payload["dtype"]).newbyteorder("<"))
    return arr.reshape(payload["shape"]).astype(payload["dtype"])
