"""The one stage abstraction every runner adapts.

A stage turns a batch of samples into a batch of samples. It never imports Ray or Beam: the
runners in ``veil.pipelines.runners`` wrap it (a Ray Data actor class, a Beam ``DoFn``, or a
plain loop) and call ``setup()`` once per worker before the first batch.

Sample contract (WebDataset-like dicts):

``__key__``      str, the sample key, unique within the dataset (kept by every stage)
``__shard__``    str, the id of the input shard the sample came from
``__index__``    int, position of the sample within its shard (output order)
``__image__``    str, name of the field that holds the encoded image (``jpg``, ``png`` ...)
<ext>            bytes, the encoded image under its extension; other fields pass through
``status``       ``pending`` | ``anonymized`` | ``clean`` | ``quarantined``
``reason``       str, why a sample is quarantined (or a note), "" otherwise
``regions``      list of dicts ``{kind, box: [x0, y0, x1, y1], score, landmarks, detector}``
``timings``      dict stage name -> seconds spent on this sample

A quarantined sample passes through every later stage untouched: stages must check
``is_quarantined(sample)`` first. A stage that fails on one sample quarantines that sample
with a reason (``quarantine``) and carries on with the rest of the batch.
"""

from __future__ import annotations

import math
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

Sample = dict[str, Any]

QUARANTINED = "quarantined"
ANONYMIZED = "anonymized"
CLEAN = "clean"
PENDING = "pending"


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. Fractional CPUs let several actors share 2 cores."""

    cpus: float = 1.0
    gpus: float = 0.0


class WorkerSetupError(RuntimeError):
    """A model or engine a stage needs cannot be loaded on this worker. It stops the run with
    its message (what to install or where to put a file); it is never a per-sample
    quarantine, which would hide a broken install behind a pile of failed samples."""


class Stage(ABC):
    """A backend-neutral batch transform.

    Subclasses set ``name``, ``resources`` and ``batch_size`` and implement
    ``process_batch``. Heavy state (models) is created in ``setup()``, never in
    ``__init__``: stage objects are pickled and shipped to workers before setup runs.
    """

    name: str = "stage"
    resources: Resources = Resources()
    batch_size: int = 16
    #: True when the stage holds models and should run as a long-lived actor.
    stateful: bool = False

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and other per-worker state. Called once per worker."""

    @abstractmethod
    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        """Return the processed batch: same samples, same order, same keys."""

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        return self.process_batch(batch)


class ModelStage(Stage):
    """A stage whose models are loaded by ``setup()`` into ``_``-prefixed attributes.

    Pickling it (a runner shipping it to a worker) drops those attributes and marks it not
    ready, so every worker loads its own models and never receives torch or onnxruntime
    objects; ``setup()`` returns at once while ``_ready`` is set.
    """

    _ready = False

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["_ready"] = False
        return state


class SampleStage(Stage):
    """A stage that handles samples one at a time, with per-sample failure isolation and
    timing. Subclasses implement ``process_sample``."""

    @abstractmethod
    def process_sample(self, sample: Sample) -> Sample: ...

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        out = []
        for sample in batch:
            if is_quarantined(sample):
                out.append(sample)
                continue
            with timed(sample, self.name):
                try:
                    sample = self.process_sample(sample)
                except WorkerSetupError:
                    raise
                except Exception as exc:  # noqa: BLE001 - failures are data
                    quarantine(sample, f"{self.name}_error: {describe_exception(exc)}")
            out.append(sample)
        return out


def is_quarantined(sample: Sample) -> bool:
    return sample.get("status") == QUARANTINED


def quarantine(sample: Sample, reason: str) -> Sample:
    """Mark a sample as never to be released, with the reason recorded in the manifest."""
    sample["status"] = QUARANTINED
    sample["reason"] = reason
    return sample


def reason_code(reason: str | None) -> str:
    """The short code of a quarantine reason ("truncated_image: ..." -> "truncated_image")."""
    return (reason or "unknown").split(":", 1)[0]


def region_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """A region's ``box`` as finite floats ``(x0, y0, x1, y1)`` with x0 <= x1 and y0 <= y1;
    a box that is not 4 finite numbers is a clear ValueError, not a silent mis-crop."""
    if len(box) != 4:
        raise ValueError(f"a region box needs 4 numbers [x0, y0, x1, y1], got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"region box has a non-finite coordinate: {list(box)!r}")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def strip_working_fields(sample: Sample) -> Sample:
    """Remove working state (``_decoded``, ``_pixels``, ``_mask``, ...) before a sample leaves
    a worker; reserved ``__dunder__`` fields are kept. Mutates and returns ``sample``."""
    for key in [k for k in sample if k.startswith("_") and not k.startswith("__")]:
        del sample[key]
    return sample


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    loc = f" at {where[0].name}" if where else ""
    return f"{type(exc).__name__}: {first}{loc}"[:500]


@contextmanager
def timed(sample: Sample, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings = sample.setdefault("timings", {})
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
