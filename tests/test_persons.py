"""The ``persons`` class: OpenCV's HOG people detector on real photos.

The standing man of ``obama3.jpg`` (shared face photos) is the one real full-length person
available offline; he is shown as the photo is (cut at the shins) and pasted at several sizes
into ``skimage.data.coffee()`` to check sizes, upscaling and downscaling. Person-free photos
are skimage's coffee cup, cat and others.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veil.transforms.persons import PersonDetector, coverage, nms
from veil.transforms.regions import RegionDetectStage

skimage_data = pytest.importorskip("skimage.data")

#: Where the man's face centre lies in obama3.jpg, as fractions of its width and height.
FACE_CENTRE = (0.52, 0.17)


@pytest.fixture(scope="module")
def standing_man(faces_dir: Path) -> np.ndarray:
    return np.asarray(Image.open(faces_dir / "obama3.jpg").convert("RGB"))


def pasted(man: np.ndarray, height: int, *, x: int = 300) -> tuple[np.ndarray, tuple[float, float]]:
    """``man`` resized to ``height`` px and pasted into a 640x480 coffee photo; returns the
    image and the face centre in it."""
    canvas = np.asarray(Image.fromarray(skimage_data.coffee()).resize((640, 480))).copy()
    width = round(man.shape[1] * height / man.shape[0])
    small = np.asarray(Image.fromarray(man).resize((width, height), Image.Resampling.LANCZOS))
    y = (480 - height) // 2
    canvas[y:y + height, x:x + width] = small
    return canvas, (x + FACE_CENTRE[0] * width, y + FACE_CENTRE[1] * height)


def holding(regions: list[dict], point: tuple[float, float]) -> list[dict]:
    px, py = point
    return [r for r in regions if r["box"][0] <= px <= r["box"][2] and r["box"][1] <= py <= r["box"][3]]


@pytest.fixture(scope="module")
def detector() -> PersonDetector:
    d = PersonDetector()
    d.setup()
    return d


@pytest.mark.parametrize("height", [200, 260, 340, 440])
def test_finds_a_real_person_at_several_sizes(detector, standing_man, height):
    image, face = pasted(standing_man, height)
    found = detector.detect(image, {})
    hits = holding(found, face)
    assert hits, f"no person box holds the face at {face} among {found}"
    box = hits[0]["box"]
    assert box[3] - box[1] >= 0.5 * height  # the body, not only the head
    assert set(hits[0]) == {"kind", "box", "score", "detector"}
    assert hits[0]["kind"] == "person" and hits[0]["detector"] == "hog"
    assert 0 <= box[0] < box[2] <= 640 and 0 <= box[1] < box[3] <= 480


def test_small_people_need_the_upscaling_min_height_asks_for(standing_man):
    image, face = pasted(standing_man, 160)
    assert holding(PersonDetector(min_height=60).detect(image, {}), face)
    # Sized for people of 200 px and more, the scan runs on a smaller image and misses him.
    assert PersonDetector(min_height=200).scale_for(480, 640) < 1
    assert not holding(PersonDetector(min_height=200).detect(image, {}), face)


def test_large_photos_are_scanned_downscaled_and_boxes_come_back_in_original_pixels(standing_man):
    image, face = pasted(standing_man, 340)
    big = np.asarray(Image.fromarray(image).resize((2560, 1920), Image.Resampling.BICUBIC))
    d = PersonDetector(max_side=960)
    assert d.scale_for(1920, 2560) == pytest.approx(960 / 2560)
    hits = holding(d.detect(big, {}), (face[0] * 4, face[1] * 4))
    assert hits and hits[0]["box"][3] - hits[0]["box"][1] >= 0.5 * 340 * 4


def test_a_border_finds_a_person_cut_by_the_frame(standing_man):
    h, w = standing_man.shape[:2]
    face = (FACE_CENTRE[0] * w, FACE_CENTRE[1] * h)
    assert holding(PersonDetector(border=0.15).detect(standing_man, {}), face)


@pytest.mark.parametrize("name", ["coffee", "chelsea", "brick", "hubble_deep_field", "camera"])
def test_no_person_in_person_free_photos(detector, name):
    image = getattr(skimage_data, name)()
    assert detector.detect(image, {}) == []  # camera: the cameraman is not a standing figure


def test_grey_and_rgba_inputs(detector, standing_man):
    image, face = pasted(standing_man, 260)
    grey = np.asarray(Image.fromarray(image).convert("L"))
    rgba = np.asarray(Image.fromarray(image).convert("RGBA"))
    assert holding(detector.detect(grey, {}), face)
    assert holding(detector.detect(rgba, {}), face)
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(image.astype(np.float32), {})


def test_residual_reports_only_people_not_covered_by_person_regions(detector, standing_man):
    image, _face = pasted(standing_man, 260)
    found = detector.detect(image, {})
    assert found
    assert detector.residual(image, {}, [dict(r) for r in found]) == []
    # A face region over the same box does not count: only person regions hide a person.
    as_faces = [{**r, "kind": "face"} for r in found]
    assert len(detector.residual(image, {}, as_faces)) == len(found)
    # A person region covering under half of the box leaves the person exposed.
    x0, y0, x1, y1 = found[0]["box"]
    sliver = {"kind": "person", "box": [x0, y0, x1, y0 + 0.3 * (y1 - y0)]}
    assert detector.residual(image, {}, [sliver])


def test_the_stage_appends_person_regions(standing_man):
    image, face = pasted(standing_man, 260)
    stage = pickle.loads(pickle.dumps(RegionDetectStage(PersonDetector())))
    sample = {"__key__": "k", "_pixels": image, "regions": [{"kind": "face", "box": [0, 0, 1, 1]}]}
    [out] = stage.process_batch([sample])
    assert out["regions"][0]["kind"] == "face"
    assert holding([r for r in out["regions"] if r["kind"] == "person"], face)


def test_pickles_before_and_after_setup(standing_man):
    d = PersonDetector(score_threshold=0.5, max_side=800, min_height=100)
    clone = pickle.loads(pickle.dumps(d))
    assert (clone.score_threshold, clone.max_side, clone.min_height) == (0.5, 800, 100)
    d.setup()
    clone = pickle.loads(pickle.dumps(d))
    assert clone._hog is None
    image, face = pasted(standing_man, 340)
    assert holding(clone.detect(image, {}), face)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="max_side"):
        PersonDetector(max_side=64)
    with pytest.raises(ValueError, match="min_height"):
        PersonDetector(min_height=4)
    with pytest.raises(ValueError, match="border"):
        PersonDetector(border=0.9)


def test_nms_drops_overlapping_and_nested_boxes():
    boxes = [(0, 0, 100, 200), (5, 5, 105, 205), (10, 10, 60, 100), (300, 0, 400, 200)]
    assert nms(boxes, [0.9, 0.5, 0.8, 0.4]) == [0, 3]


def test_coverage_is_the_union_of_covering_boxes():
    assert coverage((0, 0, 10, 10), []) == 0
    assert coverage((0, 0, 10, 10), [(0, 0, 10, 5), (0, 5, 10, 10)]) == 1
    assert coverage((0, 0, 10, 10), [(0, 0, 5, 10), (0, 0, 5, 10)]) == pytest.approx(0.5)


def test_a_run_blurs_the_person_around_the_face_which_keeps_the_face_method(standing_man, tmp_path):
    """`--pii faces,persons` with faces pixelated: the body is blurred, the face region shows
    the pixelation (the face policy), not a blur over it."""
    import json

    import pyarrow.parquet as pq
    from helpers import jpeg_bytes

    from veil.config import RunConfig
    from veil.pipelines.driver import run

    image, face = pasted(standing_man, 340)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "man.jpg").write_bytes(jpeg_bytes(image, quality=95))
    run(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), runner="local", progress=False,
                  anonymize={"method": "pixelate"}, pii={"classes": ["faces", "persons"]}))
    [row] = [r for f in (tmp_path / "out" / "manifest").iterdir() for r in pq.read_table(f).to_pylist()]
    assert row["status"] == "anonymized"
    counts = json.loads(row["region_counts"])
    assert counts.get("person", 0) >= 1 and counts.get("face", 0) >= 1
    params = json.loads(row["params"])
    assert params["method"] == "pixelate" and params["classes"]["person"]["method"] == "blur"
    released = np.asarray(Image.open(next((tmp_path / "out" / "data").rglob("man.jpg"))).convert("RGB"))
    faces = [r for r in json.loads(row["regions"]) if r["kind"] == "face"]
    x0, y0, x1, y1 = (int(v) for v in faces[0]["box"])
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    # The face centre is what the face method alone makes of it: the same run without the
    # persons class gives the same pixels there (a blur over the face would not).
    run(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "faces"), runner="local", progress=False,
                  anonymize={"method": "pixelate"}, pii={"classes": ["faces"]}))
    alone = np.asarray(Image.open(next((tmp_path / "faces" / "data").rglob("man.jpg"))).convert("RGB"))
    centre = (slice(cy - 6, cy + 6), slice(cx - 6, cx + 6))
    assert np.abs(released[centre].astype(int) - alone[centre].astype(int)).mean() < 2.0
    # The body below the face is changed (blurred) against the input.
    body = (slice(y1 + 40, y1 + 120), slice(x0, x1))
    assert np.abs(released[body].astype(int) - image[body].astype(int)).mean() > 3
