"""Pairing real faces with synthetic ones (thesis 6.5.3), and the stage that does it in a run.

Each real face is paired with the pool face nearest to it in the attribute space of
``veil.transforms.pool`` (pose, age, gender, expression, skin tone and lighting) among the pool
faces whose identity is far from it: MobileFaceNet cosine similarity below
``max_identity_similarity``. The thesis pairs by plain nearest neighbour in FaRL space; a
nearest neighbour in attribute space can, by chance, look like the same person, and
anonymizing a face *towards* its own identity would defeat the purpose, hence the constraint.

Search: the attribute vectors are weighted per group (``pool.weights``: a weight w scales that
group's squared distances by w) and indexed with faiss: an exact flat L2 index up to
``exact_below`` faces, an IVF index (inverted lists over k-means cells, ``nprobe`` of them
searched) above. A query looks at its ``k`` nearest faces, keeps those that pass the identity
constraint and are not excluded, and takes the nearest; when none passes it searches 4x wider,
and finally the whole pool exactly, so a face is left unpaired only when no pool face at all
is admissible. ``exclude`` (and ``one_to_one``) give one-to-one assignments.

The identity similarity is computed exactly for every candidate (the 128-d unit vectors of
the pool are in memory), never estimated by the index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.transforms.pool import ATTRIBUTE_FEATURES, ATTRIBUTE_GROUPS, SyntheticPool
from veil.transforms.stage import ModelStage, Resources, Sample, describe_exception, is_quarantined
from veil.transforms.stage import quarantine as quarantine_sample

__all__ = ["Pair", "PairIndex", "PairStage", "DEFAULT_WEIGHTS", "group_weights"]

#: Default weight per attribute group. Pose and expression decide whether a synthetic face can
#: stand in for a real one in the same picture (a profile cannot become a frontal face, a smile
#: a frown); colour keeps skin tone and lighting; age and gender keep the dataset's
#: demographics, which the validation gates check.
DEFAULT_WEIGHTS: dict[str, float] = {"pose": 2.0, "age": 1.0, "gender": 1.0,
                                     "expression": 1.0, "colour": 1.0}
#: Pools up to this size are searched exactly (a flat index: a brute-force scan of 16-d
#: vectors costs well under a millisecond per query at 100,000 faces, see BENCHMARKS.md).
EXACT_BELOW = 200_000


@dataclass(frozen=True)
class Pair:
    """A real face's partner in the pool."""

    pool_index: int
    pool_id: str
    #: Weighted Euclidean distance in attribute space.
    attribute_distance: float
    #: MobileFaceNet cosine similarity between the real face and the pool face.
    identity_similarity: float

    def to_region(self) -> dict[str, Any]:
        """The ``region["pair"]`` record."""
        return {"pool_index": self.pool_index, "pool_id": self.pool_id,
                "distance": round(self.attribute_distance, 5),
                "identity_similarity": round(self.identity_similarity, 5)}


