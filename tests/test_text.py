"""The text class: OCR (rapidocr, PP-OCRv6) + Presidio on generated signs and real photos.

Real models throughout (the OCR models ship in the rapidocr wheel, the spaCy pipeline in a
registry package); one detector per scope for the module, since the analyzer takes seconds
to load.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pii_images import (
    BENIGN_LINES,
    PII_LINES,
    benign_scene,
    blank_scene,
    fill_boxes,
    sign_scene,
    union_covers,
)

from veil.transforms.models import ModelChecksumError, ModelNotFoundError
from veil.transforms.ocr import OCR_FIELD, OCREngine, TextLine, shared_read
from veil.transforms.text import TextDetector, span_box, text_rows

pytest.importorskip("rapidocr")
pytest.importorskip("presidio_analyzer")

SKIMAGE_PAGE = "page.png"  # a scanned textbook paragraph: prose, no personal data


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z@]", "", text.lower())


def _reads_any(lines: list[TextLine], planted: list[str]) -> list[str]:
    """The planted strings still read (ignoring case, spaces and punctuation) in ``lines``."""
    read = _norm(" ".join(line.text for line in lines))
    return [p for p in planted if _norm(p) in read]


@pytest.fixture(scope="module")
def pii_detector() -> TextDetector:
    d = TextDetector(scope="pii")
    d.setup()
    return d


@pytest.fixture(scope="module")
def all_detector() -> TextDetector:
    d = TextDetector(scope="all")
    d.setup()
    return d


@pytest.fixture(scope="module")
def signs() -> list[tuple[np.ndarray, list[dict]]]:
    # Seed 2 has an IBAN the detector splits into four lines (widely spaced glyphs).
    return [sign_scene(seed) for seed in (0, 1, 2)]


def test_planted_pii_is_found_and_unreadable_after_filling(pii_detector, signs):
    for rgb, truth in signs:
        sample: dict = {}
        regions = pii_detector.detect(rgb, sample)
        planted = [t for t in truth if t["class"] == "text"]
        boxes = [r["box"] for r in regions]
        for t in planted:
            assert union_covers(boxes, t["box"]), f"{t['entity']} at {t['box']} not covered by {boxes}"
        assert {r["entity"] for r in regions} >= {t["entity"] for t in planted}
        # What was read never leaves the detector.
        dumped = json.dumps(regions)
        for t in planted:
            assert t["text"] not in dumped
        assert all(set(r) == {"kind", "box", "score", "detector", "entity"} for r in regions)
        released = fill_boxes(rgb, boxes)
        after = pii_detector.engine.read(released)
        assert _reads_any(after, [t["text"] for t in planted]) == []
        assert pii_detector.residual(released, sample, regions) == []


def test_entity_regions_keep_labels_readable(pii_detector):
    rgb, truth = sign_scene(7, lines=[PII_LINES[0], PII_LINES[4], PII_LINES[6]])  # Contact:/Manager:/Call
    regions = pii_detector.detect(rgb, {})
    after = pii_detector.engine.read(fill_boxes(rgb, [r["box"] for r in regions]))
    # The margin of one character may take the last letter of a label one space away.
    labels = [t["text"][:-1] for t in truth if t["class"] == "none"]
    assert _reads_any(after, labels) == labels
    assert _reads_any(after, [t["text"] for t in truth if t["class"] == "text"]) == []


def test_text_without_personal_data_is_not_flagged(pii_detector):
    for seed in (0, 2):
        rgb, truth = benign_scene(seed)
        sample: dict = {}
        assert pii_detector.detect(rgb, sample) == []
        # The signs were read, so "nothing flagged" is the analyzer's verdict, not blindness.
        read = next(iter(sample[OCR_FIELD].values()))
        assert _reads_any(read, [t["text"] for t in truth]) == [t["text"] for t in truth]
    assert pii_detector.detect(blank_scene(1)[0], {}) == []


def test_scope_all_takes_every_line(all_detector):
    rgb, truth = benign_scene(1)
    regions = all_detector.detect(rgb, {})
    assert len(regions) >= len(truth)
    assert all("entity" not in r and r["detector"] == "rapidocr+presidio" for r in regions)
    for t in truth:
        assert union_covers([r["box"] for r in regions], t["box"])
    released = fill_boxes(rgb, [r["box"] for r in regions])
    assert _reads_any(all_detector.engine.read(released), list(BENIGN_LINES)) == []
    assert all_detector.residual(released, {}, regions) == []


def test_residual_reports_text_left_in_released_pixels(pii_detector, signs):
    rgb, truth = signs[1]
    # Released without anonymizing the text: every entity is still there.
    left = pii_detector.residual(rgb, {}, regions=[])
    assert {r["entity"] for r in left} >= {t["entity"] for t in truth if t["class"] == "text"}
    assert all(r["kind"] == "text" for r in left)


def test_real_photo_name_tag_and_real_prose(all_detector, pii_detector):
    """Grace Hopper's portrait (matplotlib's sample data) has a name tag on her uniform: scope
    "all" takes it; skimage's scanned textbook page is prose, with nothing personal."""
    mpl = pytest.importorskip("matplotlib")
    photo = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    rgb = np.ascontiguousarray(cv2.imread(str(photo))[:, :, ::-1])
    lines = all_detector.engine.read(rgb)
    assert _reads_any(lines, ["HOPPER"]) == ["HOPPER"]
    regions = all_detector.detect(rgb, {})
    after = all_detector.engine.read(fill_boxes(rgb, [r["box"] for r in regions]))
    assert _reads_any(after, ["HOPPER"]) == []

    skdata = pytest.importorskip("skimage.data")
    page = np.ascontiguousarray(skdata.page()[:, :, None].repeat(3, axis=2))
    sample: dict = {}
    assert pii_detector.detect(page, sample) == []
    assert len(next(iter(sample[OCR_FIELD].values()))) >= 5  # the paragraph was read


