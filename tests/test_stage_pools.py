"""Stage pools: a chain splits into CPU/GPU segments; Ray runs one actor pool per segment
(GPU actors on logical GPUs), Beam one DoFn per segment; all give the local runner's bytes."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import jpeg_bytes, write_tar

from veil.transforms.stage import ANONYMIZED, Resources, Sample, Stage, is_quarantined, quarantine

# ------------------------------------------------------------------------------ dummy stages


def _worker_info() -> dict:
    """Where this stage runs: pid, and the Ray actor and resources when inside Ray."""
    info: dict = {"pid": os.getpid()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id():  # in a Ray actor, not the driver
            info.update(actor=ctx.get_actor_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                        assigned=ctx.get_assigned_resources())
    return info


def _trace(sample: Sample, stage: str) -> None:
    # A dunder field: kept between segments and never written to the release.
    sample.setdefault("__trace__", []).append({"stage": stage, **_worker_info()})


class DecodeDummy(Stage):
    name = "decode_dummy"
    resources = Resources(cpus=1)
    batch_size = 2

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from PIL import Image

        for s in batch:
            _trace(s, self.name)
            if is_quarantined(s):
                continue
            try:
                s["_pixels"] = np.asarray(Image.open(io.BytesIO(s[s["__image__"]])).convert("RGB"))
                s["status"] = "pending"
            except Exception as exc:  # noqa: BLE001
                quarantine(s, f"decode_error: {type(exc).__name__}")
        return batch


class InvertOnGPU(Stage):
    """Stands in for FSAP: a stateful stage that asks for half a GPU per worker."""

    name = "invert_gpu"
    resources = Resources(cpus=1, gpus=0.5)
    batch_size = 3
    stateful = True

    def __init__(self, gpus: float = 0.5, fail_key: str | None = None) -> None:
        self.resources = Resources(cpus=1, gpus=gpus)
        self.fail_key = fail_key
        self.device: str | None = None

    def setup(self) -> None:
        self.device = "cuda" if _worker_info().get("gpu_ids") else "cpu"

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        assert self.device is not None, "setup() must run before the first batch"
        for s in batch:
            _trace(s, self.name)
            if s["__key__"] == self.fail_key:
                raise RuntimeError("model crashed")
            if is_quarantined(s):
                continue
            s["_mask"] = s["_pixels"][..., 0] > 127
            s["_pixels"] = 255 - s["_pixels"]
        return batch


class EncodeDummy(Stage):
    name = "encode_dummy"
    resources = Resources(cpus=1)
    batch_size = 4

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from PIL import Image

        for s in batch:
            _trace(s, self.name)
            if is_quarantined(s):
                continue
            if "_pixels" not in s or "_mask" not in s:
                quarantine(s, "lost_working_field: a working field did not reach the last segment")
                continue
            buf = io.BytesIO()
            Image.fromarray(s["_pixels"]).save(buf, format="JPEG", quality=90)
            s[s["__image__"]] = buf.getvalue()
            s["status"] = ANONYMIZED
            s["method"] = "invert"
            s["n_masked"] = int(s["_mask"].sum())
        return batch


class Nop(Stage):
    def __init__(self, name: str, gpus: float = 0.0) -> None:
        self.name = name
        self.resources = Resources(cpus=1, gpus=gpus)

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        return batch


def gpu_chain(**gpu_kw):
    from veil.pipelines.execution import StageChain

    return StageChain([DecodeDummy(), InvertOnGPU(**gpu_kw), EncodeDummy()])


# ------------------------------------------------------------------------------ segmentation


def test_segments_split_by_resource_shape():
    from veil.pipelines.execution import StageChain

    chain = StageChain([Nop("decode"), Nop("detect"), Nop("fsap", gpus=0.5), Nop("encode"), Nop("rescan")],
                       threads_per_worker=2)
    segments = chain.segments()
    assert [[s.name for s in seg.stages] for seg in segments] == [["decode", "detect"], ["fsap"],
                                                                  ["encode", "rescan"]]
    assert [seg.final for seg in segments] == [False, False, True]
    assert [seg.uses_gpus for seg in segments] == [False, True, False]
    assert segments[1].resources == Resources(cpus=1, gpus=0.5)
    assert all(seg.threads_per_worker == 2 for seg in segments)
    # No GPU stage: the chain itself, one fused unit, exactly as before.
    cpu_only = StageChain([Nop("decode"), Nop("detect"), Nop("encode")])
    assert cpu_only.segments() == [cpu_only]
    # Each GPU stage is a segment of its own, even next to another GPU stage.
    two = StageChain([Nop("a", gpus=1), Nop("b", gpus=0.5), Nop("c")]).segments()
    assert [[s.name for s in seg.stages] for seg in two] == [["a"], ["b"], ["c"]]
    assert StageChain([Nop("fsap", gpus=1)]).segments()[0].final


def _memory_batch() -> list[Sample]:
    """Samples as a source yields them, with end markers between shards (no files)."""
    from veil.pipelines.execution import END_MARKER

    rng = np.random.default_rng(0)
    out: list[Sample] = []
    for shard in ("s0", "s1"):
        for i in range(3):
            key = f"{shard}-{i}"
            out.append({"__key__": key, "__shard__": shard, "__index__": i, "__image__": "jpg",
                        "__fields__": ["jpg"], "status": "pending",
                        "jpg": jpeg_bytes(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))})
        out.append({END_MARKER: True, "__shard__": shard, "__count__": 3})
    out.insert(2, {"__key__": "s0-bad", "__shard__": "s0", "__index__": 9, "__image__": "jpg",
                   "__fields__": ["jpg"], "jpg": b"not a jpeg"})
    return out


def test_segments_carry_working_fields_and_markers_like_the_fused_chain():
    from veil.pipelines.execution import is_end_marker

    batch = _memory_batch()
    fused = gpu_chain()(copy.deepcopy(batch))

    segments = gpu_chain().segments()
    assert len(segments) == 3
    samples = copy.deepcopy(batch)
    for seg in segments[:-1]:
        samples = seg(samples)
        # Markers stay where they were; working fields survive into the next segment.
        assert [is_end_marker(s) for s in samples] == [is_end_marker(s) for s in batch]
        assert all("_pixels" in s for s in samples if not is_end_marker(s) and not is_quarantined(s))
        assert all(s.get("status") != ANONYMIZED for s in samples)  # nothing finished early
    assert "_mask" in samples[0]
    samples = segments[-1](samples)

    assert [is_end_marker(s) for s in samples] == [is_end_marker(s) for s in batch]
    assert not any(k.startswith("_") and not k.startswith("__") for s in samples for k in s)
    statuses = [s.get("status") for s in samples if not is_end_marker(s)]
    assert statuses.count(ANONYMIZED) == 6 and statuses.count("quarantined") == 1

    def strip(ss):
        return [{k: v for k, v in s.items() if k != "__trace__"} for s in ss]

    assert strip(samples) == strip(fused)


def test_unfinished_status_is_caught_only_at_the_end():
    from veil.pipelines.execution import StageChain

    first, last = StageChain([Nop("cpu"), Nop("gpu", gpus=1)]).segments()
    sample = {"__key__": "k", "__shard__": "s", "status": "pending", "_pixels": 1}
    assert first([sample])[0]["status"] == "pending"  # not the end yet: left alone
    out = last([sample])[0]
    assert out["status"] == "quarantined" and out["reason"].startswith("internal_error")
    assert "_pixels" not in out


# ------------------------------------------------------------------------------ Ray pool plan


def test_ray_pools_are_sized_from_the_cluster():
    from veil.pipelines.runners import plan_ray_pools

    segments = gpu_chain().segments()
    pools = plan_ray_pools(segments, cluster={"CPU": 2.0, "GPU": 2.0}, workers=None)
    assert [p.size for p in pools] == [2, 4, 2]  # 4 actors of 0.5 GPU on 2 GPUs
    assert [p.num_gpus for p in pools] == [0.0, 0.5, 0.0]
    # All actors of all pools fit on the CPUs, with room left for the read tasks.
    assert sum(p.size * p.num_cpus for p in pools) <= 2.0 - 0.5 + 1e-9
    capped = plan_ray_pools(segments, cluster={"CPU": 8.0, "GPU": 2.0}, workers=3)
    assert [p.size for p in capped] == [3, 3, 3]
    assert [p.size for p in plan_ray_pools(gpu_chain(gpus=0.3).segments(), cluster={"CPU": 4, "GPU": 0.9},
                                           workers=None)][1] == 3
    # No GPU stage: one pool with the CPUs it always had.
    cpu = plan_ray_pools([segments[0]], cluster={"CPU": 2.0}, workers=None)
    assert [(p.size, p.num_cpus, p.num_gpus) for p in cpu] == [(2, 0.75, 0.0)]


def test_gpu_segment_without_gpus_is_a_clear_error():
    from veil.config import ConfigError
    from veil.pipelines.runners import GPUUnavailableError, plan_ray_pools

    with pytest.raises(GPUUnavailableError, match="has none") as err:
        plan_ray_pools(gpu_chain().segments(), cluster={"CPU": 2.0}, workers=None)
    assert "--gpus-per-worker 0.5" in str(err.value) and "--ray-address" in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI prints it as a usage error, exit 2
    with pytest.raises(GPUUnavailableError, match="only 0.25"):
        plan_ray_pools(gpu_chain().segments(), cluster={"CPU": 2.0, "GPU": 0.25}, workers=None)


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two tiny shards: small random images and one that does not decode."""
    root = tmp_path_factory.mktemp("pools-in")
    rng = np.random.default_rng(1)

    def img() -> bytes:
        return jpeg_bytes(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8))

    write_tar(root / "p-000.tar", [(f"a{i}", {"jpg": img(), "txt": f"a{i}".encode()}) for i in range(5)])
    write_tar(root / "p-001.tar", [("b0", {"jpg": img()}), ("b-bad", {"jpg": b"\xff\xd8garbage"}),
                                   ("b2", {"jpg": img()}), ("b3", {"jpg": img()})])
    return str(root / "p-{000..001}.tar")


