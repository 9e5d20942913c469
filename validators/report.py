"""The audit report: ``OUT/report/report.json`` and a self-contained ``OUT/report/index.html``.

Everything is computed from files already on disk, so ``veil report OUT`` rebuilds the same
report at any time:

* a ``veil run`` output: the manifests (and ``OUT/run.json`` for the configuration and
  environment);
* validation (``veil validate`` or ``veil run --gates``): ``OUT/validation/summary.json`` and the
  per-sample / per-face Parquet tables beside it; a folder written by ``veil validate --output
  AUDIT`` alone (no manifests) gets a report of the validation alone.

This module computes the numbers (report.json) and the plots, and decides the verdict
(RELEASED / WITHHELD / NOT VALIDATED); :mod:`veil.validators.report_html` lays out the page.

The report never shows an un-anonymized face: its picture grid is cut from the *released*
files only, and only around regions that were anonymized and passed the re-scan. Validation
adds no pictures at all, only plots: the anonymized faces of a failed validation may well be
recognisable.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.pipelines.storage import OutputStore, as_store, is_remote
from veil.transforms.stage import reason_code
from veil.validators.state import json_safe

MAX_GRID = 24


def load_rows(output: Path | OutputStore) -> list[dict[str, Any]]:
    from veil.pipelines.manifest import read_manifests

    return read_manifests(output).to_pylist()


def compute_report(output: str | Path | OutputStore, *,
                   validation_from: str | Path | None = None) -> dict[str, Any]:
    """The report's numbers: the run's (when ``output`` has manifests) and, when
    ``validation/summary.json`` exists, the validation's under ``"validation"``."""
    if isinstance(output, OutputStore) or is_remote(output):
        # A release on an object store: its manifests, run.json and images are read there;
        # its validation tables were written to a local folder first (``validation_from``).
        store = as_store(output)
        has_run = bool(store.list_files("manifest"))
        report = compute_run_report(store) if has_run else {"output": store.url}
        validation = compute_validation(validation_from) if validation_from is not None else None
    else:
        output = Path(output)
        has_run = (output / "manifest").is_dir()
        report = compute_run_report(output) if has_run else {"output": str(output)}
        validation = compute_validation(output)
    if validation is not None:
        report["validation"] = validation
    report["contents"] = [name for name, present in (("run", has_run), ("validation", validation is not None))
                          if present]
    report["method"] = method_summary(report)
    report["verdict"] = verdict(report)
    return report


def method_kind(method: str | None) -> str:
    """"synthesis" (faces replaced by other realistic faces), "obscuring" (blurred, pixelated,
    filled, or left as they are), or "unknown" (another tool's output)."""
    from veil.config import SYNTHESIS_METHODS
    from veil.validators.validate import FID_METHODS

    if not method or method == "unknown":
        return "unknown"
    # FID_METHODS names the synthesis methods validation knows beyond Veil's own (diffusion).
    return "synthesis" if method in SYNTHESIS_METHODS or method in FID_METHODS else "obscuring"


