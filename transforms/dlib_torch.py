"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

The ``dlib-bin`` wheel is built without BLAS, so dlib runs this network with its own plain
loops (~360 ms CPU per face). The same network with the same weights in PyTorch gives the
same descriptors (tests/test_dlib_torch.py checks them against dlib to 1e-4) several times
faster, so the validation gates and FSAP's certification use this one by default.

Two parts:

* :func:`read_dlib_resnet` reads dlib's serialized network with plain binary parsing (no
  pickle, no dlib): every size is checked against the one network it accepts, dlib's
  ``anet_type`` from ``examples/dnn_face_recognition_ex.cpp``, and anything else raises
  :class:`DlibModelFormatError` naming the file.
* :class:`DlibResNet` is that network as a torch module: (N, 3, 150, 150) RGB face chips
  (pixel values 0-255, dlib's 150x150 chips) in, (N, 128) descriptors out.

The network, innermost first (dlib's template aliases)::

    input_rgb_image_sized<150>            (pixel - channel mean) / 256
    con<32,7,7,2,2> affine relu           stride-2 convolutions in dlib pad 0 (72x72)
    max_pool<3,3,2,2>                     (35x35)
    3 x ares<32>, ares_down<64> + 3 x ares<64>, ares_down<128> + 2 x ares<128>,
    ares_down<256> + 2 x ares<256>, ares_down<256>
    avg_pool_everything, fc_no_bias<128>

    ares<N>      = relu(x + affine(con3x3(relu(affine(con3x3(x))))))
    ares_down<N> = relu(avg_pool<2,2,2,2>(x) + the same block, its first conv stride 2)

``ares_down``'s two branches do not always agree in size: the shortcut keeps the input's
channels, and at 8x8 and 4x4 the stride-2 unpadded convolution gives 3x3 and 1x1 while the
2x2 pooling gives 4x4 and 2x2. dlib's ``add_prev`` then adds into a tensor of the larger size
of each dimension with the missing parts of either input taken as zero (``tt::add``); so
does :func:`add_zero_padded`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Side of dlib's face chips for this network (``input_rgb_image_sized<150>``).
CHIP_SIZE = 150

#: Output size of the descriptor (``fc_no_bias<128>``).
DESCRIPTOR_DIM = 128

#: (filters, residual units) of dlib's ``alevel4`` .. ``alevel0``, from the input upwards;
#: every level but the first starts with a downsampling unit (``ares_down``).
_LEVELS = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))

#: Residual units from the input upwards: (filters, downsampling).
RESNET_UNITS: tuple[tuple[int, bool], ...] = tuple(
    (filters, level > 0 and i == 0)
    for level, (filters, count) in enumerate(_LEVELS)
    for i in range(count)
)

_STEM_FILTERS = 32


class DlibModelFormatError(ValueError):
    """A file is not the serialized dlib network that :func:`read_dlib_resnet` accepts."""


# --------------------------------------------------------------------------------------------
# dlib's serialization primitives (dlib/serialize.h, dlib/cuda/tensor.h)
# --------------------------------------------------------------------------------------------


