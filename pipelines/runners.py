"""Runners: the same stage chain on a plain loop, on Ray Data, or on Apache Beam.

Each runner takes the shards still to do and returns one ``ShardResult`` per committed
shard. Local and Ray stream processed samples back to the driver in input order and the
driver commits shard by shard; Beam groups samples by shard and commits inside the pipeline.

Ray and Beam run the chain as ``StageChain.segments()``: one worker pool (Ray) or DoFn (Beam)
per segment, so a GPU stage gets GPU workers of its own while CPU stages stay fused. A chain
with no GPU stage is one segment, one pool, as it always was.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.config import ConfigError
from veil.pipelines.execution import (
    ShardCommitter,
    ShardResult,
    StageChain,
    is_end_marker,
    work_unit_batches,
)
from veil.pipelines.sources import Shard, Source, WorkUnit
from veil.transforms.stage import Sample, reason_code


@dataclass
class RunContext:
    """Everything a runner needs besides the shards."""

    source: Source
    chain: StageChain
    output: Path
    fingerprint: str
    batch_size: int
    workers: int | None
    #: Called with each finished sample (driver side); may raise to abort the run.
    on_sample: Callable[[Sample], None]
    #: Called with each committed shard.
    on_shard: Callable[[ShardResult], None]


class Runner(ABC):
    name: str

    @abstractmethod
    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]: ...


#: A shard that can be read in ranges (a folder) is read by tasks of this many I/O batches
#: each, so a very large shard is read by several tasks (on several nodes) at once. Reading a
#: local file costs far less than starting another Ray worker process to read it, and the
#: workers' balance comes from one block per I/O batch, not from the reads: a folder shard of
#: the default 1000 samples stays one read task.
READ_UNIT_BATCHES = 64


def work_units(shards: Sequence[Shard], source: Source, batch_size: int) -> list[WorkUnit]:
    """The read tasks of a run: each shard as consecutive work units, in shard order."""
    return [unit for shard in shards
            for unit in source.work_units(shard, batch_size * READ_UNIT_BATCHES)]


def commit_stream(samples: Iterable[Sample], shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
    """Write an ordered stream of processed samples shard by shard.

    Samples of one shard arrive contiguously and end with the shard's end marker; the shard
    is committed then. If the consumer stops early (abort, Ctrl-C), the open shard is aborted
    and leaves nothing behind but temp files that are removed.
    """
    by_id = {s.id: s for s in shards}
    results: list[ShardResult] = []
    committer: ShardCommitter | None = None
    try:
        for sample in samples:
            shard_id = sample["__shard__"]
            if committer is None:
                committer = ShardCommitter(by_id[shard_id], ctx.source, ctx.output, ctx.fingerprint)
            elif committer.shard.id != shard_id:
                raise RuntimeError(
                    f"samples of shard {shard_id} arrived before shard {committer.shard.id} ended; "
                    "the runner must preserve order"
                )
            if is_end_marker(sample):
                result = committer.commit()
                committer = None
                results.append(result)
                ctx.on_shard(result)
                continue
            committer.add(sample)
            ctx.on_sample(sample)
    except BaseException:
        if committer is not None:
            committer.abort()
        raise
    return results


class LocalRunner(Runner):
    """A plain loop in this process: the reference every other runner must match."""

    name = "local"

    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
        ctx.chain.setup()
        return commit_stream(self._stream(shards, ctx), shards, ctx)

    @staticmethod
    def _stream(shards: list[Shard], ctx: RunContext) -> Iterator[Sample]:
        for shard in shards:
            for batch in work_unit_batches(ctx.source, WorkUnit(shard), ctx.batch_size):
                yield from ctx.chain(batch)


# --------------------------------------------------------------------------------------- Ray


def _ray_read_unit(row: dict[str, Any], source: Source, batch_size: int) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` task: one work unit in, one row per I/O batch out."""
    unit = pickle.loads(row["unit"])
    for batch in work_unit_batches(source, unit, batch_size):
        yield {"batch": pickle.dumps(batch, protocol=5)}


