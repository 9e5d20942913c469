"""Reading text in images: one OCR engine shared by the text and plate classes.

The engine is RapidOCR 3.10 running PaddleOCR's PP-OCRv6 small detector and recognizer
(ONNX, Apache-2.0) on onnxruntime with one intra-op thread: a worker is one core, and the
runners scale by adding workers. The two model files ship inside the ``rapidocr`` wheel and
are resolved and checksummed through Veil's model registry (``ppocrv6_det_small``,
``ppocrv6_rec_small``), so RapidOCR never looks for or downloads a model itself. The angle
classifier is off: it costs a third network per line and only helps text rotated by 180
degrees, which signs, boards and plates in photos rarely are.

**Resolution.** RapidOCR's default detector setting (``limit_type: min, limit_side_len:
736``) *upscales* a 640x480 photo to 981x736 before detection, which costs 2.4x the CPU of
running it at its own size and finds no more text there. Here the detector runs at the
image's native resolution (``limit_type: max`` with the limit at ``max_side``: smaller images
are never resized). An image larger than ``max_side`` is not downscaled: a 20 px line of text
in a 48 MP photo would shrink below what the recognizer reads, and unread text is text left
in the release. It is cut into overlapping tiles of at most ``max_side`` pixels (the tile
plan the face detector uses), each read at native resolution; neighbouring tiles overlap by a
quarter of a tile, so a line shorter than that lies whole in one tile, and a fragment of a
line cut by a tile border is dropped when a whole reading of it from the neighbouring tile
covers it; a longer line, cut in both tiles, is stitched back from its two halves. Cost grows with the pixel count, as it must for the same recall.

**Pre-scan.** Most photos hold no text, yet the detector at native resolution costs about as
much as the face detector. So each image (or tile) is first run through the same detector at
``prescan`` times its size (0.5: a quarter of the pixels and of the cost). Every place where
that low-resolution probability map rises above :data:`PRESCAN_THRESHOLD` (below the 0.3 at
which the detector's own post-processing starts a text region) and somewhere reaches
``prescan_peak`` (:data:`DEFAULT_PRESCAN_PEAK`) becomes a window, grown by
:data:`PRESCAN_CONTEXT` line heights of context on each side and snapped to the detector's
32-pixel grid, and only these windows are read at native resolution (det and rec). An image
with no such place is not read further; when the windows would cover more than
:data:`PRESCAN_FULL_READ` of the image, it is read whole, as without the pre-scan. The text
the pre-scan can miss is text the low-resolution map does not respond to at all; the evidence
that it finds every line the native pass reads is in BENCHMARKS.md (issue 11), and
``prescan: 0`` turns it off.

:func:`shared_read` keeps one reading per image in the sample's working field ``_ocr``, keyed
by a digest of the pixels, so the text and plate detectors share one OCR pass on the original
and the re-scan of the released pixels gets its own. Readings never leave the worker: the
field is ``_``-prefixed, and detectors write only boxes and entity types.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.transforms.models import ModelRegistry
from veil.transforms.stage import Sample, WorkerSetupError

#: Registry names of the detector and recognizer models.
DET_MODEL = "ppocrv6_det_small"
REC_MODEL = "ppocrv6_rec_small"
#: Default longest side read in one pass; larger images are tiled.
DEFAULT_MAX_SIDE = 1600
#: Working sample field holding the OCR readings per pixel digest.
OCR_FIELD = "_ocr"
#: Default scale of the low-resolution pre-scan (0 reads every image whole at native size).
DEFAULT_PRESCAN = 0.5
#: The pre-scan's detector runs in int8 (derived from the float model, transforms/quantize.py):
#: about 4.5x faster at the pre-scan's size. It only chooses the windows; they are read by the
#: float detector and recognizer, and validation reads every released image whole in float.
DEFAULT_PRESCAN_PRECISION = "int8"
#: Pre-scan probability above which a place may hold text: a third of the detector's own
#: binarisation threshold (0.3). Lines of 6-9 px characters were still found at 0.5 on the
#: benchmark sets; the margin is for text the half-size map barely sees.
PRESCAN_THRESHOLD = 0.1
#: A pre-scan place becomes a window only where its probability somewhere reaches this (its
#: extent is still where it exceeds :data:`PRESCAN_THRESHOLD`). Most places photos raise on
#: the half-size map are faint blobs in textures that never reach the detector's own 0.3:
#: 1366 of 1444 on bench_pipeline's scenes, each costing a native read that finds at most a
#: mark ("4", "A", "7"). Every line of three or more letters or digits the benchmark sets hold
#: (257 places, 6-9 px characters included) peaks at 0.97 or more; evidence in BENCHMARKS.md.
#: 0 keeps every place (the rule before).
DEFAULT_PRESCAN_PEAK = 0.2
#: Context around a pre-scan candidate, in line heights (at least :data:`PRESCAN_MIN_MARGIN` px).
PRESCAN_CONTEXT = 1.0
PRESCAN_MIN_MARGIN = 24
#: Windows covering more than this fraction of an image: one native read of the whole image.
PRESCAN_FULL_READ = 0.5
#: The detector's input grid: windows are multiples of it, so RapidOCR never resizes them.
DET_GRID = 32

log = logging.getLogger(__name__)


class OCRUnavailableError(WorkerSetupError):
    """The OCR engine (rapidocr / onnxruntime) cannot be loaded; the message says what to install."""


@dataclass(frozen=True)
class TextLine:
    """One line of text read in an image: its axis-aligned ``box`` [x0, y0, x1, y1] and its
    ``quad`` (4x2 float corners, clockwise from top-left along the reading direction) in image
    pixels, the ``text`` read and the recognizer's ``score``. Working data only: never written
    to a manifest, report or log."""

    box: tuple[float, float, float, float]
    quad: np.ndarray
    text: str
    score: float

    @property
    def height(self) -> float:
        """Line height along the quad's sides (rotation-independent)."""
        q = self.quad
        return float((np.linalg.norm(q[3] - q[0]) + np.linalg.norm(q[2] - q[1])) / 2.0)

    @property
    def width(self) -> float:
        """Line length along the quad's top and bottom edges."""
        q = self.quad
        return float((np.linalg.norm(q[1] - q[0]) + np.linalg.norm(q[2] - q[3])) / 2.0)


