"""The audit report: ``OUT/report/report.json`` and a self-contained ``OUT/report/index.html``.

Everything is computed from files already on disk, so ``veil report OUT`` rebuilds the same
report at any time:

* a ``veil run`` output: the manifests (and ``OUT/run.json`` for the configuration and
  environment);
* validation (``veil validate`` or ``veil run --gates``): ``OUT/validation/summary.json`` and the
  per-sample / per-face Parquet tables beside it. Its "Validation gates" section goes near the
  top of the page; a folder written by ``veil validate --output AUDIT`` alone (no manifests)
  gets a report with only that section.

The report never shows an un-anonymized face: its picture grid is cut from the *released*
files only, and only around regions that were anonymized and passed the re-scan. The
validation section shows no pictures at all, only plots: the anonymized faces of a failed
validation may well be recognisable.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.transforms.stage import reason_code
from veil.validators.state import json_safe

MAX_GRID = 24


def load_rows(output: Path) -> list[dict[str, Any]]:
    from veil.pipelines.manifest import read_manifests

    return read_manifests(output).to_pylist()


def compute_report(output: str | Path) -> dict[str, Any]:
    """The report's numbers: the run's (when ``output`` has manifests) and, when
    ``validation/summary.json`` exists, the validation's under ``"validation"``."""
    output = Path(output)
    has_run = (output / "manifest").is_dir()
    report = compute_run_report(output) if has_run else {"output": str(output)}
    validation = compute_validation(output)
    if validation is not None:
        report["validation"] = validation
    report["contents"] = [name for name, present in (("run", has_run), ("validation", validation is not None))
                          if present]
    return report


