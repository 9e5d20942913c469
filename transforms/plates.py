"""The ``plates`` class: vehicle licence plates.

Two sources of candidates, both confirmed by reading characters, so a plate is only reported
where there is something to read and nothing read is ever recorded:

* **OCR lines** (the shared OCR pass of :mod:`veil.transforms.ocr`) whose text looks like a
  plate: with spaces, dots and dashes removed (and stray border marks such as ``|`` at either
  end), 4 to 10 characters, all letters and digits, at least one letter and two digits, no run
  of more than three letters (plates print short letter groups; "OPEN 9-5" and "SALE 2024"
  do not pass), and a line box 1.5 to 8 times as wide as high. The region is the line box
  grown to the plate's edge (a plate's border lies about half a character height around its
  characters).
* **Haar cascades** shipped with OpenCV 4.x (``haarcascade_russian_plate_number.xml``,
  ``haarcascade_license_plate_rus_16stages.xml``). A cascade box is kept when it overlaps an
  OCR plate candidate, or when OCR on the box's crop (upscaled to at least 48 px high) reads
  plate-like text (the rule above, from three characters and one digit, since a crop may
  read part of a plate). This is what the cascades add: plates too small for the full-image
  pass, read again enlarged. Merely reading three letters or digits is not enough: the
  cascades fire on every sign with a line of text (measured on the generated scenes: all of
  the twelve sign images had a cascade box reading three or more), and would report every
  shop sign as a plate. A cascade box mostly inside a line already read and judged not a
  plate is not read again, and at most ``max_haar_checks`` boxes (the largest) are read per
  image, which bounds the cost on cluttered scenes.

:meth:`PlateDetector.residual` runs the same search on the released pixels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from veil.transforms.ocr import (
    DEFAULT_MAX_SIDE,
    DEFAULT_PRESCAN,
    DEFAULT_PRESCAN_PEAK,
    DEFAULT_PRESCAN_PRECISION,
    OCREngine,
    TextLine,
    shared_read,
)
from veil.transforms.regions import RegionDetector
from veil.transforms.stage import Resources, Sample

#: OpenCV's plate cascades (in ``cv2.data.haarcascades``).
HAAR_CASCADES = ("haarcascade_russian_plate_number.xml", "haarcascade_license_plate_rus_16stages.xml")
OCR_DETECTOR = "ocr-plate"
HAAR_DETECTOR = "haar+ocr"

_SEPARATORS = re.compile(r"[\s.\-·]+")
_EDGE_MARKS = re.compile(r"^[^0-9A-Za-z]+|[^0-9A-Za-z]+$")
_LETTER_RUN = re.compile(r"[A-Za-z]+")


class PlateModelError(FileNotFoundError):
    """An OpenCV plate cascade is missing from the installed opencv-python package."""


def looks_like_plate(text: str, *, min_chars: int = 4, min_digits: int = 2) -> bool:
    """Whether ``text`` read by OCR could be a licence plate's characters (module docstring).
    A cascade crop may read only part of a plate, so it is judged with lower minimums."""
    chars = _EDGE_MARKS.sub("", _SEPARATORS.sub("", text))
    if not min_chars <= len(chars) <= 10 or not chars.isascii() or not chars.isalnum():
        return False
    letters = sum(c.isalpha() for c in chars)
    digits = sum(c.isdigit() for c in chars)
    if letters < 1 or digits < min_digits:
        return False
    return max((len(m) for m in _LETTER_RUN.findall(chars)), default=0) <= 3


def _covered(box: list[float], by: tuple[float, float, float, float] | list[float]) -> float:
    """Fraction of ``box``'s area inside ``by``."""
    w = min(box[2], by[2]) - max(box[0], by[0])
    h = min(box[3], by[3]) - max(box[1], by[1])
    return max(w, 0.0) * max(h, 0.0) / max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)


