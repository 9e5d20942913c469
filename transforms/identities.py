"""Consistent pseudo-identities: one synthetic identity per real person, across a dataset.

A dataset often shows one person many times. Anonymizing each photo on its own gives that
person forty unrelated faces; ``--pseudo-identities`` gives them one synthetic person instead,
so "these forty images show one person" survives while the person does not. Three steps:

1. **Embed** (pass 1, :class:`IdentityEmbedStage`, run by the same runner as the run):
   decode, detect, and per face an L2-normalised MobileFaceNet embedding of the ArcFace-aligned
   crop plus the pool's attribute features. Only these small vectors leave the workers; no
   pixel does.
2. **Cluster** (:func:`cluster_identities`, in the driver): agglomerative clustering with
   average linkage on cosine distance (SciPy's ``linkage``/``fcluster``), cut at
   ``pseudo.cluster_similarity`` (O(N^2) memory in the faces: about 4 GB at 30,000 faces).
   Average linkage rather than single: one blurred photo that happens to resemble two people
   cannot chain their clusters together. The result depends only on the embeddings and their
   order, which is fixed (shard id, sample index, face index), so a resumed run clusters
   exactly as the first one did.
3. **Assign** (:func:`assign_targets`): each cluster, in order of first appearance, gets the
   nearest pool face in attribute space (the pool's :class:`~veil.transforms.pairing.PairIndex`)
   whose identity similarity to *every* member is below ``pseudo.max_identity_similarity``
   and that no earlier cluster took, so two real people never share a synthetic one.

Pass 2 (the normal run) attaches ``region["target"] = {pool_index, pool_id, pseudo_id,
distance}`` to each clustered face (:class:`PseudoIdentityStage`, before the anonymizer) and
the target's embedding in a working field FSAP reads; FSAP then moves every face of a cluster
away from the real person and towards the same synthetic one.

What is never written: real embeddings and the cluster -> synthetic face mapping stay in the
driver's memory and the stage objects. The manifest keeps, per face, only the opaque
``pseudo_id`` and the pairing distance (:func:`public_region` is applied to every manifest
row, ``veil.transforms.pairing.public_region``). ``pseudo_id`` is ``pid-<n>``, numbered in order of the cluster's first appearance in the
dataset: that order can be read off the release itself (where each pseudo-person first
appears), so the id carries no information beyond what the release already shows; not
derived from the real person, the pool face or its position in the pool, and identical on a
resumed run (an HMAC with a per-run secret would be unlinkable too, but a resume would then
number the same person differently in old and new shards).

Faces whose longer box side is below ``pseudo.min_face`` are not clustered: a recognizer
cannot judge them, the anonymizer obscures them with its fallback, and they get no pseudo id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.config import PseudoIdentityConfig
from veil.transforms.stage import (
    CLEAN,
    QUARANTINED,
    ModelStage,
    Resources,
    Sample,
    Stage,
    describe_exception,
    is_quarantined,
    quarantine,
)

#: Field of a pass-1 sample holding its faces' vectors (list of dicts, see IdentityEmbedStage).
FACES_FIELD = "identity_faces"
#: Largest distance (pixels, any coordinate) between a face's box in pass 1 and in pass 2 for
#: the two to be the same detection. Detection is deterministic, so they agree exactly; the
#: tolerance only absorbs float formatting.
BOX_TOLERANCE = 0.5


# ------------------------------------------------------------------------------ pass 1: embed


@dataclass(frozen=True)
class FaceVectors:
    """One face seen by pass 1: where it is and its vectors (never written anywhere)."""

    shard: str
    key: str
    index: int
    face: int
    box: tuple[float, float, float, float]
    identity: np.ndarray
    attributes: np.ndarray | None

    @property
    def order(self) -> tuple[str, int, str, int]:
        return (self.shard, self.index, self.key, self.face)


def face_side(region: Mapping[str, Any]) -> float:
    x0, y0, x1, y1 = (float(v) for v in region["box"])
    return max(x1 - x0, y1 - y0)


class IdentityEmbedStage(ModelStage):
    """Pass 1's last stage: per face, the recognizer embedding and the pool's attribute
    features. Each sample leaves as a small record (key, shard, index, status and
    ``identity_faces``): pixels and image bytes stay in the worker."""

    name = "identity_embed"
    stateful = True

    def __init__(self, config: PseudoIdentityConfig, *, models: dict[str, Any],
                 attributes: bool = True, batch_size: int = 16) -> None:
        self.config = config
        self.models = models
        self.attributes = attributes
        self.batch_size = batch_size
        self.resources = Resources(cpus=1.0)
        self._ready = False

    def setup(self) -> None:
        if self._ready:
            return
        from veil.transforms.models import ModelRegistry
        from veil.transforms.recognizers import MobileFaceNetRecognizer

        self._registry = ModelRegistry(**self.models)
        self._recognizer = MobileFaceNetRecognizer.from_registry(self._registry)
        self._attribute_models = None
        if self.attributes:
            from veil.transforms.pool import AttributeFeatureModels

            self._attribute_models = AttributeFeatureModels.from_registry(self._registry)
        self._ready = True

    def embed(self, rgb: np.ndarray, regions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The records of the faces large enough for a recognizer."""
        from veil.transforms.recognizers import _alignment_matrix, _region_geometry, _warp

        chosen = [(r, region) for r, region in enumerate(regions)
                  if str(region.get("kind") or "face") == "face" and face_side(region) >= self.config.min_face]
        if not chosen:
            return []
        crops = [_warp(rgb, _alignment_matrix(*_region_geometry(region, r), 112), 112) for r, region in chosen]
        identity = self._recognizer.embed(crops)
        attributes = (None if self._attribute_models is None
                      else self._attribute_models.features(rgb, [region for _, region in chosen]))
        out = []
        for i, ((r, region), emb) in enumerate(zip(chosen, identity, strict=True)):
            record: dict[str, Any] = {"face": r, "box": [float(v) for v in region["box"]],
                                      "identity": emb.astype(np.float32)}
            if attributes is not None:
                record["attributes"] = attributes[i].astype(np.float32)
            out.append(record)
        return out

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        out = []
        for sample in batch:
            record: Sample = {k: sample[k] for k in ("__key__", "__shard__", "__index__") if k in sample}
            if is_quarantined(sample):
                record.update(status=QUARANTINED, reason=sample.get("reason", ""))
            else:
                try:
                    record[FACES_FIELD] = self.embed(sample["_decoded"].rgb, sample.get("regions") or [])
                    # Pass 1 releases nothing; CLEAN only marks the record finished for the chain.
                    record["status"] = CLEAN
                except Exception as exc:  # noqa: BLE001 - failures are data
                    quarantine(record, f"identity_error: {describe_exception(exc)}")
            out.append(record)
        return out


