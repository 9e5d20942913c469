"""Runners: the same stage chain on a plain loop, on Ray Data, or on Apache Beam.

Each runner takes the shards still to do and returns one ``ShardResult`` per committed
shard. Where the work runs, the shards are written: the local runner commits in its own
loop; Ray's workers write each processed I/O batch to the output's parts folder and a Ray
task commits a shard once all its batches are there; Beam groups samples by shard and
commits inside the pipeline. On Ray and Beam the driver receives only small per-sample
statuses and per-shard results, never image bytes, so its memory and network are not the
ceiling of a cluster, and the output may be any store the workers can write (``s3://``...).

Ray and Beam run the chain as ``StageChain.segments()``: one worker pool (Ray) or DoFn (Beam)
per segment, so a GPU stage gets GPU workers of its own while CPU stages stay fused. A chain
with no GPU stage is one segment, one pool, as it always was.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
import traceback
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
    limit_threads,
    work_unit_batches,
)
from veil.pipelines.faults import fault_point
from veil.pipelines.sinks import store_write_bytes
from veil.pipelines.sources import Shard, Source, WorkUnit
from veil.pipelines.storage import OutputStore, as_store
from veil.transforms.stage import Resources, Sample, reason_code


@dataclass
class RunContext:
    """Everything a runner needs besides the shards."""

    source: Source
    chain: StageChain
    #: Where shards are written: a local folder or any store (:func:`~veil.pipelines.storage.as_store`).
    output: Path | OutputStore
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

    @abstractmethod
    def map_shards(self, tasks: Sequence[Any], worker: ShardWorker, *, workers: int | None = None,
                   scratch: str | None = None) -> Iterator[Any]:
        """Run ``worker`` on every task (one task per shard, say) and yield each result, in
        any order. ``worker.setup()`` runs once per worker process before its first task. A
        task's exception (or the worker's setup's) is raised here, in the caller, with a note
        naming the task and the runner. ``workers``: the Ray pool's size (default one actor
        per cluster CPU); ``scratch``: where Beam's workers leave their outcomes (a location
        they and the caller both reach; default a temporary folder). See :class:`ShardWorker`."""


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

    def map_shards(self, tasks: Sequence[Any], worker: ShardWorker, *, workers: int | None = None,
                   scratch: str | None = None) -> Iterator[Any]:
        if not tasks:
            return
        host = TaskHost(worker, self.name, ship=False)
        host.start()
        for index, task in enumerate(tasks):
            yield host.run(index, task).unwrap()


# --------------------------------------------------------------------------------------- Ray


#: Processed I/O batches of the Ray runner wait here (one file per batch, written by the
#: worker that processed it) until their shard is complete and a commit task writes it.
PARTS_DIR = ".veil-parts"


def _ray_read_unit(row: dict[str, Any], source: Source, batch_size: int) -> Iterator[dict[str, Any]]:
    """Ray Data ``flat_map`` task: one work unit in, one row per I/O batch out.

    Rows carry their place (``unit``, ``seq``) so the shard can be put back in input order
    whatever order the workers finish in, and the unit's last row says how many samples the
    unit had (``last``, ``count``), so the driver knows when a shard is complete. A unit
    that reads no sample still sends one (empty) row."""
    index = int(row["index"])
    unit = pickle.loads(row["unit"])
    previous: list[Sample] | None = None
    seq = count = 0
    for batch in work_unit_batches(source, unit, batch_size):
        count += sum(1 for s in batch if not is_end_marker(s))
        if previous is not None:
            yield _read_row(previous, index, seq, last=False, count=0)
            seq += 1
        previous = batch
    yield _read_row(previous or [], index, seq, last=True, count=count)


def _read_row(batch: list[Sample], unit: int, seq: int, *, last: bool, count: int) -> dict[str, Any]:
    return {"batch": pickle.dumps(batch, protocol=5), "unit": unit, "seq": seq, "last": last,
            "count": count}


def ray_read_dataset(shards: Sequence[Shard], source: Source, batch_size: int,
                     units: Sequence[WorkUnit] | None = None) -> Any:
    """The Ray Dataset of a run's I/O batches: one read task per work unit, one row (and
    block) per batch of ``batch_size`` samples, end markers included. Row ``unit`` is the
    index of the work unit in ``units`` (default: ``work_units(shards, source, batch_size)``)."""
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
        if units is None:
            units = work_units(shards, source, batch_size)
        ds = ray.data.from_items([{"unit": pickle.dumps(u), "index": i} for i, u in enumerate(units)],
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

    The last pool's actors (``output`` set) write each processed batch to the output's parts
    folder themselves and pass on only what the driver needs: where the part is and each
    sample's key and status.
    """

    def __init__(self, chain: StageChain, output: OutputStore | str | None = None) -> None:
        self.chain = chain
        self.chain.setup()
        self.store = as_store(output) if output is not None else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [self.chain(pickle.loads(b)) for b in batch["batch"]]
        place = {name: batch[name] for name in ("unit", "seq", "last", "count")}
        if self.store is None:
            return {"batch": np.array([pickle.dumps(s, protocol=5) for s in out], dtype=object), **place}
        parts, statuses = [], []
        for samples, unit, seq in zip(out, batch["unit"], batch["seq"], strict=True):
            samples = [s for s in samples if not is_end_marker(s)]
            name = ""
            if samples:
                name = part_name(samples[0]["__shard__"], int(unit), int(seq))
                store_write_bytes(self.store, name, pickle.dumps(samples, protocol=5))
            parts.append(name)
            statuses.append(pickle.dumps([status_of(s) for s in samples], protocol=5))
        return {"part": np.array(parts, dtype=object), "statuses": np.array(statuses, dtype=object),
                **place}


