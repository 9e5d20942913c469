"""Tests for veil.validators.quality against hand-computed values: the PII mask's geometry,
background PSNR/SSIM outside the mask, SpinML's normalised mutual information, face crops,
greedy IoU matching and landmark displacement; then the same functions on a real photo with
the real CenterFace detector."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import face_photo

from veil.validators.quality import (
    PSNR_IDENTICAL_DB,
    background_fidelity,
    box_iou,
    color_shift,
    face_crop,
    landmark_displacement,
    match_regions,
    normalized_mutual_information,
    pii_mask,
)

# ------------------------------------------------------------------------------- PII mask


def test_pii_mask_grows_each_box_by_expand_times_its_size_per_side():
    mask = pii_mask(100, 100, [(10, 20, 30, 60)], expand=0.25)  # w 20 -> 5 px, h 40 -> 10 px
    expected = np.zeros((100, 100), bool)
    expected[10:70, 5:35] = True
    assert mask.dtype == bool and mask.shape == (100, 100)
    assert np.array_equal(mask, expected)
    assert mask.sum() == 60 * 30


def test_pii_mask_rounds_outward_clips_and_ignores_boxes_outside_the_image():
    mask = pii_mask(40, 50, [(10.5, 20.2, 29.5, 39.7)], expand=0.0)
    assert np.argwhere(mask).min(axis=0).tolist() == [20, 10]  # floor of the top-left corner
    assert np.argwhere(mask).max(axis=0).tolist() == [39, 29]  # ceil of the bottom-right - 1
    clipped = pii_mask(40, 50, [(-10, -10, 10, 10)], expand=0.5)  # grows to -20..20, cut at 0
    assert clipped.sum() == 20 * 20 and clipped[:20, :20].all()
    assert not pii_mask(40, 50, [(60, 60, 80, 80)]).any()
    assert not pii_mask(40, 50, []).any()
    union = pii_mask(40, 50, [(0, 0, 10, 10), (5, 5, 15, 15)], expand=0.0)
    assert union.sum() == 100 + 100 - 25


def test_pii_mask_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        pii_mask(10, 10, [(1, 2, 3)])
    with pytest.raises(ValueError, match="non-finite"):
        pii_mask(10, 10, [(1, 2, float("nan"), 4)])
    with pytest.raises(ValueError, match="expand"):
        pii_mask(10, 10, [(1, 2, 3, 4)], expand=-0.1)


# ---------------------------------------------------------------------- background fidelity


def _scene(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 230, (height, width, 3), dtype=np.uint8)


def test_background_psnr_of_a_known_difference_ignores_the_pii():
    original = _scene()
    mask = pii_mask(64, 64, [(20, 20, 40, 40)], expand=0.0)
    anonymized = original.copy()
    anonymized[~mask] += 10  # every outside value off by 10 -> MSE 100
    anonymized[mask] = 255 - original[mask]  # the face itself changes completely
    result = background_fidelity(original, anonymized, mask)
    assert result["pixels"] == 64 * 64 - 400
    assert result["psnr"] == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    half = original.copy()
    rows = np.zeros_like(mask)
    rows[::2] = True
    half[~mask & rows] += 10  # half of the outside pixels off by 10 -> MSE 50
    assert background_fidelity(original, half, mask)["psnr"] == pytest.approx(
        10 * math.log10(255**2 / 50)
    )


def test_identical_background_scores_capped_psnr_and_ssim_one_however_the_face_changed():
    from skimage.metrics import structural_similarity

    original = _scene(96, 80)
    mask = pii_mask(96, 80, [(25, 30, 55, 70)], expand=0.0)
    anonymized = original.copy()
    anonymized[mask] = 0  # solid fill
    result = background_fidelity(original, anonymized, mask)
    assert result["psnr"] == PSNR_IDENTICAL_DB
    assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
    # Without the erosion, windows overlapping the filled face would drag the mean down:
    _, full = structural_similarity(
        original, anonymized, win_size=7, data_range=255, channel_axis=2, full=True
    )
    naive = full.mean(axis=2)
    assert naive[~mask].mean() < 0.99
    ring = pii_mask(96, 80, [(22, 27, 58, 73)], expand=0.0) & ~mask  # 3 px around the face
    assert naive[ring].mean() < 0.8


def test_background_ssim_drops_when_the_background_is_damaged():
    original = _scene()
    mask = pii_mask(64, 64, [(20, 20, 40, 40)], expand=0.0)
    import cv2

    damaged = cv2.GaussianBlur(original, (0, 0), 2.0)
    result = background_fidelity(original, damaged, mask)
    assert result["ssim"] < 0.5 and result["psnr"] < 30
    grey = background_fidelity(original[:, :, 0], damaged[:, :, 0], mask)
    assert grey["ssim"] < 0.5


def test_background_fidelity_is_none_when_almost_everything_is_pii():
    original = _scene(100, 100)
    mask = np.ones((100, 100), bool)
    mask[0, :50] = False  # 50 outside pixels: fewer than 64 (and than 1%)
    result = background_fidelity(original, original, mask)
    assert result == {"psnr": None, "ssim": None, "pixels": 50}
    mask[0:2, :] = False  # 200 pixels outside, but all within 3 px of the border: no SSIM window
    result = background_fidelity(original, original, mask)
    assert (
        result["psnr"] == PSNR_IDENTICAL_DB and result["ssim"] is None and result["pixels"] == 200
    )


def test_background_fidelity_rejects_images_of_different_sizes():
    with pytest.raises(ValueError, match="same size"):
        background_fidelity(_scene(64, 64), _scene(32, 64), np.zeros((64, 64), bool))
    with pytest.raises(ValueError, match="mask"):
        background_fidelity(_scene(), _scene(), np.zeros((32, 32), bool))


# ------------------------------------------------------------------------------------- NMI


def test_nmi_of_identical_regions_is_one_and_of_independent_noise_about_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    assert normalized_mutual_information(a, a) == pytest.approx(1.0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert normalized_mutual_information(rgb, rgb.copy()) == pytest.approx(1.0)
    b = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    assert 0.0 <= normalized_mutual_information(a, b) < 0.02


def test_nmi_of_permuted_images():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    # A one-to-one relabelling of the grey levels (per bin) keeps all the information...
    levels = rng.permutation(32)
    relabelled = (levels[a // 8] * 8 + 3).astype(np.uint8)
    assert normalized_mutual_information(a, relabelled) == pytest.approx(1.0)
    assert normalized_mutual_information(a, 255 - a) == pytest.approx(1.0)
    # ...a spatial shuffle of the same pixels keeps the histogram but none of the information.
    shuffled = rng.permutation(a.ravel()).reshape(a.shape)
    assert normalized_mutual_information(a, shuffled) < 0.02


def test_nmi_hand_computed_values_and_the_normalisation_by_the_original():
    # a has three grey bins with p = 1/2, 1/4, 1/4 (H = 1.5 bits); b is a function of a that
    # merges the last two (H = 1 bit): I(a; b) = H(b), so NMI = 1 / 1.5 (not symmetric).
    a = np.array([[0, 0], [128, 255]], np.uint8)
    b = np.array([[0, 0], [128, 128]], np.uint8)
    assert normalized_mutual_information(a, b) == pytest.approx(2 / 3)
    assert normalized_mutual_information(b, a) == pytest.approx(1.0)
    # Two independent binary patterns: I = 0.
    assert normalized_mutual_information(
        np.array([[0, 255], [0, 255]], np.uint8), np.array([[0, 0], [255, 255]], np.uint8)
    ) == pytest.approx(0.0)


def test_nmi_of_constant_regions_is_zero_and_sizes_must_match():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    flat = np.full((32, 32), 90, np.uint8)
    assert normalized_mutual_information(flat, a) == 0.0  # nothing to leak
    assert normalized_mutual_information(flat, flat) == 0.0
    assert normalized_mutual_information(a, flat) == 0.0  # a solid fill leaks nothing
    with pytest.raises(ValueError, match="same size"):
        normalized_mutual_information(a, a[:16])


# ------------------------------------------------------------------------------ face crop


def test_face_crop_rounds_clips_and_is_never_empty():
    image = np.arange(10 * 20).reshape(10, 20)
    crop = face_crop(image, (2.4, 3.6, 7.5, 8.49))  # -> x 2..8, y 4..8
    assert crop.shape == (4, 6) and crop[0, 0] == image[4, 2]
    assert face_crop(image, (-5, -5, 3, 2)).shape == (2, 3)
    outside = face_crop(image, (30, 30, 40, 40))
    assert outside.shape == (1, 1) and outside[0, 0] == image[9, 19]
    assert face_crop(image, (5, 5, 5, 5)).shape == (1, 1)
    assert face_crop(np.zeros((10, 20, 3)), (0, 0, 20, 10)).shape == (10, 20, 3)


# ------------------------------------------------------------------------------- matching


def test_box_iou_hand_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 6)) == pytest.approx(0.6)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


def test_match_regions_takes_the_best_pairs_first_across_crossings():
    a, b = (0, 0, 10, 10), (0, 0, 10, 6.5)
    c0, c1 = (0, 0, 10, 5), (0, 0, 10, 6)
    # IoU: a-c0 0.5, a-c1 0.6, b-c0 0.77, b-c1 0.92. Per-reference argmax would give a the
    # candidate 1 and leave b with 0; greedy by IoU gives b its best (1) first.
    assert match_regions([a, b], [c0, c1]) == [0, 1]
    assert match_regions([b, a], [c1, c0]) == [0, 1]


def test_match_regions_ties_thresholds_and_empty_inputs():
    box = (10, 10, 30, 30)
    assert match_regions([box], [box, box]) == [0]  # tie: the lower candidate index
    assert match_regions([box, box], [box]) == [0, None]  # tie: the lower reference index
    far = (100, 100, 120, 120)
    assert match_regions([box, far], [(12, 10, 32, 30)]) == [0, None]
    assert match_regions([box], [(20, 10, 40, 30)]) == [0]  # IoU 1/3 >= 0.3
    assert match_regions([box], [(20, 10, 40, 30)], iou=0.5) == [None]
    assert match_regions([], [box]) == []
    assert match_regions([box, far], []) == [None, None]


# -------------------------------------------------------------------- landmark displacement

REF = [(30, 40), (50, 40), (40, 50), (33, 60), (47, 60)]  # eyes 20 px apart


def test_landmark_displacement_of_a_known_shift():
    shifted = [(x + 3, y + 4) for x, y in REF]  # every point moves 5 px
    assert landmark_displacement(REF, shifted) == pytest.approx(5 / 20)
    one_moved = [*REF[:2], (50, 50), *REF[3:]]  # only the nose, by 10 px: mean 2 px
    assert landmark_displacement(REF, one_moved) == pytest.approx(2 / 20)
    assert landmark_displacement(REF, REF) == 0.0


def test_landmark_displacement_missing_or_degenerate():
    assert landmark_displacement(None, REF) is None
    assert landmark_displacement(REF, None) is None
    assert landmark_displacement(REF, []) is None
    assert landmark_displacement([(1, 1), (1, 1), *REF[2:]], REF) is None  # eyes coincide
    assert landmark_displacement(REF, [(float("nan"), 0.0), *REF[1:]]) is None
    with pytest.raises(ValueError, match="5 landmarks"):
        landmark_displacement(REF[:4], REF[:4])


# ---------------------------------------------------------------------------- colour shift


def test_color_shift_of_flat_colours_is_their_cielab_distance():
    grey = np.full((20, 20, 3), 128, np.uint8)
    assert color_shift(grey, grey) == (0.0, 0.0)
    # sRGB 128 grey is L* 53.59, 148 grey L* 61.32 (by hand: linearise, Y^(1/3), 116 f - 16).
    delta_e, delta_l = color_shift(grey, np.full_like(grey, 148))
    assert delta_l == pytest.approx(61.32 - 53.59, abs=0.02)
    assert delta_e == pytest.approx(delta_l, abs=1e-3)  # grey stays grey: all of it is lightness
    darker_e, darker_l = color_shift(np.full_like(grey, 148), grey)
    assert darker_l == pytest.approx(-delta_l) and darker_e == pytest.approx(delta_e)
    tinted = grey.copy()
    tinted[..., 0] = 150  # redder, barely lighter
    tint_e, tint_l = color_shift(grey, tinted)
    assert tint_e > 3 * abs(tint_l) and tint_e > 5


def test_color_shift_reads_the_face_centre_and_ignores_structure():
    rng = np.random.default_rng(0)
    face = rng.integers(60, 200, (50, 50, 3), dtype=np.uint8)
    border_only = face.copy()
    border_only[:10] = 0  # outside the central 60 % (rows and columns 10-39): not read
    border_only[:, -10:] = 255
    assert color_shift(face, border_only) == (0.0, 0.0)
    assert color_shift(face, border_only, centre=1.0)[0] > 1.0
    # The same pixels in another order (a new structure, the same colours) barely move the mean.
    shuffled = face.copy()
    inner = shuffled[10:40, 10:40].reshape(-1, 3)
    shuffled[10:40, 10:40] = rng.permutation(inner).reshape(30, 30, 3)
    assert color_shift(face, shuffled)[0] < 0.05
    tiny = np.full((1, 1, 3), 90, np.uint8)  # a 1x1 crop still has a centre
    assert color_shift(tiny, tiny + 10)[1] > 0


def test_color_shift_rejects_crops_it_cannot_compare():
    grey = np.full((8, 8, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="RGB crops of one shape"):
        color_shift(grey, grey[:4])
    with pytest.raises(ValueError, match="RGB crops of one shape"):
        color_shift(grey[..., 0], grey[..., 0])
    with pytest.raises(ValueError, match="centre"):
        color_shift(grey, grey, centre=0.0)


# ----------------------------------------------------------------- a real photo, real detector


@pytest.fixture(scope="module")
def centerface():
    from veil.transforms.detect import CenterFaceDetector
    from veil.transforms.models import ModelNotFoundError, ModelRegistry

    try:
        path = ModelRegistry(models_dir=None).resolve("centerface")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return CenterFaceDetector(path)


def test_real_photo_fill_blur_and_shift(centerface, faces_dir):
    import cv2

    photo = face_photo(faces_dir, "obama.jpg", 400)
    height, width = photo.shape[:2]
    [face] = centerface.detect(photo)
    mask = pii_mask(height, width, [face.box], expand=0.25)

    blurred = photo.copy()
    blurred[mask] = cv2.GaussianBlur(photo, (0, 0), 8.0)[mask]
    filled = photo.copy()
    filled[mask] = 128
    for anonymized in (blurred, filled):
        fidelity = background_fidelity(photo, anonymized, mask)
        assert fidelity["psnr"] == PSNR_IDENTICAL_DB and fidelity["ssim"] == pytest.approx(1.0)
        assert fidelity["pixels"] == height * width - mask.sum()
    original_face = face_crop(photo, face.box)
    nmi_blur = normalized_mutual_information(original_face, face_crop(blurred, face.box))
    assert normalized_mutual_information(original_face, face_crop(filled, face.box)) == 0.0
    assert 0.05 < nmi_blur < 0.9  # a blur keeps part of the information, not all of it
    assert normalized_mutual_information(original_face, original_face) == pytest.approx(1.0)

    # The same photo moved by (6, 8) px: the face is re-detected, matched, and its landmarks
    # moved by 10 px, i.e. 10 / inter-ocular distance.
    moved = np.zeros_like(photo)
    moved[8:, 6:] = photo[:-8, :-6]
    found = centerface.detect(moved)
    assert match_regions([face.box], [r.box for r in found]) == [0]
    inter_ocular = math.dist(face.landmarks[0], face.landmarks[1])
    displacement = landmark_displacement(face.landmarks, found[0].landmarks)
    assert displacement == pytest.approx(10 / inter_ocular, rel=0.25)


def test_ssim_map_matches_scikit_image(faces_dir):
    """The OpenCV SSIM map equals scikit-image's reference implementation on a real photo."""
    from skimage.metrics import structural_similarity

    from veil.validators.quality import _ssim_map

    a = face_photo(faces_dir, "grace_hopper.jpg", max_side=320).astype(np.float32)
    b = a.copy()
    b[40:160, 60:200] = np.clip(b[40:160, 60:200] * 0.6 + 30, 0, 255)
    b += np.random.default_rng(0).normal(0, 4, b.shape).astype(np.float32)
    _, ref = structural_similarity(a.astype(np.float64), b.astype(np.float64), win_size=7,
                                   data_range=255, channel_axis=2, full=True)
    ours = _ssim_map(a, b)
    inner = (slice(3, -3), slice(3, -3))  # scikit-image pads its border differently
    assert np.abs(ref[inner] - ours[inner]).max() < 2e-4
    assert abs(ref[inner].mean() - ours[inner].mean()) < 1e-5
