"""How far FSAP moves a face (``fsap.tau``, or another ``fsap`` setting) against what the
release keeps: privacy vs age and appearance.

FSAP stops a face once the optimised recognizer's similarity to the original is below
``tau`` (and each ensemble member and the certifier are past their thresholds). A lower
``tau`` moves faces further: gallery identification (top-1) gets harder for an attacker, and
more of the face changes. This script runs the same data at several ``tau`` and reports, for
each, the privacy figures of ``veil validate`` (verification and top-1 identification by every
recognizer, FaceNet-MS-Celeb being the one no method sees) beside the utility figures (age
read by Cydral's network, the ``age-mae`` gate's, and by the WideResNet; face LPIPS;
expression agreement) and the cost (iterations, seconds per face). ``--param`` sweeps another
numeric ``fsap`` setting the same way (``--param change_chroma --values 1,0``; write negative
values as ``--values=-0.4,-0.5``); all else stays default. Each point also reports how the
faces' light and colour changed, pixel by pixel.

Data: the bench_fsap datasets (``photos``: the 7 shared photos; ``scenes``: ``--scenes``
generated 640x480 images with 2-4 pasted faces each). Each point is ``veil run --method fsap
--config WORK/PARAM-VALUE.yaml`` then ``veil validate --method fsap`` (``--runner local``). Steps
are recorded per dataset in ``WORK/DATASET/steps.json`` and skipped when rerun, so two
datasets can run side by side as two processes (``--datasets photos`` and ``--datasets
scenes`` with the same ``--work``), then ``--report-only`` gathers both.

Writes ``WORK/tradeoff.md`` (one table per dataset), ``WORK/tradeoff.json`` and
``WORK/tradeoff.png`` (age change against top-1 identification, one line per dataset, each
point labelled with its value, the gates' limits drawn) and ``WORK/colour.png`` (FaceNet-MS-Celeb's
top-1 identification against the faces' colour change).

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_tradeoff.py --taus 0.1,-0.1,-0.3,-0.5 --scenes 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_fsap import (
    DATASETS,
    ROOT,
    _num,
    _pct,
    _released,
    _shard_images,
    build_photos,
    build_scenes,
    manifest_figures,
    run_steps,
    validation_figures,
    veil_cmd,
)

#: The age-mae gate's limit (validators/gates.yaml), drawn on the plot.
AGE_GATE = 8.0
#: Top-1 identification gates allow chance plus this (validators/gates.yaml).
TOP1_MARGIN = 0.05


def point_name(param: str, value: float) -> str:
    """Folder and step name of one point: ``tau-0.30``, ``change_chroma0``."""
    return f"tau{value:+.2f}" if param == "tau" else f"{param}{value:g}"


def plan(work: Path, dataset: str, source: str, param: str, values: list[float],
         fixed: dict[str, float | str] | None = None) -> list[dict]:
    """The run and validate steps of one dataset, one pair per value of ``fsap.<param>``;
    ``fixed`` are further ``fsap`` settings every point shares."""
    common = ["--runner", "local", "--no-progress"]
    steps = []
    for value in values:
        name = point_name(param, value)
        config = work / f"{name}.yaml"
        settings = ", ".join(f"{k}: {v}" for k, v in {**(fixed or {}), param: value}.items())
        config.write_text(f"# bench_fsap_tradeoff: fsap.{param}{' and ' + ', '.join(fixed) if fixed else ''} "
                          f"set; all else default.\nfsap: {{{settings}}}\n")
        out = work / dataset / "out" / name
        audit = work / dataset / "audit" / name
        steps.append({"name": f"{name}/run", "output": str(out),
                      "cmd": veil_cmd() + ["run", "--config", str(config), "--input", source,
                                           "--output", str(out), "--method", "fsap", *common]})
        steps.append({"name": f"{name}/validate", "output": str(audit),
                      "cmd": veil_cmd() + ["validate", "--original", source, "--anonymized", str(out),
                                           "--output", str(audit), "--method", "fsap", *common]})
    return steps


def colour_figures(original_input: str, out: Path) -> dict[str, float | None]:
    """How the released faces' light and colour changed: per pixel of the boxes of the faces
    FSAP optimised, the luminance change |dY| and the colour change |(dCb, dCr)| (BT.601, in
    grey levels of 255), mean and 99th percentile. Encoding noise counts too (the same in
    every point of a sweep)."""
    from veil.validators.pairing import read_veil_output

    originals = _shard_images(Path(original_input))
    released = _released(out)
    regions = read_veil_output(out).regions
    to_ycc = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    luma, chroma = [], []
    for key in sorted(released):
        if key not in originals:
            continue
        for region in regions.get(key, []):
            if (region.get("fsap") or {}).get("status") != "optimised":
                continue
            h, w = originals[key].shape[:2]
            x0, y0, x1, y1 = (int(round(v)) for v in region["box"])
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            diff = (released[key][y0:y1, x0:x1].astype(np.float64)
                    - originals[key][y0:y1, x0:x1].astype(np.float64)).reshape(-1, 3) @ to_ycc.T
            luma.append(np.abs(diff[:, 0]))
            chroma.append(np.hypot(diff[:, 1], diff[:, 2]))
    if not luma:
        return {"luma_mean": None, "luma_p99": None, "chroma_mean": None, "chroma_p99": None}
    y, c = np.concatenate(luma), np.concatenate(chroma)
    return {"luma_mean": float(y.mean()), "luma_p99": float(np.percentile(y, 99)),
            "chroma_mean": float(c.mean()), "chroma_p99": float(np.percentile(c, 99))}


def collect(work: Path, dataset: str, source: str, param: str, values: list[float]) -> list[dict[str, Any]]:
    """One record per finished value of a dataset (those whose validation summary exists)."""
    points = []
    for value in values:
        name = point_name(param, value)
        out, audit = work / dataset / "out" / name, work / dataset / "audit" / name
        if not (audit / "validation" / "summary.json").exists():
            print(f"{dataset} {param} {value:g}: not finished, left out", file=sys.stderr)
            continue
        points.append({"param": param, "value": value, "run": manifest_figures(out),
                       "validation": validation_figures(audit), "colour": colour_figures(source, out)})
    return points


def table(points: list[dict[str, Any]]) -> str:
    """Markdown: one column per value."""
    if not points:
        return "(no finished points)"
    param = points[0]["param"]
    cols = [f"{p['value']:+.2f}" if param == "tau" else f"{p['value']:g}" for p in points]
    lines = [f"| {param} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(label: str, fn) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(p["run"], p["validation"]) for p in points) + " |")

    row("faces / images released / samples quarantined",
        lambda r, v: f"{v['faces_identity'] or 0} / {v['pairs'] or 0} / {r['status'].get('quarantined', 0)}")
    for rec, label in (("dlib-resnet", "dlib"), ("mobilefacenet", "MobileFaceNet"),
                       ("facenet-casia", "FaceNet-CASIA"), ("facenet-msceleb", "FaceNet-MS-Celeb")):
        row(f"re-ID (verification), {label}",
            lambda r, v, rec=rec: _pct((v["reid"].get(rec) or {}).get("rate")))
    for rec, label in (("dlib-resnet", "dlib"), ("mobilefacenet", "MobileFaceNet"),
                       ("facenet-msceleb", "FaceNet-MS-Celeb")):
        row(f"top-1 identification, {label} (chance)",
            lambda r, v, rec=rec: f"{_pct(v['top1'][rec]['rate'])} ({_pct(v['top1'][rec]['chance'])})")
    row("restored re-ID, worst recognizer",
        lambda r, v: _pct(max((x for x in v["restored_reid"].values() if x is not None), default=None)))
    row("detection CenterFace / MTCNN",
        lambda r, v: f"{_pct(v['detection']['centerface'])} / {_pct(v['detection']['mtcnn'])}")
    row("**age MAE, Cydral (gate max 8)**", lambda r, v: _num(v["age_mae"], "{:.1f}"))
    row("age MAE, WideResNet", lambda r, v: _num(v["age_wideresnet_mae"], "{:.1f}"))
    row("face LPIPS / SSIM", lambda r, v: f"{_num(v['face_lpips'], '{:.3f}')} / {_num(v['face_ssim'], '{:.3f}')}")
    lines.append("| face light change / colour change, mean (p99), of 255 | " + " | ".join(
        f"{_num(c['luma_mean'], '{:.1f}')} ({_num(c['luma_p99'], '{:.0f}')}) / "
        f"{_num(c['chroma_mean'], '{:.1f}')} ({_num(c['chroma_p99'], '{:.0f}')})"
        for c in (p.get("colour") or dict.fromkeys(("luma_mean", "luma_p99", "chroma_mean", "chroma_p99"))
                  for p in points)) + " |")
    row("expression / gender agreement",
        lambda r, v: f"{_pct(v['expression_agreement'])} / {_pct(v['gender_agreement'])}")
    row("iterations (median, final round)", lambda r, v: _num(r["fsap_iterations_final_round"]["median"], "{:.0f}"))
    row("faces per round", lambda r, v: ", ".join(f"r{k} {n}" for k, n in r["fsap_rounds"].items()) or "-")
    row("s per face (FSAP stage, one core)", lambda r, v: _num(r["fsap_seconds_per_face"], "{:.1f}"))
    row("gates failed", lambda r, v: ", ".join(v["failed_gates"]) or "none")
    return "\n".join(lines)


def plot(path: Path, results: dict[str, list[dict[str, Any]]]) -> Path | None:
    """Age MAE (Cydral) against top-1 identification by FaceNet-MS-Celeb and by dlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(results.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, rec, label in ((axes[0], "facenet-msceleb", "FaceNet-MS-Celeb (no method sees it)"),
                           (axes[1], "dlib-resnet", "dlib ResNet (certifies)")):
        for (dataset, points), marker in zip(results.items(), "os^", strict=False):
            pts = [p for p in points if p["validation"]["top1"][rec]["rate"] is not None
                   and p["validation"]["age_mae"] is not None]
            if not pts:
                continue
            x = [100 * p["validation"]["top1"][rec]["rate"] for p in pts]
            y = [p["validation"]["age_mae"] for p in pts]
            line = ax.plot(x, y, marker=marker, label=dataset)[0]
            for p, xi, yi in zip(pts, x, y, strict=True):
                ax.annotate(f"{p['param']} {p['value']:g}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
            chance = pts[0]["validation"]["top1"][rec]["chance"]
            if chance is not None:
                ax.axvline(100 * (chance + TOP1_MARGIN), color=line.get_color(), ls=":", lw=1)
        ax.axhline(AGE_GATE, color="grey", ls="--", lw=1)
        ax.set_xlabel(f"top-1 identification, % ({label})")
        ax.set_title("dotted: top-1 gate (chance + 5 points)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("age MAE, years (Cydral; dashed: gate)")
    axes[0].legend()
    param = next(p["param"] for points in results.values() for p in points)
    fig.suptitle(f"FSAP by fsap.{param}: privacy (left on each axis) against age kept (down)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_colour(path: Path, results: dict[str, list[dict[str, Any]]]) -> Path | None:
    """Top-1 identification by FaceNet-MS-Celeb (no method sees it) against the faces'
    per-pixel colour change: what a sweep buys in appearance and costs in privacy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {ds: [p for p in points if (p.get("colour") or {}).get("chroma_mean") is not None
                   and p["validation"]["top1"]["facenet-msceleb"]["rate"] is not None]
              for ds, points in results.items()}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (dataset, pts), marker in zip(series.items(), "os^", strict=False):
        if not pts:
            continue
        x = [p["colour"]["chroma_mean"] for p in pts]
        y = [100 * p["validation"]["top1"]["facenet-msceleb"]["rate"] for p in pts]
        line = ax.plot(x, y, marker=marker, label=dataset)[0]
        for p, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(f"{p['param']} {p['value']:g}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
        chance = pts[0]["validation"]["top1"]["facenet-msceleb"]["chance"]
        if chance is not None:
            ax.axhline(100 * (chance + TOP1_MARGIN), color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("face colour change, mean |(dCb, dCr)| per pixel, of 255 (encoding noise included)")
    ax.set_ylabel("top-1 identification, %, FaceNet-MS-Celeb")
    ax.set_title("dotted: top-1 gate (chance + 5 points)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench-fsap-tradeoff"), help="work folder")
    ap.add_argument("--param", default="tau", help="the fsap setting to sweep (default: tau)")
    ap.add_argument("--values", "--taus", default="0.1,-0.1,-0.3,-0.5", help="comma-separated values of it")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further fsap setting every point shares (repeatable)")
    ap.add_argument("--datasets", default="photos,scenes", help="comma-separated: photos, scenes")
    ap.add_argument("--scenes", type=int, default=6, help="scene images of 640x480 (default: 6)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the scene builder")
    ap.add_argument("--fresh", action="store_true", help="redo every step")
    ap.add_argument("--report-only", action="store_true", help="only gather finished steps")
    args = ap.parse_args(argv)
    if not os.environ.get("VEIL_MODELS"):
        os.environ["VEIL_MODELS"] = str(ROOT.parent / "shared" / "models")
    from veil.config import ConfigError, FSAPConfig

    fields = {f.name: f for f in dataclasses.fields(FSAPConfig)}

    def kind(name: str) -> type | None:
        """The type a setting's value is read as (int, float, str), or None when not sweepable;
        lambda_id / lambda_attr default to None (the latent space's own rate) and read as float."""
        if name not in fields:
            return None
        default = fields[name].default
        if isinstance(default, bool):
            return None
        if isinstance(default, int | float | str):
            return type(default)
        return float if default is None and "float" in str(fields[name].type) else None

    param_kind = kind(args.param)
    if param_kind not in (int, float):
        ap.error(f"--param: {args.param!r} is not a numeric fsap setting")
    try:
        values = [param_kind(v) for v in args.values.split(",") if v.strip()]
    except ValueError as exc:
        ap.error(f"--values: {exc}")
    if not values:
        ap.error("--values: at least one value")
    fixed: dict[str, float | str] = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        key_kind = kind(key)
        if not sep or key == args.param or key_kind is None:
            ap.error(f"--set {item!r}: KEY=VALUE of a numeric or text fsap setting other than --param")
        try:
            fixed[key] = key_kind(text)
        except ValueError as exc:
            ap.error(f"--set {item!r}: {exc}")
    for value in values:
        try:
            FSAPConfig(**{**fixed, args.param: value})
        except ConfigError as exc:
            ap.error(f"--values/--set: {exc}")
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        ap.error(f"unknown dataset(s): {', '.join(sorted(unknown))}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sources = {"photos": work / "data" / "photos" / "photos-0000.tar",
               "scenes": work / "data" / f"scenes-{args.scenes}-s{args.seed}" / "scenes-0000.tar"}
    results: dict[str, list[dict[str, Any]]] = {}
    for ds in datasets:
        if not args.report_only:
            if ds == "photos" and not sources[ds].exists():
                build_photos(sources[ds].parent)
            elif ds == "scenes" and not sources[ds].exists():
                build_scenes(sources[ds].parent, args.scenes, seed=args.seed)
            (work / ds).mkdir(exist_ok=True)
            run_steps(work / ds, plan(work, ds, str(sources[ds]), args.param, values, fixed), fresh=args.fresh)
        results[ds] = collect(work, ds, str(sources[ds]), args.param, values)
    command = ("VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_tradeoff.py "
               + shlex.join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"))
    text = "\n\n".join(f"**{ds}**\n\n{table(points)}" for ds, points in results.items())
    figure = plot(work / "tradeoff.png", results)
    colour_figure = plot_colour(work / "colour.png", results)
    (work / "tradeoff.json").write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "results": results}, indent=1, default=str))
    (work / "tradeoff.md").write_text(f"    {command}\n\n{text}\n")
    print(f"    {command}\n\n{text}")
    for path in (figure, colour_figure):
        if path is not None:
            print(f"\nfigure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
