"""Per-sample pixel metrics for the validation gates: where the PII is, how much the rest of the
image changed, how much of a face region leaks, and which faces are found again.

Why this module looks the way it does:

* **Background and PII are measured apart.** Anonymization is *supposed* to destroy the face
  region, so a whole-image PSNR/SSIM mixes the wanted change with unwanted damage. Background
  fidelity is computed only outside the (expanded) PII boxes; leakage is measured only inside
  them.
* **Window effects are cut away, not averaged in.** SSIM is a windowed statistic: a background
  pixel whose 7x7 window reaches into the anonymized face sees the change of the face. The
  outside region is eroded by the window radius before the SSIM map is averaged, so a perfect
  background scores exactly 1 however much the face changed.
* **Leakage as the share of information kept.** :func:`normalized_mutual_information` follows
  SpinML (Section 3.4, eq. 1): the mutual information between the original and the sanitized
  region divided by the information the original holds about itself (its entropy).
* **Plain numpy/OpenCV/scikit-image, no models.** Everything here is cheap and deterministic,
  so the validation engine can call it per sample on any worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from veil.transforms.stage import region_box

__all__ = [
    "PSNR_IDENTICAL_DB",
    "SSIM_WINDOW",
    "pii_mask",
    "background_fidelity",
    "normalized_mutual_information",
    "face_crop",
    "box_iou",
    "match_regions",
    "landmark_displacement",
    "COLOR_CENTRE",
    "color_shift",
]

#: PSNR reported when the compared pixels are identical (the true value is infinite, which JSON
#: cannot carry and which would dominate any mean). No real change of an 8-bit image reaches it:
#: a single grey level of difference in one channel of one pixel in 10^8 pixels scores ~133 dB,
#: so values are capped at this too, and 100 dB reads as "no measurable change".
PSNR_IDENTICAL_DB = 100.0

#: SSIM window side (scikit-image's default for the uniform filter, Wang et al. use 7 or 8).
SSIM_WINDOW = 7

#: Below this many outside pixels (or 1% of the image, whichever is larger) the background is
#: too small for a meaningful fidelity figure and ``None`` is reported instead.
MIN_BACKGROUND_PIXELS = 64
MIN_BACKGROUND_FRACTION = 0.01

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as OpenCV's RGB2GRAY

#: Share of a face box's width and height, around its centre, whose colour
#: :func:`color_shift` compares: mostly skin, eyes, nose and mouth, little hair or background.
COLOR_CENTRE = 0.6


def pii_mask(
    height: int, width: int, boxes: Sequence[Sequence[float]], *, expand: float = 0.25
) -> np.ndarray:
    """Boolean ``height x width`` mask, True inside the PII regions.

    Each box (x0, y0, x1, y1) in pixel coordinates is grown by ``expand`` times its width on the
    left and right and its height on the top and bottom (like the anonymizer's expanded box, so
    hair, ears and chin count as PII), rounded *outward* to whole pixels, so a partly covered
    pixel counts as PII, and clipped to the image. A box entirely outside the image marks nothing.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    if expand < 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = region_box(box)
        dx, dy = (x1 - x0) * expand, (y1 - y0) * expand
        ix0, iy0 = max(math.floor(x0 - dx), 0), max(math.floor(y0 - dy), 0)
        ix1, iy1 = min(math.ceil(x1 + dx), width), min(math.ceil(y1 + dy), height)
        if ix1 > ix0 and iy1 > iy0:
            mask[iy0:iy1, ix0:ix1] = True
    return mask


def _check_pair(original: np.ndarray, anonymized: np.ndarray, what: str) -> None:
    if original.shape != anonymized.shape:
        raise ValueError(
            f"{what} needs images of the same size, got original {_shape_text(original)} and "
            f"anonymized {_shape_text(anonymized)} (was the anonymized image resized or re-encoded "
            "with another orientation?)"
        )


def _shape_text(image: np.ndarray) -> str:
    if image.ndim < 2:
        return f"shape {image.shape}"
    tail = f"x{image.shape[2]}" if image.ndim == 3 else ""
    return f"{image.shape[1]}x{image.shape[0]}{tail} (WxH)"