def method_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The anonymization method, its kind, and its parameters in one line (a run's, from its
    configuration; a validated dataset made elsewhere has none recorded)."""
    config = report.get("config") or {}
    anonymize = config.get("anonymize") or {}
    validation = report.get("validation") or {}
    name = anonymize.get("method") or validation.get("method") or "unknown"
    return {"name": name, "kind": method_kind(name), "params": _method_params(name, config),
            "detection": _detection_params(config)}


def _method_params(name: str, config: dict[str, Any]) -> str | None:
    a, f = config.get("anonymize") or {}, config.get("fsap") or {}
    if not a:
        return None
    mask = f"{a.get('mask')} mask, feather {a.get('feather')}"
    if name == "blur":
        return f"Gaussian blur, sigma = {a.get('blur_strength')} x face size; {mask}"
    if name == "pixelate":
        return f"{a.get('pixel_blocks')} blocks across the face; {mask}"
    if name == "fill":
        return f"filled with rgb{tuple(a.get('fill_color') or ())}; {mask}"
    if name == "dp-pixelate":
        return f"DP-Pix epsilon {a.get('epsilon')}, cell {a.get('dp_cell')} px, m {a.get('dp_m')}; {mask}"
    if name == "none":
        return "faces detected and left unchanged"
    if name == "fsap" and f:
        certify = ", ".join(f.get("certify") or [])
        return (f"latent {f.get('latent')}, recognizer {f.get('recognizer')}, certifier {certify} "
                f"(margin {f.get('certify_margin')}, {f.get('certify_rounds')} rounds), tau {f.get('tau')}, "
                f"{f.get('steps')} steps; faces under {f.get('min_face')} px: {f.get('fallback')}")
    d = config.get("diffusion") or {}
    if name == "diffusion" and d:
        how = (f"inpainting with {d.get('model')}, {d.get('steps')} steps, strength {d.get('strength')}"
               if d.get("mode") == "inpaint" else
               f"paired latent optimisation in {d.get('latent')}, {d.get('steps')} steps")
        return (f"{how}; certifier {', '.join(d.get('certify') or [])} (margin {d.get('certify_margin')}, "
                f"{d.get('max_resamples')} re-samples); faces under {d.get('min_face')} px: "
                f"{d.get('fallback')}")
    return None


def _detection_params(config: dict[str, Any]) -> str | None:
    detect, rescan = config.get("detect") or {}, config.get("rescan") or {}
    if not detect:
        return None
    line = f"detectors {', '.join(detect.get('detectors') or [])}, min face {detect.get('min_face')} px"
    if rescan:
        line += (f"; re-scan: {rescan.get('policy')}, up to {rescan.get('max_rounds')} rounds"
                 if rescan.get("enabled") else "; re-scan off")
    return line


#: The verdict's three states: label and the CSS class of its colour band.
VERDICTS = {"released": "RELEASED", "withheld": "WITHHELD", "not_validated": "NOT VALIDATED"}


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """RELEASED, WITHHELD or NOT VALIDATED, with why in one line. RELEASED needs both a passed
    validation and its RELEASE.json: either alone means the folder changed after validation."""
    validation = report.get("validation")

    def result(status: str, why: str) -> dict[str, Any]:
        return {"status": status, "label": VERDICTS[status], "why": why}

    if validation is None:
        return result("not_validated", "No validation gates were run on this output, so nothing here clears "
                      "it for release: run 'veil validate' or 'veil run --gates'.")
    status = validation.get("status")
    release = validation.get("release_file")
    gates = validation.get("gates") or []
    if status == "unreadable":
        return result("not_validated", f"The validation summary could not be read ({validation.get('error')}); "
                      "run 'veil validate' again.")
    if status == "not_gated":
        return result("not_validated", "Metrics were measured but no gates were applied; RELEASE.json was not "
                      "written.")
    stale = " A RELEASE.json is present although validation did not pass: delete it." if release else ""
    warnings = sum(1 for g in gates if g.get("status") == "failed" and not gate_blocks(g))
    note = f" {warnings} warning gate{'s' if warnings > 1 else ''} failed (reported, not blocking)." if warnings else ""
    changed = [str(g.get("name")) for g in gates if g.get("overridden")]
    if changed:
        note += (f" {len(changed)} gate{'s' if len(changed) > 1 else ''} changed by the gates file "
                 f"({_names(changed)}).")
    gates = [g for g in gates if gate_blocks(g)]
    if status == "passed":
        passed = sum(1 for g in gates if g.get("status") == "passed")
        if release:
            return result("released", f"Validation PASSED: all {passed} evaluated gates passed; RELEASE.json "
                          "was written." + note)
        return result("withheld", "Validation passed but RELEASE.json is missing: the folder changed after "
                      "validation; run 'veil validate' again.")
    if status == "error":
        return result("withheld", "Validation FAILED (error): it stopped before the gates could decide; "
                      "RELEASE.json was not written." + stale)
    failed = [str(g.get("name")) for g in gates if g.get("status") == "failed"]
    missing = [str(g.get("name")) for g in gates if g.get("status") == "not_evaluated" and g.get("required")]
    why = []
    if failed:
        why.append(f"{len(failed)} gate{'s' if len(failed) > 1 else ''} failed ({_names(failed)})")
    if missing:
        why.append(f"{len(missing)} required gate{'s' if len(missing) > 1 else ''} could not be evaluated "
                   f"({_names(missing)})")
    if not why:
        why.append("no gate was evaluated")
    return result("withheld", f"Validation FAILED: {'; '.join(why)}. RELEASE.json was not written." + stale + note)


def _names(names: list[str], limit: int = 3) -> str:
    """A list short enough for one line: the first ``limit`` names and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def gate_blocks(gate: dict[str, Any]) -> bool:
    """Whether a gate can withhold the release: critical severity (Great Expectations'; the
    default, and all there was before gates had severities); warning and info gates are
    reported and never decide."""
    if "blocking" in gate:
        return bool(gate["blocking"])
    return (gate.get("severity") or "critical") == "critical"


