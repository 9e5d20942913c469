"""Pseudo-identities, unit tier: clustering, target assignment, the pass-2 stage, the FSAP
target term and the consistency rates. Hand-set vectors and tiny models; the real-photo
tier is tests/test_pseudo_identities.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from veil.config import ConfigError, PseudoIdentityConfig, RunConfig
from veil.transforms.identities import (
    FACES_FIELD,
    FaceVectors,
    PoolExhaustedError,
    PseudoIdentityStage,
    assign_targets,
    build_assignment,
    cluster_identities,
    collect_faces,
)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _people(rng: np.random.Generator, n_people: int, per_person: int, *, spread: float = 0.25
            ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``n_people`` well-separated people, ``per_person`` noisy views each,
    in a shuffled order; returns (embeddings, true person of each row)."""
    centres = _unit(rng.normal(size=(n_people, 128)))
    person = np.repeat(np.arange(n_people), per_person)
    rng.shuffle(person)
    emb = _unit(centres[person] + spread * rng.normal(size=(len(person), 128)) / np.sqrt(128))
    return emb, person


def test_clustering_recovers_people_and_numbers_clusters_by_first_appearance():
    rng = np.random.default_rng(0)
    emb, person = _people(rng, 5, 6)
    labels = cluster_identities(emb, similarity=0.4)
    # one cluster per person, and every person in exactly one cluster
    assert len(set(labels)) == 5
    for p in range(5):
        assert len(set(labels[person == p])) == 1
    # labels are numbered by first appearance: 0 first, then each new label is the next one
    seen: list[int] = []
    for label in labels:
        if label not in seen:
            seen.append(int(label))
    assert seen == list(range(5))
    # deterministic: the same rows give the same labels
    assert np.array_equal(labels, cluster_identities(emb.copy(), similarity=0.4))


def test_clustering_threshold_decides_merge_and_edge_cases():
    a = _unit(np.array([1.0, 0.0, 0.0]))
    b = _unit(np.array([0.8, 0.6, 0.0]))  # cosine 0.8 with a
    c = _unit(np.array([0.0, 0.0, 1.0]))  # cosine 0 with both
    x = np.stack([a, b, c])
    assert cluster_identities(x, similarity=0.7).tolist() == [0, 0, 1]
    assert cluster_identities(x, similarity=0.9).tolist() == [0, 1, 2]
    assert cluster_identities(x[:1], similarity=0.5).tolist() == [0]
    assert cluster_identities(np.zeros((0, 3)), similarity=0.5).tolist() == []
    with pytest.raises(ValueError, match="shape"):
        cluster_identities(np.zeros(3), similarity=0.5)


def test_average_linkage_does_not_chain_two_people_through_one_face():
    """A face halfway between two people (similar to both at ~0.7) must not merge them:
    single linkage would chain all of them into one cluster, average linkage does not."""
    a = _unit(np.array([1.0, 0.0, 0.0, 0.0]))
    b = _unit(np.array([0.0, 1.0, 0.0, 0.0]))
    mid = _unit(a + b)
    x = np.stack([a, a * 0.99 + 0.01 * b, mid, b, b * 0.99 + 0.01 * a])
    labels = cluster_identities(_unit(x), similarity=0.6)
    assert labels[0] == labels[1] and labels[3] == labels[4]
    assert labels[0] != labels[3]


@dataclass
class _Pool:
    """The attributes of a SyntheticPool that pairing reads."""

    identity: np.ndarray
    attributes: np.ndarray
    path: Path = Path("tiny-pool")

    @property
    def ids(self) -> list[str]:
        return [f"syn-{i:03d}" for i in range(len(self.identity))]

    def __len__(self) -> int:
        return len(self.identity)


def _faces(emb: np.ndarray, attrs: np.ndarray) -> list[FaceVectors]:
    return [FaceVectors(shard="s", key=f"k{i}", index=i, face=0, box=(0.0, 0.0, 50.0, 50.0),
                        identity=emb[i], attributes=attrs[i]) for i in range(len(emb))]


