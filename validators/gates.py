"""Validation gates: thresholds on the validation metrics, checked as Great Expectations suites.

A release is published only if its gates pass. Gates compare computed metrics with thresholds;
nothing else (the metrics come from the validation engine, see ``summary.json``'s ``metrics``
and the ``samples`` / ``faces`` tables).

Gates file format (YAML; the shipped defaults are ``gates.yaml`` next to this module)::

    version: 1                      # required; the only version so far
    gates:
      - name: reidentification-dlib-resnet      # required, unique; letters, digits, . _ -
        description: "..."                      # optional free text for the report
        metric: identity.dlib-resnet.verification_rate   # a dataset-level flat metric name
        max: 0.02                               # min: and/or max: (inclusive), at least one
        required: true                          # default true, see "Missing values" below
        methods: [all]                          # default [all]; or a list of method names
        category: privacy                       # optional label: integrity, privacy, utility
        severity: critical                      # default critical; warning / info never block
        evidence:                               # optional, dataset gates only: which rows
          table: faces                          #   to list as failing_keys (the rows that
          where: {reidentified_dlib-resnet: true}   # count against the gate), sorted by
          order_by: sim_dlib-resnet             #   order_by, largest first unless
          descending: true                      #   descending: false
      - name: residual-faces
        table: samples                          # a per-row gate over "samples" or "faces"
        column: residual_faces                  # the gated column
        max: 0
        mostly: 1.0                             # fraction of rows that must be within bounds
        where: {status: paired}                 # optional row filter: column -> value or list
        nulls: fail                             # optional: fail (default) or ignore
        methods: [blur, pixelate, fill, dp-pixelate]

A file can build on another instead of copying it: ``extends`` takes that file's gates
(``default``: the shipped ones; else a path, relative to the extending file), ``overrides``
changes fields of its gates by name, and ``gates`` (optional then) adds new ones::

    version: 1
    extends: default
    overrides:
      age-mae: {severity: warning}              # measured and reported; no longer blocks
      face-lpips: {max: 0.30}
    gates:
      - {name: my-extra-gate, metric: face.ssim_mean, min: 0.8}

Every changed field is kept on the gate (:attr:`Gate.overridden`, ``overridden`` in
``summary.json``: ``{field: [value in the extended file, value now]}``) and shown in the
report, so a reviewer sees a loosened bound. A name that the extended file lacks, a new gate
named like an extended one, a renamed gate and a file that extends itself (directly or
through others) are errors.

Semantics:

* **Bounds** are inclusive (``max: 0`` means ``<= 0``). ``min > max``, a gate with no bound,
  unknown keys, duplicate names, an unknown table or method name are :class:`GateConfigError`s
  naming the file, the gate and the field. Method names are checked against
  :data:`KNOWN_METHODS` so that a typo cannot silently switch a gate off.
* **Methods.** :func:`load_gates` keeps the gates that apply to the run's anonymization method:
  those marked ``methods: [all]`` and those listing the method. Datasets anonymized by other
  tools have method ``"unknown"``: they get the ``[all]`` gates plus those that list
  ``unknown`` explicitly (the defaults list none: with an unknown method we cannot tell
  whether faces were obscured or replaced, so only method-independent gates apply).
* **Dataset gates** run as one GX suite (``dataset``) over a one-row DataFrame holding the
  metrics, one ``ExpectColumnValuesToBeBetween`` per gate. ``value`` is the metric, ``margin``
  how far it lies outside its bound.
* **Table gates** run as one GX suite per table (``samples``, ``faces``): one
  ``ExpectColumnValuesToBeBetween`` with ``mostly`` per gate, ``where`` as its GX row
  condition. ``value`` is the fraction of rows within bounds, ``margin`` how far that fraction
  lies below ``mostly``, ``failing_keys`` the rows outside the bounds (up to 50, furthest
  outside first), listed even when ``mostly`` lets the gate pass.
* **Nulls in table gates** count as failing by default (fail closed: a residual-face count
  that could not be computed is not a zero). GX ignores nulls in column-map expectations, so
  each gate validates its own column (``<column>@<gate name>``) in which nulls are replaced by
  +inf (-inf for a gate with only a ``min``): GX then counts them as unexpected and GX's
  verdict is the gate's verdict. ``nulls: ignore`` leaves them out of the count instead (for
  columns where null means "nothing to measure", such as ``background_psnr`` of an image that
  is all PII).
* **Severity** is Great Expectations' own (``FailureSeverity``), set on the gate's
  expectation. A ``critical`` gate (the default) decides the release; a ``warning`` or
  ``info`` gate is evaluated and reported the same way (status ``failed`` when outside its
  bounds) but never blocks: utility findings, such as photos released sideways, belong to
  the people using the data, not to the privacy verdict. ``category`` only labels a gate for
  the report (``integrity``, ``privacy`` or ``utility``; none when not given).
* **Missing values.** A dataset metric that is absent, None or NaN, a missing table or column,
  or a table with no row to check makes the gate ``not_evaluated`` with a reason. That blocks
  the release only when the gate is ``required``: :func:`overall_status` is ``"failed"`` if
  any critical gate failed or any required critical gate was not evaluated, and ``"passed"``
  only when at least one critical gate passed.

GX is imported lazily (it costs about 2 s); each :func:`evaluate_gates` call builds one
ephemeral context and validates at most three batches, and the validation results are written
to ``out_dir/gx/<suite>.json`` for the audit trail.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GATES_FILE_VERSION",
    "KNOWN_METHODS",
    "TABLE_KEYS",
    "MAX_FAILING_KEYS",
    "SEVERITIES",
    "CATEGORIES",
    "GateConfigError",
    "Evidence",
    "Gate",
    "GateResult",
    "load_gates",
    "load_gates_with_files",
    "parse_gates",
    "evaluate_gates",
    "overall_status",
    "gates_table",
    "write_results",
]

GATES_FILE_VERSION = 1
#: ``extends: default`` (and ``--gates default``) names the shipped gates file.
DEFAULT_GATES = "default"

#: Anonymization methods a gate may name. ``none`` (nothing anonymized) and ``unknown``
#: (a dataset from another tool) only ever get the ``[all]`` gates plus those naming them.
KNOWN_METHODS = frozenset(
    {"blur", "pixelate", "fill", "dp-pixelate", "fsap", "diffusion", "none", "unknown"}
)

#: The column that names a row of each table, reported in ``failing_keys``.
TABLE_KEYS = {"samples": "key", "faces": "face_key"}

MAX_FAILING_KEYS = 50

DATASET = "dataset"
_ALL = "all"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMON_FIELDS = {"name", "description", "min", "max", "required", "methods", "category", "severity"}
#: Great Expectations' failure severities; only ``critical`` gates block a release.
SEVERITIES = ("critical", "warning", "info")
CRITICAL = "critical"
#: Labels a gate may carry for the report.
CATEGORIES = ("integrity", "privacy", "utility")
_DATASET_FIELDS = _COMMON_FIELDS | {"metric", "table", "evidence"}
_TABLE_FIELDS = _COMMON_FIELDS | {"table", "column", "mostly", "where", "nulls"}
_EVIDENCE_FIELDS = {"table", "where", "order_by", "descending"}


class GateConfigError(ValueError):
    """An invalid gates file; the message names the file, the gate and the field."""

    def __init__(
        self, source: str, message: str, *, gate: str | None = None, field: str | None = None
    ):
        self.source = source
        self.gate = gate
        self.field = field
        where = source
        if gate is not None:
            where += f": gate {gate!r}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Evidence:
    """Rows that count against a dataset gate, listed as its ``failing_keys``."""

    table: str
    where: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    order_by: str | None = None
    descending: bool = True


@dataclass(frozen=True)
class Gate:
    """One threshold. ``table == "dataset"`` gates a flat metric, else a table column."""

    name: str
    metric: str  # flat metric name (dataset) or column name (samples / faces)
    table: str = DATASET
    description: str = ""
    min: float | None = None
    max: float | None = None
    mostly: float | None = None  # table gates only; 1.0 when not given
    required: bool = True
    methods: tuple[str, ...] = (_ALL,)
    where: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # table gates only
    nulls: str = "fail"  # table gates only: "fail" or "ignore"
    evidence: Evidence | None = None  # dataset gates only
    severity: str = CRITICAL  # GX FailureSeverity; only critical gates block a release
    category: str | None = None  # integrity | privacy | utility, for the report
    #: (field, value in the extended file, value now) for each field a file's ``overrides``
    #: changed; shown in summary.json and the report so a reviewer sees every loosened bound.
    overridden: tuple[tuple[str, Any, Any], ...] = ()

    @property
    def blocking(self) -> bool:
        return self.severity == CRITICAL

    def applies_to(self, method: str) -> bool:
        return _ALL in self.methods or method in self.methods

    def distance(self, value: float) -> float:
        """How far ``value`` lies outside ``[min, max]`` (0 inside; inf for NaN)."""
        if math.isnan(value):
            return math.inf
        below = self.min - value if self.min is not None else 0.0
        above = value - self.max if self.max is not None else 0.0
        return max(below, above, 0.0)


@dataclass
class GateResult:
    """The outcome of one gate; :meth:`to_dict` is the ``gates`` entry of ``summary.json``."""

    name: str
    description: str
    table: str
    metric: str
    min: float | None
    max: float | None
    mostly: float | None
    required: bool
    value: float | None
    status: str  # "passed" | "failed" | "not_evaluated"
    margin: float | None
    failing_keys: list[str] = field(default_factory=list)
    reason: str | None = None
    severity: str = CRITICAL
    category: str | None = None
    overridden: dict[str, list[Any]] = field(default_factory=dict)  # field -> [extended, now]

    @property
    def blocking(self) -> bool:
        """Whether this gate can withhold the release (critical severity)."""
        return self.severity == CRITICAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "table": self.table,
            "metric": self.metric,
            "min": self.min,
            "max": self.max,
            "mostly": self.mostly,
            "required": self.required,
            "value": self.value,
            "status": self.status,
            "margin": self.margin,
            "failing_keys": list(self.failing_keys),
            "reason": self.reason,
            "severity": self.severity,
            "category": self.category,
            "blocking": self.blocking,
            "overridden": {k: list(v) for k, v in self.overridden.items()},
        }


# --------------------------------------------------------------------------------------------
# Loading and validating a gates file
# --------------------------------------------------------------------------------------------


def load_gates(path: str | Path | None, *, method: str) -> list[Gate]:
    """Read and validate a gates file (``None``: the shipped defaults); keep ``method``'s gates."""
    return load_gates_with_files(path, method=method)[0]


