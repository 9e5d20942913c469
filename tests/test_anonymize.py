"""Tests for veil.transforms.anonymize: masks, boxes, the four methods, DP-Pix noise, strength
rounds and the pipeline stage."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from veil.config import AnonymizeConfig
from veil.transforms.anonymize import (
    FALLBACK_STRENGTH,
    STRENGTH_EXPAND_STEP,
    Anonymizer,
    AnonymizeStage,
    expand_box,
    region_mask,
    sample_rng,
)
from veil.transforms.stage import ANONYMIZED, CLEAN, QUARANTINED

METHODS = ["blur", "pixelate", "fill", "dp-pixelate"]


def face(box: list[float]) -> dict:
    return {"kind": "face", "box": box, "score": 0.9, "landmarks": None, "detector": "test"}


@pytest.fixture
def noise_image() -> np.ndarray:
    """Full-range random texture: any smoothing or averaging shows up as a large change."""
    return np.random.default_rng(1234).integers(0, 256, size=(240, 320, 3), dtype=np.uint8)


def run(method: str, rgb: np.ndarray, boxes: list[list[float]], *, key: str = "k", seed: int = 0,
        strength: int = 0, expand: float = 0.2, **cfg):
    anonymizer = Anonymizer(AnonymizeConfig(method=method, **cfg), expand=expand)
    return anonymizer.apply(rgb, [face(b) for b in boxes], rng=sample_rng(seed, key),
                            strength=strength)


def outside(height: int, width: int, box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    keep = np.ones((height, width), dtype=bool)
    x0, y0, x1, y1 = box
    keep[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = False
    return keep


def ellipse_core(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return (((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
            + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) <= 1.0


# -- sample_rng ---------------------------------------------------------------------------------


def test_sample_rng_is_deterministic_per_seed_and_key():
    a = sample_rng(7, "shard-0/img-1").random(8)
    assert np.array_equal(a, sample_rng(7, "shard-0/img-1").random(8))
    assert not np.array_equal(a, sample_rng(7, "shard-0/img-2").random(8))
    assert not np.array_equal(a, sample_rng(8, "shard-0/img-1").random(8))


def test_sample_rng_ignores_global_state():
    np.random.seed(1)
    a = sample_rng(0, "k").random(4)
    np.random.seed(2)
    np.random.random(100)
    assert np.array_equal(a, sample_rng(0, "k").random(4))


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_sample_rng_rejects_bad_seeds(seed):
    with pytest.raises(ValueError):
        sample_rng(seed, "k")


# -- expand_box ---------------------------------------------------------------------------------


def test_expand_box_grows_by_fraction_of_size_and_rounds_outward():
    assert expand_box([100, 50, 200, 150], 0.2, 640, 480) == (80, 30, 220, 170)
    # Fractional edges round outward, never cutting a partly covered pixel.
    assert expand_box([10.4, 20.6, 30.2, 40.5], 0.0, 640, 480) == (10, 20, 31, 41)


def test_expand_box_clips_a_region_partly_outside_the_frame():
    assert expand_box([-30, -10, 50, 60], 0.2, 100, 80) == (0, 0, 66, 74)
    assert expand_box([80, 60, 130, 110], 0.2, 100, 80) == (70, 50, 100, 80)


def test_expand_box_is_at_least_one_pixel_inside_the_image():
    assert expand_box([500, 500, 600, 600], 0.2, 100, 80) == (99, 79, 100, 80)
    assert expand_box([-50, -50, -10, -10], 0.0, 100, 80) == (0, 0, 1, 1)
    assert expand_box([5, 5, 5, 5], 0.5, 100, 80) == (5, 5, 6, 6)


def test_expand_box_normalizes_swapped_corners():
    assert expand_box([20, 30, 10, 5], 0.0, 100, 80) == (10, 5, 20, 30)


@pytest.mark.parametrize("box", [[0, 0, float("nan"), 10], [0, 0, 10], [0, 0, float("inf"), 1]])
def test_expand_box_rejects_malformed_boxes(box):
    with pytest.raises(ValueError):
        expand_box(box, 0.2, 100, 80)


# -- region_mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["ellipse", "box"])
@pytest.mark.parametrize("feather", [0.0, 0.1, 0.3])
def test_mask_is_one_over_the_core_and_feathers_only_outward(shape, feather):
    h, w, box = 200, 300, (80, 40, 200, 160)
    mask = region_mask(h, w, box, shape=shape, feather=feather)
    assert mask.dtype == np.float32 and mask.shape == (h, w)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    if shape == "box":
        core = np.zeros((h, w), dtype=bool)
        core[40:160, 80:200] = True
    else:
        core = ellipse_core(h, w, box)
    assert np.all(mask[core] == 1.0)
    ramp = feather * 120
    assert not mask[outside(h, w, box, math.ceil(ramp) + 1)].any()
    if feather == 0:
        assert np.array_equal(mask > 0, core)
    else:
        # A real ramp exists outside the core: values strictly between 0 and 1 ...
        partial = (mask > 0) & (mask < 1)
        assert partial.sum() > 0 and not (partial & core).any()
        # ... and it falls with distance: along the row through the centre, right of the core.
        row = mask[100, 200 if shape == "box" else 199 :]
        assert np.all(np.diff(row) <= 0)


def test_mask_ellipse_is_not_the_box():
    mask = region_mask(100, 100, (10, 10, 90, 90), shape="ellipse", feather=0.0)
    assert mask[11, 11] == 0.0 and mask[50, 50] == 1.0


def test_mask_of_tiny_and_full_image_boxes():
    tiny = region_mask(50, 50, (20, 20, 22, 22), shape="ellipse", feather=0.1)
    assert np.all(tiny[20:22, 20:22] == 1.0)
    full = region_mask(40, 60, (0, 0, 60, 40), shape="box", feather=0.2)
    assert np.all(full == 1.0)


# -- behaviour common to every method -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strength", [0, 1, 2, FALLBACK_STRENGTH])
def test_pixels_outside_expanded_box_and_feather_are_untouched(noise_image, method, strength):
    h, w = noise_image.shape[:2]
    raw = [120, 60, 200, 160]
    cfg = AnonymizeConfig(method=method)
    before = noise_image.copy()
    result = run(method, noise_image, [raw], strength=strength)
    assert np.array_equal(noise_image, before), "input modified in place"
    box = expand_box(raw, 0.2 + STRENGTH_EXPAND_STEP * strength, w, h)
    margin = math.ceil(cfg.feather * min(box[2] - box[0], box[3] - box[1])) + 1
    keep = outside(h, w, box, margin)
    assert np.array_equal(result.pixels[keep], noise_image[keep])
    assert not result.mask[keep].any()
    # And the region itself did change, almost everywhere in its core.
    x0, y0, x1, y1 = box
    changed = np.any(result.pixels[y0:y1, x0:x1] != noise_image[y0:y1, x0:x1], axis=-1)
    core = result.mask[y0:y1, x0:x1] == 1.0
    assert core.sum() > 0.7 * math.pi / 4 * (x1 - x0) * (y1 - y0)
    assert changed[core].mean() > 0.95


@pytest.mark.parametrize("method", METHODS)
def test_region_changes_strongly(noise_image, method):
    raw = [120, 60, 200, 160]
    result = run(method, noise_image, [raw])
    core = result.mask == 1.0
    diff = np.abs(result.pixels.astype(np.int16) - noise_image.astype(np.int16))
    # Uniform noise vs anything locally averaged: expected |a - b| is about 64 for a constant.
    assert diff[core].mean() > 50
    # Local detail is gone: neighbouring pixels inside the core are (nearly) equal.
    inner = result.pixels[70:150, 140:180].astype(np.int16)
    original = noise_image[70:150, 140:180].astype(np.int16)
    assert np.abs(np.diff(inner, axis=1)).mean() < 0.2 * np.abs(np.diff(original, axis=1)).mean()


@pytest.mark.parametrize("method", METHODS + ["none"])
def test_same_inputs_give_identical_outputs(noise_image, method):
    boxes = [[30, 20, 90, 100], [150, 60, 260, 200]]
    a = run(method, noise_image, boxes, key="img-1", seed=3)
    b = run(method, noise_image, boxes, key="img-1", seed=3)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.mask, b.mask)
    assert a.params == b.params and a.epsilon == b.epsilon


def test_dp_noise_differs_between_keys_and_seeds(noise_image):
    boxes = [[120, 60, 200, 160]]
    a = run("dp-pixelate", noise_image, boxes, key="img-1")
    assert not np.array_equal(a.pixels, run("dp-pixelate", noise_image, boxes, key="img-2").pixels)
    other_seed = run("dp-pixelate", noise_image, boxes, key="img-1", seed=1)
    assert not np.array_equal(a.pixels, other_seed.pixels)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_box_and_whole_image_box(noise_image, method):
    h, w = noise_image.shape[:2]
    tiny = run(method, noise_image, [[100, 100, 102, 102]], expand=0.0)
    assert tiny.mask[100:102, 100:102].min() == 1.0
    assert np.array_equal(tiny.pixels[:90], noise_image[:90])
    whole = run(method, noise_image, [[0, 0, w, h]], mask="box")
    assert np.all(whole.mask == 1.0)
    assert np.abs(whole.pixels.astype(int) - noise_image).mean() > 50
    # With the ellipse, the expanded box is far larger than the frame: only the very corners
    # of the image fall outside its core, and they are in the feather ramp, not untouched.
    whole = run(method, noise_image, [[0, 0, w, h]], mask="ellipse")
    assert (whole.mask == 1.0).mean() > 0.99 and whole.mask.min() > 0.5


@pytest.mark.parametrize("method", ["blur", "pixelate", "fill"])
def test_face_cut_by_the_frame_keeps_its_shape(noise_image, method):
    """A face half outside the left edge: the ellipse is that of the whole face, cut at the
    frame. Squeezing it into the visible half would leave the face's visible edge out."""
    result = run(method, noise_image, [[-40, 50, 40, 130]], expand=0.0, feather=0.0)
    assert result.mask[60, 0] == 1.0 and result.mask[120, 0] == 1.0
    assert result.mask[90, 39] == 1.0 and result.mask[90, 41] == 0.0
    assert result.params["regions"][0]["box"] == [0, 50, 40, 130]