def _pool_and_people(seed: int = 1, n_pool: int = 40):
    from veil.transforms.pool import FEATURE_DIM

    rng = np.random.default_rng(seed)
    emb, person = _people(rng, 3, 4)
    attrs = rng.normal(size=(len(emb), FEATURE_DIM)).astype(np.float32)
    pool = _Pool(identity=_unit(rng.normal(size=(n_pool, 128))),
                 attributes=rng.normal(size=(n_pool, FEATURE_DIM)).astype(np.float32))
    return emb, person, attrs, pool


def test_every_cluster_gets_its_own_admissible_target():
    emb, person, attrs, pool = _pool_and_people()
    faces = _faces(emb, attrs)
    labels = cluster_identities(emb, similarity=0.4)
    targets = assign_targets(faces, labels, pool, max_identity_similarity=0.2, candidates=4)
    assert [t.pseudo_id for t in targets] == ["pid-000001", "pid-000002", "pid-000003"]
    assert len({t.pool_index for t in targets}) == 3, "no two people share a synthetic identity"
    for c, target in enumerate(targets):
        members = emb[labels == c]
        assert float((members @ pool.identity[target.pool_index]).max()) < 0.2
        assert target.identity_similarity < 0.2
        assert np.allclose(target.embedding, pool.identity[target.pool_index], atol=1e-6)
    # targets are far from each other too (look-alike targets would merge two people)
    t = np.stack([x.embedding for x in targets])
    assert float((t @ t.T - 2 * np.eye(3)).max()) < 0.2


def test_a_candidate_too_close_to_a_member_is_skipped():
    """The nearest pool face in attribute space resembles one member of the cluster: it must
    not be taken, however close its attributes are."""
    emb, person, attrs, pool = _pool_and_people(seed=3)
    labels = cluster_identities(emb, similarity=0.4)
    member = emb[labels == 0][-1]  # not the mean: only the per-member check catches it
    pool.identity[0] = member
    pool.attributes[0] = attrs[labels == 0].mean(0)  # exactly the cluster's mean attributes
    targets = assign_targets(_faces(emb, attrs), labels, pool, max_identity_similarity=0.3, candidates=2)
    assert targets[0].pool_index != 0


def test_pool_too_small_or_all_too_similar_is_a_clear_error():
    emb, person, attrs, pool = _pool_and_people(n_pool=2)
    labels = cluster_identities(emb, similarity=0.4)
    with pytest.raises(PoolExhaustedError, match="larger pool"):
        assign_targets(_faces(emb, attrs), labels, pool, max_identity_similarity=0.2, candidates=4)
    emb, person, attrs, pool = _pool_and_people(n_pool=6)
    pool.identity[:] = emb[0]  # every pool face is person 0
    with pytest.raises(PoolExhaustedError, match="below identity similarity"):
        assign_targets(_faces(emb, attrs), labels, pool, max_identity_similarity=0.2, candidates=4)


def test_assignment_is_deterministic_and_attached_only_at_the_same_place():
    emb, person, attrs, pool = _pool_and_people()
    faces = _faces(emb, attrs)
    config = PseudoIdentityConfig(enabled=True, pool="x", max_identity_similarity=0.2)
    a1 = build_assignment(faces, pool, config)
    a2 = build_assignment(list(faces), pool, config)
    assert {k: (b, t.pseudo_id, t.pool_index) for k, (b, t) in a1.faces.items()} == \
           {k: (b, t.pseudo_id, t.pool_index) for k, (b, t) in a2.faces.items()}
    summary = a1.summary()
    assert summary == {"faces": 12, "pseudo_identities": 3,
                       "faces_per_identity": {"max": 4, "multi": 3}}
    assert "pool" not in str(summary)

    from veil.transforms.fsap import TARGETS_FIELD

    stage = PseudoIdentityStage(a1)
    box = [0.0, 0.0, 50.0, 50.0]
    samples = [
        {"__key__": "k0", "__shard__": "s", "status": "pending", "regions": [{"box": box}]},
        # the same key, but the face moved: no target, and the region says why
        {"__key__": "k1", "__shard__": "s", "status": "pending", "regions": [{"box": [5.0, 0, 55, 50]}]},
        {"__key__": "k2", "__shard__": "s", "status": "quarantined", "regions": [{"box": box}]},
        {"__key__": "zz", "__shard__": "s", "status": "pending", "regions": [{"box": box}]},
    ]
    out = stage.process_batch(samples)
    target = out[0]["regions"][0]["target"]
    assert set(target) == {"pool_index", "pool_id", "pseudo_id", "distance"}
    assert target["pseudo_id"] == a1.faces[("s", "k0", 0)][1].pseudo_id
    assert np.array_equal(out[0][TARGETS_FIELD][0], a1.faces[("s", "k0", 0)][1].embedding)
    assert "target" not in out[1]["regions"][0] and "unmatched" in out[1]["regions"][0]["pseudo"]
    assert "target" not in out[2]["regions"][0] and TARGETS_FIELD not in out[2]
    assert "target" not in out[3]["regions"][0]