class _Reader:
    """Cursor over the bytes of a dlib serialized object; every read is bounds-checked."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = memoryview(data)
        self.path = path
        self.pos = 0

    def fail(self, what: str) -> DlibModelFormatError:
        return DlibModelFormatError(
            f"{self.path}: not dlib's ResNet face descriptor network "
            f"(dlib_face_recognition_resnet_model_v1): {what} (at byte {self.pos})"
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what} (needs {n} more bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, what: str) -> int:
        """dlib's integer: a control byte (bit 7 sign, low 4 bits byte count), then the
        absolute value little-endian."""
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.fail(f"{what}: bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def expect_int(self, what: str, expected: int | tuple[int, ...]) -> int:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        value = self.int(what)
        if value not in allowed:
            raise self.fail(f"{what} is {value}, expected {' or '.join(map(str, allowed))}")
        return value

    def float(self, what: str) -> float:
        """dlib's portable float: integer mantissa, then integer exponent (base 2)."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail(f"{what}: old ASCII float format is not supported")
        mantissa, exponent = self.int(what), self.int(what)
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        if not -1100 <= exponent <= 1100:
            raise self.fail(f"{what}: float exponent {exponent} out of range")
        return math.ldexp(mantissa, exponent)

    def bool(self, what: str) -> bool:
        value = bytes(self.take(1, what))
        if value not in (b"0", b"1"):
            raise self.fail(f"{what}: bool byte {value!r} is neither '0' nor '1'")
        return value == b"1"

    def string(self, what: str, max_len: int = 64) -> str:
        n = self.int(what)
        if not 0 <= n <= max_len:
            raise self.fail(f"{what}: string length {n} out of range")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: not an ASCII string ({raw[:16]!r})") from None

    def expect_string(self, what: str, *expected: str) -> str:
        value = self.string(what)
        if value not in expected:
            raise self.fail(f"{what} is {value!r}, expected {' or '.join(map(repr, expected))}")
        return value

    def dims(self, what: str) -> tuple[int, int, int, int]:
        dims = tuple(self.int(what) for _ in range(4))
        if any(d < 0 or d > 1 << 24 for d in dims):
            raise self.fail(f"{what}: tensor dimensions {dims} out of range")
        return dims  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        """``resizable_tensor`` version 2: (n, k, nr, nc), then little-endian float32 data."""
        self.expect_int(f"{what} version", 2)
        dims = self.dims(what)
        count = math.prod(dims)
        raw = self.take(4 * count, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str) -> tuple[int, int, int, int]:
        """``alias_tensor`` version 1: only its (n, k, nr, nc)."""
        self.expect_int(f"{what} version", 1)
        return self.dims(what)


# --------------------------------------------------------------------------------------------
# The network's layout and weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One entry of dlib's layer stack: ``kind`` is a computational layer ("fc", "avg_pool",
    "max_pool", "relu", "add_prev", "affine", "con") or a marker ("tag", "skip")."""

    kind: str
    filters: int = 0  # con, fc: outputs
    window: tuple[int, int] = (0, 0)  # con, pools: (nr, nc); 0 = the whole input
    stride: int = 1
    tag: int = 0  # tag, skip, add_prev

    @property
    def computational(self) -> bool:
        return self.kind not in ("tag", "skip")

    @property
    def padding(self) -> int:
        """dlib's default padding: none for strided windows, else half the window."""
        return 0 if self.stride != 1 else self.window[0] // 2


def _block(filters: int, stride: int) -> list[_Layer]:
    """``block<N, affine, stride>``, innermost first: con, affine, relu, con, affine."""
    return [
        _Layer("con", filters, (3, 3), stride),
        _Layer("affine"),
        _Layer("relu"),
        _Layer("con", filters, (3, 3), 1),
        _Layer("affine"),
    ]


def anet_layers() -> list[_Layer]:
    """dlib's ``anet_type`` below the loss, innermost (next to the input) first."""
    layers = [
        _Layer("con", _STEM_FILTERS, (7, 7), 2),
        _Layer("affine"),
        _Layer("relu"),
        _Layer("max_pool", window=(3, 3), stride=2),
    ]
    for filters, down in RESNET_UNITS:
        if down:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<x>>>>>>>>
            layers += [
                _Layer("tag", tag=1),
                *_block(filters, 2),
                _Layer("tag", tag=2),
                _Layer("skip", tag=1),
                _Layer("avg_pool", window=(2, 2), stride=2),
                _Layer("add_prev", tag=2),
                _Layer("relu"),
            ]
        else:  # relu<add_prev1<block<N,1,tag1<x>>>>
            layers += [
                _Layer("tag", tag=1),
                *_block(filters, 1),
                _Layer("add_prev", tag=1),
                _Layer("relu"),
            ]
    layers += [_Layer("avg_pool", window=(0, 0), stride=1), _Layer("fc", DESCRIPTOR_DIM)]
    return layers


