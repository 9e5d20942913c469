"""Re-identification attacks: does a face recognizer still recognise the anonymized faces?

Why this module looks the way it does:

* **An attacker's view, not a pixel metric.** Blur strength or PSNR says nothing about whether a
  person can still be recognised. Here a real face recognizer (MobileFaceNet trained on
  MS-Celeb-1M) embeds each original face and the anonymized face at the same place, and two
  attacks are scored: *verification* ("is this anonymized face the same person as the
  original?", one cosine similarity against a calibrated threshold) and *identification*
  ("is the original the nearest identity in a gallery of every original face?").
* **Mergeable state.** Veil works shard by shard on several workers. Both attacks keep exactly
  combinable state (per-face similarities / embeddings with their keys), so merging shard
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
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.validators.state import decode_array, encode_array

if TYPE_CHECKING:
    from veil.transforms.models import ModelRegistry

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "MOBILEFACENET_MODEL",
    "MOBILEFACENET_THRESHOLD",
    "EMBEDDING_DIM",
    "align_face",
    "similarity_matrix",
    "face_key",
    "wilson_interval",
    "MobileFaceNet",  # noqa: F822 - provided lazily by the module __getattr__ (no torch at import)
    "MobileFaceNetRecognizer",
    "VerificationAttack",
    "IdentificationAttack",
]

#: The standard ArcFace / InsightFace 5-point template for 112x112 crops: left eye, right eye,
#: nose tip, left and right mouth corner (image order). MobileFaceNet was trained on faces
#: aligned to exactly these points, so any other alignment costs recognition accuracy.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: Registry name of the MobileFaceNet weights (foamliu/MobileFaceNet, refined MS-Celeb-1M).
MOBILEFACENET_MODEL = "mobilefacenet_ms1m"

#: Embedding size of MobileFaceNet's linear GDC head.
EMBEDDING_DIM = 128

#: Cosine-similarity threshold above which two faces count as the same person.
#:
#: Calibrated on the real photos in the test data (CenterFace landmarks, ArcFace alignment,
#: flip-augmented embeddings): three photos of one person score 0.72-0.75 against each other,
#: while pairs of different people score between -0.10 and 0.15 (tests/test_identity.py
#: checks both sides). 0.35 sits in that gap, nearer the different-person side on purpose:
#: for an anonymization audit a *lower* threshold is the conservative choice, since it counts
#: more anonymized faces as re-identified, never fewer. Upstream (foamliu/MobileFaceNet, LFW
#: 99.48%) publishes no fixed threshold, so this is not an LFW operating point; re-calibrate
#: on labelled pairs (e.g. LFW) before quoting false-accept rates.
MOBILEFACENET_THRESHOLD = 0.35

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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
# Alignment
# --------------------------------------------------------------------------------------------


def align_face(
    rgb: np.ndarray, landmarks: np.ndarray | Sequence[Sequence[float]], size: int = 112
) -> np.ndarray:
    """Warp a face onto the ArcFace 5-point template with a similarity transform.

    A similarity (rotation, uniform scale, translation) is what recognizers are trained with:
    it removes pose in the image plane without distorting the face's proportions, which carry
    identity. ``landmarks`` are 5 (x, y) points in ``rgb`` pixel coordinates, ordered like
    :class:`veil.transforms.detect.Region` landmarks. ``size`` other than 112 scales the template.
    """
    import cv2

    src = np.asarray(landmarks, dtype=np.float64)
    if src.shape != (5, 2) or not np.isfinite(src).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {src.shape}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    matrix = similarity_matrix(src, ARCFACE_TEMPLATE_112 * (size / 112.0))
    return cv2.warpAffine(
        rgb,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping ``src`` points onto ``dst``.

    Closed form rather than ``cv2.estimateAffinePartial2D``: that one runs RANSAC by default,
    and with 5 points a robust estimator may discard a correct-but-noisy landmark, making the
    crop depend on a random draw. Returns the 2x3 float64 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / n
    if var_s <= 0:
        raise ValueError("landmarks are degenerate (all points coincide)")
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    trans = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, trans[:, None]])


# --------------------------------------------------------------------------------------------
# MobileFaceNet
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mobilefacenet_class() -> type:
    """Build the MobileFaceNet class on first use, so importing this module needs no torch.

    The layout is MobileFaceNet (Chen et al. 2018) as implemented in foamliu/MobileFaceNet,
    whose state-dict keys the released weights use: a MobileNetV2-style body (ReLU6 in the
    conv-BN-activation units, plain ReLU in the depthwise-separable stem, as upstream; the
    checkpoint has no PReLU parameters), a 7x7 global depthwise conv (GDC) and a 1x1 linear
    projection to 128 dimensions followed by BatchNorm.
    """
    import torch
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(
            self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
        ) -> None:
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class DepthwiseSeparableConv(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cin)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn1(self.depthwise(x)))
            return self.relu(self.bn2(self.pointwise(x)))

    class GDConv(nn.Module):
        def __init__(self, channels: int, kernel: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
            self.bn = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.depthwise(x))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            self.conv = nn.Sequential(
                ConvBNReLU(cin, hidden, kernel=1),
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileFaceNet(nn.Module):
        """MobileFaceNet: aligned 112x112 normalised RGB (N, 3, 112, 112) -> (N, 128) embeddings."""

        #: (expansion t, output channels c, repeats n, first stride s), as in the paper.
        SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

        def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
            super().__init__()
            self.conv1 = ConvBNReLU(3, 64, stride=2)
            self.dw_conv = DepthwiseSeparableConv(64, 64)
            blocks: list[nn.Module] = []
            cin = 64
            for t, c, n, s in self.SETTING:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            self.features = nn.Sequential(*blocks)
            self.conv2 = ConvBNReLU(cin, 512, kernel=1)
            self.gdconv = GDConv(512, 7)
            self.conv3 = nn.Conv2d(512, embedding_dim, 1)
            self.bn = nn.BatchNorm2d(embedding_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(self.dw_conv(self.conv1(x)))
            x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
            return x.flatten(1)

    return MobileFaceNet


def __getattr__(name: str) -> Any:
    """Expose ``MobileFaceNet`` as a module attribute without importing torch at import time."""
    if name == "MobileFaceNet":
        return _mobilefacenet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MobileFaceNetRecognizer:
    """Face embedder for re-identification attacks: aligned faces in, unit 128-d vectors out.

    Each face is embedded together with its horizontal mirror and the two embeddings summed
    before normalising: the standard test-time augmentation for ArcFace-style models, which
    makes the embedding less sensitive to which half of the face the alignment favoured.
    """

    name = "mobilefacenet"
    threshold = MOBILEFACENET_THRESHOLD
    dim = EMBEDDING_DIM

    def __init__(self, weights: str | Path, *, batch_size: int = 32, device: str = "cpu") -> None:
        import torch

        from veil.transforms.models import load_torch_state_dict

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = Path(weights)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        model = _mobilefacenet_class()()
        # strict=True: a checkpoint that does not match this architecture must fail loudly,
        # not leave half the network randomly initialised.
        model.load_state_dict(load_torch_state_dict(self.weights), strict=True)
        self.model = model.eval().to(self.device)

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry | None = None, **kwargs: Any
    ) -> MobileFaceNetRecognizer:
        """Resolve (and sha256-verify) the weights by name through Veil's model registry."""
        from veil.transforms.models import ModelRegistry

        registry = registry if registry is not None else ModelRegistry()
        return cls(registry.resolve(MOBILEFACENET_MODEL), **kwargs)

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """Embed aligned 112x112 RGB uint8 faces; returns (N, 128) float32, L2-normalised rows."""
        import torch

        if len(faces) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, face in enumerate(faces):
            if face.shape != (112, 112, 3):
                raise ValueError(
                    f"face {i}: expected an aligned (112, 112, 3) RGB crop, got {face.shape}"
                )
        mean = torch.tensor(_IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                batch = np.stack(
                    [np.asarray(f, dtype=np.uint8) for f in faces[start : start + self.batch_size]]
                )
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
                x = ((x - mean) / std).to(self.device)
                emb = self.model(x) + self.model(torch.flip(x, dims=[3]))
                emb = torch.nn.functional.normalize(emb, dim=1)
                out.append(emb.cpu().numpy().astype(np.float32))
        return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# Attacks as mergeable metrics
# --------------------------------------------------------------------------------------------


class VerificationAttack:
    """Per-face verification: is the anonymized face judged the same person as the original?

    State is one cosine similarity per face with its key: tiny (one float per face), exactly
    mergeable, and it answers *which* samples drove a failure and lets reports draw histograms.
    Counts are derived from the similarities at :meth:`compute`, so they can never disagree.
    """

    def __init__(
        self,
        threshold: float = MOBILEFACENET_THRESHOLD,
        recognizer: str = MobileFaceNetRecognizer.name,
    ) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = float(threshold)
        self.recognizer = str(recognizer)
        self._sims: dict[str, float] = {}

    def _compatible(self, other: VerificationAttack) -> None:
        if not isinstance(other, VerificationAttack):
            raise TypeError(f"cannot merge VerificationAttack with {type(other).__name__}")
        if (self.threshold, self.recognizer) != (other.threshold, other.recognizer):
            raise ValueError(
                f"cannot merge attacks with different (threshold, recognizer): "
                f"{(self.threshold, self.recognizer)} vs {(other.threshold, other.recognizer)}"
            )

    def update(self, keys: Sequence[str], original: np.ndarray, anonymized: np.ndarray) -> None:
        """Add (original, anonymized) embedding pairs of the same faces, one key per face."""
        a = _normalise_rows(original, None, "original")
        b = _normalise_rows(anonymized, a.shape[1], "anonymized")
        if a.shape != b.shape:
            raise ValueError(
                f"original {a.shape} and anonymized {b.shape} embeddings differ in shape"
            )
        ks = _check_keys(keys, a.shape[0])
        dup = [k for k in ks if k in self._sims]
        if dup:
            raise ValueError(f"face keys already counted: {dup[:5]}")
        for k, s in zip(ks, np.einsum("ij,ij->i", a, b), strict=True):
            self._sims[k] = float(np.clip(s, -1.0, 1.0))

    def merge(self, other: VerificationAttack) -> VerificationAttack:
        """A new state equal to having seen both inputs' faces (neither is mutated)."""
        self._compatible(other)
        dup = self._sims.keys() & other._sims.keys()
        if dup:
            raise ValueError(f"shards overlap: face keys counted twice: {sorted(dup)[:5]}")
        out = VerificationAttack(self.threshold, self.recognizer)
        out._sims = {**self._sims, **other._sims}
        return out

    def similarities(self) -> list[tuple[str, float]]:
        """(face key, cosine similarity) for every pair, most similar (most at risk) first."""
        return sorted(self._sims.items(), key=lambda kv: (-kv[1], kv[0]))

    def compute(self) -> dict[str, Any]:
        keys = sorted(self._sims)
        sims = np.array([self._sims[k] for k in keys], dtype=np.float64)
        n = int(sims.size)
        k = int((sims >= self.threshold).sum())
        return {
            "recognizer": self.recognizer,
            "threshold": self.threshold,
            "pairs": n,
            "reidentified": k,
            "rate": k / n if n else None,
            "ci95": list(wilson_interval(k, n)),
            "similarities": _summary(sims),
        }

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self._sims)
        return {
            "kind": "VerificationAttack",
            "threshold": self.threshold,
            "recognizer": self.recognizer,
            "keys": keys,
            "similarities": encode_array(
                np.array([self._sims[k] for k in keys], dtype=np.float64), "float64"
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerificationAttack:
        if data.get("kind") != "VerificationAttack":
            raise ValueError(f"not a VerificationAttack state: kind={data.get('kind')!r}")
        out = cls(float(data["threshold"]), str(data["recognizer"]))
        sims = decode_array(data["similarities"])
        out._sims = {str(k): float(s) for k, s in zip(data["keys"], sims, strict=True)}
        return out


class IdentificationAttack:
    """Closed-set identification: is each anonymized face's original its nearest identity?

    The gallery is every original face's embedding (each face its own identity, keyed by
    :func:`face_key`); each anonymized face is a probe whose true identity is the original at
    the same key. A probe is re-identified at rank k when fewer than k gallery entries are
    *strictly* more similar than its true original; ties count for the attacker, which can only
    overstate the risk. The rate depends on the gallery size (a bigger gallery is harder), so
    it is reported with it. Embeddings are kept in the state, so merging is exact.
    """

    def __init__(
        self, recognizer: str = MobileFaceNetRecognizer.name, ks: Sequence[int] = (1, 5)
    ) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ranks must be >= 1, got {ks}")
        self.recognizer = str(recognizer)
        self.ks = tuple(sorted({int(k) for k in ks}))
        self._gallery: dict[str, np.ndarray] = {}
        self._probes: dict[str, np.ndarray] = {}

    def update(
        self, keys: Sequence[str], original: np.ndarray, anonymized: np.ndarray | None = None
    ) -> None:
        """Add original faces to the gallery and, when given, their anonymized versions as probes.

        ``anonymized=None`` adds gallery-only identities (distractors), e.g. faces whose
        anonymized version could not be embedded.
        """
        a = _normalise_rows(original, self._dim(), "original")
        ks = _check_keys(keys, a.shape[0])
        b = None
        if anonymized is not None:
            b = _normalise_rows(anonymized, a.shape[1], "anonymized")
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
        if (self.recognizer, self.ks) != (other.recognizer, other.ks):
            raise ValueError(
                f"cannot merge attacks with different (recognizer, ks): {(self.recognizer, self.ks)} vs {(other.recognizer, other.ks)}"
            )
        if self._gallery and other._gallery and self._dim() != other._dim():
            raise ValueError(
                f"cannot merge embeddings of dimension {self._dim()} and {other._dim()}"
            )
        dup = self._gallery.keys() & other._gallery.keys()
        if dup:
            raise ValueError(f"shards overlap: face keys counted twice: {sorted(dup)[:5]}")
        out = IdentificationAttack(self.recognizer, self.ks)
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
        sims = probes @ gallery.T
        true_sims = sims[np.arange(len(pkeys)), true_idx]
        better = (sims > true_sims[:, None]).sum(axis=1)
        return {k: int(r) + 1 for k, r in zip(pkeys, better, strict=True)}

    def compute(self) -> dict[str, Any]:
        ranks = np.array(list(self.ranks().values()), dtype=np.int64)
        n = int(ranks.size)
        out: dict[str, Any] = {
            "recognizer": self.recognizer,
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
        if data.get("kind") != "IdentificationAttack":
            raise ValueError(f"not an IdentificationAttack state: kind={data.get('kind')!r}")
        out = cls(str(data["recognizer"]), data["ks"])
        gallery, probes = decode_array(data["gallery"]), decode_array(data["probes"])
        out._gallery = {str(k): gallery[i] for i, k in enumerate(data["gallery_keys"])}
        out._probes = {str(k): probes[i] for i, k in enumerate(data["probe_keys"])}
        unknown = out._probes.keys() - out._gallery.keys()
        if unknown:
            raise ValueError(f"probes without a gallery entry: {sorted(unknown)[:5]}")
        return out
