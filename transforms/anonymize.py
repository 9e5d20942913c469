"""Anonymize detected regions: Gaussian blur, pixelation, solid fill or DP-Pix.

Every method works on the *expanded* region box (the detector's box grown by ``expand`` of its
size on each side, so hair, ears and chin go too) and only touches pixels inside that box plus
an outward feather. Nothing here draws from global random state: the one source of randomness
is the ``numpy.random.Generator`` passed in, which the stage derives from ``(run seed, sample
key)`` with :func:`sample_rng`, so every runner produces identical bytes.

Masks
    A region mask is 1.0 over the *core* (the ellipse inscribed in the expanded box, or the box
    itself) and ramps down to 0 *outside* the core over ``feather * min(box side)`` pixels. The
    feather only ever widens the anonymized area: a ramp inside the core would leave a rim of
    the face partly original, which is exactly the part a recognizer or a human can use.
    For a face cut by the image edge the shape is that of the whole expanded box, cut at the
    frame, so the visible part of the face is still inside the core.

Strength (the re-scan stage's rounds)
    ``strength=0`` is the configured setting. Each further round is clearly stronger: the box
    grows by another ``STRENGTH_EXPAND_STEP`` of the face size per side, blur sigma doubles,
    pixelation blocks halve (never below 2 unless configured lower), DP-Pix cells double in side
    (epsilon is the user's privacy budget and is never changed here), fill stays fill. From
    ``FALLBACK_STRENGTH`` on, every method falls back to a solid fill of the hard box.

DP-Pix (Fan 2018, "Image pixelization with differential privacy")
    The expanded box is cut into ``b x b`` cells aligned to its top-left corner; each cell's
    per-channel mean gets Laplace noise and the cell is painted with the noisy mean. See
    :meth:`Anonymizer._dp_pixelate` for the sensitivity argument and the accounting.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from veil.config import AnonymizeConfig
from veil.transforms.stage import ANONYMIZED, CLEAN, Resources, Sample, SampleStage, region_box

#: From this strength on, every method is replaced by a solid fill of the hard box.
FALLBACK_STRENGTH = 3
#: Extra expansion (fraction of the face box per side) added for each strength round.
STRENGTH_EXPAND_STEP = 0.1
#: Above this sigma the blur runs on a downscaled crop (same result to the eye, far faster:
#: a direct blur of a 1000 px face at sigma 240 would need a 1441-tap kernel).
_DIRECT_BLUR_MAX_SIGMA = 8.0
#: Sigma (in downscaled pixels) used when blurring on a downscaled crop.
_DOWNSCALED_BLUR_SIGMA = 4.0

Box = tuple[int, int, int, int]


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """The random generator for one sample of one run.

    Seeded by the run seed and a hash of the sample key, so a sample's noise depends on nothing
    else (not on batch composition, worker, runner or processing order) and two samples never
    share a stream. ``hash()`` is salted per process, so sha256 is used instead.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def _outward_box(box: Sequence[float], expand: float) -> Box:
    """The expanded box rounded outward to whole pixels, *not* clipped to the image."""
    if expand < 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    x0, y0, x1, y1 = region_box(box)
    dx, dy = (x1 - x0) * expand, (y1 - y0) * expand
    ix0, iy0 = math.floor(x0 - dx), math.floor(y0 - dy)
    return ix0, iy0, max(math.ceil(x1 + dx), ix0 + 1), max(math.ceil(y1 + dy), iy0 + 1)


def _clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    ix0, iy0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return ix0, iy0, max(min(x1, width), ix0 + 1), max(min(y1, height), iy0 + 1)


