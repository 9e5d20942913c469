"""The int8 CenterFace (``detect.precision: int8``): derived deterministically from the
registered float model, cached with a checksum, re-derived when the cache is damaged, used by
runs and never by validation. That it finds the hard faces the float network finds is
tested in test_detect.py (every CenterFace case runs in both precisions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from veil.config import ConfigError, DetectConfig
from veil.transforms.detect import CenterFaceDetector, build_detector
from veil.transforms.models import ModelNotFoundError, ModelRegistry, file_sha256
from veil.transforms.quantize import (
    calibration_images,
    centerface_int8,
    int8_model_name,
    int8_provenance,
    text_calibration_images,
    text_detector_int8,
)


@pytest.fixture(scope="module")
def centerface_path():
    try:
        return ModelRegistry(models_dir=None).resolve("centerface")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


def test_calibration_images_are_fixed_and_varied():
    first, again = calibration_images(6), calibration_images(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert {im.shape for im in first} == {(480, 640, 3), (256, 320, 3)}
    assert all(im.dtype == np.uint8 for im in first)
    means = [float(im.mean()) for im in first]
    assert max(means) - min(means) > 30  # exposures differ: dark and bright photos are measured
    assert not np.array_equal(calibration_images(6, seed=1)[1], first[1])


def test_derived_model_is_cached_with_its_checksum_and_reused(centerface_path, tmp_path, int8_centerface):
    path = centerface_int8(centerface_path, tmp_path)
    assert path == tmp_path / "derived" / int8_model_name(file_sha256(centerface_path))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == file_sha256(path)
    assert meta["source_sha256"] == file_sha256(centerface_path)
    # Deterministic: the same bytes as the copy derived in the user cache for other tests.
    assert file_sha256(path) == file_sha256(int8_centerface)
    mtime = path.stat().st_mtime_ns
    assert centerface_int8(centerface_path, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not derived again


def test_damaged_cache_is_derived_again(centerface_path, tmp_path):
    path = centerface_int8(centerface_path, tmp_path)
    good = file_sha256(path)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert centerface_int8(centerface_path, tmp_path) == path
    assert file_sha256(path) == good
    path.with_suffix(".json").write_text("{not json")
    assert centerface_int8(centerface_path, tmp_path) == path
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == good


def test_int8_network_is_close_to_the_float_one(centerface_path, int8_centerface, faces_dir):
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(faces_dir / "obama.jpg")), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (640, 480))
    blob = rgb.transpose(2, 0, 1)[None].astype(np.float32)
    fp32, int8 = CenterFaceDetector(centerface_path), CenterFaceDetector(centerface_path, int8_model=int8_centerface)
    heat32 = fp32._session.run(None, {fp32._input: blob})[0]
    heat8 = int8._int8_session.run(None, {int8._input: blob})[0]
    assert heat8.shape == heat32.shape
    assert float(heat32.max()) > 0.9 and float(heat8.max()) > 0.9
    assert np.abs(heat8 - heat32).max() < 0.1
    assert np.unravel_index(heat8.argmax(), heat8.shape) == np.unravel_index(heat32.argmax(), heat32.shape)


def test_runs_use_the_published_network_unless_int8_is_asked_for(int8_centerface):
    from veil.cli import build_parser, config_from_args

    registry = ModelRegistry(models_dir=None)
    assert DetectConfig().precision == "fp32"
    assert build_detector(DetectConfig(), registry).precision == "fp32"
    assert build_detector(DetectConfig(precision="int8"), registry).int8_model == int8_centerface
    args = build_parser().parse_args(["run", "--input", "in", "--output", "out", "--detect-precision", "int8"])
    assert config_from_args(args).detect.precision == "int8"
    with pytest.raises(ConfigError, match="detect.precision"):
        DetectConfig(precision="int4")


def test_provenance_names_the_derived_file_and_its_source(int8_centerface):
    row = int8_provenance(ModelRegistry(models_dir=None))
    assert row["name"] == "centerface-int8"
    assert row["path"] == str(int8_centerface) and row["sha256"] == file_sha256(int8_centerface)
    assert "09189deaaf8646c5" in row["source"]


def test_validation_scans_in_float32(monkeypatch, tmp_path):
    import veil.transforms.detect as detect
    from veil.validators.validate import ShardEvaluator, ValidateConfig

    asked: list[DetectConfig] = []

    class Stop(Exception):
        pass

    def record(cfg, registry):
        asked.append(cfg)
        raise Stop

    monkeypatch.setattr(detect, "build_detector", record)
    config = ValidateConfig(original="a", anonymized="b", output=str(tmp_path), detectors=["centerface"])
    with pytest.raises(Stop):
        ShardEvaluator(config, None, None, tmp_path, "fp").setup()
    assert [cfg.precision for cfg in asked] == ["fp32"]


def test_text_calibration_images_are_fixed_and_at_the_prescan_sizes():
    first, again = text_calibration_images(6), text_calibration_images(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert {im.shape for im in first} == {(480, 640, 3), (256, 320, 3)}


def test_prescan_detector_in_int8_keeps_the_text_probability_map(tmp_path):
    """The int8 text detector's probability map, at the pre-scan's size, marks the same text
    the float one marks (above the pre-scan threshold) on a generated sign."""
    import cv2

    from veil.transforms.ocr import (
        DET_MODEL,
        PRESCAN_THRESHOLD,
        OCREngine,
        _det_probability,
        _det_session,
    )

    registry = ModelRegistry(models_dir=None, cache_dir=str(tmp_path))
    try:
        source = registry.resolve(DET_MODEL)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    int8 = text_detector_int8(source, tmp_path)
    meta = json.loads(int8.with_suffix(".json").read_text())
    assert meta["sha256"] == file_sha256(int8) and meta["source_sha256"] == file_sha256(source)
    rgb = np.full((480, 640, 3), 200, np.uint8)
    cv2.putText(rgb, "Anna Berg 0734 567 826", (40, 200), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (20, 20, 20), 2)
    cv2.putText(rgb, "tiny line of text", (300, 400), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (20, 20, 20), 1)
    p32, _ = _det_probability(_det_session(source), rgb, 0.5)
    p8, _ = _det_probability(_det_session(int8), rgb, 0.5)
    on32, on8 = p32 > PRESCAN_THRESHOLD, p8 > PRESCAN_THRESHOLD
    assert on32.sum() > 100
    assert (on8 & on32).sum() >= 0.8 * on32.sum()  # most of the float map (measured: 87 %)
    assert (on8 & ~on32).sum() <= 0.5 * on32.sum()
    # The engine's pre-scan uses it by default, and its windows cover both lines.
    engine = OCREngine(registry_kwargs={"models_dir": None, "cache_dir": str(tmp_path)})
    assert engine.prescan_precision == "int8"
    windows = engine.windows(rgb)
    assert windows is not None and len(windows) >= 1
    assert any(x0 <= 40 and x1 >= 400 and y0 <= 180 <= y1 for x0, y0, x1, y1 in windows)
    assert any(x0 <= 300 and y0 <= 395 <= y1 for x0, y0, x1, y1 in windows)
    with pytest.raises(ValueError, match="prescan_precision"):
        OCREngine(prescan_precision="int4")


def test_the_run_records_the_int8_text_detector(tmp_path):
    row = int8_provenance(ModelRegistry(models_dir=None, cache_dir=str(tmp_path)), "text-detector")
    assert row["name"] == "ppocrv6_det_small-int8"
    assert row["sha256"] == file_sha256(row["path"])


def test_dynamic_centerface_is_cached_and_detects_exactly_as_the_graph_edited_in_memory(
        centerface_path, tmp_path, faces_dir):
    import cv2

    from veil.transforms.quantize import centerface_dynamic

    path = centerface_dynamic(centerface_path, tmp_path)
    assert path.parent == tmp_path / "derived" and path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == file_sha256(path)
    mtime = path.stat().st_mtime_ns
    assert centerface_dynamic(centerface_path, tmp_path) == path and path.stat().st_mtime_ns == mtime
    rgb = cv2.cvtColor(cv2.imread(str(faces_dir / "obama.jpg")), cv2.COLOR_BGR2RGB)
    in_memory = CenterFaceDetector(centerface_path).detect(rgb)
    cached = CenterFaceDetector(centerface_path, dynamic_model=path).detect(rgb)
    assert len(in_memory) == len(cached) >= 1
    for a, b in zip(in_memory, cached, strict=True):
        assert a.box == b.box and a.score == b.score
    # A damaged copy is derived again, not loaded.
    path.write_bytes(path.read_bytes()[:500])
    assert file_sha256(centerface_dynamic(centerface_path, tmp_path)) == json.loads(
        path.with_suffix(".json").read_text())["sha256"]


def test_workers_with_a_warm_cache_do_not_import_onnx(centerface_path, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from veil.config import DetectConfig; from veil.transforms.models import ModelRegistry; "
            "from veil.transforms.detect import build_detector; "
            f"d = build_detector(DetectConfig(), ModelRegistry(cache_dir={str(tmp_path)!r})); "
            "print('onnx' in sys.modules, d.detectors[0].dynamic_model if hasattr(d, 'detectors') else d.dynamic_model)")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert first[0] == "True"  # derived: the graph was edited with onnx once
    assert second == ["False", first[1]] and str(tmp_path) in first[1]


def test_read_only_cache_still_builds_the_detector(centerface_path, tmp_path):
    cache = tmp_path / "not-a-folder"  # (tests run as root here: permissions would not stop a write)
    cache.write_text("x")
    detector = build_detector(DetectConfig(), ModelRegistry(cache_dir=cache))
    found = detector.detectors[0] if hasattr(detector, "detectors") else detector
    assert found.dynamic_model is None
