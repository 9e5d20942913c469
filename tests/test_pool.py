"""Synthetic face pools (veil.transforms.pool) and the `veil pool` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import face_photo

from veil.transforms.pool import (
    ATTRIBUTE_FEATURES,
    CONTACT_SHEET,
    CROP_SIZE,
    FEATURE_DIM,
    AttributeFeatureModels,
    PoolBuildError,
    SyntheticPool,
    attribute_features,
    build_pool,
    identity_embedding,
    pose_features,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as Veil's stages use on CPU: the tests share 2 cores, where more
    threads only spin (4x the CPU time for MobileFaceNet here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def registry(models_dir):
    from veil.transforms.models import ModelRegistry

    return ModelRegistry(models_dir=str(models_dir))


@pytest.fixture(scope="module")
def dcgan_pool(tmp_path_factory, registry):
    """12 DCGAN faces, seed 3, generated in batches of 8."""
    out = tmp_path_factory.mktemp("pool") / "p"
    return build_pool("dcgan-celeba32", 12, out, seed=3, registry=registry, batch_size=8)


def test_pool_folder_holds_confirmed_aligned_faces(dcgan_pool, registry):
    pool = dcgan_pool
    meta = json.loads((pool.path / "pool.json").read_text())
    assert len(pool) == meta["count"] == 12
    assert meta["generator"] == "dcgan-celeba32" and meta["seed"] == 3
    # Every image seen is either kept or counted with its reason.
    assert meta["attempts"] == 12 + sum(meta["rejected"].values())
    assert 0.0 <= meta["rejection_rate"] < 0.5
    assert [f["name"] for f in meta["features"]] == [f.name for f in ATTRIBUTE_FEATURES]
    models = {m["name"]: m for m in meta["models"]}
    assert {"dcgan_celeba32_generator", "mobilefacenet_ms1m"} <= set(models)
    assert models["dcgan_celeba32_generator"]["sha256"] == registry.spec(
        "dcgan_celeba32_generator").sha256
    assert (pool.path / CONTACT_SHEET).is_file()
    assert len(set(pool.ids)) == 12 and all(i.startswith("syn-") for i in pool.ids)
    assert pool.identity.shape == (12, 128) and pool.attributes.shape == (12, FEATURE_DIM)
    np.testing.assert_allclose(np.linalg.norm(pool.identity, axis=1), 1.0, atol=1e-4)
    # Faces are varied: not one face twelve times.
    sims = pool.identity @ pool.identity.T
    assert sims[~np.eye(12, dtype=bool)].max() < 0.99
    assert pool.attributes.std(axis=0).max() > 0.1


def test_load_round_trip_recomputes_the_stored_vectors(dcgan_pool, registry):
    from veil.transforms.fsap import face_crop_matrix
    from veil.transforms.recognizers import ARCFACE_TEMPLATE_112, MobileFaceNetRecognizer

    pool = SyntheticPool.load(dcgan_pool.path)
    assert pool.ids == dcgan_pool.ids
    image = pool.image(5)
    assert image.shape == (CROP_SIZE, CROP_SIZE, 3) and image.dtype == np.uint8
    # The crop convention: the stored image already is FSAP's crop of its own face, so
    # cropping it again is the identity; its landmarks sit on the ArcFace template, which
    # fills the middle 3/4 of the crop.
    matrix = face_crop_matrix(pool.region(5), CROP_SIZE)
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-3)
    expected = ARCFACE_TEMPLATE_112 * (0.75 * CROP_SIZE / 112) + CROP_SIZE * 0.125
    assert np.abs(pool.landmarks(5) - expected).mean() < 3.0
    # Attributes and identity are the same functions real faces go through.
    models = AttributeFeatureModels.from_registry(registry)
    np.testing.assert_allclose(attribute_features(image, pool.region(5), models),
                               pool.attributes[5], atol=1e-3)
    recognizer = MobileFaceNetRecognizer.from_registry(registry)
    emb = identity_embedding(image, [pool.region(5)], recognizer)[0]
    assert float(emb @ pool.identity[5]) > 0.999


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_batch_size(dcgan_pool, tmp_path, registry):
    again = build_pool("dcgan-celeba32", 12, tmp_path / "again", seed=3, registry=registry,
                       batch_size=5)
    assert again.ids == dcgan_pool.ids
    assert (again.path / "faces.parquet").read_bytes() == (
        dcgan_pool.path / "faces.parquet").read_bytes()
    other = build_pool("dcgan-celeba32", 3, tmp_path / "other", seed=4, registry=registry,
                       contact_sheet=False)
    assert not set(other.ids) & set(dcgan_pool.ids)
    assert not (other.path / CONTACT_SHEET).exists()


def test_detector_filter_rejects_non_faces_and_implausible_landmarks(registry):
    from veil.config import DetectConfig
    from veil.transforms.detect import Region, build_detector
    from veil.transforms.pool import _confirm, _plausible

    detector = build_detector(DetectConfig(detectors=["yunet"], min_face=16), registry)
    flat = np.full((128, 128, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    for image in (flat, noise):
        region, why = _confirm(detector, image)
        assert region is None and why
    good = [(40.0, 50.0), (88.0, 50.0), (64.0, 70.0), (45.0, 92.0), (83.0, 92.0)]
    face = Region("face", (20, 20, 108, 120), 0.9, good, "yunet")
    assert _plausible(face, 128, 0.35) is None
    upside_down = Region("face", (20, 20, 108, 120), 0.9, good[::-1], "yunet")
    assert "face order" in _plausible(upside_down, 128, 0.35)
    assert "score" in _plausible(Region("face", (20, 20, 108, 120), 0.3, good, "y"), 128, 0.35)
    assert "no landmarks" in _plausible(Region("face", (20, 20, 108, 120), 0.9, None, "y"), 128,
                                        0.35)
    assert "too small" in _plausible(Region("face", (0, 0, 30, 30), 0.9, good, "y"), 128, 0.35)


def test_pose_features_follow_the_landmarks():
    frontal = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    roll, yaw, pitch = pose_features(frontal)
    assert abs(roll) < 1 and abs(yaw) < 0.02 and abs(pitch - 0.49) < 0.02
    # Rotating the face in the image plane changes roll only.
    angle = np.radians(20)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    r2, y2, p2 = pose_features(frontal @ rot.T)
    assert abs(r2 - 20) < 0.5 and abs(y2 - yaw) < 1e-6 and abs(p2 - pitch) < 1e-6
    # The nose moved towards one eye: yaw.
    turned = frontal.copy()
    turned[2, 0] += 10
    assert pose_features(turned)[1] > 0.25


def test_existing_output_is_refused(tmp_path, registry):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "x").write_text("keep me")
    with pytest.raises(PoolBuildError, match="not an empty folder"):
        build_pool("dcgan-celeba32", 2, tmp_path / "pool", registry=registry)
    with pytest.raises(PoolBuildError, match="unknown generator"):
        build_pool("stylegan9", 2, tmp_path / "new", registry=registry)
    assert (tmp_path / "pool" / "x").read_text() == "keep me" and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    """A randomly initialised DDPM pipeline saved with safetensors: it makes noise, no faces."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet,
                                  scheduler=diffusers.DDPMScheduler(num_train_timesteps=20))
    root = tmp_path_factory.mktemp("ddpm")
    pipe.save_pretrained(root / "safe", safe_serialization=True)
    pipe.save_pretrained(root / "pickle", safe_serialization=False)
    return root


