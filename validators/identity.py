"""Re-identification attacks: does a face recognizer still recognise the anonymized faces?

Why this module looks the way it does:

* **An attacker's view, not a pixel metric.** Blur strength or PSNR says nothing about whether a
  person can still be recognised. Here real face recognizers (dlib's ResNet, the offline
  default; MobileFaceNet trained on MS-Celeb-1M; FaceNet trained on VGGFace2 when its weights
  are present) embed each original face and the anonymized face at the same place, and two
  attacks are scored: *verification* ("is this anonymized face the same person as the
  original?", one score against the recognizer's standard threshold) and *identification*
  ("is the original the nearest identity in a gallery of every original face?").
* **One geometry for both images.** Every recognizer implements :class:`FaceRecognizer`:
  ``embed_pair`` crops and aligns the anonymized face with exactly the geometry derived from
  the *original* face. Re-detecting or re-aligning on the anonymized image would let a good
  anonymizer (which moves or destroys landmarks) also move the crop, and the attack would
  then compare a different patch of the image.
* **Each recognizer in its own metric.** dlib's descriptors are compared by Euclidean
  distance (its published 0.6 threshold is defined that way), the others by cosine
  similarity; the attacks take the metric as a parameter rather than converting thresholds.
* **Mergeable state.** Veil works shard by shard on several workers. Both attacks keep exactly
  combinable state (per-face scores / embeddings with their keys), so merging shard
  states gives the same result as one pass, whatever the split or order, and the state is
  JSON-able so workers can ship it to the driver.
* **Honest uncertainty.** A rate over a few hundred faces is an estimate: every rate carries a
  Wilson score interval, which stays inside [0, 1] and behaves at 0 and n (where the normal
  approximation collapses to a zero-width interval exactly when it matters most: "0 of 50
  faces re-identified" does not mean the true rate is 0).
* **Lazy torch.** torch is imported only when a recognizer is built, so merging and computing
  attack states needs only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.validators.state import decode_array, encode_array

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "BOX_LANDMARKS",
    "MOBILEFACENET_MODEL",
    "MOBILEFACENET_THRESHOLD",
    "EMBEDDING_DIM",
    "DLIB_RECOGNITION_MODEL",
    "DLIB_SHAPE_MODEL",
    "DLIB_THRESHOLD",
    "FACENET_MODEL",
    "FACENET_THRESHOLD",
    "FACENET_CASIA_MODEL",
    "FACENET_CASIA_THRESHOLD",
    "FACENET_MSCELEB_MODEL",
    "FACENET_MSCELEB_THRESHOLD",
    "METRICS",
    "RECOGNIZER_NAMES",
    "align_face",
    "face_alignment_matrix",
    "similarity_matrix",
    "face_key",
    "wilson_interval",
    "FaceRecognizer",
    "MobileFaceNet",  # noqa: F822 - provided lazily by the module __getattr__ (no torch at import)
    "MobileFaceNetRecognizer",
    "DlibResNetRecognizer",
    "FaceNetRecognizer",
    "FaceNetCasiaRecognizer",
    "FaceNetMSCelebRecognizer",
    "build_recognizer",
    "VerificationAttack",
    "IdentificationAttack",
    "RESTORATIONS",
    "check_restoration",
    "restore",
]

from veil.transforms.recognizers import (  # noqa: F401 - re-exported: validators import them from here
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    ARCFACE_TEMPLATE_112,
    BOX_LANDMARKS,
    DLIB_RECOGNITION_MODEL,
    DLIB_SHAPE_MODEL,
    DLIB_THRESHOLD,
    EMBEDDING_DIM,
    FACENET_CASIA_MODEL,
    FACENET_CASIA_THRESHOLD,
    FACENET_MODEL,
    FACENET_MSCELEB_MODEL,
    FACENET_MSCELEB_THRESHOLD,
    FACENET_THRESHOLD,
    METRICS,
    MOBILEFACENET_MODEL,
    MOBILEFACENET_THRESHOLD,
    RECOGNIZER_NAMES,
    DlibResNetRecognizer,
    FaceNetCasiaRecognizer,
    FaceNetMSCelebRecognizer,
    FaceNetRecognizer,
    FaceRecognizer,
    MobileFaceNetRecognizer,
    _alignment_matrix,
    _check_pair,
    _mobilefacenet_class,
    _region_geometry,
    _warp,
    align_face,
    build_recognizer,
    face_alignment_matrix,
    similarity_matrix,
)

# The restoration attack (JPEG, blur, down/up-scaling before matching) lives with the run's
# certification, which uses it too; validators import it from here.
from veil.transforms.restoration import RESTORATIONS, check_restoration, restore  # noqa: E402, F401

# --------------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (95% for ``z = 1.96``).

    Chosen over the normal ("Wald") interval because it never leaves [0, 1] and does not
    collapse to zero width at ``k = 0`` or ``k = n``: the typical anonymization result is
    "0 faces re-identified", and that still leaves a real upper bound on the true rate.
    With no trials nothing is known, so the interval is the whole ``(0, 1)``.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # Exact ends at k = 0 and k = n (the closed form only reaches them up to rounding).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def face_key(sample_key: str, face_index: int) -> str:
    """Identity key of one face: the sample key plus the face's index within the sample.

    Each original face is its own identity for the attacks (the dataset has no identity labels,
    and two faces in one photo are, as far as we know, two people).
    """
    return f"{sample_key}#{int(face_index)}"


def _normalise_rows(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """Validate an (N, dim) embedding batch and L2-normalise it (cosine = dot product)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise ValueError(f"{what}: expected shape (N, {dim or 'D'}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: zero embedding vector has no direction")
    return arr / norms


