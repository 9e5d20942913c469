"""Manifests: rows from samples, atomic deterministic files, and safe resume decisions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veil.config import RunConfig
from veil.pipelines.manifest import (
    MANIFEST_SCHEMA,
    is_shard_complete,
    manifest_path,
    manifest_row,
    read_manifest,
    read_manifests,
    run_fingerprint,
    write_manifest,
)
from veil.pipelines.sinks import TEMP_MARKER

FP = "f" * 64


def released(key: str = "a", shard: str = "shard-000.tar", index: int = 0) -> dict:
    return {
        "__key__": key, "__shard__": shard, "__index__": index, "__source__": f"{key}.jpg",
        "__image__": "jpg", "jpg": b"bytes", "status": "anonymized", "reason": "",
        "regions": [
            {"kind": "face", "box": [np.int64(1), 2, 3, 4], "score": np.float32(0.75),
             "landmarks": np.zeros((2, 2)), "detector": "centerface"},
            {"kind": "face", "box": [5, 6, 7, 8], "score": 0.5, "landmarks": None, "detector": "yunet"},
            {"kind": "plate", "box": [0, 0, 1, 1], "score": 0.9, "landmarks": None, "detector": "x"},
        ],
        "method": "dp-pixelate", "params": {"b": 16, "m": 16}, "epsilon": 0.5,
        "input_sha256": "1" * 64, "output_sha256": "2" * 64, "width": 640, "height": 480,
        "output_path": "data/shard-000.tar", "timings": {"decode": 0.25, "detect": 0.5},
        "rescan_rounds": 1,
    }


def test_manifest_row_from_a_released_sample():
    row = manifest_row(released())
    assert set(row) == set(MANIFEST_SCHEMA.names)
    assert row["n_faces"] == 2
    assert json.loads(row["region_counts"]) == {"face": 2, "plate": 1}
    regions = json.loads(row["regions"])
    assert regions[0]["box"] == [1, 2, 3, 4] and regions[0]["landmarks"] == [[0.0, 0.0], [0.0, 0.0]]
    assert row["max_score"] == pytest.approx(0.9)
    assert row["seconds"] == pytest.approx(0.75)
    assert json.loads(row["params"]) == {"b": 16, "m": 16}
    assert (row["output_sha256"], row["output_path"]) == ("2" * 64, "data/shard-000.tar")
    assert (row["width"], row["height"], row["epsilon"], row["rescan_rounds"]) == (640, 480, 0.5, 1)


def test_manifest_row_quarantined_and_sparse_samples():
    sample = released()
    sample.update(status="quarantined", reason="rescan_failed: face still found")
    row = manifest_row(sample)
    assert row["output_sha256"] is None and row["output_path"] is None  # never points at data
    assert row["reason"] == "rescan_failed: face still found"

    bare = manifest_row({"__key__": "k#truncated", "__shard__": "s.tar", "status": "quarantined",
                         "reason": "truncated_tar: ..."})
    assert bare["n_faces"] is None and bare["regions"] is None and bare["region_counts"] is None
    assert bare["method"] is None and bare["epsilon"] is None and bare["max_score"] is None
    assert bare["seconds"] == 0.0 and bare["timings"] == "{}" and bare["rescan_rounds"] == 0
    assert manifest_row({"__key__": "x", "regions": []})["n_faces"] == 0


def test_write_read_round_trip_and_determinism(tmp_path):
    rows = [manifest_row(released("a", "sub/p.parquet", 0)),
            manifest_row(released("b", "sub/p.parquet", 1))]
    path = write_manifest(tmp_path, "sub/p.parquet", rows, run_fingerprint=FP,
                          extra={"veil_version": "0.1.0", "counts": {"anonymized": 2}})
    assert path == tmp_path / "manifest" / "sub__p.parquet.parquet" == manifest_path(tmp_path, "sub/p.parquet")
    table = read_manifest(path)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert table.to_pylist() == rows
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["run_fingerprint"] == FP and meta["complete"] == "true"
    assert meta["n_rows"] == "2" and meta["shard_id"] == "sub/p.parquet"
    assert meta["veil_manifest_version"] == "1" and json.loads(meta["counts"]) == {"anonymized": 2}
    assert [p.name for p in path.parent.iterdir()] == ["sub__p.parquet.parquet"]

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(tmp_path, "sub/p.parquet", rows, run_fingerprint=FP,
                   extra={"counts": {"anonymized": 2}, "veil_version": "0.1.0"})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_write_manifest_rejects_inconsistent_rows(tmp_path):
    row = manifest_row(released("a"))
    with pytest.raises(ValueError, match="duplicate keys"):
        write_manifest(tmp_path, "shard-000.tar", [row, row], run_fingerprint=FP)
    with pytest.raises(ValueError, match="belongs to shard"):
        write_manifest(tmp_path, "other.tar", [row], run_fingerprint=FP)
    with pytest.raises(ValueError, match="reserved"):
        write_manifest(tmp_path, "shard-000.tar", [row], run_fingerprint=FP, extra={"complete": "x"})
    assert not (tmp_path / "manifest" / "shard-000.tar.parquet").exists()


def test_is_shard_complete(tmp_path):
    shard = "shard-000.tar"
    assert not is_shard_complete(tmp_path, shard, FP)  # no manifest yet
    path = write_manifest(tmp_path, shard, [manifest_row(released())], run_fingerprint=FP)
    assert is_shard_complete(tmp_path, shard, FP)
    assert not is_shard_complete(tmp_path, shard, "0" * 64)  # another config: redo

    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    assert not is_shard_complete(tmp_path, shard, FP)
    path.write_bytes(b"garbage")
    assert not is_shard_complete(tmp_path, shard, FP)
    path.write_bytes(b"")
    assert not is_shard_complete(tmp_path, shard, FP)

    table = pa.Table.from_pylist([manifest_row(released())], schema=MANIFEST_SCHEMA)
    for meta in ({"run_fingerprint": FP, "complete": "false", "n_rows": "1", "shard_id": shard},
                 {"run_fingerprint": FP, "complete": "true", "n_rows": "2", "shard_id": shard},
                 {"run_fingerprint": FP, "complete": "true", "n_rows": "1", "shard_id": "x.tar"}):
        pq.write_table(table.replace_schema_metadata(meta), path)
        assert not is_shard_complete(tmp_path, shard, FP), meta


def test_read_manifests(tmp_path):
    empty = read_manifests(tmp_path)
    assert empty.num_rows == 0 and empty.schema == MANIFEST_SCHEMA
    (tmp_path / "manifest").mkdir()
    assert read_manifests(tmp_path).num_rows == 0

    write_manifest(tmp_path, "b.tar", [manifest_row(released("x", "b.tar"))], run_fingerprint=FP)
    write_manifest(tmp_path, "a.tar", [manifest_row(released("y", "a.tar", 0)),
                                       manifest_row(released("z", "a.tar", 1))],
                   run_fingerprint="other")
    (tmp_path / "manifest" / f"c.tar.parquet{TEMP_MARKER}1-ab").write_bytes(b"half written")
    table = read_manifests(tmp_path)
    assert table.column("key").to_pylist() == ["y", "z", "x"]
    assert table.schema == MANIFEST_SCHEMA

    (tmp_path / "manifest" / "d.tar.parquet").write_bytes(b"broken")
    with pytest.raises(ValueError, match="d.tar.parquet"):
        read_manifests(tmp_path)


def test_run_fingerprint_covers_only_output_changing_config():
    base = RunConfig(input="in/", output="out/").to_dict()
    fp = run_fingerprint(base)
    assert len(fp) == 64
    for key, value in [("runner", "beam"), ("workers", 3), ("batch_size", 4), ("output", "o2"),
                       ("progress", False), ("ray_address", "ray://x:1"), ("beam_options", ["--a"])]:
        assert run_fingerprint(dict(base, **{key: value})) == fp, key
    assert run_fingerprint(dict(reversed(list(base.items())))) == fp  # key order is irrelevant
    changed = RunConfig(input="in/", output="out/", seed=1).to_dict()
    assert run_fingerprint(changed) != fp
    deeper = RunConfig.from_dict(dict(base, anonymize=dict(base["anonymize"], epsilon=1.0))).to_dict()
    assert run_fingerprint(deeper) != fp
    assert run_fingerprint(dict(base, input="elsewhere/")) != fp
    assert run_fingerprint(base, exclude=()) != fp
