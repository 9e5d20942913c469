"""Validation gates: the gates file format, the shipped defaults, and GX-backed evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from veil.validators.gates import (
    KNOWN_METHODS,
    MAX_FAILING_KEYS,
    Gate,
    GateConfigError,
    GateResult,
    evaluate_gates,
    gates_table,
    load_gates,
    overall_status,
    parse_gates,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
OBSCURING = {"blur", "pixelate", "fill", "dp-pixelate"}
#: Methods whose released images must hold no detectable face: the obscuring ones, and the
#: "none" debug method, which claims nothing and must fail loudly.
NO_RESIDUAL = OBSCURING | {"none"}
SYNTHESIS = {"fsap", "diffusion"}


def write_gates(tmp_path: Path, gates: list[dict], **top) -> Path:
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "gates": gates, **top}), encoding="utf-8")
    return path


def dataset_gate(name="g", metric="m", **kw) -> Gate:
    return parse_gates({"version": 1, "gates": [{"name": name, "metric": metric, **kw}]})[0]


def table_gate(name="t", table="samples", column="v", **kw) -> Gate:
    gate = {"name": name, "table": table, "column": column, **kw}
    return parse_gates({"version": 1, "gates": [gate]})[0]


def samples(values, **columns) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"s{i:03d}" for i in range(len(values))], "v": values, **columns})


# --------------------------------------------------------------------------------------------
# Shipped defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(KNOWN_METHODS))
def test_defaults_load_for_every_method(method):
    gates = {g.name: g for g in load_gates(None, method=method)}
    # identity gates apply to every method; only dlib ResNet (a core dependency) is required
    for rec in ("dlib-resnet", "mobilefacenet", "facenet-vggface2"):
        verification = gates[f"reidentification-{rec}"]
        assert verification.metric == f"identity.{rec}.verification_rate"
        assert verification.max is not None and verification.max <= 0.05
        assert verification.required == (rec == "dlib-resnet")
        assert gates[f"identification-top1-{rec}"].metric == f"identity.{rec}.top1_excess"
    assert gates["background-psnr"].table == "samples"
    assert gates["background-psnr"].mostly == 0.95
    assert gates["background-psnr"].nulls == "ignore"
    # obscuring methods: no residual face, no detection-rate floor; synthesis: the reverse
    assert ("residual-faces" in gates) == (method in NO_RESIDUAL)
    assert gates["unvalidated-releases"].metric == "missing_original" and gates["unvalidated-releases"].required
    assert gates["validation-errors"].metric == "errors" and gates["validation-errors"].max == 0
    has_detection_floor = any(g.metric.startswith("detection.") for g in gates.values())
    assert has_detection_floor == (method in SYNTHESIS)
    assert ("kid-mobilenetv2" in gates) == (method in SYNTHESIS)
    assert ("gender-agreement" in gates) == (method in SYNTHESIS)
    assert ("face-color-shift" in gates) == (method in SYNTHESIS)
    if method in OBSCURING:
        residual = gates["residual-faces"]
        assert (residual.table, residual.metric, residual.max, residual.mostly) == (
            "samples",
            "residual_faces",
            0.0,
            1.0,
        )


def test_unknown_method_gets_only_the_method_independent_defaults():
    everything = parse_gates(yaml.safe_load((ROOT / "validators" / "gates.yaml").read_text()))
    universal = [g.name for g in everything if g.methods == ("all",)]
    assert [g.name for g in load_gates(None, method="unknown")] == universal
    assert len(universal) < len(everything)


def test_method_filter_all_and_unknown(tmp_path):
    path = write_gates(
        tmp_path,
        [
            {"name": "everyone", "metric": "a", "max": 1},
            {"name": "foreign", "metric": "b", "max": 1, "methods": ["unknown"]},
            {"name": "blurred", "metric": "c", "max": 1, "methods": ["blur", "fsap"]},
        ],
    )
    assert [g.name for g in load_gates(path, method="unknown")] == ["everyone", "foreign"]
    assert [g.name for g in load_gates(path, method="blur")] == ["everyone", "blurred"]
    assert [g.name for g in load_gates(str(path), method="fill")] == ["everyone"]
    with pytest.raises(ValueError, match="unknown anonymization method 'blurr'"):
        load_gates(path, method="blurr")


# --------------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gates", "gate_name", "field", "message"),
    [
        ([{"name": "a", "metric": "m", "max": 1, "maxx": 2}], "a", "maxx", "unknown key"),
        (
            [{"name": "a", "metric": "m", "max": 1}, {"name": "a", "metric": "n", "max": 1}],
            "a",
            "name",
            "duplicate",
        ),
        ([{"name": "a", "metric": "m", "min": 2, "max": 1}], "a", "min", "greater than max"),
        (
            [{"name": "a", "table": "pixels", "column": "c", "max": 1}],
            "a",
            "table",
            "unknown table",
        ),
        ([{"name": "a", "metric": "m"}], "a", "min", "needs a bound"),
        ([{"name": "a", "metric": "m", "max": 1, "methods": ["blurr"]}], "a", "methods", "blurr"),
        (
            [{"name": "a", "table": "samples", "column": "c", "max": 1, "mostly": 1.5}],
            "a",
            "mostly",
            "(0, 1]",
        ),
        (
            [{"name": "a", "table": "samples", "metric": "c", "max": 1}],
            "a",
            "metric",
            "unknown key",
        ),
        ([{"name": "a", "metric": "m", "max": 1, "mostly": 0.9}], "a", "mostly", "unknown key"),
        ([{"name": "a", "table": "faces", "max": 1}], "a", "column", "required"),
        ([{"name": "a", "metric": "m", "max": "low"}], "a", "max", "finite number"),
        (
            [{"name": "a", "metric": "m", "max": 1, "required": "yes"}],
            "a",
            "required",
            "true or false",
        ),
        (
            [{"name": "a", "table": "faces", "column": "c", "max": 1, "nulls": "skip"}],
            "a",
            "nulls",
            "ignore",
        ),
        (
            [{"name": "a", "metric": "m", "max": 1, "evidence": {"table": "x"}}],
            "a",
            "evidence",
            "table",
        ),
        ([{"metric": "m", "max": 1}], "#1", "name", "non-empty string"),
    ],
)
def test_config_errors_name_file_gate_and_field(tmp_path, gates, gate_name, field, message):
    path = write_gates(tmp_path, gates)
    with pytest.raises(GateConfigError) as info:
        load_gates(path, method="blur")
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.gate, error.field) == (gate_name, field)
    text = str(error)
    assert str(path) in text and f"gate {gate_name!r}" in text and f"field {field!r}" in text
    assert message in text


def test_file_level_errors(tmp_path):
    bad_version = tmp_path / "gates.yaml"
    bad_version.write_text("version: 2\ngates: []\n")
    with pytest.raises(GateConfigError, match="field 'version'"):
        load_gates(bad_version, method="blur")
    bad_version.write_text("version: 1\ngates: []\nextra: 1\n")
    with pytest.raises(GateConfigError, match="field 'extra'"):
        load_gates(bad_version, method="blur")
    bad_version.write_text("version: 1\ngates: [\n")
    with pytest.raises(GateConfigError, match="not valid YAML") as info:
        load_gates(bad_version, method="blur")
    assert str(bad_version) in str(info.value)


def test_a_file_extends_the_defaults_and_overrides_gates_by_name(tmp_path):
    """A user's file changes two shipped gates and adds one; every other shipped gate stays
    as shipped, and each change is recorded on the gate and in its result."""
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "extends": "default",
        "overrides": {"age-mae": {"severity": "warning"}, "face-lpips": {"max": 0.3, "required": True}},
        "gates": [{"name": "face-ssim", "metric": "face.ssim_mean", "min": 0.8, "methods": ["fsap"]}],
    }))
    shipped = {g.name: g for g in load_gates(None, method="fsap")}
    mine = {g.name: g for g in load_gates(path, method="fsap")}
    assert set(mine) == set(shipped) | {"face-ssim"}
    assert mine["age-mae"].severity == "warning" and not mine["age-mae"].blocking
    assert mine["age-mae"].overridden == (("severity", "critical", "warning"),)
    assert dict((f, (a, b)) for f, a, b in mine["face-lpips"].overridden) == {
        "max": (shipped["face-lpips"].max, 0.3), "required": (False, True)}
    assert mine["face-ssim"].overridden == () and mine["face-ssim"].min == 0.8
    for name in set(shipped) - {"age-mae", "face-lpips"}:
        assert mine[name] == shipped[name], name
    # a blur run gets neither fsap's gates nor the new one
    assert "face-ssim" not in {g.name for g in load_gates(path, method="blur")}

    metrics = {"attributes.age_mae": 14.1, "identity.dlib-resnet.verification_rate": 0.0}
    results = {r.name: r for r in evaluate_gates([mine["age-mae"], mine["reidentification-dlib-resnet"]],
                                                 metrics, {}, tmp_path / "gx")}
    age = results["age-mae"]
    assert age.status == "failed" and not age.blocking
    assert age.to_dict()["overridden"] == {"severity": ["critical", "warning"]}
    assert results["reidentification-dlib-resnet"].to_dict()["overridden"] == {}
    assert overall_status(list(results.values())) == "passed"  # the demoted gate no longer decides

    import io

    from veil.cli import print_validation

    out = io.StringIO()
    print_validation({"status": "passed", "seconds": 1.0, "gates": [r.to_dict() for r in results.values()],
                      "summary_path": "OUT/summary.json", "release_path": "OUT/RELEASE.json"}, out)
    assert ("warning       age-mae: attributes.age_mae = 14.1 (max 8); changed by the gates file: "
            "severity critical -> warning") in out.getvalue()


def test_extends_a_relative_path_and_chains(tmp_path):
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "base.yaml").write_text(yaml.safe_dump({"version": 1, "gates": [
        {"name": "reid", "metric": "identity.dlib-resnet.verification_rate", "max": 0.02},
        {"name": "age", "metric": "attributes.age_mae", "max": 8, "category": "utility"}]}))
    (tmp_path / "team" / "strict.yaml").write_text(yaml.safe_dump(
        {"version": 1, "extends": "base.yaml", "overrides": {"reid": {"max": 0.01}}}))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(
        {"version": 1, "extends": "team/strict.yaml", "overrides": {"reid": {"max": 0.005}, "age": {"max": 12}}}))
    gates = {g.name: g for g in load_gates(tmp_path / "mine.yaml", method="fsap")}
    # what changed is measured against the first file that defined the gate
    assert gates["reid"].max == 0.005 and gates["reid"].overridden == (("max", 0.02, 0.005),)
    assert gates["age"].overridden == (("max", 8.0, 12.0),) and gates["age"].category == "utility"


@pytest.mark.parametrize(("document", "message"), [
    ({"extends": "default", "overrides": {"no-such-gate": {"max": 1}}}, "gate 'no-such-gate'.*no such gate in"),
    ({"extends": "default", "gates": [{"name": "age-mae", "metric": "x", "max": 1}]},
     "gate 'age-mae'.*duplicate gate name .change an extended gate under 'overrides'"),
    ({"extends": "default", "overrides": {"age-mae": {"name": "age2"}}}, "gate 'age-mae'.*field 'name'.*cannot be overridden"),
    ({"extends": "default", "overrides": {"age-mae": {"severity": "loud"}}}, "gate 'age-mae'.*field 'severity'"),
    ({"extends": "default", "overrides": {"age-mae": {"colour": 1}}}, "gate 'age-mae'.*field 'colour'.*unknown key"),
    ({"extends": "default", "overrides": {"age-mae": {}}}, "gate 'age-mae'.*field 'overrides'"),
    ({"extends": "default", "overrides": ["age-mae"]}, "field 'overrides'"),
    ({"overrides": {"age-mae": {"max": 1}}, "gates": []}, "field 'overrides'.*there is none"),
    ({"extends": "missing.yaml"}, "missing.yaml: cannot be read"),
    ({"extends": 3}, "field 'extends'"),
    ({"extends": "loop.yaml"}, "field 'extends'.*loop"),
])
def test_extends_and_overrides_errors_name_file_gate_and_field(tmp_path, document, message):
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"version": 1, "extends": "gates.yaml"}))
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **document}))
    with pytest.raises(GateConfigError, match=message):
        load_gates(path, method="fsap")


# --------------------------------------------------------------------------------------------
# Dataset gates
# --------------------------------------------------------------------------------------------


def test_dataset_gates_pass_fail_and_not_evaluated(tmp_path):
    gates = [
        dataset_gate("at-bound", "identity.dlib-resnet.verification_rate", max=0.02),
        dataset_gate("above", "identity.mobilefacenet.verification_rate", max=0.02),
        dataset_gate("floor", "detection.centerface.rate", min=0.9),
        dataset_gate("band", "fd.mobilenetv2", min=1.0, max=2.0),
        dataset_gate("missing-required", "kid.mobilenetv2", max=0.1),
        dataset_gate("none-optional", "attributes.age_mae", max=8, required=False),
        dataset_gate("nan", "attributes.gender_agreement", min=0.85),
        dataset_gate("infinite", "fd.face.dlib-resnet", max=100.0),
    ]
    metrics = {
        "identity.dlib-resnet.verification_rate": 0.02,
        "identity.mobilefacenet.verification_rate": 0.07,
        "detection.centerface.rate": np.float32(0.75),
        "fd.mobilenetv2": 1,
        "attributes.age_mae": None,
        "attributes.gender_agreement": float("nan"),
        "fd.face.dlib-resnet": float("inf"),
    }
    results = {r.name: r for r in evaluate_gates(gates, metrics, {}, tmp_path)}
    assert [r.name for r in evaluate_gates(gates[:1], metrics, {}, tmp_path)] == ["at-bound"]

    assert results["at-bound"].status == "passed"  # bounds are inclusive
    assert results["at-bound"].value == pytest.approx(0.02) and results["at-bound"].margin == 0.0
    assert results["above"].status == "failed"
    assert results["above"].margin == pytest.approx(0.05)
    assert "0.07" in results["above"].reason
    assert results["floor"].status == "failed"
    assert results["floor"].margin == pytest.approx(0.15)
    assert results["band"].status == "passed"
    assert results["infinite"].status == "failed" and math.isinf(results["infinite"].margin)
    for name in ("missing-required", "none-optional", "nan"):
        assert results[name].status == "not_evaluated"
        assert results[name].value is None and results[name].failing_keys == []
    assert "not reported" in results["missing-required"].reason
    assert "blocks the release" in results["missing-required"].reason
    assert "not computed" in results["none-optional"].reason
    assert "does not block" in results["none-optional"].reason


def test_required_missing_metric_fails_release_optional_does_not(tmp_path):
    required = dataset_gate("kid", "kid.mobilenetv2", max=0.1)
    optional = dataset_gate("age", "attributes.age_mae", max=8, required=False)
    passing = dataset_gate("reid", "identity.dlib-resnet.verification_rate", max=0.02)
    metrics = {"identity.dlib-resnet.verification_rate": 0.0}
    assert overall_status(evaluate_gates([passing, optional], metrics, {}, tmp_path)) == "passed"
    assert overall_status(evaluate_gates([passing, required], metrics, {}, tmp_path)) == "failed"
    # nothing evaluated at all is never a pass
    assert overall_status(evaluate_gates([optional], metrics, {}, tmp_path)) == "failed"


def test_dataset_gate_evidence_lists_rows_worst_first(tmp_path):
    gate = parse_gates(
        {
            "version": 1,
            "gates": [
                {
                    "name": "reid",
                    "metric": "identity.dlib-resnet.verification_rate",
                    "max": 0.02,
                    "evidence": {
                        "table": "faces",
                        "where": {"reidentified_dlib-resnet": True},
                        "order_by": "sim_dlib-resnet",
                    },
                }
            ],
        }
    )
    faces = pd.DataFrame(
        {
            "face_key": ["a#0", "a#1", "b#0", "c#0", "d#0"],
            "reidentified_dlib-resnet": [True, False, True, True, True],
            "sim_dlib-resnet": [0.5, 0.99, 0.9, None, 0.7],
        }
    )
    (result,) = evaluate_gates(
        gate, {"identity.dlib-resnet.verification_rate": 0.8}, {"faces": faces}, tmp_path
    )
    assert result.status == "failed"
    assert result.failing_keys == ["b#0", "d#0", "a#0", "c#0"]


# --------------------------------------------------------------------------------------------
# Table gates
# --------------------------------------------------------------------------------------------


def test_table_gate_mostly(tmp_path):
    gate = table_gate(min=30.0, mostly=0.95)
    values = [40.0] * 20
    values[7] = 25.0
    (one_out,) = evaluate_gates([gate], {}, {"samples": samples(values)}, tmp_path)
    assert one_out.status == "passed"
    assert one_out.value == pytest.approx(0.95) and one_out.margin == 0.0
    assert one_out.failing_keys == ["s007"]  # listed even though mostly lets the gate pass
    values[3] = 29.0
    (two_out,) = evaluate_gates([gate], {}, {"samples": samples(values)}, tmp_path)
    assert two_out.status == "failed"
    assert two_out.value == pytest.approx(0.90) and two_out.margin == pytest.approx(0.05)
    assert two_out.failing_keys == ["s007", "s003"]  # 5 dB below before 1 dB below
    assert "2 of 20 rows" in two_out.reason


def test_failing_keys_worst_first_capped_ties_in_table_order(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    values = rng.permutation(np.arange(n, dtype=float))  # distinct distances
    values[values < 40] = 0.0  # 40 rows within bounds
    values[[5, 6]] = 500.0  # a tie at the top: table order
    gate = table_gate(table="faces", column="nmi", max=0.0, mostly=0.5)
    faces = pd.DataFrame({"face_key": [f"k{i}#0" for i in range(n)], "nmi": values})
    (result,) = evaluate_gates([gate], {}, {"faces": faces}, tmp_path)
    assert result.status == "failed"
    assert len(result.failing_keys) == MAX_FAILING_KEYS
    assert result.failing_keys[:2] == ["k5#0", "k6#0"]
    by_key = dict(zip(faces["face_key"], values, strict=True))
    listed = [by_key[k] for k in result.failing_keys]
    assert listed == sorted(listed, reverse=True)
    assert listed[-1] == np.sort(values)[::-1][MAX_FAILING_KEYS - 1]
    assert result.value == pytest.approx((values <= 0).sum() / n)


def test_nulls_fail_by_default_and_can_be_ignored(tmp_path):
    table = samples([0, None, 2, 0, np.nan])
    fail = table_gate("strict", max=0)
    ignore = table_gate("lenient", max=0, nulls="ignore")
    strict, lenient = evaluate_gates([fail, ignore], {}, {"samples": table}, tmp_path)
    assert strict.status == "failed" and strict.value == pytest.approx(2 / 5)
    # nulls are "unknown", ranked worse than any finite excess
    assert strict.failing_keys == ["s001", "s004", "s002"]
    assert "2 of them null" in strict.reason
    assert lenient.value == pytest.approx(2 / 3)
    assert lenient.failing_keys == ["s002"]
    # a min-only gate: nulls must fail too
    (floor,) = evaluate_gates(
        [table_gate(min=0.5)], {}, {"samples": samples([1.0, None])}, tmp_path
    )
    assert floor.status == "failed" and floor.failing_keys == ["s001"]
    # every value null and ignored: nothing to check
    (empty,) = evaluate_gates([ignore], {}, {"samples": samples([None, None])}, tmp_path)
    assert empty.status == "not_evaluated" and "every value is null" in empty.reason


def test_where_filters_rows(tmp_path):
    gate = table_gate(
        column="residual_faces", max=0, where={"status": "paired", "shard": ["a", "b"]}
    )
    table = pd.DataFrame(
        {
            "key": ["p1", "p2", "err", "p3", "other"],
            "status": ["paired", "paired", "error", "paired", "paired"],
            "shard": ["a", "b", "a", "a", "c"],
            "residual_faces": [0, 0, None, 1, 5],
        }
    )
    (result,) = evaluate_gates([gate], {}, {"samples": table}, tmp_path)
    assert result.failing_keys == ["p3"]
    assert result.value == pytest.approx(2 / 3)
    # booleans in where (face table columns such as detected_{det})
    faces = pd.DataFrame(
        {
            "face_key": ["x#0", "x#1", "y#0"],
            "detected_yunet": [True, False, True],
            "landmark_displacement": [0.1, 9.0, 0.4],
        }
    )
    bool_gate = table_gate(
        table="faces", column="landmark_displacement", max=0.3, where={"detected_yunet": True}
    )
    (moved,) = evaluate_gates([bool_gate], {}, {"faces": faces}, tmp_path)
    assert moved.failing_keys == ["y#0"] and moved.value == pytest.approx(0.5)
    (none,) = evaluate_gates(
        [table_gate(max=0, where={"status": "paired"})],
        {},
        {"samples": table.assign(v=0, status="error")},
        tmp_path,
    )
    assert none.status == "not_evaluated" and "no row matches" in none.reason


def test_table_gate_not_evaluated_cases(tmp_path):
    gates = [
        table_gate("no-table", table="faces", column="nmi", max=1),
        table_gate("no-column", column="background_psnr", min=30, required=False),
        table_gate("text", column="error", max=1),
    ]
    table = samples([1.0, 2.0], error=["boom", None])
    results = {r.name: r for r in evaluate_gates(gates, {}, {"samples": table}, tmp_path)}
    assert all(r.status == "not_evaluated" for r in results.values())
    assert "table faces not provided" in results["no-table"].reason
    assert "no column 'background_psnr'" in results["no-column"].reason
    assert "not numeric" in results["text"].reason


def test_bool_and_nullable_columns(tmp_path):
    faces = pd.DataFrame(
        {
            "face_key": ["a#0", "b#0", "c#0"],
            "reidentified_dlib-resnet": pd.array([False, True, None], dtype="boolean"),
        }
    )
    gate = table_gate(table="faces", column="reidentified_dlib-resnet", max=0)
    (result,) = evaluate_gates([gate], {}, {"faces": faces}, tmp_path)
    assert result.status == "failed"
    assert result.failing_keys == ["c#0", "b#0"]


# --------------------------------------------------------------------------------------------
# GX result files, output helpers, overall status
# --------------------------------------------------------------------------------------------


def test_gx_results_written_and_readable(tmp_path):
    gates = [
        dataset_gate("reid", "identity.dlib-resnet.verification_rate", max=0.02),
        dataset_gate("top1", "identity.dlib-resnet.top1_rate", max=0.05),
        table_gate("residual", column="residual_faces", max=0),
        table_gate("psnr", column="background_psnr", min=30, mostly=0.5, nulls="ignore"),
    ]
    metrics = {"identity.dlib-resnet.verification_rate": 0.1, "identity.dlib-resnet.top1_rate": 0.0}
    table = pd.DataFrame(
        {"key": ["a", "b", "c"], "residual_faces": [0, 3, 0], "background_psnr": [35.0, None, 20.0]}
    )
    results = evaluate_gates(gates, metrics, {"samples": table}, tmp_path)
    assert sorted(p.name for p in (tmp_path / "gx").iterdir()) == ["dataset.json", "samples.json"]
    dataset = json.loads((tmp_path / "gx" / "dataset.json").read_text())
    table_run = json.loads((tmp_path / "gx" / "samples.json").read_text())
    assert dataset["suite_name"] == "dataset" and table_run["suite_name"] == "samples"
    by_gate = {
        r["expectation_config"]["meta"]["gate"]: r
        for run in (dataset, table_run)
        for r in run["results"]
    }
    assert set(by_gate) == {g.name for g in gates}
    for result in results:
        check = by_gate[result.name]
        assert check["expectation_config"]["type"] == "expect_column_values_to_be_between"
        assert check["success"] == (result.status == "passed")
    residual = by_gate["residual"]["result"]
    assert residual["unexpected_count"] == 1
    assert [row["key"] for row in residual["partial_unexpected_index_list"]] == ["b"]
    assert by_gate["psnr"]["result"]["missing_count"] == 1
    assert by_gate["psnr"]["expectation_config"]["kwargs"]["mostly"] == 0.5


def test_write_results_and_gates_table(tmp_path):
    gates = [
        dataset_gate("reid", "identity.dlib-resnet.verification_rate", max=0.02),
        dataset_gate("age", "attributes.age_mae", max=8, required=False),
        table_gate("residual", column="residual_faces", max=0),
    ]
    table = pd.DataFrame({"key": ["a", "b"], "residual_faces": [0, 0]})
    metrics = {"identity.dlib-resnet.verification_rate": 0.01}
    results = evaluate_gates(gates, metrics, {"samples": table}, tmp_path)
    path = tmp_path / "validation" / "gates.json"
    write_results(results, path)
    payload = json.loads(path.read_text())
    assert payload["status"] == "passed"
    assert [g["status"] for g in payload["gates"]] == ["passed", "not_evaluated", "passed"]
    assert set(payload["gates"][0]) == {
        "name", "description", "table", "metric", "min", "max", "mostly", "required",
        "value", "status", "margin", "failing_keys", "reason", "severity", "category", "blocking",
        "overridden",
    }  # fmt: skip
    rows = gates_table(results)
    assert [r["gate"] for r in rows] == ["reid", "age", "residual"]
    assert rows[0]["bound"] == "x <= 0.02"
    assert rows[2]["bound"] == "x <= 0 for >= 100.0% of rows"
    assert rows[1]["reason"].startswith("metric attributes.age_mae not reported")


def _result(status: str, required: bool = True) -> GateResult:
    return GateResult("g", "", "dataset", "m", None, 1.0, None, required, None, status, None)


def test_overall_status_rules():
    assert overall_status([]) == "failed"
    assert overall_status([_result("passed")]) == "passed"
    assert overall_status([_result("passed"), _result("failed", required=False)]) == "failed"
    assert overall_status([_result("passed"), _result("not_evaluated", required=False)]) == "passed"
    assert overall_status([_result("passed"), _result("not_evaluated", required=True)]) == "failed"
    assert overall_status([_result("not_evaluated", required=False)]) == "failed"


def test_default_gates_end_to_end(tmp_path):
    """A clean blurred dataset passes the defaults; a synthesis run lacking KID does not."""
    keys = [f"img{i:02d}" for i in range(40)]
    samples_table = pd.DataFrame(
        {
            "key": keys,
            "status": ["paired"] * 39 + ["missing_anonymized"],
            "residual_faces": [0] * 39 + [None],
            "background_psnr": [42.0] * 38 + [None, None],
            "background_ssim": [0.98] * 38 + [None, None],
        }
    )
    faces_table = pd.DataFrame(
        {
            "face_key": [f"{k}#0" for k in keys],
            "reidentified_dlib-resnet": [False] * 40,
            "sim_dlib-resnet": np.linspace(-0.1, 0.3, 40),
            "rank_dlib-resnet": [5.0] * 40,
            "detected_centerface": [True] * 40,
        }
    )
    tables = {"samples": samples_table, "faces": faces_table}
    metrics = {
        "missing_original": 0,
        "errors": 0,
        "identity.dlib-resnet.verification_rate": 0.0,
        "identity.dlib-resnet.top1_excess": 0.0,
        "identity.mobilefacenet.verification_rate": None,
        "detection.centerface.rate": 0.97,
    }
    blur = evaluate_gates(load_gates(None, method="blur"), metrics, tables, tmp_path / "blur")
    assert overall_status(blur) == "passed", [r.to_dict() for r in blur if r.status != "passed"]
    fsap = evaluate_gates(load_gates(None, method="fsap"), metrics, tables, tmp_path / "fsap")
    statuses = {r.name: r.status for r in fsap}
    assert statuses["detection-rate-centerface"] == "passed"
    assert statuses["kid-mobilenetv2"] == "not_evaluated"
    assert overall_status(fsap) == "failed"
    leaked = samples_table.assign(residual_faces=[0] * 30 + [2] + [0] * 8 + [None])
    blur_leak = evaluate_gates(
        load_gates(None, method="blur"), metrics, {**tables, "samples": leaked}, tmp_path / "leak"
    )
    residual = next(r for r in blur_leak if r.name == "residual-faces")
    assert residual.status == "failed" and residual.failing_keys == ["img30"]
    assert overall_status(blur_leak) == "failed"


def test_import_is_cheap():
    code = "import sys, veil.validators.gates; print('great_expectations' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_evaluate_rejects_duplicate_gate_names(tmp_path):
    gate = dataset_gate("same", "a", max=1)
    with pytest.raises(ValueError, match="unique"):
        evaluate_gates([gate, dataset_gate("same", "b", max=1)], {"a": 0, "b": 0}, {}, tmp_path)
