"""Cost of validation per image, next to the cost of the run it validates (issue: validation
gates, "BENCHMARKS.md gains the cost of validation per image").

Builds the benchmark dataset of bench_pipeline.py (640x480 scenes with pasted real faces and
1280x960 close-ups), anonymizes it with the default settings, then validates the release
with the default validation settings, each on the same runner, and prints:

  * images/s and ms per image of the run and of the validation (model loading excluded for
    neither: both are what a user waits for);
  * validation seconds per image broken down by step (original/anonymized detection, each
    detection-rate detector, each recognizer, attributes, FD features, background).

    VEIL_MODELS=../shared/models python benchmarks/bench_validate.py --images 200 --runner local

Results are printed as JSON and appended to bench-out/validate.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children: wall time is noise on a
    machine shared with other jobs, CPU time is what the work costs. With --runner ray the
    actors are Ray workers, not children, so only the local runner is measured completely."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--runner", default="local", choices=["local", "ray", "beam"])
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "validate"))
    ap.add_argument("--measure", default="gated,all",
                    help="comma-separated validation modes, each validated after the same run: gated "
                         "(what `veil run --gates` does) and/or all (`veil validate`'s default)")
    args = ap.parse_args()

    from bench_pipeline import build_dataset

    from veil.config import RunConfig
    from veil.orchestrate import run
    from veil.validators.validate import ValidateConfig, validate

    work = Path(args.work) / f"n{args.images}"
    if not (work / "truth.json").exists():
        build_dataset(work, args.images, per_shard=args.per_shard)
    n_shards = (args.images + args.per_shard - 1) // args.per_shard
    pattern = str(work / "shards" / f"bench-{{0000..{n_shards - 1:04d}}}.tar")
    import shutil

    out = work / f"out-{args.runner}"
    if out.exists():
        shutil.rmtree(out)

    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = run(RunConfig(input=pattern, output=str(out), runner=args.runner, progress=False))
    run_s, run_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    results = {}
    for measure in [m.strip() for m in args.measure.split(",") if m.strip()]:
        audit = work / f"audit-{args.runner}-{measure}"
        if audit.exists():
            shutil.rmtree(audit)
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = validate(ValidateConfig(original=pattern, anonymized=str(out), output=str(audit),
                                         runner=args.runner, progress=False, measure=measure))
        val_s, val_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        report(args, summary, result, measure, run_s, run_cpu, val_s, val_cpu)
        results[measure] = result
    if {"gated", "all"} <= results.keys():
        # Leaving out what no gate reads must not change a verdict or a measured value.
        gated, full = results["gated"], results["all"]
        same_gates = ([(g["name"], g["status"], g["value"]) for g in gated.gates]
                      == [(g["name"], g["status"], g["value"]) for g in full.gates])
        differ = sorted(k for k, v in gated.metrics.items() if v is not None and v != full.metrics.get(k))
        print(json.dumps({"gates_identical": same_gates, "measured_metrics_that_differ": differ}))


def report(args, summary, result, measure, run_s, run_cpu, val_s, val_cpu) -> None:
    details = json.loads(Path(result.summary_path).read_text())["details"]
    record = {
        "images": args.images, "runner": args.runner, "measure": measure,
        "not_measured": details.get("not_measured"),
        "run_seconds": round(run_s, 2), "run_ms_per_image": round(1000 * run_s / args.images, 1),
        "validate_seconds": round(val_s, 2), "validate_ms_per_image": round(1000 * val_s / args.images, 1),
        "validate_over_run": round(val_s / run_s, 2),
        "run_cpu_seconds": round(run_cpu, 2), "validate_cpu_seconds": round(val_cpu, 2),
        "validate_over_run_cpu": round(val_cpu / run_cpu, 2) if run_cpu else None,
        "faces": result.metrics.get("faces_original"),
        "status": result.status,
        "validate_step_ms_per_image": {k: round(1000 * v, 1) for k, v in details.get("seconds_per_image", {}).items()},
        "validate_step_cpu_ms_per_image": {k: round(1000 * v, 1)
                                           for k, v in details.get("cpu_seconds_per_image", {}).items()},
        "gates": {g["name"]: [g["status"], g.get("value")] for g in result.gates},
        "metrics": result.metrics,
        "anonymized": summary.counts,
    }
    print(json.dumps(record, indent=2))
    with open(ROOT / "bench-out" / "validate.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), **record}) + "\n")


if __name__ == "__main__":
    main()