def part_name(shard_id: str, unit: int, seq: int) -> str:
    """The output-relative file of a processed I/O batch: sorted names are input order."""
    return f"{PARTS_DIR}/{shard_id.replace('/', '__')}/{unit:09d}-{seq:09d}.pkl"


def status_of(sample: Sample) -> Sample:
    """What the driver needs of a processed sample (progress, failure guard): no pixels."""
    return {k: sample.get(k) for k in ("__key__", "__shard__", "status", "reason")}


def commit_parts(output: OutputStore | str, shard: Shard, source: Source, fingerprint: str,
                 parts: list[str]) -> ShardResult:
    """Ray task: write one shard from its processed parts, in input order, then its manifest
    (the same :class:`ShardCommitter` as every runner), and remove the parts. Run again (a
    retried task), it commits the same bytes."""
    store = as_store(output)
    if not all(store.exists(name) for name in parts):
        # A retry of a commit that finished but died while removing its parts.
        from veil.pipelines.execution import shard_fingerprint
        from veil.pipelines.manifest import is_shard_complete

        if is_shard_complete(store, shard.id, shard_fingerprint(fingerprint, shard)):
            return result_from_manifest(store, shard.id)
        missing = [name for name in parts if not store.exists(name)]
        raise FileNotFoundError(f"shard {shard.id}: processed parts {missing[:3]} are gone from "
                                f"{store.display(PARTS_DIR)} (was the output changed during the run?); "
                                "rerun the same command to redo the shard")
    committer = ShardCommitter(shard, source, store, fingerprint)
    try:
        for name in sorted(parts):
            for sample in pickle.loads(store.read_bytes(name)):
                committer.add(sample)
        result = committer.commit()
    except BaseException:
        committer.abort()
        raise
    for name in parts:
        store.delete(name)
    return result


@dataclass
class _ShardPending:
    """The driver's view of a shard in flight: its units still unfinished and its parts."""

    shard: Shard
    units_left: int
    parts: list[str]


