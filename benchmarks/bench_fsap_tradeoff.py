"""How far FSAP moves a face (``fsap.tau``) against what the release keeps: privacy vs age.

FSAP stops a face once the optimised recognizer's similarity to the original is below
``tau`` (and each ensemble member and the certifier are past their thresholds). A lower
``tau`` moves faces further: gallery identification (top-1) gets harder for an attacker, and
more of the face changes. This script runs the same data at several ``tau`` and reports, for
each, the privacy figures of ``veil validate`` (verification and top-1 identification by every
recognizer, FaceNet-MS-Celeb being the one no method sees) beside the utility figures (age
read by Cydral's network, the ``age-mae`` gate's, and by the WideResNet; face LPIPS;
expression agreement) and the cost (iterations, seconds per face).

Data: the bench_fsap datasets (``photos``: the 7 shared photos; ``scenes``: ``--scenes``
generated 640x480 images with 2-4 pasted faces each). Each point is ``veil run --method fsap
--config WORK/tau-T.yaml`` then ``veil validate --method fsap`` (``--runner local``). Steps
are recorded per dataset in ``WORK/DATASET/steps.json`` and skipped when rerun, so two
datasets can run side by side as two processes (``--datasets photos`` and ``--datasets
scenes`` with the same ``--work``), then ``--report-only`` gathers both.

Writes ``WORK/tradeoff.md`` (one table per dataset), ``WORK/tradeoff.json`` and
``WORK/tradeoff.png`` (age change against top-1 identification, one line per dataset, each
point labelled with its tau, the gates' limits drawn).

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_tradeoff.py --taus 0.1,-0.1,-0.3,-0.5 --scenes 6
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench_fsap import (
    DATASETS,
    ROOT,
    _num,
    _pct,
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


def tau_label(tau: float) -> str:
    return f"{tau:+.2f}"


def plan(work: Path, dataset: str, source: str, taus: list[float]) -> list[dict]:
    """The run and validate steps of one dataset, one pair per tau."""
    common = ["--runner", "local", "--no-progress"]
    steps = []
    for tau in taus:
        config = work / f"tau{tau_label(tau)}.yaml"
        config.write_text(f"# bench_fsap_tradeoff: FSAP stopping similarity only; all else default.\n"
                          f"fsap: {{tau: {tau}}}\n")
        out = work / dataset / "out" / f"tau{tau_label(tau)}"
        audit = work / dataset / "audit" / f"tau{tau_label(tau)}"
        steps.append({"name": f"tau{tau_label(tau)}/run", "output": str(out),
                      "cmd": veil_cmd() + ["run", "--config", str(config), "--input", source,
                                           "--output", str(out), "--method", "fsap", *common]})
        steps.append({"name": f"tau{tau_label(tau)}/validate", "output": str(audit),
                      "cmd": veil_cmd() + ["validate", "--original", source, "--anonymized", str(out),
                                           "--output", str(audit), "--method", "fsap", *common]})
    return steps


def collect(work: Path, dataset: str, taus: list[float]) -> list[dict[str, Any]]:
    """One record per finished tau of a dataset (those whose validation summary exists)."""
    points = []
    for tau in taus:
        out = work / dataset / "out" / f"tau{tau_label(tau)}"
        audit = work / dataset / "audit" / f"tau{tau_label(tau)}"
        if not (audit / "validation" / "summary.json").exists():
            print(f"{dataset} tau {tau}: not finished, left out", file=sys.stderr)
            continue
        points.append({"tau": tau, "run": manifest_figures(out), "validation": validation_figures(audit)})
    return points


def table(points: list[dict[str, Any]]) -> str:
    """Markdown: one column per tau."""
    if not points:
        return "(no finished points)"
    cols = [tau_label(p["tau"]) for p in points]
    lines = ["| tau | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

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
                ax.annotate(f"tau {p['tau']:g}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
            chance = pts[0]["validation"]["top1"][rec]["chance"]
            if chance is not None:
                ax.axvline(100 * (chance + TOP1_MARGIN), color=line.get_color(), ls=":", lw=1)
        ax.axhline(AGE_GATE, color="grey", ls="--", lw=1)
        ax.set_xlabel(f"top-1 identification, % ({label})")
        ax.set_title("dotted: top-1 gate (chance + 5 points)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("age MAE, years (Cydral; dashed: gate)")
    axes[0].legend()
    fig.suptitle("FSAP: lower tau moves faces further; privacy (left on each axis) against age kept (down)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench-fsap-tradeoff"), help="work folder")
    ap.add_argument("--taus", default="0.1,-0.1,-0.3,-0.5", help="comma-separated fsap.tau values")
    ap.add_argument("--datasets", default="photos,scenes", help="comma-separated: photos, scenes")
    ap.add_argument("--scenes", type=int, default=6, help="scene images of 640x480 (default: 6)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the scene builder")
    ap.add_argument("--fresh", action="store_true", help="redo every step")
    ap.add_argument("--report-only", action="store_true", help="only gather finished steps")
    args = ap.parse_args(argv)
    if not os.environ.get("VEIL_MODELS"):
        os.environ["VEIL_MODELS"] = str(ROOT.parent / "shared" / "models")
    taus = [float(t) for t in args.taus.split(",") if t.strip()]
    if not taus or any(not -1.0 < t < 1.0 for t in taus):
        ap.error("--taus: cosine similarities strictly between -1 and 1")
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
            run_steps(work / ds, plan(work, ds, str(sources[ds]), taus), fresh=args.fresh)
        results[ds] = collect(work, ds, taus)
    command = ("VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_tradeoff.py "
               + shlex.join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"))
    text = "\n\n".join(f"**{ds}**\n\n{table(points)}" for ds, points in results.items())
    figure = plot(work / "tradeoff.png", results)
    (work / "tradeoff.json").write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "results": results}, indent=1, default=str))
    (work / "tradeoff.md").write_text(f"    {command}\n\n{text}\n")
    print(f"    {command}\n\n{text}")
    if figure is not None:
        print(f"\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