def run_chain(runner, pattern: str, out: Path, chain, *, workers: int | None = None) -> list[Sample]:
    from veil.pipelines.runners import RunContext
    from veil.pipelines.sources import open_source

    source = open_source(pattern)
    seen: list[Sample] = []
    ctx = RunContext(source=source, chain=chain, output=out, fingerprint="pools-test", batch_size=2,
                     workers=workers, on_sample=seen.append, on_shard=lambda r: None)
    runner.run(source.list_shards(), ctx)
    return seen


def release_digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "data").rglob("*")) if p.is_file()}


def manifest_rows(out: Path) -> list[dict]:
    from veil.pipelines.manifest import read_manifests

    rows = read_manifests(out).to_pylist()
    for r in rows:
        r.pop("timings", None)
        r.pop("seconds", None)
    return sorted(rows, key=lambda r: (r["shard"], r["index"]))


@pytest.fixture(scope="module")
def local_out(shards, tmp_path_factory) -> Path:
    from veil.pipelines.runners import LocalRunner

    out = tmp_path_factory.mktemp("pools-local")
    run_chain(LocalRunner(), shards, out, gpu_chain())
    rows = manifest_rows(out)
    assert [r["status"] for r in rows].count(ANONYMIZED) == 8, rows
    assert {r["key"]: r["status"] for r in rows}["b-bad"] == "quarantined"
    return out