def init_ray(address: str | None) -> None:
    """Start an embedded local Ray, or join a cluster when ``address`` is given."""
    import ray

    if ray.is_initialized():
        return
    # A driver started as a Ray job (veil submit, a KubeRay RayJob) is told its cluster here.
    address = address or os.environ.get("RAY_ADDRESS") or None
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
    strips them and writes each batch to ``OUT/.veil-parts/``. The driver counts each unit's
    samples as their statuses arrive, and when every unit of a shard is in it starts a Ray
    task (:func:`commit_parts`) that writes the shard and its manifest on a worker. Batches
    finish in any order; parts are named by their place in the input, so the shard's bytes
    are the local runner's.
    """

    name = "ray"
    #: CPUs of one commit task: it mostly waits on storage, and fits in the read reserve.
    commit_cpus = 0.25

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def run(self, shards: list[Shard], ctx: RunContext) -> list[ShardResult]:
        if not shards:
            return []
        import ray

        store = as_store(ctx.output)
        # Parts carry their place in the input: batches need not come back in order.
        units = work_units(shards, ctx.source, ctx.batch_size)
        ds = self._dataset(shards, ctx, output=store, ordered=False, units=units)
        commit = ray.remote(num_cpus=self.commit_cpus, max_retries=3)(commit_parts)
        source_ref = ray.put(ctx.source)
        pending = {s.id: _ShardPending(s, units_left=0, parts=[]) for s in shards}
        for unit in units:
            pending[unit.shard.id].units_left += 1
        seen: dict[int, int] = {}
        expected: dict[int, int] = {}
        in_flight: dict[Any, str] = {}
        results: dict[str, ShardResult] = {}

        def collect(block: bool) -> None:
            refs = list(in_flight)
            if not refs:
                return
            done, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
            for ref in done:
                in_flight.pop(ref)
                result = ray.get(ref)  # a failed commit (disk full...) stops the run here
                results[result.shard_id] = result
                ctx.on_shard(result)

        try:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                for part, blob, unit, is_last, count in zip(block["part"], block["statuses"], block["unit"],
                                                            block["last"], block["count"], strict=True):
                    statuses = pickle.loads(blob)
                    for status in statuses:
                        ctx.on_sample(status)
                    unit = int(unit)
                    state = pending[units[unit].shard.id]
                    if part:
                        state.parts.append(str(part))
                    seen[unit] = seen.get(unit, 0) + len(statuses)
                    if is_last:
                        expected[unit] = int(count)
                    if unit in expected and seen[unit] == expected[unit]:
                        del seen[unit], expected[unit]  # the driver holds only units in flight
                        state.units_left -= 1
                        if state.units_left == 0:
                            ref = commit.remote(store, state.shard, source_ref, ctx.fingerprint, state.parts)
                            in_flight[ref] = state.shard.id
                            del pending[state.shard.id]
                            fault_point("ray:commit-submitted")
                collect(block=False)
            if pending:
                raise RuntimeError(f"Ray finished without every sample of shard(s) "
                                   f"{sorted(pending)[:5]}; rerun the same command to resume")
            while in_flight:
                collect(block=True)
            store.delete_tree(PARTS_DIR)  # the empty per-shard folders of a local output
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref)
            raise
        return [results[s.id] for s in shards]

    def stream_samples(self, shards: list[Shard], ctx: RunContext) -> Iterator[Sample]:
        """The processed samples themselves, streamed back to the driver in input order (end
        markers included), for passes whose output is small records the driver needs (the
        identity pass's embeddings), not a release. Same pools as :meth:`run`."""
        if not shards:
            return
        ds = self._dataset(shards, ctx, output=None, ordered=True)
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for blob in block["batch"]:
                yield from pickle.loads(blob)

    def _dataset(self, shards: list[Shard], ctx: RunContext, *, output: OutputStore | None,
                 ordered: bool, units: Sequence[WorkUnit] | None = None) -> Any:
        """Reads, then one actor pool per chain segment; with ``output`` the last pool writes
        parts there (:meth:`run`), else it returns the samples (:meth:`stream_samples`)."""
        import ray

        init_ray(self.address)
        # Sized (and GPU availability checked) before anything is read or processed.
        pools = plan_ray_pools(ctx.chain.segments(), cluster=ray.cluster_resources(), workers=ctx.workers)
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.execution_options.preserve_order = ordered
        data_ctx.enable_progress_bars = False  # Veil draws its own bars
        data_ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if output is not None:
            output.delete_tree(PARTS_DIR)  # a killed run's parts: its shards are redone whole
        ds = ray_read_dataset(shards, ctx.source, ctx.batch_size, units)
        for i, pool in enumerate(pools):
            writes = output is not None and i == len(pools) - 1
            ds = ds.map_batches(
                _RayChainActor,
                fn_constructor_kwargs={"chain": pool.segment, "output": output if writes else None},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool.size),
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus or None,
            )
        return ds

    def map_shards(self, tasks: Sequence[Any], worker: ShardWorker, *, workers: int | None = None,
                   scratch: str | None = None) -> Iterator[Any]:
        """One Ray Data actor pool (:func:`plan_task_pool`), one actor task per shard task;
        results stream back as they finish."""
        if not tasks:
            return
        import ray

        init_ray(self.address)
        pool = plan_task_pool(worker, cluster=ray.cluster_resources(), workers=workers, tasks=len(tasks))
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # One block per task, so every task goes to whichever actor is free.
        ds = ray.data.from_items([{"index": i, "task": pickle.dumps(t, protocol=5)} for i, t in enumerate(tasks)],
                                 override_num_blocks=len(tasks))
        # One task in flight per actor: a task is a whole shard, and Ray Data's default queues
        # several on the first actor that is ready while the others still load their models
        # (measured: two validation tasks ran one after the other on one actor of two).
        ds = ds.map_batches(_RayTaskActor, fn_constructor_kwargs={"worker": worker}, batch_size=1,
                            batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=pool.size, max_tasks_in_flight_per_actor=1),
                            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None)
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for blob in block["outcome"]:
                yield pickle.loads(blob).unwrap()