def ray_read_dataset(shards: Sequence[Shard], source: Source, batch_size: int) -> Any:
    """The Ray Dataset of a run's I/O batches, in input order: one read task per work unit,
    one row (and block) per batch of ``batch_size`` samples, end markers included."""
    import ray

    # Every row (an I/O batch) must be a block of its own, so that each batch is one task
    # for whichever actor is free: a block of several batches goes to one actor whole, and
    # with few blocks per shard the other actors idle. The smallest block size makes Ray Data
    # close a block after every row. A Dataset keeps a copy of the context it was made
    # with, so the process-wide setting is put back for other datasets (validation's).
    data_ctx = ray.data.DataContext.get_current()
    previous = data_ctx.target_max_block_size
    data_ctx.target_max_block_size = 1
    try:
        units = work_units(shards, source, batch_size)
        ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units],
                                 override_num_blocks=len(units))
        return ds.flat_map(_ray_read_unit, fn_kwargs={"source": source, "batch_size": batch_size},
                           num_cpus=0.25)
    finally:
        data_ctx.target_max_block_size = previous


class _RayChainActor:
    """Ray Data actor: loads the models once (``StageChain.setup``), then processes batches.

    A row is one I/O batch: a pickled list of sample dicts (samples carry different fields,
    jpg or png, json or not, which a columnar schema would have to unify per block), so a
    batch is pickled once per hop, not once per sample.
    """

    def __init__(self, chain: StageChain) -> None:
        self.chain = chain
        self.chain.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [pickle.dumps(self.chain(pickle.loads(b)), protocol=5) for b in batch["batch"]]
        return {"batch": np.array(out, dtype=object)}


