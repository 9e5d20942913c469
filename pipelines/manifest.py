"""Per-shard manifests: one Parquet file per input shard listing every input sample once.

A manifest is written after its shard's data are committed, atomically, and carries in its
schema metadata the fingerprint of the run configuration and a ``complete`` flag. A shard is
skipped on resume only when its manifest is readable, complete and has the same fingerprint, so
a crash, a damaged file or a changed configuration all lead to the shard being redone.

Manifests are deterministic except for the ``seconds`` and ``timings`` columns, which measure
the run; nothing else in them (no write time, no host name) changes between identical runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from veil.pipelines.faults import fault_point
from veil.pipelines.sinks import RELEASABLE_STATUSES, output_error
from veil.pipelines.storage import TEMP_MARKER, OutputStore, as_store
from veil.transforms.pairing import public_region
from veil.transforms.stage import PENDING, Sample

MANIFEST_VERSION = "1"
MANIFEST_DIR = "manifest"

MANIFEST_SCHEMA: pa.Schema = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("n_faces", pa.int32()),
    pa.field("regions", pa.string()),  # JSON list of region dicts
    pa.field("region_counts", pa.string()),  # JSON {kind: n}
    pa.field("method", pa.string()),
    pa.field("params", pa.string()),  # JSON
    pa.field("epsilon", pa.float64()),
    pa.field("input_sha256", pa.string()),
    pa.field("output_sha256", pa.string()),  # null unless released
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("output_path", pa.string()),  # null unless released
    pa.field("seconds", pa.float64()),  # total over stages
    pa.field("timings", pa.string()),  # JSON {stage: seconds}
    pa.field("rescan_rounds", pa.int32()),
    pa.field("max_score", pa.float64()),
    # JSON {entity type: n} of PII spans redacted from the sample's text fields (never values)
    pa.field("redactions", pa.string()),
])

#: Top-level config keys that do not change what a finished shard contains: how the run is
#: executed and reported, where it writes, and when it gives up.
FINGERPRINT_EXCLUDE: tuple[str, ...] = (
    "runner", "progress", "ray_address", "beam_options", "workers", "batch_size", "output",
    "max_failure_ratio", "min_samples_for_abort", "gates",
)


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays, tuples-as-lists, sets and paths found in regions/params."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: the same value always gives the same text (and hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default,
                      ensure_ascii=False)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    return int(value)


def manifest_row(sample: Sample) -> dict[str, Any]:
    """The manifest row of a processed sample. Missing fields give nulls (unknown), except
    ``status`` (``pending``), ``reason`` ("") and ``rescan_rounds`` (0). Output hash and path
    are only kept for released samples, so a quarantined row never points at data."""
    status = sample.get("status") or PENDING
    released = status in RELEASABLE_STATUSES
    regions = sample.get("regions")
    counts: dict[str, int] | None = None
    n_faces: int | None = None
    scores: list[float] = []
    if regions is not None:
        counts = {}
        for region in regions:
            if region.get("redetected"):
                continue  # the same face found again by the re-scan: counted once
            kind = str(region.get("kind") or "face")
            counts[kind] = counts.get(kind, 0) + 1
            score = region.get("score")
            if score is not None and not math.isnan(float(score)):
                scores.append(float(score))
        n_faces = counts.get("face", 0)
    timings = sample.get("timings") or {}
    max_score = sample.get("max_score")
    if max_score is None and scores:
        max_score = max(scores)
    params = sample.get("params")
    return {
        "key": str(sample.get("__key__", "")),
        "shard": str(sample.get("__shard__", "")),
        "source": None if sample.get("__source__") is None else str(sample["__source__"]),
        "index": _opt_int(sample.get("__index__")),
        "status": str(status),
        "reason": str(sample.get("reason") or ""),
        "n_faces": n_faces,
        # Pairing records lose the pool face they name (veil.transforms.pairing.public_region).
        "regions": None if regions is None else canonical_json([public_region(r) for r in regions]),
        "region_counts": None if counts is None else canonical_json(counts),
        "method": sample.get("method"),
        "params": None if params is None else canonical_json(params),
        "epsilon": _opt_float(sample.get("epsilon")),
        "input_sha256": sample.get("input_sha256"),
        "output_sha256": sample.get("output_sha256") if released else None,
        "width": _opt_int(sample.get("width")),
        "height": _opt_int(sample.get("height")),
        "output_path": sample.get("output_path") if released else None,
        "seconds": float(sum(float(v) for v in timings.values())),
        "timings": canonical_json(timings),
        "rescan_rounds": int(sample.get("rescan_rounds") or 0),
        "max_score": _opt_float(max_score),
        "redactions": (None if sample.get("redactions") is None
                       else canonical_json(dict(sample["redactions"]))),
    }


def manifest_relative(shard_id: str) -> str:
    """``manifest/<shard id with '/' as '__'>.parquet``: one flat folder of manifests."""
    return f"{MANIFEST_DIR}/{shard_id.replace('/', '__')}.parquet"


def manifest_path(output_root: str | Path, shard_id: str) -> Path:
    """A local output's manifest file of ``shard_id``."""
    return Path(output_root) / manifest_relative(shard_id)


