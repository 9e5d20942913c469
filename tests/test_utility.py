"""Tests for veil.validators.utility: the train-on-anonymized / test-on-original protocol on
synthetic separable features (kept vs destroyed label information), the key-hash split,
the deterministic logistic regression, exact merging and serialisation, and the
too-few-samples path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from veil.validators.utility import LabelTransfer, LogisticRegression, in_test_split


def _clusters(
    seed: int = 0, n: int = 360, dim: int = 32, classes: int = 6, separation: float = 1.0
) -> tuple[list[str], list[str], np.ndarray]:
    """Gaussian clusters, one per class: separable, but not trivially (unit noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, separation, (classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0.0, 1.0, (n, dim))
    return [f"sample-{i:05d}" for i in range(n)], [f"class{c}" for c in y], x.astype(np.float32)


def _state(
    keys: list[str], labels: list[str], original: np.ndarray, anonymized: np.ndarray
) -> LabelTransfer:
    state = LabelTransfer()
    state.update(keys, labels, original, anonymized)
    return state


def test_identical_features_keep_all_utility() -> None:
    keys, labels, x = _clusters()
    r = _state(keys, labels, x, x.copy()).compute()
    assert r["status"] == "ok" and r["reason"] is None
    assert (
        r["samples"] == 360 and r["classes"] == 6 and r["labels"] == [f"class{i}" for i in range(6)]
    )
    assert r["train_samples"] + r["test_samples"] == 360
    assert r["train_original_accuracy"] >= 0.97
    # Same training data, same deterministic fit: the two models are the same model.
    assert r["train_anonymized_accuracy"] == r["train_original_accuracy"]
    assert r["accuracy_drop"] == 0.0 and r["accuracy_drop_ci95"] == [0.0, 0.0]
    lo, hi = r["train_original_accuracy_ci95"]
    assert lo < r["train_original_accuracy"] <= hi <= 1.0
    json.dumps(r)


def test_noise_features_fall_to_chance() -> None:
    """Anonymized features that carry no label information: the model trained on them is near
    chance on the originals (measured over 12 seeds of this setup: at most 0.25, mean 0.17,
    chance 0.16), while the original-trained model stays near 1."""
    keys, labels, x = _clusters()
    noise = np.random.default_rng(99).normal(0.0, 1.0, x.shape).astype(np.float32)
    r = _state(keys, labels, x, noise).compute()
    assert r["status"] == "ok"
    assert r["train_original_accuracy"] >= 0.95
    assert r["train_anonymized_accuracy"] <= r["chance_accuracy"] + 0.15
    assert r["accuracy_drop"] >= 0.6
    assert r["accuracy_drop_ci95"][0] > 0.4
    assert r["train_anonymized_accuracy_ci95"][1] < r["train_original_accuracy_ci95"][0]


def test_partially_degraded_features_land_in_between() -> None:
    keys, labels, x = _clusters()
    rng = np.random.default_rng(5)
    degraded = (0.35 * x + rng.normal(0.0, 1.0, x.shape)).astype(np.float32)
    r = _state(keys, labels, x, degraded).compute()
    full = _state(keys, labels, x, x).compute()
    noise = _state(keys, labels, x, rng.normal(0.0, 1.0, x.shape).astype(np.float32)).compute()
    assert (
        noise["train_anonymized_accuracy"]
        < r["train_anonymized_accuracy"]
        < full["train_anonymized_accuracy"]
    )


def test_split_is_a_stable_key_hash() -> None:
    keys = [f"shard-{i // 100:03d}/img-{i:05d}" for i in range(3000)]
    test = [k for k in keys if in_test_split(k, 0.3)]
    assert 0.27 < len(test) / len(keys) < 0.33
    # Same answer every call, other seeds give other splits, fraction 0/1 edges behave.
    assert test == [k for k in keys if in_test_split(k, 0.3)]
    assert test != [k for k in keys if in_test_split(k, 0.3, seed=1)]
    assert not any(in_test_split(k, 0.0) for k in keys[:50])
    # A state's split depends on its keys only, not on insertion order or sharding.
    _, labels, x = _clusters(n=len(keys))
    order = list(range(len(keys)))
    random.Random(3).shuffle(order)
    shuffled = _state([keys[i] for i in order], [labels[i] for i in order], x[order], x[order])
    straight = _state(keys, labels, x, x)
    assert shuffled.split() == straight.split()
    assert straight.split()[1] == sorted(test)


def test_merge_equals_one_pass_and_round_trips() -> None:
    keys, labels, x = _clusters(n=200)
    anon = np.random.default_rng(1).normal(0.0, 1.0, x.shape).astype(np.float32) + 0.5 * x
    one = _state(keys, labels, x, anon)
    idx = list(range(200))
    random.Random(0).shuffle(idx)
    parts = [idx[:70], idx[70:71], idx[71:]]
    states = [_state([keys[i] for i in p], [labels[i] for i in p], x[p], anon[p]) for p in parts]
    merged = states[2].merge(states[0]).merge(states[1])
    assert merged.to_dict() == one.to_dict()
    assert merged.compute() == one.compute()
    assert len(states[0]) == 70  # inputs are not mutated
    back = LabelTransfer.from_dict(json.loads(json.dumps(one.to_dict())))
    assert back.to_dict() == one.to_dict() and back.compute() == one.compute()
    empty = LabelTransfer.from_dict(json.loads(json.dumps(LabelTransfer().to_dict())))
    assert len(empty) == 0
    with pytest.raises(ValueError, match="overlap"):
        merged.merge(states[0])
    with pytest.raises(ValueError, match="already counted"):
        one.update(keys[:1], labels[:1], x[:1], x[:1])
    with pytest.raises(ValueError, match="dimension"):
        one.merge(_state(["other"], ["class0"], np.zeros((1, 3)), np.zeros((1, 3))))
    with pytest.raises(ValueError, match="kind"):
        LabelTransfer.from_dict({"kind": "AttributeAgreement"})


def test_too_few_samples() -> None:
    r = LabelTransfer().compute()
    assert (
        r["status"] == "too_few_samples"
        and r["samples"] == 0
        and r["train_original_accuracy"] is None
    )
    keys, labels, x = _clusters(n=12, classes=2)
    r = _state(keys, labels, x, x).compute(min_per_class=5)
    assert r["status"] == "too_few_samples"
    assert "need 2" in r["reason"] and r["accuracy_drop"] is None
    one_class = _state(keys, ["same"] * 12, x, x).compute(min_per_class=1)
    assert one_class["status"] == "too_few_samples" and one_class["classes"] <= 1


def test_rare_classes_are_dropped_and_named() -> None:
    keys, labels, x = _clusters(n=300, classes=3)
    labels = list(labels)
    labels[0] = labels[1] = "rare"
    r = _state(keys, labels, x, x).compute(min_per_class=5)
    assert r["status"] == "ok" and r["classes"] == 3
    assert r["dropped_labels"] == ["rare"] and "rare" not in r["labels"]
    assert r["train_samples"] + r["test_samples"] == 298


def test_update_validates_inputs() -> None:
    state = LabelTransfer()
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="None"):
        state.update(["a", "b"], ["x", None], x, x)
    with pytest.raises(ValueError, match="NaN"):
        state.update(["a", "b"], ["x", "y"], np.full((2, 4), np.nan), x)
    with pytest.raises(ValueError, match="shapes"):
        state.update(["a", "b"], ["x", "y"], x, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="labels"):
        state.update(["a", "b"], ["x"], x, x)
    assert len(state) == 0


def test_logistic_regression_is_deterministic_and_learns() -> None:
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2.0, 1.0, (50, 3)), rng.normal(2.0, 1.0, (50, 3))]
    y = np.array(["neg"] * 50 + ["pos"] * 50)
    a = LogisticRegression().fit(x, y)
    b = LogisticRegression().fit(x, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert (a.predict(x) == y).mean() >= 0.97
    assert list(a.predict(np.array([[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]]))) == ["neg", "pos"]
    probs = a.predict_proba(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # Stronger regularisation shrinks the weights (the intercept row is not penalised).
    strong = LogisticRegression(l2=10.0).fit(x, y)
    assert np.abs(strong.coef_[:-1]).sum() < np.abs(a.coef_[:-1]).sum()
    # A constant feature does not break standardisation.
    LogisticRegression().fit(np.c_[x, np.ones(100)], y)
    with pytest.raises(ValueError):
        LogisticRegression(iterations=0)