def background_fidelity(original: np.ndarray, anonymized: np.ndarray, mask: np.ndarray) -> dict:
    """PSNR and SSIM of ``anonymized`` against ``original`` *outside* ``mask`` (the PII).

    Both images are RGB (or grayscale) uint8 of the same size; ``mask`` is the boolean HxW PII
    mask (see :func:`pii_mask`). Returns ``{"psnr": float|None, "ssim": float|None, "pixels": int}``
    where ``pixels`` is the number of outside pixels.

    * PSNR: over all channels of the outside pixels, peak 255. Identical pixels give
      :data:`PSNR_IDENTICAL_DB` (100 dB) instead of infinity; larger values are capped to it.
    * SSIM: scikit-image's SSIM map (uniform 7x7 window, per channel, averaged over channels) is
      averaged over the outside region *eroded by the window radius* (3 px), i.e. only over
      pixels whose whole window lies outside the PII and inside the image. Pixels next to the
      mask would otherwise report the face's change as background damage. ``None`` when the
      image is smaller than the window or nothing is left after the erosion.
    * Both are ``None`` when fewer than 1% of the pixels (or fewer than 64) are outside the mask.
    """
    original = np.asarray(original)
    anonymized = np.asarray(anonymized)
    mask = np.asarray(mask)
    _check_pair(original, anonymized, "background fidelity")
    if original.dtype != np.uint8 or anonymized.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {original.dtype} and {anonymized.dtype}")
    if original.ndim not in (2, 3) or (original.ndim == 3 and original.shape[2] not in (1, 3)):
        raise ValueError(f"images must be HxW or HxWx3, got shape {original.shape}")
    height, width = original.shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask must be {height}x{width} (HxW) like the images, got {mask.shape}")
    outside = ~mask.astype(bool)
    pixels = int(outside.sum())
    result: dict = {"psnr": None, "ssim": None, "pixels": pixels}
    if pixels < max(MIN_BACKGROUND_PIXELS, math.ceil(MIN_BACKGROUND_FRACTION * height * width)):
        return result

    diff = original[outside].astype(np.float64) - anonymized[outside].astype(np.float64)
    mse = float(np.mean(diff * diff))
    result["psnr"] = (
        PSNR_IDENTICAL_DB if mse == 0 else min(PSNR_IDENTICAL_DB, 10.0 * math.log10(255.0**2 / mse))
    )

    if min(height, width) >= SSIM_WINDOW:
        import cv2
        kernel = np.ones((SSIM_WINDOW, SSIM_WINDOW), np.uint8)
        # The zero border also drops the image's outer 3 px, which scikit-image itself excludes.
        inner = cv2.erode(
            outside.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
        )
        inner = inner.astype(bool)
        if inner.any():
            color = original.ndim == 3 and original.shape[2] == 3
            shape = original.shape if color else (height, width)
            a = original.reshape(shape).astype(np.float32)
            b = anonymized.reshape(shape).astype(np.float32)
            ssim_map = _ssim_map(a, b)
            if ssim_map.ndim == 3:
                ssim_map = ssim_map.mean(axis=2)
            result["ssim"] = float(ssim_map[inner].mean(dtype=np.float64))
    return result


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The SSIM map of scikit-image's ``structural_similarity`` defaults (7x7 uniform window,
    sample covariance, K1 0.01, K2 0.03, data range 255), per channel, computed with OpenCV
    box filters in float32: about 10x faster than scikit-image on a 640x480 RGB image, and
    equal to it within 2e-4 at any pixel (float32; tests/test_quality.py compares the two)."""
    import cv2

    n = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = n / (n - 1.0)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, (SSIM_WINDOW, SSIM_WINDOW), normalize=True,
                             borderType=cv2.BORDER_REFLECT)

    # Centred values keep float32's E[x^2] - E[x]^2 from cancelling on bright images.
    a, b = a - 128.0, b - 128.0
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    ux, uy = ux + 128.0, uy + 128.0
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3].astype(np.float64) @ _LUMA
    if image.ndim == 2:
        return image.astype(np.float64)
    raise ValueError(f"expected an HxW or HxWx3 image region, got shape {image.shape}")


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, *, bins: int = 32) -> float:
    """How much of the information in region ``a`` (original) is still in region ``b``
    (anonymized), in [0, 1].

    SpinML eq. 1 (Section 3.4) normalises per image by the information the original holds about
    itself: ``NMI = I(a; b) / I(a; a) = I(a; b) / H(a)``. This is that normalisation (by the
    *original's* entropy, not a symmetric one), computed on the grayscale regions (BT.601 luma)
    quantised into ``bins`` equal-width bins over 0..255 (the same bin edges for every image,
    so values are comparable across samples), with plug-in entropies from the joint histogram.

    * identical non-constant regions, or any one-to-one remapping of grey levels: 1;
    * independent regions: ~0 (the plug-in estimate carries a small positive bias of about
      ``(bins - 1)^2 / (2 n)`` nats over ``H(a)``, negligible for faces of a few thousand pixels);
    * a constant original region holds no information (H(a) = 0), so nothing can leak from it:
      defined as 0, whatever ``b`` is.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    ga, gb = _gray(a), _gray(b)
    if ga.shape != gb.shape:
        raise ValueError(
            f"normalized mutual information needs regions of the same size, got "
            f"{ga.shape[1]}x{ga.shape[0]} and {gb.shape[1]}x{gb.shape[0]} (WxH)"
        )
    if ga.size == 0:
        raise ValueError("normalized mutual information of an empty region")
    ia = np.clip((ga * (bins / 256.0)).astype(np.int64), 0, bins - 1).ravel()
    ib = np.clip((gb * (bins / 256.0)).astype(np.int64), 0, bins - 1).ravel()
    joint = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins)
    h_a = _entropy(joint.sum(axis=1))
    if h_a <= 0.0:
        return 0.0
    mutual = h_a + _entropy(joint.sum(axis=0)) - _entropy(joint.ravel())
    return float(min(1.0, max(0.0, mutual / h_a)))


