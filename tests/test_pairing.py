"""Pairing real faces with pool faces (veil.transforms.pairing)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from helpers import face_photo, jpeg_bytes, write_tar

from veil.transforms.pairing import (
    DEFAULT_WEIGHTS,
    Pair,
    PairIndex,
    PairStage,
    group_weights,
    public_region,
)
from veil.transforms.pool import ATTRIBUTE_FEATURES, FEATURE_DIM, POOL_FORMAT, SyntheticPool


def make_pool(root, attributes: np.ndarray, identity: np.ndarray) -> SyntheticPool:
    """A pool folder holding the given vectors (grey placeholder images): pairing only reads
    the vectors, so hand-set ones make every expected pair exact."""
    from veil.transforms.pool import _png, _write_pool

    n = len(attributes)
    identity = identity / np.linalg.norm(identity, axis=1, keepdims=True)
    png = _png(np.full((8, 8, 3), 128, np.uint8))
    rows = {
        "id": [f"syn-{i:04d}" for i in range(n)], "image": [png] * n,
        "landmarks": [np.zeros(10, np.float32)] * n, "box": [np.zeros(4, np.float32)] * n,
        "identity": list(identity.astype(np.float32)),
        "attributes": list(np.asarray(attributes, np.float32)),
        "score": [1.0] * n, "source": [f"test:{i}" for i in range(n)],
    }
    meta = {"format": POOL_FORMAT, "count": n, "crop_size": 8,
            "features": [{"name": f.name} for f in ATTRIBUTE_FEATURES]}
    _write_pool(root, rows, meta, contact_sheet=False)
    return SyntheticPool.load(root)


def unit(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def brute_force(attributes, identity, scale, q_attr, q_id, threshold, excluded=()):
    """The definition, written out: nearest admissible pool face by weighted distance."""
    d = np.sqrt((((attributes - q_attr) * scale) ** 2).sum(axis=1))
    sims = identity @ q_id
    best = None
    for j in np.argsort(d, kind="stable"):
        if sims[j] < threshold and j not in excluded:
            best = int(j)
            break
    return best


def test_nearest_neighbour_with_the_same_identity_is_skipped(tmp_path):
    rng = np.random.default_rng(0)
    me = unit(rng, 1)[0]
    attrs = np.zeros((6, FEATURE_DIM), np.float32)
    for i in range(6):
        attrs[i, 0] = i  # pool face i is i units of roll away from the query
    identity = unit(rng, 6)
    identity -= np.outer(identity @ me, me)  # orthogonal to me: similarity 0
    identity[0] = me + 0.1 * identity[0]  # nearest in attributes, nearly my identity
    identity[1] = me + 0.5 * identity[1]  # second nearest: still similar (~0.9)
    pool = make_pool(tmp_path / "pool", attrs, identity)
    index = PairIndex(pool)
    sims = pool.identity @ me
    assert sims[0] > 0.99 and 0.5 < sims[1] < 0.99 and np.abs(sims[2:]).max() < 1e-5
    # k=1 only sees face 0 at first: the search must widen to find face 2.
    [pair] = index.query(np.zeros((1, FEATURE_DIM)), me[None], k=1, max_identity_similarity=0.3)
    assert pair == Pair(2, "syn-0002", pytest.approx(2 * np.sqrt(DEFAULT_WEIGHTS["pose"])),
                        pytest.approx(float(sims[2]), abs=1e-5))
    # A looser threshold admits face 1, a stricter one nothing at all.
    [pair] = index.query(np.zeros((1, FEATURE_DIM)), me[None], k=1, max_identity_similarity=0.99)
    assert pair.pool_index == 1
    assert index.query(np.zeros((1, FEATURE_DIM)), me[None], k=4,
                       max_identity_similarity=-0.5) == [None]


def test_exclude_and_one_to_one(tmp_path):
    rng = np.random.default_rng(1)
    attrs = np.zeros((5, FEATURE_DIM), np.float32)
    attrs[:, 3] = np.arange(5)  # age axis: face i is i units away
    pool = make_pool(tmp_path / "pool", attrs, unit(rng, 5))
    index = PairIndex(pool)
    q_id = unit(rng, 3)
    q = np.zeros((3, FEATURE_DIM), np.float32)
    loose = {"k": 2, "max_identity_similarity": 1.01}
    assert [p.pool_index for p in index.query(q, q_id, **loose)] == [0, 0, 0]
    assert [p.pool_index for p in index.query(q, q_id, exclude={0, 1}, **loose)] == [2, 2, 2]
    assert [p.pool_index for p in index.query(q, q_id, one_to_one=True, **loose)] == [0, 1, 2]
    out = index.query(q, q_id, exclude={0, 1, 2}, one_to_one=True, **loose)
    assert [p.pool_index if p else None for p in out] == [3, 4, None]


def test_one_to_one_assigns_in_query_order_even_when_a_search_widens(tmp_path):
    rng = np.random.default_rng(4)
    me, other = unit(rng, 2)
    attrs = np.zeros((5, FEATURE_DIM), np.float32)
    attrs[:, 3] = np.arange(5)
    identity = unit(rng, 5)
    identity -= np.outer(identity @ me, me)
    identity[:2] = me  # faces 0 and 1 are the first query's own identity
    index = PairIndex(make_pool(tmp_path / "pool", attrs, identity))
    q = np.zeros((2, FEATURE_DIM), np.float32)
    q[1, 3] = 2.0  # the second query sits on face 2, the first one's nearest admissible face
    first, second = index.query(q, np.stack([me, other]), k=1, max_identity_similarity=0.5,
                                one_to_one=True)
    assert first.pool_index == 2 and second.pool_index in (1, 3)


def test_faiss_agrees_with_brute_force_and_ivf_with_exact(tmp_path):
    rng = np.random.default_rng(2)
    n = 3000
    attrs = rng.normal(size=(n, FEATURE_DIM)).astype(np.float32)
    identity = unit(rng, n, 16)  # low-dimensional identities: many pool faces are too similar
    pool = make_pool(tmp_path / "pool", attrs, identity)
    weights = {"pose": 3.0, "colour": 0.5}
    exact = PairIndex(pool, weights=weights)
    assert exact.exact
    q_attr = rng.normal(size=(60, FEATURE_DIM)).astype(np.float32)
    q_id = np.concatenate([identity[:30] + 0.05 * unit(rng, 30, 16), unit(rng, 30, 16)])
    q_id /= np.linalg.norm(q_id, axis=1, keepdims=True)
    got = exact.query(q_attr, q_id, k=8, max_identity_similarity=0.2)
    scale = group_weights(weights)
    want = [brute_force(pool.attributes, pool.identity, scale, a, i, 0.2)
            for a, i in zip(q_attr, q_id, strict=True)]
    assert [p.pool_index for p in got] == want
    for p, a, i in zip(got, q_attr, q_id, strict=True):
        assert p.identity_similarity < 0.2
        assert p.identity_similarity == pytest.approx(float(pool.identity[p.pool_index] @ i),
                                                      abs=1e-5)
        assert p.attribute_distance == pytest.approx(
            float(np.linalg.norm((pool.attributes[p.pool_index] - a) * scale)), rel=1e-4)
    # The approximate (IVF) index: searching every cell is exact, the default nearly so.
    ivf_all = PairIndex(pool, weights=weights, exact_below=100, nprobe=10_000)
    assert not ivf_all.exact
    assert [p.pool_index for p in ivf_all.query(q_attr, q_id, k=8,
                                                max_identity_similarity=0.2)] == want
    ivf = PairIndex(pool, weights=weights, exact_below=100)
    approx = ivf.query(q_attr, q_id, k=8, max_identity_similarity=0.2)
    assert all(p.identity_similarity < 0.2 for p in approx)
    assert np.mean([p.pool_index == w for p, w in zip(approx, want, strict=True)]) >= 0.8


def test_group_weights():
    scale = group_weights({"pose": 4.0, "colour": 0.0})
    groups = [f.group for f in ATTRIBUTE_FEATURES]
    assert all(s == 2.0 for s, g in zip(scale, groups, strict=True) if g == "pose")
    assert all(s == 0.0 for s, g in zip(scale, groups, strict=True) if g == "colour")
    assert all(s == 1.0 for s, g in zip(scale, groups, strict=True) if g == "age")
    with pytest.raises(ValueError, match="unknown attribute group"):
        group_weights({"hair": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        group_weights({"pose": -1.0})


def test_bad_queries_are_errors(tmp_path):
    rng = np.random.default_rng(3)
    index = PairIndex(make_pool(tmp_path / "pool", rng.normal(size=(4, FEATURE_DIM)),
                                unit(rng, 4)))
    with pytest.raises(ValueError, match="attributes must be"):
        index.query(np.zeros((1, 3)), unit(rng, 1))
    with pytest.raises(ValueError, match="identities must be"):
        index.query(np.zeros((2, FEATURE_DIM)), unit(rng, 1))
    with pytest.raises(ValueError, match="finite"):
        index.query(np.full((1, FEATURE_DIM), np.nan), unit(rng, 1))


def test_public_region_keeps_only_distance_and_pseudo_id():
    region = {"box": [0, 0, 10, 10], "score": 0.9,
              "pair": {"pool_index": 3, "pool_id": "syn-x", "distance": 1.5,
                       "identity_similarity": 0.01},
              "target": {"pool_index": 3, "pool_id": "syn-x", "pseudo_id": "p-7",
                         "distance": 2.0}}
    public = public_region(region)
    assert public["pair"] == {"distance": 1.5}
    assert public["target"] == {"pseudo_id": "p-7", "distance": 2.0}
    assert public["box"] == region["box"] and region["pair"]["pool_id"] == "syn-x"


@pytest.fixture(scope="module")
def real_pool(tmp_path_factory, models_dir):
    import torch

    from veil.transforms.models import ModelRegistry
    from veil.transforms.pool import build_pool

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    try:
        yield build_pool("dcgan-celeba32", 8, tmp_path_factory.mktemp("pool") / "p", seed=5,
                         registry=ModelRegistry(models_dir=str(models_dir)), contact_sheet=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_pair_stage_pairs_real_faces_and_quarantines_when_none_fits(real_pool, faces_dir):
    import torch

    from veil.config import DetectConfig, PoolConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    detector = build_detector(DetectConfig(), ModelRegistry())
    batch = []
    for name in ("obama.jpg", "grace_hopper.jpg"):
        rgb = face_photo(faces_dir, name, 320)
        batch.append({"__key__": name, "status": "pending", "_pixels": rgb,
                      "regions": [r.to_dict() for r in detector.detect(rgb)]})
    batch.append({"__key__": "bad", "status": "quarantined", "reason": "x", "_pixels": None})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = PairStage(PoolConfig(path=str(real_pool.path)), models={})
        out = stage.process_batch([dict(s, regions=[dict(r) for r in s.get("regions") or []])
                                   for s in batch])
        strict = PairStage(PoolConfig(path=str(real_pool.path), max_identity_similarity=-0.9),
                           models={})
        refused = strict.process_batch([dict(batch[0], regions=[dict(r) for r in
                                                                batch[0]["regions"]])])
    finally:
        torch.set_num_threads(threads)
    assert [s["status"] for s in out] == ["pending", "pending", "quarantined"]
    for sample in out[:2]:
        assert sample["regions"]
        for region in sample["regions"]:
            pair = region["pair"]
            assert real_pool.ids[pair["pool_index"]] == pair["pool_id"]
            assert pair["identity_similarity"] < 0.2 and pair["distance"] > 0
    assert refused[0]["status"] == "quarantined"
    assert refused[0]["reason"].startswith("no_synthetic_pair: face 0")


@pytest.mark.slow
def test_run_with_a_synthetic_pool_keeps_pool_ids_out_of_the_manifest(real_pool, faces_dir,
                                                                       tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from veil.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shard = tmp_path / "in" / "photos-0000.tar"
    shard.parent.mkdir()
    write_tar(shard, [("obama", {"jpg": jpeg_bytes(face_photo(faces_dir, "obama.jpg", 320))})])
    started = time.perf_counter()
    rc = main(["run", "--input", str(shard), "--output", str(tmp_path / "out"), "--runner",
               "local", "--method", "blur", "--synthetic-pool", str(real_pool.path),
               "--no-progress"])
    assert rc == 0, f"run failed after {time.perf_counter() - started:.1f} s"
    [row] = pq.read_table(tmp_path / "out" / "manifest" / "photos-0000.tar.parquet").to_pylist()
    assert row["status"] == "anonymized"
    # Faces the re-scan found again (strengthened blur) are the same face, not paired again.
    regions = [r for r in json.loads(row["regions"]) if not r.get("redetected")]
    assert regions and all(set(r["pair"]) == {"distance"} for r in regions)
    assert "syn-" not in row["regions"]
