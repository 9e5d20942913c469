"""Apache Beam DoFns around Veil's stage chain.

Kept apart from ``runners.py`` so that Beam is imported only when the Beam runner is used,
and so Beam's pickler sees small module-level functions and classes.

GPU placement on Beam is per worker, not per DoFn instance: Beam has no fractional-GPU
scheduling. A GPU segment's ``ParDo`` carries an ``accelerator`` resource hint (Dataflow's
syntax, ``type:<gpu>;count:<n>;install-nvidia-driver``) so runners that support hints put
it on workers with accelerators (Dataflow right fitting; Flink/Spark when their workers are
launched with GPUs). The stage's own ``setup()`` picks the worker's device and loads the
model there, once per DoFn instance. The direct runners ignore the hint and run the stage on
the local machine, so ``--gpus-per-worker`` there only decides the device the stage picks.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from veil.pipelines.execution import ShardCommitter, StageChain, is_end_marker, read_with_end_marker
from veil.pipelines.sources import Source
from veil.transforms.stage import Sample, describe_exception, quarantine, strip_working_fields

#: Tag of the dead-letter output: samples whose batch failed outside per-sample handling.
DEAD_LETTER = "dead_letter"

#: GPU type asked for when neither the runner nor the pipeline options name one.
DEFAULT_ACCELERATOR_TYPE = "nvidia-tesla-t4"


def read_shard(shard_blob: bytes, source: Source) -> Iterator[Sample]:
    yield from read_with_end_marker(source, pickle.loads(shard_blob))


def accelerator_hint(gpus: float, *, options: PipelineOptions | None = None,
                     accelerator_type: str | None = None) -> str:
    """The ``accelerator`` resource hint for a segment that needs ``gpus`` per worker.

    An accelerator the user already gave in the pipeline options (``--resource_hints
    accelerator=...``) wins. Otherwise ``count`` is ``ceil(gpus)``: a Beam worker cannot hold
    half a GPU; the DoFn threads of one worker share the GPUs it has.
    """
    from apache_beam.transforms.resources import AcceleratorHint, resource_hints_from_options

    given = resource_hints_from_options(options).get(AcceleratorHint.urn) if options is not None else None
    if given:
        return given.decode()
    count = max(1, math.ceil(gpus - 1e-9))
    return f"type:{accelerator_type or DEFAULT_ACCELERATOR_TYPE};count:{count};install-nvidia-driver"


def segment_pardo(segment: StageChain, *, options: PipelineOptions | None = None) -> beam.PTransform:
    """The ``ParDo`` (main output ``ok``, plus ``DEAD_LETTER``) that runs one chain segment,
    with an ``accelerator`` resource hint when the segment needs GPUs."""
    pardo = beam.ParDo(ChainDoFn(segment))
    if segment.uses_gpus:
        pardo = pardo.with_resource_hints(
            accelerator=accelerator_hint(segment.resources.gpus, options=options))
    return pardo.with_outputs(DEAD_LETTER, main="ok")


class ChainDoFn(beam.DoFn):
    """Runs a fused stage chain, or one segment of it, on a batch. Models load once per DoFn
    instance in ``setup()`` (a GPU stage chooses its device there, never per bundle). A batch
    that fails as a whole (a bug, a model crash) goes to the dead-letter output, each sample
    quarantined with the reason, instead of failing the pipeline: in any segment, so a sample
    that fails early skips the later segments and still reaches its shard's manifest."""

    def __init__(self, chain: StageChain) -> None:
        self.chain = chain

    def setup(self) -> None:
        self.chain.setup()

    def process(self, batch: list[Sample]) -> Iterator[Any]:
        try:
            out = self.chain(list(batch))
        except Exception as exc:  # noqa: BLE001 - dead-letter, not a crashed pipeline
            reason = f"stage_error: {describe_exception(exc)}"
            for sample in batch:
                if is_end_marker(sample):
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER, sample)
                    continue
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, quarantine(strip_working_fields(sample), reason))
            return
        yield from out


class CommitShardDoFn(beam.DoFn):
    """Writes one shard's samples (grouped by shard id) in input order, then its manifest."""

    def __init__(self, source: Source, output: str, fingerprint: str, shards: dict[str, bytes]) -> None:
        self.source = source
        self.output = output
        self.fingerprint = fingerprint
        self.shards = shards

    def process(self, element: tuple[str, Iterable[Sample]]) -> Iterator[str]:
        shard_id, samples = element
        ordered = sorted((s for s in samples if not is_end_marker(s)),
                         key=lambda s: (s.get("__index__", 0), s["__key__"]))
        committer = ShardCommitter(pickle.loads(self.shards[shard_id]), self.source, self.output,
                                   self.fingerprint)
        try:
            for sample in ordered:
                committer.add(sample)
            committer.commit()
        except BaseException:
            committer.abort()
            raise
        yield shard_id


def read_and_process(pipeline: beam.Pipeline, shards: list[Any], source: Source,
                     segments: list[StageChain], *, batch_size: int, options: PipelineOptions,
                     step: str = "Anonymize") -> tuple[beam.PCollection, list[beam.PCollection]]:
    """Read ``shards`` and run their samples through each segment's ``ParDo`` in turn: the
    samples that came through, and each segment's dead letters. One segment keeps the labels a
    fused chain always had (``Batch``, ``{step}``: Dataflow update compatibility)."""
    stream = (
        pipeline
        # Reshuffled so that the shards spread over the workers. Without it, Create's single
        # impulse element fuses every read and every segment after it into one bundle: one
        # worker process under multi_processing, one task slot on Flink, Spark or Dataflow.
        | "Shards" >> beam.Create([pickle.dumps(s) for s in shards], reshuffle=True)
        | "Read" >> beam.FlatMap(read_shard, source=source)
    )
    dead_letters = []
    for i, segment in enumerate(segments):
        suffix = "" if len(segments) == 1 else f"{i}[{segment.name}]"
        processed = (
            stream
            | f"Batch{suffix}" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
            | f"{step}{suffix}" >> segment_pardo(segment, options=options)
        )
        stream = processed.ok
        dead_letters.append(processed[DEAD_LETTER])
    return stream, dead_letters
