"""Work units: a large shard is read as ranges of samples and handed to workers one I/O batch
at a time, so every worker is busy within one shard, while the release stays the local
runner's (same shard names, one manifest per input shard, same bytes)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import jpeg_bytes, write_tar

from veil.transforms.stage import ANONYMIZED, Resources, Sample, Stage, is_quarantined, quarantine


def _img(rng: np.random.Generator) -> bytes:
    return jpeg_bytes(rng.integers(0, 255, (18, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """One folder shard and one tar shard of 13 samples each: sidecars, a sample that does
    not decode, and (folder) a file that belongs to no sample."""
    root = tmp_path_factory.mktemp("units-in")
    rng = np.random.default_rng(7)
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        where = folder / "sub" if i % 3 == 0 else folder
        (where / f"p{i:02d}.jpg").write_bytes(_img(rng))
        if i % 4 == 0:
            (where / f"p{i:02d}.json").write_text(json.dumps({"i": i}))
    (folder / "p05-bad.jpg").write_bytes(b"\xff\xd8not a jpeg")
    (folder / "notes.txt").write_text("never released")
    tar = root / "big-000.tar"
    write_tar(tar, [(f"t{i:02d}", {"jpg": _img(rng), "txt": f"t{i}".encode()}) for i in range(12)]
              + [("t99-bad", {"jpg": b"\xff\xd8garbage"})])
    return {"folder": str(folder), "tar": str(tar)}


def _summary(samples: list[Sample]) -> list[tuple]:
    return [(s["__key__"], s["__index__"], s["status"], s.get(s["__image__"]) if s["__image__"] else None,
             s["__fields__"]) for s in samples]


# ------------------------------------------------------------------------------ reading


def test_folder_units_read_exactly_like_the_whole_shard(inputs):
    from veil.pipelines.sources import FolderSource, WorkUnit

    source = FolderSource(inputs["folder"])
    (shard,) = source.list_shards()
    units = source.work_units(shard, 5)
    assert [(u.start, u.stop) for u in units] == [(0, 5), (5, 10), (10, None)]
    assert [u.last for u in units] == [False, False, True]
    whole = list(source.read_shard(shard))
    assert len(whole) == 13
    assert _summary([s for u in units for s in source.read_unit(u)]) == _summary(whole)
    assert source.work_units(shard, 13) == [WorkUnit(shard)]  # small enough: one unit


def test_tar_shard_is_one_unit_and_refuses_ranges(inputs):
    from veil.pipelines.sources import TarSource, WorkUnit

    source = TarSource([inputs["tar"]])
    (shard,) = source.list_shards()
    assert source.work_units(shard, 2) == [WorkUnit(shard)]
    with pytest.raises(ValueError, match="whole shards only"):
        list(source.read_unit(WorkUnit(shard, 2, 4)))


def test_unit_batches_end_the_shard_once(inputs, monkeypatch):
    from veil.pipelines import runners
    from veil.pipelines.execution import is_end_marker, work_unit_batches
    from veil.pipelines.sources import FolderSource

    monkeypatch.setattr(runners, "READ_UNIT_BATCHES", 4)
    source = FolderSource(inputs["folder"])
    units = runners.work_units(source.list_shards(), source, 2)
    assert len(units) == 2 and units[0].stop == 8
    batches = [b for u in units for b in work_unit_batches(source, u, 2)]
    assert all(len(b) <= 2 for b in batches)
    flat = [s for b in batches for s in b]
    assert [is_end_marker(s) for s in flat].count(True) == 1 and is_end_marker(flat[-1])
    assert [s["__index__"] for s in flat[:-1]] == list(range(13))


def test_a_failing_unit_is_quarantined_under_a_key_of_its_own(inputs, monkeypatch):
    from veil.pipelines.execution import is_end_marker, read_unit_with_end_marker
    from veil.pipelines.sources import FolderSource

    source = FolderSource(inputs["folder"])
    (shard,) = source.list_shards()
    units = source.work_units(shard, 5)

    def broken(unit):
        yield from FolderSource.read_unit(source, unit)
        raise OSError("disk went away")

    monkeypatch.setattr(source, "read_unit", broken)
    out = [s for u in units for s in read_unit_with_end_marker(source, u)]
    errors = [s for s in out if str(s.get("__key__")).startswith(f"{shard.id}#read_error")]
    assert len(errors) == 3 and len({s["__key__"] for s in errors}) == 3
    assert all(s["status"] == "quarantined" and "disk went away" in s["reason"] for s in errors)
    assert [is_end_marker(s) for s in out].count(True) == 1


# ------------------------------------------------------------------------------ runs


class InvertStage(Stage):
    """A cheap stand-in for the model chain: decode, invert, encode; records its worker."""

    name = "invert"
    resources = Resources(cpus=1)
    batch_size = 2

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from PIL import Image

        for s in batch:
            s["__pid__"] = os.getpid()  # a dunder field: never written to the release
            if is_quarantined(s):
                continue
            try:
                rgb = np.asarray(Image.open(io.BytesIO(s[s["__image__"]])).convert("RGB"))
            except Exception as exc:  # noqa: BLE001
                quarantine(s, f"decode_error: {type(exc).__name__}")
                continue
            buf = io.BytesIO()
            Image.fromarray(255 - rgb).save(buf, format="JPEG", quality=90)
            s[s["__image__"]] = buf.getvalue()
            s["status"] = ANONYMIZED
            s["method"] = "invert"
        return batch


def run_chain(runner, spec: str, out: Path, *, batch_size: int = 2) -> list[Sample]:
    from veil.pipelines.execution import StageChain
    from veil.pipelines.runners import RunContext
    from veil.pipelines.sources import open_source

    source = open_source(spec)
    seen: list[Sample] = []
    ctx = RunContext(source=source, chain=StageChain([InvertStage()]), output=out,
                     fingerprint="units-test", batch_size=batch_size, workers=2,
                     on_sample=seen.append, on_shard=lambda r: None)
    runner.run(source.list_shards(), ctx)
    return seen


def release(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "data").rglob("*")) if p.is_file()}


def manifests(out: Path) -> list[dict]:
    from veil.pipelines.manifest import read_manifests

    rows = read_manifests(out).to_pylist()
    for r in rows:
        r.pop("timings", None)
        r.pop("seconds", None)
    return sorted(rows, key=lambda r: (r["shard"], r["index"]))


@pytest.fixture(scope="module")
def ray_by_value(ray_local):
    # Ray workers cannot import this test module: ship its stage by value.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_ray_reads_one_block_per_io_batch(inputs, ray_by_value, monkeypatch):
    from veil.pipelines import runners
    from veil.pipelines.runners import ray_read_dataset
    from veil.pipelines.sources import open_source

    monkeypatch.setattr(runners, "READ_UNIT_BATCHES", 2)  # the folder: four read tasks
    for spec in (inputs["folder"], inputs["tar"]):
        source = open_source(spec)
        ds = ray_read_dataset(source.list_shards(), source, 2).materialize()
        # 13 samples and the end marker in batches of 2: seven blocks of one batch each.
        assert ds.num_blocks() == 7, spec
        assert ds.count() == 7
    assert ray_by_value.data.DataContext.get_current().target_max_block_size > 1  # put back


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_ray_splits_one_large_shard_and_releases_the_local_bytes(kind, inputs, tmp_path, ray_by_value,
                                                                  monkeypatch):
    from veil.pipelines import runners
    from veil.pipelines.runners import LocalRunner, RayRunner

    monkeypatch.setattr(runners, "READ_UNIT_BATCHES", 2)  # the folder: four read tasks

    local = run_chain(LocalRunner(), inputs[kind], tmp_path / "local")
    ray = run_chain(RayRunner(), inputs[kind], tmp_path / "ray")
    # Batches finish in any order on Ray; the shard is put back in input order when written.
    assert sorted(s["__key__"] for s in ray) == sorted(s["__key__"] for s in local)
    assert all(set(s) == {"__key__", "__shard__", "status", "reason"} for s in ray)  # no pixels
    assert release(tmp_path / "ray") == release(tmp_path / "local")
    assert manifests(tmp_path / "ray") == manifests(tmp_path / "local")
    assert len(list((tmp_path / "ray" / "manifest").rglob("*.parquet"))) == 1  # one input shard
    assert {s["__pid__"] for s in local} == {os.getpid()}