@pytest.mark.slow
def test_diffusers_generator_without_faces_is_a_clear_error(tiny_ddpm, tmp_path, registry):
    out = tmp_path / "pool"
    with pytest.raises(PoolBuildError) as err:
        build_pool(f"diffusers:{tiny_ddpm / 'safe'}", 4, out, registry=registry, steps=2,
                   batch_size=32)
    message = str(err.value)
    assert "confirmed no face with 5 landmarks" in message
    assert "rejection rate 100%" in message and "32 image(s)" in message
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    # Pickled weights are never loaded; a missing pipeline says where to put it.
    with pytest.raises(PoolBuildError, match="safetensors"):
        build_pool(f"diffusers:{tiny_ddpm / 'pickle'}", 4, out, registry=registry, steps=2)
    with pytest.raises(PoolBuildError, match="Downloads are off"):
        build_pool(f"diffusers:{tmp_path / 'missing'}", 4, out, registry=registry, steps=2)


@pytest.mark.slow
def test_pool_from_a_folder_of_photos(faces_dir, tmp_path, registry):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "biden.jpg", "grace_hopper.jpg"):
        Image.fromarray(face_photo(faces_dir, name, 240)).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pool = build_pool("dataset", 0, tmp_path / "pool", source=str(photos), registry=registry)
    assert len(pool) == 3
    assert sorted(s.rsplit("/", 1)[-1] for s in pool.sources) == ["biden", "grace_hopper",
                                                                  "obama"]
    assert pool.meta["rejected"] == {"unreadable image": 1}
    assert pool.meta["generator"].startswith("dataset:")
    # A dataset may show real people: no contact sheet for the report.
    assert not (pool.path / CONTACT_SHEET).exists()