def write_manifest(output_root: str | Path | OutputStore, shard_id: str, rows: Iterable[Mapping[str, Any]], *,
                   run_fingerprint: str, extra: Mapping[str, Any] | None = None) -> Path | str:
    """Write a shard's manifest atomically; returns its path (its URL on an object store).

    Keys must be unique (each input sample appears exactly once). ``extra`` goes into the
    schema metadata (values JSON-encoded unless strings); keep it free of timestamps so that
    reruns give the same file.
    """
    rows = list(rows)
    for row in rows:
        if not isinstance(row.get("key"), str) or not row["key"]:
            raise ValueError(f"manifest for {shard_id}: row without a key: {dict(row)}")
        if row.get("shard") != shard_id:
            raise ValueError(f"manifest for {shard_id}: row {row['key']!r} belongs to shard "
                             f"{row.get('shard')!r}")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
        raise ValueError(f"manifest for {shard_id}: duplicate keys {dupes[:5]}")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    metadata = {
        "veil_manifest_version": MANIFEST_VERSION,
        "run_fingerprint": run_fingerprint,
        "complete": "true",
        "n_rows": str(table.num_rows),
        "shard_id": shard_id,
    }
    for name, value in sorted((extra or {}).items()):
        if name in metadata:
            raise ValueError(f"manifest metadata key {name!r} is reserved")
        metadata[name] = value if isinstance(value, str) else canonical_json(value)
    table = table.replace_schema_metadata(metadata)

    store = as_store(output_root)
    final = manifest_relative(shard_id)
    # The manifest is the shard's commit record: staged whole, then published in one step
    # (a rename on disk, one PUT on an object store), after the shard's data.
    tmp = store.staging_file(final)
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("manifest:tmp")
        store.publish(tmp, final)
    except BaseException as exc:
        store.discard(tmp)
        if isinstance(exc, OSError):
            raise output_error(exc, store.display(final)) from exc
        raise
    store.sync(MANIFEST_DIR)
    fault_point("manifest:done")
    return store.local_path(final) if store.is_local else store.display(final)


def remove_manifest(output_root: str | Path | OutputStore, shard_id: str) -> None:
    """Withdraw a shard's manifest before its data are replaced, durably, so that at every
    moment a manifest on disk describes the data next to it (a kill between the data rename
    and the new manifest leaves no manifest, and the shard is redone)."""
    store = as_store(output_root)
    relative = manifest_relative(shard_id)
    try:
        if not store.delete(relative):
            return
    except OSError as exc:
        raise output_error(exc, store.display(relative)) from exc
    store.sync(MANIFEST_DIR)


