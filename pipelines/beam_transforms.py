"""Apache Beam DoFns around Veil's stage chain.

Kept apart from ``runners.py`` so that Beam is imported only when the Beam runner is used,
and so Beam's pickler sees small module-level functions and classes.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from veil.pipelines.execution import ShardCommitter, StageChain, is_end_marker, read_with_end_marker
from veil.pipelines.sources import Source
from veil.transforms.stage import Sample, describe_exception, quarantine, strip_working_fields

#: Tag of the dead-letter output: samples whose batch failed outside per-sample handling.
DEAD_LETTER = "dead_letter"


def read_shard(shard_blob: bytes, source: Source) -> Iterator[Sample]:
    yield from read_with_end_marker(source, pickle.loads(shard_blob))


class ChainDoFn(beam.DoFn):
    """Runs the fused stage chain on a batch. Models load once per DoFn instance in
    ``setup()``. A batch that fails as a whole (a bug, a model crash) goes to the dead-letter
    output, each sample quarantined with the reason, instead of failing the pipeline."""

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
