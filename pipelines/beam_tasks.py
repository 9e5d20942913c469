"""The Apache Beam ``DoFn`` of ``BeamRunner.map_shards``: per-shard tasks on Beam workers.

A module of its own so that Beam is imported only when Beam runs, and Beam's pickler finds
the ``DoFn`` by module path on every SDK worker (portable runners start separate worker
processes). A Beam pipeline returns nothing to its driver, so each task's outcome (its result
or its exception) is written as a file that the driver reads once the pipeline has finished.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import apache_beam as beam

from veil.pipelines.runners import ShardWorker, TaskHost


def outcome_path(root: str, index: int) -> str:
    """Where the outcome of task ``index`` is written under a filesystem's ``root``."""
    return f"{root}/{index:08d}.pkl"


class ShardTaskDoFn(beam.DoFn):
    """Runs a :class:`~veil.pipelines.runners.ShardWorker` on ``(index, pickled task)``
    elements; ``setup()`` sets the worker up once per DoFn instance. The outcome file is
    written whole (``pipe_file``), so a retried bundle overwrites it with the same content."""

    def __init__(self, worker: ShardWorker, results: str) -> None:
        self.worker = worker
        self.results = results

    def setup(self) -> None:
        import fsspec

        self.host = TaskHost(self.worker, "beam")
        self.host.start()
        self.fs, self.root = fsspec.core.url_to_fs(self.results)
        self.fs.makedirs(self.root, exist_ok=True)

    def process(self, element: tuple[int, bytes]) -> Iterator[int]:
        index, blob = element
        outcome = self.host.run(index, pickle.loads(blob))
        self.fs.pipe_file(outcome_path(self.root, index), pickle.dumps(outcome, protocol=5))
        yield index
