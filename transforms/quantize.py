"""CenterFace with 8-bit convolutions, derived on the machine that runs it.

A run spends most of its CPU in CenterFace: once over every original and again in the
re-scan of every released image. onnxruntime runs its convolutions in 8-bit integers about
1.5x faster than in float32 on x86 CPUs (static quantization: per-channel int8 weights,
uint8 activations whose ranges are measured on calibration images). Veil does not ship the
quantized file: it derives it from the registered ``centerface.onnx`` (whose sha256 the
registry has checked) the first time a run asks for ``detect.precision: int8``, and keeps it
in the model cache under a name that holds the source's checksum, the calibration version
and the onnxruntime version, with a sidecar recording its own sha256. Later runs, and the
other workers on the node, load the cached file after checking that sha256.

The calibration images are generated from pictures shipped inside scikit-image (scenes, the
astronaut's portrait, LFW face crops), with faces pasted at 12-260 px and varied exposure, so
the derived model is the same on every machine with the same onnxruntime and needs no data
set. Evidence that it finds the faces the float32 network finds is in BENCHMARKS.md
(``benchmarks/bench_int8.py``). It is not the default: validation scans in float32, and
near the threshold the two networks disagree on false detections, both ways.

The same recipe derives the OCR pre-scan's text detector (``pii.ocr_prescan_precision``,
int8 by default), calibrated on scikit-image's scenes, page and sign with invented lines of
text drawn on them. There int8 is the default: the pre-scan only chooses the windows, which
the published float detector and recognizer then read, so what a run reports is still the
float models' reading (``benchmarks/bench_ocr_prescan.py``: no line of real text missed).

The same cache keeps the float CenterFace made dynamic (:func:`centerface_dynamic`), so that
a worker loads a checked file instead of importing ``onnx`` to edit the graph each time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.transforms.models import file_sha256

if TYPE_CHECKING:
    from veil.transforms.models import ModelRegistry

log = logging.getLogger(__name__)

#: Bump when the calibration images or quantization settings change: the cached file's name
#: holds it, so an old derived model is never reused under new settings.
CALIBRATION_VERSION = 1
CALIBRATION_IMAGES = 24
CALIBRATION_SEED = 20261204


class QuantizationError(RuntimeError):
    """The int8 model could not be derived or its cached copy does not check."""


def calibration_images(count: int = CALIBRATION_IMAGES, *, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """``count`` RGB uint8 images (640x480 and 320x256: the fine and a coarse pyramid level)
    made from scikit-image's bundled pictures: a scene crop with 1-4 faces pasted at random
    sizes, then a random exposure (gamma 0.5-2, gain 0.6-1.3) so dark and bright photos are
    inside the measured activation ranges."""
    import cv2
    import skimage.data

    rng = np.random.default_rng(seed)
    lfw = np.load(Path(skimage.data.__path__[0]) / "lfw_subset.npy")[:100]  # the first 100 are faces
    astronaut = skimage.data.astronaut()
    portraits = [astronaut[20:250, 140:330], skimage.data.camera()[40:220, 180:340]]
    scenes = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(), astronaut,
              skimage.data.hubble_deep_field(), skimage.data.immunohistochemistry(),
              skimage.data.motorcycle_left() if hasattr(skimage.data, "motorcycle_left") else astronaut,
              skimage.data.page(), skimage.data.camera(), skimage.data.text()]
    images = []
    for index in range(count):
        width, height = (640, 480) if index % 3 else (320, 256)
        canvas = _scene_crop(rng, scenes, width, height)
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.5:
                face = _rgb(portraits[int(rng.integers(len(portraits)))])
            else:
                face = _rgb((lfw[int(rng.integers(len(lfw)))] * 255).astype(np.uint8))
            side = int(min(rng.uniform(12, 260), height - 1, width - 1))
            tile = cv2.resize(face, (max(1, int(side * face.shape[1] / face.shape[0])), side),
                              interpolation=cv2.INTER_AREA if side < face.shape[0] else cv2.INTER_CUBIC)
            tile = tile[:, : width - 1]
            ty, tx = int(rng.integers(0, height - tile.shape[0] + 1)), int(rng.integers(0, width - tile.shape[1] + 1))
            canvas[ty:ty + tile.shape[0], tx:tx + tile.shape[1]] = tile
        images.append(_exposed(rng, canvas))
    return images


#: Words and numbers drawn on the text detector's calibration images (invented, no one's).
CALIBRATION_TEXT = ("Main Street 12", "OPEN", "Tel 0734 567 826", "ab-123-cd", "j.doe@example.org",
                    "SALE 50%", "Platform 3", "KX 4821", "Rue des Lilas", "No parking", "2026-12-04")


def text_calibration_images(count: int = CALIBRATION_IMAGES, *, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """``count`` RGB uint8 images at the OCR pre-scan's input sizes (320x256 and 640x480:
    half of 640x480 photos and of 1280x960 close-ups): scikit-image's scenes, its scanned
    page and its text-on-a-sign photo, with 0-6 lines of text drawn at 4-40 px character
    heights, dark on light or light on dark, then a random exposure."""
    import cv2
    import skimage.data

    rng = np.random.default_rng(seed + 1)
    scenes = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(), skimage.data.astronaut(),
              skimage.data.page(), skimage.data.text(), skimage.data.camera(), skimage.data.immunohistochemistry()]
    images = []
    for index in range(count):
        width, height = (320, 256) if index % 3 else (640, 480)
        canvas = _scene_crop(rng, scenes, width, height)
        for _ in range(int(rng.integers(0, 7))):
            text = CALIBRATION_TEXT[int(rng.integers(len(CALIBRATION_TEXT)))]
            scale = float(rng.uniform(0.15, 1.6))
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            tx, ty = int(rng.integers(0, max(1, width - tw))), int(rng.integers(th + 2, height))
            light = rng.random() < 0.5
            if rng.random() < 0.6:  # a board behind the text
                cv2.rectangle(canvas, (tx - 3, ty - th - 3), (tx + tw + 3, ty + 4),
                              (30, 30, 30) if light else (230, 230, 230), -1)
            cv2.putText(canvas, text, (tx, ty), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (245, 245, 245) if light else (15, 15, 15), max(1, int(scale * 2)), cv2.LINE_AA)
        images.append(_exposed(rng, canvas))
    return images


def _scene_crop(rng: np.random.Generator, scenes: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """A random crop of half to all of a random scene, resized to ``width`` x ``height``."""
    import cv2

    scene = _rgb(scenes[int(rng.integers(len(scenes)))])
    sh, sw = scene.shape[:2]
    ch, cw = int(sh * rng.uniform(0.5, 1.0)), int(sw * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    return np.ascontiguousarray(cv2.resize(scene[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_AREA))


def _exposed(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """``canvas`` under a random exposure: gamma 0.5-2, gain 0.6-1.3."""
    gamma, gain = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))), float(rng.uniform(0.6, 1.3))
    return np.clip(255.0 * gain * (canvas / 255.0) ** gamma, 0, 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def int8_model_name(source_sha256: str, kind: str = "centerface") -> str:
    import onnxruntime as ort

    return f"{kind}-int8-{source_sha256[:16]}-c{CALIBRATION_VERSION}-ort{ort.__version__}.onnx"


def centerface_int8(source: Path, cache_dir: Path) -> Path:
    """The int8 CenterFace derived from ``source``: from the cache when a checked copy is
    there, otherwise derived now (a few seconds; one process at a time per cache, the
    others wait for it and reuse its file)."""
    return _cached_int8(source, cache_dir, "centerface")


def text_detector_int8(source: Path, cache_dir: Path) -> Path:
    """The int8 text detector (PP-OCR det) derived from ``source``, for the OCR pre-scan
    (``pii.ocr_prescan_precision``); cached like :func:`centerface_int8`."""
    return _cached_int8(source, cache_dir, "text-detector")


def _cached_int8(source: Path, cache_dir: Path, kind: str) -> Path:
    return _cached_derived(source, cache_dir, lambda source_sha: int8_model_name(source_sha, kind),
                           lambda target: _derive(source, target, kind),
                           {"calibration_version": CALIBRATION_VERSION, "calibration_images": CALIBRATION_IMAGES,
                            "calibration_seed": CALIBRATION_SEED})


#: Bump when :func:`veil.transforms.detect.centerface_model` edits the graph differently.
DYNAMIC_VERSION = 1


def centerface_dynamic(source: Path, cache_dir: Path) -> Path:
    """The published CenterFace made dynamic (:func:`veil.transforms.detect.centerface_model`),
    as a file in the model cache. Deriving it imports ``onnx`` (about 0.6 s) and re-serialises
    the graph; from the cache, each worker hands the checked file straight to onnxruntime."""
    def derive(target: Path) -> None:
        from veil.transforms.detect import centerface_model

        _write_atomic(target, centerface_model(source).SerializeToString())

    return _cached_derived(source, cache_dir,
                           lambda source_sha: f"centerface-dynamic-{source_sha[:16]}-v{DYNAMIC_VERSION}.onnx",
                           derive, {"dynamic_version": DYNAMIC_VERSION})


def cached_or_none(derived: Callable[[Path, Path], Path], source: Path, cache_dir: Path) -> Path | None:
    """``derived(source, cache_dir)`` (e.g. :func:`centerface_dynamic`), or None when the model
    cache cannot be written: the caller then uses the published model (prepared in memory),
    so a read-only cache costs time, never the run."""
    try:
        return derived(source, cache_dir)
    except OSError as exc:
        log.warning("model cache %s not usable (%s); using %s as published", cache_dir, exc, Path(source).name)
        return None


def _cached_derived(source: Path, cache_dir: Path, name_for: Callable[[str], str],
                    derive: Callable[[Path], None], record: dict[str, Any]) -> Path:
    """``<cache_dir>/derived/<name_for(source sha256)>``, made by ``derive(target)`` unless a
    copy whose sha256 matches its sidecar record (and whose source is ``source``) is already
    there. One process at a time derives (a file lock); the others wait for it and reuse its file."""
    source_sha = file_sha256(source)
    target = Path(cache_dir) / "derived" / name_for(source_sha)
    cached = _checked(target, source_sha)
    if cached is not None:
        return cached
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        cached = _checked(target, source_sha)
        if cached is not None:
            return cached
        log.info("deriving %s from %s", target, source)
        derive(target)
        sidecar = {"source": str(source), "source_sha256": source_sha, "sha256": file_sha256(target), **record}
        _write_atomic(target.with_suffix(".json"), json.dumps(sidecar, indent=1).encode())
    return target


#: Registry name of the float model each int8 recipe is derived from.
INT8_SOURCES = {"centerface": "centerface", "text-detector": "ppocrv6_det_small"}


def int8_provenance(registry: ModelRegistry, kind: str = "centerface") -> dict[str, Any]:
    """The audit row of an int8 model a run uses (deriving it now if needed, so the driver
    does it once before any worker starts): its path and sha256, and the checksum of the
    float model it comes from."""
    name = INT8_SOURCES[kind]
    source = registry.resolve(name)
    path = _cached_int8(source, registry.cache_dir, kind)
    meta = json.loads(path.with_suffix(".json").read_text())
    spec = registry.spec(name)
    return {"name": f"{name}-int8", "path": str(path), "sha256": meta["sha256"], "license": spec.license,
            "source": f"derived from {name} (sha256 {meta['source_sha256']}) by veil.transforms.quantize, "
                      f"calibration v{meta['calibration_version']}"}


def _checked(target: Path, source_sha: str) -> Path | None:
    sidecar = target.with_suffix(".json")
    if not (target.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    actual = file_sha256(target)
    if meta.get("source_sha256") != source_sha or meta.get("sha256") != actual:
        log.warning("cached derived model %s does not match its record (sha256 %s); deriving it again",
                    target, actual)
        return None
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _derive(source: Path, target: Path, kind: str) -> None:
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if kind == "centerface":
        from veil.transforms.detect import centerface_model

        # Per-channel quantization needs opset 13 (DequantizeLinear's axis); the published
        # model is opset 9. The first convolution is kept in float32: on a 3-channel input,
        # int8 is slower than float (measured: 4.6 against 2.6 ms at 640x480).
        model = version_converter.convert_version(centerface_model(source), 13)
        blobs = [rgb.transpose(2, 0, 1)[None].astype(np.float32) for rgb in calibration_images()]
        keep_first_conv = True
    elif kind == "text-detector":
        model = onnx.load(str(source))
        # The pre-scan's input: BGR, (x / 255 - 0.5) / 0.5, at half the images' size.
        blobs = [(rgb[:, :, ::-1].astype(np.float32) * (2.0 / 255.0) - 1.0).transpose(2, 0, 1)[None]
                 for rgb in text_calibration_images()]
        keep_first_conv = False
    else:
        raise ValueError(f"no int8 recipe for {kind!r}")
    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._blobs = iter(blobs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            blob = next(self._blobs, None)
            return None if blob is None else {input_name: blob}

    import onnxruntime as ort

    # The pre-processing session warns about every unused batch-norm counter of the
    # published graph; nothing a user can act on.
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="veil-int8-") as tmp:
        plain, prepared, quantized = (Path(tmp) / name for name in ("plain.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, str(plain))
        # Folds batch-norm into the convolutions first, so the int8 weights are the fused ones.
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        folded = onnx.load(str(prepared))
        for index, node in enumerate(folded.graph.node):
            node.name = f"{node.op_type}_{index}"
        exclude = [next(node.name for node in folded.graph.node if node.op_type == "Conv")] if keep_first_conv else []
        onnx.save(folded, str(prepared))
        try:
            quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            raise QuantizationError(
                f"could not derive the int8 {kind} from {source}: {exc}. Run with detect.precision: "
                "fp32 / pii.ocr_prescan_precision: fp32 to use the float model.") from exc
        _write_atomic(target, quantized.read_bytes())