def _box_of(quad: np.ndarray) -> tuple[float, float, float, float]:
    return (float(quad[:, 0].min()), float(quad[:, 1].min()), float(quad[:, 0].max()), float(quad[:, 1].max()))


def _covered_fraction(inner: tuple[float, ...], outer: tuple[float, ...]) -> float:
    """Fraction of box ``inner``'s area that lies inside box ``outer``."""
    w = min(inner[2], outer[2]) - max(inner[0], outer[0])
    h = min(inner[3], outer[3]) - max(inner[1], outer[1])
    area = max(inner[2] - inner[0], 1e-6) * max(inner[3] - inner[1], 1e-6)
    return max(w, 0.0) * max(h, 0.0) / area


#: One loaded RapidOCR per (models, settings) and process: the text and plate detectors and the
#: re-scan of one worker share it (each load costs ~30 MB of ONNX sessions and a second).
#: Reads go through a lock (Beam runs several threads per worker on one object).
_ENGINES: dict[tuple[str, str, str], Any] = {}
_ENGINES_LOCK = threading.Lock()
_READ_LOCK = threading.Lock()


class OCREngine:
    """Reads text lines in RGB images. Cheap to construct and to pickle; models load in
    :meth:`setup` (or on first use), once per worker.

    ``max_side``: longest side read in one pass (larger images are tiled at native
    resolution). ``min_score``: lowest recognizer score of a line kept. ``registry_kwargs``:
    keyword arguments of :class:`ModelRegistry` (``paths``, ``models_dir``, ``cache_dir``,
    ``allow_download``) used to find the two model files.
    """

    def __init__(self, *, max_side: int = DEFAULT_MAX_SIDE, min_score: float = 0.5,
                 prescan: float = DEFAULT_PRESCAN, prescan_precision: str = DEFAULT_PRESCAN_PRECISION,
                 prescan_peak: float = DEFAULT_PRESCAN_PEAK,
                 registry_kwargs: dict[str, Any] | None = None) -> None:
        if max_side < 64:
            raise ValueError(f"OCR max_side must be at least 64 pixels, got {max_side}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"OCR min_score must be in [0, 1], got {min_score}")
        if not (prescan == 0 or 0.25 <= prescan < 1.0):
            raise ValueError(f"OCR prescan must be 0 (off) or a scale in [0.25, 1), got {prescan}")
        if prescan_precision not in ("int8", "fp32"):
            raise ValueError(f"OCR prescan_precision must be int8 or fp32, got {prescan_precision!r}")
        if not 0.0 <= prescan_peak < 1.0:
            raise ValueError(f"OCR prescan_peak must be in [0, 1), got {prescan_peak}")
        self.max_side = int(max_side)
        self.min_score = float(min_score)
        self.prescan = float(prescan)
        self.prescan_precision = prescan_precision
        self.prescan_peak = float(prescan_peak)
        self.registry_kwargs = dict(registry_kwargs or {})
        self._ocr: Any = None
        self._prescan_session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ocr"] = None
        state["_prescan_session"] = None
        return state

    @property
    def signature(self) -> str:
        """What makes two engines read the same image the same way (the cache key part)."""
        return f"{DET_MODEL}+{REC_MODEL}:{self.max_side}:{self.min_score}:{self.prescan}:{self.prescan_precision}:{self.prescan_peak}"

    def setup(self) -> None:
        if self._ocr is not None:
            return
        registry = ModelRegistry(**self.registry_kwargs)
        det_path = registry.resolve(DET_MODEL)  # ModelNotFoundError / ModelChecksumError say what to do
        rec_path = registry.resolve(REC_MODEL)
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise OCRUnavailableError(
                f"text and plate detection need rapidocr and onnxruntime ({exc}); install Veil with "
                "its dependencies (make install)") from exc
        # rapidocr logs every model it loads at INFO through its own logger.
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        params = {
            "Global.log_level": "error",
            "Global.use_cls": False,
            # Tiling happens here; rapidocr's own pre-resize must never shrink a tile.
            "Global.max_side_len": self.max_side,
            "Global.text_score": self.min_score,
            "EngineConfig.onnxruntime.intra_op_num_threads": 1,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            "Det.model_path": str(det_path),
            "Det.limit_type": "max",
            "Det.limit_side_len": self.max_side,
            "Rec.model_path": str(rec_path),
        }
        key = (str(det_path), str(rec_path), self.signature)
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                try:
                    _ENGINES[key] = RapidOCR(params=params)
                except Exception as exc:  # noqa: BLE001 - a broken install is one clear error
                    raise OCRUnavailableError(f"the OCR engine could not be loaded: {exc}") from exc
            prescan_path = det_path
            if self.prescan and self.prescan_precision == "int8":
                from veil.transforms.quantize import cached_or_none, text_detector_int8

                # Without a usable cache the published detector chooses the same windows, only slower.
                prescan_path = cached_or_none(text_detector_int8, det_path, registry.cache_dir) or det_path
            if self.prescan and str(prescan_path) not in _PRESCAN_SESSIONS:
                _PRESCAN_SESSIONS[str(prescan_path)] = _det_session(prescan_path)
            self._prescan_session = _PRESCAN_SESSIONS.get(str(prescan_path))
            self._ocr = _ENGINES[key]

    def read(self, rgb: np.ndarray) -> list[TextLine]:
        """Text lines in ``rgb`` (HxWx3 uint8), top to bottom; images larger than
        ``max_side`` are read tile by tile (see the module docstring)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"OCR expects an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        self.setup()
        height, width = rgb.shape[:2]
        if max(height, width) <= self.max_side:
            # The detector too can return a line as two overlapping pieces ("Tel:+49" and
            # "9 30 1234567"), which the merge joins like two tiles' halves.
            return _drop_fragments(self._read_one(rgb, 0, 0))
        from veil.transforms.detect import tile_plan

        lines: list[TextLine] = []
        for x0, y0, x1, y1 in tile_plan(height, width, tile=self.max_side, overlap=self.max_side // 4):
            lines.extend(self._read_one(rgb[y0:y1, x0:x1], x0, y0))
        return _drop_fragments(lines)

    def _read_one(self, rgb: np.ndarray, dx: int, dy: int) -> list[TextLine]:
        """The lines of one image or tile: read whole, or only in the pre-scan's windows."""
        windows = self.windows(rgb) if self.prescan else None
        if windows is None:
            return self._read_native(rgb, dx, dy)
        lines: list[TextLine] = []
        for x0, y0, x1, y1 in windows:
            lines.extend(self._read_native(rgb[y0:y1, x0:x1], dx + x0, dy + y0))
        return lines

    def windows(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]] | None:
        """The windows [x0, y0, x1, y1) of ``rgb`` that the pre-scan says may hold text (an
        empty list: none), or None when the image is to be read whole (pre-scan off, an image
        too small to be worth it, or windows covering more than :data:`PRESCAN_FULL_READ`)."""
        self.setup()
        height, width = rgb.shape[:2]
        if not self.prescan or min(height, width) < 4 * DET_GRID:
            return None
        prob, scale_xy = _det_probability(self._prescan_session, rgb, self.prescan)
        limit = np.float32(self.prescan_peak)  # compared in the map's own precision
        boxes = [window for window, _box, peak in prescan_places(prob, scale_xy, width, height)
                 if peak > limit]
        boxes = _merge_windows(boxes, width, height)
        # Merged windows do not overlap: their areas add up to the area they cover.
        if sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) > PRESCAN_FULL_READ * width * height:
            return None
        return boxes

    def _read_native(self, rgb: np.ndarray, dx: int, dy: int) -> list[TextLine]:
        # RapidOCR takes BGR arrays (its loader converts files to BGR).
        with _READ_LOCK:
            result = self._ocr(np.ascontiguousarray(rgb[:, :, ::-1]))
        boxes, txts, scores = getattr(result, "boxes", None), getattr(result, "txts", None), getattr(result, "scores", None)
        if boxes is None or txts is None or scores is None:
            return []
        lines = []
        for quad, text, score in zip(boxes, txts, scores, strict=True):
            if score < self.min_score or not text.strip():
                continue
            q = np.asarray(quad, dtype=np.float64).reshape(4, 2) + (dx, dy)
            lines.append(TextLine(box=_box_of(q), quad=q, text=str(text), score=float(score)))
        return lines