def _check_keys(keys: Sequence[str], n: int) -> list[str]:
    out = [str(k) for k in keys]
    if len(out) != n:
        raise ValueError(f"got {len(out)} keys for {n} embeddings")
    if len(set(out)) != len(out):
        raise ValueError("face keys must be unique within a batch")
    return out


def _summary(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


# --------------------------------------------------------------------------------------------
# Attacks as mergeable metrics
# --------------------------------------------------------------------------------------------


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return metric


def _embedding_rows(x: np.ndarray, dim: int | None, what: str, metric: str) -> np.ndarray:
    """An (N, dim) embedding batch ready for ``metric``: unit rows for cosine, raw for euclidean.

    Euclidean embeddings are never normalised: their threshold (dlib's 0.6) is a distance
    between the raw vectors, and normalising would change every distance.
    """
    if metric == "cosine":
        return _normalise_rows(x, dim, what)
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise ValueError(f"{what}: expected shape (N, {dim or 'D'}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    return arr


def _score_summary(values: np.ndarray) -> dict[str, float | None]:
    keys = ("mean", "min", "p05", "p50", "p95", "max")
    if values.size == 0:
        return dict.fromkeys(keys)
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p05": float(np.percentile(values, 5)),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


class VerificationAttack:
    """Per-face verification: is the anonymized face judged the same person as the original?

    State is one raw score per face with its key: the cosine similarity (``metric="cosine"``,
    same person if score >= threshold) or the Euclidean distance (``metric="euclidean"``, same
    person if score <= threshold) of the original and anonymized embeddings. Tiny (one float
    per face), exactly mergeable, and it answers *which* samples drove a failure and lets
    reports draw histograms. Counts are derived from the scores at :meth:`compute`, so they
    can never disagree.
    """

    def __init__(
        self,
        threshold: float = MOBILEFACENET_THRESHOLD,
        recognizer: str = MobileFaceNetRecognizer.name,
        *,
        metric: str = "cosine",
    ) -> None:
        self.metric = _check_metric(metric)
        threshold = float(threshold)
        if metric == "cosine" and not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if metric == "euclidean" and not (math.isfinite(threshold) and threshold >= 0.0):
            raise ValueError(f"threshold is a Euclidean distance >= 0, got {threshold}")
        self.threshold = threshold
        self.recognizer = str(recognizer)
        self._scores: dict[str, float] = {}

    @classmethod
    def for_recognizer(cls, recognizer: FaceRecognizer) -> VerificationAttack:
        """An attack with the recognizer's name, metric and standard threshold."""
        return cls(recognizer.threshold, recognizer.name, metric=recognizer.metric)

    def _compatible(self, other: VerificationAttack) -> None:
        if not isinstance(other, VerificationAttack):
            raise TypeError(f"cannot merge VerificationAttack with {type(other).__name__}")
        mine = (self.metric, self.threshold, self.recognizer)
        theirs = (other.metric, other.threshold, other.recognizer)
        if mine != theirs:
            raise ValueError(
                f"cannot merge attacks with different (metric, threshold, recognizer): "
                f"{mine} vs {theirs}"
            )

    def is_reidentified(self, scores: float | np.ndarray) -> np.ndarray:
        """Whether each score counts as the same person (cosine >= or distance <= threshold)."""
        values = np.asarray(scores, dtype=np.float64)
        return values >= self.threshold if self.metric == "cosine" else values <= self.threshold

    def update(self, keys: Sequence[str], original: np.ndarray, anonymized: np.ndarray) -> None:
        """Add (original, anonymized) embedding pairs of the same faces, one key per face."""
        a = _embedding_rows(original, None, "original", self.metric)
        b = _embedding_rows(anonymized, a.shape[1], "anonymized", self.metric)
        if a.shape != b.shape:
            raise ValueError(
                f"original {a.shape} and anonymized {b.shape} embeddings differ in shape"
            )
        ks = _check_keys(keys, a.shape[0])
        dup = [k for k in ks if k in self._scores]
        if dup:
            raise ValueError(f"face keys already counted: {dup[:5]}")
        if self.metric == "cosine":
            scores = np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0)
        else:
            scores = np.linalg.norm(a - b, axis=1)
        for k, s in zip(ks, scores, strict=True):
            self._scores[k] = float(s)

    def merge(self, other: VerificationAttack) -> VerificationAttack:
        """A new state equal to having seen both inputs' faces (neither is mutated)."""
        self._compatible(other)
        dup = self._scores.keys() & other._scores.keys()
        if dup:
            raise ValueError(f"shards overlap: face keys counted twice: {sorted(dup)[:5]}")
        out = VerificationAttack(self.threshold, self.recognizer, metric=self.metric)
        out._scores = {**self._scores, **other._scores}
        return out

    def scores(self) -> list[tuple[str, float]]:
        """(face key, raw score) for every pair, most at risk first (most similar: highest
        cosine or smallest distance)."""
        sign = -1.0 if self.metric == "cosine" else 1.0
        return sorted(self._scores.items(), key=lambda kv: (sign * kv[1], kv[0]))

    #: Older name of :meth:`scores` (cosine similarities when the metric is cosine).
    similarities = scores

    def compute(self) -> dict[str, Any]:
        keys = sorted(self._scores)
        values = np.array([self._scores[k] for k in keys], dtype=np.float64)
        n = int(values.size)
        k = int(np.count_nonzero(self.is_reidentified(values))) if n else 0
        out: dict[str, Any] = {
            "recognizer": self.recognizer,
            "metric": self.metric,
            "threshold": self.threshold,
            "pairs": n,
            "reidentified": k,
            "rate": k / n if n else None,
            "ci95": list(wilson_interval(k, n)),
            "scores": _score_summary(values),
        }
        if self.metric == "cosine":
            out["similarities"] = _summary(values)
        return out

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self._scores)
        return {
            "kind": "VerificationAttack",
            "metric": self.metric,
            "threshold": self.threshold,
            "recognizer": self.recognizer,
            "keys": keys,
            "scores": encode_array(
                np.array([self._scores[k] for k in keys], dtype=np.float64), "float64"
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerificationAttack:
        """Inverse of :meth:`to_dict`; states written before metrics existed load as cosine."""
        if data.get("kind") != "VerificationAttack":
            raise ValueError(f"not a VerificationAttack state: kind={data.get('kind')!r}")
        out = cls(
            float(data["threshold"]),
            str(data["recognizer"]),
            metric=str(data.get("metric", "cosine")),
        )
        payload = data["scores"] if "scores" in data else data["similarities"]
        values = decode_array(payload)
        out._scores = {str(k): float(s) for k, s in zip(data["keys"], values, strict=True)}
        return out


#: Probes x gallery score entries computed at once when ranking (bounds memory to ~256 MB).
_RANK_BLOCK = 1 << 25


class IdentificationAttack:
    """Closed-set identification: is each anonymized face's original its nearest identity?

    The gallery is every original face's embedding (each face its own identity, keyed by
    :func:`face_key`); each anonymized face is a probe whose true identity is the original at
    the same key. A probe is re-identified at rank k when fewer than k gallery entries are
    *strictly* more similar than its true original (higher cosine, or smaller Euclidean
    distance); ties count for the attacker, which can only overstate the risk. "Strictly"
    allows for floating-point rounding: an entry must beat the true original by more than
    ~1e-9 relative, so exact duplicates always tie. The rate depends on the gallery size (a
    bigger gallery is harder), so it is reported with it. Embeddings are kept in the state
    (unit rows for cosine, raw vectors for Euclidean), so merging is exact.
    """

    def __init__(
        self,
        recognizer: str = MobileFaceNetRecognizer.name,
        ks: Sequence[int] = (1, 5),
        *,
        metric: str = "cosine",
    ) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ranks must be >= 1, got {ks}")
        self.metric = _check_metric(metric)
        self.recognizer = str(recognizer)
        self.ks = tuple(sorted({int(k) for k in ks}))
        self._gallery: dict[str, np.ndarray] = {}
        self._probes: dict[str, np.ndarray] = {}

    @classmethod
    def for_recognizer(
        cls, recognizer: FaceRecognizer, ks: Sequence[int] = (1, 5)
    ) -> IdentificationAttack:
        """An attack with the recognizer's name and metric."""
        return cls(recognizer.name, ks, metric=recognizer.metric)

    def update(
        self, keys: Sequence[str], original: np.ndarray, anonymized: np.ndarray | None = None
    ) -> None:
        """Add original faces to the gallery and, when given, their anonymized versions as probes.

        ``anonymized=None`` adds gallery-only identities (distractors), e.g. faces whose
        anonymized version could not be embedded.
        """
        a = _embedding_rows(original, self._dim(), "original", self.metric)
        ks = _check_keys(keys, a.shape[0])
        b = None
        if anonymized is not None:
            b = _embedding_rows(anonymized, a.shape[1], "anonymized", self.metric)
            if b.shape != a.shape:
                raise ValueError(
                    f"original {a.shape} and anonymized {b.shape} embeddings differ in shape"
                )
        dup = [k for k in ks if k in self._gallery]
        if dup:
            raise ValueError(f"face keys already counted: {dup[:5]}")
        for i, k in enumerate(ks):
            self._gallery[k] = a[i].astype(np.float32)
            if b is not None:
                self._probes[k] = b[i].astype(np.float32)

    def _dim(self) -> int | None:
        return next(iter(self._gallery.values())).shape[0] if self._gallery else None

    def merge(self, other: IdentificationAttack) -> IdentificationAttack:
        """A new state equal to having seen both inputs' faces (neither is mutated)."""
        if not isinstance(other, IdentificationAttack):
            raise TypeError(f"cannot merge IdentificationAttack with {type(other).__name__}")
        mine = (self.metric, self.recognizer, self.ks)
        theirs = (other.metric, other.recognizer, other.ks)
        if mine != theirs:
            raise ValueError(
                f"cannot merge attacks with different (metric, recognizer, ks): {mine} vs {theirs}"
            )
        if self._gallery and other._gallery and self._dim() != other._dim():
            raise ValueError(
                f"cannot merge embeddings of dimension {self._dim()} and {other._dim()}"
            )
        dup = self._gallery.keys() & other._gallery.keys()
        if dup:
            raise ValueError(f"shards overlap: face keys counted twice: {sorted(dup)[:5]}")
        out = IdentificationAttack(self.recognizer, self.ks, metric=self.metric)
        out._gallery = {**self._gallery, **other._gallery}
        out._probes = {**self._probes, **other._probes}
        return out

    def ranks(self) -> dict[str, int]:
        """1-based rank of the true original for every probe (1 = re-identified at top-1)."""
        gkeys = sorted(self._gallery)
        pkeys = sorted(self._probes)
        if not pkeys:
            return {}
        gallery = np.stack([self._gallery[k] for k in gkeys]).astype(np.float64)
        probes = np.stack([self._probes[k] for k in pkeys]).astype(np.float64)
        index = {k: i for i, k in enumerate(gkeys)}
        true_idx = np.array([index[k] for k in pkeys])
        g_sq = np.einsum("ij,ij->i", gallery, gallery)
        better = np.empty(len(pkeys), dtype=np.int64)
        block = max(1, _RANK_BLOCK // len(gkeys))
        for start in range(0, len(pkeys), block):
            stop = min(start + block, len(pkeys))
            p = probes[start:stop]
            rows = np.arange(stop - start)
            dots = p @ gallery.T
            if self.metric == "cosine":
                true = dots[rows, true_idx[start:stop]]
                better[start:stop] = (dots > true[:, None] + 1e-9).sum(axis=1)
            else:
                # Squared distances |p|^2 + |g|^2 - 2 p.g: one matrix product instead of an
                # (N, M, D) difference tensor; its rounding is ~1e-16 of |p|^2 + |g|^2, far
                # inside the tie tolerance.
                p_sq = np.einsum("ij,ij->i", p, p)
                d2 = np.maximum(p_sq[:, None] + g_sq[None, :] - 2.0 * dots, 0.0)
                true = d2[rows, true_idx[start:stop]]
                tol = 1e-9 * (p_sq[:, None] + g_sq[None, :])
                better[start:stop] = (d2 < true[:, None] - tol).sum(axis=1)
        return {k: int(r) + 1 for k, r in zip(pkeys, better, strict=True)}

    def compute(self) -> dict[str, Any]:
        ranks = np.array(list(self.ranks().values()), dtype=np.int64)
        n = int(ranks.size)
        out: dict[str, Any] = {
            "recognizer": self.recognizer,
            "metric": self.metric,
            "gallery": len(self._gallery),
            "probes": n,
        }
        for k in self.ks:
            hits = int((ranks <= k).sum())
            out[f"top{k}"] = {
                "reidentified": hits,
                "rate": hits / n if n else None,
                "ci95": list(wilson_interval(hits, n)),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        gkeys = sorted(self._gallery)
        pkeys = sorted(self._probes)
        dim = self._dim() or 0
        return {
            "kind": "IdentificationAttack",
            "metric": self.metric,
            "recognizer": self.recognizer,
            "ks": list(self.ks),
            "gallery_keys": gkeys,
            "gallery": encode_array(
                np.stack([self._gallery[k] for k in gkeys]) if gkeys else np.zeros((0, dim)),
                "float32",
            ),
            "probe_keys": pkeys,
            "probes": encode_array(
                np.stack([self._probes[k] for k in pkeys]) if pkeys else np.zeros((0, dim)),
                "float32",
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentificationAttack:
        """Inverse of :meth:`to_dict`; states written before metrics existed load as cosine."""
        if data.get("kind") != "IdentificationAttack":
            raise ValueError(f"not an IdentificationAttack state: kind={data.get('kind')!r}")
        out = cls(str(data["recognizer"]), data["ks"], metric=str(data.get("metric", "cosine")))
        gallery, probes = decode_array(data["gallery"]), decode_array(data["probes"])
        out._gallery = {str(k): gallery[i] for i, k in enumerate(data["gallery_keys"])}
        out._probes = {str(k): probes[i] for i, k in enumerate(data["probe_keys"])}
        unknown = out._probes.keys() - out._gallery.keys()
        if unknown:
            raise ValueError(f"probes without a gallery entry: {sorted(unknown)[:5]}")
        return out


def __getattr__(name: str) -> Any:
    """``MobileFaceNet`` without importing torch at import time (see transforms.recognizers)."""
    if name == "MobileFaceNet":
        return _mobilefacenet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