@pytest.mark.slow
def test_ray_gpu_segment_without_gpus_fails_before_processing(shards, tmp_path, ray_local):
    from veil.pipelines.runners import GPUUnavailableError, RayRunner

    have = float(ray_local.cluster_resources().get("GPU", 0))
    chain = gpu_chain(gpus=have + 0.5) if have else gpu_chain()  # a real GPU host: ask for more
    out = tmp_path / "out"
    with pytest.raises(GPUUnavailableError, match="--ray-address"):
        run_chain(RayRunner(), shards, out, chain)
    assert not (out / "manifest").exists() and not (out / "data").exists()


@pytest.fixture(scope="module")
def ray_two_gpus():
    """A Ray node that declares 2 logical GPUs (no real GPU needed). Other tests share one
    2-CPU Ray (conftest ``ray_local``): it is restarted as it was afterwards."""
    ray = pytest.importorskip("ray")
    # Workers cannot import this test module: ship its dummy stages by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    was_running = ray.is_initialized()
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if was_running:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)


@pytest.mark.slow
def test_ray_runs_the_gpu_stage_in_its_own_gpu_pool(shards, local_out, tmp_path, ray_two_gpus):
    from veil.pipelines.runners import RayRunner, plan_ray_pools

    pools = plan_ray_pools(gpu_chain().segments(), cluster=ray_two_gpus.cluster_resources(), workers=None)
    assert [p.size for p in pools] == [2, 4, 2]
    out = tmp_path / "out-ray"
    seen = run_chain(RayRunner(), shards, out, gpu_chain())
    # The driver of a release gets statuses only (the workers write); where each stage ran is
    # read from the same pools streaming their samples back.
    from veil.pipelines.runners import RunContext
    from veil.pipelines.sources import open_source

    source = open_source(shards)
    ctx = RunContext(source=source, chain=gpu_chain(), output=tmp_path / "unused", fingerprint="",
                     batch_size=2, workers=None, on_sample=lambda s: None, on_shard=lambda r: None)
    streamed = [s for s in RayRunner().stream_samples(source.list_shards(), ctx) if "__trace__" in s]

    traces = [t for s in streamed for t in s["__trace__"]]
    gpu = [t for t in traces if t["stage"] == "invert_gpu"]
    cpu_pids = {t["pid"] for t in traces if t["stage"] != "invert_gpu"}
    assert len(gpu) == 9  # every sample that reached the stage (the bad one too, quarantined)
    assert all(t["gpu_ids"] and set(t["gpu_ids"]) <= {"0", "1"} for t in gpu)
    assert all(t["assigned"].get("GPU") == 0.5 for t in gpu)
    assert all(t["actor"] for t in traces)  # every stage ran in an actor, none in the driver
    assert not {t["pid"] for t in gpu} & cpu_pids  # GPU actors are processes of their own
    assert os.getpid() not in cpu_pids | {t["pid"] for t in gpu}
    assert 1 <= len({t["actor"] for t in gpu}) <= 4
    assert not any(t.get("gpu_ids") for t in traces if t["stage"] != "invert_gpu")
    # Same release bytes and manifests as the local loop.
    assert release_digest(out) == release_digest(local_out)
    assert manifest_rows(out) == manifest_rows(local_out)
    order = ["a0", "a1", "a2", "a3", "a4", "b0", "b-bad", "b2", "b3"]
    assert sorted(s["__key__"] for s in seen) == sorted(order)
    assert [s["__key__"] for s in streamed] == order