def test_shared_read_runs_ocr_once_per_image(pii_detector, signs, monkeypatch):
    rgb = signs[0][0]
    sample: dict = {}
    first = shared_read(sample, rgb, pii_detector.engine)
    monkeypatch.setattr(pii_detector.engine, "read", lambda _rgb: pytest.fail("OCR ran twice"))
    assert shared_read(sample, rgb.copy(), pii_detector.engine) is first  # same pixels, new array
    monkeypatch.undo()
    other = fill_boxes(rgb, [[0, 0, 10, 10]])
    shared_read(sample, other, pii_detector.engine)
    assert len(sample[OCR_FIELD]) == 2  # released pixels get their own reading


def test_large_images_are_read_in_tiles_without_duplicates():
    """A 1280x960 mosaic read with max_side 640 runs six tiles with overlaps (160 px) shorter
    than most lines: lines read twice are reported once, lines cut in two are stitched, and
    every planted value is read whole, once per time it was planted."""
    scenes = [sign_scene(seed) for seed in (0, 1, 3, 4)]
    mosaic = np.vstack([np.hstack([scenes[0][0], scenes[1][0]]), np.hstack([scenes[2][0], scenes[3][0]])])
    engine = OCREngine(max_side=640)
    lines = engine.read(mosaic)
    planted = [t["text"] for _, truth in scenes for t in truth if t["class"] == "text"]
    read = [_norm(line.text) for line in lines]
    for p in set(planted):  # each value ends its sign's line
        assert sum(r.endswith(_norm(p)) for r in read) == planted.count(p), p
    assert all(0 <= line.box[0] < line.box[2] <= 1280 and 0 <= line.box[1] < line.box[3] <= 960 for line in lines)


def test_span_box_covers_whole_words_with_margin():
    quad = np.array([[100.0, 50.0], [300.0, 50.0], [300.0, 70.0], [100.0, 70.0]])
    line = TextLine(box=(100.0, 50.0, 300.0, 70.0), quad=quad, text="Tel: 0123456789", score=1.0)
    # Characters 7..10 lie inside the word "0123456789" (5..15): the whole word is taken.
    x0, y0, x1, y1 = span_box(line, 7, 10, 640, 480)
    per_char = 200.0 / 15
    assert x0 == pytest.approx(100 + 4 * per_char - 0.2 * 20)
    assert x1 == pytest.approx(300 + 0.2 * 20)
    assert (y0, y1) == pytest.approx((46.0, 74.0))
    assert span_box(line, 3, 3, 640, 480) is None


