"""What every runner shares: the fused stage chain (and its split into resource-shaped
segments), shard-end markers and shard commits.

Runners differ only in *where* the chain runs (driver loop, Ray actors, Beam DoFns). The
chain, the order of samples within a shard and the commit of a shard (data files first,
manifest last) are the same code for all three, which is why they give identical bytes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.pipelines.faults import fault_point
from veil.pipelines.sources import Shard, Source, WorkUnit
from veil.pipelines.storage import OutputStore, as_store
from veil.transforms.stage import (
    ANONYMIZED,
    CLEAN,
    QUARANTINED,
    Resources,
    Sample,
    Stage,
    quarantine,
    reason_code,
    strip_working_fields,
)

RELEASED_STATUSES = (ANONYMIZED, CLEAN)

#: Key of the marker a reader emits after a shard's last sample, so streaming runners know the
#: shard is complete (also for shards with no samples at all).
END_MARKER = "__end__"


def shard_end_marker(shard: Shard, n_samples: int) -> Sample:
    return {END_MARKER: True, "__shard__": shard.id, "__count__": n_samples}


def is_end_marker(sample: Sample) -> bool:
    return bool(sample.get(END_MARKER))


def read_with_end_marker(source: Source, shard: Shard) -> Iterator[Sample]:
    """Yield a shard's samples, then its end marker. Reading never raises for bad data (the
    source yields quarantined samples); an unexpected reader bug becomes a quarantine row."""
    yield from read_unit_with_end_marker(source, WorkUnit(shard))


def read_unit_with_end_marker(source: Source, unit: WorkUnit) -> Iterator[Sample]:
    """Yield a work unit's samples, then, for the shard's last unit, the shard's end marker:
    a shard read as several units still ends exactly once, after all its samples."""
    shard = unit.shard
    n = 0
    try:
        for sample in source.read_unit(unit):
            n += 1
            fault_point("read")
            yield sample
    except Exception as exc:  # noqa: BLE001 - fail closed, keep the run going
        from veil.transforms.stage import describe_exception

        n += 1
        # One such row per unit: the key names the unit so keys stay unique in the shard.
        suffix = "" if unit.whole else f"@{unit.start}"
        yield quarantine(
            {"__key__": f"{shard.id}#read_error{suffix}", "__shard__": shard.id,
             "__index__": 10**9 + unit.start, "__source__": shard.url},
            f"read_error: {describe_exception(exc)}",
        )
    if unit.last:
        yield shard_end_marker(shard, unit.start + n)


def work_unit_batches(source: Source, unit: WorkUnit, batch_size: int) -> Iterator[list[Sample]]:
    """A unit's samples (end marker included) in consecutive lists of ``batch_size``: the I/O
    batches that runners hand to their workers, each one task. Batches never span units, so
    the order of samples is the order of units, then of samples within them."""
    batch: list[Sample] = []
    for sample in read_unit_with_end_marker(source, unit):
        batch.append(sample)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def shard_fingerprint(run_fingerprint: str, shard: Shard) -> str:
    """The fingerprint a shard's manifest must carry for a rerun to skip it.

    Folder shards are chunks of a sorted file list: adding or removing a file moves files
    between shards, so their member list is part of the identity. Tar and Parquet shards are
    identified by their id alone, so moving an input folder does not redo finished work.
    """
    if shard.kind != "folder":
        return run_fingerprint
    import hashlib

    return hashlib.sha256(f"{run_fingerprint}:{shard.digest()}".encode()).hexdigest()


class StageChain:
    """Consecutive stages fused into one unit of execution.

    Fusing avoids shipping decoded images between processes: one Ray actor (or one Beam
    DoFn) decodes, detects, anonymizes, encodes and re-scans a batch, and only the encoded
    result travels. Each stage still sees micro-batches of its own ``batch_size``.

    A chain that holds a GPU stage is split by :meth:`segments` into consecutive segments of
    one resource shape, so the GPU stage gets its own worker pool. Only the last segment
    (``final=True``) checks statuses and strips working fields (``_pixels``, ``_mask``): the
    earlier segments hand them on to the next one.
    """

    def __init__(self, stages: Sequence[Stage], *, threads_per_worker: int = 1, final: bool = True,
                 pixel_budget: int | None = None) -> None:
        self.stages = list(stages)
        self.threads_per_worker = threads_per_worker
        #: Decoded pixels one pass through the stages may hold (None: no limit); see
        #: :func:`pixel_groups`.
        self.pixel_budget = pixel_budget
        #: True for a whole chain or its last segment: samples leave it finished.
        self.final = final
        self._ready = False

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.stages)

    @property
    def resources(self) -> Resources:
        return Resources(
            cpus=max(s.resources.cpus for s in self.stages),
            gpus=max(s.resources.gpus for s in self.stages),
        )

    @property
    def uses_gpus(self) -> bool:
        return any(s.resources.gpus > 0 for s in self.stages)

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.stages)

    def segments(self) -> list[StageChain]:
        """Split the chain into consecutive segments by resource shape.

        CPU stages next to each other stay fused; each stage with ``resources.gpus > 0`` is a
        segment of its own (its pool is sized by GPUs, not CPUs), e.g. [decode, detect] ->
        [fsap] -> [encode, rescan]. Without a GPU stage the plan is ``[self]``: one fused
        unit, exactly as before. Running the segments in order gives the same samples as
        running the whole chain.
        """
        groups: list[list[Stage]] = []
        for stage in self.stages:
            if stage.resources.gpus > 0 or not groups or groups[-1][-1].resources.gpus > 0:
                groups.append([stage])
            else:
                groups[-1].append(stage)
        if len(groups) <= 1:
            return [self]
        last = len(groups) - 1
        return [StageChain(group, threads_per_worker=self.threads_per_worker,
                           final=self.final and i == last, pixel_budget=self.pixel_budget)
                for i, group in enumerate(groups)]

    def setup(self) -> None:
        if self._ready:
            return
        limit_threads(self.threads_per_worker)
        for stage in self.stages:
            stage.setup()
        self._ready = True

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ready"] = False
        return state

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        markers = {i: s for i, s in enumerate(batch) if is_end_marker(s)}
        samples: list[Sample] = []
        for group in pixel_groups([s for s in batch if not is_end_marker(s)], self.pixel_budget):
            for stage in self.stages:
                group = _run_in_micro_batches(stage, group)
            samples.extend(group)
        if self.final:
            for sample in samples:
                if sample.get("status") not in RELEASED_STATUSES + (QUARANTINED,):
                    quarantine(sample, f"internal_error: sample left the pipeline with status {sample.get('status')!r}")
                strip_working_fields(sample)
        # Put end markers back where they were so the stream order is unchanged.
        out: list[Sample] = []
        it = iter(samples)
        for i in range(len(batch)):
            out.append(markers[i] if i in markers else next(it))
        return out


def sample_pixels(sample: Sample) -> int:
    """Decoded size of a sample's image: from its working pixels once decoded, else from the
    image header (no pixel is decoded). 0 when unknown (not an image, unreadable header): the
    decoder's own ``max_pixels`` guard bounds those."""
    pixels = sample.get("_pixels")
    if pixels is not None:
        return int(pixels.shape[0]) * int(pixels.shape[1])
    field = sample.get("__image__")
    data = sample.get(field) if isinstance(field, str) else None
    if not isinstance(data, bytes | bytearray):
        return 0
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings: the decoder decides, not this estimate
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - any unreadable header is the decoder's to report
        return 0
    return int(width) * int(height)