# ------------------------------------------------------------------------------ Beam


def test_beam_gpu_segment_gets_an_accelerator_hint():
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.resources import AcceleratorHint

    from veil.pipelines.beam_transforms import accelerator_hint, segment_pardo

    assert accelerator_hint(0.5) == "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    assert accelerator_hint(2, accelerator_type="nvidia-l4") == "type:nvidia-l4;count:2;install-nvidia-driver"
    user = "type:nvidia-h100-80gb;count:1;install-nvidia-driver"
    assert accelerator_hint(0.5, options=PipelineOptions([f"--resource_hints=accelerator={user}"])) == user
    cpu_seg, gpu_seg, _ = gpu_chain().segments()
    # The hint sits on the ParDo inside with_outputs' wrapper.
    assert segment_pardo(gpu_seg)._do_transform.get_resource_hints()[AcceleratorHint.urn] == (
        b"type:nvidia-tesla-t4;count:1;install-nvidia-driver")
    assert not segment_pardo(cpu_seg)._do_transform.get_resource_hints()


@pytest.mark.slow
def test_beam_runs_segments_in_sequence_like_local(shards, local_out, tmp_path):
    from veil.pipelines.runners import BeamRunner

    out = tmp_path / "out-beam"
    run_chain(BeamRunner(), shards, out, gpu_chain())
    assert release_digest(out) == release_digest(local_out)
    assert manifest_rows(out) == manifest_rows(local_out)


@pytest.mark.slow
def test_beam_dead_letter_covers_a_middle_segment(shards, tmp_path):
    """A batch that crashes in the GPU segment is quarantined, every key still accounted for."""
    from veil.pipelines.runners import BeamRunner

    out = tmp_path / "out-beam"
    run_chain(BeamRunner(), shards, out, gpu_chain(fail_key="a1"))
    rows = {r["key"]: r for r in manifest_rows(out)}
    assert sorted(rows) == sorted(["a0", "a1", "a2", "a3", "a4", "b0", "b-bad", "b2", "b3"])
    assert rows["a1"]["status"] == "quarantined"
    assert rows["a1"]["reason"].startswith("stage_error: RuntimeError: model crashed")
    assert rows["b0"]["status"] == ANONYMIZED
    import tarfile

    with tarfile.open(out / "data" / "p-000.tar") as tar:
        assert not any(n.startswith("a1.") for n in tar.getnames())