def test_the_manifest_keeps_only_the_pseudo_id_and_distance():
    from veil.pipelines.manifest import manifest_row

    region = {"box": [0, 0, 50, 50], "target": {"pool_index": 7, "pool_id": "syn-007",
                                                 "pseudo_id": "pid-000001", "distance": 0.5}}
    row = manifest_row({"__key__": "k", "__shard__": "s", "status": "anonymized", "regions": [region],
                        "_pseudo_targets": {0: np.ones(128, np.float32)}})
    assert '"target":{"distance":0.5,"pseudo_id":"pid-000001"}' in row["regions"]
    assert "syn-007" not in str(row) and "pool_index" not in str(row)


def test_collect_faces_orders_by_shard_index_and_face():
    def record(shard, key, index, faces):
        return {"__shard__": shard, "__key__": key, "__index__": index, "status": "clean",
                FACES_FIELD: [{"face": f, "box": [0, 0, 1, 1], "identity": np.ones(4) * f,
                               "attributes": None} for f in faces]}

    faces = collect_faces([record("b", "x", 0, [0]), record("a", "y", 1, [1, 0]),
                           record("a", "z", 0, [0]), {"__shard__": "a", "__key__": "q", "status": "quarantined"}])
    assert [(f.shard, f.key, f.face) for f in faces] == [("a", "z", 0), ("a", "y", 0), ("a", "y", 1), ("b", "x", 0)]


def test_config_needs_a_synthesis_method_and_a_pool():
    with pytest.raises(ConfigError, match="replaces identities"):
        RunConfig(pseudo={"enabled": True, "pool": "p"})
    with pytest.raises(ConfigError, match="synthetic pool"):
        RunConfig(pseudo={"enabled": True}, anonymize={"method": "fsap"})
    cfg = RunConfig(pseudo={"enabled": True}, pool={"path": "p"}, anonymize={"method": "fsap"})
    assert cfg.pseudo.pool == "p"
    from veil.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--input", "in.tar", "--output", "/tmp/veil-out-x",
                                      "--method", "fsap", "--pseudo-identities", "--synthetic-pool", "p"])
    cfg = config_from_args(args)
    assert cfg.pseudo.enabled and cfg.pseudo.pool == "p"


# ------------------------------------------------------------------------- FSAP target term


