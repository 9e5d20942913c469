"""Runners: the same stage chain on a plain loop, on Ray Data, or on Apache Beam.

Each runner takes the shards still to do and returns one ``ShardResult`` per committed
shard. Local and Ray stream processed samples back to the driver in input order and the
driver commits shard by shard; Beam groups samples by shard and commits inside the pipeline.
"""

from __future__ import annotations

import logging
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.pipelines.execution import (
    ShardCommitter,
    ShardResult,
    StageChain,
    is_end_marker,
    read_with_end_marker,
)
from veil.pipelines.sources import Shard, Source
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
            batch: list[Sample] = []
            for sample in read_with_end_marker(ctx.source, shard):
                batch.append(sample)
                if len(batch) >= ctx.batch_size:
                    yield from ctx.chain(batch)
                    batch = []
            if batch:
                yield from ctx.chain(batch)


# --------------------------------------------------------------------------------------- Ray


def _ray_read_shard(row: dict[str, Any], source: Source) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` task: one row per shard in, one row per sample out."""
    shard = pickle.loads(row["shard"])
    for sample in read_with_end_marker(source, shard):
        yield {"sample": pickle.dumps(sample, protocol=5)}


class _RayChainActor:
    """Ray Data actor: loads the models once (``StageChain.setup``), then processes batches.

    Samples travel as pickled dicts in one binary column: samples carry different fields
    (jpg or png, json or not), which a columnar schema would have to unify per block.
    """

    def __init__(self, chain: StageChain) -> None:
        self.chain = chain
        self.chain.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        samples = [pickle.loads(b) for b in batch["sample"]]
        out = self.chain(samples)
        return {"sample": np.array([pickle.dumps(s, protocol=5) for s in out], dtype=object)}


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


class RayRunner(Runner):
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
        data_ctx = ray.data.DataContext.get_current()
        # The driver commits shard by shard, so samples must come back in input order.
        data_ctx.execution_options.preserve_order = True
        data_ctx.enable_progress_bars = False  # Veil draws its own bars
        data_ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Small blocks keep several actors busy within one shard and memory bounded.
        data_ctx.target_max_block_size = 4 * 1024 * 1024

        total_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        workers = ctx.workers or max(1, int(total_cpus))
        resources = ctx.chain.resources
        # Leave room for the read tasks: two actors with num_cpus=1 plus a read task on two
        # cores would deadlock.
        cpus_per_worker = min(resources.cpus, max(0.1, (total_cpus - 0.5) / workers))

        ds = ray.data.from_items([{"shard": pickle.dumps(s)} for s in shards],
                                 override_num_blocks=len(shards))
        ds = ds.flat_map(_ray_read_shard, fn_kwargs={"source": ctx.source}, num_cpus=0.25)
        ds = ds.map_batches(
            _RayChainActor,
            fn_constructor_kwargs={"chain": ctx.chain},
            batch_size=ctx.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=resources.gpus or None,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for blob in batch["sample"]:
                yield pickle.loads(blob)


# -------------------------------------------------------------------------------------- Beam


def beam_pipeline_options(extra: list[str]) -> list[str]:
    """Beam options with an explicitly named runner: Beam's default tries to download a
    Prism binary first, which fails offline."""
    args = list(extra)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=BundleBasedDirectRunner")
    return args


class BeamRunner(Runner):
    name = "beam"

    def __init__(self, options: list[str] | None = None) -> None:
        self.options = beam_pipeline_options(options or [])

    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
        if not shards:
            return []
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions

        from veil.pipelines import beam_transforms as bt

        with beam.Pipeline(options=PipelineOptions(self.options)) as pipeline:
            samples = (
                pipeline
                | "Shards" >> beam.Create([pickle.dumps(s) for s in shards], reshuffle=False)
                | "Read" >> beam.FlatMap(bt.read_shard, source=ctx.source)
                | "Batch" >> beam.BatchElements(min_batch_size=ctx.batch_size,
                                                max_batch_size=ctx.batch_size)
            )
            processed = samples | "Anonymize" >> beam.ParDo(bt.ChainDoFn(ctx.chain)).with_outputs(
                bt.DEAD_LETTER, main="ok"
            )
            (
                (processed.ok, processed[bt.DEAD_LETTER])
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
