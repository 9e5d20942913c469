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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--runner", default="local", choices=["local", "ray", "beam"])
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "validate"))
    args = ap.parse_args()

    from bench_pipeline import build_dataset

    from veil.config import RunConfig
    from veil.pipelines.driver import run
    from veil.validators.validate import ValidateConfig, validate

    work = Path(args.work) / f"n{args.images}"
    if not (work / "truth.json").exists():
        build_dataset(work, args.images, per_shard=args.per_shard)
    n_shards = (args.images + args.per_shard - 1) // args.per_shard
    pattern = str(work / "shards" / f"bench-{{0000..{n_shards - 1:04d}}}.tar")
    out = work / f"out-{args.runner}"
    audit = work / f"audit-{args.runner}"
    for d in (out, audit):
        if d.exists():
            import shutil

            shutil.rmtree(d)

    t0 = time.perf_counter()
    summary = run(RunConfig(input=pattern, output=str(out), runner=args.runner, progress=False))
    run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = validate(ValidateConfig(original=pattern, anonymized=str(out), output=str(audit),
                                     runner=args.runner, progress=False))
    val_s = time.perf_counter() - t0
    details = json.loads(Path(result.summary_path).read_text())["details"]
    record = {
        "images": args.images, "runner": args.runner,
        "run_seconds": round(run_s, 2), "run_ms_per_image": round(1000 * run_s / args.images, 1),
        "validate_seconds": round(val_s, 2), "validate_ms_per_image": round(1000 * val_s / args.images, 1),
        "validate_over_run": round(val_s / run_s, 2),
        "faces": result.metrics.get("faces_original"),
        "status": result.status,
        "validate_step_ms_per_image": {k: round(1000 * v, 1) for k, v in details.get("seconds_per_image", {}).items()},
        "anonymized": summary.counts,
    }
    print(json.dumps(record, indent=2))
    with open(ROOT / "bench-out" / "validate.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), **record}) + "\n")


if __name__ == "__main__":
    main()