# -------------------------------------------------------------------------------------- Beam


#: Beam's portable runners (PortableRunner, FlinkRunner, SparkRunner) use
#: ``--job_server_timeout`` as the deadline of the job's state stream too, so with Beam's
#: default (300 s) the driver of any job longer than five minutes fails with
#: DEADLINE_EXCEEDED while the job runs on. Veil runs last hours: a week, unless given.
BEAM_JOB_SERVER_TIMEOUT_S = 7 * 24 * 3600
#: How long a job service (``--job_endpoint``) may take to accept a connection. Without this
#: check an unreachable one hangs the driver for the whole job-server timeout.
BEAM_JOB_ENDPOINT_CONNECT_S = 30.0


def beam_pipeline_options(extra: list[str]) -> list[str]:
    """Beam options with an explicitly named runner (Beam's default tries to download a
    Prism binary first, which fails offline) and a job-server timeout that outlasts a run."""
    args = list(extra)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=BundleBasedDirectRunner")
    if not any(a.startswith(("--job_server_timeout", "--job-server-timeout")) for a in args):
        args.append(f"--job_server_timeout={BEAM_JOB_SERVER_TIMEOUT_S}")
    return args


def check_beam_job_endpoint(options: Any, timeout: float = BEAM_JOB_ENDPOINT_CONNECT_S) -> None:
    """Fail before any work when ``--job_endpoint`` names a job service that does not accept
    connections (``options``: Beam ``PipelineOptions``)."""
    from apache_beam.options.pipeline_options import PortableOptions

    endpoint = options.view_as(PortableOptions).job_endpoint
    if not endpoint or endpoint == "embed":  # embed: Beam starts a job server in this process
        return
    import grpc

    with grpc.insecure_channel(endpoint) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConfigError(
                f"no Beam job service answers at {endpoint} (--job_endpoint) after {timeout:g} s: "
                "start it (Flink/Spark job server, or `python -m "
                "apache_beam.runners.portability.local_job_service_main --port PORT`) or fix "
                "the address") from None


