"""The dataset-level identity pass of ``--pseudo-identities`` (pass 1 of 2).

Before the normal run, every shard is read once more through the *same* runner as the run
(local loop, Ray Data actor pools, Beam DoFns), with a short stage chain: decode, detect (the
run's detection settings, so pass 2 finds the same faces at the same places) and
:class:`~veil.transforms.identities.IdentityEmbedStage`. Only small per-face vectors come back
to the driver, never pixels. The driver then clusters them and gives each cluster its
synthetic target (:func:`veil.transforms.identities.build_assignment`); pass 2 receives the
result in a :class:`~veil.transforms.identities.PseudoIdentityStage`.

The pass always covers *every* shard of the input, finished ones included: clustering is a
function of all faces, so a resumed run clusters, assigns and numbers pseudo-identities
exactly as the first run did, and its new shards match the committed ones byte for byte.

Nothing of this pass is written to the output: on Ray and the local loop the records stream
back in memory; Beam has no in-memory collect, so its records go to a private temporary
folder on the driver's machine (mode 0700) that is removed when the pass ends, however it
ends. (A distributed Beam runner's workers must be able to write that folder's path, as they
must already write the output folder to commit shards.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from veil.config import RunConfig
from veil.pipelines.execution import StageChain, is_end_marker
from veil.pipelines.sources import Shard, Source
from veil.transforms.identities import FACES_FIELD, PseudoAssignment
from veil.transforms.stage import Sample, Stage


def identity_stages(config: RunConfig, models: dict[str, Any]) -> list[Stage]:
    """Pass 1's chain: the run's decode and detect, then the per-face embedder."""
    from veil.transforms.detect import DetectStage
    from veil.transforms.identities import IdentityEmbedStage
    from veil.transforms.imageio import DecodeStage

    return [
        DecodeStage(config.io, batch_size=config.batch_size),
        DetectStage(config.detect, models=models, batch_size=config.batch_size),
        IdentityEmbedStage(config.pseudo, models=models, batch_size=config.batch_size),
    ]


def run_identity_pass(config: RunConfig, source: Source, shards: list[Shard], *,
                      models: dict[str, Any]) -> tuple[PseudoAssignment, dict[str, Any]]:
    """Embed, cluster and assign. Returns the assignment for pass 2 and a summary of counts
    (no vector, no pool face) for run.json."""
    from veil.transforms.identities import build_assignment, collect_faces
    from veil.transforms.pool import SyntheticPool

    # A missing or stale pool fails here, before any shard is read.
    pool = SyntheticPool.load(config.pseudo.pool)  # type: ignore[arg-type]
    start = time.perf_counter()
    chain = StageChain(identity_stages(config, models), pixel_budget=config.batch_pixels)
    records = [r for r in stream_records(config, chain, source, shards) if not is_end_marker(r)]
    embed_seconds = time.perf_counter() - start
    faces = collect_faces(records)
    start = time.perf_counter()
    assignment = build_assignment(faces, pool, config.pseudo, weights=config.pool.weights)
    summary = assignment.summary()
    summary.update(samples=len(records), seconds_embed=round(embed_seconds, 3),
                   seconds_assign=round(time.perf_counter() - start, 3),
                   samples_not_embedded=sum(1 for r in records if r.get("status") == "quarantined"))
    return assignment, summary


def stream_records(config: RunConfig, chain: StageChain, source: Source, shards: list[Shard]
                   ) -> Iterator[Sample]:
    """Pass-1 records of every sample of ``shards`` (end markers included), on the run's runner."""
    from veil.pipelines.runners import LocalRunner, RayRunner, RunContext

    ctx = RunContext(source=source, chain=chain, output=Path(config.output), fingerprint="",
                     batch_size=config.batch_size, workers=config.workers,
                     on_sample=lambda _s: None, on_shard=lambda _r: None)
    if config.runner == "local":
        chain.setup()
        yield from LocalRunner._stream(shards, ctx)
    elif config.runner == "ray":
        yield from RayRunner(config.ray_address).stream_samples(shards, ctx)
    elif config.runner == "beam":
        yield from _beam_records(config, chain, source, shards)
    else:
        raise ValueError(f"unknown runner {config.runner!r}")


def _record_json(record: Sample) -> str:
    """One pass-1 record as a JSON line: float32 vectors as exact decimal floats."""
    faces = [{**f, "identity": np.asarray(f["identity"], np.float32).tolist(),
              **({"attributes": np.asarray(f["attributes"], np.float32).tolist()}
                 if f.get("attributes") is not None else {})}
             for f in record.get(FACES_FIELD) or []]
    return json.dumps({**{k: v for k, v in record.items() if k != FACES_FIELD}, FACES_FIELD: faces})


def _beam_records(config: RunConfig, chain: StageChain, source: Source, shards: list[Shard]
                  ) -> Iterator[Sample]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from veil.pipelines import beam_transforms as bt
    from veil.pipelines.runners import beam_pipeline_options

    folder = tempfile.mkdtemp(prefix="veil-identity-pass-")  # mode 0700
    try:
        options = PipelineOptions(beam_pipeline_options(list(config.beam_options)))
        with beam.Pipeline(options=options) as pipeline:
            # Dead letters carry no faces: pass 2 quarantines those samples on its own.
            stream, _ = bt.read_and_process(pipeline, shards, source, chain.segments(),
                                            batch_size=config.batch_size, options=options, step="Embed")
            (
                stream
                | "DropMarkers" >> beam.Filter(lambda s: not is_end_marker(s))
                | "ToJson" >> beam.Map(_record_json)
                | "Write" >> beam.io.WriteToText(os.path.join(folder, "faces"), file_name_suffix=".jsonl")
            )
        for path in sorted(Path(folder).glob("faces*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