@pytest.mark.parametrize("method", METHODS)
def test_greyscale_like_input(method):
    grey = np.random.default_rng(5).integers(0, 256, size=(120, 160), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    result = run(method, rgb, [[40, 30, 110, 100]])
    assert result.pixels.shape == rgb.shape and result.pixels.dtype == np.uint8
    assert (result.mask == 1.0).any()
    if method in ("blur", "pixelate", "fill"):
        # Channel-wise operations keep a grey image grey (default fill colour is grey).
        assert np.array_equal(result.pixels[..., 0], result.pixels[..., 1])
        assert np.array_equal(result.pixels[..., 1], result.pixels[..., 2])


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32)])
def test_rejects_images_that_are_not_rgb_uint8(bad):
    with pytest.raises(ValueError):
        run("blur", bad, [[1, 1, 5, 5]])


def test_rejects_negative_strength(noise_image):
    with pytest.raises(ValueError):
        run("blur", noise_image, [[1, 1, 50, 50]], strength=-1)


def test_overlapping_regions_are_all_covered(noise_image):
    boxes = [[60, 40, 160, 140], [120, 80, 220, 200]]
    result = run("fill", noise_image, boxes, mask="box", feather=0.0, expand=0.0)
    for x0, y0, x1, y1 in boxes:
        assert np.all(result.pixels[y0:y1, x0:x1] == 128)
    assert result.params["n_regions"] == 2 and len(result.params["regions"]) == 2


