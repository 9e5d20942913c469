"""FSAP: feature-space adversarial perturbation of faces (thesis chapter 5, Algorithm 7).

What it does, per detected face:

1. **Align.** A similarity transform from the face's 5 landmarks (or its box) puts the face
   in a square crop of ``crop_size`` pixels, the ArcFace 112 frame filling the middle
   ``FACE_FRACTION`` of it (forehead, chin and cheeks inside the crop).
2. **Encode** the crop to a latent ``W`` (TAEF2 by default, or a diffusers AutoencoderKL).
3. **Perturb** ``W' = W + dW`` by alternating sign-gradient steps: one step of rate
   ``lambda_id`` *down* the identity similarity ``cos(E(x_hat), E(x))`` of the optimised
   recognizer (MobileFaceNet) and *up* the distance under each ``fsap.ensemble`` member
   (FaceNet-CASIA by default: another architecture and other training identities, so the
   change carries over to recognizers neither saw), then ``inner_steps`` steps of rate
   ``lambda_attr`` down the attribute loss (pixel MSE + (1 - SSIM) + LPIPS between ``x_hat``
   and ``x``). Each face stops as soon as its similarity is below ``tau`` and every member is
   past its threshold (per-face early stopping inside a batch; stopped faces leave the batch,
   so they cost nothing more).
4. **Release** ``x_hat = x + D(W') - D(W)``: only the *change* the perturbation makes is
   decoded and added to the original pixels, so the autoencoder's own reconstruction error
   (about 30 dB) never reaches the release, a face of any size keeps its native sharpness,
   and at ``W' = W`` the output is exactly the input. The decoded change first loses its
   low frequencies (``fsap.tone_sigma``: a Gaussian low-pass of it is subtracted), so the
   face keeps its skin tone and lighting and only its structure changes: on released
   photos that low-pass part held nearly all of the face's colour shift and none of its
   identity change (BENCHMARKS.md). ``fsap.change_chroma`` scales the change's colour part
   (what differs between R, G and B beyond its luminance): at 0 pixels only get lighter or
   darker and keep their hue.
5. **Blend** the change back into the image through the inverse of the crop transform, with a
   face-shaped mask feathered to zero, so no seam shows. The optimiser scores the face as
   blended (``x + M (x_hat - x)`` with the same mask ``M`` in the crop): the recognizers'
   frames reach past the mask, and a change there, which never reaches the release, must
   not count. (Scoring the unmasked crop, the released faces sat at MobileFaceNet 0.03 on
   average where the optimiser stopped at -0.31; BENCHMARKS.md.)
6. **Certify** with a different recognizer (dlib's ResNet by default, which the identity step
   never sees): a face it still matches to the original is optimised again, more strongly
   (``certify_rounds``); a face still matched after the last round quarantines its sample.

Faces whose longer box side is below ``min_face`` cannot be judged by a recognizer: they are
obscured with the ``fallback`` method, and their manifest entry says so.

Determinism: on CPU every sample's faces form their own optimisation batch (the bytes of a
sample never depend on how a runner grouped samples into batches) and torch runs with a
fixed thread count, so local, Ray and Beam runs give identical bytes. On a GPU, faces of a
whole stage batch are optimised together for throughput; results are then certified, not
bit-reproducible across batch compositions.

Precision: ``fsap.precision: bfloat16`` runs the networks (autoencoder, recognizers, LPIPS) in
bfloat16 under autocast, where the device computes it natively (:class:`BFloat16`; on a CPU,
networks with depthwise convolutions such as MobileFaceNet stay float32, :func:`in_bfloat16`); losses,
steps and the release stay float32. Runners still agree with one another byte for byte; the
bytes differ from a float32 run's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.config import AnonymizeConfig, FSAPConfig, ImageIOConfig
from veil.transforms.stage import (
    ANONYMIZED,
    CLEAN,
    ModelStage,
    Resources,
    Sample,
    describe_exception,
    is_quarantined,
    quarantine,
)

if TYPE_CHECKING:
    import torch

    from veil.transforms.latent import LatentSpace

#: Side of the ArcFace 112 frame inside the crop, as a fraction of the crop side.
FACE_FRACTION = 0.75
#: Face ellipse in the ArcFace 112 frame (centre x, centre y, semi-axis x, semi-axis y):
#: eyebrows to chin, cheek to cheek. The change is blended in over this ellipse.
FACE_ELLIPSE_112 = (56.0, 62.0, 46.0, 58.0)
#: Inner part of the ellipse (fraction of its radius) where the change is applied fully;
#: it ramps smoothly to zero at the ellipse edge.
MASK_CORE = 0.8
#: Per certify round: tau lowered by this much, and the identity rate and steps multiplied.
ROUND_TAU_STEP = 0.2
ROUND_RATE_FACTOR = 1.5
ROUND_STEPS_FACTOR = 2
#: Working field (stripped before release) holding, per region index, the unit embedding of
#: the face's target identity in the optimised recognizer's space; set by the pseudo-identity
#: stage (``veil.transforms.identities``), read here.
TARGETS_FIELD = "_pseudo_targets"
#: Varied recognizer views for the identity gradient: (scale, shift x, shift y) of the ArcFace
#: frame, shifts in normalised crop units (0.03 = 2 px of a 128 px crop). Cycled by iteration,
#: so the schedule is deterministic.
VIEWS = ((0.94, 0.03, -0.02), (1.06, -0.03, 0.02), (1.0, 0.02, 0.03), (0.97, -0.02, -0.03))
#: Luminance weights of R, G, B (Rec. 601), splitting a change into light and colour.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)



# ----------------------------------------------------------------------------------- geometry


def _frame_in_crop(crop_size: int) -> tuple[float, float]:
    """(scale, offset) mapping ArcFace 112-frame coordinates into the crop: the frame fills
    the middle ``FACE_FRACTION`` of it."""
    return crop_size * FACE_FRACTION / 112.0, crop_size * (1.0 - FACE_FRACTION) / 2.0


def face_crop_matrix(region: dict[str, Any], crop_size: int) -> np.ndarray:
    """2x3 similarity from image pixels to the face crop (see the module docstring)."""
    from veil.transforms.recognizers import _alignment_matrix, _region_geometry

    scale, offset = _frame_in_crop(crop_size)
    out = _alignment_matrix(*_region_geometry(region), 112) * scale
    out[:, 2] += offset
    return out


def _face_mask(crop_size: int) -> np.ndarray:
    """Float32 (S, S) mask in the crop: 1 over the face core, smooth ramp to 0 at the ellipse."""
    cx, cy, ax, ay = FACE_ELLIPSE_112
    scale, offset = _frame_in_crop(crop_size)
    coords = np.arange(crop_size, dtype=np.float64) + 0.5
    xs = (coords - (cx * scale + offset)) / (ax * scale)
    ys = (coords - (cy * scale + offset)) / (ay * scale)
    r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    t = np.clip((1.0 - r) / (1.0 - MASK_CORE), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def extract_crop(rgb: np.ndarray, matrix: np.ndarray, crop_size: int) -> np.ndarray:
    """The face crop (S, S, 3) uint8; pixels outside the image are mirrored in."""
    import cv2

    return cv2.warpAffine(rgb, matrix, (crop_size, crop_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def blend_change(rgb: np.ndarray, change: np.ndarray, matrix: np.ndarray,
                 crop_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add a crop-space change (S, S, 3) float32, in 0-255 units, to ``rgb`` in place through
    the inverse of ``matrix``, weighted by the warped face mask. Returns the (H, W) float32 mask
    of where it was applied and the image. Work stays within the face's footprint."""
    import cv2

    height, width = rgb.shape[:2]
    size = crop_mask.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    pts = corners @ inverse.T
    x0 = max(0, int(math.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(math.floor(pts[:, 1].min())) - 1)
    x1 = min(width, int(math.ceil(pts[:, 0].max())) + 1)
    y1 = min(height, int(math.ceil(pts[:, 1].max())) + 1)
    full_mask = np.zeros((height, width), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return full_mask, rgb
    # Crop -> ROI: shift the image->crop matrix so that ROI pixel (0, 0) is image (x0, y0).
    roi_matrix = matrix.copy()
    roi_matrix[:, 2] += matrix[:, 0] * x0 + matrix[:, 1] * y0
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    roi_size = (x1 - x0, y1 - y0)
    mask = cv2.warpAffine(crop_mask, roi_matrix, roi_size, flags=flags, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
    delta = cv2.warpAffine(change, roi_matrix, roi_size, flags=flags, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0)
    window = rgb[y0:y1, x0:x1].astype(np.float32)
    out = np.clip(np.rint(window + delta * mask[..., None]), 0, 255).astype(np.uint8)
    rgb[y0:y1, x0:x1] = out
    full_mask[y0:y1, x0:x1] = mask
    return full_mask, rgb


# ------------------------------------------------------------------------------------ losses


def tone_sigma_pixels(tone_sigma: float, crop_size: int) -> float:
    """``fsap.tone_sigma`` (a fraction of the face frame's side) in crop pixels."""
    return tone_sigma * crop_size * FACE_FRACTION


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps reaching 3 sigma to each side."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def separable_blur(t: torch.Tensor, taps: torch.Tensor, *, mirror: bool = False) -> torch.Tensor:
    """Each channel of ``t`` (B, C, H, W) filtered by the 1-D ``taps`` along x, then y. Without
    ``mirror`` only the valid part is kept (each side shrinks by the taps' radius); with it
    the edges are mirrored first and the size is kept."""
    import torch.nn.functional as F

    channels, n = t.shape[1], taps.numel()
    radius = n // 2
    # In bfloat16 (the filter run under autocast), a channels-last input (what oneDNN's
    # convolutions hand back) sends these grouped 1-D convolutions down a path that takes
    # minutes instead of milliseconds. FSAP keeps the filter in float32 (BFloat16 wraps only
    # the networks); a contiguous input costs nothing and keeps any caller off that path.
    t = t.contiguous()
    if mirror:
        t = F.pad(t, (radius, radius, 0, 0), mode="reflect")
    t = F.conv2d(t, taps.view(1, 1, 1, n).expand(channels, 1, 1, n), groups=channels)
    if mirror:
        t = F.pad(t, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(t, taps.view(1, 1, n, 1).expand(channels, 1, n, 1), groups=channels)


def remove_tone(change: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``change`` (B, C, S, S) minus its Gaussian low-pass (``kernel``: 1-D taps, mirrored at
    the crop's edges): what is left changes structure, not tone or lighting."""
    radius = kernel.numel() // 2
    if radius >= change.shape[-1]:
        raise ValueError(f"tone filter of radius {radius} px does not fit a {change.shape[-1]} px crop")
    return change - separable_blur(change, kernel, mirror=True)


def keep_chroma(change: torch.Tensor, share: float) -> torch.Tensor:
    """``change`` (B, 3, H, W) with its colour part scaled by ``share``: the luminance change
    (Rec. 601 weights) stays whole, and what differs between the channels beyond it is kept
    at ``share``. 0 leaves a grey change: pixels get lighter or darker, their hue stays."""
    import torch

    weights = torch.tensor(LUMA_WEIGHTS, dtype=change.dtype, device=change.device).view(1, 3, 1, 1)
    luma = (change * weights).sum(1, keepdim=True)
    if share == 0.0:
        return luma.expand_as(change)
    return luma + share * (change - luma)


def ssim_torch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (N,) of images in [0, 1], 11x11 Gaussian window (sigma 1.5), as
    Wang et al. 2004; differentiable."""
    import torch

    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5.0
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return separable_blur(t, g)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim.flatten(1).mean(1).clamp(-1.0, 1.0)


# -------------------------------------------------------------------------------- optimiser


@dataclass
class FaceResult:
    """What FSAP did to one face (also its manifest record)."""

    iterations: int
    similarity: float
    stopped: bool
    attribute_loss: float
    #: Optimised recognizer's similarity to the face's target identity (None: no target).
    target_similarity: float | None = None
    #: Distance of the face under each ensemble recognizer (``fsap.ensemble``), on the
    #: optimiser's crop, by name.
    ensemble: dict[str, float] = field(default_factory=dict)


def face_box_in_crop(region: dict[str, Any], matrix: np.ndarray) -> tuple[float, float, float, float]:
    """A region's detector box in the coordinates of its face crop (``matrix``: image -> crop)."""
    x0, y0, x1, y1 = (float(v) for v in region["box"])
    corners = np.array([[x0, y0, 1.0], [x1, y0, 1.0], [x0, y1, 1.0], [x1, y1, 1.0]]) @ np.asarray(matrix).T
    return (float(corners[:, 0].min()), float(corners[:, 1].min()),
            float(corners[:, 0].max()), float(corners[:, 1].max()))


def dlib_chip_affine(details: Any) -> np.ndarray:
    """The 2x3 affine map from a dlib face chip's pixels to the image's, for ``chip_details``
    as ``dlib.get_face_chip_details`` gives them: dlib's ``extract_image_chip`` maps the chip's
    corners onto its rectangle's corners turned by ``angle`` about the rectangle's centre."""
    import cv2

    rect, angle = details.rect, float(details.angle)
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    cos, sin = math.cos(angle), math.sin(angle)

    def turned(x: float, y: float) -> tuple[float, float]:
        return cos * (x - cx) - sin * (y - cy) + cx, sin * (x - cx) + cos * (y - cy) + cy

    cols, rows = details.cols - 1, details.rows - 1
    src = np.float32([[0, 0], [cols, 0], [cols, rows]])
    dst = np.float32([turned(rect.left(), rect.top()), turned(rect.right(), rect.top()),
                      turned(rect.right(), rect.bottom())])
    return cv2.getAffineTransform(src, dst).astype(np.float64)


class BFloat16:
    """A network (any callable on tensors) run in bfloat16 under PyTorch autocast, its output
    handed back as contiguous float32 (``fsap.precision: bfloat16``): convolutions and matrix
    products run in bfloat16 where the device does so natively, everything around them (the
    losses, the sign steps, the tone filter, the release) stays float32."""

    def __init__(self, net: Any, device: torch.device) -> None:
        import torch

        if isinstance(net, torch.nn.Module):
            # Autocast rounds every convolution's and linear layer's weights to bfloat16 on
            # each call (its cast cache keeps only weights that require grad): a copy rounded
            # once gives the same numbers for less work (FaceNet-CASIA fwd+bwd of two faces
            # on one CPU core: 184 -> 146 ms). The copy leaves the caller's network (which a
            # certifier may share) in float32.
            net = copy.deepcopy(net)
            for layer in net.modules():
                if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                    layer.to(torch.bfloat16)
        self.net = net
        self.device_type = device.type

    def __call__(self, *args: Any) -> torch.Tensor:
        import torch

        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(*args)
        return out.float().contiguous()


def has_depthwise(net: Any) -> bool:
    """Whether ``net`` (a torch module) has depthwise (grouped) convolutions."""
    import torch

    return isinstance(net, torch.nn.Module) and any(
        isinstance(layer, torch.nn.Conv2d) and layer.groups > 1 for layer in net.modules())


def in_bfloat16(net: Any, device: torch.device) -> Any:
    """``net`` as ``fsap.precision: bfloat16`` runs it: wrapped in :class:`BFloat16`, or left
    in float32 on a CPU when it has depthwise convolutions. oneDNN's bfloat16 depthwise
    kernels are slower on CPU than its float32 ones, and the casts around them cost more than
    the pointwise layers gain: MobileFaceNet's face + mirror, forward and backward, on one
    AMX core take 80 ms in float32, 120 in bfloat16 and 91 with only its depthwise layers
    left in float32 (BENCHMARKS.md, "FSAP in bfloat16")."""
    if device.type == "cpu" and has_depthwise(net):
        return net
    return BFloat16(net, device)


def native_bfloat16(kind: str) -> bool:
    """Whether devices of ``kind`` (cpu, cuda) here compute bfloat16 natively."""
    import torch

    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_bfloat16(device: torch.device) -> None:
    """Refuse ``fsap.precision: bfloat16`` on a device that would emulate it: emulated
    bfloat16 is slower than float32 and only costs accuracy."""
    kind = device.type
    if not native_bfloat16(kind):
        where = "this GPU" if kind == "cuda" else "this CPU (no AVX-512 BF16 or AMX)"
        raise RuntimeError(f"fsap.precision bfloat16: {where} has no native bfloat16 arithmetic, so it would "
                           "run slower than float32. Set fsap.precision: float32 (the default).")


class DlibChipSurrogate:
    """dlib's ResNet as a second, differentiable target of FSAP's identity step
    (``fsap.ensemble: [dlib-resnet]``).

    An identity change found against one recognizer carries over only partly to others; one
    that fools two recognizers of different architecture and training data carries over
    better to a third (ensemble transfer). dlib's network runs in PyTorch
    (:mod:`veil.transforms.dlib_torch`), so its gradient is available: each face's 150x150
    chip is placed as dlib places it (the 5-point shape predictor on the original crop, in the
    detector's box, and ``get_face_chip_details``) and resampled from the crop with
    ``grid_sample``, which gives dlib's own chip to within its rounding (descriptors within
    0.005). The chip comes from the 128 px crop, not the full image, so its distances are
    close to, not equal to, the certifier's.
    """

    def __init__(self, recognizer: Any, crop_size: int, device: Any) -> None:
        import torch

        if getattr(recognizer, "backend", None) != "torch":
            raise ValueError("the dlib ensemble member needs the recognizer's torch backend")
        self.recognizer = recognizer
        self.crop_size = int(crop_size)
        self.device = torch.device(device)
        self.net = recognizer.model.eval().requires_grad_(False).to(self.device)
        self.threshold = float(recognizer.threshold)

    def grids(self, crops: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]) -> torch.Tensor:
        """(B, 150, 150, 2) ``grid_sample`` grids of each crop's dlib chip (align_corners)."""
        import torch

        from veil.transforms.dlib_torch import CHIP_SIZE

        dlib = self.recognizer._dlib
        u, v = np.meshgrid(np.arange(CHIP_SIZE, dtype=np.float64), np.arange(CHIP_SIZE, dtype=np.float64))
        grids = []
        for crop, box in zip(crops, boxes, strict=True):
            shape = self.recognizer.shapes(crop, [{"box": list(box)}])[0]
            a = dlib_chip_affine(dlib.get_face_chip_details(shape, CHIP_SIZE, self.recognizer.padding))
            x = a[0, 0] * u + a[0, 1] * v + a[0, 2]
            y = a[1, 0] * u + a[1, 1] * v + a[1, 2]
            grids.append(np.stack([x, y], -1) / (self.crop_size - 1) * 2.0 - 1.0)
        return torch.from_numpy(np.stack(grids).astype(np.float32)).to(self.device)

    def chips(self, x: torch.Tensor, grids: torch.Tensor, view: int = -1) -> torch.Tensor:
        """dlib's chips of crops in [0, 1] (B, 3, S, S), in 0..255; ``view >= 0`` varies the
        chip by one of :data:`VIEWS` (scaled about its centre and shifted, as FSAP's own views)."""
        import torch.nn.functional as F

        if view >= 0:
            scale, dx, dy = VIEWS[view % len(VIEWS)]
            centre = grids.mean(dim=(1, 2), keepdim=True)
            shift = grids.new_tensor([dx, dy]).view(1, 1, 1, 2)
            grids = (grids - centre) * scale + centre + shift
        return F.grid_sample(x * 255.0, grids, mode="bilinear", padding_mode="border", align_corners=True)

    def descriptors(self, x: torch.Tensor, grids: torch.Tensor, view: int = -1) -> torch.Tensor:
        """dlib descriptors of crops in [0, 1] (B, 3, S, S) (``view``: :meth:`chips`)."""
        return self.net(self.chips(x, grids, view))

    def distance(self, x: torch.Tensor, grids: torch.Tensor, reference: torch.Tensor,
                 view: int = -1) -> torch.Tensor:
        """(B,) Euclidean distances of the crops' descriptors from ``reference`` (dlib's score)."""
        return self.distances(x, grids, reference, (view,))[0]

    def distances(self, x: torch.Tensor, grids: torch.Tensor, reference: torch.Tensor,
                  views: Sequence[int]) -> list[torch.Tensor]:
        """:meth:`distance` under each of ``views``, the network run once on all of them."""
        import torch

        chips = torch.cat([self.chips(x, grids, view) for view in views])
        return [(d - reference).norm(dim=1) for d in self.net(chips).split(x.shape[0])]


class FaceNetCropSurrogate:
    """A FaceNet recognizer (``facenet-casia``, or ``facenet-vggface2`` where its weights
    resolve) as a differentiable target of FSAP's identity step (``fsap.ensemble``).

    The recognizer's own crop (the detector box grown by its margin, resized to 160 px, then
    ``(x - 127.5) / 128``) is resampled from the face crop with ``grid_sample``, so the
    gradient reaches the latent. Its score is cosine similarity (same person above the
    threshold); as an ensemble member it reports the *distance* ``1 - cos`` against the goal
    ``1 - threshold``, so that every member pushes a distance up. The box is cut from the
    128 px crop, not the full image, so distances are close to, not equal to, the recognizer's
    verdict on the release.
    """

    def __init__(self, recognizer: Any, crop_size: int, device: Any) -> None:
        import torch

        self.recognizer = recognizer
        self.crop_size = int(crop_size)
        self.device = torch.device(device)
        self.net = recognizer.model.eval().requires_grad_(False).to(self.device)
        # The recognizer object may also certify: its own embed must find the model where it is.
        recognizer.device = self.device
        self.threshold = 1.0 - float(recognizer.threshold)

    def grids(self, crops: np.ndarray, boxes: Sequence[tuple[float, float, float, float]]) -> torch.Tensor:
        """(B, 2, 2) centre and half-size of each face's recognizer crop, in ``grid_sample``'s
        normalised crop coordinates (the box grown by
        :meth:`FaceNetRecognizer.margin_growth`, neither clipped nor cut at integer pixels)."""
        import torch

        out = []
        for x0, y0, x1, y1 in boxes:
            grow_x, grow_y = self.recognizer.margin_growth((x0, y0, x1, y1))
            half_w, half_h = (x1 - x0 + grow_x) / 2, (y1 - y0 + grow_y) / 2
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            out.append([[cx / self.crop_size * 2 - 1, cy / self.crop_size * 2 - 1],
                        [half_w / self.crop_size * 2, half_h / self.crop_size * 2]])
        return torch.tensor(out, dtype=torch.float32, device=self.device)

    def faces(self, x: torch.Tensor, grids: torch.Tensor, view: int = -1) -> torch.Tensor:
        """The network's input for crops ``x`` in [0, 1] (B, 3, S, S): the recognizer crop,
        normalised; ``view >= 0`` rescales and shifts it by one of :data:`VIEWS`."""
        import torch
        import torch.nn.functional as F

        centre, half = grids[:, 0], grids[:, 1]
        if view >= 0:
            scale, dx, dy = VIEWS[view % len(VIEWS)]
            half = half * scale
            centre = centre + centre.new_tensor([dx, dy])
        zero = torch.zeros_like(centre[:, 0])
        theta = torch.stack([torch.stack([half[:, 0], zero, centre[:, 0]], 1),
                             torch.stack([zero, half[:, 1], centre[:, 1]], 1)], 1)
        size = self.recognizer.image_size
        grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
        face = F.grid_sample(x * 255.0, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return (face - 127.5) / 128.0

    def descriptors(self, x: torch.Tensor, grids: torch.Tensor, view: int = -1) -> torch.Tensor:
        """Unit embeddings of the faces in crops ``x`` in [0, 1] (``view``: :meth:`faces`)."""
        import torch.nn.functional as F

        return F.normalize(self.net(self.faces(x, grids, view)), dim=1)

    def distance(self, x: torch.Tensor, grids: torch.Tensor, reference: torch.Tensor,
                 view: int = -1) -> torch.Tensor:
        """(B,) ``1 - cos`` of the faces' embeddings and ``reference``."""
        return self.distances(x, grids, reference, (view,))[0]

    def distances(self, x: torch.Tensor, grids: torch.Tensor, reference: torch.Tensor,
                  views: Sequence[int]) -> list[torch.Tensor]:
        """:meth:`distance` under each of ``views``, the network run once on all of them."""
        import torch
        import torch.nn.functional as F

        emb = F.normalize(self.net(torch.cat([self.faces(x, grids, view) for view in views])), dim=1)
        return [1.0 - (e * reference).sum(1) for e in emb.split(x.shape[0])]


#: Recognizers that can join FSAP's identity step (``fsap.ensemble``), by surrogate class.
ENSEMBLE_MEMBERS: dict[str, type] = {
    "dlib-resnet": DlibChipSurrogate,
    "facenet-casia": FaceNetCropSurrogate,
    "facenet-vggface2": FaceNetCropSurrogate,
}


@dataclass
class OptimiseResult:
    crops: np.ndarray  # (B, S, S, 3) float32 in 0-255: the change to add to each crop
    faces: list[FaceResult] = field(default_factory=list)


class FSAPOptimizer:
    """Algorithm 7 on a batch of aligned face crops, with per-face early stopping.

    ``recognizer`` is a differentiable embedder of ImageNet-normalised aligned 112x112 faces
    (MobileFaceNet); ``perceptual`` is a differentiable LPIPS ``(x, y) -> (N,)`` on [0, 1]
    images, or None when its weight is 0.
    """

    def __init__(self, latent: LatentSpace, recognizer: Any, perceptual: Any | None,
                 config: FSAPConfig, device: Any, *, ensemble: dict[str, Any] | None = None) -> None:
        import torch

        from veil.transforms.recognizers import _IMAGENET_MEAN, _IMAGENET_STD

        self.latent = latent
        self.recognizer = recognizer
        #: name -> :class:`DlibChipSurrogate`: further recognizers the identity step pushes
        #: away from (``fsap.ensemble``); a face stops only once each is past its goal.
        self.ensemble = dict(ensemble or {})
        self.perceptual = perceptual
        self.config = config
        self.device = torch.device(device)
        rates = latent.rates
        self.lambda_id = config.lambda_id if config.lambda_id is not None else rates.lambda_id
        self.lambda_attr = config.lambda_attr if config.lambda_attr is not None else rates.lambda_attr
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        #: Crop size -> its blend mask and tone filter on the device (:meth:`_crop_filters`).
        self._filters: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if config.weight_lpips > 0 and perceptual is None:
            raise ValueError("fsap.weight_lpips > 0 needs an LPIPS model")
        self._encode, self._decode = latent.encode, latent.decode
        if config.precision == "bfloat16":
            check_bfloat16(self.device)
            self._encode, self._decode = BFloat16(latent.encode, self.device), BFloat16(latent.decode, self.device)
            self.recognizer = in_bfloat16(recognizer, self.device)
            if perceptual is not None:
                self.perceptual = in_bfloat16(perceptual, self.device)
            for member in self.ensemble.values():
                # The member's own network only: a certifier sharing the model is untouched.
                member.net = in_bfloat16(member.net, self.device)

    def _crop_filters(self, crop_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the blend mask (1, 1, S, S) faces are scored through, the tone filter's 1-D
        Gaussian taps or None when ``tone_sigma`` is 0) on the device, made once per crop size."""
        import torch

        if crop_size not in self._filters:
            mask = torch.from_numpy(_face_mask(crop_size)).to(self.device)[None, None]
            tone = None
            if self.config.tone_sigma > 0:
                sigma = tone_sigma_pixels(self.config.tone_sigma, crop_size)
                tone = torch.from_numpy(gaussian_kernel(sigma)).to(self.device)
            self._filters[crop_size] = (mask, tone)
        return self._filters[crop_size]

    def schedule(self, strength: int) -> tuple[float, float, int]:
        """(tau, lambda_id, steps) for a certify round: each round pushes harder and longer."""
        tau = max(-0.9, self.config.tau - ROUND_TAU_STEP * strength)
        return tau, self.lambda_id * ROUND_RATE_FACTOR**strength, self.config.steps * ROUND_STEPS_FACTOR**strength

    def embed(self, x: torch.Tensor, view: int = -1) -> torch.Tensor:
        """Unit embeddings of crops in [0, 1] (B, 3, S, S): the ArcFace frame (the central
        ``FACE_FRACTION`` of the crop) resampled to 112x112, plus its mirror image, summed.

        ``view >= 0`` picks one of :data:`VIEWS`, a slightly rescaled and shifted frame: the
        identity step follows the gradient of the plain view *and* a varied one, so the change
        does not hinge on the exact pixel grid of one recognizer (input diversity; it makes
        the perturbation carry over to recognizers that were not optimised against).
        """
        import torch
        import torch.nn.functional as F

        scale, dx, dy = VIEWS[view % len(VIEWS)] if view >= 0 else (1.0, 0.0, 0.0)
        theta = torch.tensor([[FACE_FRACTION * scale, 0.0, dx], [0.0, FACE_FRACTION * scale, dy]],
                             dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 3, 112, 112], align_corners=False)
        face = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        face = (face - self._mean) / self._std
        # The face and its mirror image as one batch: the same bytes as two calls, and 7 %
        # fewer seconds per face on a CPU core (BENCHMARKS.md, "FSAP in bfloat16").
        plain, mirror = self.recognizer(torch.cat([face, torch.flip(face, dims=[3])])).split(x.shape[0])
        return F.normalize(plain + mirror, dim=1)

    def attribute_loss(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        loss = cfg.weight_pixel * ((x_hat - x) ** 2).flatten(1).mean(1)
        if cfg.weight_ssim > 0:
            loss = loss + cfg.weight_ssim * (1.0 - ssim_torch(x_hat, x))
        if cfg.weight_lpips > 0:
            loss = loss + cfg.weight_lpips * self.perceptual(x_hat, x).view(-1)
        return loss

    def ensemble_goal(self, name: str) -> float:
        """Distance an ensemble member must see before a face stops: its threshold, plus the
        certify margin when it is also a certifier (the release must pass that margin)."""
        margin = self.config.certify_margin if name in self.config.certify else 0.0
        return self.ensemble[name].threshold + margin

    def optimise(self, crops: np.ndarray, *, strength: int = 0, steps: int | None = None,
                 targets: np.ndarray | None = None,
                 boxes: Sequence[tuple[float, float, float, float]] | None = None) -> OptimiseResult:
        """Optimise (B, S, S, 3) uint8 crops; returns the change for each and a record per face.
        ``steps`` overrides the round's iteration budget (a memory probe needs one). ``boxes``
        are the faces' detector boxes in crop coordinates (:func:`face_box_in_crop`), where
        the ensemble's recognizers look for their landmarks; None takes the central face frame.

        ``targets`` (B, d) are unit embeddings, in the optimised recognizer's space, of the
        identity each face should become (a pseudo-identity's synthetic face); a row of NaN
        means no target. Faces with a target step down the similarity to the original *and*
        up the similarity to their target (weighted by ``fsap.target_weight``), and stop only
        when below ``tau`` and above ``fsap.target_similarity``. Without any target the
        computation is exactly the one without this argument (bit-identical outputs).
        """
        import torch

        if targets is not None:
            targets = np.asarray(targets, dtype=np.float32)
            if targets.shape[0] != crops.shape[0]:
                raise ValueError(f"targets: {targets.shape[0]} rows for {crops.shape[0]} faces")
            if not np.isfinite(targets).any():
                targets = None
        tau, lambda_id, round_steps = self.schedule(strength)
        steps = round_steps if steps is None else steps
        b = crops.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        mask, tone = self._crop_filters(crops.shape[1])
        chroma = self.config.change_chroma
        with torch.no_grad():
            w = self._encode(x)
            base = self._decode(w)
            target = self.embed(x)
        members: list[tuple[str, Any, torch.Tensor, torch.Tensor, float]] = []
        if self.ensemble:
            if boxes is None:
                lo, hi = (crops.shape[1] * (1 - FACE_FRACTION) / 2, crops.shape[1] * (1 + FACE_FRACTION) / 2)
                boxes = [(lo, lo, hi, hi)] * b
            for name, member in self.ensemble.items():
                grids = member.grids(crops, boxes)
                with torch.no_grad():
                    reference = member.descriptors(x, grids)
                members.append((name, member, grids, reference, self.ensemble_goal(name)))
        distances = {name: np.zeros(b, dtype=np.float64) for name, *_ in members}
        w_prime = w.clone()
        iterations = np.zeros(b, dtype=np.int64)
        similarity = np.ones(b, dtype=np.float64)
        goal = has_goal = None
        goal_similarity = np.full(b, np.nan, dtype=np.float64)
        if targets is not None:
            # Faces without a target get a zero goal row: their pull term is 0, so their
            # gradient is the plain FSAP one.
            has_goal = torch.from_numpy(np.isfinite(targets).all(1)).to(self.device)
            goal = torch.from_numpy(np.nan_to_num(targets, nan=0.0)).to(self.device)
            goal = torch.nn.functional.normalize(goal, dim=1) * has_goal[:, None].float()
        attr = np.zeros(b, dtype=np.float64)
        stopped = np.zeros(b, dtype=bool)
        active = torch.arange(b, device=self.device)

        def changed(idx: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
            delta = self._decode(latent) - base[idx]
            if tone is not None:
                # Structure only (module docstring, step 4): tone and lighting stay as they were.
                delta = remove_tone(delta, tone)
            if chroma < 1.0:
                # Light and shade, not colour (module docstring, step 4).
                delta = keep_chroma(delta, chroma)
            return (x[idx] + delta).clamp(0.0, 1.0)

        def blended(idx: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
            return x[idx] + mask * (full - x[idx])

        def released(idx: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
            # What the release will hold (module docstring, step 5).
            return blended(idx, changed(idx, latent))

        for iteration in range(steps + 1):
            if active.numel() == 0:
                break
            # Identity step: measure the plain similarity (the stopping rule), then step down
            # the similarity of the plain and a varied view, for faces still above tau.
            wa = w_prime[active].clone().requires_grad_(True)
            x_hat = released(active, wa)
            emb = self.embed(x_hat)
            sim = (emb * target[active]).sum(1)
            idx = active.cpu().numpy()
            similarity[idx] = sim.detach().cpu().numpy()
            done = (sim < tau).detach()
            if goal is not None:
                goal_sim = (emb * goal[active]).sum(1)
                with_goal = has_goal[active]
                goal_similarity[idx] = np.where(with_goal.cpu().numpy(), goal_sim.detach().cpu().numpy(), np.nan)
                reached = goal_sim.detach() > self.config.target_similarity
                done = done & (reached | ~with_goal)
            # Ensemble members: a face is done only once each is past its goal distance too;
            # the identity step pushes their distances up along with the similarity down.
            # A member's plain and varied views go through its network as one batch (FaceNet-
            # CASIA, fwd + bwd of a face on a CPU core: 195 instead of 230 ms in float32, 132
            # instead of 204 in bfloat16), so the varied view is computed before the stopping
            # rule: wasted once per face, on its last iteration.
            views = (-1, iteration) if iteration < steps else (-1,)
            pushes = []
            for name, member, grids, reference, goal_distance in members:
                dist, *dist_view = member.distances(x_hat, grids[active], reference[active], views)
                distances[name][idx] = dist.detach().cpu().numpy()
                done = done & (dist.detach() > goal_distance)
                pushes.append((member, dist + sum(dist_view)))
            stopped[idx[done.cpu().numpy()]] = True
            if iteration == steps or bool(done.all()):
                break
            emb_view = self.embed(x_hat, view=iteration)
            sim_view = (emb_view * target[active]).sum(1)
            keep = ~done
            objective = sim + sim_view
            for member, both in pushes:
                objective = objective - self.config.ensemble_weight * both / member.threshold
            if goal is not None:
                # Towards the target identity: the same two views, so the pull carries over
                # to other recognizers as the push away from the original does.
                pull = goal_sim + (emb_view * goal[active]).sum(1)
                objective = objective - self.config.target_weight * pull
            (grad,) = torch.autograd.grad(objective[keep].sum(), wa)
            active, wa = active[keep], (wa - lambda_id * grad.sign()).detach()[keep]
            # Attribute steps: stay close to the original in pixels, structure and perception.
            for _k in range(self.config.inner_steps):
                wa.requires_grad_(True)
                loss = self.attribute_loss(released(active, wa), x[active])
                (grad,) = torch.autograd.grad(loss.sum(), wa)
                wa = (wa - self.lambda_attr * grad.sign()).detach()
            w_prime[active] = wa
            iterations[active.cpu().numpy()] += 1
        with torch.no_grad():
            all_idx = torch.arange(b, device=self.device)
            full = changed(all_idx, w_prime)
            x_hat = blended(all_idx, full)
            attr[:] = self.attribute_loss(x_hat, x).cpu().numpy()
            # Unmasked: blend_change applies the mask when the crop goes back into the image.
            change = (full - x) * 255.0
            for name, member, grids, reference, _goal_distance in members:
                distances[name][:] = member.distance(x_hat, grids, reference).cpu().numpy()
        faces = [FaceResult(int(iterations[i]), float(similarity[i]), bool(stopped[i]), float(attr[i]),
                            None if np.isnan(goal_similarity[i]) else float(goal_similarity[i]),
                            {name: float(d[i]) for name, d in distances.items()})
                 for i in range(b)]
        return OptimiseResult(crops=change.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32), faces=faces)


# ------------------------------------------------------------------------------------ stage


def models_for_fsap(config: FSAPConfig) -> list[str]:
    """Registry names of the files an FSAP configuration uses (run.json provenance)."""
    from veil.transforms.latent import TAEF2_DECODER, TAEF2_ENCODER
    from veil.transforms.recognizers import MOBILEFACENET_MODEL, RECOGNIZER_MODELS

    names = [TAEF2_ENCODER, TAEF2_DECODER] if config.latent == "taef2" else []
    names.append(MOBILEFACENET_MODEL)
    if config.weight_lpips > 0:
        from veil.transforms.perceptual import LPIPS_MODELS

        names.append(LPIPS_MODELS["alex"])
    for name in [*config.certify, *config.ensemble]:
        names += RECOGNIZER_MODELS.get(name, ())
    return list(dict.fromkeys(names))


def resolve_device(config: FSAPConfig, gpus: float, *, section: str = "fsap") -> str:
    """The torch device a worker uses: cuda when GPUs were asked for, and never a silent CPU
    run when a GPU was asked for but is not there. ``config`` is the stage's config section
    (``section``: its name in messages), which has a ``device`` field."""
    import torch

    wanted = config.device
    if wanted == "auto":
        wanted = "cuda" if gpus > 0 else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{section} was asked to run on a GPU ({section}.device cuda, or --gpus-per-worker > 0) but this "
            "worker sees no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). Drop --gpus-per-worker to run on "
            "CPU, or install a CUDA build of torch on the GPU workers."
        )
    return wanted


def certifier_verdict(recognizer: Any, original: np.ndarray, released: np.ndarray, *,
                      margin: float = 0.0) -> tuple[float, bool]:
    """(score, still the same person?) of one face under a certifying recognizer, with
    ``margin`` added to its threshold on the safe side."""
    a, b = np.asarray(original, np.float64), np.asarray(released, np.float64)
    if recognizer.metric == "euclidean":
        score = float(np.linalg.norm(a - b))
        return score, score <= recognizer.threshold + margin
    score = float(a @ b / max(1e-12, float(np.linalg.norm(a) * np.linalg.norm(b))))
    return score, score >= recognizer.threshold - margin


def certify_faces(certifiers: list[Any], original: np.ndarray, released: np.ndarray,
                  regions: list[dict[str, Any]], *, margin: float,
                  restorations: Sequence[str] = ()) -> list[dict[str, dict[str, Any]]]:
    """Per face, each certifying recognizer's verdict on ``released`` against ``original`` at
    the original face's geometry: ``{name: {score, metric, threshold, margin, matched}}``.

    With ``restorations`` (:mod:`veil.transforms.restoration`) the face is also scored on each
    restored copy of ``released``, at the recognizer's own threshold as validation's
    restoration gate judges it; the attacker's best is kept as ``restored: {score, by,
    matched}``, and a restored match makes the face ``matched``. Used by the synthesis stages
    (before release) and the re-scan (on the encoded output)."""
    out: list[dict[str, dict[str, Any]]] = [{} for _ in regions]
    if not regions:
        return out
    restored_images: dict[str, np.ndarray] = {}
    if restorations:
        from veil.transforms.restoration import restore

        restored_images = {attack: restore(released, attack) for attack in restorations}
    for rec in certifiers:
        emb_o, emb_a = rec.embed_pair(original, released, regions)
        for i in range(len(regions)):
            score, matched = certifier_verdict(rec, emb_o[i], emb_a[i], margin=margin)
            out[i][rec.name] = {"score": round(score, 4), "metric": rec.metric,
                                "threshold": rec.threshold, "margin": margin, "matched": bool(matched)}
        if not restored_images:
            continue
        from veil.transforms.restoration import best_restoration

        _, emb_best, _, by = best_restoration(rec, original, restored_images, regions)
        for i in range(len(regions)):
            score, matched = certifier_verdict(rec, emb_o[i], emb_best[i])
            out[i][rec.name]["restored"] = {"score": round(score, 4), "by": by[i], "matched": bool(matched)}
            out[i][rec.name]["matched"] = out[i][rec.name]["matched"] or bool(matched)
    return out


def fallback_anonymizer(anonymize: AnonymizeConfig, config: FSAPConfig, *, expand: float) -> Any:
    """The obscuring anonymizer for faces FSAP cannot replace (too small, or found only by the
    re-scan): the run's anonymize settings with ``fsap.fallback`` as the method."""
    from dataclasses import replace

    from veil.transforms.anonymize import Anonymizer

    return Anonymizer(replace(anonymize, method=config.fallback), expand=expand)


def begin_replacement(batch: list[Sample]) -> list[int]:
    """Indices of the samples of ``batch`` whose faces a synthesis stage replaces; samples
    without faces are marked clean with an empty mask."""
    todo: list[int] = []
    for i, sample in enumerate(batch):
        if is_quarantined(sample):
            continue
        sample["anonymize_round"] = 0
        if not sample.get("regions"):
            sample["_mask"] = np.zeros(sample["_pixels"].shape[:2], dtype=np.float32)
            sample["status"] = CLEAN
            sample["params"] = {}
            sample["epsilon"] = None
            continue
        todo.append(i)
    return todo


def render_changes(batch: list[Sample], samples: list[int], base_pixels: dict[int, np.ndarray],
                   base_masks: dict[int, np.ndarray], changes: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]],
                   crop_mask: np.ndarray, masks: dict[int, np.ndarray]) -> None:
    """Render each of ``samples`` afresh from its pixels and mask before replacement plus every
    face change so far (``changes``: sample -> region -> (crop-space change, crop matrix)), so
    a face replaced again never stacks on its earlier change."""
    for i in samples:
        pixels, mask = base_pixels[i].copy(), base_masks[i].copy()
        for _region, (change, matrix) in sorted(changes[i].items(), key=lambda kv: kv[0]):
            face_mask, _ = blend_change(pixels, change, matrix, crop_mask)
            np.maximum(mask, face_mask, out=mask)
        batch[i]["_pixels"], masks[i] = pixels, mask


def matched_by(verdict: dict[str, dict[str, Any]]) -> str:
    """The certifiers that still match a face, with score and threshold, for a reason (and the
    restoration that brought it back, where one did)."""
    def why(v: dict[str, Any]) -> str:
        text = f"{v['metric']} {v['score']:.3f}, threshold {v['threshold']}"
        restored = v.get("restored") or {}
        if restored.get("matched"):
            text += f"; {restored['score']:.3f} after restoration {restored['by']}"
        return text

    return ", ".join(f"{n} ({why(v)})" for n, v in verdict.items() if v["matched"])


def finish_replacement(batch: list[Sample], todo: list[int], failed: dict[int, str],
                       masks: dict[int, np.ndarray], *, stage: str, method: str,
                       params: dict[str, Any], seconds: float) -> None:
    """Quarantine the failed samples of ``todo``; mark the rest anonymized by ``method``, with
    the stage's time shared equally."""
    for i in todo:
        sample = batch[i]
        timings = sample.setdefault("timings", {})
        timings[stage] = timings.get(stage, 0.0) + seconds / len(todo)
        if i in failed:
            quarantine(sample, failed[i])
            continue
        sample["_mask"] = masks[i]
        sample["status"] = ANONYMIZED
        sample["method"] = method
        sample["params"] = params
        sample["epsilon"] = None


def faces_per_batch(free_bytes: int, per_face_bytes: int, cap: int, *, headroom: float = 0.6) -> int:
    """How many faces fit one optimisation batch: ``headroom`` of the device's free memory over
    the peak memory one face needs, at least 1 and at most ``cap`` (``fsap.face_batch``)."""
    if per_face_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * headroom // per_face_bytes)))


def released_pixels(sample: Sample, mask: np.ndarray, io: ImageIOConfig) -> np.ndarray:
    """The pixels a reader of the release will decode: ``sample["_pixels"]`` encoded in the
    sample's format with the run's settings and decoded again. JPEG moves a recognizer's score
    by a few hundredths, enough to turn a face certified at the margin into a match in the
    released bytes (measured: 0.618 before encoding, 0.579 after); certifying what will be
    released means the re-scan of the encoded output agrees. Shared by the synthesis stages."""
    from veil.transforms.imageio import decode_image, encode_image

    ext = sample["__image__"]
    data = encode_image(sample["_decoded"], sample["_pixels"], mask=mask, ext=ext,
                        jpeg_quality=io.jpeg_quality)
    return decode_image(data, ext=ext, max_pixels=io.max_pixels, max_bytes=io.max_bytes).rgb


@dataclass
class _Face:
    sample: int
    region: int
    matrix: np.ndarray
    #: Unit embedding of the face's target identity (pseudo-identities), or None.
    target: np.ndarray | None = None
    #: The detector box in crop coordinates (where ensemble members find landmarks).
    box: tuple[float, float, float, float] | None = None


class FSAPStage(ModelStage):
    """Pipeline stage: FSAP on every face of ``sample["_pixels"]``, certified, with fallbacks.

    Declares ``resources.gpus`` from the run's ``gpus_per_worker``, so the Ray runner gives it
    its own GPU actor pool; on CPU it is an ordinary stateful stage.
    """

    name = "fsap"
    stateful = True

    def __init__(self, config: FSAPConfig, *, anonymize: AnonymizeConfig, expand: float, seed: int,
                 models: dict[str, Any], gpus: float = 0.0, batch_size: int = 16,
                 io: ImageIOConfig | None = None) -> None:
        self.config = config
        self.io = io if io is not None else ImageIOConfig()
        self.anonymize = anonymize
        self.expand = expand
        self.seed = seed
        self.models = models
        self.resources = Resources(cpus=1.0, gpus=float(gpus))
        self.batch_size = batch_size
        self._ready = False

    def setup(self) -> None:
        if self._ready:
            return
        import torch

        from veil.transforms.latent import build_latent_space
        from veil.transforms.models import ModelRegistry, load_torch_state_dict
        from veil.transforms.recognizers import (
            MOBILEFACENET_MODEL,
            _mobilefacenet_class,
            build_recognizer,
        )

        self.device = resolve_device(self.config, self.resources.gpus)
        if self.device == "cpu":
            # A fixed thread count keeps float reductions, and so bytes, the same on every runner.
            torch.set_num_threads(max(1, int(self.resources.cpus)))
        registry = ModelRegistry(**self.models)
        latent = build_latent_space(self.config.latent, registry,
                                    allow_download=bool(self.models.get("allow_download"))).to(self.device)
        recognizer = _mobilefacenet_class()()
        recognizer.load_state_dict(load_torch_state_dict(registry.resolve(MOBILEFACENET_MODEL)), strict=True)
        recognizer.eval().requires_grad_(False).to(self.device)
        perceptual = None
        if self.config.weight_lpips > 0:
            from veil.transforms.perceptual import LPIPS

            perceptual = LPIPS.from_registry(registry, net="alex", device=self.device)
            perceptual.eval().requires_grad_(False)
        self._certifiers = [build_recognizer(name, registry) for name in self.config.certify]
        ensemble = {}
        for name in self.config.ensemble:
            # The certifier's own instance when it is one (one copy of the weights).
            member = next((c for c in self._certifiers if c.name == name), None)
            if member is None:
                member = build_recognizer(name, registry, device=self.device)
            ensemble[name] = ENSEMBLE_MEMBERS[name](member, self.config.crop_size, self.device)
        self._optimizer = FSAPOptimizer(latent, recognizer, perceptual, self.config, self.device,
                                        ensemble=ensemble)
        self._fallback = fallback_anonymizer(self.anonymize, self.config, expand=self.expand)
        self._crop_mask = _face_mask(self.config.crop_size)
        self._latent_name = latent.name
        self._face_batch = self.config.face_batch
        if self.device.startswith("cuda"):
            self._face_batch = self._fit_batch_to_device()
        self._ready = True

    def _fit_batch_to_device(self) -> int:
        """Size the face batch to the GPU: optimise two probe faces for one iteration, read the
        peak memory per face, and fit ``fsap.face_batch`` into the free memory."""
        import torch

        probe = np.full((2, self.config.crop_size, self.config.crop_size, 3), 128, np.uint8)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self._optimizer.optimise(probe, steps=1)
        per_face = max(1, (torch.cuda.max_memory_allocated() - before) // 2)
        free, _total = torch.cuda.mem_get_info()
        return faces_per_batch(free, per_face, self.config.face_batch)

    # -- helpers ------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The settings a release was made with (manifest ``params``)."""
        opt = self._optimizer
        return {
            "latent": self._latent_name, "recognizer": self.config.recognizer,
            "certify": list(self.config.certify), "certify_margin": self.config.certify_margin,
            "certify_restorations": list(self.config.certify_restorations),
            "ensemble": list(self.config.ensemble), "ensemble_weight": self.config.ensemble_weight,
            "steps": self.config.steps,
            "inner_steps": self.config.inner_steps, "tau": self.config.tau,
            "lambda_id": opt.lambda_id, "lambda_attr": opt.lambda_attr,
            "weights": {"pixel": self.config.weight_pixel, "ssim": self.config.weight_ssim,
                        "lpips": self.config.weight_lpips},
            "crop_size": self.config.crop_size, "tone_sigma": self.config.tone_sigma,
            "change_chroma": self.config.change_chroma, "min_face": self.config.min_face,
            "fallback": self.config.fallback, "device": self.device, "precision": self.config.precision,
            "face_batch": self._face_batch,
        }

    def _as_released(self, sample: Sample, mask: np.ndarray) -> np.ndarray:
        return released_pixels(sample, mask, self.io)

    def _optimise_faces(self, pixels: dict[int, np.ndarray], faces: list[_Face], strength: int
                        ) -> list[tuple[np.ndarray, FaceResult]]:
        """Optimise faces in micro-batches: per sample on CPU (runner-independent bytes), across
        samples up to ``face_batch`` on a GPU."""
        size = self.config.crop_size
        groups: list[list[int]] = []
        for i, face in enumerate(faces):
            same_group = groups and (self.device != "cpu" or faces[groups[-1][0]].sample == face.sample)
            if same_group and len(groups[-1]) < self._face_batch:
                groups[-1].append(i)
            else:
                groups.append([i])
        out: list[tuple[np.ndarray, FaceResult] | None] = [None] * len(faces)
        for group in groups:
            crops = np.stack([extract_crop(pixels[faces[i].sample], faces[i].matrix, size) for i in group])
            targets = None
            if any(faces[i].target is not None for i in group):
                dim = next(faces[i].target for i in group if faces[i].target is not None).shape[0]
                targets = np.stack([faces[i].target if faces[i].target is not None
                                    else np.full(dim, np.nan, np.float32) for i in group])
            boxes = [faces[i].box for i in group]
            result = self._optimizer.optimise(crops, strength=strength, targets=targets,
                                              boxes=None if None in boxes else boxes)
            for j, i in enumerate(group):
                out[i] = (result.crops[j], result.faces[j])
        return out  # type: ignore[return-value]

    # -- the stage ------------------------------------------------------------------------------

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from veil.transforms.anonymize import sample_rng

        self.setup()
        todo = begin_replacement(batch)
        if not todo:
            return batch
        start = time.perf_counter()
        originals = {i: batch[i]["_decoded"].rgb for i in todo}
        masks = {i: np.zeros(originals[i].shape[:2], dtype=np.float32) for i in todo}
        pending: list[_Face] = []
        failed: dict[int, str] = {}
        for i in todo:
            sample = batch[i]
            try:
                small = []
                for r, region in enumerate(sample["regions"]):
                    x0, y0, x1, y1 = region["box"]
                    if max(x1 - x0, y1 - y0) < self.config.min_face:
                        small.append(region)
                        region["fsap"] = {"status": "fallback", "method": self.config.fallback,
                                          "why": f"face {max(x1 - x0, y1 - y0):.0f} px < fsap.min_face "
                                                 f"{self.config.min_face} px: too small for a recognizer"}
                    else:
                        target = (sample.get(TARGETS_FIELD) or {}).get(r)
                        matrix = face_crop_matrix(region, self.config.crop_size)
                        pending.append(_Face(i, r, matrix,
                                             None if target is None else np.asarray(target, np.float32),
                                             face_box_in_crop(region, matrix)))
                if small:
                    result = self._fallback.apply(sample["_pixels"], small,
                                                  rng=sample_rng(self.seed, sample["__key__"]))
                    sample["_pixels"] = result.pixels
                    masks[i] = np.maximum(masks[i], result.mask)
            except Exception as exc:  # noqa: BLE001 - failures are data
                failed[i] = f"fsap_error: {describe_exception(exc)}"
        pending = [f for f in pending if f.sample not in failed]
        # Pixels and masks before FSAP (small faces already obscured): every round renders a
        # sample afresh from these, so a re-optimised face never stacks on its earlier change.
        base_pixels = {i: batch[i]["_pixels"].copy() for i in todo if i not in failed}
        base_masks = {i: masks[i].copy() for i in todo if i not in failed}
        #: sample index -> region index -> (crop-space change, crop matrix)
        changes: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        strength = 0
        while pending:
            try:
                results = self._optimise_faces(base_pixels, pending, strength)
            except Exception as exc:  # noqa: BLE001 - the group failed: quarantine its samples
                for f in pending:
                    failed[f.sample] = f"fsap_error: {describe_exception(exc)}"
                break
            for f, (change, record) in zip(pending, results, strict=True):
                changes.setdefault(f.sample, {})[f.region] = (change, f.matrix)
                batch[f.sample]["regions"][f.region]["fsap"] = {
                    "status": "optimised", "round": strength, "iterations": record.iterations,
                    "similarity": round(record.similarity, 4), "reached_tau": record.stopped,
                    "attribute_loss": round(record.attribute_loss, 5),
                    "latent": self._latent_name, "recognizer": self.config.recognizer,
                }
                if record.target_similarity is not None:
                    batch[f.sample]["regions"][f.region]["fsap"]["target_similarity"] = round(
                        record.target_similarity, 4)
                if record.ensemble:
                    batch[f.sample]["regions"][f.region]["fsap"]["ensemble"] = {
                        name: round(d, 4) for name, d in record.ensemble.items()}
            touched = sorted({f.sample for f in pending})
            render_changes(batch, touched, base_pixels, base_masks, changes, self._crop_mask, masks)
            # Certify the faces just optimised on their sample's released pixels.
            retry: list[_Face] = []
            for i in touched:
                faces_here = [f for f in pending if f.sample == i]
                regions = [batch[i]["regions"][f.region] for f in faces_here]
                try:
                    verdicts = certify_faces(self._certifiers, originals[i], self._as_released(batch[i], masks[i]),
                                             regions, margin=self.config.certify_margin,
                                             restorations=self.config.certify_restorations)
                except Exception as exc:  # noqa: BLE001 - failures are data
                    failed[i] = f"certify_error: {describe_exception(exc)}"
                    continue
                for f, region, verdict in zip(faces_here, regions, verdicts, strict=True):
                    region["fsap"]["certify"] = verdict
                    if any(v["matched"] for v in verdict.values()):
                        retry.append(f)
            if retry and strength >= self.config.certify_rounds:
                for f in retry:
                    verdict = batch[f.sample]["regions"][f.region]["fsap"]["certify"]
                    failed.setdefault(f.sample, f"identity_not_removed: face {f.region} still matched by "
                                                f"{matched_by(verdict)} after {strength} stronger round(s)")
                break
            # Still recognised: optimise those faces again, more strongly, from the original.
            strength += 1
            pending = retry
        finish_replacement(batch, todo, failed, masks, stage=self.name, method="fsap",
                           params=self.params(), seconds=time.perf_counter() - start)
        return batch
