"""The OCR pre-scan (issue 11): the text detector at half size picks the windows that are read
at native resolution. Real RapidOCR models; generated scenes from ``pii_images``."""

from __future__ import annotations

import pickle
import re

import cv2
import numpy as np
import pytest
from pii_images import background, blank_scene, plate_scene, sign_scene

from veil.config import ConfigError, PIIConfig
from veil.transforms.ocr import DET_GRID, OCREngine, _merge_windows, _snap

pytest.importorskip("rapidocr")


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z@]", "", text.lower())


@pytest.fixture(scope="module")
def engines() -> tuple[OCREngine, OCREngine]:
    native, pre = OCREngine(prescan=0), OCREngine(prescan=0.5)
    native.setup()
    pre.setup()
    return native, pre


def _tiny_text_scene(seed: int) -> np.ndarray:
    """Lines with characters 6-9 px high on small boards: the smallest text the native pass
    reads here, and the hardest for a half-size look."""
    rng = np.random.default_rng(seed)
    img = background(rng)
    for i, text in enumerate(("Tel 0734567826", "anna.berg@mail.se", "Peter Novak")):
        scale = 0.3 + 0.05 * i
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x, y = 20 + 200 * i, 80 + 150 * i
        cv2.rectangle(img, (x - 3, y - h - 3), (x + w + 3, y + 4), (235, 235, 235), -1)
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (10, 10, 10), 1, cv2.LINE_AA)
    return img


@pytest.mark.parametrize("make", [lambda: sign_scene(3000)[0], lambda: plate_scene(3101)[0],
                                  lambda: _tiny_text_scene(5)], ids=["sign", "plate", "tiny"])
def test_prescan_reads_what_the_native_pass_reads(engines, make):
    native, pre = engines
    rgb = make()
    whole = {_norm(line.text) for line in native.read(rgb)}
    windowed = {_norm(line.text) for line in pre.read(rgb)}
    assert whole, "the scene holds text"
    assert whole <= windowed, whole - windowed
    windows = pre.windows(rgb)
    assert windows is None or windows, "text was found, so some window (or the whole image) is read"


def test_a_blank_image_is_not_read_at_native_resolution(engines, monkeypatch):
    _native, pre = engines
    flat = np.full((480, 640, 3), 128, np.uint8)
    assert pre.windows(flat) == []
    calls = []
    monkeypatch.setattr(OCREngine, "_read_native", lambda self, *a: calls.append(a) or [])
    assert pre.read(flat) == [] and calls == []


def test_windows_lie_on_the_grid_inside_the_image_and_do_not_overlap(engines):
    _native, pre = engines
    rgb = _tiny_text_scene(6)
    windows = pre.windows(rgb)
    assert windows and len(windows) >= 2, windows
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert (x1 - x0) % DET_GRID == 0 or x1 == 640 or x0 == 0
        assert x1 - x0 >= 2 * DET_GRID and y1 - y0 >= 2 * DET_GRID
    for i, a in enumerate(windows):
        for b in windows[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_snap_and_merge():
    assert _snap(40, 40, 50, 50, 640, 480) == (32, 32, 96, 96)
    assert _snap(600, 450, 640, 480, 640, 480) == (576, 416, 640, 480)  # moved inside, not cut
    merged = _merge_windows([(0, 0, 96, 64), (64, 32, 160, 96), (320, 320, 384, 384)], 640, 480)
    assert merged == [(0, 0, 160, 96), (320, 320, 384, 384)]


def test_an_image_mostly_text_is_read_whole(engines):
    _native, pre = engines
    img = np.full((480, 640, 3), 245, np.uint8)
    for row in range(14):
        cv2.putText(img, "The quick brown fox jumps over the lazy dog", (8, 30 + 32 * row),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.75, (0, 0, 0), 2, cv2.LINE_AA)
    assert pre.windows(img) is None


def test_settings_are_checked_and_part_of_the_signature():
    for bad in (-0.5, 0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="prescan"):
            OCREngine(prescan=bad)
        with pytest.raises(ConfigError, match="ocr_prescan"):
            PIIConfig(ocr_prescan=bad)
    assert OCREngine(prescan=0).signature != OCREngine(prescan=0.5).signature
    clone = pickle.loads(pickle.dumps(OCREngine(prescan=0.75)))
    assert clone.prescan == 0.75 and clone._prescan_session is None


def test_validation_reads_released_images_whole():
    from veil.validators.validate import residual_checks

    checks, _metadata = residual_checks({"classes": ["faces", "plates", "text"], "ocr_prescan": 0.5}, {})
    assert {name: c.engine.prescan for name, c in checks.items()} == {"plates": 0.0, "text": 0.0}


def test_blank_scene_reading_is_unchanged_or_empty(engines):
    """On a scene without text the pre-scan reads nothing the native pass would call text
    with a readable word (junk marks like '_' may differ)."""
    native, pre = engines
    rgb = blank_scene(3300)[0]
    words = {_norm(line.text) for line in native.read(rgb) if len(_norm(line.text)) >= 3}
    assert words <= {_norm(line.text) for line in pre.read(rgb)}


def test_an_unwritable_model_cache_falls_back_to_the_float_prescan(engines, tmp_path):
    cache = tmp_path / "not-a-folder"  # the int8 detector cannot be derived into it
    cache.write_text("x")
    engine = OCREngine(prescan=0.5, registry_kwargs={"cache_dir": str(cache)})
    engine.setup()
    assert engine._prescan_session is not engines[1]._prescan_session
    img = sign_scene(3000)[0]
    read = {_norm(line.text) for line in engine.read(img)}
    assert read and read == {_norm(line.text) for line in engines[0].read(img)}


def test_faint_places_are_not_read_unless_the_peak_rule_is_off(engines):
    """Places whose half-size probability never reaches ``prescan_peak`` are not windows; with
    the rule off (0) every marked place is, so the rule only ever removes windows."""
    _native, pre = engines
    every = OCREngine(prescan=0.5, prescan_peak=0.0)
    every.setup()
    fewer = more = 0
    for seed in (3305, 3306, 3307, 3308):
        rgb = blank_scene(seed)[0]
        strict, loose = pre.windows(rgb), every.windows(rgb)
        if strict is None or loose is None:
            continue
        fewer += len(strict)
        more += len(loose)
        area = np.zeros(rgb.shape[:2], bool)
        for x0, y0, x1, y1 in loose:
            area[y0:y1, x0:x1] = True
        for x0, y0, x1, y1 in strict:
            assert area[y0:y1, x0:x1].all(), "a peak-rule window lies outside every window of the old rule"
    assert fewer < more, (fewer, more)


def test_peak_setting_is_checked_and_part_of_the_signature():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="prescan_peak"):
            OCREngine(prescan_peak=bad)
        with pytest.raises(ConfigError, match="ocr_prescan_peak"):
            PIIConfig(ocr_prescan_peak=bad)
    assert OCREngine(prescan_peak=0).signature != OCREngine().signature
