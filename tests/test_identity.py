"""Tests for veil.validators.identity: Wilson intervals against the closed form, alignment onto
the ArcFace template, the real MobileFaceNet weights on real photos (same vs different people,
blurred faces), and exact merging / serialisation of the re-identification attacks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from veil.validators.identity import (
    ARCFACE_TEMPLATE_112,
    IdentificationAttack,
    MobileFaceNetRecognizer,
    VerificationAttack,
    align_face,
    face_key,
    similarity_matrix,
    wilson_interval,
)

cv2 = pytest.importorskip("cv2")

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "grace_hopper.jpg", "astronaut.png")


# --------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------


def _wilson_direct(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Textbook form: (k + z^2/2 +- z sqrt(k(n-k)/n + z^2/4)) / (n + z^2)."""
    root = z * math.sqrt(k * (n - k) / n + z * z / 4)
    return (k + z * z / 2 - root) / (n + z * z), (k + z * z / 2 + root) / (n + z * z)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (10, 10, (0.7225, 1.0)),
        (1, 100, (0.0018, 0.0545)),
    ],
)
def test_wilson_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_wilson_matches_direct_formula_and_edges() -> None:
    for n in (1, 7, 50, 333):
        for k in range(0, n + 1, max(1, n // 7)):
            assert wilson_interval(k, n) == pytest.approx(_wilson_direct(k, n), abs=1e-12)
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


def test_align_face_maps_landmarks_onto_template() -> None:
    rng = np.random.default_rng(0)
    # The template rotated by 20 degrees, scaled x2.3, shifted, plus landmark noise: a
    # similarity transform must bring it back within a pixel.
    theta = math.radians(20)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    landmarks = (
        ARCFACE_TEMPLATE_112 @ rot.T * 2.3 + np.array([150.0, 80.0]) + rng.normal(0, 0.3, (5, 2))
    )
    matrix = similarity_matrix(landmarks, ARCFACE_TEMPLATE_112)
    warped = np.hstack([landmarks, np.ones((5, 1))]) @ matrix.T
    assert np.abs(warped - ARCFACE_TEMPLATE_112).max() < 1.0
    # A similarity: equal scale on both axes, no shear.
    a = matrix[:, :2]
    assert a[0, 0] == pytest.approx(a[1, 1]) and a[0, 1] == pytest.approx(-a[1, 0])
    assert math.hypot(a[0, 0], a[1, 0]) == pytest.approx(1 / 2.3, rel=0.02)

    # The pixels follow the matrix: a bright dot at each landmark lands on the template point.
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (round(x), round(y)), 4, (255, 255, 255), -1)
    face = align_face(image, landmarks)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    for tx, ty in ARCFACE_TEMPLATE_112:
        assert face[round(ty), round(tx)].min() > 100


def test_align_face_rejects_bad_landmarks() -> None:
    with pytest.raises(ValueError):
        align_face(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        align_face(np.zeros((50, 50, 3), np.uint8), np.ones((5, 2)))


# --------------------------------------------------------------------------------------------
# Real weights on real photos
# --------------------------------------------------------------------------------------------


def _load_rgb(path: Path, max_side: int = 640) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return rgb


@pytest.fixture(scope="module")
def recognizer(models_dir: Path) -> MobileFaceNetRecognizer:
    from veil.transforms.models import ModelRegistry

    return MobileFaceNetRecognizer.from_registry(ModelRegistry(models_dir=models_dir))


@pytest.fixture(scope="module")
def aligned_faces(faces_dir: Path, models_dir: Path) -> dict[str, np.ndarray]:
    """The most confident CenterFace face of each photo, aligned with its landmarks."""
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    detector = build_detector(DetectConfig(), ModelRegistry(models_dir=models_dir))
    out = {}
    for name in PHOTOS:
        rgb = _load_rgb(faces_dir / name)
        regions = [r for r in detector.detect(rgb) if r.landmarks is not None]
        assert regions, f"no face with landmarks found in {name}"
        best = max(regions, key=lambda r: r.score)
        out[name] = align_face(rgb, best.landmarks)
    return out


@pytest.fixture(scope="module")
def embeddings(
    recognizer: MobileFaceNetRecognizer, aligned_faces: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    emb = recognizer.embed(list(aligned_faces.values()))
    return dict(zip(aligned_faces, emb, strict=True))


def _blur(face: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(face, (0, 0), 8)


def test_embeddings_are_unit_128d(
    recognizer: MobileFaceNetRecognizer, aligned_faces: dict[str, np.ndarray]
) -> None:
    faces = list(aligned_faces.values())
    emb = recognizer.embed(faces)
    assert emb.shape == (len(faces), 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Micro-batching must not change the result.
    small = MobileFaceNetRecognizer(recognizer.weights, batch_size=2).embed(faces)
    np.testing.assert_allclose(small, emb, atol=1e-5)
    assert recognizer.embed([]).shape == (0, 128)


def test_same_person_above_threshold_different_below(embeddings: dict[str, np.ndarray]) -> None:
    def sim(a: str, b: str) -> float:
        return float(embeddings[a] @ embeddings[b])

    thr = MobileFaceNetRecognizer.threshold
    for other in ("obama2.jpg", "obama3.jpg"):
        assert sim("obama.jpg", other) > thr, other
    assert sim("obama2.jpg", "obama3.jpg") > thr
    for other in ("biden.jpg", "grace_hopper.jpg", "astronaut.png"):
        assert sim("obama.jpg", other) < thr, other
    assert sim("biden.jpg", "grace_hopper.jpg") < thr


def test_blurred_face_is_not_verified(
    recognizer: MobileFaceNetRecognizer,
    aligned_faces: dict[str, np.ndarray],
    embeddings: dict[str, np.ndarray],
) -> None:
    blurred = recognizer.embed([_blur(aligned_faces["obama.jpg"])])
    attack = VerificationAttack(recognizer.threshold, recognizer.name)
    attack.update(["obama#0"], embeddings["obama.jpg"][None], blurred)
    result = attack.compute()
    assert result["pairs"] == 1 and result["reidentified"] == 0 and result["rate"] == 0.0
    assert result["similarities"]["max"] < recognizer.threshold
    # The same attack on an unmodified face does re-identify: the threshold is not unreachable.
    attack.update(["obama#1"], embeddings["obama.jpg"][None], embeddings["obama.jpg"][None])
    assert attack.compute()["reidentified"] == 1


def test_identification_on_real_photos(
    recognizer: MobileFaceNetRecognizer,
    aligned_faces: dict[str, np.ndarray],
    embeddings: dict[str, np.ndarray],
) -> None:
    names = list(aligned_faces)
    keys = [face_key(n, 0) for n in names]
    gallery = np.stack([embeddings[n] for n in names])

    clear = IdentificationAttack(recognizer.name)
    clear.update(keys, gallery, gallery)
    result = clear.compute()
    assert result["gallery"] == result["probes"] == len(names)
    assert result["top1"]["rate"] == 1.0 and result["top5"]["rate"] == 1.0

    blurred = recognizer.embed([_blur(aligned_faces[n]) for n in names])
    attack = IdentificationAttack(recognizer.name)
    attack.update(keys, gallery, blurred)
    result = attack.compute()
    # Measured: 1 of 6 blurred faces still ranks its original first (chance is 1/6).
    assert result["top1"]["rate"] <= 0.5
    assert result["top5"]["rate"] >= result["top1"]["rate"]
    lo, hi = result["top1"]["ci95"]
    assert lo <= result["top1"]["rate"] <= hi


# --------------------------------------------------------------------------------------------
# Mergeable state
# --------------------------------------------------------------------------------------------


def _random_unit(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Originals and anonymized versions at a spread of similarities (some above threshold)."""
    orig = _random_unit(rng, n)
    mix = rng.uniform(0, 1, size=(n, 1))
    anon = mix * orig + (1 - mix) * _random_unit(rng, n)
    return [face_key(f"s{i:03d}", i % 2) for i in range(n)], orig, anon


def test_verification_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(1)
    keys, orig, anon = _pairs(rng, 40)
    single = VerificationAttack()
    single.update(keys, orig, anon)
    a, b = VerificationAttack(), VerificationAttack()
    perm = rng.permutation(40)
    a.update([keys[i] for i in perm[:15]], orig[perm[:15]], anon[perm[:15]])
    b.update([keys[i] for i in perm[15:]], orig[perm[15:]], anon[perm[15:]])
    expected = single.compute()
    assert a.merge(b).compute() == expected == b.merge(a).compute()
    assert 0 < expected["reidentified"] < 40
    sims = np.einsum("ij,ij->i", orig, anon) / np.linalg.norm(anon, axis=1)
    assert expected["reidentified"] == int((sims >= single.threshold).sum())
    assert expected["similarities"]["max"] == pytest.approx(sims.max())
    assert single.similarities()[0] == (keys[int(sims.argmax())], pytest.approx(sims.max()))
    with pytest.raises(ValueError, match="overlap"):
        a.merge(a)
    with pytest.raises(ValueError):
        a.merge(VerificationAttack(threshold=0.5))


def test_identification_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(2)
    keys, orig, anon = _pairs(rng, 30)
    single = IdentificationAttack()
    single.update(keys, orig, anon)
    a, b = IdentificationAttack(), IdentificationAttack()
    a.update(keys[10:], orig[10:], anon[10:])
    b.update(keys[:10], orig[:10], anon[:10])
    expected = single.compute()
    assert a.merge(b).compute() == expected == b.merge(a).compute()
    assert a.merge(b).ranks() == single.ranks()
    assert 0 < expected["top1"]["reidentified"] < 30
    assert expected["top1"]["reidentified"] <= expected["top5"]["reidentified"]


def test_state_round_trips_through_json() -> None:
    rng = np.random.default_rng(3)
    keys, orig, anon = _pairs(rng, 12)
    ver, ident = (
        VerificationAttack(0.3, "mobilefacenet"),
        IdentificationAttack("mobilefacenet", ks=(1, 3)),
    )
    ver.update(keys, orig, anon)
    ident.update(keys[:8], orig[:8], anon[:8])
    ident.update(keys[8:], orig[8:])  # gallery-only distractors
    ver2 = VerificationAttack.from_dict(json.loads(json.dumps(ver.to_dict())))
    ident2 = IdentificationAttack.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert ver2.compute() == ver.compute() and ver2.similarities() == ver.similarities()
    assert ident2.compute() == ident.compute() and ident2.ranks() == ident.ranks()
    assert ident2.compute()["gallery"] == 12 and ident2.compute()["probes"] == 8
    empty = VerificationAttack.from_dict(json.loads(json.dumps(VerificationAttack().to_dict())))
    assert empty.compute()["pairs"] == 0 and empty.compute()["ci95"] == [0.0, 1.0]
    with pytest.raises(ValueError):
        IdentificationAttack.from_dict(ver.to_dict())