def _overlaps(a: list[float], b: list[float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


class PlateDetector(RegionDetector):
    """Finds licence plates (see the module docstring). ``ocr_max_side``, ``ocr_min_score``,
    ``ocr_prescan``: the shared OCR engine's settings (equal settings share one OCR pass with the text class).
    ``haar``: also run OpenCV's plate cascades. ``max_haar_checks``: most cascade boxes read per
    image. ``models``: keyword arguments of the model registry."""

    pii_class = "plates"
    kind = "plate"
    resources = Resources(cpus=1.0)

    def __init__(self, *, ocr_max_side: int = DEFAULT_MAX_SIDE, ocr_min_score: float = 0.5,
                 ocr_prescan: float = DEFAULT_PRESCAN, ocr_prescan_precision: str = DEFAULT_PRESCAN_PRECISION,
                 ocr_prescan_peak: float = DEFAULT_PRESCAN_PEAK,
                 haar: bool = True, max_haar_checks: int = 8, models: dict[str, Any] | None = None) -> None:
        if max_haar_checks < 0:
            raise ValueError(f"max_haar_checks must be >= 0, got {max_haar_checks}")
        self.engine = OCREngine(max_side=ocr_max_side, min_score=ocr_min_score, prescan=ocr_prescan,
                                prescan_precision=ocr_prescan_precision, prescan_peak=ocr_prescan_peak,
                                registry_kwargs=models)
        self.haar = haar
        self.max_haar_checks = int(max_haar_checks)
        self._cascades: list[Any] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cascades = None  # loaded again by setup() on the worker

    def setup(self) -> None:
        self.engine.setup()
        if self.haar and self._cascades is None:
            cascades = []
            for name in HAAR_CASCADES:
                path = Path(cv2.data.haarcascades) / name
                cascade = cv2.CascadeClassifier(str(path))
                if cascade.empty():
                    raise PlateModelError(
                        f"OpenCV plate cascade {path} is missing or unreadable; it ships with "
                        "opencv-python(-headless) 4.x: reinstall it, or set haar: false")
                cascades.append(cascade)
            self._cascades = cascades

    def detect(self, rgb: np.ndarray, sample: Sample) -> list[dict[str, Any]]:
        return self.find(rgb, shared_read(sample, rgb, self.engine))

    def residual(self, rgb: np.ndarray, sample: Sample, regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.find(rgb, shared_read(sample, rgb, self.engine))

    def find(self, rgb: np.ndarray, lines: list[TextLine]) -> list[dict[str, Any]]:
        """Plate regions in ``rgb`` given its OCR ``lines``."""
        self.setup()
        height, width = rgb.shape[:2]
        found = []
        for line in lines:
            x0, y0, x1, y1 = line.box
            if not 1.5 <= (x1 - x0) / max(y1 - y0, 1.0) <= 8.0 or not looks_like_plate(line.text):
                continue
            mx, my = 0.6 * line.height, 0.5 * line.height
            box = [max(x0 - mx, 0.0), max(y0 - my, 0.0), min(x1 + mx, float(width)), min(y1 + my, float(height))]
            found.append({"kind": self.kind, "box": box, "score": line.score, "detector": OCR_DETECTOR})
        if self.haar:
            rejected = [line.box for line in lines if not any(_overlaps(list(line.box), r["box"]) for r in found)]
            found += self._haar_plates(rgb, [r["box"] for r in found], rejected)
        return found

    def haar_boxes(self, rgb: np.ndarray) -> list[list[float]]:
        """Cascade detections (both cascades), largest first."""
        self.setup()
        assert self._cascades is not None
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        boxes = []
        for cascade in self._cascades:
            hits = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(40, 12))
            boxes += [[float(x), float(y), float(x + w), float(y + h)] for x, y, w, h in np.reshape(hits, (-1, 4))]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def _haar_plates(self, rgb: np.ndarray, ocr_boxes: list[list[float]],
                     rejected: list[tuple[float, float, float, float]]) -> list[dict[str, Any]]:
        """Cascade boxes confirmed by OCR. ``ocr_boxes``: plates the OCR lines found;
        ``rejected``: lines read at native resolution that are not plates (a cascade box
        mostly inside one was already read, and is not read again)."""
        height, width = rgb.shape[:2]
        out: list[dict[str, Any]] = []
        checked = 0
        for box in self.haar_boxes(rgb):
            if any(_overlaps(box, r["box"]) for r in out):
                continue  # both cascades found it
            if any(_overlaps(box, b) for b in ocr_boxes):
                out.append({"kind": self.kind, "box": box, "score": 1.0, "detector": HAAR_DETECTOR})
                continue
            if checked >= self.max_haar_checks or any(_covered(box, r) >= 0.5 or _covered(list(r), box) >= 0.5 for r in rejected):
                continue
            checked += 1
            x0, y0, x1, y1 = box
            mx, my = 0.1 * (x1 - x0), 0.2 * (y1 - y0)
            xa, ya = int(max(x0 - mx, 0)), int(max(y0 - my, 0))
            xb, yb = int(min(x1 + mx, width)), int(min(y1 + my, height))
            crop = rgb[ya:yb, xa:xb]
            if crop.shape[0] < 48:
                f = 48.0 / crop.shape[0]
                crop = cv2.resize(crop, None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
            lines = self.engine.read(np.ascontiguousarray(crop))
            if lines and looks_like_plate(" ".join(line.text for line in lines), min_chars=3, min_digits=1):
                score = max(line.score for line in lines)
                out.append({"kind": self.kind, "box": box, "score": score, "detector": HAAR_DETECTOR})
        return out


__all__ = ["HAAR_CASCADES", "HAAR_DETECTOR", "OCR_DETECTOR", "PlateDetector", "PlateModelError", "looks_like_plate"]
