"""davidsandberg/facenet's MS-Celeb-1M model (20170512-110547) from its Keras HDF5 file.

The file is nyoki-mtl's Keras 2.1.2 conversion of sandberg's TensorFlow checkpoint
(``facenet_keras.h5``): the same InceptionResnetV1 as facenet-pytorch's module, with a 128-d
bottleneck instead of 512. Its layer names spell the TF-slim scopes with underscores
(``Block35_3_Branch_1_Conv2d_0b_3x3`` is ``Repeat/block35_3/Branch_1/Conv2d_0b_3x3``), so the
mapping to facenet-pytorch's modules is :func:`veil.transforms.tf_graph.slim_scope_to_torch`,
the one the CASIA-WebFace graph uses.

Nothing in the file runs: h5py reads the arrays and the ``model_config`` JSON (the Lambda
layers' pickled Python functions are never unmarshalled). The config is checked for what the
port assumes: 160 x 160 x 3 input, ``valid`` padding on every stride-2 layer, batch norms
without scale and with epsilon 1e-3, the residual scales 0.17 / 0.1 / 0.2 / 1.0. Every weight
array of the file must land in exactly one tensor of the module, and every tensor of the
module must be filled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from veil.transforms.tf_graph import GraphFormatError, slim_scope_to_torch

__all__ = ["EMBEDDING_DIM", "KerasFormatError", "facenet_state_from_keras_h5", "facenet_keras_module"]

#: Width of the model's bottleneck (its embedding).
EMBEDDING_DIM = 128
#: Batch-norm epsilon of every layer (slim's and facenet-pytorch's).
_EPS = 1e-3
#: Residual scale of each block kind; ``Block8_6`` is the last Block8, unscaled.
_SCALES = {"Block35": 0.17, "Block17": 0.1, "Block8": 0.2, "Block8_6": 1.0}
_BLOCK = re.compile(r"^(Block35|Block17|Block8)_(\d+)_(.+)$")
_MIXED = re.compile(r"^(Mixed_6a|Mixed_7a)_(.+)$")
_BRANCH = re.compile(r"^(Branch_\d)_(.+)$")
#: Keras block -> TF-slim repeat scope; the sixth Block8 is slim's lone ``Block8``.
_REPEAT_OF = {"Block35": ("Repeat", "block35"), "Block17": ("Repeat_1", "block17"), "Block8": ("Repeat_2", "block8")}


class KerasFormatError(GraphFormatError):
    """The Keras file is not the FaceNet layout this port reads."""


def _slim_scope(layer: str) -> list[str]:
    """TF-slim scope (below ``InceptionResnetV1/``) of a Keras FaceNet layer name."""
    match = _BLOCK.match(layer)
    if match:
        kind, number, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "Block8" and number == 6:
            head = ["Block8"]
        else:
            repeat, block = _REPEAT_OF[kind]
            head = [repeat, f"{block}_{number}"]
    else:
        match = _MIXED.match(layer)
        if not match:
            return [layer]  # a stem convolution: Conv2d_1a_3x3 ...
        head, rest = [match.group(1)], match.group(2)
    branch = _BRANCH.match(rest)
    return [*head, branch.group(1), branch.group(2)] if branch else [*head, rest]


def _check_config(config: dict[str, Any], path: Path) -> None:
    layers = config.get("config", {}).get("layers", [])
    if not layers:
        raise KerasFormatError(f"{path}: no layers in model_config")
    shape = layers[0].get("config", {}).get("batch_input_shape")
    if list(shape or [])[1:] != [160, 160, 3]:
        raise KerasFormatError(f"{path}: input shape {shape}, expected (None, 160, 160, 3)")
    for layer in layers:
        cls, cfg, name = layer["class_name"], layer["config"], layer["name"]
        if cls in ("Conv2D", "MaxPooling2D") and list(cfg.get("strides", [1, 1])) != [1, 1]:
            if cfg.get("padding") != "valid":
                raise KerasFormatError(f"{path}: {name} pads {cfg.get('padding')!r} at stride 2, expected 'valid'")
        if cls == "BatchNormalization" and (cfg.get("scale") or abs(cfg.get("epsilon", 0) - _EPS) > 1e-9):
            raise KerasFormatError(f"{path}: {name} is not a scale-free batch norm with epsilon {_EPS}")
        if cls == "Lambda":
            block = name.rsplit("_", 1)[0]  # Block35_1_ScaleSum -> Block35_1
            kind = "Block8_6" if block == "Block8_6" else block.split("_")[0]
            scale = (cfg.get("arguments") or {}).get("scale")
            if kind not in _SCALES or scale is None or abs(scale - _SCALES[kind]) > 1e-6:
                raise KerasFormatError(f"{path}: {name} scales by {scale}, expected {_SCALES.get(kind)}")
        if cls == "Dense" and name == "Bottleneck" and cfg.get("units") != EMBEDDING_DIM:
            raise KerasFormatError(f"{path}: bottleneck of {cfg.get('units')} units, expected {EMBEDDING_DIM}")


def facenet_state_from_keras_h5(path: str | Path) -> dict[str, np.ndarray]:
    """facenet-pytorch ``InceptionResnetV1`` state dict (with a 128-d ``last_linear`` and
    ``last_bn``) from the Keras FaceNet file. Raises :class:`KerasFormatError` when the file
    is not that model."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise KerasFormatError(f"{path}: not a whole Keras model file (no model_config / model_weights)")
        config = json.loads(f.attrs["model_config"])
        _check_config(config, path)
        group = f["model_weights"]
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for layer in group.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group[layer].attrs["weight_names"]]
            if names:
                arrays[layer] = {n.rsplit("/", 1)[1].split(":")[0]: np.asarray(group[layer][n]) for n in names}

    state: dict[str, np.ndarray] = {}
    used: set[str] = set()
    branch_convs: dict[str, list[str]] = {}
    convs = {name: w for name, w in arrays.items() if "kernel" in w and w["kernel"].ndim == 4}
    for name in convs:
        scope = _slim_scope(name)
        if len(scope) >= 3 and scope[-2].startswith("Branch_"):
            branch_convs.setdefault("/".join(scope[:-1]), []).append(scope[-1])
    for layers in branch_convs.values():
        layers.sort()
    for name, weights in convs.items():
        torch_name = slim_scope_to_torch(_slim_scope(name), branch_convs)
        kernel = np.ascontiguousarray(weights["kernel"].transpose(3, 2, 0, 1), dtype=np.float32)
        used.add(name)
        if "bias" in weights:  # a block's 1x1 up-projection
            state[f"{torch_name}.weight"] = kernel
            state[f"{torch_name}.bias"] = weights["bias"].astype(np.float32)
            continue
        bn = arrays.get(f"{name}_BatchNorm")
        if bn is None or set(bn) != {"beta", "moving_mean", "moving_variance"}:
            raise KerasFormatError(f"{path}: {name} has neither a bias nor a scale-free batch norm")
        channels = kernel.shape[0]
        state[f"{torch_name}.conv.weight"] = kernel
        state[f"{torch_name}.bn.weight"] = np.ones(channels, np.float32)
        state[f"{torch_name}.bn.bias"] = bn["beta"].astype(np.float32)
        state[f"{torch_name}.bn.running_mean"] = bn["moving_mean"].astype(np.float32)
        state[f"{torch_name}.bn.running_var"] = bn["moving_variance"].astype(np.float32)
        used.add(f"{name}_BatchNorm")

    dense, bn = arrays.get("Bottleneck"), arrays.get("Bottleneck_BatchNorm")
    if dense is None or bn is None or set(dense) != {"kernel"}:
        raise KerasFormatError(f"{path}: no bias-free Bottleneck dense layer with its batch norm")
    state["last_linear.weight"] = np.ascontiguousarray(dense["kernel"].T, np.float32)
    width = state["last_linear.weight"].shape[0]
    state["last_bn.weight"] = np.ones(width, np.float32)
    state["last_bn.bias"] = bn["beta"].astype(np.float32)
    state["last_bn.running_mean"] = bn["moving_mean"].astype(np.float32)
    state["last_bn.running_var"] = bn["moving_variance"].astype(np.float32)
    used.update(("Bottleneck", "Bottleneck_BatchNorm"))
    left = sorted(set(arrays) - used)
    if left:
        raise KerasFormatError(f"{path}: layers with weights not mapped: {', '.join(left[:5])}")
    return state


def facenet_keras_module(path: str | Path) -> Any:
    """facenet-pytorch's ``InceptionResnetV1`` with the file's weights, 128-d, in eval mode.

    Loaded with ``strict=True``: a tensor of the module the file does not fill, or a shape
    that differs, is an error.
    """
    import torch
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    model = InceptionResnetV1(classify=False)
    in_features = model.last_linear.in_features
    model.last_linear = torch.nn.Linear(in_features, EMBEDDING_DIM, bias=False)
    model.last_bn = torch.nn.BatchNorm1d(EMBEDDING_DIM, eps=_EPS, momentum=0.1, affine=True)
    state = {k: torch.from_numpy(v) for k, v in facenet_state_from_keras_h5(path).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