def test_text_rows_join_fragments_of_one_line():
    def line(x0, y0, x1, y1):
        q = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
        return TextLine(box=(x0, y0, x1, y1), quad=q, text="x", score=1.0)

    lines = [line(300, 100, 400, 130), line(50, 300, 200, 330), line(100, 102, 290, 131), line(405, 99, 500, 129)]
    assert text_rows(lines) == [[2, 0, 3], [1]]


def test_missing_or_wrong_model_is_a_clear_error(tmp_path):
    missing = TextDetector(models={"paths": {"ppocrv6_det_small": str(tmp_path / "det.onnx")}})
    with pytest.raises(ModelNotFoundError, match="ppocrv6_det_small.*does not exist"):
        missing.setup()
    wrong = tmp_path / "rec.onnx"
    wrong.write_bytes(b"not a model")
    with pytest.raises(ModelChecksumError, match="ppocrv6_rec_small"):
        TextDetector(scope="all", models={"paths": {"ppocrv6_rec_small": str(wrong)}}).setup()


def test_detector_pickles_before_and_after_setup(pii_detector):
    fresh = pickle.loads(pickle.dumps(TextDetector(scope="all", ocr_max_side=1200, models={"models_dir": "/m"})))
    assert (fresh.scope, fresh.engine.max_side, fresh.engine.registry_kwargs) == ("all", 1200, {"models_dir": "/m"})
    shipped = pickle.dumps(pii_detector)
    assert len(shipped) < 10_000  # configuration only: no models, no spaCy pipeline
    clone = pickle.loads(shipped)
    assert clone.engine._ocr is None and clone.analyzer._engine is None
    with pytest.raises(ValueError, match="text scope"):
        TextDetector(scope="names")


def test_rows_too_short_to_name_anyone_carry_no_entity():
    """OCR reads scraps such as "PO" out of a blurred face; spaCy tags it a place. A row with
    fewer than three letters or digits carries no entity, but a short line in a longer row
    ("Mr" "Li") keeps its entity."""
    from veil.transforms.textpii import Entity

    class EverythingIsAPlace:
        def analyze(self, text):
            return [Entity("LOCATION", 0, len(text), 0.85)] if text.strip() else []

    def line(text, x0, y0, x1, y1):
        q = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
        return TextLine(box=(x0, y0, x1, y1), quad=q, text=text, score=0.9)

    detector = TextDetector()
    detector.analyzer = EverythingIsAPlace()
    assert detector.line_entities([line("PO", 26, 218, 106, 352)]) == [[]]
    assert detector.line_entities([line("P.O", 26, 218, 106, 352)]) == [[]]
    scraps = detector.line_entities([line("Mr", 100, 50, 130, 70), line("Li", 136, 50, 160, 70),
                                     line("-", 300, 300, 310, 320)])
    assert scraps[0] and scraps[1] and scraps[2] == []
    assert detector.find([line("PO", 26, 218, 106, 352)], 640, 480) == []


def test_an_image_of_short_rows_only_never_asks_the_analyzer():
    """Marks read out of textures ("X", "***") are all the text most photos hold; when every
    row is too short to carry an entity, the analyzer (and its spaCy load) is never used."""

    class MustNotBeAsked:
        def analyze(self, text):
            raise AssertionError(f"analyzer asked about {text!r}")

    def line(text, x0, y0, x1, y1):
        q = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
        return TextLine(box=(x0, y0, x1, y1), quad=q, text=text, score=0.9)

    detector = TextDetector()
    detector.analyzer = MustNotBeAsked()
    assert detector.line_entities([line("X", 10, 10, 20, 30), line("***", 200, 300, 240, 320)]) == [[], []]
    assert detector.find([line("PO", 26, 218, 106, 352)], 640, 480) == []