def init_ray(address: str | None) -> None:
    """Start an embedded local Ray, or join a cluster when ``address`` is given."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                              "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Local: the driver's package must be importable by workers; it is installed, so the
        # workers find it on the same interpreter.
        ray.init(num_cpus=os.cpu_count(), **kwargs)


class GPUUnavailableError(ConfigError):
    """A stage asks for GPUs the Ray cluster does not have. Raised before any processing:
    Veil never falls back to CPU silently."""


#: CPUs kept free for the read tasks: two actors with num_cpus=1 plus a read task on two cores
#: would deadlock.
READ_CPU_RESERVE = 0.5


@dataclass(frozen=True)
class RayPool:
    """The actor pool of one chain segment: ``size`` actors, each reserving ``num_cpus`` and
    ``num_gpus`` (0 for CPU segments)."""

    segment: StageChain
    size: int
    num_cpus: float
    num_gpus: float = 0.0


def plan_ray_pools(segments: Sequence[StageChain], *, cluster: Mapping[str, float],
                   workers: int | None) -> list[RayPool]:
    """Size one actor pool per segment from the cluster's resources.

    CPU segments get ``workers`` actors (default: one per cluster CPU). A GPU segment gets
    ``floor(cluster GPUs / GPUs per actor)`` actors, at most ``workers`` when the user set it,
    and fails with :class:`GPUUnavailableError` when not even one actor's share is there. The
    cluster's CPUs (less a reserve for reads) are shared by all actors of all pools, so every
    pool can start on a 2-core machine; one segment gets exactly the CPUs it always got.
    """
    total_cpus = float(cluster.get("CPU", os.cpu_count() or 1))
    total_gpus = float(cluster.get("GPU", 0.0))
    cpu_pool = workers or max(1, int(total_cpus))
    sizes: list[int] = []
    for segment in segments:
        gpus = segment.resources.gpus
        if gpus <= 0:
            sizes.append(cpu_pool)
            continue
        fit = math.floor(total_gpus / gpus + 1e-9)
        if fit < 1:
            have = "none" if total_gpus <= 0 else f"only {total_gpus:g}"
            raise GPUUnavailableError(
                f"stage {segment.name!r} asks for {gpus:g} GPU per worker (--gpus-per-worker {gpus:g}) "
                f"but the Ray cluster has {have}; drop --gpus-per-worker to run on CPU, or join a "
                "cluster with GPUs via --ray-address")
        sizes.append(min(fit, workers) if workers else fit)
    share = (total_cpus - READ_CPU_RESERVE) / max(1, sum(sizes))
    # One segment keeps its old floor; several pools may hold many actors on few cores.
    share = max(0.1 if len(segments) == 1 else 0.01, share)
    return [RayPool(segment=segment, size=size, num_cpus=min(segment.resources.cpus, share),
                    num_gpus=segment.resources.gpus)
            for segment, size in zip(segments, sizes, strict=True)]


class RayRunner(Runner):
    """Ray Data: reads as tasks, then one ``map_batches`` actor pool per chain segment.

    A GPU stage's actors reserve ``resources.gpus`` each (Ray sets ``CUDA_VISIBLE_DEVICES``;
    the stage picks its device in ``setup()``); CPU stages around it keep their fused pools.
    Samples travel between pools as pickled dicts, working fields included; the last pool
    strips them. ``preserve_order`` holds across all pools, so the driver commits shard by
    shard from the ordered stream.
    """

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
        return commit_stream(self._stream(shards, ctx), shards, ctx)

    def _stream(self, shards: list[Shard], ctx: RunContext) -> Iterator[Sample]:
        if not shards:
            return
        import ray

        init_ray(self.address)
        # Sized (and GPU availability checked) before anything is read or processed.
        pools = plan_ray_pools(ctx.chain.segments(), cluster=ray.cluster_resources(), workers=ctx.workers)
        data_ctx = ray.data.DataContext.get_current()
        # The driver commits shard by shard, so samples must come back in input order.
        data_ctx.execution_options.preserve_order = True
        data_ctx.enable_progress_bars = False  # Veil draws its own bars
        data_ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray_read_dataset(shards, ctx.source, ctx.batch_size)
        for pool in pools:
            ds = ds.map_batches(
                _RayChainActor,
                fn_constructor_kwargs={"chain": pool.segment},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool.size),
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus or None,
            )
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for blob in block["batch"]:
                yield from pickle.loads(blob)


# -------------------------------------------------------------------------------------- Beam


def beam_pipeline_options(extra: list[str]) -> list[str]:
    """Beam options with an explicitly named runner: Beam's default tries to download a
    Prism binary first, which fails offline."""
    args = list(extra)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=BundleBasedDirectRunner")
    return args


class BeamRunner(Runner):
    """Apache Beam: read, then one ``DoFn`` per chain segment, then commit grouped by shard.

    Every segment's failures go to its dead-letter output, which joins the last segment's
    output before the commit, so a sample that fails in any segment is quarantined, never lost.
    GPU placement on Beam is per *worker*: a GPU segment's ``ParDo`` carries an ``accelerator``
    resource hint that runners with accelerator workers honour (Dataflow, and Flink/Spark
    workers launched with GPUs); the local direct runners ignore it and run on this machine.
    """

    name = "beam"

    def __init__(self, options: list[str] | None = None) -> None:
        self.options = beam_pipeline_options(options or [])

    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
        if not shards:
            return []
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions

        from veil.pipelines import beam_transforms as bt

        options = PipelineOptions(self.options)
        segments = ctx.chain.segments()
        with beam.Pipeline(options=options) as pipeline:
            stream, dead_letters = bt.read_and_process(pipeline, shards, ctx.source, segments,
                                                       batch_size=ctx.batch_size, options=options)
            (
                (stream, *dead_letters)
                | "Merge" >> beam.Flatten()
                | "KeyByShard" >> beam.Map(lambda s: (s["__shard__"], s))
                | "GroupByShard" >> beam.GroupByKey()
                | "Commit" >> beam.ParDo(bt.CommitShardDoFn(ctx.source, str(ctx.output), ctx.fingerprint,
                                                            {s.id: pickle.dumps(s) for s in shards}))
            )
        from veil.pipelines.manifest import manifest_path

        results = []
        for shard in shards:
            if not manifest_path(ctx.output, shard.id).exists():
                raise RuntimeError(f"Beam pipeline finished but shard {shard.id} has no manifest")
            result = result_from_manifest(ctx.output, shard.id)
            results.append(result)
            ctx.on_shard(result)
        return results


def result_from_manifest(output: Path, shard_id: str) -> ShardResult:
    """Summarise a committed shard from its manifest (the manifest is the source of truth)."""
    from collections import Counter

    from veil.pipelines.manifest import manifest_path, read_manifest

    table = read_manifest(manifest_path(output, shard_id))
    statuses = table.column("status").to_pylist()
    reasons = [reason_code(r) for r, s in zip(table.column("reason").to_pylist(), statuses, strict=True)
               if s == "quarantined"]
    faces = sum(int(n or 0) for n in table.column("n_faces").to_pylist())
    seconds = sum(float(x or 0) for x in table.column("seconds").to_pylist())
    return ShardResult(shard_id=shard_id, n_samples=table.num_rows, counts=dict(Counter(statuses)),
                       reasons=dict(Counter(reasons)), n_faces=faces, seconds=seconds)


def make_runner(name: str, *, ray_address: str | None = None, beam_options: list[str] | None = None) -> Runner:
    if name == "local":
        return LocalRunner()
    if name == "ray":
        return RayRunner(ray_address)
    if name == "beam":
        return BeamRunner(beam_options)
    raise ValueError(f"unknown runner {name!r}")