def beam_worker_url(location: str | os.PathLike[str] | OutputStore) -> str:
    """``location`` as Beam's workers must be told it: a URL as it is, a local folder as an
    absolute path. SDK workers of the portable runners (a worker pool, Flink, Spark,
    Dataflow) run in a working directory of their own, where a relative path would name
    another folder."""
    store = as_store(location)
    return os.path.abspath(store.local_path()) if store.is_local else store.url


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
        check_beam_job_endpoint(options)
        segments = ctx.chain.segments()
        with beam.Pipeline(options=options) as pipeline:
            stream, dead_letters = bt.read_and_process(pipeline, shards, ctx.source, segments,
                                                       batch_size=ctx.batch_size, options=options)
            (
                (stream, *dead_letters)
                | "Merge" >> beam.Flatten()
                | "KeyByShard" >> beam.Map(lambda s: (s["__shard__"], s))
                | "GroupByShard" >> beam.GroupByKey()
                | "Commit" >> beam.ParDo(bt.CommitShardDoFn(ctx.source, beam_worker_url(ctx.output),
                                                            ctx.fingerprint,
                                                            {s.id: pickle.dumps(s) for s in shards}))
            )
        from veil.pipelines.manifest import manifest_relative

        results = []
        for shard in shards:
            if not as_store(ctx.output).exists(manifest_relative(shard.id)):
                raise RuntimeError(f"Beam pipeline finished but shard {shard.id} has no manifest")
            result = result_from_manifest(ctx.output, shard.id)
            results.append(result)
            ctx.on_shard(result)
        return results

    def map_shards(self, tasks: Sequence[Any], worker: ShardWorker, *, workers: int | None = None,
                   scratch: str | None = None) -> Iterator[Any]:
        """A ``ParDo`` whose ``DoFn`` writes each task's outcome as a file under ``scratch``
        (any fsspec URL that the Beam workers and this process both reach; default: a
        temporary folder here, which serves the direct and local portable runners). A Beam
        pipeline returns nothing to its driver, so the results are read back from there
        after the pipeline has finished, then removed."""
        if not tasks:
            return
        import uuid

        import apache_beam as beam
        import fsspec
        from apache_beam.options.pipeline_options import PipelineOptions

        from veil.pipelines.beam_tasks import ShardTaskDoFn, outcome_path

        options = PipelineOptions(self.options)
        check_beam_job_endpoint(options)
        made_here = scratch is None
        base = (tempfile.mkdtemp(prefix="veil-tasks-") if made_here
                else beam_worker_url(scratch.rstrip("/")))
        results = base if made_here else f"{base}/.tasks-{uuid.uuid4().hex}"
        fs, root = fsspec.core.url_to_fs(results)
        # The workers may run in another working directory: hand them an absolute URL.
        results = fs.unstrip_protocol(root)
        try:
            with beam.Pipeline(options=options) as pipeline:
                # Reshuffled, so that a runner with several workers spreads the tasks over
                # them: each task is a whole shard's work, the shuffle a few bytes per task.
                _ = (pipeline
                     | "Tasks" >> beam.Create([(i, pickle.dumps(t, protocol=5)) for i, t in enumerate(tasks)],
                                              reshuffle=True)
                     | "RunTasks" >> beam.ParDo(ShardTaskDoFn(worker, results)))
            for index in range(len(tasks)):
                path = outcome_path(root, index)
                if not fs.exists(path):
                    raise RuntimeError(f"Beam pipeline finished but shard task {index} left no result at "
                                       f"{path}; was the scratch location {base!r} reachable by the workers?")
                yield pickle.loads(fs.cat_file(path)).unwrap()
        finally:
            if fs.exists(root):
                fs.rm(root, recursive=True)


def result_from_manifest(output: Path | OutputStore, shard_id: str) -> ShardResult:
    """Summarise a committed shard from its manifest (the manifest is the source of truth)."""
    from collections import Counter

    from veil.pipelines.manifest import read_shard_manifest

    table = read_shard_manifest(output, shard_id)
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


# ------------------------------------------------------------------------- per-shard tasks


class ShardWorker(ABC):
    """The body of a per-shard task that every runner executes (``Runner.map_shards``):
    validation's shard evaluator, for one.

    Like a stage, a worker is pickled and shipped to the workers before ``setup()`` runs
    there, so it holds plain settings until then and loads its models in ``setup()`` (once
    per worker process). Tasks and results are pickled with ``pickle``: keep them small (a
    shard's description in, a summary out; bulky results go to files the task writes).
    """

    #: What one worker needs; a Ray pool reserves it per actor (GPUs: whole actors only
    #: where the cluster has them, never a silent CPU fallback).
    resources: Resources = Resources()

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and other per-worker state. Called once per worker."""

    @abstractmethod
    def __call__(self, task: Any) -> Any:
        """Do one task and return its (picklable) result."""

    def describe(self, task: Any) -> str:
        """How errors name a task: "raised by <this> on the ray runner"."""
        return f"task {repr(task)[:200]}"


class ShardTaskError(RuntimeError):
    """A shard task failed with an exception that could not be carried back as itself (it
    does not pickle); the message keeps its type and text, a note its worker traceback."""


def _task_error(exc: Exception, where: str, *, ship: bool) -> Exception:
    """``exc`` with a note saying where it was raised; shipped from another process, with the
    worker's traceback as a note too (tracebacks do not pickle) and checked to unpickle."""
    if not ship:
        exc.add_note(where)
        return exc
    trace = "".join(traceback.format_exception(exc)).rstrip()
    exc.add_note(where)
    exc.add_note(f"worker traceback:\n{trace}")
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any unpicklable exception is carried as text
        error = ShardTaskError(f"{where}: {type(exc).__name__}: {exc}")
        error.add_note(f"worker traceback:\n{trace}")
        return error


