"""Kill -9 at any moment: does `veil run` always resume to the same release? (issue 12)

Builds three small WebDataset shards of real face photos (2, 3 and 2 samples, one a truncated
JPEG) and a folder tree of five photos, makes an uninterrupted reference run of each, then:

  * ``--sweep``: every hit of every named fault point (``VEIL_FAULT_AT=<point>:<n>`` for
    n = 1, 2, ... until the run no longer reaches it), each followed by a resume;
  * ``--random N``: N runs SIGKILLed by this script after a random delay drawn uniformly over
    the reference run's duration; a third of the resumes are killed again at random.

After every kill it checks the killed state (every manifest present describes data that are
in place and byte-identical to the reference; no RELEASE.json), and after every resume the
finished output: released files byte-identical to the reference, manifests identical but for
the wall-clock columns, every input key exactly once, no temp file, no unlisted released
file, run.json finished, report.json equal to the reference's but for timings.

Runs go through the pre-imported "zygote" of tests/helpers.py (forked processes running
``veil.cli.main``), so a kill lands on pipeline work rather than on Python imports.

    VEIL_MODELS=../shared/models python benchmarks/bench_kill9.py --sweep --random 100

Results are printed as JSON and appended to bench-out/kill9.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FACES = ROOT.parent / "shared" / "data" / "faces"
TAR_POINTS = ["read", "stage:decode", "stage:detect", "stage:anonymize", "stage:encode",
              "stage:rescan", "shard:sample", "shard:fsynced", "shard:renamed", "manifest:tmp",
              "manifest:done", "write:run.json", "write:report.json", "write:index.html"]
FOLDER_POINTS = ["shard:sample", "shard:fsynced", "shard:renamed", "manifest:tmp", "manifest:done"]


def build_inputs(root: Path) -> dict[str, dict]:
    from test_crash_safety import build_inputs as build

    return build(root, FACES)


def args_for(spec: dict, out: Path) -> list[str]:
    from test_crash_safety import run_args

    return run_args(spec["input"], out)


def killed_state_ok(out: Path, ref: Path) -> list[str]:
    """What is wrong with a killed output: a manifest whose data are missing or differ from
    the reference, or a RELEASE.json."""
    from test_crash_safety import data_digest, manifests

    problems = []
    have, want = data_digest(out) if (out / "data").is_dir() else {}, data_digest(ref)
    if (out / "manifest").is_dir():
        for name, (meta, _rows) in manifests(out).items():
            for output in filter(None, meta["outputs"].split(",")):
                if have.get(output) != want.get(output):
                    problems.append(f"manifest {name} lists {output}, which is missing or differs")
    if (out / "RELEASE.json").exists():
        problems.append("RELEASE.json present")
    return problems


def finished_ok(out: Path, ref: Path, spec: dict) -> list[str]:
    from test_crash_safety import assert_same_release, check_consistent

    try:
        check_consistent(out, spec["keys"], spec["shards"])
        assert_same_release(out, ref)
    except AssertionError as exc:
        return [str(exc).splitlines()[0] if str(exc) else "assertion failed"]
    return []


def phase_of(out: Path) -> str:
    """Where a kill landed, read from what it left."""
    from veil.pipelines.sinks import TEMP_MARKER

    manifests = len(list((out / "manifest").glob("*.parquet"))) if (out / "manifest").is_dir() else 0
    temps = [p.name for p in out.rglob("*") if TEMP_MARKER in p.name]
    if not (out / "run.json").exists():
        return "before run.json"
    if (out / "report" / "index.html").exists():
        return "finished"
    if (out / "report" / "report.json").exists():
        return "report (page)"
    info = json.loads((out / "run.json").read_text())
    if info["phase"] == "finished":
        return "report"
    where = "manifest" if any(".parquet" in t for t in temps) else "shard" if temps else "processing"
    return f"{manifests} shards committed, in {where}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="every hit of every named fault point")
    ap.add_argument("--random", type=int, default=0, help="random-delay kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temp folder)")
    args = ap.parse_args()

    from helpers import Zygote

    work = Path(args.work or tempfile.mkdtemp(prefix="veil-kill9-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "in").mkdir(exist_ok=True)
    inputs = build_inputs(work / "in")
    zygote = Zygote()
    counter = iter(range(10**9))

    def run(spec: dict, out: Path, **kw) -> tuple[int, str]:
        return zygote.run(args_for(spec, out), work / f"log-{next(counter)}.txt", **kw)

    refs, ref_seconds = {}, {}
    for kind, spec in inputs.items():
        refs[kind] = work / f"ref-{kind}"
        start = time.perf_counter()
        rc, log = run(spec, refs[kind])
        ref_seconds[kind] = time.perf_counter() - start
        assert rc == 0, log[-2000:]

    results: dict[str, object] = {"reference_seconds": ref_seconds}
    failures: list[dict] = []
    start_all = time.perf_counter()

    def resume_and_check(kind: str, out: Path, what: str) -> None:
        problems = killed_state_ok(out, refs[kind])
        rc, log = run(inputs[kind], out)
        if rc != 0:
            problems.append(f"resume exited {rc}: {log[-300:]}")
        else:
            problems += finished_ok(out, refs[kind], inputs[kind])
        if problems:
            failures.append({"case": what, "problems": problems})

    if args.sweep:
        hits = Counter()
        for kind, points in (("tar", TAR_POINTS), ("folder", FOLDER_POINTS)):
            for point in points:
                n = 1
                while True:
                    out = work / f"sweep-{kind}-{point.replace(':', '_')}-{n}"
                    rc, log = run(inputs[kind], out, env={"VEIL_FAULT_AT": f"{point}:{n}"})
                    if rc == 0:
                        break  # the run never reached this point an n-th time
                    if rc != -signal.SIGKILL:
                        failures.append({"case": f"{kind} {point}:{n}", "problems": [f"exit {rc}"]})
                        break
                    hits[f"{kind} {point}"] += 1
                    resume_and_check(kind, out, f"{kind} {point}:{n}")
                    n += 1
        results["sweep_kills"] = sum(hits.values())
        results["sweep_points"] = dict(hits)

    if args.random:
        rng = random.Random(args.seed)
        phases: Counter[str] = Counter()
        killed = completed = double = 0
        t0 = time.perf_counter()
        for i in range(args.random):
            kind = "tar" if i % 4 else "folder"
            out = work / f"random-{i}"
            delay = rng.uniform(0, ref_seconds[kind] * 1.05)
            rc, _log = run(inputs[kind], out, kill_after=delay)
            if rc == 0:
                completed += 1
                phases["completed before the kill"] += 1
                continue
            killed += 1
            phases[phase_of(out)] += 1
            if rng.random() < 1 / 3:  # kill the resume too
                rc, _log = run(inputs[kind], out, kill_after=rng.uniform(0, ref_seconds[kind]))
                double += rc == -signal.SIGKILL
            resume_and_check(kind, out, f"random {i} ({kind}, {delay:.2f} s)")
        results["random"] = {"runs": args.random, "killed": killed, "killed_twice": double,
                             "completed_before_kill": completed, "seconds": time.perf_counter() - t0,
                             "kill_landed": dict(phases.most_common())}

    zygote.close()
    results["failures"] = failures
    results["seconds"] = time.perf_counter() - start_all
    results["work"] = str(work)
    print(json.dumps(results, indent=2))
    log_dir = ROOT / "bench-out"
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / "kill9.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.time(), **results}) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
