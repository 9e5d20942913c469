"""JSON for metric states and summaries.

Per-shard metric states are written to disk and merged later, possibly on another machine,
so arrays travel as base64 of their little-endian bytes: exact and compact. Summaries and
reports are strict JSON: :func:`json_safe` turns what JSON cannot hold into null.
"""

from __future__ import annotations

import base64
import math
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


def json_safe(value: Any, max_list: int | None = None, *, see: str | None = None) -> Any:
    """A strict-JSON copy: numpy scalars and arrays become Python numbers and lists,
    non-finite floats become None, and lists longer than ``max_list`` are replaced by a note
    (pointing to ``see``, where the full data are)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): json_safe(v, max_list, see=see) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if max_list is not None and len(value) > max_list:
            return {"omitted": f"list of {len(value)} items" + (f", see {see}" if see else "")}
        return [json_safe(v, max_list, see=see) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