def collect_faces(records: Sequence[Sample]) -> list[FaceVectors]:
    """Pass-1 records -> faces in the canonical order (shard, index, key, face)."""
    faces = []
    for record in records:
        for f in record.get(FACES_FIELD) or []:
            attrs = f.get("attributes")
            faces.append(FaceVectors(
                shard=str(record["__shard__"]), key=str(record["__key__"]),
                index=int(record.get("__index__") or 0), face=int(f["face"]),
                box=tuple(float(v) for v in f["box"]),  # type: ignore[arg-type]
                identity=np.asarray(f["identity"], np.float32),
                attributes=None if attrs is None else np.asarray(attrs, np.float32)))
    faces.sort(key=lambda f: f.order)
    return faces


# ---------------------------------------------------------------------------- cluster, assign


def cluster_identities(embeddings: np.ndarray, *, similarity: float) -> np.ndarray:
    """Cluster labels (N,) of unit embeddings: average-linkage agglomerative clustering on
    cosine distance, merged while the average similarity between two clusters is at least
    ``similarity``. Labels are numbered by first appearance (row order), so the same rows in
    the same order always give the same labels."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    # Cosine distances clipped at 0: float error can make identical rows -1e-16 apart.
    tree = linkage(np.maximum(pdist(x, metric="cosine"), 0.0), method="average")
    raw = fcluster(tree, t=1.0 - similarity, criterion="distance")
    first: dict[int, int] = {}
    for label in raw:
        first.setdefault(int(label), len(first))
    return np.array([first[int(label)] for label in raw], dtype=np.int64)


@dataclass(frozen=True)
class Target:
    """The synthetic identity of one real cluster (kept in memory only)."""

    pseudo_id: str
    pool_index: int
    pool_id: str
    #: Attribute-space distance between the cluster's mean and the pool face.
    distance: float
    #: Largest optimised-recognizer similarity of the pool face to any member.
    identity_similarity: float
    #: The pool face's unit identity embedding: what FSAP moves the faces towards.
    embedding: np.ndarray = field(repr=False)


class PoolExhaustedError(RuntimeError):
    """The pool has no unused face far enough from a cluster: build a larger pool."""


def assign_targets(faces: Sequence[FaceVectors], labels: np.ndarray, pool: Any, *,
                   max_identity_similarity: float, candidates: int,
                   weights: Mapping[str, float] | None = None) -> list[Target]:
    """One distinct pool face per cluster, clusters in label order (first appearance).

    Each cluster queries the pool's attribute index (:class:`~veil.transforms.pairing.PairIndex`)
    with its mean attribute vector and mean identity. A candidate is taken only when its
    identity similarity to *every* member is below ``max_identity_similarity`` and to every
    target already taken too: small generated faces look alike to a recognizer (two DCGAN pool
    faces scored 0.36 against each other), and two people given look-alike targets would merge
    into one pseudo-person. Rejected candidates are excluded and the query repeated. Raises
    :class:`PoolExhaustedError` when no admissible face is left.
    """
    from veil.transforms.pairing import PairIndex

    n_clusters = int(labels.max()) + 1 if len(labels) else 0
    if n_clusters > len(pool):
        raise PoolExhaustedError(
            f"the dataset has {n_clusters} distinct people but the synthetic pool only "
            f"{len(pool)} faces; each person needs a synthetic face of its own: build a larger "
            "pool (veil pool --count N)")
    if n_clusters and any(f.attributes is None for f in faces):
        raise ValueError("faces have no attribute features: the identity pass must run with the "
                         "pool's attribute models")
    index = PairIndex(pool, weights=weights)
    pool_identity = np.asarray(pool.identity, dtype=np.float32)
    taken: list[int] = []
    targets: list[Target] = []
    for c in range(n_clusters):
        members = [f for f, label in zip(faces, labels, strict=True) if label == c]
        ids = np.stack([f.identity for f in members]).astype(np.float32)
        mean_id = ids.mean(0)
        mean_id /= max(1e-12, float(np.linalg.norm(mean_id)))
        mean_attr = np.stack([f.attributes for f in members]).mean(0)  # type: ignore[misc]
        excluded = set(taken)
        chosen = None
        while chosen is None:
            (pair,) = index.query(mean_attr[None, :], mean_id[None, :], k=max(1, candidates),
                                  max_identity_similarity=max_identity_similarity, exclude=excluded)
            if pair is None:
                break
            emb = pool_identity[pair.pool_index]
            worst = float((ids @ emb).max())
            near_taken = bool(taken) and float((pool_identity[taken] @ emb).max()) >= max_identity_similarity
            if worst < max_identity_similarity and not near_taken:
                chosen = (pair, worst)
            else:
                excluded.add(int(pair.pool_index))
        if chosen is None:
            raise PoolExhaustedError(
                f"no face of the synthetic pool ({len(pool)} faces) is below identity similarity "
                f"{max_identity_similarity} to every face of person {c + 1} of {n_clusters} and "
                "to the synthetic faces already given to others: build a larger pool "
                "(veil pool --count N)")
        pair, worst = chosen
        taken.append(int(pair.pool_index))
        emb = pool_identity[pair.pool_index]
        targets.append(Target(pseudo_id=f"pid-{c + 1:06d}", pool_index=int(pair.pool_index),
                              pool_id=str(pair.pool_id), distance=float(pair.attribute_distance),
                              identity_similarity=worst,
                              embedding=(emb / max(1e-12, float(np.linalg.norm(emb)))).astype(np.float32)))
    return targets


@dataclass
class PseudoAssignment:
    """(shard, key, face index) -> box and target, for pass 2. Lives in the driver and in the
    pseudo-identity stage's pickled state, never on disk."""

    faces: dict[tuple[str, str, int], tuple[tuple[float, ...], Target]] = field(default_factory=dict)
    n_faces: int = 0
    n_clusters: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts only (for run.json and the report): no embedding, no pool face."""
        from collections import Counter

        sizes = Counter(t.pseudo_id for _, t in self.faces.values())
        return {"faces": self.n_faces, "pseudo_identities": self.n_clusters,
                "faces_per_identity": {"max": max(sizes.values(), default=0),
                                       "multi": sum(1 for v in sizes.values() if v > 1)}}


def build_assignment(faces: Sequence[FaceVectors], pool: Any, config: PseudoIdentityConfig, *,
                     weights: Mapping[str, float] | None = None) -> PseudoAssignment:
    """Cluster pass 1's faces and give every cluster its synthetic target."""
    if not faces:
        return PseudoAssignment()
    labels = cluster_identities(np.stack([f.identity for f in faces]), similarity=config.cluster_similarity)
    targets = assign_targets(faces, labels, pool, max_identity_similarity=config.max_identity_similarity,
                             candidates=config.candidates, weights=weights)
    out = PseudoAssignment(n_faces=len(faces), n_clusters=len(targets))
    for f, label in zip(faces, labels, strict=True):
        out.faces[(f.shard, f.key, f.face)] = (f.box, targets[int(label)])
    return out


