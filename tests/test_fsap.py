"""FSAP: latent spaces, crop geometry, losses, the optimiser, the stage and its identity re-scan.

Unit tests use tiny random models of the real classes; the tests marked ``real`` load the real
TAEF2 and MobileFaceNet weights from ../shared/models and skip cleanly without them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import face_photo, jpeg_bytes

from veil.config import (
    AnonymizeConfig,
    ConfigError,
    DetectConfig,
    FSAPConfig,
    ImageIOConfig,
    RescanConfig,
)

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------- latent spaces


def test_tiny_autoencoder_shapes_and_gradients():
    from veil.transforms.latent import TinyAutoencoder

    ae = TinyAutoencoder.random(latent_channels=8, seed=1)
    x = torch.rand(2, 3, 64, 48)
    z = ae.encode(x)
    assert z.shape == (2, 8, 8, 6)
    z = z.detach().requires_grad_(True)
    y = ae.decode(z)
    assert y.shape == x.shape
    y.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_tiny_autoencoder_rejects_mismatched_halves():
    from veil.transforms.latent import TinyAutoencoder

    a = TinyAutoencoder.random(latent_channels=8)
    b = TinyAutoencoder.random(latent_channels=16)
    with pytest.raises(ValueError, match="latent channels"):
        TinyAutoencoder(a.encoder.state_dict(), b.decoder.state_dict())


def test_real_taef2_round_trip(models_dir, faces_dir):
    """The rebuilt architecture loads the published TAEF2 files strictly and reconstructs a real
    face at the quality the models README states (a wrong layout would give noise)."""
    from veil.transforms.latent import build_latent_space
    from veil.transforms.models import ModelRegistry

    ae = build_latent_space("taef2", ModelRegistry(models_dir=str(models_dir)))
    assert ae.latent_channels == 32 and ae.models == ["taef2_encoder", "taef2_decoder"]
    rgb = face_photo(faces_dir, "grace_hopper.jpg", max_side=256)[:256, :192]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = ae.decode(ae.encode(x)).clamp(0, 1)
    psnr = 10 * np.log10(1.0 / float(((y - x) ** 2).mean()))
    assert psnr > 28.0, psnr


def test_diffusers_autoencoder_from_a_local_folder(tmp_path):
    """Any AutoencoderKL by path: a tiny random one saved with diffusers loads, encodes to its
    scaled latent and decodes back to [0, 1] images; a missing id is a clear error offline."""
    diffusers = pytest.importorskip("diffusers")
    from veil.transforms.latent import DiffusersAutoencoder, build_latent_space
    from veil.transforms.models import ModelRegistry

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    space = build_latent_space(str(tmp_path / "vae"), ModelRegistry())
    assert isinstance(space, DiffusersAutoencoder) and space.factor == 2 and space.scaling == 0.5
    x = torch.rand(1, 3, 32, 32)
    z = space.encode(x)
    assert z.shape == (1, 4, 16, 16)
    assert space.decode(z).shape == x.shape
    with pytest.raises(FileNotFoundError, match="allow-download"):
        DiffusersAutoencoder.load("no-such-org/no-such-vae")


# ----------------------------------------------------------------------------------- geometry


def _region(box, landmarks=None):
    return {"kind": "face", "box": list(box), "score": 0.9, "landmarks": landmarks, "detector": "test"}


def test_crop_puts_the_arcface_frame_in_the_middle():
    from veil.transforms.fsap import FACE_FRACTION, face_crop_matrix
    from veil.transforms.recognizers import ARCFACE_TEMPLATE_112

    template = ARCFACE_TEMPLATE_112 * 2.0 + np.array([100.0, 50.0])  # a face twice the 112 size
    m = face_crop_matrix(_region([100, 50, 324, 274], template.tolist()), 128)
    mapped = np.c_[template, np.ones(5)] @ m.T
    expected = ARCFACE_TEMPLATE_112 * (128 * FACE_FRACTION / 112) + 128 * (1 - FACE_FRACTION) / 2
    np.testing.assert_allclose(mapped, expected, atol=1e-6)


def test_zero_change_leaves_the_image_bit_identical_and_change_stays_in_the_footprint():
    from veil.transforms.fsap import _face_mask, blend_change, face_crop_matrix

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    region = _region([120, 60, 200, 160])
    m = face_crop_matrix(region, 128)
    crop_mask = _face_mask(128)
    img = rgb.copy()
    mask, _ = blend_change(img, np.zeros((128, 128, 3), np.float32), m, crop_mask)
    assert np.array_equal(img, rgb)
    assert mask.max() == pytest.approx(1.0, abs=1e-3) and mask[0, 0] == 0
    img = rgb.copy()
    mask, _ = blend_change(img, np.full((128, 128, 3), 40.0, np.float32), m, crop_mask)
    changed = np.any(img != rgb, axis=2)
    assert changed.any()
    assert not changed[mask == 0].any()  # never outside the feathered face mask
    ys, xs = np.nonzero(changed)
    assert 100 <= xs.min() and xs.max() <= 220 and 30 <= ys.min() and ys.max() <= 200
    # the mask is smooth: no seam (no jump larger than a feather step between neighbours)
    assert np.abs(np.diff(mask, axis=1)).max() < 0.35


def test_face_at_the_image_edge_blends_inside_the_frame():
    from veil.transforms.fsap import _face_mask, blend_change, extract_crop, face_crop_matrix

    rgb = np.full((100, 100, 3), 128, np.uint8)
    m = face_crop_matrix(_region([-30, -20, 40, 60]), 64)
    assert extract_crop(rgb, m, 64).shape == (64, 64, 3)
    img = rgb.copy()
    mask, _ = blend_change(img, np.full((64, 64, 3), 30.0, np.float32), m, _face_mask(64))
    assert mask.shape == (100, 100) and (img != rgb).any()


# ------------------------------------------------------------------------------------- losses


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    from veil.transforms.fsap import ssim_torch

    rng = np.random.default_rng(1)
    a = rng.random((48, 48, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float()
    ours = float(ssim_torch(ta, tb)[0])
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert ours == pytest.approx(ref, abs=0.01)
    assert float(ssim_torch(ta, ta)[0]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------- optimiser


def _tiny_optimizer(models_dir=None, **cfg):
    """A random tiny autoencoder and MobileFaceNet of the real classes, or with ``models_dir``
    the real TAEF2 and MobileFaceNet (a randomly initialised MobileFaceNet is nearly constant:
    every similarity stays 1.0, so early stopping cannot be seen with it)."""
    from veil.transforms.fsap import FSAPOptimizer
    from veil.transforms.latent import TinyAutoencoder
    from veil.transforms.models import load_torch_state_dict
    from veil.transforms.recognizers import _mobilefacenet_class

    torch.manual_seed(0)
    rec = _mobilefacenet_class()()
    ae = TinyAutoencoder.random(latent_channels=4, seed=0)
    if models_dir is not None:
        from veil.transforms.latent import build_latent_space
        from veil.transforms.models import ModelRegistry

        rec.load_state_dict(load_torch_state_dict(models_dir / "mobilefacenet_ms1m.pt"))
        ae = build_latent_space("taef2", ModelRegistry(models_dir=str(models_dir)))
    rec.eval().requires_grad_(False)
    config = FSAPConfig(**{"weight_lpips": 0.0, **cfg})
    return FSAPOptimizer(ae, rec, None, config, "cpu")


def test_optimiser_lowers_identity_and_stops_each_face_on_its_own(models_dir, faces_dir):
    opt = _tiny_optimizer(models_dir, steps=8, inner_steps=1, tau=0.85, lambda_id=0.3)
    from veil.transforms.fsap import extract_crop, face_crop_matrix

    rgb = face_photo(faces_dir, "obama.jpg", max_side=400)
    box = [150.0, 60.0, 250.0, 190.0]
    crops = [extract_crop(rgb, face_crop_matrix(_region(box), 64), 64)]
    crops.append(np.full((64, 64, 3), 128, np.uint8))  # a flat patch: hard to move
    result = opt.optimise(np.stack(crops))
    assert result.crops.shape == (2, 64, 64, 3)
    for face in result.faces:
        assert 0 <= face.iterations <= 8
        assert face.stopped == (face.similarity < 0.85)
        if not face.stopped:
            assert face.iterations == 8
    assert result.faces[0].stopped and result.faces[0].similarity < 0.85
    # per-face early stopping: the face stopped before the budget, the flat patch did not
    # stop at the same time
    assert result.faces[0].iterations < 8
    assert [f.iterations for f in result.faces] != [result.faces[0].iterations] * 2 or result.faces[1].stopped


def test_optimiser_releases_only_the_perturbation():
    """x_hat = x + D(W') - D(W): with no step taken the change is exactly zero (the
    autoencoder's reconstruction error never reaches the release)."""
    opt = _tiny_optimizer(steps=1, tau=0.999)
    crops = np.random.default_rng(2).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    result = opt.optimise(crops)
    # the random recogniser's similarity starts at 1.0 and is not below tau: one step is taken
    assert result.faces[0].iterations == 1
    opt_none = _tiny_optimizer(steps=1, tau=-1.0)
    opt_none.config.steps = 0  # the budget is spent before any step
    result = opt_none.optimise(crops)
    assert result.faces[0].iterations == 0
    assert np.abs(result.crops).max() < 1e-3


def test_optimiser_scores_the_face_as_it_is_blended(models_dir, faces_dir):
    """The similarity a face stops at is the one of the crop as it is released (the change
    blended in over the face mask, as blend_change does), not of the unmasked crop: the
    recognizer's frame reaches past the mask, where a change never reaches the release."""
    import torch

    from veil.transforms.fsap import _face_mask, extract_crop, face_crop_matrix

    opt = _tiny_optimizer(models_dir, steps=6, inner_steps=1, tau=0.5, lambda_id=0.3)
    rgb = face_photo(faces_dir, "obama.jpg", max_side=400)
    crop = extract_crop(rgb, face_crop_matrix(_region([150.0, 60.0, 250.0, 190.0]), 64), 64)
    result = opt.optimise(crop[None])
    x = torch.from_numpy(crop[None]).permute(0, 3, 1, 2).float() / 255.0
    change = torch.from_numpy(result.crops).permute(0, 3, 1, 2) / 255.0
    mask = torch.from_numpy(_face_mask(64))[None, None]
    with torch.no_grad():
        target = opt.embed(x)
        blended = float((opt.embed(x + mask * change) * target).sum())
        unmasked = float((opt.embed(x + change) * target).sum())
    assert result.faces[0].iterations > 0
    assert result.faces[0].similarity == pytest.approx(blended, abs=1e-4)
    assert abs(unmasked - blended) > 1e-3  # the two differ: the test can tell them apart


def test_tone_filter_drops_tone_and_keeps_structure():
    """remove_tone takes a change's low frequencies out: a uniform tint or a smooth lighting
    ramp goes wherever the face mask lets a change through, a fine pattern stays nearly as
    it was."""
    from veil.transforms.fsap import _face_mask, gaussian_kernel, remove_tone, tone_sigma_pixels

    kernel = torch.from_numpy(gaussian_kernel(tone_sigma_pixels(0.15, 64)))
    assert kernel.numel() % 2 == 1 and float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    ramp = torch.linspace(-1.0, 1.0, 64)
    tint = torch.zeros(1, 3, 64, 64)
    tint[:, 0] += 0.1  # a red cast
    tint[:, 1] += 0.05 * ramp.view(1, 64)  # lighting that grows across the face
    mask = torch.from_numpy(_face_mask(64))[None, None]
    assert float((mask * remove_tone(tint, kernel)).abs().max()) < 2e-3
    assert float((mask * tint).abs().max()) > 0.1
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    fine = (0.1 * torch.sin(xx * 1.3) * torch.cos(yy * 1.1)).expand(1, 3, 64, 64)
    kept = remove_tone(fine, kernel)
    assert float(((kept - fine) ** 2).mean() / (fine**2).mean()) < 0.01
    with pytest.raises(ValueError, match="does not fit"):
        remove_tone(torch.zeros(1, 3, 16, 16), kernel)
    # The largest tone_sigma the configuration allows fits the smallest crop it allows.
    widest = torch.from_numpy(gaussian_kernel(tone_sigma_pixels(0.4, 64)))
    assert remove_tone(torch.zeros(1, 3, 64, 64), widest).shape == (1, 3, 64, 64)


def test_optimiser_changes_structure_not_tone():
    """With ``tone_sigma`` the released change has no mean colour and almost no low
    frequencies left; without it the same steps shift the crop's tone (the test can tell)."""
    from veil.transforms.fsap import _face_mask, gaussian_kernel, remove_tone

    crops = np.random.default_rng(3).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    mask = torch.from_numpy(_face_mask(64))[None, None]
    broad = torch.from_numpy(gaussian_kernel(6.0))

    def low_share(opt):
        result = opt.optimise(crops)
        assert result.faces[0].iterations == 3
        change = mask * torch.from_numpy(result.crops).permute(0, 3, 1, 2)
        low = change - remove_tone(change, broad)
        return float((low**2).mean() / (change**2).mean()), change

    # Rates pinned (not the latent space's default): the attribute step pulls the change back.
    rates = {"lambda_id": 0.2, "lambda_attr": 0.008}
    kept, change = low_share(_tiny_optimizer(steps=3, tau=0.999, tone_sigma=0.15, **rates))
    plain, _ = low_share(_tiny_optimizer(steps=3, tau=0.999, tone_sigma=0.0, **rates))
    assert float(change.abs().max()) > 1.0  # the face did change (in grey levels)
    assert kept < 0.1 < plain, (kept, plain)
    with pytest.raises(ConfigError, match="tone_sigma"):
        FSAPConfig(tone_sigma=0.8)


def test_keep_chroma_splits_light_from_colour():
    """keep_chroma keeps a change's luminance whole at any share, scales what differs between
    the channels beyond it, and at share 0 leaves a grey change (equal in R, G and B)."""
    from veil.transforms.fsap import LUMA_WEIGHTS, keep_chroma

    change = torch.from_numpy(np.random.default_rng(4).normal(0, 0.1, (2, 3, 8, 8)).astype(np.float32))
    weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)

    def luma(t):
        return (t * weights).sum(1)

    grey = keep_chroma(change, 0.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    half = keep_chroma(change, 0.5)
    for kept in (grey, half, keep_chroma(change, 1.0)):
        assert torch.allclose(luma(kept), luma(change), atol=1e-6)
    assert torch.allclose(keep_chroma(change, 1.0), change, atol=1e-6)
    assert torch.allclose(half - grey, 0.5 * (change - grey), atol=1e-6)


def test_optimiser_without_chroma_changes_light_not_colour():
    """With ``change_chroma`` 0 every released pixel moves by the same amount in R, G and B
    (lighter or darker, its hue kept); with the default 1 the same steps change colours too."""
    crops = np.random.default_rng(5).integers(40, 216, size=(1, 64, 64, 3), dtype=np.uint8)

    def spread(**cfg):
        result = _tiny_optimizer(steps=3, tau=0.999, lambda_id=0.2, **cfg).optimise(crops)
        assert result.faces[0].iterations == 3
        change = result.crops[0]
        assert np.abs(change).max() > 1.0  # the face did change (in grey levels)
        return float(np.abs(change - change.mean(axis=2, keepdims=True)).max())

    assert spread(change_chroma=0.0) < 1e-3 < spread()
    with pytest.raises(ConfigError, match="change_chroma"):
        FSAPConfig(change_chroma=1.5)


def test_bfloat16_networks_give_the_float32_result_within_rounding(models_dir, faces_dir, monkeypatch, request):
    """``fsap.precision: bfloat16`` runs the networks under autocast and keeps the rest in
    float32: the face reaches its goal in as many steps as in float32, with a change of the
    same shape and size (not the same bytes). A device without native bfloat16 is refused, never emulated."""
    from veil.transforms import fsap
    from veil.transforms.fsap import BFloat16, extract_crop, face_crop_matrix

    if not fsap.native_bfloat16("cpu"):
        pytest.skip("this CPU has no native bfloat16 (AVX-512 BF16 / AMX)")
    rgb = face_photo(faces_dir, "obama.jpg", max_side=400)
    crop = extract_crop(rgb, face_crop_matrix(_region([150.0, 60.0, 250.0, 190.0]), 64), 64)
    cfg = {"steps": 8, "inner_steps": 1, "tau": 0.5, "lambda_id": 0.3}
    # One thread, as the stage runs on CPU: with two, oneDNN's float32 backward differs in
    # the ninth digit between a first and a later call, which bfloat16's rounding can turn
    # into another sign step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    full = _tiny_optimizer(models_dir, **cfg).optimise(crop[None])
    opt = _tiny_optimizer(models_dir, precision="bfloat16", **cfg)
    assert isinstance(opt._decode, BFloat16) and isinstance(opt._encode, BFloat16)
    # MobileFaceNet (depthwise convolutions) is faster in float32 on a CPU: left as it is.
    assert isinstance(opt.recognizer, torch.nn.Module)
    half = opt.optimise(crop[None])
    assert half.crops.dtype == np.float32
    assert np.array_equal(opt.optimise(crop[None]).crops, half.crops)  # reproducible
    a, b = full.faces[0], half.faces[0]
    assert a.stopped and b.stopped and abs(b.iterations - a.iterations) <= 1
    assert np.abs(half.crops - full.crops).max() > 0  # bfloat16 did run
    assert b.attribute_loss == pytest.approx(a.attribute_loss, rel=0.2)
    # Sign steps turn rounding into a different sign wherever a gradient is near zero, so
    # the changes agree in shape, not in every pixel (measured: correlation 0.63).
    assert np.corrcoef(half.crops.ravel(), full.crops.ravel())[0, 1] > 0.5

    monkeypatch.setattr(fsap, "native_bfloat16", lambda kind: False)
    with pytest.raises(RuntimeError, match="no native bfloat16.*fsap.precision: float32"):
        _tiny_optimizer(models_dir, precision="bfloat16", **cfg)
    with pytest.raises(ConfigError, match="fsap.precision"):
        FSAPConfig(precision="float16")


def test_bfloat16_leaves_depthwise_networks_in_float32_on_cpu_only():
    """On a CPU, networks with depthwise convolutions (MobileFaceNet) stay float32 under
    ``fsap.precision: bfloat16``, as oneDNN runs them slower in bfloat16; elsewhere, and for
    networks without them, the network runs wrapped, on a rounded copy."""
    from veil.transforms.fsap import BFloat16, has_depthwise, in_bfloat16
    from veil.transforms.recognizers import _mobilefacenet_class

    mobile = _mobilefacenet_class()().eval()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
    assert has_depthwise(mobile) and not has_depthwise(plain) and not has_depthwise(lambda x: x)
    assert in_bfloat16(mobile, torch.device("cpu")) is mobile
    on_gpu = in_bfloat16(mobile, torch.device("cuda"))  # built only: nothing runs on the device
    assert isinstance(on_gpu, BFloat16) and on_gpu.device_type == "cuda"
    wrapped = in_bfloat16(plain, torch.device("cpu"))
    assert isinstance(wrapped, BFloat16) and wrapped.net is not plain
    assert wrapped.net[0].weight.dtype == torch.bfloat16 and plain[0].weight.dtype == torch.float32


def test_certify_rounds_push_harder():
    opt = _tiny_optimizer(tau=0.2, steps=10, lambda_id=0.02)
    t0, l0, s0 = opt.schedule(0)
    t1, l1, s1 = opt.schedule(1)
    assert (t0, l0, s0) == (0.2, 0.02, 10)
    assert t1 < t0 and l1 > l0 and s1 > s0


def test_default_rates_come_from_the_latent_space():
    opt = _tiny_optimizer()
    assert (opt.lambda_id, opt.lambda_attr) == (0.04, 0.016)


# -------------------------------------------------------------------------------- config, device


def test_config_refuses_to_certify_with_the_optimised_recognizer():
    with pytest.raises(ConfigError, match="certify"):
        FSAPConfig(certify=["mobilefacenet"])
    with pytest.raises(ConfigError, match="crop_size"):
        FSAPConfig(crop_size=100)
    assert FSAPConfig(certify="dlib-resnet").certify == ["dlib-resnet"]


def test_config_checks_the_restorations_certified_against():
    from veil.transforms.restoration import RESTORATIONS

    assert FSAPConfig().certify_restorations == list(RESTORATIONS)
    assert FSAPConfig(certify_restorations="blur-2, jpeg-q30").certify_restorations == ["blur-2", "jpeg-q30"]
    assert FSAPConfig(certify_restorations="none").certify_restorations == []
    with pytest.raises(ConfigError, match="fsap.certify_restorations: unknown restoration 'sharpen-1'"):
        FSAPConfig(certify_restorations=["sharpen-1"])


class _ContrastRecognizer:
    """A stand-in certifier whose "identity distance" is the released image's contrast / 80:
    a flat original against a noisy release is far apart, and smoothing brings them close."""

    name, metric, threshold = "contrast", "euclidean", 0.6

    def embed_pair(self, original, released, regions):
        e_o = np.zeros((len(regions), 2), np.float32)
        e_a = np.zeros((len(regions), 2), np.float32)
        e_a[:, 0] = released.astype(np.float32).std() / 80.0
        return e_o, e_a


def test_certification_counts_a_face_a_filter_brings_back():
    """A release far enough from the original on its own pixels, but matched once an
    attacker blurs it, is not certified when restorations are checked; the verdict names the
    restoration, and the reason says so."""
    from veil.transforms.fsap import certify_faces, matched_by

    rng = np.random.default_rng(1)
    original = np.full((64, 64, 3), 128, np.uint8)
    released = np.clip(128 + rng.normal(0, 80, original.shape), 0, 255).astype(np.uint8)
    regions = [{"box": [8, 8, 56, 56]}]
    rec = _ContrastRecognizer()
    plain = certify_faces([rec], original, released, regions, margin=0.1)[0]["contrast"]
    assert plain["score"] > 0.7 and not plain["matched"] and "restored" not in plain
    verdict = certify_faces([rec], original, released, regions, margin=0.1, restorations=["jpeg-q90", "blur-2"])[0]
    v = verdict["contrast"]
    assert v["score"] == plain["score"]
    assert v["restored"]["by"] == "blur-2" and v["restored"]["score"] < 0.6 and v["restored"]["matched"]
    assert v["matched"]
    assert "after restoration blur-2" in matched_by(verdict)
    # A restoration that does not bring the face back leaves the plain verdict alone.
    mild = certify_faces([rec], original, released, regions, margin=0.1, restorations=["jpeg-q90"])[0]["contrast"]
    assert mild["restored"]["by"] == "jpeg-q90" and not mild["restored"]["matched"] and not mild["matched"]


def test_gpu_asked_for_but_missing_is_a_clear_error(monkeypatch):
    from veil.transforms.fsap import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(FSAPConfig(), 0.0) == "cpu"
    assert resolve_device(FSAPConfig(device="cpu"), 0.5) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device(FSAPConfig(), 0.5)
    with pytest.raises(RuntimeError, match="gpus-per-worker"):
        resolve_device(FSAPConfig(device="cuda"), 0.0)


def test_fsap_stage_declares_gpus_for_the_runner():
    from veil.config import RunConfig
    from veil.pipelines.driver import build_stages

    cfg = RunConfig(input="x", output="y", gpus_per_worker=0.5, anonymize=AnonymizeConfig(method="fsap"))
    stages = build_stages(cfg)
    fsap = [s for s in stages if s.name == "fsap"][0]
    assert fsap.resources.gpus == 0.5 and fsap.stateful
    # Every other stage (decode, metadata, detect, the text and plate classes, policy,
    # encode, re-scan) stays on CPU.
    others = [s for s in stages if s.name != "fsap"]
    assert len(others) >= 4 and all(s.resources.gpus == 0 for s in others)


# ---------------------------------------------------------------------------- identity re-scan


def _decoded_sample(rgb, regions, key="k"):
    from veil.transforms.imageio import decode_image

    data = jpeg_bytes(rgb, quality=95)
    decoded = decode_image(data, ext="jpg", max_pixels=10**8, max_bytes=10**9)
    return {"__key__": key, "__shard__": "s", "__index__": 0, "__image__": "jpg", "jpg": data,
            "_decoded": decoded, "_pixels": decoded.rgb.copy(), "regions": regions,
            "status": "anonymized", "method": "fsap"}


def test_rescan_quarantines_a_synthesized_face_the_certifier_still_recognises(faces_dir, models_dir):
    """The identity re-scan compares identities, not the presence of a face: a face marked as
    replaced whose released pixels are the original is caught by dlib and quarantined."""
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry
    from veil.transforms.rescan import RescanStage

    rgb = face_photo(faces_dir, "obama.jpg", max_side=480)
    det = build_detector(DetectConfig(), ModelRegistry())
    regions = [r.to_dict() for r in det.detect(rgb)]
    assert regions
    for r in regions:
        r["fsap"] = {"status": "optimised"}
    sample = _decoded_sample(rgb, regions)
    stage = RescanStage(rescan=RescanConfig(), detect=DetectConfig(), anonymize=AnonymizeConfig(method="fsap"),
                        io=ImageIOConfig(), models={}, seed=0, fsap=FSAPConfig())
    out = stage.process_batch([sample])[0]
    assert out["status"] == "quarantined"
    assert out["reason"].startswith("identity_not_removed: dlib-resnet")
    assert out["regions"][0]["fsap"]["released"]["dlib-resnet"] < 0.6


def test_rescan_keeps_detectable_faces_of_a_synthesis_method(faces_dir, models_dir):
    """A face found where FSAP worked is expected (utility), not a residual face to blur: with
    a different person's face at that place, nothing is strengthened and the sample passes."""
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry
    from veil.transforms.rescan import RescanStage

    det = build_detector(DetectConfig(), ModelRegistry())
    a = face_photo(faces_dir, "obama.jpg", max_side=400)
    b = face_photo(faces_dir, "biden.jpg", max_side=400)
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    a, b = a[:h, :w], b[:h, :w]
    regions = [r.to_dict() for r in det.detect(a)]
    for r in regions:
        r["fsap"] = {"status": "optimised"}
    sample = _decoded_sample(a, regions)
    released = jpeg_bytes(b, quality=95)
    sample["jpg"] = released  # someone else where the face was
    stage = RescanStage(rescan=RescanConfig(), detect=DetectConfig(), anonymize=AnonymizeConfig(method="fsap"),
                        io=ImageIOConfig(), models={}, seed=0, fsap=FSAPConfig())
    out = stage.process_batch([sample])[0]
    found_b = [r.to_dict() for r in det.detect(b)]
    overlapping = all(any(_iou(f["box"], r["box"]) > 0.3 for r in regions) for f in found_b)
    if overlapping:
        assert out["status"] == "anonymized", out.get("reason")
        assert out["jpg"] == released  # not blurred
        assert out["rescan_rounds"] == 0


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ------------------------------------------------------------------------- the stage, real models


@pytest.mark.slow
def test_fsap_stage_on_a_real_photo(faces_dir, models_dir):
    """Real TAEF2 + MobileFaceNet + LPIPS, certified by dlib: the released face is no longer
    matched by dlib, is still found by the detector, and the per-face record is complete; a
    face below min_face is obscured by the fallback and says so."""
    from veil.transforms.detect import build_detector
    from veil.transforms.fsap import FSAPStage
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer

    rgb = face_photo(faces_dir, "astronaut.png", max_side=512)
    det = build_detector(DetectConfig(), ModelRegistry())
    regions = [r.to_dict() for r in det.detect(rgb)]
    assert len(regions) == 1
    tiny = {"kind": "face", "box": [20.0, 400.0, 40.0, 424.0], "score": 0.5, "landmarks": None,
            "detector": "test"}
    sample = _decoded_sample(rgb, regions + [tiny])
    stage = FSAPStage(FSAPConfig(), anonymize=AnonymizeConfig(), expand=0.2, seed=0, models={})
    out = stage.process_batch([sample])[0]
    assert out["status"] == "anonymized", out.get("reason")
    face, small = out["regions"]
    record = face["fsap"]
    assert record["status"] == "optimised" and record["latent"] == "taef2"
    assert record["recognizer"] == "mobilefacenet" and record["iterations"] >= 1
    assert record["similarity"] < record["certify"]["dlib-resnet"]["score"] + 1  # both recorded
    assert record["certify"]["dlib-resnet"]["matched"] is False
    assert small["fsap"]["status"] == "fallback" and "min_face" in small["fsap"]["why"]
    assert out["params"]["latent"] == "taef2" and out["method"] == "fsap"
    released = out["_pixels"]
    assert not np.array_equal(released, rgb)
    # the face is still a face (utility), but not the same person (privacy)
    assert det.detect(released), "FSAP must keep the face detectable"
    dlib = build_recognizer("dlib-resnet", ModelRegistry())
    emb_o, emb_a = dlib.embed_pair(rgb, released, regions)
    assert float(np.linalg.norm(emb_o[0] - emb_a[0])) > 0.6
    # pixels away from both faces are untouched
    assert np.array_equal(released[:40, -40:], out["_decoded"].rgb[:40, -40:])


# ------------------------------------------------------------------------- end to end, runners


@pytest.fixture(scope="module")
def fsap_dataset(tmp_path_factory, faces_dir) -> str:
    """One shard: a real face photo (one face) and a face-free image."""
    import skimage.data
    from helpers import write_tar

    root = tmp_path_factory.mktemp("fsap-in")
    face = jpeg_bytes(face_photo(faces_dir, "astronaut.png", max_side=320))
    write_tar(root / "shard-000.tar", [("astro", {"jpg": face}),
                                       ("coffee", {"jpg": jpeg_bytes(skimage.data.coffee()[::2, ::2])})])
    return str(root / "shard-000.tar")


@pytest.mark.slow
def test_fsap_run_gives_identical_bytes_on_local_and_ray(fsap_dataset, tmp_path, models_dir, ray_local):
    """`--method fsap` with the real TAEF2 + MobileFaceNet weights, on CPU: the local and Ray
    runners release identical bytes and manifests, the face is certified, and the report has
    the identity-replacement section (numbers only)."""
    from test_pipeline import manifest_rows, tree_digest

    from veil.config import RunConfig
    from veil.orchestrate import run

    outputs = {}
    for runner in ("local", "ray"):
        out = tmp_path / runner
        cfg = RunConfig(input=fsap_dataset, output=str(out), runner=runner, progress=False, batch_size=2,
                        anonymize=AnonymizeConfig(method="fsap"))
        summary = run(cfg)
        assert summary.counts == {"anonymized": 1, "clean": 1}, summary.counts
        outputs[runner] = out
    assert tree_digest(outputs["local"]) == tree_digest(outputs["ray"])
    assert manifest_rows(outputs["local"]) == manifest_rows(outputs["ray"])
    rows = {r["key"]: r for r in manifest_rows(outputs["local"])}
    record = json.loads(rows["astro"]["regions"])[0]["fsap"]
    assert record["status"] == "optimised" and record["released"]["dlib-resnet"] > 0.6
    report = json.loads((outputs["local"] / "report" / "report.json").read_text())
    syn = report["synthesis"]
    assert syn["optimised"] == 1 and syn["latent"] == "taef2"
    assert syn["certifiers"]["dlib-resnet"]["released"]["min"] > 0.6
    html = (outputs["local"] / "report" / "index.html").read_text()
    assert "Identity replacement (FSAP)" in html
    run_info = json.loads((outputs["local"] / "run.json").read_text())
    assert {"taef2_encoder", "taef2_decoder", "mobilefacenet_ms1m"} <= {m["name"] for m in run_info["models"]}


def test_face_batch_fits_device_memory():
    from veil.transforms.fsap import faces_per_batch

    gib = 1 << 30
    assert faces_per_batch(80 * gib, 1 * gib, 16) == 16  # plenty of memory: the configured cap
    assert faces_per_batch(10 * gib, 1 * gib, 16) == 6  # 60 % of 10 GiB
    assert faces_per_batch(1 * gib, 4 * gib, 16) == 1  # never below one face


# ------------------------------------------------------------------------------------ ensemble


class _MeanColourMember:
    """A stand-in ensemble member: its 'descriptor' is the crop's mean colour (x 10), so its
    distance grows with any change; the goal is ``threshold`` (no certify margin here)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.views: list[int] = []

    def grids(self, crops, boxes):
        assert len(boxes) == len(crops)
        return torch.zeros(len(crops), 2, 2, 2)

    def descriptors(self, x, grids, view=-1):
        assert grids.shape[0] == x.shape[0]
        self.views.append(view)
        return x.mean(dim=(2, 3)) * 10.0

    def distance(self, x, grids, reference, view=-1):
        return (self.descriptors(x, grids, view) - reference).norm(dim=1)

    def distances(self, x, grids, reference, views):
        return [self.distance(x, grids, reference, view) for view in views]


def test_an_ensemble_member_keeps_a_face_going_until_it_is_past_its_goal(models_dir, faces_dir):
    from veil.transforms.fsap import extract_crop, face_crop_matrix

    rgb = face_photo(faces_dir, "obama.jpg", max_side=400)
    crops = np.stack([extract_crop(rgb, face_crop_matrix(_region([150.0, 60.0, 250.0, 190.0]), 64), 64)])
    plain = _tiny_optimizer(models_dir, steps=8, tau=0.85, lambda_id=0.3).optimise(crops)
    assert plain.faces[0].stopped and plain.faces[0].iterations < 8 and plain.faces[0].ensemble == {}

    unreachable = _tiny_optimizer(models_dir, steps=8, tau=0.85, lambda_id=0.3)
    member = _MeanColourMember(threshold=1e6)
    unreachable.ensemble = {"dlib-resnet": member}
    result = unreachable.optimise(crops, boxes=[(0.0, 0.0, 64.0, 64.0)])
    face = result.faces[0]
    assert not face.stopped and face.iterations == 8  # MobileFaceNet alone would have stopped
    assert face.similarity < 0.85
    assert 0 < face.ensemble["dlib-resnet"] < 1e6
    assert set(member.views) >= {-1, 0, 1, 2, 3}  # plain view and the varied ones

    # A member whose goal every face meets (a negative distance), pushing with a negligible
    # weight, stops faces as MobileFaceNet alone does. Not a certifier: no margin on its goal.
    reachable = _tiny_optimizer(models_dir, steps=8, tau=0.85, lambda_id=0.3, ensemble_weight=1e-6)
    reachable.ensemble = {"stand-in": _MeanColourMember(threshold=-1.0)}
    assert reachable.ensemble_goal("stand-in") == -1.0
    assert unreachable.ensemble_goal("dlib-resnet") == 1e6 + unreachable.config.certify_margin
    face = reachable.optimise(crops).faces[0]  # no boxes: the central face frame
    assert face.stopped and face.iterations <= plain.faces[0].iterations + 1


def _obama_crop(faces_dir):
    """(image, region, 128 px FSAP crop, detector box in the crop, crop tensor in [0, 1])."""
    from veil.transforms.fsap import extract_crop, face_box_in_crop, face_crop_matrix

    rgb = face_photo(faces_dir, "obama.jpg", max_side=400)
    region = _region([150.0, 60.0, 250.0, 190.0])
    matrix = face_crop_matrix(region, 128)
    crop = extract_crop(rgb, matrix, 128)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
    return rgb, region, crop, face_box_in_crop(region, matrix), x


def test_the_dlib_member_places_its_chip_as_dlib_does(models_dir, faces_dir):
    pytest.importorskip("dlib")
    from veil.transforms.fsap import DlibChipSurrogate
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer

    dlib_rec = build_recognizer("dlib-resnet", ModelRegistry(models_dir=str(models_dir)))
    member = DlibChipSurrogate(dlib_rec, 128, "cpu")
    _, _, crop, box, x = _obama_crop(faces_dir)
    grids = member.grids(crop[None], [box])
    chip = torch.nn.functional.grid_sample(x * 255.0, grids, mode="bilinear", padding_mode="border",
                                           align_corners=True)[0].permute(1, 2, 0).numpy()
    shape = dlib_rec.shapes(crop, [{"box": list(box)}])
    reference = dlib_rec.chips(crop, shape)[0].astype(np.float32)
    # dlib rounds its chip to integers: the resampled chip is within that rounding.
    assert np.abs(chip - reference).mean() < 0.6 and np.abs(chip - reference).max() <= 1.0 + 1e-3
    with torch.no_grad():
        ours = member.descriptors(x, grids)
        assert np.linalg.norm(ours.numpy() - dlib_rec.embed_chips([reference.astype(np.uint8)])) < 0.01
        _views_in_one_batch_agree(member, x, grids, ours)


def _views_in_one_batch_agree(member, x, grids, reference):
    """An ensemble member's views through its network as one batch give each view's own distance."""
    x = torch.cat([x, torch.flip(x, dims=[3])])  # two faces, so the split is checked too
    grids, reference = torch.cat([grids, grids]), torch.cat([reference, reference])
    together = member.distances(x, grids, reference, (-1, 2))
    apart = [member.distance(x, grids, reference), member.distance(x, grids, reference, view=2)]
    assert len(together) == 2 and all(t.shape == (2,) for t in together)
    for t, a in zip(together, apart, strict=True):
        assert torch.allclose(t, a, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # the view is another crop


def test_the_facenet_member_crops_as_the_recognizer_does(models_dir, faces_dir):
    pytest.importorskip("facenet_pytorch")
    from veil.transforms.fsap import FaceNetCropSurrogate
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer

    casia = build_recognizer("facenet-casia", ModelRegistry(models_dir=str(models_dir)))
    member = FaceNetCropSurrogate(casia, 128, "cpu")
    assert member.threshold == pytest.approx(1.0 - casia.threshold)
    rgb, region, crop, box, x = _obama_crop(faces_dir)
    grids = member.grids(crop[None], [box])
    # The recognizer's verdict on the whole image: its crop box from the detector box.
    height, width = rgb.shape[:2]
    verdict = casia.embed([casia.crop(rgb, casia.crop_box(region["box"], width, height))])
    with torch.no_grad():
        ours = member.descriptors(x, grids)
        assert float(ours[0] @ torch.from_numpy(verdict[0])) > 0.97
        assert float(member.distance(x, grids, ours)[0]) == pytest.approx(0.0, abs=1e-5)
        hopper = face_photo(faces_dir, "grace_hopper.jpg", max_side=400)
        other = torch.from_numpy(casia.embed([casia.crop(hopper, (0, 0, hopper.shape[1], hopper.shape[0]))]))
        assert float(member.distance(x, grids, other)[0]) > member.threshold  # another person
        _views_in_one_batch_agree(member, x, grids, ours)
    # A varied view is a different crop, and the gradient reaches the pixels.
    x.requires_grad_(True)
    dist = member.distance(x, grids, ours, view=1)
    (grad,) = torch.autograd.grad(dist.sum(), x)
    assert float(dist.detach()[0]) > 1e-4 and float(grad.abs().sum()) > 0


def test_config_checks_the_ensemble():
    from veil.config import FSAP_ENSEMBLE_NAMES
    from veil.transforms.fsap import ENSEMBLE_MEMBERS

    assert set(ENSEMBLE_MEMBERS) == set(FSAP_ENSEMBLE_NAMES)
    assert FSAPConfig().ensemble == ["facenet-casia"]  # the default: FaceNet-CASIA joins the identity step
    assert FSAPConfig(ensemble=[]).ensemble == [] and FSAPConfig(ensemble="").ensemble == []
    assert FSAPConfig(ensemble="dlib-resnet").ensemble == ["dlib-resnet"]
    assert FSAPConfig(ensemble="dlib-resnet, facenet-casia").ensemble == ["dlib-resnet", "facenet-casia"]
    with pytest.raises(ConfigError, match="fsap.ensemble"):
        FSAPConfig(ensemble=["mobilefacenet"])  # the optimised recognizer already pushes
    with pytest.raises(ConfigError, match="fsap.ensemble"):
        FSAPConfig(ensemble=["facenet-casia", "facenet-casia"])
    with pytest.raises(ConfigError, match="fsap.ensemble_weight"):
        FSAPConfig(ensemble=["dlib-resnet"], ensemble_weight=0)