def compute_run_report(output: Path | OutputStore) -> dict[str, Any]:
    """Numbers of a ``veil run`` output, from its manifests and ``run.json``."""
    rows = load_rows(output)
    try:
        run_info = json.loads(as_store(output).read_bytes("run.json"))
    except (OSError, ValueError):
        run_info = {}
    statuses = Counter(r["status"] for r in rows)
    reasons = Counter(reason_code(r["reason"]) for r in rows if r["status"] == "quarantined")
    per_shard: dict[str, Counter] = defaultdict(Counter)
    seconds_by_shard: dict[str, float] = defaultdict(float)
    faces_per_image = []
    scores: list[float] = []
    detectors: Counter[str] = Counter()
    stage_times: dict[str, list[float]] = defaultdict(list)
    epsilons = []
    rescan_rounds: Counter[int] = Counter()
    synthesized: list[dict[str, Any]] = []
    pseudo_faces: list[str] = []
    pair_distances: list[float] = []
    kinds: Counter[str] = Counter()
    kind_samples: Counter[str] = Counter()
    entities: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    redactions: Counter[str] = Counter()
    redacted_samples = 0
    for r in rows:
        shard = per_shard[r["shard"]]
        shard[r["status"]] += 1
        shard["samples"] += 1
        shard["faces"] += int(r.get("n_faces") or 0)
        seconds_by_shard[r["shard"]] += float(r.get("seconds") or 0.0)
        if r["status"] != "quarantined" or r.get("regions"):
            faces_per_image.append(int(r.get("n_faces") or 0))
        regions = json.loads(r.get("regions") or "[]")
        timings = json.loads(r.get("timings") or "{}")
        seen_kinds = set()
        for region in regions:
            if region.get("redetected"):
                continue
            kind = str(region.get("kind") or "face")
            kinds[kind] += 1
            seen_kinds.add(kind)
            if region.get("entity"):
                entities[str(region["entity"])] += 1
            if region.get("policy") == "keep":
                kept[kind] += 1
            if kind == "face":
                scores.append(float(region.get("score", 0.0)))
            detectors[region.get("detector", "?")] += 1
        kind_samples.update(seen_kinds)
        counted = json.loads(r.get("redactions") or "{}")
        if counted:
            redacted_samples += 1
            redactions.update({str(k): int(v) for k, v in counted.items()})
        for stage, t in timings.items():
            stage_times[stage].append(float(t))
        for stage in SYNTHESIS_RECORDS:
            records = [g[stage] for g in regions if isinstance(g.get(stage), dict)]
            # The stage times a batch; its seconds are shared evenly by the sample's faces.
            synthesized += [{"status": r["status"], "record": rec,
                             "seconds": float(timings.get(stage, 0.0)) / len(records)} for rec in records]
        for region in regions:
            target = region.get("target") if isinstance(region.get("target"), dict) else None
            pair = region.get("pair") if isinstance(region.get("pair"), dict) else None
            if target and target.get("pseudo_id") and r["status"] != "quarantined":
                pseudo_faces.append(str(target["pseudo_id"]))
            if (target or pair or {}).get("distance") is not None:
                pair_distances.append(float((target or pair)["distance"]))
        if r.get("epsilon") is not None:
            epsilons.append(float(r["epsilon"]))
        if r.get("rescan_rounds") is not None:
            rescan_rounds[int(r["rescan_rounds"])] += 1
    summary = run_info.get("summary") or {}
    keys = Counter((r["shard"], r["key"]) for r in rows)
    report = {
        "output": as_store(output).url,
        "samples": len(rows),
        "counts": dict(statuses),
        "quarantine_reasons": dict(reasons.most_common()),
        # Every input key must be in the manifests exactly once (fail closed: none dropped).
        "keys": {"manifest_rows": len(rows), "distinct": len(keys),
                 "duplicated": sorted(f"{shard}/{key}" for (shard, key), n in keys.items() if n > 1)[:50]},
        "faces": sum(faces_per_image),
        "faces_per_image": dict(sorted(Counter(faces_per_image).items())),
        "detections_by_detector": dict(detectors),
        "score_summary": _describe(scores),
        "rescan_rounds": {str(k): v for k, v in sorted(rescan_rounds.items())},
        "epsilon": {**_describe(epsilons), "samples": len(epsilons)} if epsilons else None,
        "throughput": {
            "wall_seconds": summary.get("seconds"),
            "images_per_second": summary.get("images_per_second"),
            "runner": summary.get("runner") or (run_info.get("config") or {}).get("runner"),
            "median_stage_seconds": {k: statistics.median(v) for k, v in sorted(stage_times.items())},
        },
        "shards": [
            {"shard": sid, "samples": c["samples"], "anonymized": c["anonymized"], "clean": c["clean"],
             "quarantined": c["quarantined"], "faces": c["faces"], "cpu_seconds": round(seconds_by_shard[sid], 3)}
            for sid, c in sorted(per_shard.items())
        ],
        "quarantined": [
            {"key": r["key"], "shard": r["shard"], "reason": r["reason"]}
            for r in rows if r["status"] == "quarantined"
        ],
        "models": run_info.get("models", []),
        "environment": run_info.get("environment", {}),
        "config": run_info.get("config", {}),
        "fingerprint": run_info.get("fingerprint"),
        "phase": run_info.get("phase"),
    }
    report["pii"] = pii_summary(report["config"], kinds, kind_samples, entities, kept, redactions,
                                redacted_samples, reasons)
    report["synthesis"] = synthesis_summary(synthesized)
    report["pairing"] = pairing_summary(pseudo_faces, pair_distances, report["config"])
    if report["pairing"] and report["pairing"].get("contact_sheet_png"):
        # Embedded in the HTML only (not report.json): synthetic faces, never an original.
        sheet = Path(report["pairing"]["pool"]) / report["pairing"]["contact_sheet_png"]
        report["_pool_sheet"] = base64.b64encode(sheet.read_bytes()).decode("ascii")
    report["_scores"] = scores  # for plots only, not written
    report["_rows"] = rows
    return report


def pii_summary(config: dict[str, Any], kinds: Counter[str], kind_samples: Counter[str],
                entities: Counter[str], kept: Counter[str], redactions: Counter[str],
                redacted_samples: int, reasons: Counter[str]) -> dict[str, Any]:
    """Per personal-data class: its policy, regions found and samples with one, regions kept,
    samples quarantined because the re-scan still found it; entity types (never values) of
    image text and of redacted text fields."""
    from veil.config import PIIConfig
    from veil.transforms.regions import REGION_KINDS

    pii = config.get("pii") or {}
    # A run from before the classes existed searched faces only.
    conf = PIIConfig(**pii) if pii else PIIConfig(classes=["faces"])
    enabled = conf.classes
    method = (config.get("anonymize") or {}).get("method")
    classes = []
    for name in enabled:
        kind = REGION_KINDS.get(name)
        classes.append({
            "class": name,
            "policy": method if name == "faces" else conf.method_of(name),
            "regions": kinds.get(kind, 0) if kind else None,
            "samples": (kind_samples.get(kind, 0) if kind else redacted_samples),
            "kept": kept.get(kind, 0) if kind else None,
            "redactions": sum(redactions.values()) if name == "metadata" else None,
            "residual_quarantined": reasons.get(f"residual_{kind or 'metadata'}", 0),
        })
    return {"classes": classes, "text_entities": dict(entities.most_common()),
            "redacted_entities": dict(redactions.most_common()),
            "text_scope": conf.text_scope}


#: Region records of the synthesis stages (FSAP, diffusion), by stage name.
SYNTHESIS_RECORDS = ("fsap", "diffusion")
#: A synthesis record whose face was replaced (FSAP optimised it, diffusion repainted it).
_REPLACED = ("optimised", "replaced")


def pairing_summary(pseudo_faces: list[str], distances: list[float],
                    config: dict[str, Any]) -> dict[str, Any] | None:
    """Pairing and pseudo-identity figures of a run: released faces per opaque pseudo-identity,
    pairing distances, and the pool's contact sheet (synthetic faces only) when the pool
    folder is still at its configured path. None for a run without a pool."""
    pseudo = config.get("pseudo") or {}
    pool = (pseudo.get("pool") if pseudo.get("enabled") else None) or (config.get("pool") or {}).get("path")
    if not pool and not pseudo_faces and not distances:
        return None
    per_identity = Counter(pseudo_faces)
    out: dict[str, Any] = {
        "pool": pool,
        "pseudo_identities": len(per_identity) if pseudo.get("enabled") else None,
        "faces_with_pseudo_identity": len(pseudo_faces),
        "faces_per_pseudo_identity": dict(sorted(Counter(per_identity.values()).items())),
        "pair_distance": _describe(distances),
    }
    meta = _read_json(Path(pool) / "pool.json") if pool else None
    if meta:
        out["pool_info"] = {k: meta.get(k) for k in ("generator", "count", "seed", "created")}
        sheet = Path(pool) / str(meta.get("contact_sheet") or "")
        # Only a generated pool has a contact sheet (a pool imported with --from may hold real
        # people and never gets one), so the report shows synthetic faces only.
        if meta.get("contact_sheet") and sheet.is_file():
            out["contact_sheet_png"] = sheet.name
    return out


