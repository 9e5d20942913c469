"""Whole people in images: OpenCV's HOG people detector as the ``persons`` PII class.

A face is not the only thing that identifies someone: build, clothes and gait do too, so the
``persons`` class finds whole bodies and its policy hides them (the face inside keeps the face
policy). The detector is the Dalal-Triggs HOG + linear SVM shipped inside OpenCV
(``cv2.HOGDescriptor_getDefaultPeopleDetector``, trained on INRIA pedestrians): it needs no
model file and nothing is downloaded. No better person detector ships with an installed
package (OpenCV's Haar full/upper-body cascades found nothing on the same photos; rapidocr,
facenet-pytorch, dlib and the face models here are text or face detectors; torchvision ships
no weights), so HOG it is, with its known limits:

* **Standing people only.** The SVM scores a 64x128 window in which a standing person is about
  96 px tall. On portraits (a person cut at the knees or the waist) it fires on the head and
  torso as if they were a whole small pedestrian, so a box may cover only the upper body.
  Boxes are therefore padded, more downwards (:data:`PAD_BOTTOM`); a sitting, lying or
  heavily occluded person is often missed. Faces are still found by the face class.
* **Size.** The window sees people from ~96 px tall upwards (the pyramid shrinks the image
  for larger ones). To find people ``min_height`` px tall the image is upscaled by
  ``96 / min_height`` (at most :data:`MAX_UPSCALE`), unless that makes its long side exceed
  ``max_side``: large photos are *downscaled* to ``max_side`` instead, since people in them
  are large, and the cost of HOG grows with the pixel count.
* **Cut by the frame.** A person whose head touches the top edge, or cut at the knees, has no
  window that holds them and is missed. ``border`` adds a replicated border around the image
  before scanning, which finds such people in the shipped portraits (SVM score 0.26-0.70)
  but makes posts of repeated edge pixels look like legs: 8 of 17 person-free images got a
  box above 0.25 instead of 2, so it is off by default. Faces in portraits are the face
  class's job.
* **Scores** are SVM margins, not probabilities. The man pasted at 200-440 px into a photo
  scores 0.7-1.3; of 17 person-free skimage photos only the rocket scores (1.07), but text
  columns scored up to 1.8 at other scan sizes. The default threshold keeps recall and
  accepts such false positives: hiding a rocket costs little, missing a person is a leak.

Detections from the one scan are merged by OpenCV's rectangle grouping, then by non-maximum
suppression (:func:`nms`), which also drops a box lying mostly inside a higher-scoring one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.transforms.regions import RegionDetector
from veil.transforms.stage import Resources, Sample, region_box

#: Height of a standing person inside the HOG detector's 64x128 window (INRIA training crops).
HOG_PERSON_HEIGHT = 96
#: Upscaling limit: beyond 2x, HOG sees interpolation blur, not people.
MAX_UPSCALE = 2.0
#: Default lowest SVM score kept. People in the shipped photos score 0.7-1.3 (upper bodies
#: in portraits, with ``border``, as low as 0.26); see the module docstring.
DEFAULT_SCORE_THRESHOLD = 0.3
#: Default long side of the image HOG scans (after any upscaling); ~100-300 ms of CPU.
DEFAULT_MAX_SIDE = 960
#: Default smallest person height looked for, in original image pixels.
DEFAULT_MIN_HEIGHT = 80
#: Padding of every box: a fraction of its width on the left and on the right, and of its
#: height above and below. HOG boxes on whole pedestrians are loose already, but on portraits
#: they hold the head and torso only, narrower than crossed arms: padding favours the body
#: below the box.
PAD_SIDE, PAD_TOP, PAD_BOTTOM = 0.2, 0.1, 0.35
#: Boxes overlapping more than this (IoU), or lying this much inside a better box, are one.
NMS_IOU = 0.4
#: A residual person counts as anonymized when this fraction of its box is covered by person
#: regions anonymized before (a blurred person is still person-shaped).
RESIDUAL_COVERAGE = 0.5
#: HOG pyramid step and window stride: 1.05 and 8 px are OpenCV's defaults; 1.1 halves the
#: cost but missed people in the shipped photos at some sizes.
PYRAMID_SCALE = 1.05
WIN_STRIDE = (8, 8)


class PersonDetector(RegionDetector):
    """Finds standing people with OpenCV's HOG people detector.

    ``score_threshold``: lowest SVM score kept. ``max_side``: longest side of the image HOG
    scans (larger images are downscaled; smaller ones upscaled for ``min_height``).
    ``min_height``: smallest person height, in original pixels, the scan is sized for.
    ``border``: replicated border added on each side before scanning, as a fraction of the
    side (0 = none; see the module docstring for what it finds and costs).
    """

    pii_class = "persons"
    kind = "person"
    resources = Resources(cpus=0.5)
    name = "hog"
    #: The loaded HOG descriptor; dropped when pickled (``RegionDetector.__getstate__``).
    _hog: Any = None

    def __init__(self, score_threshold: float = DEFAULT_SCORE_THRESHOLD, *,
                 max_side: int = DEFAULT_MAX_SIDE, min_height: int = DEFAULT_MIN_HEIGHT,
                 border: float = 0.0) -> None:
        if not np.isfinite(score_threshold):
            raise ValueError(f"score_threshold must be a finite number, got {score_threshold}")
        if max_side < 128:
            raise ValueError(f"max_side must be at least 128 (the HOG window height), got {max_side}")
        if min_height < 16:
            raise ValueError(f"min_height must be at least 16 px, got {min_height}")
        if not 0.0 <= border <= 0.5:
            raise ValueError(f"border must be a fraction in [0, 0.5], got {border}")
        self.score_threshold = float(score_threshold)
        self.max_side = int(max_side)
        self.min_height = int(min_height)
        self.border = float(border)

    def setup(self) -> None:
        if self._hog is not None:
            return
        import cv2

        hog = cv2.HOGDescriptor()
        hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self._hog = hog

    def scale_for(self, height: int, width: int) -> float:
        """The factor the image is resized by before scanning (see the module docstring)."""
        want = min(HOG_PERSON_HEIGHT / self.min_height, MAX_UPSCALE)
        cap = self.max_side / max(height, width, 1)
        return min(want, cap)

    def detect(self, rgb: np.ndarray, sample: Sample) -> list[dict[str, Any]]:
        import cv2

        self.setup()
        image = _as_rgb(rgb)
        h, w = image.shape[:2]
        if h < 8 or w < 8:
            return []
        s = self.scale_for(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        by, bx = round(size[1] * self.border), round(size[0] * self.border)
        if by or bx:
            work = cv2.copyMakeBorder(work, by, by, bx, bx, cv2.BORDER_REPLICATE)
        rects, weights = self._hog.detectMultiScale(work, hitThreshold=0.0, winStride=WIN_STRIDE,
                                                    scale=PYRAMID_SCALE)
        boxes, scores = [], []
        for (x, y, bw, bh), score in zip(np.reshape(rects, (-1, 4)), np.ravel(weights), strict=True):
            if float(score) < self.score_threshold:
                continue
            x0, y0 = (x - bx) / s, (y - by) / s
            boxes.append(_pad((x0, y0, x0 + bw / s, y0 + bh / s), w, h))
            scores.append(float(score))
        return [{"box": [float(v) for v in boxes[i]], "score": scores[i], "detector": self.name,
                 "kind": self.kind} for i in nms(boxes, scores)]

    def residual(self, rgb: np.ndarray, sample: Sample, regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """People found in the released pixels whose box is less than
        :data:`RESIDUAL_COVERAGE` covered by the person regions anonymized so far."""
        found = self.detect(rgb, sample)
        done = [region_box(r["box"]) for r in regions if r.get("kind") == self.kind]
        return [r for r in found if coverage(region_box(r["box"]), done) < RESIDUAL_COVERAGE]


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as a contiguous HxWx3 uint8 array (grey and RGBA inputs are converted)."""
    image = np.asarray(rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"PersonDetector expects uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"PersonDetector expects an HxWx3 image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def _pad(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """``box`` grown by :data:`PAD_SIDE`, :data:`PAD_TOP`, :data:`PAD_BOTTOM`, clipped."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    return (max(0.0, x0 - PAD_SIDE * bw), max(0.0, y0 - PAD_TOP * bh),
            min(float(width), x1 + PAD_SIDE * bw), min(float(height), y1 + PAD_BOTTOM * bh))


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _intersection(a: Sequence[float], b: Sequence[float]) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def nms(boxes: Sequence[Sequence[float]], scores: Sequence[float], *, iou: float = NMS_IOU) -> list[int]:
    """Indices of the boxes kept, best score first: a box is dropped when it overlaps a kept
    one by more than ``iou``, or lies more than ``1 - iou`` inside it (HOG reports a person's
    torso inside their whole body)."""
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda k: -scores[k]):
        a = boxes[i]
        drop = False
        for j in kept:
            inter = _intersection(a, boxes[j])
            union = _area(a) + _area(boxes[j]) - inter
            if (union > 0 and inter / union > iou) or (_area(a) > 0 and inter / _area(a) > 1 - iou):
                drop = True
                break
        if not drop:
            kept.append(i)
    return kept


def coverage(box: Sequence[float], cover: Sequence[Sequence[float]]) -> float:
    """Fraction of ``box``'s area inside the union of the ``cover`` boxes (pixel grid)."""
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])),
                      int(np.ceil(box[2])), int(np.ceil(box[3])))
    if x1 <= x0 or y1 <= y0:
        return 1.0
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for c in cover:
        cx0, cy0 = max(int(np.floor(c[0])), x0), max(int(np.floor(c[1])), y0)
        cx1, cy1 = min(int(np.ceil(c[2])), x1), min(int(np.ceil(c[3])), y1)
        if cx1 > cx0 and cy1 > cy0:
            mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = True
    return float(mask.mean())


__all__ = ["DEFAULT_MAX_SIDE", "DEFAULT_MIN_HEIGHT", "DEFAULT_SCORE_THRESHOLD", "PersonDetector",
           "coverage", "nms"]