def face_crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The pixels of ``box`` (x0, y0, x1, y1): edges rounded to the nearest integer (halves up),
    clipped to the image, at least 1x1 (a degenerate or outside box gives the nearest pixel).
    Returns a view into ``image``, not a copy."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got shape {image.shape}")
    x0, y0, x1, y1 = (math.floor(v + 0.5) for v in region_box(box))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    return image[y0:y1, x0:x1]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when the union is empty."""
    ax0, ay0, ax1, ay1 = region_box(a)
    bx0, by0, bx1, by1 = region_box(b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def match_regions(
    reference: Sequence[Sequence[float]], candidates: Sequence[Sequence[float]], *, iou: float = 0.3
) -> list[int | None]:
    """Greedy one-to-one matching of boxes by IoU.

    All (reference, candidate) pairs with IoU >= ``iou`` are taken in order of decreasing IoU;
    a pair is kept when neither box is matched yet (boxes that do not overlap at all never
    match, even with ``iou=0``). Ties go to the lower reference index, then
    the lower candidate index, so the result is deterministic. Returns, for each reference box,
    the index of its candidate or None.
    """
    pairs = []
    for i, ref in enumerate(reference):
        for j, cand in enumerate(candidates):
            overlap = box_iou(ref, cand)
            if overlap >= iou and overlap > 0:
                pairs.append((-overlap, i, j))
    pairs.sort()
    matched: list[int | None] = [None] * len(reference)
    taken: set[int] = set()
    for _, i, j in pairs:
        if matched[i] is None and j not in taken:
            matched[i] = j
            taken.add(j)
    return matched


def _landmarks(points: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    if points is None:
        return None
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return None
    if arr.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as (x, y) pairs, got shape {arr.shape}")
    return arr if np.isfinite(arr).all() else None


def landmark_displacement(
    reference: Sequence[Sequence[float]] | None, candidate: Sequence[Sequence[float]] | None
) -> float | None:
    """Mean Euclidean distance between corresponding landmarks (left eye, right eye, nose, two
    mouth corners), in units of the reference's inter-ocular distance (the distance between its
    first two points), so the figure does not depend on the face's size in the image.

    ``None`` when either set is missing (None, empty or non-finite) or the reference's eyes
    coincide.
    """
    ref, cand = _landmarks(reference), _landmarks(candidate)
    if ref is None or cand is None:
        return None
    inter_ocular = float(np.linalg.norm(ref[0] - ref[1]))
    if inter_ocular <= 1e-9:
        return None
    return float(np.linalg.norm(ref - cand, axis=1).mean() / inter_ocular)


def color_shift(original: np.ndarray, anonymized: np.ndarray,
                centre: float = COLOR_CENTRE) -> tuple[float, float]:
    """How far a face's overall colour moved: ``(delta_e, delta_l)``.

    Both crops are RGB uint8 of the same face box. The mean CIELAB colour (D65) of the central
    ``centre`` share of each is compared: ``delta_e`` is the CIE76 distance of the two means
    (about 2.3 is a just-noticeable difference), ``delta_l`` the signed change of lightness L*
    (positive: the face got lighter). Structure (a new nose, other wrinkles) barely moves the
    mean; a shift of skin tone or lighting does, which is what this measures: a replacement
    face should keep the original's skin tone.
    """
    from skimage.color import rgb2lab

    original, anonymized = np.asarray(original), np.asarray(anonymized)
    if original.shape != anonymized.shape or original.ndim != 3 or original.shape[2] != 3:
        raise ValueError(f"need two RGB crops of one shape, got {original.shape} and {anonymized.shape}")
    if not 0.0 < centre <= 1.0:
        raise ValueError(f"centre must be in (0, 1], got {centre}")
    height, width = original.shape[:2]
    dy, dx = int(height * (1 - centre) / 2), int(width * (1 - centre) / 2)
    window = (slice(dy, max(height - dy, dy + 1)), slice(dx, max(width - dx, dx + 1)))

    def mean_lab(crop: np.ndarray) -> np.ndarray:
        return rgb2lab(crop[window].astype(np.float64) / 255.0).reshape(-1, 3).mean(0)

    diff = mean_lab(anonymized) - mean_lab(original)
    return float(np.linalg.norm(diff)), float(diff[0])