@dataclass
class TaskOutcome:
    """What a worker sends back for one task: its result, or the exception it raised."""

    index: int
    result: Any = None
    error: Exception | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class TaskHost:
    """Runs a :class:`ShardWorker` inside one worker of any runner. Exceptions become data
    (:class:`TaskOutcome`) instead of crashing the worker: a Ray actor whose constructor
    raises is restarted and a Beam bundle retried, with the reason far from the caller, and
    a user error would fail the same way on every retry. The caller raises them."""

    def __init__(self, worker: ShardWorker, runner: str, *, ship: bool = True) -> None:
        self.worker = worker
        self.runner = runner
        self.ship = ship
        self.setup_error: Exception | None = None

    def start(self) -> None:
        try:
            self.worker.setup()
            # After setup, which imports torch: one fixed thread count per worker (its CPUs),
            # so float reductions, and so results, are the same in every worker process of
            # every runner, and workers sharing cores do not oversubscribe them.
            limit_threads(max(1, int(self.worker.resources.cpus)))
        except Exception as exc:  # noqa: BLE001 - raised by the caller, for every task
            self.setup_error = _task_error(
                exc, f"raised while setting up {type(self.worker).__name__} on the {self.runner} runner",
                ship=self.ship)

    def run(self, index: int, task: Any) -> TaskOutcome:
        if self.setup_error is not None:
            return TaskOutcome(index, error=self.setup_error)
        try:
            return TaskOutcome(index, result=self.worker(task))
        except Exception as exc:  # noqa: BLE001 - raised by the caller
            where = f"raised by {self.worker.describe(task)} on the {self.runner} runner"
            return TaskOutcome(index, error=_task_error(exc, where, ship=self.ship))


#: CPUs kept free beside a task pool (the driver, Ray's own processes): today's validation pool.
TASK_CPU_RESERVE = 0.25


@dataclass(frozen=True)
class TaskPool:
    """The Ray actor pool of a ``map_shards`` call."""

    size: int
    num_cpus: float
    num_gpus: float = 0.0


def plan_task_pool(worker: ShardWorker, *, cluster: Mapping[str, float], workers: int | None,
                   tasks: int) -> TaskPool:
    """``workers`` actors (default one per cluster CPU), never more than there are tasks,
    sharing the cluster's CPUs (fractional reservations, so they fit on 2 cores). A worker
    that declares GPUs gets ``floor(cluster GPUs / its GPUs)`` actors (at most ``workers``),
    and :class:`GPUUnavailableError` where not even one fits."""
    total_cpus = float(cluster.get("CPU", os.cpu_count() or 1))
    total_gpus = float(cluster.get("GPU", 0.0))
    gpus = worker.resources.gpus
    wanted = workers or max(1, int(total_cpus))
    if gpus > 0:
        fit = math.floor(total_gpus / gpus + 1e-9)
        if fit < 1:
            have = "none" if total_gpus <= 0 else f"only {total_gpus:g}"
            raise GPUUnavailableError(
                f"{type(worker).__name__} asks for {gpus:g} GPU per worker but the Ray cluster has "
                f"{have}; join a cluster with GPUs via --ray-address")
        wanted = min(fit, workers) if workers else fit
    share = max(0.1, (total_cpus - TASK_CPU_RESERVE) / wanted)
    return TaskPool(size=max(1, min(wanted, tasks)), num_cpus=min(worker.resources.cpus, share),
                    num_gpus=gpus)


class _RayTaskActor:
    """Ray Data actor of ``map_shards``: one :class:`TaskHost`, one task per row."""

    def __init__(self, worker: ShardWorker) -> None:
        self.host = TaskHost(worker, "ray")
        self.host.start()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = [pickle.dumps(self.host.run(int(i), pickle.loads(t)), protocol=5)
               for i, t in zip(batch["index"], batch["task"], strict=True)]
        return {"outcome": np.array(out, dtype=object)}
