"""Data utility after anonymization: can a classifier trained on the release still do the task?

The protocol is the one of the thesis' chapter 6 evaluation (Table 6.1, "attribute accuracy of
a classifier trained on the anonymized set and tested on originals"), applied to whatever class
labels the samples carry in their metadata:

1. Every labelled sample contributes its key, its label and two image feature vectors: one of
   the original image and one of the anonymized image (the engine reuses the MobileNetV2
   features it computes for the Frechet distance).
2. Samples are split into train and test sets by a hash of their key (70/30 by default), so the
   split is the same on every run and every worker, and does not depend on shard order.
3. Two multinomial logistic regressions are trained with identical settings: (a) on the
   *original* train features, (b) on the *anonymized* train features.
4. Both are tested on the *original* test features. (a) is what the data supports before
   anonymization; (b) is what a model trained on the release achieves on real data. Their
   difference, ``accuracy_drop = a - b``, is the utility the anonymization cost. A release that
   destroyed the label information leaves (b) near chance; one that kept it leaves the drop
   near zero.

The classifier is deliberately small and fully deterministic (numpy, float64, full-batch
Nesterov gradient descent with a fixed step and iteration count, no random initialisation): it
is a measuring instrument, so the same state must always give the same numbers. Features are
standardised with the mean and spread of the set the model is trained on, and that same
transform is applied to the test features, as a deployed model would.

The state (keys, labels, both feature matrices) is exactly mergeable and JSON-able through
:mod:`veil.validators.state`.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.validators.identity import wilson_interval
from veil.validators.state import decode_array, encode_array

__all__ = [
    "LabelTransfer",
    "LogisticRegression",
    "in_test_split",
]


def in_test_split(key: str, test_fraction: float, seed: int = 0) -> bool:
    """Whether ``key`` belongs to the test set: a seeded 64-bit hash of the key below the cut.

    Depends on nothing but (key, seed, fraction), so every worker and every rerun agrees.
    """
    digest = hashlib.blake2b(
        str(key).encode("utf-8"), digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)
    )
    return int.from_bytes(digest.digest(), "little") / 2.0**64 < test_fraction


class LogisticRegression:
    """Multinomial logistic regression with L2 penalty, trained deterministically.

    Minimises ``mean cross-entropy + l2/2 * ||W||^2`` (the intercept is not penalised) over
    standardised features with Nesterov-accelerated gradient descent. The step is ``1 / L``
    with ``L = ||X||_2^2 / (2 n) + l2`` (the loss' gradient is L-Lipschitz: the softmax
    Hessian is bounded by half the identity), so it never diverges; ``||X||_2`` comes from a
    fixed number of power iterations from a fixed start.
    """

    def __init__(self, *, l2: float = 1e-2, iterations: int = 300) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.l2 = float(l2)
        self.iterations = int(iterations)
        self.classes_: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"need features (N, D) and N labels, got {x.shape} and {y.shape}")
        self.classes_, idx = np.unique(y, return_inverse=True)
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        # Constant features carry no information; dividing by 1 keeps them at 0.
        self.scale_ = np.where(std > 1e-12, std, 1.0)
        xs = np.hstack([(x - self.mean_) / self.scale_, np.ones((x.shape[0], 1))])
        n, d = xs.shape
        k = len(self.classes_)
        onehot = np.zeros((n, k))
        onehot[np.arange(n), idx] = 1.0
        penalty = np.ones((d, 1))
        penalty[-1] = 0.0  # intercept row
        step = 1.0 / (_spectral_norm(xs) ** 2 / (2 * n) + self.l2)
        w = np.zeros((d, k))
        prev = w
        for t in range(1, self.iterations + 1):
            look = w + (t - 1) / (t + 2) * (w - prev)
            grad = xs.T @ (_softmax(xs @ look) - onehot) / n + self.l2 * penalty * look
            prev, w = w, look - step * grad
        self.coef_ = w
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.classes_ is None:
            raise RuntimeError("fit the model first")
        x = np.asarray(x, dtype=np.float64)
        xs = np.hstack([(x - self.mean_) / self.scale_, np.ones((x.shape[0], 1))])
        return _softmax(xs @ self.coef_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self.classes_ is not None
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _spectral_norm(x: np.ndarray, iterations: int = 50) -> float:
    """Largest singular value by power iteration from a fixed start (deterministic, cheap)."""
    v = np.ones(x.shape[1]) / math.sqrt(x.shape[1])
    sigma = 0.0
    for _ in range(iterations):
        u = x @ v
        v = x.T @ u
        norm = np.linalg.norm(v)
        if norm == 0:
            return 0.0
        v /= norm
        sigma = math.sqrt(norm)
    # Power iteration approaches sigma from below; a small margin keeps 1/L a safe step.
    return 1.05 * sigma


class LabelTransfer:
    """Mergeable state for the train-on-anonymized / test-on-original utility protocol.

    See the module docstring for the protocol. Labels are kept as strings (metadata labels
    arrive as ``.cls`` text or JSON fields); features as float32, like the extractor's output.
    """

    def __init__(self) -> None:
        self._labels: dict[str, str] = {}
        self._original: dict[str, np.ndarray] = {}
        self._anonymized: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def dim(self) -> int | None:
        return next(iter(self._original.values())).shape[0] if self._original else None

    def update(
        self,
        keys: Sequence[str],
        labels: Sequence[Any],
        original_features: np.ndarray,
        anonymized_features: np.ndarray,
    ) -> None:
        """Add labelled samples: one key, one label and one feature row per side each."""
        a = np.asarray(original_features, dtype=np.float32)
        b = np.asarray(anonymized_features, dtype=np.float32)
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(
                f"original {a.shape} and anonymized {b.shape} features must be equal (N, D) shapes"
            )
        if self.dim is not None and a.shape[1] != self.dim:
            raise ValueError(f"features have dimension {a.shape[1]}, this state holds {self.dim}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError("features contain NaN or inf")
        ks = [str(k) for k in keys]
        if not len(ks) == len(labels) == a.shape[0]:
            raise ValueError(
                f"got {len(ks)} keys and {len(labels)} labels for {a.shape[0]} feature rows"
            )
        if any(label is None for label in labels):
            raise ValueError("labels must not be None (leave unlabelled samples out)")
        if len(set(ks)) != len(ks):
            raise ValueError("sample keys must be unique within a batch")
        dup = [k for k in ks if k in self._labels]
        if dup:
            raise ValueError(f"sample keys already counted: {dup[:5]}")
        for i, k in enumerate(ks):
            self._labels[k] = str(labels[i])
            self._original[k] = a[i].copy()
            self._anonymized[k] = b[i].copy()

    def merge(self, other: LabelTransfer) -> LabelTransfer:
        """A new state equal to having seen both inputs' samples (neither is mutated)."""
        if not isinstance(other, LabelTransfer):
            raise TypeError(f"cannot merge LabelTransfer with {type(other).__name__}")
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"cannot merge features of dimension {self.dim} and {other.dim}")
        dup = self._labels.keys() & other._labels.keys()
        if dup:
            raise ValueError(f"shards overlap: sample keys counted twice: {sorted(dup)[:5]}")
        out = LabelTransfer()
        out._labels = {**self._labels, **other._labels}
        out._original = {**self._original, **other._original}
        out._anonymized = {**self._anonymized, **other._anonymized}
        return out

    def split(self, test_fraction: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
        """(train keys, test keys), each sorted; see :func:`in_test_split`."""
        train, test = [], []
        for k in sorted(self._labels):
            (test if in_test_split(k, test_fraction, seed) else train).append(k)
        return train, test

    def compute(
        self,
        *,
        min_per_class: int = 5,
        test_fraction: float = 0.3,
        seed: int = 0,
        l2: float = 1e-2,
        iterations: int = 300,
    ) -> dict[str, Any]:
        """Run the protocol. Classes with fewer than ``min_per_class`` training samples or no
        test sample are left out (and named); fewer than two classes left is
        ``status: "too_few_samples"`` with the reason, and no accuracies."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if min_per_class < 1:
            raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
        train, test = self.split(test_fraction, seed)
        n_train = Counter(self._labels[k] for k in train)
        n_test = Counter(self._labels[k] for k in test)
        labels = sorted(set(n_train) | set(n_test))
        kept = [c for c in labels if n_train[c] >= min_per_class and n_test[c] >= 1]
        dropped = [c for c in labels if c not in kept]
        out: dict[str, Any] = {
            "protocol": "train on original vs on anonymized features, test on original features",
            "samples": len(self._labels),
            "classes": len(kept),
            "labels": kept,
            "dropped_labels": dropped,
            "test_fraction": float(test_fraction),
            "train_samples": 0,
            "test_samples": 0,
            "chance_accuracy": None,
            "train_original_accuracy": None,
            "train_original_accuracy_ci95": None,
            "train_anonymized_accuracy": None,
            "train_anonymized_accuracy_ci95": None,
            "accuracy_drop": None,
            "accuracy_drop_ci95": None,
        }
        if len(kept) < 2:
            out["status"] = "too_few_samples"
            out["reason"] = (
                f"{len(kept)} class(es) with >= {min_per_class} training samples and a test sample "
                f"(need 2); {len(self._labels)} labelled samples, per class train/test: "
                + ", ".join(f"{c}: {n_train[c]}/{n_test[c]}" for c in labels)
            )
            return out
        keep = set(kept)
        train = [k for k in train if self._labels[k] in keep]
        test = [k for k in test if self._labels[k] in keep]
        y_train = np.array([self._labels[k] for k in train])
        y_test = np.array([self._labels[k] for k in test])
        x_test = np.stack([self._original[k] for k in test])
        correct = {}
        for side, store in (("original", self._original), ("anonymized", self._anonymized)):
            model = LogisticRegression(l2=l2, iterations=iterations)
            model.fit(np.stack([store[k] for k in train]), y_train)
            correct[side] = model.predict(x_test) == y_test
        n = len(test)
        majority = Counter(y_train.tolist()).most_common(1)[0][0]
        a, b = correct["original"], correct["anonymized"]
        diff = a.astype(np.float64) - b.astype(np.float64)
        half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else None
        out.update(
            status="ok",
            reason=None,
            train_samples=len(train),
            test_samples=n,
            chance_accuracy=float((y_test == majority).mean()),
            train_original_accuracy=float(a.mean()),
            train_original_accuracy_ci95=list(wilson_interval(int(a.sum()), n)),
            train_anonymized_accuracy=float(b.mean()),
            train_anonymized_accuracy_ci95=list(wilson_interval(int(b.sum()), n)),
            accuracy_drop=float(diff.mean()),
            # Paired normal interval: both models are scored on the same test samples.
            accuracy_drop_ci95=None
            if half is None
            else [float(diff.mean()) - half, float(diff.mean()) + half],
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self._labels)
        dim = self.dim or 0
        return {
            "kind": "LabelTransfer",
            "keys": keys,
            "labels": [self._labels[k] for k in keys],
            "original": encode_array(
                np.stack([self._original[k] for k in keys]) if keys else np.zeros((0, dim)),
                "float32",
            ),
            "anonymized": encode_array(
                np.stack([self._anonymized[k] for k in keys]) if keys else np.zeros((0, dim)),
                "float32",
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelTransfer:
        if data.get("kind") != "LabelTransfer":
            raise ValueError(f"not a LabelTransfer state: kind={data.get('kind')!r}")
        out = cls()
        keys = list(data["keys"])
        if keys:
            out.update(
                keys,
                list(data["labels"]),
                decode_array(data["original"]),
                decode_array(data["anonymized"]),
            )
        return out