_PRESCAN_SESSIONS: dict[str, Any] = {}


def _det_session(det_path: Any) -> Any:
    """A one-thread onnxruntime session of the text detector, for the pre-scan."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(det_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a broken install is one clear error
        raise OCRUnavailableError(f"the OCR pre-scan detector could not be loaded: {exc}") from exc


def _det_probability(session: Any, rgb: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The detector's text probability map of ``rgb`` shrunk by ``scale`` (to the 32-pixel
    grid), and the (x, y) factors from native pixels to map pixels. Preprocessing is
    RapidOCR's for this model: BGR, (x / 255 - 0.5) / 0.5."""
    import cv2

    height, width = rgb.shape[:2]
    h = max(DET_GRID, int(round(height * scale / DET_GRID)) * DET_GRID)
    w = max(DET_GRID, int(round(width * scale / DET_GRID)) * DET_GRID)
    small = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), (w, h), interpolation=cv2.INTER_AREA)
    x = (small.astype(np.float32) * (2.0 / 255.0) - 1.0).transpose(2, 0, 1)[None]
    with _READ_LOCK:
        prob = session.run(None, {session.get_inputs()[0].name: x})[0]
    return prob.reshape(prob.shape[-2:]), (w / width, h / height)


def prescan_places(prob: np.ndarray, scale_xy: tuple[float, float], width: int,
                   height: int) -> list[tuple[tuple[int, int, int, int], tuple[float, ...], float]]:
    """Every place of a pre-scan probability map above :data:`PRESCAN_THRESHOLD`: its window
    in native pixels (grown by a line height of context, on the grid, not yet merged), the
    place's own box in native pixels, and its peak probability (what ``prescan_peak`` reads)."""
    import cv2

    sx, sy = scale_xy
    count, labels, stats, _ = cv2.connectedComponentsWithStats((prob > PRESCAN_THRESHOLD).astype(np.uint8),
                                                               connectivity=8)
    peaks = np.zeros(count, dtype=np.float32)
    np.maximum.at(peaks, labels.ravel(), prob.ravel())
    places = []
    for (x, y, w, h, _area), peak in zip(stats[1:count], peaks[1:count], strict=True):
        # Back to native pixels; the line height is the smaller side of the component.
        x0, y0, x1, y1 = x / sx, y / sy, (x + w) / sx, (y + h) / sy
        margin = max(PRESCAN_MIN_MARGIN, PRESCAN_CONTEXT * min(x1 - x0, y1 - y0))
        window = _snap(x0 - margin, y0 - margin, x1 + margin, y1 + margin, width, height)
        places.append((window, (x0, y0, x1, y1), float(peak)))
    return places