@pytest.fixture
def one_thread():
    """One torch thread, as FSAP on CPU runs: on a loaded 2-core machine torch's thread pool
    spends most of its CPU time waiting for its own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_optimizer(models_dir: Path, **cfg):
    """A random tiny autoencoder and the real MobileFaceNet (a random one is nearly constant,
    so no similarity would move)."""
    import torch

    from veil.config import FSAPConfig
    from veil.transforms.fsap import FSAPOptimizer
    from veil.transforms.latent import TinyAutoencoder
    from veil.transforms.models import load_torch_state_dict
    from veil.transforms.recognizers import _mobilefacenet_class

    torch.manual_seed(0)
    rec = _mobilefacenet_class()()
    rec.load_state_dict(load_torch_state_dict(models_dir / "mobilefacenet_ms1m.pt"))
    rec.eval().requires_grad_(False)
    ae = TinyAutoencoder.random(latent_channels=4, seed=0)
    config = FSAPConfig(**{"weight_lpips": 0.0, **cfg})
    return FSAPOptimizer(ae, rec, None, config, "cpu")


def test_fsap_without_targets_is_bit_identical_and_a_target_pulls_towards_it(models_dir, one_thread):
    crops = np.random.default_rng(4).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    opt = _tiny_optimizer(models_dir, steps=4, tau=-0.99, lambda_id=0.3)
    plain = opt.optimise(crops)
    nan_targets = opt.optimise(crops, targets=np.full((2, 128), np.nan, np.float32))
    assert np.array_equal(plain.crops, nan_targets.crops)
    assert [f.iterations for f in plain.faces] == [f.iterations for f in nan_targets.faces]
    assert all(f.target_similarity is None for f in plain.faces)

    import torch

    with torch.no_grad():
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        start = opt.embed(x).numpy()
    goal = _unit(np.random.default_rng(5).normal(size=(1, 128)))[0]
    targets = np.stack([goal, np.full(128, np.nan, np.float32)])
    pulled = opt.optimise(crops, targets=targets)
    assert pulled.faces[1].target_similarity is None
    # face 1 has no target: the target term of face 0 does not touch it
    assert np.allclose(pulled.crops[1], plain.crops[1], atol=1e-3)
    with torch.no_grad():
        after = opt.embed((x + torch.from_numpy(pulled.crops).permute(0, 3, 1, 2) / 255.0).clamp(0, 1)).numpy()
        after_plain = opt.embed((x + torch.from_numpy(plain.crops).permute(0, 3, 1, 2) / 255.0).clamp(0, 1)).numpy()
    assert float(after[0] @ goal) > float(start[0] @ goal)
    assert float(after[0] @ goal) > float(after_plain[0] @ goal)
    assert pulled.faces[0].target_similarity == pytest.approx(float(after[0] @ goal), abs=0.05)


def test_fsap_target_stopping_rule_needs_both_conditions(models_dir, one_thread):
    crops = np.random.default_rng(6).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    goal = _unit(np.random.default_rng(7).normal(size=(1, 128)))
    # the plain rule stops as soon as the similarity to the original is below tau
    plain = _tiny_optimizer(models_dir, steps=6, tau=0.999, lambda_id=0.3).optimise(crops).faces[0]
    assert plain.stopped and plain.iterations < 6
    # with a target level it cannot reach, the face keeps going until the budget
    opt = _tiny_optimizer(models_dir, steps=6, tau=0.999, lambda_id=0.3, target_similarity=0.99)
    out = opt.optimise(crops, targets=goal).faces[0]
    assert out.iterations == 6 and not out.stopped and out.target_similarity < 0.99
    assert out.similarity < 0.999  # the first condition was met long before
    # a level already met stops it like the plain rule
    opt = _tiny_optimizer(models_dir, steps=6, tau=0.999, lambda_id=0.3, target_similarity=-1.0)
    met = opt.optimise(crops, targets=goal).faces[0]
    assert met.stopped and met.iterations < 6
    with pytest.raises(ValueError, match="rows"):
        opt.optimise(crops, targets=np.zeros((2, 128), np.float32))


# ------------------------------------------------------------------------- consistency rates


def test_pair_rates_count_same_and_different_pairs():
    from veil.validators.consistency import pair_rates

    # two pseudo-people (a: 3 faces, b: 1); dlib-like Euclidean threshold 0.6
    e = np.eye(4)
    released = np.stack([e[0], e[0] + 0.1 * e[1], e[0] * 0.0 + e[2], e[3]])  # a2 drifted away
    original = np.stack([e[1], e[1], e[1], e[0]])  # b's original is where a's releases are
    rates = pair_rates(["a", "a", "a", "b"], released, original, metric="euclidean", threshold=0.6)
    assert rates["same_pairs"] == 3 and rates["different_pairs"] == 3
    assert rates["consistency_rate"] == pytest.approx(1 / 3)  # only (a0, a1) match
    assert rates["separation_rate"] == 1.0
    assert rates["real_match_rate"] == 0.0  # a's releases are near b's original, not a's own
    assert rates["original_consistency_rate"] == 1.0
    cos = pair_rates(["a", "b"], np.stack([e[0], e[0]]), np.stack([e[0], e[1]]), metric="cosine",
                     threshold=0.5)
    assert cos["separation_rate"] == 0.0 and cos["real_match_rate"] == 0.5
    assert cos["consistency_rate"] is None