def pixel_groups(samples: list[Sample], budget: int | None) -> list[list[Sample]]:
    """Split a batch into consecutive groups whose images hold at most ``budget`` pixels
    together, so a worker's memory is bounded by the budget rather than by the batch size
    times the largest image. An image over the budget is a group of its own. Every stage
    treats samples independently, so the groups give the same output as one batch."""
    if budget is None or len(samples) <= 1:
        return [samples] if samples else []
    groups: list[list[Sample]] = []
    current: list[Sample] = []
    held = 0
    for sample in samples:
        size = sample_pixels(sample)
        if current and held + size > budget:
            groups.append(current)
            current, held = [], 0
        current.append(sample)
        held += size
    groups.append(current)
    return groups


def _run_in_micro_batches(stage: Stage, samples: list[Sample]) -> list[Sample]:
    size = max(1, stage.batch_size)
    out: list[Sample] = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        fault_point(f"stage:{stage.name}")
        result = stage.process_batch(chunk)
        if len(result) != len(chunk):
            raise RuntimeError(f"stage {stage.name} returned {len(result)} samples for {len(chunk)}")
        out.extend(result)
    return out


def limit_threads(n: int) -> None:
    """Pin math libraries to ``n`` threads in this worker process.

    Several workers share the cores; one thread each avoids oversubscription, and a fixed
    thread count keeps float reductions, and so output bytes, the same on every runner.
    """
    import sys

    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass
    # torch is pinned only if a stage already imported it (MTCNN pins its own threads when it
    # loads): importing it here would cost every worker ~400 MB for nothing.
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