@dataclass(frozen=True)
class ConvAffine:
    """A dlib ``con`` (cross-correlation with bias) followed by its test-time ``affine``."""

    weight: np.ndarray  # (out, in, kh, kw) float32
    bias: np.ndarray  # (out,)
    gamma: np.ndarray  # (out,)
    beta: np.ndarray  # (out,)
    stride: int
    padding: int


@dataclass(frozen=True)
class ResidualUnit:
    conv1: ConvAffine
    conv2: ConvAffine
    downsample: bool


@dataclass(frozen=True)
class DlibResNetWeights:
    """Everything :class:`DlibResNet` needs, as read from the .dat file."""

    channel_means: tuple[float, float, float]  # RGB, subtracted before dividing by 256
    stem: ConvAffine
    units: tuple[ResidualUnit, ...]
    fc: np.ndarray  # (128, 256): descriptor = fc @ pooled features


def _read_details(r: _Reader, layer: _Layer, channels: int, where: str) -> dict:
    """One layer's ``serialize(details)``; returns its weights (con, affine, fc) or {}."""
    if layer.kind == "con":
        version = r.expect_string(f"{where} type", "con_4", "con_5", "con_6")
        params = r.tensor(f"{where} params")
        n = r.int(f"{where} num_filters")
        geometry = tuple(r.int(f"{where} geometry") for _ in range(6))
        expected = (*layer.window, layer.stride, layer.stride, layer.padding, layer.padding)
        if n != layer.filters or geometry != expected:
            raise r.fail(
                f"{where}: con with {n} filters, (nr, nc, stride_y, stride_x, padding_y, "
                f"padding_x) = {geometry}; expected {layer.filters} filters, {expected}"
            )
        filters = r.alias_tensor(f"{where} filters")
        biases = r.alias_tensor(f"{where} biases")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float(f"{where} {name} multiplier")
        use_bias = r.bool(f"{where} use_bias") if version in ("con_5", "con_6") else True
        if version == "con_6" and r.bool(f"{where} use_relu"):
            raise r.fail(f"{where}: con with a fused relu, which this network does not have")
        shape = (n, channels, *layer.window)
        if not use_bias or filters != shape or biases != (1, n, 1, 1):
            raise r.fail(
                f"{where}: filters {filters}, biases {biases} (use_bias={use_bias}); "
                f"expected {shape} on {channels} input channels with a bias"
            )
        flat = params.reshape(-1)
        if flat.size != math.prod(shape) + n:
            raise r.fail(f"{where}: {flat.size} parameters, expected {math.prod(shape) + n}")
        return {"weight": flat[: math.prod(shape)].reshape(shape), "bias": flat[-n:]}
    if layer.kind == "affine":
        r.expect_string(f"{where} type", "affine_")
        params = r.tensor(f"{where} params").reshape(-1)
        gamma, beta = r.alias_tensor(f"{where} gamma"), r.alias_tensor(f"{where} beta")
        mode = r.int(f"{where} mode")
        if (
            mode != 0
            or params.size != 2 * channels
            or math.prod(gamma) != channels
            or math.prod(beta) != channels
        ):
            raise r.fail(
                f"{where}: affine (mode {mode}) with {params.size} parameters, gamma {gamma}, "
                f"beta {beta}; expected convolutional mode 0 over {channels} channels"
            )
        return {"gamma": params[:channels], "beta": params[channels:]}
    if layer.kind in ("max_pool", "avg_pool"):
        r.expect_string(f"{where} type", f"{layer.kind}_2")
        geometry = tuple(r.int(f"{where} geometry") for _ in range(6))
        expected = (*layer.window, layer.stride, layer.stride, layer.padding, layer.padding)
        if geometry != expected:
            raise r.fail(f"{where}: {layer.kind} geometry {geometry}, expected {expected}")
        return {}
    if layer.kind == "relu":
        r.expect_string(f"{where} type", "relu_")
        return {}
    if layer.kind == "add_prev":
        r.expect_string(f"{where} type", "add_prev_")
        return {}
    if layer.kind == "fc":
        version = r.expect_string(f"{where} type", "fc_2", "fc_3")
        outputs, inputs = r.int(f"{where} num_outputs"), r.int(f"{where} num_inputs")
        params = r.tensor(f"{where} params").reshape(-1)
        weights, biases = r.alias_tensor(f"{where} weights"), r.alias_tensor(f"{where} biases")
        bias_mode = r.int(f"{where} bias mode")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float(f"{where} {name} multiplier")
        if version == "fc_3":
            r.bool(f"{where} use_bias")
        if (
            (outputs, inputs, bias_mode) != (layer.filters, channels, 1)
            or weights != (inputs, outputs, 1, 1)
            or params.size != inputs * outputs
        ):
            raise r.fail(
                f"{where}: fc {inputs} -> {outputs} (bias mode {bias_mode}, weights {weights}, "
                f"{params.size} parameters); expected fc_no_bias {channels} -> {layer.filters}"
            )
        # dlib computes output = input (N, inputs) x weights (inputs, outputs).
        return {"weight": np.ascontiguousarray(params.reshape(inputs, outputs).T)}
    raise AssertionError(layer.kind)