def compute_run_report(output: Path) -> dict[str, Any]:
    """Numbers of a ``veil run`` output, from its manifests and ``run.json``."""
    rows = load_rows(output)
    run_info = _read_json(output / "run.json") or {}
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
        for region in regions:
            if region.get("redetected"):
                continue
            scores.append(float(region.get("score", 0.0)))
            detectors[region.get("detector", "?")] += 1
        for stage, t in timings.items():
            stage_times[stage].append(float(t))
        records = [g["fsap"] for g in regions if isinstance(g.get("fsap"), dict)]
        # The stage times a batch; its seconds are shared evenly by the sample's faces.
        synthesized += [{"status": r["status"], "record": rec,
                         "seconds": float(timings.get("fsap", 0.0)) / len(records)} for rec in records]
        if r.get("epsilon") is not None:
            epsilons.append(float(r["epsilon"]))
        if r.get("rescan_rounds") is not None:
            rescan_rounds[int(r["rescan_rounds"])] += 1
    summary = run_info.get("summary") or {}
    report = {
        "output": str(output),
        "samples": len(rows),
        "counts": dict(statuses),
        "quarantine_reasons": dict(reasons.most_common()),
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
    report["synthesis"] = synthesis_summary(synthesized)
    report["_scores"] = scores  # for plots only, not written
    report["_rows"] = rows
    return report


def synthesis_summary(faces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-face figures of a synthesis run (FSAP) from the manifests' region records
    (``{status, record, seconds}`` per face): how many faces were optimised or obscured by the
    fallback, iterations and rounds used, the final similarity under the optimised recognizer
    and each certifying recognizer's score (before encoding and on the released bytes), and
    seconds per face. None when no face has a record."""
    if not faces:
        return None
    optimised = [f for f in faces if f["record"].get("status") == "optimised"]
    certifiers: dict[str, dict[str, Any]] = {}
    for f in optimised:
        for name, verdict in (f["record"].get("certify") or {}).items():
            entry = certifiers.setdefault(name, {"metric": verdict.get("metric"),
                                                 "threshold": verdict.get("threshold"),
                                                 "scores": [], "released": []})
            entry["scores"].append(float(verdict["score"]))
            if name in (f["record"].get("released") or {}):
                entry["released"].append(float(f["record"]["released"][name]))
    rounds = Counter(int(f["record"].get("round", 0)) for f in optimised)
    iterations = [int(f["record"].get("iterations", 0)) for f in optimised]
    first = optimised[0]["record"] if optimised else {}
    return {
        "faces": len(faces),
        "optimised": len(optimised),
        "fallback": sum(1 for f in faces if f["record"].get("status") == "fallback"),
        "in_quarantined_samples": sum(1 for f in faces if f["status"] == "quarantined"),
        "latent": first.get("latent"),
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


def build_report(output: str | Path) -> Path:
    """Write report.json and index.html under OUT/report; returns the HTML path.

    ``output`` is a ``veil run`` output (``manifest/``), a validation output
    (``validation/summary.json``), or both."""
    from veil.pipelines.sinks import atomic_write_bytes

    output = Path(output)
    has_run = (output / "manifest").is_dir()
    if not has_run and not (output / VALIDATION_SUMMARY).is_file():
        raise FileNotFoundError(
            f"{output} has no manifest/ folder (an output of 'veil run') and no {VALIDATION_SUMMARY} "
            "(an output of 'veil validate')")
    report = compute_report(output)
    scores = report.pop("_scores", [])
    rows = report.pop("_rows", [])
    validation = report.get("validation")
    scan = validation.pop("_scan") if validation is not None else None
    folder = output / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "report.json", json.dumps(report, indent=2, sort_keys=True, default=str).encode())
    section = "" if validation is None else _validation_html(validation, _validation_plots(validation, scan))
    if has_run:
        page = _html(report, _plots(report, scores), _grid(output, rows), validation_section=section)
    else:
        page = _validation_page(report, section)
    atomic_write_bytes(folder / "index.html", page.encode())
    return folder / "index.html"


# ---------------------------------------------------------------------------------- helpers


def _synthesis_html(syn: dict[str, Any]) -> str:
    """The FSAP section: what was done to each face and how the identity changed (numbers
    only: the faces themselves appear in the grid, cut from the released files)."""
    def d(stats: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
        if not stats:
            return "-"
        return f"median {fmt.format(stats['median'])} (min {fmt.format(stats['min'])}, max {fmt.format(stats['max'])})"

    rows = [
        ["faces with a synthesis record", syn["faces"]],
        ["identity replaced (FSAP)", syn["optimised"]],
        ["too small for a recognizer: obscured by the fallback", syn["fallback"]],
        ["faces in quarantined samples (not released)", syn["in_quarantined_samples"]],
        ["latent space / optimised recognizer", f"{syn.get('latent')} / {syn.get('recognizer')}"],
        ["iterations per face", d(syn["iterations"], "{:.0f}")],
        ["rounds (0 = first optimisation passed)", ", ".join(f"{k}: {v}" for k, v in syn["rounds"].items()) or "-"],
        [f"final similarity under {syn.get('recognizer')} (1 = same face)", d(syn["similarity"])],
        ["seconds per face", d(syn["seconds_per_face"], "{:.1f}")],
    ]
    for name, cert in syn["certifiers"].items():
        rule = f"same person if {'<=' if cert['metric'] == 'euclidean' else '>='} {cert['threshold']}"
        rows.append([f"{name} (certifying) score before encoding, {rule}", d(cert["score"])])
        rows.append([f"{name} score on the released bytes", d(cert["released"])])
    return ("<h2 id='synthesis'>Identity replacement (FSAP)</h2>"
            "<p>Each face was moved away from its identity in a latent space, against one recognizer, "
            "and certified by another on the released image; a face still matched is optimised again "
            "more strongly, then its sample is quarantined.</p>" + _table(["", "value"], rows))


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
    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    names = ["anonymized", "clean", "quarantined"]
    ax.bar(names, [counts.get(n, 0) for n in names], color=["#3a7", "#58c", "#c54"])
    ax.set_title("samples by status")
    plots["status"] = _png_b64(fig)

    fpi = report["faces_per_image"]
    if fpi:
        fig, ax = plt.subplots(figsize=(4.5, 2.6))
        ax.bar([str(k) for k in fpi], list(fpi.values()), color="#58c")
        ax.set_xlabel("faces detected in the image")
        ax.set_ylabel("images")
        ax.set_title("detections per image")
        plots["faces_per_image"] = _png_b64(fig)
    if scores:
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
        if not values:
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


def _grid(output: Path, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
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


class _Markup(str):
    """Table cell content that is already HTML (escaped where it holds data)."""


def _cell(value: Any) -> str:
    return value if isinstance(value, _Markup) else html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], *, row_attrs: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    attrs = row_attrs or [""] * len(rows)
    body = "".join(f"<tr{a}>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                   for a, row in zip(attrs, rows, strict=True))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left;font-size:14px}th{background:#f3f3f3}.plots img{margin:4px}"
    ".grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;font-size:11px}"
    ".bad{color:#b22}.ok{color:#272}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"
    ".banner{padding:.8em 1.2em;margin:1em 0;border-radius:4px;font-size:16px;border:2px solid}"
    ".banner strong{font-size:22px;margin-right:.6em}"
    ".banner.passed{background:#e8f6ec;border-color:#3a7}.banner.failed{background:#fbeaea;border-color:#c54}"
    ".banner.not_gated{background:#f4f4f4;border-color:#999}"
    ".st-passed{color:#272;font-weight:bold}.st-failed{color:#b22;font-weight:bold}"
    ".st-not_evaluated{color:#a60;font-weight:bold}.keys{columns:3;font-size:12px}.muted{color:#777}"
    "#validation{border-bottom:1px solid #ccc;margin-bottom:2em}</style>"
)


def _head(title: str) -> str:
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_CSS}</head><body>"


def _html(report: dict[str, Any], plots: dict[str, str], grid: list[dict[str, str]], *,
          validation_section: str = "") -> str:
    esc = html.escape
    counts = report["counts"]
    t = report["throughput"]
    ips = t.get("images_per_second")
    parts = [
        _head("Veil audit report"),
        "<h1>Veil audit report</h1>",
        f"<p>Output: <code>{esc(report['output'])}</code> &middot; run phase: {esc(str(report.get('phase')))}"
        f" &middot; fingerprint <code>{esc(str(report.get('fingerprint')))[:16]}</code></p>",
        validation_section,
        "<h2 id='summary'>Summary</h2>",
        _table(["samples", "anonymized", "clean", "quarantined", "faces anonymized", "images/s", "runner"],
               [[report["samples"], counts.get("anonymized", 0), counts.get("clean", 0),
                 counts.get("quarantined", 0), report["faces"],
                 f"{ips:.2f}" if ips else "-", t.get("runner") or "-"]]),
        "<div class='plots'>" + "".join(
            f"<img alt='{esc(name)}' data-plot='{esc(name)}' src='data:image/png;base64,{b64}'>"
            for name, b64 in plots.items()) + "</div>",
    ]
    parts.append("<h2 id='quarantine'>Quarantined samples</h2>")
    if report["quarantined"]:
        parts.append("<p class='bad'>These samples were not released.</p>")
        parts.append(_table(["reason", "count"], [[k, v] for k, v in report["quarantine_reasons"].items()]))
        parts.append(_table(["key", "shard", "reason"],
                            [[q["key"], q["shard"], q["reason"]] for q in report["quarantined"][:500]]))
    else:
        parts.append("<p class='ok'>None.</p>")
    parts.append("<h2 id='shards'>Shards</h2>")
    parts.append(_table(["shard", "samples", "anonymized", "clean", "quarantined", "faces", "CPU s"],
                        [[s["shard"], s["samples"], s["anonymized"], s["clean"], s["quarantined"],
                          s["faces"], s["cpu_seconds"]] for s in report["shards"]]))
    parts.append("<h2 id='detections'>Detections</h2>")
    parts.append(_table(["detector", "regions"], [[k, v] for k, v in report["detections_by_detector"].items()]))
    if report["score_summary"]:
        s = report["score_summary"]
        parts.append(f"<p>Scores: min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f}.</p>")
    parts.append(_table(["re-scan strengthening rounds", "samples"], [[k, v] for k, v in report["rescan_rounds"].items()]))
    if report.get("synthesis"):
        parts.append(_synthesis_html(report["synthesis"]))
    if report["epsilon"]:
        e = report["epsilon"]
        parts.append("<h2 id='dp'>Differential privacy</h2>")
        parts.append(f"<p>DP pixelization on {e['samples']} samples; per-region epsilon min {e['min']:.3g}, "
                     f"median {e['median']:.3g}, max {e['max']:.3g}.</p>")
    parts.append("<h2 id='throughput'>Throughput</h2>")
    parts.append(_table(["stage", "median ms / image"],
                        [[k, f"{v * 1000:.1f}"] for k, v in t["median_stage_seconds"].items()]))
    parts.append("<h2 id='grid'>Anonymized regions (from the released files)</h2><div class='grid'>")
    parts.extend(f"<figure><img alt='{esc(g['key'])}' src='data:image/jpeg;base64,{g['b64']}'>"
                 f"<figcaption>{esc(g['key'])}</figcaption></figure>" for g in grid)
    parts.append("</div>")
    parts.append("<h2 id='models'>Models</h2>")
    parts.append(_table(["name", "sha256", "license", "path / error"],
                        [[m.get("name"), m.get("sha256") or "-", m.get("license") or "-",
                          m.get("path") or m.get("error") or "-"] for m in report["models"]]))
    env = report.get("environment") or {}
    parts.append("<h2 id='environment'>Environment</h2>")
    parts.append(_table(["package", "version"], [[k, v] for k, v in (env.get("packages") or {}).items()]))
    parts.append("<h2 id='config'>Run configuration</h2>")
    parts.append(f"<pre>{esc(json.dumps(report.get('config'), indent=2, default=str))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


# ------------------------------------------------------------------------------- validation

VALIDATION_SUMMARY = Path("validation") / "summary.json"
RELEASE_FILE = "RELEASE.json"
MAX_FAILING_KEYS = 50
#: Box plots by shard show at most this many shards (the worst by median) to stay legible.
MAX_BOX_SHARDS = 30
#: Lists in ``details`` longer than this are left out of report.json (they stay in summary.json).
MAX_DETAIL_LIST = 64
#: Per-sample columns drawn as box plots by shard, with the direction in which values are worse.
SHARD_COLUMNS = {"background_psnr": "low", "residual_faces": "high"}

_BANNERS = {
    "passed": ("passed", "PASSED", "Every gate passed. RELEASE.json was written: the anonymized dataset "
               "is cleared for release."),
    "failed": ("failed", "FAILED", "At least one required gate failed or could not be evaluated. "
               "RELEASE.json was not written (a stale one is removed): do not release this dataset."),
    "error": ("failed", "FAILED (validation error)", "Validation stopped before the gates could decide. "
              "RELEASE.json was not written: do not release this dataset."),
    "not_gated": ("not_gated", "NOT GATED", "Metrics were measured but no gates were applied. "
                  "RELEASE.json was not written: nothing here clears the dataset for release."),
}

#: Counts shown in the pairing table: metric name -> (label, status in the samples table).
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
    "distribution": "Distribution distances: Frechet distance and KID",
    "attributes": "Attributes kept",
    "detection": "Detection: faces found again at the original place",
    "background": "Background fidelity (outside the PII regions)",
    "face": "Face regions: how much each face changed (SSIM, LPIPS)",
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
    "kid.inception": "KID on Inception-v3 features",
    "attributes.age_mae": "age: mean absolute error, years",
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
    only the columns needed (float32 copies of the plotted columns)."""

    sample_files: int = 0
    sample_rows: int = 0
    face_files: int = 0
    face_rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_shard: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=lambda: defaultdict(dict))
    scores: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def values(self, column: str, shard: str) -> np.ndarray:
        parts = self.by_shard[column].get(shard) or []
        return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def all_scores(self, recognizer: str) -> np.ndarray:
        parts = self.scores.get(recognizer) or []
        return np.concatenate(parts) if parts else np.empty(0, np.float32)


def _finite(column: Any) -> np.ndarray:
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values[np.isfinite(values)].astype(np.float32)


def _scan_tables(folder: Path) -> _TableScan:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    scan = _TableScan()
    for path in sorted((folder / "samples").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = [c for c in names if c in ("shard", "status") or c in SHARD_COLUMNS or c.startswith("max_score_")]
        table = pf.read(columns=wanted)
        scan.sample_files += 1
        scan.sample_rows += table.num_rows
        if "status" in names:
            scan.statuses.update(v for v in table.column("status").to_pylist() if v is not None)
        shards = list(dict.fromkeys(table.column("shard").to_pylist())) if "shard" in names else [path.stem]
        for shard in shards:
            if len(shards) == 1:  # the usual case: one file per shard
                rows = table
            elif shard is None:
                rows = table.filter(pc.is_null(table.column("shard")))
            else:
                rows = table.filter(pc.equal(table.column("shard"), shard))
            for column in wanted:
                if column in ("shard", "status"):
                    continue
                values = _finite(rows.column(column))
                scan.by_shard[column].setdefault(str(shard), []).append(values)
    for path in sorted((folder / "faces").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        columns = [c for c in pf.schema_arrow.names if c.startswith("score_")]
        scan.face_files += 1
        scan.face_rows += pf.metadata.num_rows
        if columns:
            table = pf.read(columns=columns)
            for column in columns:
                scan.scores[column.removeprefix("score_")].append(_finite(table.column(column)))
    return scan


def compute_validation(output: str | Path) -> dict[str, Any] | None:
    """The validation section's numbers from ``OUT/validation/summary.json`` and its tables, or
    None without a summary. The summary is copied minus its bulky parts (``per_shard`` and long
    lists inside ``details``, which stay in summary.json); ``_scan`` is for the plots only."""
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
    scan = _scan_tables(output / "validation")
    metrics = json_safe(summary.get("metrics") or {})
    pairing: dict[str, Any] = {}
    for name, (_, status) in _PAIRING.items():
        value = metrics.get(name)
        if value is None and status is not None and scan.sample_files:
            value = scan.statuses.get(status, 0)
        pairing[name] = value
    validation = {k: json_safe(v) for k, v in summary.items() if k not in ("per_shard", "details", "metrics")}
    validation.update(
        metrics=metrics,
        details=json_safe(summary.get("details") or {}, MAX_DETAIL_LIST, see=str(VALIDATION_SUMMARY)),
        per_shard_count=len(summary.get("per_shard") or {}),
        pairing=pairing,
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


def _validation_plots(validation: dict[str, Any], scan: _TableScan | None) -> dict[str, str]:
    """Plots of the validation section (never a picture of a face); each is skipped when its data
    are absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    scan = scan or _TableScan()
    recognizers = validation.get("recognizers") or {}
    plots: dict[str, str] = {}

    for rec in sorted(scan.scores):
        values = scan.all_scores(rec)
        if values.size == 0:
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
        title = f"{rec}: verification scores of {values.size} faces"
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
    for name in ("gender", "expression"):
        confusion = attributes.get(f"{name}_confusion") if isinstance(attributes, dict) else None
        matrix, labels = _confusion(confusion)
        if matrix is None:
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
        agreement = np.trace(matrix) / matrix.sum() if matrix.sum() else float("nan")
        ax.set_title(f"{name}: original vs anonymized (agreement {agreement:.0%})", fontsize=10)
        plots[f"confusion-{name}"] = _png_b64(fig)

    directions = dict(SHARD_COLUMNS)
    for column in scan.by_shard:
        if column.startswith("max_score_"):
            metric, _ = _recognizer_rule(recognizers.get(column.removeprefix("max_score_")))
            directions[column] = "low" if metric == "euclidean" else "high"
    for column in sorted(scan.by_shard, key=lambda c: (c not in SHARD_COLUMNS, c)):
        stats = []
        for shard in sorted(scan.by_shard[column]):
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
             and isinstance(v, int | float) and not isinstance(v, bool)}
    if rates:
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


# ---------------------------------------------------------------------------- validation page


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _bounds(gate: dict[str, Any]) -> str:
    lo, hi = gate.get("min"), gate.get("max")
    if lo is not None and hi is not None:
        return f"{_fmt(lo)} <= x <= {_fmt(hi)}"
    if lo is not None:
        return f">= {_fmt(lo)}"
    if hi is not None:
        return f"<= {_fmt(hi)}"
    return "-"


def _gate_metric(gate: dict[str, Any]) -> _Markup:
    metric = str(gate.get("metric") or "")
    table = gate.get("table") or "dataset"
    if table == "dataset":
        return _Markup(f"{html.escape(metric_label(metric))}<br><code>{html.escape(metric)}</code>")
    return _Markup(f"column <code>{html.escape(metric)}</code> of each {html.escape(table)} row")


def _gate_value(gate: dict[str, Any]) -> str:
    value = gate.get("value")
    if (gate.get("table") or "dataset") != "dataset" and isinstance(value, int | float):
        return f"{value:.1%} of rows within bounds"
    return _fmt(value)


def _sha_cell(sha: Any) -> _Markup:
    if not sha:
        return _Markup("-")
    sha = html.escape(str(sha))
    return _Markup(f"<code title='{sha}'>{sha[:12]}</code>")


def _validation_html(validation: dict[str, Any], plots: dict[str, str]) -> str:
    """The "Validation gates" section: banner, gates, failing keys, pairing, metrics by family,
    plots, recognizers and models. No pictures other than the plots."""
    esc = html.escape
    status = str(validation.get("status"))
    parts = ["<section id='validation'>", "<h2 id='validation-gates'>Validation gates</h2>"]
    if status == "unreadable":
        parts.append(f"<div class='banner failed' data-status='unreadable'><strong>UNKNOWN</strong>"
                     f"The validation summary could not be read: {esc(str(validation.get('error')))}. "
                     "Nothing here clears the dataset for release.</div></section>")
        return "".join(parts)
    css, label, meaning = _BANNERS.get(status, ("failed", status.upper(), "Unknown validation status."))
    release = validation.get("release_file")
    release_note = (f"RELEASE.json present: <code>{esc(release)}</code>." if release else "No RELEASE.json present.")
    if (status == "passed") != bool(release):
        release_note += " <span class='bad'>This does not match the status: the folder was changed "
        release_note += "after validation.</span>"
    parts.append(f"<div class='banner {css}' data-status='{esc(status)}'><strong>{esc(label)}</strong>"
                 f"{esc(meaning)}<br><small>{release_note}</small></div>")
    seconds, ips = validation.get("seconds"), validation.get("images_per_second")
    parts.append(
        f"<p>Method <b>{esc(_fmt(validation.get('method')))}</b> &middot; originals "
        f"<code>{esc(_fmt(validation.get('original')))}</code> &middot; anonymized "
        f"<code>{esc(_fmt(validation.get('anonymized')))}</code> &middot; gates "
        f"{esc(_fmt(validation.get('gates_file')))} &middot; "
        f"{esc(_fmt(seconds))} s, {esc(_fmt(ips))} images/s</p>")

    gates = validation.get("gates") or []
    if gates:
        rows, attrs = [], []
        for g in gates:
            st = str(g.get("status"))
            name = _Markup(f"<b>{esc(str(g.get('name')))}</b><br><span class='muted'>"
                           f"{esc(str(g.get('description') or ''))}</span>")
            status_cell = _Markup(f"<span class='st-{esc(st)}'>{esc(st.replace('_', ' '))}</span>")
            rows.append([name, _gate_metric(g), _gate_value(g), _bounds(g), _fmt(g.get("mostly")),
                         status_cell, _fmt(g.get("margin")), _fmt(bool(g.get("required"))),
                         g.get("reason") or ""])
            attrs.append(f" class='gate' data-gate='{esc(str(g.get('name')))}' data-status='{esc(st)}'")
        parts.append(_table(["gate", "metric", "value", "bound(s)", "mostly", "status", "margin", "required",
                             "reason"], rows, row_attrs=attrs))
    else:
        parts.append("<p class='muted'>No gates were evaluated.</p>")

    failing = [g for g in gates if g.get("status") != "passed"]
    if failing:
        parts.append("<h3 id='validation-failing'>What failed</h3>")
        for g in failing:
            keys = [str(k) for k in (g.get("failing_keys") or [])][:MAX_FAILING_KEYS]
            what = "required" if g.get("required") else "not required"
            parts.append(f"<h4 data-failing-gate='{esc(str(g.get('name')))}'>{esc(str(g.get('name')))} "
                         f"({esc(str(g.get('status')).replace('_', ' '))}, {what})</h4>")
            if g.get("reason"):
                parts.append(f"<p>{esc(str(g['reason']))}</p>")
            if keys:
                table = g.get("table") or "dataset"
                noun = "faces" if table == "faces" else "samples"
                parts.append(f"<p>{len(keys)} {noun} that drove it, worst first:</p><ul class='keys'>"
                             + "".join(f"<li><code>{esc(k)}</code></li>" for k in keys) + "</ul>")
            elif g.get("status") == "failed":
                parts.append("<p class='muted'>A dataset-level metric: no single sample drove it.</p>")

    parts.append("<h3 id='validation-pairing'>Pairing</h3>")
    pairing = validation.get("pairing") or {}
    tables = validation.get("tables") or {}
    parts.append(_table([_PAIRING[k][0] for k in _PAIRING], [[_fmt(pairing.get(k)) for k in _PAIRING]]))
    parts.append(f"<p class='muted'>Tables: {_fmt((tables.get('samples') or {}).get('rows'))} sample rows, "
                 f"{_fmt((tables.get('faces') or {}).get('rows'))} face rows, "
                 f"{_fmt(validation.get('per_shard_count'))} shards.</p>")

    parts.append("<h3 id='validation-metrics'>Dataset metrics</h3>")
    by_family: dict[str, list[str]] = defaultdict(list)
    for name in sorted(validation.get("metrics") or {}):
        family = metric_family(name)
        if family != "pairing":
            by_family[family].append(name)
    metrics = validation.get("metrics") or {}
    for family, title in _FAMILIES.items():
        names = by_family.get(family)
        if not names:
            continue
        parts.append(f"<h4 data-family='{family}'>{esc(title)}</h4>")
        parts.append(_table(["metric", "name", "value"],
                            [[metric_label(n), _Markup(f"<code>{esc(n)}</code>"), _fmt(metrics[n])] for n in names]))

    if plots:
        parts.append("<h3 id='validation-plots'>Plots</h3><div class='plots'>" + "".join(
            f"<img alt='{esc(name)}' data-plot='{esc(name)}' src='data:image/png;base64,{b64}'>"
            for name, b64 in plots.items()) + "</div>")

    parts.append("<h3 id='validation-recognizers'>Recognizers</h3>")
    recognizers = validation.get("recognizers") or {}
    rec_rows = []
    for name, info in sorted(recognizers.items()):
        info = info or {}
        metric, threshold = info.get("metric"), info.get("threshold")
        rule = "-"
        if metric in ("cosine", "euclidean") and threshold is not None:
            rule = f"{'cosine similarity >=' if metric == 'cosine' else 'distance <='} {_fmt(threshold)}"
        rec_rows.append([name, "available" if info.get("available") else "not available",
                         info.get("reason") or "", metric or "-", _fmt(threshold), rule])
    parts.append(_table(["recognizer", "available", "why not", "metric", "threshold", "same person if"], rec_rows)
                 if rec_rows else "<p class='muted'>No recognizer was configured.</p>")

    parts.append("<h3 id='validation-models'>Models used</h3>")
    models = validation.get("models") or []
    parts.append(_table(["name", "sha256", "license", "source", "used for", "path / error"],
                        [[m.get("name") or "-", _sha_cell(m.get("sha256")), m.get("license") or "-",
                          m.get("source") or "-", m.get("used_for") or "-",
                          m.get("path") or m.get("error") or "-"] for m in models])
                 if models else "<p class='muted'>No model files were recorded.</p>")
    parts.append("</section>")
    return "".join(parts)


def _validation_page(report: dict[str, Any], section: str) -> str:
    """The page of a validation-only folder: the validation section alone."""
    return "".join([
        _head("Veil validation report"),
        "<h1>Veil validation report</h1>",
        f"<p>Output: <code>{html.escape(report['output'])}</code> &middot; no Veil run here "
        "(no manifest/): the anonymized dataset was validated as given.</p>",
        section,
        "</body></html>",
    ])