def expand_box(box: Sequence[float], expand: float, width: int, height: int) -> Box:
    """Grow ``box`` by ``expand`` times its width (left and right) and height (top and bottom),
    round *outward* to whole pixels and clip to the image.

    Rounding outward means a fractional edge never leaves a partly covered face pixel out. The
    result is always at least 1x1 inside the image, even for a degenerate box or one that lies
    entirely outside the frame, so every caller can index with it.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    return _clip_box(_outward_box(box, expand), width, height)


def _overlaps(box: Box, width: int, height: int) -> bool:
    x0, y0, x1, y1 = box
    return x0 < width and y0 < height and x1 > 0 and y1 > 0


def _feather_px(box_px: Box, feather: float) -> float:
    x0, y0, x1, y1 = box_px
    return max(0.0, feather) * min(x1 - x0, y1 - y0)


def _mask_window(
    height: int, width: int, box_px: Box, *, shape: str, feather: float
) -> tuple[Box, np.ndarray]:
    """The non-zero part of a region mask: ``(window box, float32 mask of that window)``.

    ``box_px`` may extend past the frame (a face cut by the image edge): the ellipse keeps the
    face's true shape and is cut at the frame, instead of being squeezed into the visible part
    (which would leave the face's visible edge outside the core). Working on a window keeps
    the cost proportional to the face, not to the image. The window may be empty when the
    box and its feather lie entirely outside the image.
    """
    if shape not in ("ellipse", "box"):
        raise ValueError(f"mask shape must be 'ellipse' or 'box', got {shape!r}")
    bx0, by0, bx1, by1 = (int(v) for v in box_px)
    if not (bx0 < bx1 and by0 < by1):
        raise ValueError(f"box {box_px} is empty")
    ramp = _feather_px((bx0, by0, bx1, by1), feather)
    pad = math.ceil(ramp) + 1 if ramp > 0 else 0
    # Computation window: the box plus its ramp, limited to the image plus the ramp (core
    # pixels just outside the frame still shape the ramp inside it).
    cx0, cy0 = max(bx0 - pad, -pad), max(by0 - pad, -pad)
    cx1, cy1 = min(bx1 + pad, width + pad), min(by1 + pad, height + pad)
    wx0, wy0, wx1, wy1 = max(cx0, 0), max(cy0, 0), min(cx1, width), min(cy1, height)
    if cx0 >= cx1 or cy0 >= cy1 or wx0 >= wx1 or wy0 >= wy1:
        return (0, 0, 0, 0), np.zeros((0, 0), dtype=np.float32)

    if shape == "box":
        xs = np.arange(cx0, cx1)
        ys = np.arange(cy0, cy1)
        core = ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]
    else:
        # Pixel centres inside the ellipse inscribed in the box. Never empty for a box inside
        # the image: the pixel nearest the centre is at most half a pixel off along each axis.
        ex, ey = (bx0 + bx1) / 2.0, (by0 + by1) / 2.0
        ax, ay = (bx1 - bx0) / 2.0, (by1 - by0) / 2.0
        xs = (np.arange(cx0, cx1, dtype=np.float64) + 0.5 - ex) / ax
        ys = (np.arange(cy0, cy1, dtype=np.float64) + 0.5 - ey) / ay
        core = ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0

    inner = (slice(wy0 - cy0, wy1 - cy0), slice(wx0 - cx0, wx1 - cx0))
    if ramp <= 0 or core.all():
        return (wx0, wy0, wx1, wy1), core[inner].astype(np.float32)
    if not core.any():
        return (0, 0, 0, 0), np.zeros((0, 0), dtype=np.float32)
    # Euclidean distance from every pixel outside the core to the nearest core pixel centre;
    # d - 0.5 approximates the distance to the core's edge. The ramp lies entirely outside.
    outside = np.where(core, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    t = np.clip(1.0 - (dist - np.float32(0.5)) / np.float32(ramp), 0.0, 1.0, dtype=np.float32)
    t *= t * (3.0 - 2.0 * t)  # smoothstep: no visible seam at either end of the ramp
    t[core] = 1.0
    return (wx0, wy0, wx1, wy1), np.ascontiguousarray(t[inner])


def region_mask(
    height: int, width: int, box_px: Box, *, shape: str, feather: float
) -> np.ndarray:
    """Float32 ``height x width`` mask in [0, 1] for one region.

    ``box_px`` is an integer box, normally inside the image (see :func:`expand_box`); it may
    extend past the frame, in which case the shape is that of the whole box, cut at the frame.
    The mask is exactly 1.0 over the core (the inscribed ellipse, or the whole box) and falls
    smoothly to 0 over ``feather * min(box side)`` pixels *outside* it, so feathering never
    leaves any part of the core partly original.
    """
    (wx0, wy0, wx1, wy1), window = _mask_window(height, width, box_px, shape=shape, feather=feather)
    mask = np.zeros((height, width), dtype=np.float32)
    mask[wy0:wy1, wx0:wx1] = window
    return mask


def _grid(length: int, cell: int, origin: int = 0) -> np.ndarray:
    """Start offsets of the cells along one axis of ``length`` pixels, for a grid of ``cell``
    pixel cells with a grid line at ``origin`` (which may lie outside ``[0, length)``).
    The first and last cells may be partial."""
    first = origin % cell
    starts = np.arange(first, length, cell)
    if first != 0 or starts.size == 0:
        starts = np.concatenate(([0], starts))
    return starts


def _cell_sums(
    crop: np.ndarray, rows: np.ndarray, cols: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell channel sums and pixel counts of the grid given by cell starts ``rows`` and
    ``cols`` (see :func:`_grid`). ``valid`` (bool, HxW) excludes pixels from both sums and
    counts. Sums are exact integers, whatever the cell size."""
    h, w = crop.shape[:2]
    if valid is None:
        data = crop
        count_src = np.ones((h, w), dtype=np.int64)
    else:
        data = crop * valid[..., None].astype(crop.dtype)
        count_src = valid.astype(np.int64)
    sums = np.add.reduceat(np.add.reduceat(data, rows, axis=0, dtype=np.uint64), cols, axis=1)
    counts = np.add.reduceat(np.add.reduceat(count_src, rows, axis=0), cols, axis=1)
    return sums.astype(np.float64), counts


def _paint_cells(
    values: np.ndarray, rows: np.ndarray, cols: np.ndarray, h: int, w: int
) -> np.ndarray:
    """Expand per-cell values (ny, nx, C) back to an (h, w, C) image of constant cells."""
    reps_y = np.diff(np.append(rows, h))
    reps_x = np.diff(np.append(cols, w))
    return np.repeat(np.repeat(values, reps_y, axis=0), reps_x, axis=1)


def _gaussian_blur(crop: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 crop (reflected borders).

    Large sigmas run on a crop downscaled so the blur there has sigma
    ``_DOWNSCALED_BLUR_SIGMA``; INTER_AREA downscaling is itself a low-pass filter, so the
    effective blur is never weaker than asked. uint8 in and out keeps OpenCV on its bit-exact
    fixed-point path, so runs are reproducible across machines.
    """
    if sigma <= 0:
        return crop.copy()
    h, w = crop.shape[:2]
    if sigma <= _DIRECT_BLUR_MAX_SIGMA:
        return cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT_101)
    factor = sigma / _DOWNSCALED_BLUR_SIGMA
    sw, sh = max(1, round(w / factor)), max(1, round(h / factor))
    small = cv2.resize(crop, (sw, sh), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma * sw / w, sigmaY=sigma * sh / h,
                             borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _blend(window: np.ndarray, anon: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``window * (1 - mask) + anon * mask``, rounded. Pixels with mask 0 stay bit-identical,
    pixels with mask 1 are exactly ``anon``; only the feather ramp is actually mixed (which
    also keeps the cost of a face-sized window low)."""
    out = window.copy()
    full = mask >= 1.0
    np.copyto(out, anon, where=full[..., None])
    ramp = (mask > 0.0) & ~full
    if ramp.any():
        m = mask[ramp][:, None]
        mixed = window[ramp].astype(np.float32) * (1.0 - m) + anon[ramp].astype(np.float32) * m
        out[ramp] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


@dataclass
class AnonymizeResult:
    """What :meth:`Anonymizer.apply` produced.

    ``pixels``: the anonymized HxWx3 uint8 image (a new array). ``mask``: HxW float32, the
    union (pixelwise max) of the region masks actually applied. ``params``: JSON-able record of
    the parameters used, for the manifest. ``epsilon``: the DP budget of a DP-Pix release, or
    None when the output carries no DP guarantee.
    """

    pixels: np.ndarray
    mask: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None


@dataclass(frozen=True)
class _Region:
    """One region's geometry. ``face``: the detector's box (floats). ``box``: the expanded box
    rounded outward and clipped to the image, where pixels are read and written. ``shape``: the
    same expanded box before clipping, which gives the mask its true size and shape when the
    face is cut by the frame (it equals ``box`` when the expanded box misses the image)."""

    face: tuple[float, float, float, float]
    box: Box
    shape: Box


class Anonymizer:
    """Applies the configured method to a list of regions of one image.

    Stateless between calls (safe to share between samples and threads); all randomness comes
    from the ``rng`` argument.
    """

    def __init__(self, config: AnonymizeConfig, *, expand: float) -> None:
        if expand < 0:
            raise ValueError(f"expand must be >= 0, got {expand}")
        self.config = config
        self.expand = float(expand)

    # -- public API --------------------------------------------------------------------------

    def apply(
        self,
        rgb: np.ndarray,
        regions: list[dict[str, Any]],
        *,
        rng: np.random.Generator,
        strength: int = 0,
    ) -> AnonymizeResult:
        """Anonymize every region of ``rgb`` (never modified in place).

        ``strength`` is the re-scan round: 0 is the configured setting, each round is
        stronger, and from ``FALLBACK_STRENGTH`` on every method becomes a solid fill of the
        hard box (``params["fallback"] == "fill"``).

        Method ``"none"`` is a debug setting that *releases faces unchanged*: it returns a copy
        of the image and an all-zero mask at every strength, so the re-scan gate can be seen to
        fail (and quarantine) instead of being silently rescued by a fallback.
        """
        is_rgb = isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
        if not is_rgb or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            dtype = getattr(rgb, "dtype", None)
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {shape} dtype {dtype}")
        if isinstance(strength, bool) or int(strength) != strength or strength < 0:
            raise ValueError(f"strength must be a non-negative integer, got {strength!r}")
        strength = int(strength)
        height, width = rgb.shape[:2]
        method = self.config.method
        base: dict[str, Any] = {"method": method, "strength": strength, "n_regions": len(regions)}

        if method == "none":
            base["warning"] = "method 'none' leaves every region unchanged (debug only)"
            return AnonymizeResult(rgb.copy(), np.zeros((height, width), np.float32), base, None)

        expand = self.expand + STRENGTH_EXPAND_STEP * strength
        base["expand"] = round(expand, 6)
        geometry = []
        for region in regions:
            face = region_box(region["box"])
            unclipped = _outward_box(face, expand)
            box = _clip_box(unclipped, width, height)
            outline = unclipped if _overlaps(unclipped, width, height) else box
            geometry.append(_Region(face, box, outline))

        out = rgb.copy()
        union = np.zeros((height, width), dtype=np.float32)
        epsilon: float | None = None
        if strength >= FALLBACK_STRENGTH:
            params = self._fill(out, union, geometry, shape="box", feather=0.0)
            params["fallback"] = "fill"
        elif method == "blur":
            params = self._blur(out, union, geometry, strength)
        elif method == "pixelate":
            params = self._pixelate(out, union, geometry, strength)
        elif method == "fill":
            params = self._fill(out, union, geometry, shape=self.config.mask,
                                feather=self.config.feather)
        elif method == "dp-pixelate":
            params = self._dp_pixelate(out, union, geometry, strength, rng)
            epsilon = float(self.config.epsilon) if geometry else None
        else:  # AnonymizeConfig validates the name; this guards a config built around it
            raise ValueError(f"unknown anonymization method {method!r}")
        return AnonymizeResult(out, union, {**base, **params}, epsilon)

    # -- methods -----------------------------------------------------------------------------

    @staticmethod
    def _masked(
        union: np.ndarray, region: _Region, shape: str, feather: float
    ) -> tuple[Box, np.ndarray]:
        """The region's mask window, also merged into the union mask."""
        height, width = union.shape
        win, mask = _mask_window(height, width, region.shape, shape=shape, feather=feather)
        wx0, wy0, wx1, wy1 = win
        np.maximum(union[wy0:wy1, wx0:wx1], mask, out=union[wy0:wy1, wx0:wx1])
        return win, mask

    def _blur(self, out: np.ndarray, union: np.ndarray, geometry: list[_Region],
              strength: int) -> dict[str, Any]:
        """Gaussian blur, sigma = blur_strength * 2**strength * the face box's longer side.

        Sigma follows the detector's box (the face), not the expanded box, so "sigma is 12 %
        of the face" means what it says. Only a crop padded by 3 sigma around the mask window
        is blurred; regions are applied in order, each on the output so far.
        """
        height, width = union.shape
        shape, feather = self.config.mask, self.config.feather
        factor = self.config.blur_strength * 2.0**strength
        per_region = []
        for region in geometry:
            fx0, fy0, fx1, fy1 = region.face
            sigma = factor * max(fx1 - fx0, fy1 - fy0, 1.0)
            per_region.append({"box": list(region.box), "sigma": round(sigma, 4)})
            (wx0, wy0, wx1, wy1), mask = self._masked(union, region, shape, feather)
            if mask.size == 0:
                continue
            pad = math.ceil(3.0 * sigma)
            cx0, cy0 = max(wx0 - pad, 0), max(wy0 - pad, 0)
            cx1, cy1 = min(wx1 + pad, width), min(wy1 + pad, height)
            blurred = _gaussian_blur(out[cy0:cy1, cx0:cx1], sigma)
            inner = blurred[wy0 - cy0 : wy1 - cy0, wx0 - cx0 : wx1 - cx0]
            out[wy0:wy1, wx0:wx1] = _blend(out[wy0:wy1, wx0:wx1], inner, mask)
        return {"mask": shape, "feather": feather, "blur_strength": factor, "regions": per_region}

    def _pixelate(self, out: np.ndarray, union: np.ndarray, geometry: list[_Region],
                  strength: int) -> dict[str, Any]:
        """Mosaic: square cells, ``blocks`` of them along the expanded box's longer side (before
        clipping, so a face cut by the frame keeps its cell size), each painted with its
        rounded mean colour, then blended with the mask.

        The grid is anchored at the expanded box's top-left corner and covers the whole mask
        window, feather included, so the ramp blends towards cells too (not towards the
        original). Cells are exact integer squares: every cell is one colour in the core.
        """
        configured = self.config.pixel_blocks
        blocks = configured if strength == 0 else max(min(2, configured), configured >> strength)
        shape, feather = self.config.mask, self.config.feather
        per_region = []
        for region in geometry:
            sx0, sy0, sx1, sy1 = region.shape
            cell = max(1, math.ceil(max(sx1 - sx0, sy1 - sy0) / blocks))
            per_region.append({"box": list(region.box), "cell": cell})
            (wx0, wy0, wx1, wy1), mask = self._masked(union, region, shape, feather)
            if mask.size == 0:
                continue
            window = out[wy0:wy1, wx0:wx1]
            h, w = window.shape[:2]
            rows, cols = _grid(h, cell, sy0 - wy0), _grid(w, cell, sx0 - wx0)
            sums, counts = _cell_sums(window, rows, cols)
            means = np.clip(np.rint(sums / counts[..., None]), 0, 255).astype(np.uint8)
            out[wy0:wy1, wx0:wx1] = _blend(window, _paint_cells(means, rows, cols, h, w), mask)
        return {"mask": shape, "feather": feather, "pixel_blocks": blocks, "regions": per_region}

    def _fill(self, out: np.ndarray, union: np.ndarray, geometry: list[_Region], *, shape: str,
              feather: float) -> dict[str, Any]:
        """Solid ``fill_color`` over each region mask: nothing of the region survives."""
        color = np.array(self.config.fill_color, dtype=np.uint8)
        for region in geometry:
            (wx0, wy0, wx1, wy1), mask = self._masked(union, region, shape, feather)
            window = out[wy0:wy1, wx0:wx1]
            out[wy0:wy1, wx0:wx1] = _blend(window, np.broadcast_to(color, window.shape), mask)
        return {"mask": shape, "feather": feather, "fill_color": list(self.config.fill_color),
                "regions": [{"box": list(r.box)} for r in geometry]}

    def _dp_pixelate(self, out: np.ndarray, union: np.ndarray, geometry: list[_Region],
                     strength: int, rng: np.random.Generator) -> dict[str, Any]:
        """DP-Pix (Fan 2018) on each expanded box, with a hard box mask and no feather.

        Mechanism. The box is cut into ``b x b`` cells (``b = dp_cell * 2**strength``) anchored
        at its top-left corner. For a cell of ``n`` pixels, each channel's mean gets Laplace
        noise of scale ``255 * m / (n * epsilon)``; the result is clipped to [0, 255], rounded
        and painted over the whole cell. For full cells ``n = b*b``, which is Fan's scale
        ``255 m / (b^2 epsilon)``; partial cells at the box's right/bottom edge (and cells
        partly covered by an earlier region) are smaller and get proportionally more noise.

        Guarantee. Neighbouring images differ in at most ``m`` pixel values, where one value is
        one channel of one pixel. A changed value moves one cell-channel mean by at most
        ``255 / n_c``; with noise scale ``255 m / (n_c epsilon)`` its privacy loss is at most
        ``epsilon / m``, so any ``m`` changes, wherever they fall among the cells of all
        regions, cost at most ``epsilon`` in total. Regions are kept disjoint (a pixel already
        released by an earlier region is excluded from later ones), so by parallel composition
        the whole sample is one epsilon-DP release, not ``k * epsilon`` for ``k`` regions; the
        recorded ``epsilon`` is both the per-region and the per-sample budget.

        What it does not cover, stated plainly:
        * If ``m`` whole RGB pixels (all three channels) may differ, the same noise gives
          ``3 * epsilon`` (recorded as ``epsilon_rgb_pixels``).
        * Only pixels inside the boxes are protected. The boxes come from a detector run on the
          original image, so their number, position and size are not private, and everything
          outside them is released as is.
        * Each call is one release. A caller that runs DP-Pix again on the *original* pixels
          (a re-scan round) spends another epsilon by sequential composition, even if it only
          publishes the last output, because the decision to re-run depended on the earlier
          one. Re-anonymizing already released pixels is post-processing and costs nothing.
        * Noise comes from numpy's floating-point Laplace sampler, which is not hardened
          against floating-point side channels (Mironov 2012); the rounding and clipping of
          the output are post-processing and cost nothing.

        The mask is forced to the hard box with feather 0: any blend with original pixels inside
        the released region would put un-noised data back and void the guarantee.
        """
        cfg = self.config
        b = int(cfg.dp_cell) * 2**strength
        m, eps = int(cfg.dp_m), float(cfg.epsilon)
        height, width = union.shape
        claimed = np.zeros((height, width), dtype=bool)
        per_region = []
        for region in geometry:
            x0, y0, x1, y1 = region.box
            h, w = y1 - y0, x1 - x0
            free = ~claimed[y0:y1, x0:x1]
            crop = out[y0:y1, x0:x1]
            rows, cols = _grid(h, b), _grid(w, b)
            sums, counts = _cell_sums(crop, rows, cols, free)
            n = np.maximum(counts, 1).astype(np.float64)[..., None]
            # One draw per cell and channel, empty cells included, so the stream a sample
            # consumes depends only on the geometry, never on pixel values.
            noise = rng.laplace(0.0, 1.0, size=sums.shape) * (255.0 * m / (n * eps))
            noisy = np.rint(np.clip(sums / n + noise, 0.0, 255.0)).astype(np.uint8)
            painted = _paint_cells(noisy, rows, cols, h, w)
            crop[free] = painted[free]
            claimed[y0:y1, x0:x1] = True
            union[y0:y1, x0:x1] = 1.0
            per_region.append({"box": list(region.box), "cells": int((counts > 0).sum())})
        return {
            "mask": "box",
            "feather": 0.0,
            "mask_forced": "hard box, feather 0: blending would leak original pixels",
            "dp_cell": b,
            "dp_m": m,
            "epsilon": eps,
            "noise_scale": 255.0 * m / (b * b * eps),
            "epsilon_scope": "per region and per sample (disjoint regions, parallel composition); "
                             "neighbours differ in at most dp_m pixel values (one channel each)",
            "epsilon_rgb_pixels": 3.0 * eps,
            "regions": per_region,
        }


class AnonymizeStage(SampleStage):
    """Pipeline stage: anonymize the detected regions of ``sample["_pixels"]``.

    Samples without regions are marked ``clean`` and keep their pixels. Every region is
    anonymized whatever its ``kind``: a detector reported it as sensitive, and leaving one out
    is the failure that matters. Errors (bad boxes, bad pixels) propagate to
    ``SampleStage.process_batch``, which quarantines the sample.
    """

    name = "anonymize"
    resources = Resources(cpus=0.5)

    def __init__(self, config: AnonymizeConfig, *, expand: float, seed: int) -> None:
        sample_rng(seed, "")  # validate the seed now, not once per sample
        self.config = config
        self.expand = expand
        self.seed = seed
        self._anonymizer = Anonymizer(config, expand=expand)

    def process_sample(self, sample: Sample) -> Sample:
        rgb = sample["_pixels"]
        regions = list(sample.get("regions") or [])
        sample["anonymize_round"] = 0
        if not regions:
            sample["_mask"] = np.zeros(rgb.shape[:2], dtype=np.float32)
            sample["status"] = CLEAN
            sample["params"] = {}
            sample["epsilon"] = None
            return sample
        result = self._anonymizer.apply(
            rgb, regions, rng=sample_rng(self.seed, sample["__key__"]), strength=0
        )
        sample["_pixels"] = result.pixels
        sample["_mask"] = result.mask
        sample["status"] = ANONYMIZED
        sample["method"] = self.config.method
        sample["params"] = result.params
        sample["epsilon"] = result.epsilon
        if self.config.method == "none":
            sample["reason"] = "method 'none': regions released unchanged (debug setting)"
        return sample
