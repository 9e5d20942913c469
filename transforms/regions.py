"""Personal-data classes found in images besides faces: the detector contract and its stage.

A class (``persons``, ``plates``, ``text``) is one :class:`RegionDetector` in one module
(``transforms/persons.py``, ``plates.py``, ``text.py``), run by its own
:class:`RegionDetectStage` with its own resources, so adding a class is adding a stage. The
detector finds regions on the decoded original (``detect``) and says, on the released pixels,
what is still personal data (``residual``): the re-scan calls it on the encoded output and
strengthens or quarantines. A policy (``pii.policy``) maps each class to an anonymizer.

Regions are the sample's ``regions`` dicts with ``kind`` set to the class's region kind
(``person``, ``plate``, ``text``). A region never carries what was read: text regions keep
only the entity type (``entity``), plates only ``kind: plate``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.transforms.stage import ModelStage, Resources, Sample, SampleStage

if TYPE_CHECKING:
    from veil.config import PIIConfig

#: Image classes and the region kind each one writes.
REGION_KINDS: dict[str, str] = {"faces": "face", "persons": "person", "plates": "plate", "text": "text"}


def is_face(region: dict[str, Any]) -> bool:
    return str(region.get("kind") or "face") == "face"


def kind_methods(pii: PIIConfig) -> dict[str, str]:
    """Region kind -> policy method of the classes ``pii`` (a PIIConfig) enables besides faces."""
    return {REGION_KINDS[c]: pii.method_of(c) for c in pii.classes if c in REGION_KINDS and c != "faces"}


class RegionDetector(ABC):
    """One image PII class's detector. Picklable before ``setup()``: models load there."""

    #: ``pii`` class name (``persons``...) and the region ``kind`` it writes.
    pii_class: str = ""
    kind: str = ""
    #: What one worker of its stage needs.
    resources: Resources = Resources(cpus=0.5)

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models once per worker."""

    @abstractmethod
    def detect(self, rgb: np.ndarray, sample: Sample) -> list[dict[str, Any]]:
        """Regions of this class in the decoded original ``rgb`` (HxWx3 uint8). ``sample``
        may carry working state shared between detectors (``_``-prefixed fields)."""

    @abstractmethod
    def residual(self, rgb: np.ndarray, sample: Sample, regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Regions of this class still exposed in the *released* pixels ``rgb`` (decoded from
        the encoded output). ``regions``: every region anonymized so far (all kinds)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class RegionDetectStage(ModelStage, SampleStage):
    """Runs one :class:`RegionDetector` on the decoded original (``sample["_decoded"].rgb``) and
    appends its regions. It runs after the face stages (detection, pairing, the face
    anonymizer), so those only ever see faces; :class:`~veil.transforms.policy.PolicyStage`
    then anonymizes these regions by class."""

    stateful = True

    def __init__(self, detector: RegionDetector, *, batch_size: int = 16) -> None:
        self.detector = detector
        self.name = f"detect_{detector.pii_class}"
        self.resources = detector.resources
        self.batch_size = batch_size

    def setup(self) -> None:
        if self._ready:
            return
        self.detector.setup()
        self._ready = True

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        return SampleStage.process_batch(self, batch)

    def process_sample(self, sample: Sample) -> Sample:
        decoded = sample.get("_decoded")
        rgb = decoded.rgb if decoded is not None else sample["_pixels"]
        found = self.detector.detect(rgb, sample)
        for region in found:
            region["kind"] = self.detector.kind
        sample["regions"] = [*(sample.get("regions") or []), *found]
        return sample


def build_region_detectors(pii: PIIConfig, models: dict[str, Any],
                           classes: tuple[str, ...] = ("persons", "plates", "text")) -> list[RegionDetector]:
    """A fresh detector per image class of ``classes`` that ``pii`` enables (in stage order),
    configured from ``pii``; ``models``: model-registry keyword arguments. Their models load
    in each worker's ``setup()``. The run's stages, its re-scan and validation all build them
    here, so they read images the same way."""
    out: list[RegionDetector] = []
    # The plate and text classes read with one OCR configuration (their readings are shared).
    ocr = {"ocr_max_side": pii.ocr_max_side, "ocr_min_score": pii.ocr_min_score, "ocr_prescan": pii.ocr_prescan,
           "ocr_prescan_precision": pii.ocr_prescan_precision, "ocr_prescan_peak": pii.ocr_prescan_peak}
    if "persons" in classes and "persons" in pii.classes:
        from veil.transforms.persons import PersonDetector

        out.append(PersonDetector(score_threshold=pii.person_threshold))
    if "plates" in classes and "plates" in pii.classes:
        from veil.transforms.plates import PlateDetector

        out.append(PlateDetector(**ocr, haar=pii.plate_cascades, models=models))
    if "text" in classes and "text" in pii.classes:
        from veil.transforms.text import TextDetector

        out.append(TextDetector(scope=pii.text_scope, entities=list(pii.entities),
                                score_threshold=pii.score_threshold, language=pii.language,
                                spacy_model=pii.spacy_model, **ocr, models=models))
    return out
