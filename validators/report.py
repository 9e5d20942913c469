"""The audit report: ``OUT/report/report.json`` and a self-contained ``OUT/report/index.html``.

Everything is computed from the manifests (and ``OUT/run.json`` for the configuration and
environment), so ``veil report OUT`` rebuilds the same report at any time.

The report never shows an un-anonymized face: its picture grid is cut from the *released*
files only, and only around regions that were anonymized and passed the re-scan.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from veil.transforms.stage import reason_code

MAX_GRID = 24


def load_rows(output: Path) -> list[dict[str, Any]]:
    from veil.pipelines.manifest import read_manifests

    return read_manifests(output).to_pylist()


def compute_report(output: Path) -> dict[str, Any]:
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
    for r in rows:
        shard = per_shard[r["shard"]]
        shard[r["status"]] += 1
        shard["samples"] += 1
        shard["faces"] += int(r.get("n_faces") or 0)
        seconds_by_shard[r["shard"]] += float(r.get("seconds") or 0.0)
        if r["status"] != "quarantined" or r.get("regions"):
            faces_per_image.append(int(r.get("n_faces") or 0))
        for region in json.loads(r.get("regions") or "[]"):
            if region.get("redetected"):
                continue
            scores.append(float(region.get("score", 0.0)))
            detectors[region.get("detector", "?")] += 1
        for stage, t in json.loads(r.get("timings") or "{}").items():
            stage_times[stage].append(float(t))
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
    report["_scores"] = scores  # for plots only, not written
    report["_rows"] = rows
    return report


def build_report(output: str | Path) -> Path:
    """Write report.json and index.html under OUT/report; returns the HTML path."""
    from veil.pipelines.sinks import atomic_write_bytes

    output = Path(output)
    if not (output / "manifest").is_dir():
        raise FileNotFoundError(f"{output} has no manifest/ folder: is it an output of 'veil run'?")
    report = compute_report(output)
    scores = report.pop("_scores")
    rows = report.pop("_rows")
    folder = output / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "report.json", json.dumps(report, indent=2, sort_keys=True, default=str).encode())
    plots = _plots(report, scores)
    grid = _grid(output, rows)
    page = _html(report, plots, grid)
    atomic_write_bytes(folder / "index.html", page.encode())
    return folder / "index.html"


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


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(report: dict[str, Any], plots: dict[str, str], grid: list[dict[str, str]]) -> str:
    esc = html.escape
    counts = report["counts"]
    t = report["throughput"]
    ips = t.get("images_per_second")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Veil audit report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;font-size:14px}th{background:#f3f3f3}.plots img{margin:4px}"
        ".grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;font-size:11px}"
        ".bad{color:#b22}.ok{color:#272}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style>",
        "</head><body>",
        "<h1>Veil audit report</h1>",
        f"<p>Output: <code>{esc(report['output'])}</code> &middot; run phase: {esc(str(report.get('phase')))}"
        f" &middot; fingerprint <code>{esc(str(report.get('fingerprint')))[:16]}</code></p>",
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