# ----------------------------------------------------------------------------- pass 2: attach


class PseudoIdentityStage(Stage):
    """Pass 2, between detection and the anonymizer: attach each clustered face's target.

    ``region["target"]`` gets the contract's four keys (``pool_index``, ``pool_id``,
    ``pseudo_id``, ``distance``; the manifest keeps only the last two:
    ``veil.transforms.pairing.public_region``), and the working field
    :data:`veil.transforms.fsap.TARGETS_FIELD` the target's embedding. A face detected in pass 2
    that pass 1 did not see at the same place gets no target (plain FSAP) and says so.
    """

    name = "pseudo_identity"

    def __init__(self, assignment: PseudoAssignment, *, batch_size: int = 16) -> None:
        self.assignment = assignment
        self.batch_size = batch_size
        self.resources = Resources(cpus=0.25)

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from veil.transforms.fsap import TARGETS_FIELD

        for sample in batch:
            if is_quarantined(sample):
                continue
            shard, key = str(sample.get("__shard__")), str(sample.get("__key__"))
            embeddings: dict[int, np.ndarray] = {}
            for r, region in enumerate(sample.get("regions") or []):
                entry = self.assignment.faces.get((shard, key, r))
                if entry is None:
                    continue
                box, target = entry
                if max(abs(a - float(b)) for a, b in zip(box, region["box"], strict=True)) > BOX_TOLERANCE:
                    region["pseudo"] = "unmatched: face not at the place the identity pass saw it"
                    continue
                region["target"] = {"pool_index": target.pool_index, "pool_id": target.pool_id,
                                    "pseudo_id": target.pseudo_id, "distance": round(target.distance, 6)}
                embeddings[r] = target.embedding
            if embeddings:
                sample[TARGETS_FIELD] = embeddings
        return batch
