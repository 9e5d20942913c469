"""The plates class: OCR plate-like lines and OpenCV's plate cascades, confirmed by reading,
on generated car scenes, text scenes and real photos."""

from __future__ import annotations

import json
import pickle
import re

import cv2
import numpy as np
import pytest
from helpers import face_photo
from pii_images import PLATES, benign_scene, fill_boxes, plate_scene, sign_scene, union_covers

from veil.transforms.ocr import OCR_FIELD
from veil.transforms.plates import (
    HAAR_DETECTOR,
    OCR_DETECTOR,
    PlateDetector,
    PlateModelError,
    looks_like_plate,
)
from veil.transforms.text import TextDetector

pytest.importorskip("rapidocr")


def _norm(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


@pytest.fixture(scope="module")
def detector() -> PlateDetector:
    d = PlateDetector()
    d.setup()
    return d


@pytest.mark.parametrize("seed, plate, scale", [(0, "KA 1234 XY", None), (2, "B MW 4521", None),
                                                (3, "7ABC123", None), (1, "KA 1234 XY", 0.35)])
def test_plates_are_found_and_unreadable_after_filling(detector, seed, plate, scale):
    rgb, truth = plate_scene(seed, plate, scale=scale)
    sample: dict = {}
    regions = detector.detect(rgb, sample)
    assert union_covers([r["box"] for r in regions], truth[0]["box"])
    assert all(set(r) == {"kind", "box", "score", "detector"} and r["kind"] == "plate" for r in regions)
    # No characters recorded: neither the plate nor any of its groups.
    dumped = json.dumps(regions).upper()
    assert not any(group in dumped for group in plate.split() if len(group) > 1)
    released = fill_boxes(rgb, [r["box"] for r in regions])
    after = _norm(" ".join(line.text for line in detector.engine.read(released)))
    assert not any(_norm(group) in after for group in plate.split() if len(group) > 1)
    assert detector.residual(released, sample, regions) == []


def test_cascade_boxes_are_kept_only_when_ocr_reads_a_plate(detector):
    rgb, truth = plate_scene(0, "KA 1234 XY")
    assert detector.haar_boxes(rgb), "the cascade fires on this generated plate"
    # Without the full-image OCR lines, the cascade box alone is confirmed by reading its crop.
    regions = detector.find(rgb, lines=[])
    assert [r["detector"] for r in regions] == [HAAR_DETECTOR]
    assert union_covers([r["box"] for r in regions], truth[0]["box"], tolerance=4.0)
    # Cascades fire on signs too; what they read there is not a plate.
    for seed in (0, 1):
        sign, _ = sign_scene(seed)
        assert detector.haar_boxes(sign)
        assert detector.find(sign, lines=[]) == []


def test_signs_and_portraits_have_no_plates(detector, faces_dir):
    images = [benign_scene(0)[0], benign_scene(2)[0], sign_scene(2)[0]]
    images += [face_photo(faces_dir, name) for name in ("grace_hopper.jpg", "obama.jpg")]
    for rgb in images:
        assert detector.detect(np.ascontiguousarray(rgb), {}) == []


def test_residual_finds_a_plate_left_in_the_release(detector):
    rgb, _ = plate_scene(2, "B MW 4521")
    left = detector.residual(rgb, {}, regions=[])
    assert left and left[0]["detector"] == OCR_DETECTOR


def test_text_and_plates_share_one_ocr_pass(detector, monkeypatch):
    rgb, _ = plate_scene(3)
    text = TextDetector(scope="all")  # scope "all": no analyzer to load
    sample: dict = {}
    text.detect(rgb, sample)
    monkeypatch.setattr(detector.engine, "read", lambda _rgb: pytest.fail("a second OCR pass ran"))
    monkeypatch.setattr(detector, "haar", False)
    assert detector.detect(rgb, sample)
    assert len(sample[OCR_FIELD]) == 1


@pytest.mark.parametrize("text, plate", [
    *[(p, True) for p in PLATES],
    ("AB-123-CD", True), ("|KA 1234 XY|", True), ("M.AB 123", True),
    ("OPEN 9-5", False), ("SALE 50% OFF", False), ("EXIT", False), ("+49 30 1234567", False),
    ("john@x.org", False), ("ROOM 12", False), ("1234", False), ("A1", False), ("ABCDE12345X", False),
])
def test_plate_like_text(text, plate):
    assert looks_like_plate(text) is plate


def test_detector_pickles_and_missing_cascade_is_clear(detector, monkeypatch, tmp_path):
    clone = pickle.loads(pickle.dumps(detector))  # after setup: models are not shipped
    assert clone._cascades is None and clone.engine._ocr is None
    assert pickle.loads(pickle.dumps(PlateDetector(max_haar_checks=2))).max_haar_checks == 2
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))
    with pytest.raises(PlateModelError, match="haarcascade_russian_plate_number.xml"):
        PlateDetector().setup()
    PlateDetector(haar=False).setup()  # without cascades nothing else is needed
