"""dlib's ResNet face descriptor in PyTorch (veil.transforms.dlib_torch) against dlib itself.

The torch backend of the "dlib-resnet" recognizer must give dlib's descriptors: every
component within 1e-4 and every pairwise distance within 1e-4, on every test photo, for faces
found by Veil's detector and by dlib's own frontal detector, on the photos as they are and on
blurred, noised and pixelated faces (what anonymized images look like). The reader of dlib's
.dat file must refuse anything but that network with an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import face_photo

from veil.transforms.models import MODEL_SPECS, ModelRegistry, package_file_path
from veil.transforms.recognizers import (
    DLIB_RECOGNITION_MODEL,
    DLIB_SHAPE_MODEL,
    DLIB_THRESHOLD,
    DlibResNetRecognizer,
    build_recognizer,
)

torch = pytest.importorskip("torch")
dlib = pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")

from veil.transforms.dlib_torch import (  # noqa: E402  (after the importorskips)
    RESNET_UNITS,
    DlibModelFormatError,
    add_zero_padded,
    anet_layers,
    read_dlib_resnet,
)

TOLERANCE = 1e-4


def _dat_path() -> Path:
    for name in (DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL):
        if package_file_path(*MODEL_SPECS[name].package_file) is None:
            pytest.skip("face_recognition_models (dlib's weights) is not installed")
    return Path(package_file_path(*MODEL_SPECS[DLIB_RECOGNITION_MODEL].package_file))


@pytest.fixture(scope="module")
def dat_bytes() -> bytes:
    return _dat_path().read_bytes()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DlibResNetRecognizer]:
    _dat_path()
    empty = str(tmp_path_factory.mktemp("no-models"))
    registry = ModelRegistry(models_dir=empty, cache_dir=empty)
    return {b: build_recognizer("dlib-resnet", registry, backend=b) for b in ("torch", "dlib")}


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


def test_reader_finds_dlibs_anet_layout(dat_bytes: bytes) -> None:
    weights = read_dlib_resnet(_dat_path())
    # input_rgb_image_sized's channel means, as dlib's training set them.
    np.testing.assert_allclose(weights.channel_means, (122.782, 117.001, 104.298), atol=1e-4)
    assert weights.stem.weight.shape == (32, 3, 7, 7) and weights.stem.stride == 2
    assert weights.stem.padding == 0  # dlib pads strided convolutions by 0
    assert len(weights.units) == len(RESNET_UNITS) == 14
    for unit, (filters, down) in zip(weights.units, RESNET_UNITS, strict=True):
        assert unit.downsample == down and unit.conv1.weight.shape[0] == filters
        assert (unit.conv1.stride, unit.conv1.padding) == ((2, 0) if down else (1, 1))
        assert unit.conv2.weight.shape == (filters, filters, 3, 3)
    assert weights.fc.shape == (128, 256) and weights.fc.dtype == np.float32
    n_params = weights.fc.size + sum(
        c.weight.size + 3 * c.bias.size
        for c in [weights.stem] + [c for u in weights.units for c in (u.conv1, u.conv2)]
    )
    # The tensors are nearly all of the file: ~5.6M float32 parameters.
    assert 4 * n_params > 0.99 * len(dat_bytes)


def _write(tmp_path: Path, data: bytes, name: str = "model.dat") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [0, 1, 40, 300, 1000, 5_000_000, -4, -1])
def test_truncated_file_names_the_file(tmp_path: Path, dat_bytes: bytes, cut: int) -> None:
    path = _write(tmp_path, dat_bytes[:cut], "truncated.dat")
    with pytest.raises(DlibModelFormatError, match="truncated.dat"):
        read_dlib_resnet(path)


def test_corrupted_files_give_a_clear_error(tmp_path: Path, dat_bytes: bytes) -> None:
    cases = {
        "garbage": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "other-loss": dat_bytes.replace(b"loss_metric_2", b"loss_metric_3", 1),
        "other-layer": dat_bytes.replace(b"con_4", b"con_9", 1),
        # input_rgb_image_sized<150>: nr = 150 (control byte 1, 0x96) becomes 151.
        "other-input-size": dat_bytes.replace(b"\x01\x96\x01\x96", b"\x01\x97\x01\x96", 1),
        "trailing-bytes": dat_bytes + b"\x00",
    }
    for name, data in cases.items():
        assert data != dat_bytes, name
        with pytest.raises(DlibModelFormatError, match=f"{name}.dat") as info:
            read_dlib_resnet(_write(tmp_path, data, f"{name}.dat"))
        assert "dlib_face_recognition_resnet_model_v1" in str(info.value)


def test_wrong_layer_count_gives_a_clear_error(tmp_path: Path, dat_bytes: bytes) -> None:
    # The loss header (version, "loss_metric_2", two floats) takes 29 bytes; then come the
    # layers' versions, two bytes each (b"\x01\x02" for add_layer), outermost first.
    header = 29
    assert dat_bytes[header : header + 2] == b"\x01\x02"
    n = len(anet_layers())
    for data, found in (
        (dat_bytes[:header] + dat_bytes[header + 2 :], n - 1),
        (dat_bytes[:header] + b"\x01\x02" + dat_bytes[header:], n + 1),
    ):
        with pytest.raises(DlibModelFormatError, match=f"has {found} layers, expected {n}"):
            read_dlib_resnet(_write(tmp_path, data, "layers.dat"))


def test_add_zero_padded_matches_dlibs_add_prev_for_unequal_sizes() -> None:
    a = torch.arange(1.0, 5.0).view(1, 1, 2, 2)  # 1 channel, 2x2
    b = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)  # 2 channels, 1x1
    out = add_zero_padded(a, b)
    expected = torch.tensor([[[[11.0, 2.0], [3.0, 4.0]], [[20.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(out, expected) and torch.equal(add_zero_padded(b, a), expected)


# --------------------------------------------------------------------------------------------
# Descriptors equal to dlib's
# --------------------------------------------------------------------------------------------


def _anonymized_like(rgb: np.ndarray, faces: list[dict]) -> dict[str, np.ndarray]:
    """The photo with every face box blurred, noised or pixelated, the rest untouched."""
    height, width = rgb.shape[:2]
    rng = np.random.default_rng(0)
    out = {name: rgb.copy() for name in ("blurred", "noised", "pixelated")}
    for face in faces:
        x0, y0 = (max(0, int(v)) for v in face["box"][:2])
        x1, y1 = min(width, round(face["box"][2])), min(height, round(face["box"][3]))
        crop = rgb[y0:y1, x0:x1]
        small = cv2.resize(crop, (8, 8), interpolation=cv2.INTER_AREA)
        out["blurred"][y0:y1, x0:x1] = cv2.GaussianBlur(crop, (0, 0), 0.1 * max(crop.shape))
        out["noised"][y0:y1, x0:x1] = np.clip(crop + rng.normal(0, 40, crop.shape), 0, 255)
        out["pixelated"][y0:y1, x0:x1] = cv2.resize(
            small, crop.shape[1::-1], interpolation=cv2.INTER_NEAREST
        )
    return out


@pytest.fixture(scope="module")
def descriptors(
    backends: dict[str, DlibResNetRecognizer], faces_dir: Path, models_dir: Path
) -> dict[str, np.ndarray]:
    """(M, 128) descriptors per backend: every face of every photo (Veil's detector and
    dlib's frontal detector) in the photo and in its blurred, noised and pixelated versions.

    The noised image is also used as the "original" of a pair (shapes and chips placed on
    it), so the chips come from the anonymized-like images the validation sees."""
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector

    detector = build_detector(DetectConfig(), ModelRegistry(models_dir=models_dir))
    frontal = dlib.get_frontal_face_detector()
    out: dict[str, list[np.ndarray]] = {"torch": [], "dlib": []}
    photos = sorted(p.name for p in faces_dir.iterdir() if p.suffix in (".jpg", ".png"))
    assert len(photos) >= 6
    n_faces = 0
    for name in photos:
        rgb = face_photo(faces_dir, name)
        faces = [r.to_dict() for r in detector.detect(rgb)]
        faces += [
            {"box": [r.left(), r.top(), r.right() + 1, r.bottom() + 1]} for r in frontal(rgb, 1)
        ]
        assert faces, f"no face found in {name}"
        n_faces += len(faces)
        anon = _anonymized_like(rgb, faces)
        for backend, rec in backends.items():
            out[backend].extend(rec.embed_pair(rgb, anon["blurred"], faces))
            out[backend].extend(rec.embed_pair(anon["noised"], anon["pixelated"], faces))
    assert n_faces >= 12
    return {b: np.concatenate(d) for b, d in out.items()}


def test_torch_descriptors_equal_dlibs(descriptors: dict[str, np.ndarray]) -> None:
    torch_d, dlib_d = descriptors["torch"], descriptors["dlib"]
    assert torch_d.shape == dlib_d.shape and torch_d.dtype == np.float32
    assert np.abs(torch_d - dlib_d).max() <= TOLERANCE
    # Not trivially equal: the descriptors span same-person and different-person distances.
    assert np.abs(dlib_d).max() > 0.1


def test_torch_distances_equal_dlibs(descriptors: dict[str, np.ndarray]) -> None:
    def distances(d: np.ndarray) -> np.ndarray:
        return np.linalg.norm(d[:, None, :] - d[None, :, :], axis=-1)

    d_torch, d_dlib = distances(descriptors["torch"]), distances(descriptors["dlib"])
    assert np.abs(d_torch - d_dlib).max() <= TOLERANCE
    # Pairs on both sides of the threshold, and none changes side.
    assert (d_dlib < DLIB_THRESHOLD).sum() > len(d_dlib) and (d_dlib > DLIB_THRESHOLD).any()
    near = np.abs(d_dlib - DLIB_THRESHOLD) > TOLERANCE
    assert np.array_equal((d_torch <= DLIB_THRESHOLD)[near], (d_dlib <= DLIB_THRESHOLD)[near])


def test_torch_backend_is_batch_independent(backends: dict[str, DlibResNetRecognizer]) -> None:
    rng = np.random.default_rng(1)
    chips = list(rng.integers(0, 256, (5, 150, 150, 3), dtype=np.uint8))
    rec = backends["torch"]
    whole = rec.embed_chips(chips)
    rec.batch_size = 2
    try:
        split = rec.embed_chips(chips)
    finally:
        rec.batch_size = 32
    np.testing.assert_allclose(split, whole, atol=1e-5)
    np.testing.assert_allclose(whole, backends["dlib"].embed_chips(chips), atol=TOLERANCE)


def test_backend_options(backends: dict[str, DlibResNetRecognizer]) -> None:
    rec = backends["torch"]
    assert rec.backend == "torch" and DlibResNetRecognizer.BACKENDS[0] == "torch"
    assert (rec.name, rec.metric, rec.threshold, rec.dim) == ("dlib-resnet", "euclidean", 0.6, 128)
    empty = np.zeros((20, 20, 3), dtype=np.uint8)
    a, b = rec.embed_pair(empty, empty, [])
    assert a.shape == b.shape == (0, 128)
    model, shapes = rec.model_path, rec.shape_predictor_path
    with pytest.raises(ValueError, match="backend='dlib'"):
        DlibResNetRecognizer(model, shapes, num_jitters=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        DlibResNetRecognizer(model, shapes, backend="onnx")