def load_gates_with_files(path: str | Path | None, *, method: str) -> tuple[list[Gate], list[dict[str, str]]]:
    """:func:`load_gates`, and the files its gates were read from in one pass: the file itself
    first, then each one it extends, as ``{"file", "sha256"}`` (sha256 of the text applied),
    for summary.json and RELEASE.json, so an audit can tell which gates were applied even
    after a file changes."""
    if method not in KNOWN_METHODS:
        raise ValueError(f"unknown anonymization method {method!r}; known: {sorted(KNOWN_METHODS)}")
    source, document, digest = _read_document(path)
    read = [{"file": source, "sha256": digest}]
    base_dir = _base_dir(path)
    entries = _entries(document, source=source, base_dir=base_dir, chain=_chain(source, base_dir), read=read)
    return [gate for gate in _gates_from(entries) if gate.applies_to(method)], read


def _base_dir(path: str | Path | None) -> Path | None:
    return None if path is None or str(path) == DEFAULT_GATES else Path(path).resolve().parent


def _chain(source: str, base_dir: Path | None) -> tuple[str, ...]:
    return (str(Path(source).resolve()),) if base_dir is not None else ()


def _read_document(path: str | Path | None) -> tuple[str, Any, str]:
    """(source name, parsed YAML, sha256 of the text) of a gates file; ``None`` or
    ``"default"``: the shipped one."""
    import hashlib

    import yaml

    if path is None or str(path) == DEFAULT_GATES:
        resource = resources.files("veil.validators").joinpath("gates.yaml")
        source, text = str(resource), resource.read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise GateConfigError(source, f"cannot be read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        return source, yaml.safe_load(text), digest
    except yaml.YAMLError as exc:
        raise GateConfigError(source, f"not valid YAML: {exc}") from exc


def parse_gates(document: Any, *, source: str = "<gates>", base_dir: Path | None = None) -> list[Gate]:
    """Validate a parsed gates document and return all its gates, whatever their methods.

    ``extends`` (a file path, relative to ``base_dir``, or ``default``: the shipped gates)
    takes another file's gates first; ``overrides`` then changes fields of those gates by name
    (each result records what it changed from the base in :attr:`Gate.overridden`), and
    ``gates`` adds new ones."""
    return _gates_from(_entries(document, source=source, base_dir=base_dir, chain=_chain(source, base_dir)))


def _gates_from(entries: list[tuple[dict, str, dict | None]]) -> list[Gate]:
    """The gates of :func:`_entries`' raw entries, each overridden one with its changes."""
    gates: list[Gate] = []
    per_file: dict[str, int] = {}  # an unnamed gate is labelled by its place in its own file
    for entry, entry_source, base in entries:
        index = per_file[entry_source] = per_file.get(entry_source, -1) + 1
        gate = _parse_gate(entry, index=index, source=entry_source)
        if base is not None:
            before = _parse_gate(base, index=index, source=entry_source)
            gate = replace(gate, overridden=_differences(before, gate))
        gates.append(gate)
    return gates


def _entries(document: Any, *, source: str, base_dir: Path | None, chain: tuple[str, ...],
             read: list[dict[str, str]] | None = None) -> list[tuple[dict, str, dict | None]]:
    """The raw gate entries a document stands for, in order, each with the file it comes from
    and, where ``overrides`` changed it, the entry before the change. Each extended file read
    is appended to ``read`` (``{"file", "sha256"}``) when given."""
    if not isinstance(document, dict):
        raise GateConfigError(source, "must be a mapping with 'version' and 'gates'")
    unknown = sorted(set(document) - {"version", "gates", "extends", "overrides"})
    if unknown:
        raise GateConfigError(source, "unknown top-level key", field=str(unknown[0]))
    if document.get("version") != GATES_FILE_VERSION:
        raise GateConfigError(
            source,
            f"must be {GATES_FILE_VERSION}, got {document.get('version')!r}",
            field="version",
        )
    extends = document.get("extends")
    if "gates" not in document and extends is None:
        raise GateConfigError(source, "must be a list of gates", field="gates")
    added = document.get("gates", [])
    if not isinstance(added, list):
        raise GateConfigError(source, "must be a list of gates", field="gates")
    overrides = document.get("overrides", {})
    if not isinstance(overrides, dict):
        raise GateConfigError(source, "must map gate names to the fields to change", field="overrides")
    if overrides and extends is None:
        raise GateConfigError(source, "overrides change the gates of the file named by 'extends'; "
                                      "there is none", field="overrides")

    entries: list[tuple[dict, str, dict | None]] = []
    if extends is not None:
        if not isinstance(extends, str) or not extends:
            raise GateConfigError(source, "must be a gates file's path or 'default'", field="extends")
        if extends == DEFAULT_GATES:
            parent: str | Path | None = None
        else:
            parent = Path(extends).expanduser()
            if not parent.is_absolute():
                parent = (base_dir or Path.cwd()) / parent
        parent_source, parent_document, parent_digest = _read_document(parent)
        if read is not None:
            read.append({"file": parent_source, "sha256": parent_digest})
        key = str(Path(parent).resolve()) if parent is not None else DEFAULT_GATES
        if key in chain:
            raise GateConfigError(source, f"extends {extends!r}, which is already being read: the files "
                                          "extend each other in a loop", field="extends")
        entries = _entries(parent_document, source=parent_source,
                           base_dir=None if parent is None else Path(parent).resolve().parent,
                           chain=(*chain, key), read=read)
        index = {entry.get("name"): i for i, (entry, _, _) in enumerate(entries)}
        for name, change in overrides.items():
            if name not in index:
                raise GateConfigError(source, f"no such gate in {parent_source}", gate=str(name), field="overrides")
            if not isinstance(change, dict) or not change:
                raise GateConfigError(source, "must map field names to new values", gate=str(name), field="overrides")
            if "name" in change:
                raise GateConfigError(source, "a gate's name cannot be overridden; add a new gate instead",
                                      gate=str(name), field="name")
            entry, _, base = entries[index[name]]
            entries[index[name]] = ({**entry, **change}, source, base if base is not None else entry)

    seen = {entry.get("name") for entry, _, _ in entries}
    for entry in added:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in seen:
            hint = " (change an extended gate under 'overrides')" if extends is not None else ""
            raise GateConfigError(source, f"duplicate gate name{hint}", gate=str(name), field="name")
        seen.add(name)
        entries.append((entry, source, None))
    return entries


def _differences(before: Gate, after: Gate) -> tuple[tuple[str, Any, Any], ...]:
    """(field, before, after) for every field of ``after`` that differs from ``before``."""
    out = []
    for f in fields(Gate):
        if f.name == "overridden":
            continue
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old != new:
            out.append((f.name, _plain(old), _plain(new)))
    return tuple(out)


def _plain(value: Any) -> Any:
    """A gate field's value as JSON would hold it (tuples as lists, evidence as a mapping)."""
    if isinstance(value, Evidence):
        return {"table": value.table, "where": {k: list(v) for k, v in value.where.items()},
                "order_by": value.order_by, "descending": value.descending}
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _parse_gate(entry: Any, *, index: int, source: str) -> Gate:
    label = f"#{index + 1}"
    if not isinstance(entry, dict):
        raise GateConfigError(source, "must be a mapping", gate=label)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GateConfigError(
            source,
            "must be a non-empty string of letters, digits, '.', '_', '-'",
            gate=label,
            field="name",
        )

    def fail(field_name: str, message: str) -> GateConfigError:
        return GateConfigError(source, message, gate=name, field=field_name)

    table = entry.get("table", DATASET)
    if table != DATASET and table not in TABLE_KEYS:
        raise fail("table", f"unknown table {table!r}; known: {[DATASET, *TABLE_KEYS]}")
    allowed = _DATASET_FIELDS if table == DATASET else _TABLE_FIELDS
    for key in entry:
        if key not in allowed:
            hint = " (dataset gates take 'metric', table gates 'table' and 'column')"
            raise fail(str(key), f"unknown key for a {table} gate{hint}")

    target_key = "metric" if table == DATASET else "column"
    target = entry.get(target_key)
    if not isinstance(target, str) or not target:
        raise fail(target_key, "required, a non-empty string")

    description = entry.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string")
    low = _bound(entry, "min", fail)
    high = _bound(entry, "max", fail)
    if low is None and high is None:
        raise fail("min", "a gate needs a bound: give min, max or both")
    if low is not None and high is not None and low > high:
        raise fail("min", f"min {low} is greater than max {high}")

    required = entry.get("required", True)
    if not isinstance(required, bool):
        raise fail("required", "must be true or false")
    methods = _methods(entry.get("methods", [_ALL]), fail)
    severity = entry.get("severity", CRITICAL)
    if severity not in SEVERITIES:
        raise fail("severity", f"must be one of {list(SEVERITIES)}, got {severity!r}")
    category = entry.get("category")
    if category is not None and category not in CATEGORIES:
        raise fail("category", f"must be one of {list(CATEGORIES)}, got {category!r}")

    mostly = None
    where: dict[str, tuple[Any, ...]] = {}
    nulls = "fail"
    evidence = None
    if table == DATASET:
        if "evidence" in entry:
            evidence = _evidence(entry["evidence"], fail)
    else:
        mostly = entry.get("mostly", 1.0)
        if (
            isinstance(mostly, bool)
            or not isinstance(mostly, int | float)
            or not 0.0 < mostly <= 1.0
        ):
            raise fail("mostly", f"must be a number in (0, 1], got {mostly!r}")
        mostly = float(mostly)
        where = _where(entry.get("where", {}), lambda msg: fail("where", msg))
        nulls = entry.get("nulls", "fail")
        if nulls not in ("fail", "ignore"):
            raise fail("nulls", f"must be 'fail' or 'ignore', got {nulls!r}")
    return Gate(
        name=name,
        metric=target,
        table=table,
        description=description,
        min=low,
        max=high,
        mostly=mostly,
        required=required,
        methods=methods,
        where=where,
        nulls=nulls,
        evidence=evidence,
        severity=severity,
        category=category,
    )


def _bound(entry: dict, key: str, fail) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(key, f"must be a finite number, got {value!r}")
    return float(value)


def _methods(value: Any, fail) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise fail("methods", "must be a non-empty list of method names or [all]")
    for method in value:
        if method != _ALL and method not in KNOWN_METHODS:
            raise fail(
                "methods", f"unknown method {method!r}; known: {[_ALL, *sorted(KNOWN_METHODS)]}"
            )
    return tuple(value)


def _where(value: Any, fail) -> dict[str, tuple[Any, ...]]:
    if not isinstance(value, dict):
        raise fail("must map column names to a value or a list of values")
    where = {}
    for column, accepted in value.items():
        values = accepted if isinstance(accepted, list) else [accepted]
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise fail(f"column {column!r}: values must be strings, numbers or booleans")
        where[str(column)] = tuple(values)
    return where


def _evidence(value: Any, fail) -> Evidence:
    if not isinstance(value, dict):
        raise fail("evidence", "must be a mapping with 'table' and optional 'where', 'order_by'")
    unknown = sorted(set(value) - _EVIDENCE_FIELDS)
    if unknown:
        raise fail("evidence", f"unknown key {unknown[0]!r}")
    table = value.get("table")
    if table not in TABLE_KEYS:
        raise fail("evidence", f"table must be one of {list(TABLE_KEYS)}, got {table!r}")
    order_by = value.get("order_by")
    if order_by is not None and not isinstance(order_by, str):
        raise fail("evidence", "order_by must be a column name")
    descending = value.get("descending", True)
    if not isinstance(descending, bool):
        raise fail("evidence", "descending must be true or false")
    where = _where(value.get("where", {}), lambda msg: fail("evidence", f"where: {msg}"))
    return Evidence(table=table, where=where, order_by=order_by, descending=descending)


# --------------------------------------------------------------------------------------------
# Evaluating gates with Great Expectations
# --------------------------------------------------------------------------------------------


def evaluate_gates(
    gates: list[Gate],
    metrics: dict[str, float | int | None],
    tables: dict[str, pd.DataFrame],
    out_dir: Path,
) -> list[GateResult]:
    """Check ``gates`` against dataset ``metrics`` and the per-row ``tables``, in gate order.

    The GX validation results are written to ``out_dir/gx/<suite>.json`` (``dataset``,
    ``samples``, ``faces``; only for suites with at least one evaluable gate).
    """
    names = [gate.name for gate in gates]
    if len(set(names)) != len(names):
        raise ValueError(f"gate names must be unique, got {names}")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    results: dict[str, GateResult] = {}
    suites: dict[str, _SuitePlan] = {}
    for gate in gates:
        if gate.table == DATASET:
            outcome = _plan_dataset_gate(gate, metrics, suites)
        else:
            outcome = _plan_table_gate(gate, tables, suites)
        if outcome is not None:  # decided without GX (not_evaluated)
            results[gate.name] = outcome
    if suites:
        context = _gx_context()
        gx_dir = Path(out_dir) / "gx"
        gx_dir.mkdir(parents=True, exist_ok=True)
        for plan in suites.values():
            validation = _run_suite(context, plan)
            (gx_dir / f"{plan.name}.json").write_text(
                json.dumps(validation.to_json_dict(), indent=2), encoding="utf-8"
            )
            for gate, check in zip(plan.gates, validation.results, strict=True):
                results[gate.name] = plan.interpret(gate, check, tables)
    return [results[gate.name] for gate in gates]


def overall_status(results: list[GateResult]) -> str:
    """``"failed"`` if a critical gate failed or a required critical one was not evaluated;
    ``"passed"`` only when at least one critical gate passed and none of that happened.
    Warning and info gates are reported and never decide."""
    deciding = [r for r in results if r.blocking]
    if any(r.status == "failed" or (r.status == "not_evaluated" and r.required) for r in deciding):
        return "failed"
    return "passed" if any(r.status == "passed" for r in deciding) else "failed"


def gates_table(results: list[GateResult]) -> list[dict[str, Any]]:
    """One flat row per gate for the report: the bound written out, value and status."""
    rows = []
    for r in results:
        rows.append(
            {
                "gate": r.name,
                "status": r.status,
                "required": r.required,
                "table": r.table,
                "metric": r.metric,
                "bound": _describe_bound(r.min, r.max, r.mostly),
                "value": r.value,
                "margin": r.margin,
                "failing": len(r.failing_keys),
                "reason": r.reason or "",
                "description": r.description,
                "severity": r.severity,
                "category": r.category or "",
            }
        )
    return rows


def write_results(results: list[GateResult], path: str | Path) -> None:
    """Write the gate results and the overall status as JSON (non-finite floats as Infinity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"status": overall_status(results), "gates": [r.to_dict() for r in results]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _describe_bound(low: float | None, high: float | None, mostly: float | None) -> str:
    if low is not None and high is not None:
        text = f"{low:g} <= x <= {high:g}"
    elif low is not None:
        text = f"x >= {low:g}"
    else:
        text = f"x <= {high:g}"
    if mostly is not None:
        text += f" for >= {mostly:.1%} of rows"
    return text


def _gx_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # Progress bars would write to stderr once per expectation.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


@dataclass
class _SuitePlan:
    """One GX suite: its DataFrame, the gates it checks and how GX columns map to them."""

    name: str
    key: str
    frame: dict[str, Any]  # column name -> values, turned into one DataFrame
    gates: list[Gate] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)  # gate name -> GX column
    selectors: dict[str, str] = field(default_factory=dict)  # gate name -> 0/1 "where" column
    nulls: dict[str, int] = field(default_factory=dict)  # gate name -> nulls counted as failing

    def interpret(self, gate: Gate, check: Any, tables: dict[str, pd.DataFrame]) -> GateResult:
        if check.exception_info and check.exception_info.get("raised_exception"):
            return _not_evaluated(
                gate, f"Great Expectations raised: {check.exception_info.get('exception_message')}"
            )
        if self.name == DATASET:
            return self._interpret_dataset(gate, check, tables)
        return self._interpret_table(gate, check)

    def _interpret_dataset(
        self, gate: Gate, check: Any, tables: dict[str, pd.DataFrame]
    ) -> GateResult:
        value = float(self.frame[self.columns[gate.name]][0])
        passed = bool(check.success)
        margin = 0.0 if passed else gate.distance(value)
        keys = _evidence_keys(gate.evidence, tables) if gate.evidence is not None else []
        reason = (
            None
            if passed
            else f"{gate.metric} = {value:g} is outside {_describe_bound(gate.min, gate.max, None)}"
        )
        return _result(
            gate,
            value=value,
            status="passed" if passed else "failed",
            margin=margin,
            keys=keys,
            reason=reason,
        )

    def _interpret_table(self, gate: Gate, check: Any) -> GateResult:
        summary = check.result
        considered = int(summary["element_count"]) - int(summary.get("missing_count") or 0)
        outside = int(summary["unexpected_count"])
        value = (considered - outside) / considered
        passed = bool(check.success)
        values = self.frame[self.columns[gate.name]]
        selected = self._selected(gate)
        keys = _worst_keys(values, self.frame[self.key], gate, selected)
        reason = (
            f"{outside} of {considered} rows outside {_describe_bound(gate.min, gate.max, None)}"
        )
        if self.nulls.get(gate.name):
            reason += f" ({self.nulls[gate.name]} of them null)"
        return _result(
            gate,
            value=value,
            status="passed" if passed else "failed",
            margin=0.0 if passed else max(gate.mostly - value, 0.0),
            keys=keys,
            reason=reason if outside else None,
        )

    def _selected(self, gate: Gate):
        selector = self.selectors.get(gate.name)
        return None if selector is None else self.frame[selector] == 1


def _result(gate: Gate, *, value, status, margin, keys, reason) -> GateResult:
    return GateResult(
        name=gate.name,
        description=gate.description,
        table=gate.table,
        metric=gate.metric,
        min=gate.min,
        max=gate.max,
        mostly=gate.mostly,
        required=gate.required,
        value=value,
        status=status,
        margin=margin,
        failing_keys=keys,
        reason=reason,
        severity=gate.severity,
        category=gate.category,
        overridden={name: [old, new] for name, old, new in gate.overridden},
    )


def _not_evaluated(gate: Gate, why: str) -> GateResult:
    if not gate.blocking:
        consequence = f"{gate.severity}: does not block"
    else:
        consequence = "required: blocks the release" if gate.required else "optional: does not block"
    return _result(
        gate,
        value=None,
        status="not_evaluated",
        margin=None,
        keys=[],
        reason=f"{why} ({consequence})",
    )


def _plan_dataset_gate(
    gate: Gate, metrics: dict[str, Any], suites: dict[str, _SuitePlan]
) -> GateResult | None:
    raw = metrics.get(gate.metric)
    if raw is None:
        why = "not computed" if gate.metric in metrics else "not reported"
        return _not_evaluated(gate, f"metric {gate.metric} {why}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return _not_evaluated(gate, f"metric {gate.metric} is not a number: {raw!r}")
    if math.isnan(value):
        return _not_evaluated(gate, f"metric {gate.metric} is NaN")
    plan = suites.get(DATASET)
    if plan is None:
        plan = suites[DATASET] = _SuitePlan(name=DATASET, key="key", frame={"key": ["dataset"]})
    plan.frame[gate.metric] = [value]
    plan.columns[gate.name] = gate.metric
    plan.gates.append(gate)
    return None


def _plan_table_gate(
    gate: Gate, tables: dict[str, pd.DataFrame], suites: dict[str, _SuitePlan]
) -> GateResult | None:
    import pandas as pd

    table = tables.get(gate.table)
    if table is None:
        return _not_evaluated(gate, f"table {gate.table} not provided")
    key = TABLE_KEYS[gate.table]
    for column in (key, gate.metric, *gate.where):
        if column not in table.columns:
            return _not_evaluated(gate, f"table {gate.table} has no column {column!r}")
    raw = table[gate.metric]
    try:
        # via object dtype so that nullable booleans and integers become floats with NaN
        numeric = pd.to_numeric(raw.astype(object).where(raw.notna(), None), errors="raise")
    except (TypeError, ValueError):
        return _not_evaluated(
            gate, f"column {gate.table}.{gate.metric} is not numeric ({raw.dtype})"
        )
    values = numeric.to_numpy(dtype=float, copy=True)
    selected = np.ones(len(table), dtype=bool)
    for column, accepted in gate.where.items():
        selected &= table[column].isin(list(accepted)).to_numpy()
    null = np.isnan(values)
    considered = selected & ~null if gate.nulls == "ignore" else selected
    if not considered.any():
        what = "no row matches where" if not selected.any() else "every value is null"
        return _not_evaluated(gate, f"table {gate.table}: {what}")
    if gate.nulls == "fail":
        # GX skips nulls in column-map expectations; a value beyond the bound makes it count.
        values[null] = math.inf if gate.max is not None else -math.inf

    plan = suites.get(gate.table)
    if plan is None:
        plan = suites[gate.table] = _SuitePlan(
            name=gate.table, key=key, frame={key: table[key].astype(str).to_numpy()}
        )
    gx_column = f"{gate.metric}@{gate.name}"
    plan.frame[gx_column] = values
    plan.columns[gate.name] = gx_column
    if gate.where:
        # GX row conditions take no booleans and compare 1 with 1.0 differently from pandas:
        # select with pandas, let GX filter on the 0/1 result.
        plan.selectors[gate.name] = f"where@{gate.name}"
        plan.frame[plan.selectors[gate.name]] = selected.astype(np.int8)
    if gate.nulls == "fail":
        plan.nulls[gate.name] = int((null & selected).sum())
    plan.gates.append(gate)
    return None


def _run_suite(context: Any, plan: _SuitePlan) -> Any:
    import great_expectations as gx
    import pandas as pd
    from great_expectations.expectations.row_conditions import Column

    frame = pd.DataFrame(plan.frame)
    source = context.data_sources.add_pandas(f"veil-{plan.name}")
    asset = source.add_dataframe_asset(plan.name)
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = gx.ExpectationSuite(name=plan.name)
    for gate in plan.gates:
        kwargs: dict[str, Any] = {
            "column": plan.columns[gate.name],
            "min_value": gate.min,
            "max_value": gate.max,
            "meta": {"gate": gate.name, "metric": gate.metric, "required": gate.required,
                     "category": gate.category},
            "severity": gate.severity,
        }
        if gate.table != DATASET:
            kwargs["mostly"] = gate.mostly
            kwargs["meta"].update(
                nulls=gate.nulls, where={c: list(v) for c, v in gate.where.items()}
            )
            if gate.name in plan.selectors:
                kwargs["row_condition"] = Column(plan.selectors[gate.name]) == 1
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(**kwargs))
    # SUMMARY, not COMPLETE: the result names the first unexpected rows by key without
    # listing every failing row of a table that may hold millions; Veil ranks the worst rows
    # itself from the same column GX checked.
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": [plan.key],
        "partial_unexpected_count": MAX_FAILING_KEYS,
    }
    return batch.validate(suite, result_format=result_format)


def _worst_keys(values: Any, keys: Any, gate: Gate, selected: Any) -> list[str]:
    """Keys of the rows outside the bounds, furthest outside first (ties in table order)."""
    values = np.asarray(values, dtype=float)
    distance = np.zeros(len(values))
    if gate.max is not None:
        distance = np.maximum(distance, values - gate.max)
    if gate.min is not None:
        distance = np.maximum(distance, gate.min - values)
    distance = np.where(np.isnan(values), 0.0, distance)  # nulls left in were ignored
    if selected is not None:
        distance = np.where(np.asarray(selected, dtype=bool), distance, 0.0)
    outside = np.flatnonzero(distance > 0)
    order = outside[np.argsort(-distance[outside], kind="stable")][:MAX_FAILING_KEYS]
    keys = np.asarray(keys)
    return [str(k) for k in keys[order]]


def _evidence_keys(evidence: Evidence, tables: dict[str, pd.DataFrame]) -> list[str]:
    table = tables.get(evidence.table)
    key = TABLE_KEYS[evidence.table]
    needed = [key, *evidence.where, *([evidence.order_by] if evidence.order_by else [])]
    if table is None or any(column not in table.columns for column in needed):
        return []
    rows = table
    for column, accepted in evidence.where.items():
        rows = rows[rows[column].isin(list(accepted))]
    if evidence.order_by:
        rows = rows.sort_values(
            evidence.order_by, ascending=not evidence.descending, kind="stable", na_position="last"
        )
    return [str(k) for k in rows[key].head(MAX_FAILING_KEYS)]