def _read_layer_state(r: _Reader, version: int, where: str, *, on_input: bool) -> None:
    """What ``add_layer`` writes after its details: flags and (normally empty) buffers."""
    for name in ("setup called", "gradient stale", "output disabled"):
        r.bool(f"{where} {name} flag")
    r.tensor(f"{where} x_grad")
    r.tensor(f"{where} cached output")
    if on_input:
        r.tensor(f"{where} grad_final")
        if version >= 3:
            r.int(f"{where} sample expansion factor")
    elif version >= 2:
        r.tensor(f"{where} params_grad")


def read_dlib_resnet(path: str | Path) -> DlibResNetWeights:
    """Read ``dlib_face_recognition_resnet_model_v1.dat`` (dlib's ``anet_type``), safely.

    dlib writes a network outermost layer first, each ``add_layer`` as its version, then its
    whole sub-network, then its own details; so the file is the loss layer, a run of version
    numbers (one per layer, outermost first), the input layer, and the layers' details from
    the input upwards. Raises :class:`DlibModelFormatError` (naming the file) for anything
    but that network: other layer counts, kinds, sizes, versions, truncation, trailing bytes.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    r.expect_int("loss layer version", 1)
    r.expect_string("loss layer type", "loss_metric_2")
    r.float("loss margin")
    r.float("loss distance threshold")

    layers = anet_layers()
    outermost_first = layers[::-1]
    # The run of layer versions: dlib's add_layer writes 1-2 (3 next to the input layer),
    # tags and skips 1. It ends where the input layer's name begins (its length, 21).
    versions: list[int] = []
    while len(versions) <= len(layers):  # one more than expected is enough to refuse
        start = r.pos
        value = r.int("layer version")
        if value > 3:
            r.pos = start
            break
        versions.append(value)
    if len(versions) != len(layers):
        raise r.fail(
            f"the network has {len(versions)} layers, expected {len(layers)} "
            f"({sum(x.computational for x in layers)} computational, "
            f"{sum(not x.computational for x in layers)} tags and skips in "
            f"{len(RESNET_UNITS)} residual units)"
        )
    for i, (layer, version) in enumerate(zip(outermost_first, versions, strict=True)):
        allowed = (1,) if not layer.computational else (2, 3) if i == len(layers) - 1 else (1, 2)
        if version not in allowed:
            raise r.fail(f"layer {i} ({layer.kind}): version {version}, expected {allowed}")

    r.expect_string("input layer type", "input_rgb_image_sized")
    means = tuple(r.float("input channel mean") for _ in range(3))
    size = (r.int("input rows"), r.int("input columns"))
    if size != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input size {size}, expected ({CHIP_SIZE}, {CHIP_SIZE})")

    channels = 3
    found: list[tuple[_Layer, dict]] = []
    for i, layer in enumerate(layers):
        if not layer.computational:
            continue
        index = len(layers) - 1 - i
        where = f"layer {index} ({layer.kind})"
        details = _read_details(r, layer, channels, where)
        _read_layer_state(r, versions[index], where, on_input=i == 0)
        if layer.kind == "con":
            channels = layer.filters
        found.append((layer, details))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected bytes after the network")
    return _assemble(found, means)  # type: ignore[arg-type]


def _assemble(
    found: list[tuple[_Layer, dict]], means: tuple[float, float, float]
) -> DlibResNetWeights:
    """Group the layers read (input upwards) into stem, residual units and fc."""
    it: Iterator[tuple[_Layer, dict]] = iter(found)

    def conv_affine() -> ConvAffine:
        con, weights = next(it)
        affine, scale = next(it)
        assert con.kind == "con" and affine.kind == "affine"
        return ConvAffine(
            weights["weight"],
            weights["bias"],
            scale["gamma"],
            scale["beta"],
            con.stride,
            con.padding,
        )

    def skip(*kinds: str) -> None:
        for kind in kinds:
            assert next(it)[0].kind == kind

    stem = conv_affine()
    skip("relu", "max_pool")
    units = []
    for _, down in RESNET_UNITS:
        conv1 = conv_affine()
        skip("relu")
        conv2 = conv_affine()
        skip(*(("avg_pool", "add_prev", "relu") if down else ("add_prev", "relu")))
        units.append(ResidualUnit(conv1, conv2, down))
    skip("avg_pool")
    fc = next(it)[1]["weight"]
    return DlibResNetWeights(means, stem, tuple(units), fc)


# --------------------------------------------------------------------------------------------
# The torch module
# --------------------------------------------------------------------------------------------


def _fused_conv(layer: ConvAffine) -> nn.Conv2d:
    """A conv with dlib's following affine folded in: affine(conv(x) + b) = conv'(x) + b'.

    Folded in float64, stored float32: the result differs from dlib's two float32 steps by
    rounding only (~1e-7 relative), far below the 1e-4 the descriptors are checked to.
    """
    out, cin, kh, kw = layer.weight.shape
    conv = nn.Conv2d(cin, out, (kh, kw), stride=layer.stride, padding=layer.padding)
    gamma = layer.gamma.astype(np.float64)
    weight = layer.weight.astype(np.float64) * gamma[:, None, None, None]
    bias = layer.bias.astype(np.float64) * gamma + layer.beta.astype(np.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return conv


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev`` for tensors of different sizes: the sum over the larger size of
    each of (channels, rows, columns), each input read as zero beyond its own extent (both
    anchored at channel 0, row 0, column 0)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class _Unit(nn.Module):
    def __init__(self, unit: ResidualUnit) -> None:
        super().__init__()
        self.conv1 = _fused_conv(unit.conv1)
        self.conv2 = _fused_conv(unit.conv2)
        self.downsample = unit.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(add_zero_padded(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face descriptor ResNet: (N, 3, 150, 150) float RGB chips, pixel values 0-255
    (dlib's 150x150 face chips, channels first), to (N, 128) float32 descriptors."""

    def __init__(self, weights: DlibResNetWeights) -> None:
        super().__init__()
        means = torch.tensor(weights.channel_means, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("channel_means", means)
        self.stem = _fused_conv(weights.stem)
        self.units = nn.ModuleList(_Unit(u) for u in weights.units)
        self.fc = nn.Linear(weights.fc.shape[1], weights.fc.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weights.fc))
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> DlibResNet:
        return cls(read_dlib_resnet(path))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(
                f"expected chips of shape (N, 3, {CHIP_SIZE}, {CHIP_SIZE}), got {tuple(chips.shape)}"
            )
        # input_rgb_image_sized: (pixel - mean) / 256 in float32, as dlib's to_tensor.
        x = (chips.float() - self.channel_means) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean(dim=(2, 3)))