def synthesis_summary(faces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-face figures of a synthesis run (FSAP) from the manifests' region records
    (``{status, record, seconds}`` per face): how many faces were optimised or obscured by the
    fallback, iterations and rounds used, the final similarity under the optimised recognizer
    and each certifying recognizer's score (before encoding and on the released bytes), and
    seconds per face. None when no face has a record."""
    if not faces:
        return None
    optimised = [f for f in faces if f["record"].get("status") in _REPLACED]
    certifiers: dict[str, dict[str, Any]] = {}
    for f in optimised:
        for name, verdict in (f["record"].get("certify") or {}).items():
            entry = certifiers.setdefault(name, {"metric": verdict.get("metric"),
                                                 "threshold": verdict.get("threshold"),
                                                 "scores": [], "released": []})
            entry["scores"].append(float(verdict["score"]))
            if name in (f["record"].get("released") or {}):
                entry["released"].append(float(f["record"]["released"][name]))
    # FSAP counts stronger rounds, diffusion re-samples: either is "tries after the first".
    rounds = Counter(int(f["record"].get("round", f["record"].get("resamples", 0))) for f in optimised)
    iterations = [int(f["record"].get("iterations", f["record"].get("steps", 0))) for f in optimised]
    first = optimised[0]["record"] if optimised else {}
    return {
        "faces": len(faces),
        "optimised": len(optimised),
        "fallback": sum(1 for f in faces if f["record"].get("status") == "fallback"),
        "in_quarantined_samples": sum(1 for f in faces if f["status"] == "quarantined"),
        "method": "diffusion" if "mode" in first else "fsap",
        "latent": first.get("latent") or first.get("model"),
        "recognizer": first.get("recognizer"),
        "iterations": _describe(iterations),
        "rounds": {str(k): v for k, v in sorted(rounds.items())},
        "similarity": _describe([float(f["record"]["similarity"]) for f in optimised
                                 if f["record"].get("similarity") is not None]),
        "certifiers": {name: {"metric": e["metric"], "threshold": e["threshold"],
                              "score": _describe(e["scores"]), "released": _describe(e["released"]),
                              "values": e["scores"]}
                       for name, e in certifiers.items()},
        "seconds_per_face": _describe([f["seconds"] for f in optimised]),
    }


def build_report(output: str | Path | OutputStore, *,
                 validation_from: str | Path | None = None) -> Path | str:
    """Write report.json and index.html under OUT/report; returns the HTML path.

    ``output`` is a ``veil run`` output (``manifest/``), a validation output
    (``validation/summary.json``), or both. ``validation_from`` is the local folder holding
    the validation of an object-store output (``veil run --gates`` validates there)."""
    from veil.pipelines.sinks import store_write_bytes
    from veil.validators.report_html import render_page

    store = as_store(output)
    has_run = bool(store.list_files("manifest"))
    if not has_run and not store.exists(VALIDATION_SUMMARY.as_posix()) and validation_from is None:
        raise FileNotFoundError(
            f"{output} has no manifest/ folder (an output of 'veil run') and no {VALIDATION_SUMMARY} "
            "(an output of 'veil validate')")
    report = compute_report(store if not store.is_local else store.local_path(),
                            validation_from=validation_from)
    scores = report.pop("_scores", [])
    rows = report.pop("_rows", [])
    pool_sheet = report.pop("_pool_sheet", None)
    validation = report.get("validation")
    scan = validation.pop("_scan") if validation is not None else None
    store_write_bytes(store, "report/report.json",
                      json.dumps(report, indent=2, sort_keys=True, default=str).encode())
    if pool_sheet:
        report["_pool_sheet"] = pool_sheet  # the page only, never report.json
    plots = _plots(report, scores) if has_run else {}
    if validation is not None:
        plots |= _validation_plots(validation, scan, kind=report["method"]["kind"])
    page = render_page(report, plots, _grid(store, rows) if has_run else [])
    store_write_bytes(store, "report/index.html", page.encode())
    return store.local_path("report/index.html") if store.is_local else store.display("report/index.html")


# ---------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


def _varies(values: Any) -> bool:
    """Whether a plot of ``values`` would show anything: at least two finite values, not all
    equal (empty, constant and all-zero data are not drawn)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return values.size >= 2 and bool(values.min() != values.max())


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any], scores: list[float]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    counts = report["counts"]
    names = ["anonymized", "clean", "quarantined"]
    if _varies([counts.get(n, 0) for n in names]):
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.bar(names, [counts.get(n, 0) for n in names], color=["#3a7", "#58c", "#c54"])
        ax.set_title("samples by status")
        plots["status"] = _png_b64(fig)

    fpi = report["faces_per_image"]
    if _varies(list(fpi.values())):
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.bar([str(k) for k in fpi], list(fpi.values()), color="#58c")
        ax.set_xlabel("faces detected in the image")
        ax.set_ylabel("images")
        ax.set_title("detections per image")
        plots["faces_per_image"] = _png_b64(fig)
    if _varies(scores):
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.hist(scores, bins=20, range=(0, 1), color="#3a7")
        thr = ((report.get("config") or {}).get("detect") or {}).get("score_threshold")
        if thr is not None:
            ax.axvline(thr, color="#c54", linestyle="--", label=f"threshold {thr}")
            ax.legend()
        ax.set_xlabel("detector score")
        ax.set_title("detection scores")
        plots["scores"] = _png_b64(fig)
    synthesis = report.get("synthesis") or {}
    for name, cert in (synthesis.get("certifiers") or {}).items():
        values = cert.get("values") or []
        if not _varies(values):
            continue
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.hist(values, bins=20, color="#3a7")
        ax.axvline(cert["threshold"], color="#c54", linestyle="--",
                   label=f"same person {'<=' if cert['metric'] == 'euclidean' else '>='} {cert['threshold']}")
        ax.legend(fontsize=8)
        ax.set_xlabel(f"{name} {cert['metric']} score, original vs released face")
        ax.set_title(f"identity after FSAP: {name} (certifying)")
        plots[f"certify_{name}"] = _png_b64(fig)
    stage = report["throughput"]["median_stage_seconds"]
    if stage:
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.barh(list(stage), [v * 1000 for v in stage.values()], color="#888")
        ax.set_xlabel("median ms per image")
        ax.set_title("time per stage")
        plots["stages"] = _png_b64(fig)
    return plots


