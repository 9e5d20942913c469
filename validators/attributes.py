"""Attribute preservation: does an anonymized face keep the original's age, gender and expression?

The predictors (face-geometry crops, the age, gender and expression networks,
:class:`AttributeModels`) live in :mod:`veil.transforms.attributes`, below both the run and
validation, and are re-exported here. This module adds what only validation needs:

* **Mergeable state.** :class:`AttributeAgreement` keeps one row of predictions per face key:
  exactly mergeable, JSON-able as plain lists, and it answers which faces changed.
* **Light.** Merging and computing agreement needs only numpy; the heavy imports happen when
  a model is loaded or an image cropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from veil.transforms import attributes as _predictors
from veil.transforms.attributes import (  # noqa: F401 - re-exported
    AGE_MODEL,
    ATTRIBUTES,
    DLIB_CHIP_BOX,
    DLIB_CHIP_LANDMARKS,
    EXPRESSION_MODEL,
    EXPRESSIONS,
    GENDER_MINI_XCEPTION_MODEL,
    GENDER_MODEL,
    GENDERS,
    HAAR_SQUARE,
    MINI_XCEPTION_GENDER_CROP,
    SECOND_OPINIONS,
    VALIDATION_ATTRIBUTES,
    AgeNetwork,
    AttributeModels,
    GenderNetwork,
    MiniXceptionClassifier,
    dlib_chip_matrix,
    extract_dlib_chip,
    extract_square,
    haar_square,
    load_mini_xception,
)
from veil.validators.identity import wilson_interval

__all__ = [*_predictors.__all__, "AttributeAgreement"]


# --------------------------------------------------------------------------------------------
# Agreement between original and anonymized predictions, as mergeable state
# --------------------------------------------------------------------------------------------

_FIELDS = (
    "age_original",
    "age_anonymized",
    "gender_original",
    "gender_anonymized",
    "expression_original",
    "expression_anonymized",
    "age_wideresnet_original",
    "age_wideresnet_anonymized",
)
_SECOND_OPINION_FIELDS = _FIELDS[6:]


def _check_age(value: Any, what: str) -> float | None:
    if value is None:
        return None
    age = float(value)
    if not math.isfinite(age) or age < 0:
        raise ValueError(f"{what}: age must be a finite non-negative number, got {value!r}")
    return age


def _check_label(value: Any, labels: Sequence[str], what: str) -> str | None:
    if value is None:
        return None
    if value not in labels:
        raise ValueError(f"{what}: {value!r} is not one of {list(labels)}")
    return str(value)


def _mean_ci95(values: np.ndarray) -> list[float] | None:
    """Normal-approximation 95% interval of a mean (needs two values for a spread)."""
    if values.size < 2:
        return None
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(values.size)
    mean = float(values.mean())
    return [mean - half, mean + half]


class AttributeAgreement:
    """Per-face attribute predictions on original vs anonymized faces, as mergeable state.

    One row per face key (age, gender, expression and the second age opinion on each side;
    ``None`` where a model gave no prediction). :meth:`compute` reports the mean absolute age
    change (per age network), gender and expression
    agreement rates with Wilson intervals, confusion matrices (rows original, columns
    anonymized) and how many faces lacked a prediction per attribute. Rows are plain JSON, so
    :meth:`to_dict` is exact and merging shard states equals one pass.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[Any, ...]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def update(
        self,
        keys: Sequence[str],
        original: Sequence[Mapping[str, Any]],
        anonymized: Sequence[Mapping[str, Any]],
    ) -> None:
        """Add the :meth:`AttributeModels.predict` results of the same faces, one key per face."""
        ks = [str(k) for k in keys]
        if not len(ks) == len(original) == len(anonymized):
            raise ValueError(
                f"got {len(ks)} keys, {len(original)} original and {len(anonymized)} anonymized predictions"
            )
        if len(set(ks)) != len(ks):
            raise ValueError("face keys must be unique within a batch")
        dup = [k for k in ks if k in self._rows]
        if dup:
            raise ValueError(f"face keys already counted: {dup[:5]}")
        rows = {}
        for k, a, b in zip(ks, original, anonymized, strict=True):
            rows[k] = (
                _check_age(a.get("age"), f"{k} original"),
                _check_age(b.get("age"), f"{k} anonymized"),
                _check_label(a.get("gender"), GENDERS, f"{k} original gender"),
                _check_label(b.get("gender"), GENDERS, f"{k} anonymized gender"),
                _check_label(a.get("expression"), EXPRESSIONS, f"{k} original expression"),
                _check_label(b.get("expression"), EXPRESSIONS, f"{k} anonymized expression"),
                _check_age(a.get("age_wideresnet"), f"{k} original (WideResNet)"),
                _check_age(b.get("age_wideresnet"), f"{k} anonymized (WideResNet)"),
            )
        self._rows.update(rows)

    def merge(self, other: AttributeAgreement) -> AttributeAgreement:
        """A new state equal to having seen both inputs' faces (neither is mutated)."""
        if not isinstance(other, AttributeAgreement):
            raise TypeError(f"cannot merge AttributeAgreement with {type(other).__name__}")
        dup = self._rows.keys() & other._rows.keys()
        if dup:
            raise ValueError(f"shards overlap: face keys counted twice: {sorted(dup)[:5]}")
        out = AttributeAgreement()
        out._rows = {**self._rows, **other._rows}
        return out

    def per_face(self) -> list[dict[str, Any]]:
        """One row per face, sorted by key: the key and each attribute on both sides."""
        return [
            {"key": k, **dict(zip(_FIELDS, self._rows[k], strict=True))} for k in sorted(self._rows)
        ]

    def compute(self) -> dict[str, Any]:
        rows = [self._rows[k] for k in sorted(self._rows)]
        out: dict[str, Any] = {"faces": len(rows)}
        for attr, i in (("age", 0), ("age_wideresnet", 6)):
            ages = [(r[i], r[i + 1]) for r in rows if r[i] is not None and r[i + 1] is not None]
            diffs = np.array([b - a for a, b in ages], dtype=np.float64)
            errors = np.abs(diffs)
            out[f"{attr}_pairs"] = len(ages)
            out[f"{attr}_mae"] = float(errors.mean()) if errors.size else None
            ci = _mean_ci95(errors)
            out[f"{attr}_mae_ci95"] = None if ci is None else [max(0.0, ci[0]), ci[1]]
            out[f"{attr}_bias"] = float(diffs.mean()) if diffs.size else None
            out[f"{attr}_missing"] = len(rows) - len(ages)
        for attr, labels, i in (("gender", GENDERS, 2), ("expression", EXPRESSIONS, 4)):
            pairs = [(r[i], r[i + 1]) for r in rows if r[i] is not None and r[i + 1] is not None]
            index = {label: j for j, label in enumerate(labels)}
            matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
            for a, b in pairs:
                matrix[index[a], index[b]] += 1
            agree = int(np.trace(matrix))
            n = len(pairs)
            out[f"{attr}_pairs"] = n
            out[f"{attr}_agreement"] = agree / n if n else None
            out[f"{attr}_agreement_ci95"] = list(wilson_interval(agree, n))
            out[f"{attr}_confusion"] = {"labels": list(labels), "matrix": matrix.tolist()}
            out[f"{attr}_missing"] = len(rows) - n
        out["missing"] = {a: out[f"{a}_missing"] for a in VALIDATION_ATTRIBUTES}
        return out

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self._rows)
        data: dict[str, Any] = {"kind": "AttributeAgreement", "keys": keys}
        for j, field in enumerate(_FIELDS):
            data[field] = [self._rows[k][j] for k in keys]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeAgreement:
        if data.get("kind") != "AttributeAgreement":
            raise ValueError(f"not an AttributeAgreement state: kind={data.get('kind')!r}")
        keys = [str(k) for k in data["keys"]]
        # States written before the second age opinion existed have no such columns.
        columns = [list(data[f]) if f in data or f not in _SECOND_OPINION_FIELDS else [None] * len(keys)
                   for f in _FIELDS]
        if any(len(c) != len(keys) for c in columns):
            raise ValueError("AttributeAgreement state: columns differ in length from keys")
        out = cls()
        out.update(
            keys,
            [
                {"age": a, "gender": g, "expression": e, "age_wideresnet": w}
                for a, g, e, w in zip(columns[0], columns[2], columns[4], columns[6], strict=True)
            ],
            [
                {"age": a, "gender": g, "expression": e, "age_wideresnet": w}
                for a, g, e, w in zip(columns[1], columns[3], columns[5], columns[7], strict=True)
            ],
        )
        return out