def read_manifest(path: str | Path) -> pa.Table:
    """One manifest, with its metadata."""
    return pq.read_table(path)


def read_shard_manifest(output_root: str | Path | OutputStore, shard_id: str) -> pa.Table:
    """The manifest of ``shard_id`` in any store, with its metadata."""
    return _read_parquet(as_store(output_root), manifest_relative(shard_id), pq.read_table)


def _read_parquet(store: OutputStore, relative: str, reader: Any) -> Any:
    """``reader`` (``pq.read_table``, ``pq.read_metadata``) applied to a file of the store:
    by path on a local disk (memory-mapped reads), through a file object elsewhere."""
    if store.is_local:
        return reader(store.local_path(relative))
    with store.open_read(relative) as handle:
        return reader(handle)


def _manifest_files(store: OutputStore) -> list[str]:
    return [f for f in store.list_files(MANIFEST_DIR)
            if f.endswith(".parquet") and f.count("/") == 1 and TEMP_MARKER not in f]


def iter_manifests(output_root: str | Path | OutputStore) -> Iterator[pa.Table]:
    """Each shard's manifest in turn (schema metadata dropped), for reports that stream."""
    store = as_store(output_root)
    for relative in _manifest_files(store):
        try:
            table = _read_parquet(store, relative, pq.read_table)
        except Exception as exc:
            raise ValueError(f"manifest {store.display(relative)} is unreadable ({exc}); delete it "
                             f"to redo its shard") from exc
        table = table.replace_schema_metadata(None)
        for name in MANIFEST_SCHEMA.names:
            if name not in table.column_names:  # a manifest from before the column existed
                table = table.append_column(name, pa.nulls(table.num_rows, MANIFEST_SCHEMA.field(name).type))
        yield table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)


def read_manifests(output_root: str | Path | OutputStore) -> pa.Table:
    """All manifests concatenated (an empty table with the schema when there are none)."""
    tables = list(iter_manifests(output_root))
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def is_shard_complete(output_root: str | Path | OutputStore, shard_id: str, run_fingerprint: str, *,
                      files: set[str] | frozenset[str] | None = None) -> bool:
    """True when the shard's manifest exists, reads, is marked complete, has the expected row
    count, was written by a run with this fingerprint, and the released files it lists are
    there (in ``files``, a listing of the output, when given: one listing instead of a request
    per file on an object store). Never raises for a bad file: a damaged manifest just means
    the shard is redone."""
    store = as_store(output_root)
    relative = manifest_relative(shard_id)
    try:
        if store.is_local and not store.local_path(relative).is_file():
            return False
        meta = _read_parquet(store, relative, pq.read_metadata)
        kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
        # A manifest without its data (deleted, or lost with a crashed disk cache) does not
        # make a shard committed.
        outputs = [o for o in kv.get("outputs", "").split(",") if o]
        return (
            kv.get("complete") == "true"
            and kv.get("run_fingerprint") == run_fingerprint
            and kv.get("shard_id") == shard_id
            and kv.get("n_rows") == str(meta.num_rows)
            and all((o in files) if files is not None else store.exists(o) for o in outputs)
        )
    except Exception:  # noqa: BLE001 - unreadable means incomplete
        return False


def run_fingerprint(config_dict: Mapping[str, Any],
                    exclude: Iterable[str] = FINGERPRINT_EXCLUDE) -> str:
    """sha256 of the canonical JSON of the config parts that change outputs.

    ``exclude`` names top-level keys that do not (runner, workers, output...). Callers should
    add anything else that changes outputs but is not config, such as the Veil version and
    model file hashes, to ``config_dict`` before hashing.
    """
    excluded = set(exclude)
    kept = {k: v for k, v in config_dict.items() if k not in excluded}
    return hashlib.sha256(canonical_json(kept).encode("utf-8")).hexdigest()
