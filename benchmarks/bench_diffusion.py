"""`--method diffusion --diffusion-mode latent` on the shared photos, offline (issue 8).

No diffusion weights are available offline, so this measures the mode that runs on what is:
paired latent optimisation (thesis 6.5.4) in the TAEF2 latent space, starting from faces of a
synthetic pool built with the shared DCGAN (``veil pool``), paired by POOL's attribute
pairing (``--synthetic-pool``), certified by dlib and re-scanned.

Steps, each a subprocess of the ``veil`` command line (``--runner local``):

  pool   ``veil pool --generator dcgan-celeba32 --count POOL_SIZE``;
  run    ``veil run --method diffusion --diffusion-mode latent --synthetic-pool POOL`` on the 7
         shared photos (a folder input).

Figures: samples released / quarantined, faces replaced, re-samples used, the released dlib
distance of every replaced face (0.6 = dlib's same-person threshold; certification asks for
0.7 with the default margin), the optimised recognizer's final similarity, and CPU seconds
(``resource.getrusage(RUSAGE_CHILDREN)``: user + sys of the subprocess, so other load on the
machine does not count) per step and per replaced face. Writes ``WORK/results.json``.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_diffusion.py --pool-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _veil(args: list[str], log: Path) -> dict[str, float]:
    """Run ``veil ARGS``; CPU and wall seconds it took. A failure shows its log and stops."""
    cpu, wall = _cpu_children(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "veil.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"veil {' '.join(args[:1])} failed with exit code {proc.returncode}; log: {log}")
    return {"cpu_s": round(_cpu_children() - cpu, 2), "wall_s": round(time.perf_counter() - wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench-diffusion", help="working folder (default: bench-diffusion)")
    parser.add_argument("--pool-size", type=int, default=64, help="DCGAN pool faces (default: 64)")
    parser.add_argument("--steps", type=int, default=30, help="diffusion.steps (default: 30)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the pool and rerun")
    args = parser.parse_args()

    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    photos = work / "photos"
    if not photos.exists():
        photos.mkdir()
        for p in sorted(FACES.iterdir()):
            shutil.copy(p, photos / p.name)
    results: dict[str, object] = {"pool_size": args.pool_size, "steps": args.steps}
    pool = work / "pool"
    if not (pool / "pool.json").exists():
        shutil.rmtree(pool, ignore_errors=True)
        results["pool"] = _veil(["pool", "--generator", "dcgan-celeba32", "--count", str(args.pool_size),
                                 "--output", str(pool), "--no-progress"], work / "pool.log")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    config = work / "run.yaml"
    config.write_text(f"diffusion:\n  mode: latent\n  latent: taef2\n  steps: {args.steps}\n")
    results["run"] = _veil(["run", "--config", str(config), "--input", str(photos), "--output", str(out),
                            "--runner", "local", "--no-progress", "--method", "diffusion",
                            "--synthetic-pool", str(pool)], work / "run.log")

    from veil.pipelines.manifest import read_manifests

    rows = read_manifests(out).to_pylist()
    faces = []
    for row in rows:
        for region in json.loads(row["regions"] or "[]"):
            record = region.get("diffusion")
            if record:
                faces.append({"key": row["key"], "sample": row["status"], **record})
    replaced = [f for f in faces if f["status"] == "replaced"]
    released = [f["released"]["dlib-resnet"] for f in replaced if "released" in f]
    results.update(
        samples={s: sum(r["status"] == s for r in rows) for s in ("anonymized", "clean", "quarantined")},
        reasons=sorted({r["reason"].split(":")[0] for r in rows if r["reason"]}),
        faces={"replaced": len(replaced), "fallback": sum(f["status"] == "fallback" for f in faces),
               "resamples": [f.get("resamples", 0) for f in replaced]},
        released_dlib_distance={"min": min(released, default=None), "max": max(released, default=None),
                                "mean": round(sum(released) / len(released), 4) if released else None},
        final_similarity=[f.get("similarity") for f in replaced],
        cpu_s_per_replaced_face=round(results["run"]["cpu_s"] / max(1, len(replaced)), 2),
    )
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
