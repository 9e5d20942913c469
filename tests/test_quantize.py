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