def _snap(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The window grown outward to multiples of :data:`DET_GRID` (at least two cells a side)
    and moved, not cut, to fit inside the image where it can."""
    def axis(a: float, b: float, size: int) -> tuple[int, int]:
        lo = int(np.floor(max(a, 0.0) / DET_GRID)) * DET_GRID
        hi = int(np.ceil(min(b, size) / DET_GRID)) * DET_GRID
        hi = max(hi, lo + 2 * DET_GRID)
        if hi > size:  # shift back inside; the image edge itself need not be on the grid
            lo, hi = max(0, lo - (hi - size)), size
        return lo, hi

    ax0, ax1 = axis(x0, x1, width)
    ay0, ay1 = axis(y0, y1, height)
    return ax0, ay0, ax1, ay1


def _merge_windows(boxes: list[tuple[int, int, int, int]], width: int,
                   height: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows joined into their bounding window until none overlap, so a line
    whose low-resolution response broke into pieces is read whole in one window."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = _snap(min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]),
                                     width, height)
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def _drop_fragments(lines: list[TextLine]) -> list[TextLine]:
    """Tile readings merged. A line mostly covered by a longer line is the same text read
    again from an overlapping tile (or cut by its border), and is dropped; two lines of one
    row that overlap horizontally are the two halves of a line longer than the tile overlap,
    cut by the borders of two tiles, and are stitched back into one, so the analyzer sees
    ``j.smith@mailbox.org`` and not ``j.smith@m`` and ``mith@mailbox.org``."""
    kept: list[TextLine] = []
    for line in sorted(lines, key=lambda ln: -ln.width):
        if any(_inside(line, k) for k in kept):
            continue
        kept.append(line)
    stitched = True
    while stitched:
        stitched = False
        kept.sort(key=lambda ln: ln.box[0])
        for i, a in enumerate(kept):
            for j in range(i + 1, len(kept)):
                b = kept[j]
                overlap_y = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                same_row = overlap_y >= 0.5 * min(a.box[3] - a.box[1], b.box[3] - b.box[1])
                if same_row and a.box[0] < b.box[0] < a.box[2] < b.box[2]:
                    kept[i] = _stitch(a, b)
                    del kept[j]
                    stitched = True
                    break
            if stitched:
                break
    return sorted(kept, key=lambda ln: (ln.box[1], ln.box[0]))


def _inside(line: TextLine, longer: TextLine) -> bool:
    """Whether ``line`` is a reading of part of ``longer``: mostly inside its box, and not
    reaching half a line height beyond either end (a reading that does is stitched)."""
    slack = 0.5 * longer.height
    return (_covered_fraction(line.box, longer.box) >= 0.7
            and line.box[0] >= longer.box[0] - slack and line.box[2] <= longer.box[2] + slack)


def _stitch(left: TextLine, right: TextLine) -> TextLine:
    """One line from two readings of a line cut by tile borders (``left`` starts first and the
    two overlap). The texts are joined at the longest run both read in the shared part
    (``maria.garcie`` + ``ria.garcia@example.com``: at ``ria.garci``); with no run of three
    characters in common, at the middle of the shared span."""
    from difflib import SequenceMatcher

    a, b = left.text, right.text
    text = None
    match = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    if match.size >= 3:
        text = a[:match.a] + b[match.b:]
    if text is None:
        cut = (right.box[0] + left.box[2]) / 2.0
        na = round(len(a) * (cut - left.box[0]) / max(left.box[2] - left.box[0], 1e-6))
        nb = round(len(b) * (cut - right.box[0]) / max(right.box[2] - right.box[0], 1e-6))
        text = a[:na] + b[nb:]
    quad = np.stack([left.quad[0], right.quad[1], right.quad[2], left.quad[3]])
    return TextLine(box=_box_of(np.vstack([left.quad, right.quad])), quad=quad, text=text,
                    score=min(left.score, right.score))


def pixel_digest(rgb: np.ndarray) -> str:
    """A digest of the pixels and their shape: equal arrays read the same."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((rgb.shape, str(rgb.dtype))).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


def shared_read(sample: Sample, rgb: np.ndarray, engine: OCREngine) -> list[TextLine]:
    """The text lines of ``rgb``, read once per image and engine configuration and kept in
    ``sample["_ocr"]``: the text and plate detectors of one sample share a single OCR pass."""
    cache = sample.setdefault(OCR_FIELD, {})
    key = f"{pixel_digest(rgb)}:{engine.signature}"
    lines = cache.get(key)
    if lines is None:
        lines = engine.read(rgb)
        cache[key] = lines
    return lines


__all__ = ["DEFAULT_MAX_SIDE", "DEFAULT_PRESCAN", "DEFAULT_PRESCAN_PEAK", "DET_MODEL", "OCR_FIELD", "OCREngine", "OCRUnavailableError", "REC_MODEL",
           "TextLine", "pixel_digest", "prescan_places", "shared_read"]