def group_weights(weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Per-coordinate multipliers (sqrt of the group weight) for the attribute vectors."""
    merged = dict(DEFAULT_WEIGHTS)
    for name, value in (weights or {}).items():
        if name not in ATTRIBUTE_GROUPS:
            raise ValueError(f"unknown attribute group {name!r}; choose from "
                             f"{', '.join(ATTRIBUTE_GROUPS)}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {value!r}")
        merged[name] = float(value)
    return np.sqrt(np.array([merged[f.group] for f in ATTRIBUTE_FEATURES], dtype=np.float32))


class PairIndex:
    """Nearest admissible pool face for real faces (see the module docstring)."""

    def __init__(self, pool: SyntheticPool, *, weights: Mapping[str, float] | None = None,
                 exact_below: int = EXACT_BELOW, nprobe: int | None = None) -> None:
        try:
            import faiss
        except ImportError as exc:  # a core dependency; only a broken install lacks it
            raise ImportError("pairing needs faiss: pip install faiss-cpu") from exc
        if len(pool) == 0:
            raise ValueError(f"pool {pool.path} is empty")
        self.pool = pool
        self.scale = group_weights(weights)
        self.vectors = np.ascontiguousarray(pool.attributes * self.scale, dtype=np.float32)
        self.identity = np.ascontiguousarray(pool.identity, dtype=np.float32)
        n, d = self.vectors.shape
        started = time.perf_counter()
        self.exact = n <= exact_below
        if self.exact:
            self.index = faiss.IndexFlatL2(d)
        else:
            # 4 sqrt(n) cells (faiss' guideline), each trained on >= 39 points (faiss' minimum).
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatL2(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist)
            # faiss' k-means draws its initial centroids from a fixed seed (1234), so every
            # worker that builds this index from the same pool gets the same cells.
            self.index.train(self.vectors)
            # An eighth of the cells: recall@1 1.000 at 100,000 faces in BENCHMARKS.md.
            self.index.nprobe = nprobe if nprobe is not None else max(16, nlist // 8)
        self.index.add(self.vectors)
        self.build_seconds = time.perf_counter() - started

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def query(self, attributes: np.ndarray, identities: np.ndarray, *, k: int = 32,
              max_identity_similarity: float = 0.2, exclude: set[int] | None = None,
              one_to_one: bool = False) -> list[Pair | None]:
        """The nearest admissible pool face of each real face, in query order.

        ``attributes`` (M, FEATURE_DIM) from :func:`veil.transforms.pool.attribute_features`,
        ``identities`` (M, 128) unit MobileFaceNet embeddings. A pool face is admissible when
        its identity similarity is below ``max_identity_similarity`` and it is not in
        ``exclude``; with ``one_to_one`` every face paired here is added to the excluded set,
        so no two queries share a partner (greedy, in query order). ``None`` for a face
        no pool face is admissible for.
        """
        q_attr = np.asarray(attributes, dtype=np.float32)
        q_id = np.asarray(identities, dtype=np.float32)
        if q_attr.ndim != 2 or q_attr.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"attributes must be (M, {self.vectors.shape[1]}), got {q_attr.shape}")
        if q_id.ndim != 2 or q_id.shape != (q_attr.shape[0], self.identity.shape[1]):
            raise ValueError(f"identities must be ({q_attr.shape[0]}, {self.identity.shape[1]}), "
                             f"got {q_id.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not (np.isfinite(q_attr).all() and np.isfinite(q_id).all()):
            raise ValueError("attributes and identities must be finite")
        norms = np.linalg.norm(q_id, axis=1, keepdims=True)
        q_id = q_id / np.maximum(norms, 1e-12)
        excluded = set(exclude) if exclude else set()
        q = np.ascontiguousarray(q_attr * self.scale)
        n = len(self)
        out: list[Pair | None] = [None] * len(q)
        todo = list(range(len(q)))
        width = min(k, n)
        while todo:
            if width >= n or (self.exact and width * 4 >= n):
                # The whole pool: exact, whatever the index.
                for i in todo:
                    out[i] = self._best_exact(q[i], q_id[i], max_identity_similarity, excluded)
                    if one_to_one and out[i] is not None:
                        excluded.add(out[i].pool_index)
                break
            dist, idx = self.index.search(q[todo], min(n, width + len(excluded)))
            still: list[int] = []
            for row, i in enumerate(todo):
                if one_to_one and still:
                    # An earlier query needs a wider search: it chooses first, so later ones
                    # wait for the next round (assignment strictly in query order).
                    still.append(i)
                    continue
                found = self._best_of(idx[row], dist[row], q_id[i], max_identity_similarity,
                                      excluded)
                if found is None:
                    still.append(i)
                    continue
                out[i] = found
                if one_to_one:
                    excluded.add(found.pool_index)
            todo = still
            width = min(n, width * 4)
        return out

    def _best_of(self, idx: np.ndarray, dist: np.ndarray, q_id: np.ndarray, threshold: float,
                 excluded: set[int]) -> Pair | None:
        for j, d2 in zip(idx.tolist(), dist.tolist(), strict=True):
            if j < 0 or j in excluded:
                continue
            sim = float(self.identity[j] @ q_id)
            if sim < threshold:
                return Pair(j, self.pool.ids[j], math.sqrt(max(d2, 0.0)), sim)
        return None

    def _best_exact(self, q: np.ndarray, q_id: np.ndarray, threshold: float,
                    excluded: set[int]) -> Pair | None:
        d2 = ((self.vectors - q) ** 2).sum(axis=1)
        sims = self.identity @ q_id
        ok = sims < threshold
        if excluded:
            ok[[j for j in excluded if 0 <= j < len(ok)]] = False
        if not ok.any():
            return None
        candidates = np.flatnonzero(ok)
        # Stable order on ties: the lower pool index wins, as in faiss' flat index.
        j = int(candidates[np.argmin(d2[candidates])])
        return Pair(j, self.pool.ids[j], math.sqrt(max(float(d2[j]), 0.0)), float(sims[j]))


class PairStage(ModelStage):
    """Attaches ``region["pair"]`` (pool_index, pool_id, distance, identity_similarity) to
    every face of a sample, from the original pixels, before anonymization.

    A face with no admissible pool face (every pool face too similar to it, or the pool
    smaller than the faces to pair one-to-one) quarantines its sample: the anonymizer that
    asked for a pool would otherwise work without one. A pool that cannot be loaded fails the
    run in ``setup()``, before any sample is read.
    """

    name = "pair"
    stateful = True
    resources = Resources(cpus=0.5)

    def __init__(self, pool: Any, *, models: dict[str, Any], batch_size: int = 16) -> None:
        #: The ``pool`` config section (``veil.config.PoolConfig``).
        self.pool_config = pool
        self.models = dict(models)
        self.batch_size = batch_size
        self._ready = False

    def setup(self) -> None:
        if self._ready:
            return
        from veil.transforms.models import ModelRegistry
        from veil.transforms.pool import AttributeFeatureModels
        from veil.transforms.recognizers import MobileFaceNetRecognizer

        cfg = self.pool_config
        registry = ModelRegistry(**self.models)
        self._pool = SyntheticPool.load(cfg.path)
        self._index = PairIndex(self._pool, weights=cfg.weights)
        self._recognizer = MobileFaceNetRecognizer.from_registry(registry)
        self._attributes = AttributeFeatureModels.from_registry(registry)
        self._ready = True

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from veil.transforms.fsap import TARGETS_FIELD
        from veil.transforms.pool import arcface_crop

        self.setup()
        cfg = self.pool_config
        faces: list[tuple[int, int]] = []
        crops: list[np.ndarray] = []
        items: list[tuple[np.ndarray, Mapping[str, Any]]] = []
        for i, sample in enumerate(batch):
            if is_quarantined(sample):
                continue
            started = time.perf_counter()
            try:
                rgb = sample["_pixels"]
                for r, region in enumerate(sample.get("regions") or []):
                    crops.append(arcface_crop(rgb, region))
                    items.append((rgb, region))
                    faces.append((i, r))
            except Exception as exc:  # noqa: BLE001 - failures are data
                quarantine_sample(sample, f"pair_error: {describe_exception(exc)}")
            _add_time(sample, self.name, time.perf_counter() - started)
        faces_ok = [(f, c, it) for f, c, it in zip(faces, crops, items, strict=True)
                    if not is_quarantined(batch[f[0]])]
        if not faces_ok:
            return batch
        started = time.perf_counter()
        try:
            identities = self._recognizer.embed([c for _, c, _ in faces_ok])
            attributes = self._attributes.features_of([it for _, _, it in faces_ok])
            pairs = self._index.query(attributes, identities, k=cfg.k,
                                      max_identity_similarity=cfg.max_identity_similarity)
        except Exception as exc:  # noqa: BLE001 - the batch failed: quarantine its samples
            for (i, _r), _, _ in faces_ok:
                quarantine_sample(batch[i], f"pair_error: {describe_exception(exc)}")
            return batch
        share = (time.perf_counter() - started) / len(faces_ok)
        for ((i, r), _, _), pair in zip(faces_ok, pairs, strict=True):
            sample = batch[i]
            _add_time(sample, self.name, share)
            if is_quarantined(sample):
                continue
            if pair is None:
                quarantine_sample(sample, f"no_synthetic_pair: face {r}: every one of the "
                                          f"{len(self._pool)} pool faces has identity similarity "
                                          f">= {cfg.max_identity_similarity} to it; use a larger "
                                          f"pool or raise pool.max_identity_similarity")
                continue
            sample["regions"][r]["pair"] = pair.to_region()
            # FSAP moves a paired face towards its partner's identity (the pair is the identity
            # target, as a pseudo-identity's pool face is); a target set earlier wins.
            targets = sample.setdefault(TARGETS_FIELD, {})
            targets.setdefault(r, self._pool.identity[pair.pool_index].astype(np.float32))
        return batch


def _add_time(sample: Sample, stage: str, seconds: float) -> None:
    timings = sample.setdefault("timings", {})
    timings[stage] = timings.get(stage, 0.0) + seconds



#: What of a region's ``pair`` / ``target`` record may leave the run (manifest, report): the
#: pairing distance and the opaque pseudo-identity. Which pool face a real face was paired
#: with is not released: with the pool at hand it is the starting point of the synthesis (and
#: for pseudo-identities the real-cluster -> synthetic-identity mapping), which helps an
#: attacker undo it; the identity similarity is a measurement of the real face.
PUBLIC_PAIR_FIELDS = {"pair": ("distance",), "target": ("pseudo_id", "distance")}


def public_region(region: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``region`` with its ``pair`` and ``target`` records cut to
    :data:`PUBLIC_PAIR_FIELDS` (other fields unchanged)."""
    out = dict(region)
    for name, keep in PUBLIC_PAIR_FIELDS.items():
        record = out.get(name)
        if isinstance(record, Mapping):
            out[name] = {k: record[k] for k in keep if k in record}
    return out