@pytest.mark.slow
def test_cli_pool(tmp_path, models_dir, capsys):
    from veil.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

    out = tmp_path / "pool"
    rc = main(["pool", "--count", "4", "--output", str(out), "--seed", "1", "--no-progress",
               "--models-dir", str(models_dir)])
    printed = capsys.readouterr().out
    assert rc == EXIT_OK, printed
    assert "pool written" in printed and "4 faces" in printed and CONTACT_SHEET in printed
    assert len(SyntheticPool.load(out)) == 4
    assert main(["pool", "--count", "4", "--output", str(out), "--no-progress"]) == EXIT_ERROR
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["pool", "--count", "0", "--output", str(tmp_path / "z")]) == EXIT_USAGE
    shutil.rmtree(out)


def test_load_refuses_incomplete_or_foreign_folders(dcgan_pool, tmp_path):
    with pytest.raises(FileNotFoundError, match="veil pool"):
        SyntheticPool.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(dcgan_pool.path, copy)
    meta = json.loads((copy / "pool.json").read_text())
    meta["count"] = 13
    (copy / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incomplete"):
        SyntheticPool.load(copy)
    meta["count"], meta["features"] = 12, meta["features"][:-1]
    (copy / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rebuild the pool"):
        SyntheticPool.load(copy)


def _tiny_text_to_image(folder):
    """A random Stable Diffusion text-to-image pipeline (CLIP text encoder and a character
    tokenizer written here), saved with safetensors."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=100, max_position_embeddings=77))
    words = folder.parent / "tokenizer"
    words.mkdir()
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz,.'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(words / "vocab.json"),
                              merges_file=str(words / "merges.txt"), model_max_length=77)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_diffusers_text_to_image_and_unconditional_sources(tiny_ddpm, tmp_path):
    from veil.transforms.pool import DEFAULT_PROMPT, _DiffusersSource

    folder = _tiny_text_to_image(tmp_path / "sd")
    source = _DiffusersSource(f"diffusers:{folder}", 7, "cpu", prompt=None, steps=2,
                              allow_download=False)
    assert source.prompt == DEFAULT_PROMPT
    first, second = source.generate([0, 1])
    again = source.generate([1])[0]
    assert first.rgb.dtype == np.uint8 and first.rgb.shape == (128, 128, 3)  # upsampled
    # Image i has its own seed: the same whatever batch it is generated in.
    np.testing.assert_array_equal(second.rgb, again.rgb)
    assert not np.array_equal(first.rgb, second.rgb)
    assert second.source.endswith("seed=7:index=1")
    # An unconditional pipeline takes no prompt: asking for one is an error, not ignored.
    with pytest.raises(PoolBuildError, match="unconditional"):
        _DiffusersSource(f"diffusers:{tiny_ddpm / 'safe'}", 0, "cpu", prompt="a face", steps=2,
                         allow_download=False)