def _grid(output: Path | OutputStore, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Crops around anonymized regions, cut from the released files."""
    from PIL import Image

    from veil.pipelines.sinks import read_released_image

    tiles = []
    for r in rows:
        if len(tiles) >= MAX_GRID:
            break
        if r["status"] != "anonymized" or not r.get("output_path"):
            continue
        try:
            data = read_released_image(output, r)
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # noqa: BLE001 - a missing tile must not break the report
            continue
        img = img.convert("RGB")
        regions = [g for g in json.loads(r.get("regions") or "[]") if not g.get("redetected")]
        for region in regions[:2]:
            x0, y0, x1, y1 = region["box"]
            w, h = x1 - x0, y1 - y0
            box = (max(0, int(x0 - 0.3 * w)), max(0, int(y0 - 0.3 * h)),
                   min(img.width, int(x1 + 0.3 * w)), min(img.height, int(y1 + 0.3 * h)))
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            crop = img.crop(box)
            crop.thumbnail((160, 160))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=80)
            tiles.append({"key": r["key"], "b64": base64.b64encode(buf.getvalue()).decode()})
    return tiles


# ------------------------------------------------------------------------------- validation

VALIDATION_SUMMARY = Path("validation") / "summary.json"
RELEASE_FILE = "RELEASE.json"
MAX_FAILING_KEYS = 50
#: Shards listed as the evidence of a failed gate.
MAX_WORST_SHARDS = 5
#: Box plots by shard show at most this many shards (the worst by median) to stay legible.
MAX_BOX_SHARDS = 30
#: Lists in ``details`` longer than this are left out of report.json (they stay in summary.json).
MAX_DETAIL_LIST = 64
#: Per-sample columns drawn as box plots by shard, with the direction in which values are worse.
SHARD_COLUMNS = {"background_psnr": "low", "background_ssim": "low", "residual_faces": "high"}

_PAIRING = {
    "pairs": ("paired", "paired"),
    "missing_anonymized": ("missing in the anonymized dataset", "missing_anonymized"),
    "missing_original": ("missing in the originals", "missing_original"),
    "not_released": ("not released (quarantined by Veil)", "not_released"),
    "errors": ("errors", "error"),
    "faces_original": ("faces in the originals", None),
}

_FAMILIES = {
    "identity": "Identity: re-identification attacks",
    "restored": "Identity after an attacker's restoration (JPEG, blur, rescale of the release)",
    "distribution": "Distribution distances: Frechet distance and KID",
    "attributes": "Attributes kept",
    "detection": "Detection: faces found again at the original place",
    "background": "Background fidelity (outside the PII regions)",
    "face": "Face regions: how much each face changed (SSIM, LPIPS, colour)",
    "leakage": "Leakage (SpinML MI and SIM)",
    "residual": "Residual faces",
    "utility": "Utility: a classifier trained on the anonymized data",
    "other": "Other",
}

_FIXED_LABELS = {
    "fd.mobilenetv2": "FD-MobileNetV2: Frechet distance of MobileNetV2 ImageNet features",
    "kid.mobilenetv2": "KID on MobileNetV2 ImageNet features",
    "fid.inception": "FID: Frechet Inception distance (FID Inception-v3, TF-FID preprocessing)",
    "face.ssim_mean": "face region SSIM, mean (1 = unchanged)",
    "face.lpips_mean": "face region LPIPS-AlexNet, mean (0 = perceptually identical)",
    "face.lpips_median": "face region LPIPS-AlexNet, median",
    "face.color_shift_mean": "colour shift of the face centre, CIE76 delta E of mean CIELAB, mean (2.3 = just noticeable)",
    "face.color_shift_max": "colour shift of the face centre, largest",
    "face.lightness_shift_mean": "lightness change of the face centre, mean L* (+ = lighter)",
    "kid.inception": "KID on Inception-v3 features",
    "attributes.age_mae": "age: mean absolute error, years (Cydral dlib age network)",
    "attributes.age_wideresnet_mae": "age, second opinion: mean absolute error, years (WideResNet IMDB-WIKI; not gated)",
    "attributes.gender_agreement": "gender: share of faces whose predicted gender is kept",
    "attributes.expression_agreement": "expression: share of faces whose predicted expression is kept",
    "utility.train_original_accuracy": "accuracy, classifier trained on originals",
    "utility.train_anonymized_accuracy": "accuracy, classifier trained on anonymized data",
    "utility.accuracy_drop": "accuracy drop",
    "detection.landmark_displacement": "landmark displacement of re-detected faces, inter-ocular distances",
    "background.psnr_mean": "PSNR, mean over samples (dB)",
    "background.psnr_min": "PSNR, worst sample (dB)",
    "background.ssim_mean": "SSIM, mean over samples",
    "background.ssim_min": "SSIM, worst sample",
    "leakage.nmi_mean": "normalised mutual information of face regions, mean (SpinML eq. 1)",
    "residual.faces": "faces still detected in the anonymized images",
    "residual.samples": "samples with a face still detected",
    "residual.text": "PII text items OCR still reads in the released images",
    "residual.text_samples": "released images with PII text still read",
    "residual.plates": "licence plates still read in the released images",
    "residual.plates_samples": "released images with a plate still read",
    "residual.metadata": "PII entities left in released text fields",
    "residual.metadata_samples": "released samples with PII left in a text field",
    "faces_identity": "faces large enough for the recognizers",
    "faces_too_small": "faces too small for the recognizers (left to the residual-face check)",
    "faces_unconfirmed": "faces only the reference detector found (left out of identity metrics)",
}

_IDENTITY_LABELS = {
    "verification_rate": "verification: share of faces judged the same person",
    "verification_ci95_high": "verification rate, upper end of the Wilson 95% interval",
    "top1_rate": "identification: top-1 rate in the gallery of original faces",
    "top5_rate": "identification: top-5 rate",
    "top1_chance": "top-1 chance level (1 / gallery size)",
    "top1_excess": "identification: top-1 rate above chance (gated)",
}


def metric_family(name: str) -> str:
    """The report group of a flat metric name ("pairing" for the counts)."""
    if name in _PAIRING or name.startswith("faces_"):
        return "pairing"
    head = name.split(".", 1)[0]
    if head in ("fd", "fid", "kid"):
        return "distribution"
    return head if head in _FAMILIES else "other"


def metric_label(name: str) -> str:
    """Human-readable meaning of a flat metric name. Only ``fid.inception`` is ever called FID:
    Frechet distances on other features are not comparable with published FID numbers."""
    if name in _FIXED_LABELS:
        return _FIXED_LABELS[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "identity" and parts[2] in _IDENTITY_LABELS:
        return f"{parts[1]}: {_IDENTITY_LABELS[parts[2]]}"
    if len(parts) == 3 and parts[0] == "restored" and parts[2] in _IDENTITY_LABELS:
        return f"{parts[1]}: after restoration, {_IDENTITY_LABELS[parts[2]]}"
    if len(parts) == 3 and parts[:2] == ["fd", "face"]:
        return f"Frechet distance of {parts[2]} face embeddings"
    if len(parts) == 3 and parts[0] == "detection" and parts[2] == "rate":
        return f"{parts[1]}: detection rate at the original face place (SDR)"
    if len(parts) == 3 and parts[:2] == ["leakage", "sim"]:
        return f"{parts[2]}: cosine similarity of original and anonymized embeddings, mean (SpinML SIM)"
    if name in _PAIRING:
        return _PAIRING[name][0]
    return name


@dataclass
class _TableScan:
    """What the plots and counts need from the validation tables, read one file at a time and
    only the columns needed (float32 copies of the plotted columns). ``by_shard`` holds
    per-sample columns by shard (box plots, and the worst shards of table gates); ``face_by_shard``
    the face-table columns that gates read (worst shards only)."""

    sample_files: int = 0
    sample_rows: int = 0
    face_files: int = 0
    face_rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_shard: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=lambda: defaultdict(dict))
    face_by_shard: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=lambda: defaultdict(dict))
    scores: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def values(self, column: str, shard: str, *, table: str = "samples") -> np.ndarray:
        source = self.face_by_shard if table == "faces" else self.by_shard
        parts = source[column].get(shard) or []
        return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def all_scores(self, recognizer: str) -> np.ndarray:
        parts = self.scores.get(recognizer) or []
        return np.concatenate(parts) if parts else np.empty(0, np.float32)


def _finite(column: Any) -> np.ndarray:
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values[np.isfinite(values)].astype(np.float32)


def _numeric(field_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(field_type) or pa.types.is_floating(field_type) or pa.types.is_boolean(field_type)


def _read_by_shard(path: Path, columns: set[str], into: dict[str, dict[str, list[np.ndarray]]],
                   scan: _TableScan | None = None) -> Any:
    """Read ``columns`` (the numeric ones present) of one Parquet file, split by its ``shard``
    column, into ``into[column][shard]``; with ``scan``, also count its statuses. Returns the
    file's metadata."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    wanted = [c for c in schema.names if c in columns and _numeric(schema.field(c).type)]
    extra = [c for c in ("shard", "status") if c in schema.names]
    table = pf.read(columns=wanted + extra)
    if scan is not None and "status" in schema.names:
        scan.statuses.update(v for v in table.column("status").to_pylist() if v is not None)
    shards = list(dict.fromkeys(table.column("shard").to_pylist())) if "shard" in schema.names else [path.stem]
    for shard in shards:
        if len(shards) == 1:  # the usual case: one file per shard
            rows = table
        elif shard is None:
            rows = table.filter(pc.is_null(table.column("shard")))
        else:
            rows = table.filter(pc.equal(table.column("shard"), shard))
        for column in wanted:
            into[column].setdefault(str(shard), []).append(_finite(rows.column(column)))
    return pf.metadata


def _scan_tables(folder: Path, gate_columns: dict[str, set[str]] | None = None) -> _TableScan:
    """Scan the samples and faces tables: the plotted columns (:data:`SHARD_COLUMNS`, each
    recognizer's ``max_score_*`` and ``score_*``) and the columns that table gates read."""
    import pyarrow.parquet as pq

    gate_columns = gate_columns or {}
    scan = _TableScan()
    for path in sorted((folder / "samples").glob("*.parquet")):
        names = pq.ParquetFile(path).schema_arrow.names
        columns = {c for c in names if c in SHARD_COLUMNS or c.startswith("max_score_")}
        meta = _read_by_shard(path, columns | gate_columns.get("samples", set()), scan.by_shard, scan)
        scan.sample_files += 1
        scan.sample_rows += meta.num_rows
    for path in sorted((folder / "faces").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        columns = [c for c in pf.schema_arrow.names if c.startswith("score_")]
        scan.face_files += 1
        scan.face_rows += pf.metadata.num_rows
        if columns:
            table = pf.read(columns=columns)
            for column in columns:
                scan.scores[column.removeprefix("score_")].append(_finite(table.column(column)))
        if gate_columns.get("faces"):
            _read_by_shard(path, gate_columns["faces"], scan.face_by_shard)
    return scan


def _outside(values: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    out = np.zeros(values.shape, dtype=bool)
    if lo is not None:
        out |= values < lo
    if hi is not None:
        out |= values > hi
    return out


def worst_shards(gate: dict[str, Any], per_shard: dict[str, dict[str, Any]], scan: _TableScan,
                 *, limit: int = MAX_WORST_SHARDS) -> list[dict[str, Any]]:
    """The shards that drove a failed gate, worst first: for a dataset gate, the shards whose
    own value of the metric is outside the bounds (by distance from them); for a table gate,
    the shards with rows outside the bounds (by their count). Empty when no shard is."""
    lo, hi = gate.get("min"), gate.get("max")
    metric = str(gate.get("metric") or "")
    table = gate.get("table") or "dataset"
    found = []
    if table == "dataset":
        for shard, metrics in per_shard.items():
            value = (metrics or {}).get(metric)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            distance = max((lo - value) if lo is not None else 0.0, (value - hi) if hi is not None else 0.0)
            if distance > 0:
                found.append(({"shard": shard, "value": value}, distance))
    else:
        source = scan.face_by_shard if table == "faces" else scan.by_shard
        for shard in source.get(metric, {}):
            values = scan.values(metric, shard, table=table)
            outside = int(np.count_nonzero(_outside(values, lo, hi)))
            if outside:
                found.append(({"shard": shard, "rows_outside": outside, "rows": int(values.size)}, outside))
    found.sort(key=lambda item: -item[1])  # stable: ties keep the shards' order
    return [entry for entry, _ in found[:limit]]


def compute_validation(output: str | Path) -> dict[str, Any] | None:
    """The validation section's numbers from ``OUT/validation/summary.json`` and its tables, or
    None without a summary. The summary is copied minus its bulky parts (``per_shard`` and long
    lists inside ``details``, which stay in summary.json); each failed gate gets its
    ``worst_shards``; ``_scan`` is for the plots only."""
    output = Path(output)
    path = output / VALIDATION_SUMMARY
    if not path.is_file():
        return None
    release = output / RELEASE_FILE
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return {"status": "unreadable", "error": f"{path}: {exc}", "gates": [], "metrics": {},
                "release_file": str(release) if release.is_file() else None, "_scan": _TableScan()}
    gates = [g for g in summary.get("gates") or [] if isinstance(g, dict)]
    gate_columns: dict[str, set[str]] = defaultdict(set)
    for g in gates:
        if g.get("table") in ("samples", "faces") and g.get("metric"):
            gate_columns[g["table"]].add(str(g["metric"]))
    scan = _scan_tables(output / "validation", gate_columns)
    metrics = json_safe(summary.get("metrics") or {})
    pairing: dict[str, Any] = {}
    for name, (_, status) in _PAIRING.items():
        value = metrics.get(name)
        if value is None and status is not None and scan.sample_files:
            value = scan.statuses.get(status, 0)
        pairing[name] = value
    per_shard = summary.get("per_shard") if isinstance(summary.get("per_shard"), dict) else {}
    validation = {k: json_safe(v) for k, v in summary.items() if k not in ("per_shard", "details", "metrics")}
    validation["gates"] = [json_safe({**g, "worst_shards": worst_shards(g, per_shard, scan)})
                           if g.get("status") == "failed" else json_safe(g) for g in gates]
    validation.update(
        metrics=metrics,
        details=json_safe(summary.get("details") or {}, MAX_DETAIL_LIST, see=str(VALIDATION_SUMMARY)),
        per_shard_count=len(per_shard),
        pairing=pairing,
        # Every status of the samples table, counted (one row per key of either dataset).
        statuses=dict(sorted(scan.statuses.items())),
        tables={"samples": {"files": scan.sample_files, "rows": scan.sample_rows},
                "faces": {"files": scan.face_files, "rows": scan.face_rows}},
        summary_file=str(VALIDATION_SUMMARY),
        release_file=str(release) if release.is_file() else None,
    )
    validation["_scan"] = scan
    return validation


# --------------------------------------------------------------------------- validation plots


def _recognizer_rule(info: dict[str, Any] | None) -> tuple[str | None, float | None]:
    info = info or {}
    metric = info.get("metric")
    threshold = info.get("threshold")
    if metric not in ("cosine", "euclidean") or threshold is None or not math.isfinite(float(threshold)):
        return metric if metric in ("cosine", "euclidean") else None, None
    return metric, float(threshold)


def _same_person(values: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    return values >= threshold if metric == "cosine" else values <= threshold


def _validation_plots(validation: dict[str, Any], scan: _TableScan | None, *,
                      kind: str = "unknown") -> dict[str, str]:
    """Plots of the validation section (never a picture of a face). A plot is skipped when its
    data are absent, empty, constant or all zero, and attribute confusions are skipped for
    obscuring methods (``kind``): attributes read off a blurred face say nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    scan = scan or _TableScan()
    recognizers = validation.get("recognizers") or {}
    plots: dict[str, str] = {}

    for rec in sorted(scan.scores):
        values = scan.all_scores(rec)
        if not _varies(values):
            continue
        metric, threshold = _recognizer_rule(recognizers.get(rec))
        lo, hi = float(values.min()), float(values.max())
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
            room = 0.25 * (hi - lo) or 0.1  # the "same person" side stays visible even when empty
            if metric == "cosine":
                hi = max(hi, threshold + room)
            else:
                lo = min(lo, max(0.0, threshold - room))
        pad = 0.02 * (hi - lo) or 0.05
        lo, hi = lo - pad, hi + pad
        fig, ax = plt.subplots(figsize=(5.2, 2.8))
        ax.hist(values, bins=40, range=(lo, hi), color="#58c")
        ax.set_xlim(lo, hi)
        role = (recognizers.get(rec) or {}).get("role")
        title = f"{rec}{f' ({role})' if role else ''}: verification scores of {values.size} faces"
        if metric is not None and threshold is not None:
            hits = int(np.count_nonzero(_same_person(values, metric, threshold)))
            span = (threshold, hi) if metric == "cosine" else (lo, threshold)
            ax.axvspan(*span, color="#c54", alpha=0.15,
                       label=f"same person ({'>=' if metric == 'cosine' else '<='} {threshold:g}): {hits}")
            ax.axvline(threshold, color="#c54", linestyle="--")
            ax.text(sum(span) / 2, 0.92, "same person", transform=ax.get_xaxis_transform(), ha="center",
                    color="#b22", fontsize=9)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
        ax.set_xlabel("cosine similarity" if metric == "cosine" else
                      "euclidean distance" if metric == "euclidean" else "score")
        ax.set_ylabel("faces")
        ax.set_title(title, fontsize=10)
        plots[f"verification-{rec}"] = _png_b64(fig)

    attributes = (validation.get("details") or {}).get("attributes") or {}
    for name in ("gender", "expression") if kind != "obscuring" else ():
        confusion = attributes.get(f"{name}_confusion") if isinstance(attributes, dict) else None
        matrix, labels = _confusion(confusion)
        if matrix is None or not matrix.sum():
            continue
        side = 1.2 + 0.55 * len(labels)
        fig, ax = plt.subplots(figsize=(side + 1.0, side))
        image = ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted on the anonymized face")
        ax.set_ylabel("predicted on the original")
        top = matrix.max() if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, f"{count:g}", ha="center", va="center", fontsize=8,
                    color="white" if top and count > top / 2 else "#222")
        fig.colorbar(image, ax=ax, fraction=0.046)
        agreement = np.trace(matrix) / matrix.sum()
        ax.set_title(f"{name}: original vs anonymized (agreement {agreement:.0%})", fontsize=10)
        plots[f"confusion-{name}"] = _png_b64(fig)

    directions = dict(SHARD_COLUMNS)
    for gate in validation.get("gates") or []:
        if gate.get("table") == "samples" and gate.get("metric") not in directions:
            # A bound from below means low values are the bad ones.
            directions[str(gate.get("metric"))] = "low" if gate.get("min") is not None else "high"
    for column in scan.by_shard:
        if column.startswith("max_score_"):
            metric, _ = _recognizer_rule(recognizers.get(column.removeprefix("max_score_")))
            directions[column] = "low" if metric == "euclidean" else "high"
    for column in sorted(scan.by_shard, key=lambda c: (c not in SHARD_COLUMNS, c)):
        shards = sorted(scan.by_shard[column])
        if not _varies(np.concatenate([scan.values(column, shard) for shard in shards] or [np.empty(0)])):
            continue  # e.g. residual faces all zero: a row of flat boxes
        stats = []
        for shard in shards:
            values = scan.values(column, shard)
            if values.size:
                stat = cbook.boxplot_stats(values.astype(np.float64), labels=[shard])[0]
                fliers = np.sort(stat["fliers"])
                if fliers.size > 200:  # the most extreme ones on both sides are enough to see
                    stat["fliers"] = np.concatenate([fliers[:100], fliers[-100:]])
                stats.append(stat)
        if not stats:
            continue
        title = f"{column} by shard"
        if len(stats) > MAX_BOX_SHARDS:
            title += f" (the {MAX_BOX_SHARDS} worst of {len(stats)} shards by median)"
            stats = worst_by_median(stats, worse=directions.get(column, "high"), limit=MAX_BOX_SHARDS)
        fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(stats) + 2.0), 2.8))
        ax.bxp(stats, showmeans=True)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.set_ylabel(column)
        ax.set_title(title, fontsize=10)
        plots[f"shards-{column}"] = _png_b64(fig)

    metrics = validation.get("metrics") or {}
    rates = {name.split(".")[1]: float(v) for name, v in sorted(metrics.items())
             if name.startswith("detection.") and name.endswith(".rate") and name.count(".") == 2
             and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    # On a fixed 0-1 scale equal bars still say something; all zero says nothing.
    if any(rates.values()):
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        bars = ax.bar(list(rates), list(rates.values()), color="#3a7")
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in rates.values()], fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("faces found again")
        ax.set_title("detection rate at the original face place", fontsize=10)
        plots["detection-rate"] = _png_b64(fig)
    return plots


def worst_by_median(stats: list[dict[str, Any]], *, worse: str, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` box-plot stats (``cbook.boxplot_stats`` dicts) with the worst median, worst
    first; ``worse`` is "low" (e.g. PSNR) or "high" (e.g. residual faces, cosine similarity).
    Ties keep the shards' order."""
    if worse not in ("low", "high"):
        raise ValueError(f"worse must be 'low' or 'high', got {worse!r}")
    return sorted(stats, key=lambda s: s["med"], reverse=worse == "high")[:limit]


def _confusion(confusion: Any) -> tuple[np.ndarray | None, list[str]]:
    """A square count matrix and its labels from {"labels", "matrix"}, or (None, []) if malformed."""
    if not isinstance(confusion, dict):
        return None, []
    labels = [str(v) for v in confusion.get("labels") or []]
    try:
        matrix = np.asarray(confusion.get("matrix"), dtype=np.float64)
    except (TypeError, ValueError):
        return None, []
    if not labels or matrix.shape != (len(labels), len(labels)) or not np.isfinite(matrix).all():
        return None, []
    return matrix, labels