@dataclass
class ShardResult:
    shard_id: str
    n_samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    n_faces: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def n_failed(self) -> int:
        return self.counts.get(QUARANTINED, 0)


class ShardCommitter:
    """Streams one shard's processed samples to its writer, then commits: the shard's old
    manifest (if any) is withdrawn, data files are renamed into place, and the manifest is
    written last, so a manifest on disk always means the shard's release files are complete
    and are the ones it describes. A kill at any point leaves at worst a shard without a
    manifest (redone on resume) and temp files (removed on resume).

    A write that fails (disk full, permission denied) stops the run with
    :class:`~veil.pipelines.sinks.OutputWriteError`: the shard is aborted, and data renamed
    before its manifest failed are taken back, so only committed shards remain."""

    def __init__(self, shard: Shard, source: Source, output_root: str | Path | OutputStore,
                 fingerprint: str) -> None:
        from veil.pipelines.sinks import open_writer

        self.shard = shard
        self.store = as_store(output_root)
        self.fingerprint = shard_fingerprint(fingerprint, shard)
        try:
            self._writer = open_writer(shard, self.store, source=source)
        except OSError as exc:
            raise self._output_error(exc) from exc
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._statuses: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._faces = 0
        self._start = time.perf_counter()

    def add(self, sample: Sample) -> None:
        from veil.pipelines.manifest import manifest_row

        if is_end_marker(sample):
            return
        key = sample["__key__"]
        if key in self._keys:
            # Every input key appears exactly once; a second sample with the same key is
            # never released (it could overwrite the first in the output).
            quarantine(sample, "duplicate_key: key already seen in this shard")
            key = f"{key}#dup{len(self._rows)}"
            sample["__key__"] = key
        self._keys.add(key)
        if sample.get("status") in RELEASED_STATUSES:
            try:
                self._writer.write(sample)
            except OSError as exc:
                # The output's fault, not the sample's, and the shard file may be torn: stop.
                raise self._output_error(exc) from exc
            except Exception as exc:  # noqa: BLE001 - a sample the sink rejects is not released
                from veil.transforms.stage import describe_exception

                quarantine(sample, f"write_error: {describe_exception(exc)}")
        row = manifest_row(sample)
        self._rows.append(row)
        self._statuses[row["status"]] += 1
        if row["status"] == QUARANTINED:
            self._reasons[reason_code(row["reason"])] += 1
        self._faces += int(row.get("n_faces") or 0)

    def _output_error(self, exc: OSError) -> Exception:
        """A failed write of this shard's data, as the run-stopping error naming its path."""
        from veil.pipelines.sinks import DATA_DIR, output_error

        return output_error(exc, self.store.display(f"{DATA_DIR}/{self.shard.id}"))

    def commit(self) -> ShardResult:
        from veil.pipelines.manifest import remove_manifest, write_manifest

        remove_manifest(self.store, self.shard.id)
        try:
            outputs = self._writer.commit()
        except OSError as exc:
            raise self._output_error(exc) from exc
        self._rows.sort(key=lambda r: (r["index"], r["key"]))
        try:
            write_manifest(self.store, self.shard.id, self._rows, run_fingerprint=self.fingerprint,
                           extra={"outputs": ",".join(outputs)})
        except BaseException:
            for relative in outputs:  # never leave released data that no manifest describes
                self.store.delete(relative)
            raise
        return ShardResult(
            shard_id=self.shard.id,
            n_samples=len(self._rows),
            counts=dict(self._statuses),
            reasons=dict(self._reasons),
            n_faces=self._faces,
            seconds=time.perf_counter() - self._start,
            outputs=list(outputs),
        )

    def abort(self) -> None:
        self._writer.abort()