def test_detector_no_longer_finds_the_face():
    """An independent detector (OpenCV's Haar cascade) finds the astronaut's face before and
    not after anonymization. Pixelate is checked at its first re-scan round: at the default
    8 blocks the mosaic of this 95 px face still reads as a face to Haar, which is exactly what
    the re-scan stage exists to catch."""
    data = pytest.importorskip("skimage.data")
    rgb = data.astronaut()
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        pytest.skip("OpenCV Haar cascade data not installed")

    def faces(img: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        return np.asarray(cascade.detectMultiScale(gray, 1.1, 3, minSize=(20, 20)))

    found = faces(rgb)
    assert len(found) == 1
    x, y, w, h = (float(v) for v in found[0])
    for method in METHODS:
        strength = 1 if method == "pixelate" else 0
        result = run(method, rgb, [[x, y, x + w, y + h]], strength=strength)
        assert len(faces(result.pixels)) == 0, method


# -- blur ---------------------------------------------------------------------------------------


def test_blur_sigma_scales_with_face_size(noise_image):
    result = run("blur", noise_image, [[100, 50, 140, 130]], blur_strength=0.1)
    assert result.params["regions"][0]["sigma"] == pytest.approx(0.1 * 80)
    assert result.epsilon is None


def test_blur_is_a_real_gaussian_in_the_core():
    """Inside the core the output must equal a plain Gaussian blur of the image with the
    recorded sigma (here small enough for the direct path)."""
    rgb = np.random.default_rng(9).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    result = run("blur", rgb, [[60, 60, 140, 140]], blur_strength=0.05, mask="box", feather=0.0)
    sigma = result.params["regions"][0]["sigma"]
    reference = cv2.GaussianBlur(rgb, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    assert np.array_equal(result.pixels[60:140, 60:140], reference[60:140, 60:140])


def test_large_sigma_blur_still_removes_detail():
    rgb = np.random.default_rng(2).integers(0, 256, size=(600, 600, 3), dtype=np.uint8)
    result = run("blur", rgb, [[100, 100, 500, 500]], blur_strength=0.3, strength=1)
    assert result.params["regions"][0]["sigma"] > 100
    core = result.pixels[200:400, 200:400].astype(np.float64)
    assert core.std() < 3.0  # uniform noise has std ~74; a sigma-240 blur leaves ~0


# -- pixelate -----------------------------------------------------------------------------------


def test_pixelate_cells_are_constant_and_equal_to_cell_means(noise_image):
    raw = [100, 40, 228, 200]  # 128 x 160 box: longer side 160 / 8 blocks -> 20 px cells
    result = run("pixelate", noise_image, [raw], expand=0.0, mask="box", feather=0.0)
    cell = result.params["regions"][0]["cell"]
    assert cell == 20 and result.params["pixel_blocks"] == 8
    x0, y0, x1, y1 = raw
    for cy in range(y0, y1, cell):
        for cx in range(x0, x1, cell):
            block = result.pixels[cy : min(cy + cell, y1), cx : min(cx + cell, x1)]
            assert np.all(block == block[0, 0]), (cx, cy)
            original = noise_image[cy : min(cy + cell, y1), cx : min(cx + cell, x1)]
            assert np.array_equal(block[0, 0], np.rint(original.reshape(-1, 3).mean(0)))


# -- fill ---------------------------------------------------------------------------------------


def test_fill_paints_the_core_with_the_colour(noise_image):
    result = run("fill", noise_image, [[100, 50, 200, 150]], fill_color=(10, 20, 30))
    core = result.mask == 1.0
    assert np.all(result.pixels[core] == np.array([10, 20, 30], np.uint8))


# -- DP-Pix -------------------------------------------------------------------------------------


def dp_cells(pixels: np.ndarray, box, b: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    return pixels[y0:y1:b, x0:x1:b].astype(np.float64)


def test_dp_cells_are_constant_and_the_mask_is_the_hard_box(noise_image):
    raw = [100, 40, 228, 200]
    # Ellipse and feather are configured: DP must override both.
    result = run("dp-pixelate", noise_image, [raw], expand=0.0, dp_cell=16, mask="ellipse",
                 feather=0.3)
    x0, y0, x1, y1 = raw
    expected = np.zeros(noise_image.shape[:2], np.float32)
    expected[y0:y1, x0:x1] = 1.0
    assert np.array_equal(result.mask, expected)
    assert result.params["mask"] == "box" and result.params["feather"] == 0.0
    for cy in range(y0, y1, 16):
        for cx in range(x0, x1, 16):
            block = result.pixels[cy : min(cy + 16, y1), cx : min(cx + 16, x1)]
            assert np.all(block == block[0, 0])


def test_dp_noise_has_the_laplace_scale_of_dp_pix():
    """Flat grey image: every cell mean is 128, so the released cell value minus 128 is the
    noise (rounded). Laplace(scale s) has std sqrt(2) * s with s = 255 m / (b^2 epsilon)."""
    b, m, eps = 8, 4, 2.0
    grey = np.full((512, 512, 3), 128, np.uint8)
    result = run("dp-pixelate", grey, [[0, 0, 512, 512]], expand=0.0, dp_cell=b, dp_m=m,
                 epsilon=eps)
    scale = 255 * m / (b * b * eps)
    assert result.params["noise_scale"] == pytest.approx(scale)
    noise = dp_cells(result.pixels, (0, 0, 512, 512), b) - 128.0
    assert noise.size == 64 * 64 * 3
    assert noise.std() == pytest.approx(math.sqrt(2) * scale, rel=0.05)
    assert abs(noise.mean()) < 0.1 * scale
    # Laplace, not Gaussian: mean absolute deviation is s (Gaussian would give 0.8 * std).
    assert np.abs(noise).mean() == pytest.approx(scale, rel=0.05)


def test_dp_partial_edge_cells_get_proportionally_more_noise():
    """A box 8*k + 2 px wide leaves a last column of 8x2 cells: a quarter of the pixels, so
    four times the sensitivity and four times the noise scale."""
    b, m, eps = 8, 1, 2.0
    grey = np.full((2048, 258, 3), 128, np.uint8)
    result = run("dp-pixelate", grey, [[0, 0, 258, 2048]], expand=0.0, dp_cell=b, dp_m=m,
                 epsilon=eps)
    cells = dp_cells(result.pixels, (0, 0, 258, 2048), b) - 128.0
    full, partial = cells[:, :-1], cells[:, -1]
    ratio = partial.std() / full.std()
    assert 3.4 < ratio < 4.6


def test_dp_records_epsilon_and_never_changes_it(noise_image):
    raws = [[30, 20, 90, 100], [150, 60, 260, 200]]
    cells = []
    for strength in (0, 1, 2):
        result = run("dp-pixelate", noise_image, raws, strength=strength, epsilon=0.7, dp_cell=8)
        assert result.epsilon == 0.7 and result.params["epsilon"] == 0.7
        assert result.params["n_regions"] == 2
        cells.append(result.params["dp_cell"])
    assert cells == [8, 16, 32]


def test_dp_overlapping_regions_release_each_pixel_once(noise_image):
    """Overlapping boxes: the second region must not re-average pixels the first already
    released (that would spend the budget twice on them)."""
    first, second = [40, 40, 120, 120], [80, 80, 200, 200]
    result = run("dp-pixelate", noise_image, [first, second], expand=0.0, dp_cell=16)
    alone = run("dp-pixelate", noise_image, [first], expand=0.0, dp_cell=16)
    # The first region is released exactly as if it were alone (same rng stream start).
    assert np.array_equal(result.pixels[40:120, 40:120], alone.pixels[40:120, 40:120])
    # The second region's only-its-own part is painted in its own 16 px grid (constant cells).
    block = result.pixels[128:144, 128:144]
    assert np.all(block == block[0, 0])
    assert np.all(result.mask[80:200, 80:200] == 1.0)


# -- strength rounds ----------------------------------------------------------------------------


def test_blur_rounds_double_sigma_and_grow_the_box(noise_image):
    rounds = [run("blur", noise_image, [[120, 60, 200, 160]], strength=s).params for s in (0, 1, 2)]
    sigmas = [p["regions"][0]["sigma"] for p in rounds]
    assert sigmas[1] == pytest.approx(2 * sigmas[0]) and sigmas[2] == pytest.approx(4 * sigmas[0])
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (p["regions"][0]["box"] for p in rounds)]
    assert areas[0] < areas[1] < areas[2]


def test_pixelate_rounds_halve_blocks_down_to_two(noise_image):
    blocks = [run("pixelate", noise_image, [[120, 60, 200, 160]], strength=s,
                  pixel_blocks=12).params["pixel_blocks"] for s in (0, 1, 2)]
    assert blocks == [12, 6, 3]
    assert run("pixelate", noise_image, [[120, 60, 200, 160]], strength=2,
               pixel_blocks=4).params["pixel_blocks"] == 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strength", [FALLBACK_STRENGTH, FALLBACK_STRENGTH + 4])
def test_high_strength_falls_back_to_solid_box_fill(noise_image, method, strength):
    raw = [120, 60, 200, 160]
    result = run(method, noise_image, [raw], strength=strength, fill_color=(0, 255, 0))
    assert result.params["fallback"] == "fill" and result.epsilon is None
    h, w = noise_image.shape[:2]
    x0, y0, x1, y1 = expand_box(raw, 0.2 + STRENGTH_EXPAND_STEP * strength, w, h)
    assert np.all(result.pixels[y0:y1, x0:x1] == np.array([0, 255, 0], np.uint8))
    assert np.all(result.mask[y0:y1, x0:x1] == 1.0)


# -- method none --------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0, 5])
def test_method_none_releases_the_image_unchanged(noise_image, strength):
    result = run("none", noise_image, [[120, 60, 200, 160]], strength=strength)
    assert np.array_equal(result.pixels, noise_image)
    assert result.pixels is not noise_image
    assert not result.mask.any() and result.epsilon is None
    assert result.params["method"] == "none" and "warning" in result.params


# -- the stage ----------------------------------------------------------------------------------


def make_sample(rgb: np.ndarray, regions: list[dict], key: str = "s-0") -> dict:
    return {"__key__": key, "__shard__": "shard-0", "__index__": 0, "__image__": "png",
            "_pixels": rgb, "regions": regions, "status": "pending"}


def test_stage_without_regions_marks_clean(noise_image):
    stage = AnonymizeStage(AnonymizeConfig(), expand=0.2, seed=0)
    [out] = stage.process_batch([make_sample(noise_image, [])])
    assert out["status"] == CLEAN and out["params"] == {} and out["epsilon"] is None
    assert np.array_equal(out["_pixels"], noise_image)
    assert out["_mask"].shape == noise_image.shape[:2] and not out["_mask"].any()
    assert "anonymize" in out["timings"]


def test_stage_with_regions_anonymizes_and_records(noise_image):
    stage = AnonymizeStage(AnonymizeConfig(method="dp-pixelate", epsilon=1.5), expand=0.2, seed=4)
    [out] = stage.process_batch([make_sample(noise_image, [face([120, 60, 200, 160])])])
    assert out["status"] == ANONYMIZED and out["method"] == "dp-pixelate"
    assert out["epsilon"] == 1.5 and out["anonymize_round"] == 0
    assert out["params"]["dp_cell"] == 16 and out["_mask"].max() == 1.0
    assert not np.array_equal(out["_pixels"], noise_image)
    # The stage's noise is the documented (seed, key) stream: a second stage agrees.
    again = AnonymizeStage(AnonymizeConfig(method="dp-pixelate", epsilon=1.5), expand=0.2, seed=4)
    [out2] = again.process_batch([make_sample(noise_image, [face([120, 60, 200, 160])])])
    assert np.array_equal(out["_pixels"], out2["_pixels"])


def test_stage_passes_quarantined_samples_untouched(noise_image):
    stage = AnonymizeStage(AnonymizeConfig(), expand=0.2, seed=0)
    sample = make_sample(noise_image, [face([120, 60, 200, 160])])
    sample.update(status=QUARANTINED, reason="decode_error: truncated")
    snapshot = dict(sample)
    [out] = stage.process_batch([sample])
    assert out == snapshot and out["_pixels"] is noise_image


def test_stage_quarantines_a_sample_with_a_malformed_box(noise_image):
    stage = AnonymizeStage(AnonymizeConfig(), expand=0.2, seed=0)
    good = make_sample(noise_image, [face([120, 60, 200, 160])], key="good")
    bad = make_sample(noise_image, [face([120, 60, float("nan"), 160])], key="bad")
    out_bad, out_good = stage.process_batch([bad, good])
    assert out_bad["status"] == QUARANTINED and out_bad["reason"].startswith("anonymize_error")
    assert out_good["status"] == ANONYMIZED


def test_stage_method_none_notes_that_faces_are_released(noise_image):
    stage = AnonymizeStage(AnonymizeConfig(method="none"), expand=0.2, seed=0)
    [out] = stage.process_batch([make_sample(noise_image, [face([120, 60, 200, 160])])])
    assert np.array_equal(out["_pixels"], noise_image)
    assert "none" in out["reason"]


def test_stage_rejects_a_bad_seed_at_construction():
    with pytest.raises(ValueError):
        AnonymizeStage(AnonymizeConfig(), expand=0.2, seed=-3)
